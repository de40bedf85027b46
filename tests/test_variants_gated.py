"""Head-gated attention (attention_jax.variants.gated) and the MHA <-> variant conversions.

Tolerances (stated once): gates all on vs MultiHeadAttention: exact (bitwise);
float32 vs the float64 numpy formula ``atol = rtol = 2e-5``; straight-through
gradients vs their numpy chain rule ``atol = rtol = 1e-4``; the skipping path vs
the masked path (same math, fewer heads) ``atol = rtol = 1e-6``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention, variants
from tests.helpers import numpy_attention

F32 = dict(atol=2e-5, rtol=2e-5)
GRAD = dict(atol=1e-4, rtol=1e-4)
SKIP = dict(atol=1e-6, rtol=1e-6)
HEADS = {"mha": (4, 4), "mqa": (4, 1), "gqa": (4, 2)}
B, T, D = 2, 5, 16


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def _pair(variant, **kw):
    """A gated module and the MultiHeadAttention with the same projections."""
    N, K = HEADS[variant]
    mha = MultiHeadAttention(D, N, num_kv_heads=K, rngs=nnx.Rngs(0))
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        getattr(mha, name)[...] = 0.1 * jnp.ones(getattr(mha, name).shape)
    gated = variants.from_mha(mha, "gated", **kw)
    gated.gate_kernel[...] = jax.random.normal(jax.random.key(5), gated.gate_kernel.shape)
    return gated, mha


def heads_np(m, x):
    """Per-head outputs ``[B, T, N, V]`` and the parameters, float64."""
    p = {n: None if a is None else np.asarray(a, np.float64) for n, a in m.param_values().items()}
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, p["q_kernel"]) + p["q_bias"]
    k = np.einsum("btd,dnh->btnh", x, p["k_kernel"]) + p["k_bias"]
    v = np.einsum("btd,dnh->btnh", x, p["v_kernel"]) + p["v_bias"]
    return numpy_attention(q, k, v)[0], p


def gates_np(m, x):
    z = np.asarray(x, np.float64).mean(1) @ np.asarray(m.gate_kernel[...], np.float64)
    z = z + np.asarray(m.gate_bias[...], np.float64)
    return 1 / (1 + np.exp(-z)), z


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("variant", HEADS)
def test_gates_all_on_equal_mha_exactly(variant, jit):
    gated, mha = _pair(variant, hard=True)
    gated.gate_kernel[...] = jnp.zeros_like(gated.gate_kernel[...])  # every gate 0.88 > 0.5
    soft, _ = _pair(variant, hard=False)
    x = _x()
    call = nnx.jit(lambda m, x, **kw: m(x, **kw)) if jit else (lambda m, x, **kw: m(x, **kw))
    ref = call(mha, x)
    np.testing.assert_array_equal(call(gated, x), ref)
    np.testing.assert_array_equal(call(soft, x, gates=jnp.ones((B, HEADS[variant][0]))), ref)


@pytest.mark.parametrize("variant", HEADS)
def test_soft_gates_match_formula(variant):
    m, _ = _pair(variant, hard=False)
    x = _x(1)
    g, _ = gates_np(m, x)
    np.testing.assert_allclose(m.head_gates(x), g, **F32)
    heads, p = heads_np(m, x)
    ref = np.einsum("btnv,nvd->btd", heads * g[:, None, :, None], p["o_kernel"]) + p["o_bias"]
    np.testing.assert_allclose(m(x), ref, **F32)


@pytest.mark.parametrize("variant", HEADS)
def test_hard_gates_straight_through_gradient(variant):
    m, _ = _pair(variant, hard=True, threshold=0.7)
    x = _x(2)
    g, _ = gates_np(m, x)
    assert 0 < (g > 0.7).sum() < g.size  # some heads on, some off
    heads, p = heads_np(m, x)
    h = (g > 0.7).astype(np.float64)
    w = np.cos(np.arange(B * T * D)).reshape(B, T, D)
    ref = np.einsum("btnv,nvd->btd", heads * h[:, None, :, None], p["o_kernel"]) + p["o_bias"]
    np.testing.assert_allclose(m(x), ref, **F32)  # forward: 0/1 gates
    # backward: dL/dgate_bias_n = sum_b dL/dh_bn * sigmoid'(z_bn)
    dl_dh = np.einsum("btd,btnv,nvd->bn", w, heads, p["o_kernel"])
    grads = nnx.grad(lambda m: jnp.sum(m(x) * w))(m)
    np.testing.assert_allclose(grads.gate_bias[...], (dl_dh * g * (1 - g)).sum(0), **GRAD)
    np.testing.assert_allclose(grads.gate_kernel[...],
                               np.asarray(x, np.float64).mean(1).T @ (dl_dh * g * (1 - g)),
                               **GRAD)


@pytest.mark.parametrize("variant", HEADS)
def test_eager_hard_call_skips_inactive_heads(variant):
    N, K = HEADS[variant]
    m, _ = _pair(variant, hard=True)
    x = _x(3)
    gates = jnp.asarray([[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])  # head 0 in row 0 only
    sel = variants.select_heads(np.asarray(gates) > 0.5, K)
    assert sel == ((0,), ((0,),))  # kv head 0 and its query head 0, whatever K
    eager = m(x, gates=gates)
    traced = nnx.jit(lambda m, x, g: m(x, gates=g))(m, x, gates)  # traced gates: all heads
    np.testing.assert_allclose(eager, traced, **SKIP)
    # the skipping program projects one query head, the full one N
    params, hg = m.param_values(), variants.hard_gates(gates, 0.5)

    def q_heads(selection):
        jaxpr = jax.make_jaxpr(lambda p, x: variants.gated_attention_forward(
            p, x, x, x, hg, selection=selection))(params, x)
        return {v.aval.shape for e in jaxpr.eqns for v in e.outvars
                if v.aval.shape[:2] == (B, T) and len(v.aval.shape) == 4}

    assert q_heads(sel) == {(B, T, 1, 4)}
    assert (B, T, N, 4) in q_heads(None)


def test_select_heads_keeps_groups():
    act = np.array([[1, 1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]], bool)  # N=8
    assert variants.select_heads(act, 8) == ((0, 1, 5, 7), ((0,), (1,), (5,), (7,)))
    assert variants.select_heads(act, 2) == ((0, 1), ((0, 1), (5, 7)))  # G = 4
    assert variants.select_heads(act, 1) == ((0,), ((0, 1, 5, 7),))  # MQA
    assert variants.select_heads(np.zeros(8, bool), 2) == ((), ())


def test_no_active_head_leaves_the_output_bias():
    m, mha = _pair("gqa", hard=True)
    y = m(_x(), gates=jnp.zeros((B, 4)))
    np.testing.assert_array_equal(y, jnp.broadcast_to(mha.o_bias[...], y.shape))


@pytest.mark.parametrize("kind", ["linear", "gated", "linformer"])
@pytest.mark.parametrize("variant", HEADS)
def test_from_mha_copies_projections_and_to_mha_round_trips(variant, kind):
    N, K = HEADS[variant]
    mha = MultiHeadAttention(D, N, num_kv_heads=K, rngs=nnx.Rngs(7))
    kw = {"max_length": 8, "projected_length": 4} if kind == "linformer" else {}
    new = variants.from_mha(mha, kind, **kw)
    assert isinstance(new, variants.KINDS[kind]) and new.num_kv_heads == K
    back = variants.to_mha(new)
    assert type(back) is MultiHeadAttention
    for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "o_bias"):
        np.testing.assert_array_equal(getattr(new, name)[...], getattr(mha, name)[...])
        np.testing.assert_array_equal(getattr(back, name)[...], getattr(mha, name)[...])
    assert new(_x()[:, :4]).shape == (B, 4, D)


def test_errors_name_the_problem():
    m, _ = _pair("gqa")
    with pytest.raises(ValueError, match=r"gates must be \[B, N\] = \[2, 4\]"):
        m(_x(), gates=jnp.ones((B, 3)))
    with pytest.raises(ValueError, match="threshold"):
        variants.HeadGatedAttention(D, 4, threshold=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind must be one of"):
        variants.from_mha(MultiHeadAttention(D, 4, rngs=nnx.Rngs(0)), "sparse")
    with pytest.raises(ValueError, match="rope"):
        variants.from_mha(MultiHeadAttention(D, 4, rope=1e4, rngs=nnx.Rngs(0)), "linear")
