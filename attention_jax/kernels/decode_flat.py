"""The token-major ``"decode"`` backend: few queries against ``[B, S, K, H]`` keys and values.

:func:`decode_core` is the ``"decode"`` implementation of
:func:`attention_jax.ops.dot_product_attention`: it takes token-major ``[B, S, K, H]``
keys and values as the other backends do (a KV cache, head-major, is read by
:func:`attention_jax.kernels.decode.cache_attention` instead).

On token-major arrays the einsum path contracts per kv head, a dot whose batch
dim K sits between S and H in memory; XLA:CPU first copies the whole cache into
``[B, K, S, H]`` order (reading and writing it once more than the attention
needs), which made a step 3-13x slower than PyTorch on 2 cores. :func:`decode_core`
instead reads each as the matrix it is, ``[B, S, K*H]`` rows, and the per
head products become one matmul against block-diagonal queries (and, for the
values, one matmul whose off-diagonal blocks are dropped)::

    logits[b, s, (k, g, t)] = k[b, s, (j, h)] @ Qbd[b, (j, h), (k, g, t)],
        Qbd = q[b, t, k, g, h] * [j == k]                           # [B, K*H, K*G*T]
    out[b, (k, g, t), (j, v)] = w[b, s, (k, g, t)]^T @ v[b, s, (j, v)], keep j == k

It does K times the multiply-adds of the einsum but reads the cache once, so it
wins while the step stays bound by memory (``K * G * T = N * T`` small); the
masks, bias and float32 softmax are those of :func:`attention_jax.ops.attention_core`
(only the two contractions are swapped), so results match the einsum path.
Its names are importable from :mod:`attention_jax.kernels.decode` too.

>>> import jax.numpy as jnp
>>> q, kv = jnp.ones((2, 1, 8, 16)), jnp.ones((2, 100, 2, 16))   # one token, GQA 8/2
>>> decode_core(q, kv, kv).shape
(2, 1, 8, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import ops

Array = jax.Array


def block_diagonal_queries(qf: Array) -> Array:
    """``[B, t, K, G, H]`` queries as the ``[B, K*H, K*G*t]`` block-diagonal matrix."""
    B, t, K, G, H = qf.shape
    eye = jnp.eye(K, dtype=qf.dtype)
    return jnp.einsum("BTKGH,JK->BJHKGT", qf, eye).reshape(B, K * H, K * G * t)


def block_logits(qf: Array, kb: Array, q_blocks: Array | None = None) -> Array:
    """Logits of one cache block, ``[B, K, G, t, S]``.

    Args:
      qf: ``[B, t, K, G, H]`` queries; kb: ``[B, S, K, H]`` keys (a block or the cache).
      q_blocks: :func:`block_diagonal_queries` of ``qf``: the flat form; None: grouped.
    """
    B, t, K, G, H = qf.shape
    if q_blocks is None:
        return jnp.einsum("BTKGH,BSKH->BKGTS", qf, kb, preferred_element_type=jnp.float32)
    S = kb.shape[1]
    s = jnp.einsum("BSX,BXY->BSY", kb.reshape(B, S, K * H), q_blocks,
                   preferred_element_type=jnp.float32)  # [B, S, K*G*t]
    return s.reshape(B, S, K, G, t).transpose(0, 2, 3, 4, 1)


def block_values(w: Array, vb: Array, flat: bool = False) -> Array:
    """Weighted values of one block, ``[B, K, G, t, V]``.

    Args:
      w: ``[B, K, G, t, S]`` weights; vb: ``[B, S, K, V]`` values (a block or the cache),
        float32 products.
      flat: one ``[K*G*t, S] @ [S, K*V]`` matmul, off-diagonal head blocks dropped.
    """
    if not flat:
        return jnp.einsum("BKGTS,BSKV->BKGTV", w, vb, preferred_element_type=jnp.float32)
    B, K, G, t, S = w.shape
    V = vb.shape[-1]
    full = jnp.einsum("BSY,BSX->BYX", w.transpose(0, 4, 1, 2, 3).reshape(B, S, K * G * t),
                      vb.reshape(B, S, K * V),
                      preferred_element_type=jnp.float32).reshape(B, K, G, t, K, V)
    return jnp.einsum("BKGTJV,KJ->BKGTV", full, jnp.eye(K, dtype=full.dtype))


def flat_logits(q: Array, k: Array, *, scale: float | None = None) -> Array:
    """As :func:`attention_jax.ops.attention_logits`, reading k as ``[B, S, K*H]`` rows.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``.

    Returns:
      ``[B, K, G, T, S]`` float32 logits.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = ops.default_scale(H) if scale is None else scale
    qg = q.reshape(B, T, K, N // K, H)
    return block_logits(qg, k, block_diagonal_queries(qg)) * jnp.float32(scale)


def flat_combine(weights: Array, v: Array, out_dtype) -> Array:
    """As :func:`attention_jax.ops.combine_values`, reading v as ``[B, S, K*V]`` rows.

    Args:
      weights: ``[B, K, G, T, S]``; v: ``[B, S, K, V]``.

    Returns:
      ``[B, T, N, V]`` in ``out_dtype``.
    """
    B, K, G, T, S = weights.shape
    out = block_values(weights.astype(v.dtype), v, flat=True)  # [B, K, G, T, V] float32
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, v.shape[-1]).astype(out_dtype)


def decode_core(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> Array:
    """The einsum path with the cache read in place (signature of ``ops.attention_core``).

    Any T works (the results equal the einsum path's); it is fast when ``T * N``
    is small and S large.
    """
    return ops.attention_core(q, k, v, mask, bias, is_causal=is_causal, scale=scale,
                              logits_fn=flat_logits, combine_fn=flat_combine)
