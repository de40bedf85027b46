"""Linear attention (attention_jax.variants.linear) against its textbook formula in numpy.

Tolerances (stated once): float32 outputs vs the float64 numpy formula
``atol = rtol = 2e-5``; gradients as directional derivatives vs central finite
differences of the numpy formula, ``atol = rtol = 1e-4``; bfloat16 inputs vs
float32, ``atol = rtol = 5e-2`` (a few bf16 ulps at O(1)); parallel vs recurrent
forms in float32, ``atol = rtol = 1e-5``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import variants
from attention_jax.variants import linear as lin

F32 = dict(atol=2e-5, rtol=2e-5)
GRAD = dict(atol=1e-4, rtol=1e-4)
BF16 = dict(atol=5e-2, rtol=5e-2)
SAME = dict(atol=1e-5, rtol=1e-5)
HEADS = {"mha": (4, 4), "mqa": (4, 1), "gqa": (4, 2)}
B, T, H, V, EPS = 2, 7, 4, 3, 1e-6


def phi_np(x, name):
    return np.where(x > 0, x + 1.0, np.exp(x)) if name == "elu1" else np.maximum(x, 0.0)


def linear_np(q, k, v, *, causal, feature_map="elu1"):
    """The quadratic textbook form: ``(phi(q) phi(k)^T [masked]) v / row sums``, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    a = np.einsum("btnh,bsnh->bnts", phi_np(q, feature_map), phi_np(k, feature_map))
    if causal:
        a = a * np.tril(np.ones(a.shape[-2:]))
    num = np.einsum("bnts,bsnv->btnv", a, v)
    den = a.sum(-1).transpose(0, 2, 1)[..., None]  # [B, T, N, 1]
    return num / (den + EPS)


def qkv(N, K, S=T, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, V))
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


@pytest.mark.parametrize("feature_map", ["elu1", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("variant", HEADS)
def test_forward_matches_textbook_formula(variant, causal, feature_map):
    q, k, v = qkv(*HEADS[variant], S=T if causal else T + 2)
    out = variants.linear_attention(q, k, v, causal=causal, feature_map=feature_map,
                                    chunk_size=3)  # 7 = 3 + 3 + 1 (padded last chunk)
    assert out.shape == (B, T, HEADS[variant][0], V) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, linear_np(q, k, v, causal=causal,
                                              feature_map=feature_map), **F32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("variant", HEADS)
def test_gradients_match_finite_differences(variant, causal):
    q, k, v = qkv(*HEADS[variant], seed=1)
    w = np.sin(np.arange(B * T * HEADS[variant][0] * V)).reshape(B, T, -1, V)

    def loss(q, k, v):
        return jnp.sum(variants.linear_attention(q, k, v, causal=causal, chunk_size=4) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    rng = np.random.default_rng(2)
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    h = 1e-6
    for i, g in enumerate(grads):
        d = rng.standard_normal(args[i].shape)
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + h * d, args[i] - h * d
        fd = (np.sum(linear_np(*plus, causal=causal) * w)
              - np.sum(linear_np(*minus, causal=causal) * w)) / (2 * h)
        np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), fd, **GRAD)


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_chunk_size_changes_nothing(chunk_size):
    q, k, v = qkv(4, 2)
    ref = variants.linear_attention(q, k, v, causal=True, chunk_size=T)
    np.testing.assert_allclose(
        variants.linear_attention(q, k, v, causal=True, chunk_size=chunk_size), ref, **SAME)


def test_state_carries_a_prefix():
    """The chunked form from a prefix's state == the whole sequence's tail."""
    q, k, v = qkv(4, 2)
    full = variants.linear_attention(q, k, v, causal=True)
    head, state = variants.linear_attention(q[:, :3], k[:, :3], v[:, :3], causal=True,
                                            return_state=True)
    tail = variants.linear_attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True,
                                     initial_state=state)
    np.testing.assert_allclose(jnp.concatenate([head, tail], axis=1), full, **SAME)


def _module(variant, **kw):
    N, K = HEADS[variant]
    return variants.LinearAttention(16, N, num_kv_heads=K, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("variant", HEADS)
def test_decode_token_by_token_equals_parallel_causal(variant, jit):
    m = _module(variant)
    x = jax.random.normal(jax.random.key(0), (B, T, 16))
    ref = m(x, is_causal=True)
    step = nnx.jit(lambda m, x, s: m.decode(x, s)) if jit else (lambda m, x, s: m.decode(x, s))
    state = m.init_state(B)
    sizes = (state.kv.shape, state.z.shape)
    ys = []
    for t in range(T):
        y, state = step(m, x[:, t:t + 1], state)
        assert (state.kv.shape, state.z.shape) == sizes  # O(1) in the length
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), ref, **SAME)
    K, Hm = m.num_kv_heads, m.head_dim
    assert sizes == ((B, K, Hm, Hm), (B, K, Hm))
    # a prefill then steps gives the same outputs
    y0, state = m.decode(x[:, :4], m.init_state(B))
    y1, _ = m.decode(x[:, 4:5], state)
    np.testing.assert_allclose(jnp.concatenate([y0, y1], axis=1), ref[:, :5], **SAME)


@pytest.mark.parametrize("variant", HEADS)
def test_module_is_projections_around_the_formula(variant):
    m = _module(variant, use_bias=True)
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):  # non-zero biases
        getattr(m, name)[...] = 0.1 * jnp.ones(getattr(m, name).shape)
    x = np.asarray(jax.random.normal(jax.random.key(1), (B, T, 16)), np.float64)
    p = {n: np.asarray(a, np.float64) for n, a in m.param_values().items()}
    q = np.einsum("btd,dnh->btnh", x, p["q_kernel"]) + p["q_bias"]
    k = np.einsum("btd,dnh->btnh", x, p["k_kernel"]) + p["k_bias"]
    v = np.einsum("btd,dnh->btnh", x, p["v_kernel"]) + p["v_bias"]
    ref = np.einsum("btnv,nvd->btd", linear_np(q, k, v, causal=True), p["o_kernel"]) + p["o_bias"]
    np.testing.assert_allclose(m(jnp.asarray(x, jnp.float32), is_causal=True), ref, **F32)


def test_bfloat16_inputs():
    q, k, v = qkv(4, 2)
    ref = variants.linear_attention(q, k, v, causal=True)
    out = variants.linear_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, **BF16)


def test_errors_name_the_problem():
    q, k, v = qkv(4, 2, S=T + 1)
    with pytest.raises(ValueError, match="T=7, S=8"):
        variants.linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="feature_map"):
        variants.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="rope"):
        variants.LinearAttention(16, 4, rope=10_000.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout_rate=0\.1"):
        variants.LinearAttention(16, 4, dropout_rate=0.1, rngs=nnx.Rngs(0))
    m = _module("gqa")
    with pytest.raises(ValueError, match="takes no mask"):
        m(jnp.ones((B, 3, 16)), mask=jnp.ones((3, 3), bool))
    with pytest.raises(ValueError, match="init_state"):
        m.decode(jnp.ones((B, 1, 16)), lin.init_state(B, 4, 4, 4))
