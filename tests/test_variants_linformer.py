"""Linformer (attention_jax.variants.linformer) against its textbook formula in numpy.

Tolerances (stated once): float32 vs the float64 numpy formula ``atol = rtol = 2e-5``;
gradients as directional derivatives vs central finite differences of the numpy
formula, ``atol = rtol = 1e-4``; identity projections vs dense attention, two
float32 paths, ``atol = rtol = 1e-5``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention, ops, variants
from tests.helpers import numpy_attention

F32 = dict(atol=2e-5, rtol=2e-5)
GRAD = dict(atol=1e-4, rtol=1e-4)
SAME = dict(atol=1e-5, rtol=1e-5)
HEADS = {"mha": (4, 4), "mqa": (4, 1), "gqa": (4, 2)}
B, T, S, L, P, H, V = 2, 5, 9, 12, 4, 4, 3


def linformer_np(q, k, v, e, f):
    """``softmax(q (E k)^T / sqrt(H)) (F v)`` with E, F sliced to S columns, float64."""
    e, f = (np.asarray(m, np.float64)[:, :k.shape[1]] for m in (e, f))
    kp = np.einsum("ps,bskh->bpkh", e, np.asarray(k, np.float64))
    vp = np.einsum("ps,bskv->bpkv", f, np.asarray(v, np.float64))
    return numpy_attention(q, kp, vp)[0]


def operands(N, K, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, V), (P, L), (P, L))
    return tuple(jnp.asarray(rng.standard_normal(s) * (0.3 if len(s) == 2 else 1.0),
                             jnp.float32) for s in shapes)


@pytest.mark.parametrize("share_kv", [False, True], ids=["ef", "shared"])
@pytest.mark.parametrize("variant", HEADS)
def test_forward_matches_textbook_formula(variant, share_kv):
    q, k, v, e, f = operands(*HEADS[variant])
    out = variants.linformer_attention(q, k, v, e, None if share_kv else f)
    assert out.shape == (B, T, HEADS[variant][0], V)
    np.testing.assert_allclose(out, linformer_np(q, k, v, e, e if share_kv else f), **F32)


@pytest.mark.parametrize("variant", HEADS)
def test_gradients_match_finite_differences(variant):
    args = operands(*HEADS[variant], seed=1)
    w = np.sin(np.arange(B * T * HEADS[variant][0] * V)).reshape(B, T, -1, V)
    grads = jax.grad(lambda *a: jnp.sum(variants.linformer_attention(*a) * w),
                     argnums=tuple(range(5)))(*args)
    rng = np.random.default_rng(3)
    a64 = [np.asarray(x, np.float64) for x in args]
    h = 1e-6
    for i, g in enumerate(grads):  # q, k, v, e and f
        d = rng.standard_normal(a64[i].shape)
        plus, minus = list(a64), list(a64)
        plus[i], minus[i] = a64[i] + h * d, a64[i] - h * d
        fd = (np.sum(linformer_np(*plus) * w) - np.sum(linformer_np(*minus) * w)) / (2 * h)
        np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), fd, **GRAD)


@pytest.mark.parametrize("variant", HEADS)
def test_identity_projections_equal_dense_noncausal_attention(variant):
    q, k, v, _, _ = operands(*HEADS[variant])
    eye = jnp.eye(S, L)  # P == S, identity on the first S positions
    np.testing.assert_allclose(variants.linformer_attention(q, k, v, eye, eye),
                               ops.dot_product_attention(q, k, v), **SAME)


@pytest.mark.parametrize("variant", HEADS)
def test_module_from_mha_with_identity_equals_mha(variant):
    N, K = HEADS[variant]
    mha = MultiHeadAttention(16, N, num_kv_heads=K, rngs=nnx.Rngs(0))
    lf = variants.from_mha(mha, "linformer", max_length=S, projected_length=S)
    assert lf.e_proj.shape == lf.f_proj.shape == (S, S)
    for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "o_bias"):
        np.testing.assert_array_equal(getattr(lf, name)[...], getattr(mha, name)[...])
    x = jax.random.normal(jax.random.key(0), (B, S, 16))
    assert not np.allclose(lf(x), mha(x), atol=1e-3)  # random N(0, 1/P) projections differ
    lf.e_proj[...] = jnp.eye(S)
    lf.f_proj[...] = jnp.eye(S)
    np.testing.assert_allclose(lf(x), mha(x), **SAME)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(lf, x), mha(x), **SAME)


def test_shorter_inputs_use_the_first_columns():
    m = variants.LinformerAttention(16, 4, max_length=L, projected_length=P, share_kv=True,
                                    rngs=nnx.Rngs(1))
    assert m.f_proj is None
    x = jax.random.normal(jax.random.key(2), (B, S, 16))
    full = m(x)
    m.e_proj[...] = m.e_proj[...].at[:, S:].set(100.0)  # columns past S are never read
    np.testing.assert_array_equal(m(x), full)


def test_errors_name_the_problem():
    m = variants.LinformerAttention(16, 4, max_length=L, projected_length=P, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="non-causal"):
        m(jnp.ones((1, 3, 16)), is_causal=True)
    with pytest.raises(ValueError, match="takes no mask"):
        m(jnp.ones((1, 3, 16)), mask=jnp.ones((3, 3), bool))
    with pytest.raises(ValueError, match="key length 13 > max_length 12"):
        m(jnp.ones((1, 13, 16)))
    with pytest.raises(ValueError, match="projected_length"):
        variants.LinformerAttention(16, 4, max_length=4, projected_length=8, rngs=nnx.Rngs(0))
    q, k, v, e, f = operands(4, 2)
    with pytest.raises(ValueError, match="S = 9"):
        variants.linformer_attention(q, k, v, e[:, :5], f)
    with pytest.raises(NotImplementedError, match="non-causal"):
        m.init_cache(1, 8)
