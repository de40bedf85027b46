"""score_mod, sinks, scale and dtype edge cases, the cuDNN mapping of mask objects,
and the kernel pieces for context parallelism.

Gradients of sinks and of closed-over score_mod arrays are checked against a
dense PyTorch autograd reference written here (softmax with an extra sink column).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import masks as M
from attention_jax import ops, scores
from attention_jax.kernels import blockwise, cudnn, dispatch
from tests.helpers import F32_GRAD_TOL, F32_TOL, HEADS

torch = pytest.importorskip("torch")

B, T, S, H, V = 2, 12, 16, 8, 8


def _qkv(N, K, dtype=jnp.float32, seed=0, T=T, S=S):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype)
                 for s in ((B, T, N, H), (B, S, K, H), (B, S, K, V)))


def _torch_reference(q, k, v, mask, sinks, slopes, cap):
    """Dense float64 torch attention with ALiBi, softcap and sinks; returns out and grads."""
    N, K = q.shape[2], k.shape[2]
    tq, tk, tv, ts, tsl = (torch.tensor(np.asarray(x, np.float64), requires_grad=True)
                           for x in (q, k, v, sinks, slopes))
    kk, vv = tk.repeat_interleave(N // K, 2), tv.repeat_interleave(N // K, 2)
    s = torch.einsum("btnh,bsnh->bnts", tq, kk) / np.sqrt(H)
    dist = (torch.arange(S)[None, :] - torch.arange(T)[:, None]).double()
    s = s + tsl[None, :, None, None] * dist
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~torch.tensor(np.asarray(mask)), float("-inf"))
    sink = ts[None, :, None, None].expand(B, N, T, 1)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    out = torch.einsum("bnts,bsnv->btnv", p, vv)
    w = torch.sin(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach().numpy(), [x.grad.numpy() for x in (tq, tk, tv, ts, tsl)]


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_sinks_alibi_softcap_against_torch_autograd(impl):
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K)
    rng = np.random.default_rng(1)
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    slopes = jnp.asarray(scores.alibi_slopes(N))
    mask = M.Causal() & M.SlidingWindow(5)
    want, g_want = _torch_reference(q, k, v, mask.dense(B, N, T, S), sinks, slopes, 3.0)

    def loss(q, k, v, sinks, slopes):
        cap = scores.softcap(3.0)
        al = scores.alibi(slopes)

        def both(s, b, n, t, kv):
            return cap(al(s, b, n, t, kv), b, n, t, kv)

        kw = dict(block_q=4, block_kv=4) if impl == "blockwise" else {}
        fn = blockwise.blockwise_attention if impl == "blockwise" else ops.attention_core
        out = fn(q, k, v, mask, score_mod=both, sinks=sinks, **kw)
        w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out * w), out

    grads, out = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4), has_aux=True))(q, k, v, sinks, slopes)
    np.testing.assert_allclose(out, want, **F32_TOL)
    for name, a, b in zip(["dq", "dk", "dv", "dsinks", "dslopes"], grads, g_want, strict=True):
        np.testing.assert_allclose(a, b, err_msg=name, **F32_GRAD_TOL)


def test_rows_with_only_a_sink_are_zero():
    N, K = HEADS["mqa"]
    q, k, v = _qkv(N, K, seed=2)
    none = M.Lengths(jnp.array([0, 16]))  # batch row 0 sees no key, only its sink
    sinks = jnp.zeros((N,))
    out = blockwise.blockwise_attention(q, k, v, none, sinks=sinks, block_q=4, block_kv=4)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    g = jax.grad(lambda s: blockwise.blockwise_attention(
        q, k, v, none, sinks=s, block_q=4, block_kv=4).sum())(sinks)
    assert np.isfinite(np.asarray(g)).all()


# ---------------------------------------------------------------------------
# Issue 15: traced scale, any scale in any dtype, integer operands
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_traced_and_nonpositive_scales(dtype):
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, dtype, seed=3)
    f = jax.jit(lambda q, k, v, scale: blockwise.blockwise_attention(
        q, k, v, is_causal=True, scale=scale, block_q=4, block_kv=4))
    tol = F32_TOL if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
    for scale in (0.3, 0.0, -0.5):
        want = ops.attention_core(q, k, v, is_causal=True, scale=scale)
        np.testing.assert_allclose(np.asarray(f(q, k, v, scale), np.float32),
                                   np.asarray(want, np.float32), **tol)
        got = blockwise.blockwise_attention(q, k, v, is_causal=True, scale=scale)  # static
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   **tol)


def test_auto_above_threshold_takes_a_traced_scale(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_EINSUM_MAX_TS, "cpu", 0)  # auto -> blockwise
    q, k, v = _qkv(4, 2, seed=4)
    got = jax.jit(lambda s: ops.dot_product_attention(q, k, v, scale=s))(0.25)
    np.testing.assert_allclose(got, ops.attention_core(q, k, v, scale=0.25), **F32_TOL)


def test_integer_operands_are_promoted_to_float32():
    q = jnp.arange(2 * 3 * 2 * 4).reshape(2, 3, 2, 4) % 3
    kv = jnp.arange(2 * 5 * 1 * 4).reshape(2, 5, 1, 4) % 2
    for impl in ("xla", "blockwise", "auto"):
        out = ops.dot_product_attention(q, kv, kv, implementation=impl)
        assert out.dtype == jnp.float32, impl
        want = ops.attention_core(*(x.astype(jnp.float32) for x in (q, kv, kv)))
        np.testing.assert_allclose(out, want, err_msg=impl, **F32_TOL)


# ---------------------------------------------------------------------------
# cuDNN: what it accepts, mapped through jax.nn (its XLA implementation on CPU)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["causal", "window", "lengths", "all"])
def test_cudnn_mapping_of_mask_objects(name):
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=5, S=T)
    lengths = M.Lengths(jnp.array([7, 12]), jnp.array([12, 5]))
    mask = {"causal": M.Causal(), "window": M.SlidingWindow(3, 1), "lengths": lengths,
            "all": M.Causal() & M.SlidingWindow(2) & lengths}[name]
    got = cudnn.jax_nn_attention(q, k, v, mask, implementation="xla")
    want = ops.attention_core(q, k, v, mask)
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_cudnn_refuses_what_it_cannot_do_and_auto_falls_back():
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in _qkv(4, 2, seed=6))
    reason = cudnn.cudnn_unsupported_reason
    assert reason(qb, kb, vb, M.Causal() & M.SlidingWindow(4), platform="gpu") is None
    assert "Segments" in reason(qb, kb, vb, M.Segments(jnp.zeros((2, T), jnp.int32)),
                                platform="gpu")
    assert "offset=2" in reason(qb, kb, vb, M.Causal(2), platform="gpu")
    assert "score_mod" in reason(qb, kb, vb, score_mod=scores.softcap(1.0), platform="gpu")
    assert "sinks" in reason(qb, kb, vb, sinks=jnp.zeros(4), platform="gpu")
    big = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.bfloat16)
    choose = dispatch.choose_implementation
    assert choose(big, kv, kv, M.Causal() & M.SlidingWindow(7), platform="gpu") == "cudnn"
    assert choose(big, kv, kv, M.Chunked(64), platform="gpu") == "blockwise"
    assert choose(big, kv, kv, score_mod=scores.softcap(1.0), platform="gpu") == "blockwise"
    with pytest.raises(ValueError, match="does not take sinks"):
        ops.dot_product_attention(qb, kb, vb, sinks=jnp.zeros(4), implementation="decode")


# ---------------------------------------------------------------------------
# Pieces for context parallelism
# ---------------------------------------------------------------------------


def test_block_pieces_merge_to_the_full_attention():
    """Two key halves at their positions, merged by log-sum-exp, equal one call; the
    per-half backward pieces sum to the full gradients."""
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=7)
    mask = M.Causal(S - T) & M.SlidingWindow(9)
    kw = dict(block_q=4, block_kv=4)
    halves = [(slice(0, 8), jnp.arange(8)), (slice(8, 16), jnp.arange(8, 16))]
    parts = [blockwise.block_forward(q, k[:, sl], v[:, sl], mask, kv_positions=pos, **kw)
             for sl, pos in halves]
    out, lse = blockwise.merge_partials(*parts[0], *parts[1])
    want = ops.attention_core(q, k, v, mask)
    np.testing.assert_allclose(out, want, **F32_TOL)

    dout = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    grads = [blockwise.block_backward(q, k[:, sl], v[:, sl], out, lse, dout, mask,
                                      kv_positions=pos, **kw) for sl, pos in halves]
    dq = grads[0][0] + grads[1][0]
    dk = jnp.concatenate([grads[0][1], grads[1][1]], axis=1)
    dv = jnp.concatenate([grads[0][2], grads[1][2]], axis=1)
    g_want = jax.grad(lambda q, k, v: jnp.sum(ops.attention_core(q, k, v, mask) * dout),
                      (0, 1, 2))(q, k, v)
    for name, a, b in zip(["dq", "dk", "dv"], (dq, dk, dv), g_want, strict=True):
        np.testing.assert_allclose(a, b, err_msg=name, **F32_GRAD_TOL)
