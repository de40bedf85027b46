"""GPU-only checks (skipped without a GPU; ``experiments/gpu_suite.py`` runs them).

* cuDNN and the blockwise kernel at the GPU's default blocks against the einsum
  path on float32 copies of the same bf16 inputs, forward and gradients;
* the blockwise kernel in float32 at ``highest`` matmul precision;
* module decoding with bf16 and int8 caches, through each decode backend, in a
  4096-slot cache holding a few hundred tokens, against the full causal forward;
  a partially filled cache gives the outputs of a tight one.

Errors are ``norm(got - want) / norm(want)``: bf16 operands land between 1e-3
and 1e-2 (float32 accumulation on both sides), float32 far below 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import ops

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

BF16_REL = 2e-2
F32_REL = 1e-5


def _rel(got, want) -> float:
    got, want = (np.asarray(x, np.float64) for x in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _out_and_grads(impl, q, k, v, is_causal):
    """Output and gradients of a loss that weights every output element differently."""
    def loss(q, k, v):
        out = ops.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
        w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _qkv(N, K, H, T, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (2, T, N, H), dtype), jax.random.normal(kk, (2, T, K, H), dtype),
            jax.random.normal(kv, (2, T, K, H), dtype))


@pytest.mark.parametrize(("H", "N", "K", "is_causal"), [
    (64, 8, 8, False), (64, 8, 2, True), (128, 8, 1, True), (128, 8, 2, False)])
@pytest.mark.parametrize("impl", ["cudnn", "blockwise"])
def test_bf16_backends_match_einsum_forward_and_gradients(impl, H, N, K, is_causal):
    q, k, v = _qkv(N, K, H, 384, jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        want, want_grads = _out_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)),
                                          is_causal)
    got, grads = _out_and_grads(impl, q, k, v, is_causal)
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want) < BF16_REL
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        assert _rel(g, w) < BF16_REL, name


def test_blockwise_float32_matches_einsum_at_highest_precision():
    q, k, v = _qkv(8, 2, 64, 1000, jnp.float32, seed=1)  # ragged last block
    with jax.default_matmul_precision("highest"):
        want, want_grads = _out_and_grads("xla", q, k, v, True)
        got, grads = _out_and_grads("blockwise", q, k, v, True)
    assert _rel(got, want) < F32_REL
    for g, w in zip(grads, want_grads, strict=True):
        assert _rel(g, w) < 10 * F32_REL


def _module(implementation, dtype=jnp.bfloat16):
    return aj.MultiHeadAttention(256, 8, num_kv_heads=2, rope=10_000.0, param_dtype=dtype,
                                 implementation=implementation, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("implementation", "cache_dtype"), [
    ("auto", "bfloat16"), ("auto", "int8"), ("decode", "bfloat16"), ("blockwise", "int8")])
def test_decode_steps_equal_the_full_forward(implementation, cache_dtype):
    """A ragged prefill (300, 257, 3 real of 300), a 4-token step and three single steps."""
    m = _module(implementation)
    prompt, B, P = np.array([300, 257, 3]), 3, 300
    seqs = jax.random.normal(jax.random.key(2), (B, P + 7, 256), jnp.bfloat16)
    want = np.asarray(m(seqs, is_causal=True), np.float32)
    step = nnx.jit(lambda m, x, c, valid=None: m.decode(x, c, valid_lengths=valid),
                   donate_argnums=2)
    cache = m.init_cache(B, 4096, jnp.dtype(cache_dtype))
    y, cache = step(m, seqs[:, :P], cache, jnp.asarray(prompt))
    for b in range(B):
        assert _rel(y[b, :prompt[b]], want[b, :prompt[b]]) < BF16_REL, b
    pos = prompt.copy()
    for t in (4, 1, 1, 1):
        idx = pos[:, None] + np.arange(t)[None, :]
        y, cache = step(m, seqs[np.arange(B)[:, None], idx], cache)
        assert _rel(y, want[np.arange(B)[:, None], idx]) < BF16_REL, t
        pos += t
    np.testing.assert_array_equal(cache.lengths, prompt + 7)


def test_partially_filled_cache_equals_tight_cache():
    with jax.default_matmul_precision("highest"):
        m = _module("auto", jnp.float32)
        x = jax.random.normal(jax.random.key(3), (2, 301, 256))
        step = nnx.jit(lambda m, x, c: m.decode(x, c))
        outs = []
        for slots in (301, 4096):
            _, cache = step(m, x[:, :300], m.init_cache(2, slots))
            outs.append(step(m, x[:, 300:], cache)[0])
    assert _rel(outs[1], outs[0]) < F32_REL
