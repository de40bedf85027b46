"""Test helpers shared by several test files (test files never import each other).

* :func:`numpy_attention`: the float64 numpy reference of attention.
* Blockwise-style checks: :func:`inputs`, :func:`mask_of_kind`, :func:`via_ops`,
  :func:`check_against_einsum` and their stated tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import ops

# Stated tolerances (absolute; values and gradients are O(1) here).
F32_TOL = dict(atol=2e-5, rtol=2e-5)
F32_GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
# bf16 inputs, float32 accumulation on both sides; the two paths round
# differently (per-block rescaling), so about 3 bf16 ulps at O(1).
BF16_TOL = dict(atol=3e-2, rtol=3e-2)
BF16_GRAD_TOL = dict(atol=6e-2, rtol=6e-2)

# (N, K) per variant.
HEADS = {"mha": (4, 4), "mqa": (4, 1), "gqa": (4, 2)}
B, T, S, H, V = 2, 10, 13, 8, 6


def numpy_attention(q, k, v, mask=None, scale=None):
    """float64 reference: repeat K/V to N heads, softmax, zero rows with no key.

    Returns ``(out [B, T, N, V], weights [B, N, T, S])``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scale = 1 / np.sqrt(H) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    m = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    logits = np.where(m, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(mx), mx, 0.0))
    w = np.where(m, w, 0.0)
    den = w.sum(-1, keepdims=True)
    w = np.divide(w, den, out=np.zeros_like(w), where=den > 0)
    return np.einsum("bnts,bsnv->btnv", w, v), w


def inputs(N, K, T=T, S=S, *, dtype=jnp.float32, seed=0):
    """Random ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, V]``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, V))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def mask_of_kind(kind, N, T=T, S=S, seed=1):
    """Masks of the shapes callers use; "full" has rows that see no key."""
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "keypad":  # [B, 1, 1, S], lengths 7 and S
        return jnp.arange(S)[None, None, None, :] < jnp.array([7, S])[:, None, None, None]
    if kind == "full":  # [B, N, T, S] random, rows 3 (batch 0, head 1) and T-1 (all) empty
        m = rng.random((B, N, T, S)) > 0.3
        m[0, 1, 3, :] = False
        m[:, :, T - 1, :] = False
        return jnp.asarray(m)
    if kind == "query":  # [1, 1, T, S] random, shared by batch and heads
        return jnp.asarray(rng.random((1, 1, T, S)) > 0.4)
    raise ValueError(kind)


def out_and_grads(fn, mask, argnums, *, is_causal):
    """``(q, k, v[, bias]) -> (out, grads)`` of a loss that weights every output differently."""

    def loss(q, k, v, bias=None):
        out = fn(q, k, v, mask, bias, is_causal=is_causal, scale=None)
        w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w), out

    def run(*args):
        grads, out = jax.grad(loss, argnums, has_aux=True)(*args)
        return out, grads

    return run


def via_ops(impl):
    """``ops.dot_product_attention`` with ``implementation=impl`` (attention_core's signature)."""
    def fn(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        return ops.dot_product_attention(
            q, k, v, mask, bias, is_causal=is_causal, scale=scale, implementation=impl
        )

    return fn


def check_against_einsum(fn, q, k, v, mask, bias=None, *, is_causal, jit=True, tol=F32_TOL,
                         grad_tol=F32_GRAD_TOL):
    """``fn`` (signature of ops.attention_core) equals the einsum path, values and gradients."""
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    args = (q, k, v) if bias is None else (q, k, v, bias)
    got_fn = out_and_grads(fn, mask, argnums, is_causal=is_causal)
    got, g_got = (jax.jit(got_fn) if jit else got_fn)(*args)
    want, g_want = jax.jit(out_and_grads(ops.attention_core, mask, argnums,
                                         is_causal=is_causal))(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    for name, a, b in zip("qkvb"[: len(argnums)], g_got, g_want, strict=True):
        assert a.dtype == b.dtype, name
        assert np.all(np.isfinite(np.asarray(a, np.float32))), f"d{name} not finite"
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"d{name}", **grad_tol
        )
