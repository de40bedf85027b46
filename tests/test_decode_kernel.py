"""The "decode" backend (cache read in place) against the einsum reference, and its auto rule.

The reference is ``ops.attention_core`` (einsum contractions per kv head); the
decode backend contracts the flattened ``[B, S, K*H]`` rows against block-diagonal
queries instead, so the two share only the mask and softmax code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention, kernels, masks, ops
from attention_jax.kernels import decode, dispatch
from tests.test_blockwise import (
    BF16_GRAD_TOL,
    BF16_TOL,
    F32_TOL,
    HEADS,
    _check,
    _inputs,
    _mask,
    _via_ops,
)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("mask_kind", [None, "keypad", "query"])
def test_decode_matches_reference(heads, T, mask_kind):
    N, K = HEADS[heads]
    q, k, v = _inputs(N, K, T=T)
    _check(decode.decode_core, q, k, v, _mask(mask_kind, N, T=T), is_causal=T > 1)


def test_decode_with_bias_offset_causal_mask_and_no_jit():
    """A per-row causal mask with offsets (as the KV cache builds it) and a bias, eagerly;
    the second row's first query also sees no key at all (zeros, finite gradients)."""
    N, K = HEADS["gqa"]
    T, S = 2, 13
    q, k, v = _inputs(N, K, T=T, S=S)
    mask = masks.causal_mask(T, S, offset=jnp.array([4, 9]))  # [B, 1, T, S]
    mask = mask & jnp.asarray([[[[True], [True]]], [[[False], [True]]]])
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, N, T, S)), jnp.float32)
    _check(_via_ops("decode"), q, k, v, mask, bias, is_causal=False, jit=False)


@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_decode_bf16_matches_reference(heads):
    N, K = HEADS[heads]
    q, k, v = _inputs(N, K, T=1, dtype=jnp.bfloat16)
    _check(decode.decode_core, q, k, v, _mask("keypad", N, T=1), is_causal=False,
           tol=BF16_TOL, grad_tol=BF16_GRAD_TOL)


def test_flat_contractions_equal_the_einsum_ones():
    """Each swapped contraction alone: logits [B, K, G, T, S] and combine [B, T, N, V]."""
    N, K = 6, 2
    q, k, v = _inputs(N, K, T=2)
    np.testing.assert_allclose(decode.flat_logits(q, k, scale=0.3),
                               ops.attention_logits(q, k, scale=0.3), **F32_TOL)
    w = jax.nn.softmax(ops.attention_logits(q, k), axis=-1)
    np.testing.assert_allclose(decode.flat_combine(w, v, jnp.float32),
                               ops.combine_values(w, v, jnp.float32), **F32_TOL)


def test_auto_takes_decode_for_few_queries_on_a_long_cache_on_cpu():
    def shaped(t, s, n=16, k=4):
        kv = jax.ShapeDtypeStruct((1, s, k, 64), jnp.float32)
        return jax.ShapeDtypeStruct((1, t, n, 64), jnp.float32), kv, kv

    choose = kernels.choose_implementation
    assert choose(*shaped(1, 128), platform="cpu") == "decode"  # T*N = 16: any S
    assert choose(*shaped(1, 32768), platform="cpu") == "decode"
    assert choose(*shaped(4, 1024), platform="cpu") == "xla"  # T*N = 64: short cache
    assert choose(*shaped(4, dispatch.AUTO_DECODE_MIN_S), platform="cpu") == "decode"
    assert choose(*shaped(16, 8192), platform="cpu") == "blockwise"  # T*N = 256
    assert choose(*shaped(1, 1 << 21), platform="cpu") == "blockwise"  # scores too large
    assert choose(*shaped(1, 32768), platform="gpu") != "decode"  # CPU only


def test_module_decode_uses_the_same_numbers_with_either_backend():
    """KV-cache decoding through auto (-> decode) equals the einsum backend."""
    outs = []
    for impl in ("decode", "xla"):
        m = MultiHeadAttention(32, 8, num_kv_heads=2, implementation=impl, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (2, 6, 32))
        cache = m.init_cache(2, 8)
        y0, cache = m.decode(x[:, :5], cache, valid_lengths=jnp.array([5, 3]))
        y1, cache = m.decode(x[:, 5:], cache)
        outs.append((y0, y1))
    np.testing.assert_allclose(outs[0][0], outs[1][0], **F32_TOL)
    np.testing.assert_allclose(outs[0][1], outs[1][1], **F32_TOL)
    assert "decode" in ops.available_implementations()
