"""The ``"decode"`` backend: few queries against a long key/value cache, read in place.

A decoding step has T = 1 (or a few) queries per head and a cache of S keys
stored ``[B, S, K, H]``. The einsum path contracts per kv head, a dot whose
batch dim K sits between S and H in memory; XLA:CPU first copies the whole
cache into ``[B, K, S, H]`` order (reading and writing it once more than the
attention needs), which made a step 3-13x slower than PyTorch on 2 cores.

Here the cache is read as the matrix it is, ``[B, S, K*H]`` rows, and the per
head products become one matmul against block-diagonal queries (and, for the
values, one matmul whose off-diagonal blocks are dropped)::

    logits[b, s, (k, g, t)] = k[b, s, (j, h)] @ Qbd[b, (j, h), (k, g, t)],
        Qbd = q[b, t, k, g, h] * [j == k]                           # [B, K*H, K*G*T]
    out[b, (k, g, t), (j, v)] = w[b, s, (k, g, t)]^T @ v[b, s, (j, v)], keep j == k

It does K times the multiply-adds of the einsum but reads the cache once, so it
wins while the step stays bound by memory (``K * G * T = N * T`` small); the
masks, bias and float32 softmax are those of :func:`attention_jax.ops.attention_core`
(only the two contractions are swapped), so results match the einsum path.

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



def flat_logits(q: Array, k: Array, *, scale: float | None = None) -> Array:
    """As :func:`attention_jax.ops.attention_logits`, reading k as ``[B, S, K*H]`` rows.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``.

    Returns:
      ``[B, K, G, T, S]`` float32 logits.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = ops.default_scale(H) if scale is None else scale
    qg = q.reshape(B, T, K, G, H)
    eye = jnp.eye(K, dtype=q.dtype)
    q_blocks = jnp.einsum("BTKGH,JK->BJHKGT", qg, eye).reshape(B, K * H, K * G * T)
    logits = jnp.einsum("BSX,BXY->BSY", k.reshape(B, S, K * H), q_blocks,
                        preferred_element_type=jnp.float32)  # [B, S, K*G*T]
    logits = logits.reshape(B, S, K, G, T).transpose(0, 2, 3, 4, 1)  # [B, K, G, T, S]
    return logits * jnp.float32(scale)


def flat_combine(weights: Array, v: Array, out_dtype) -> Array:
    """As :func:`attention_jax.ops.combine_values`, reading v as ``[B, S, K*V]`` rows.

    Args:
      weights: ``[B, K, G, T, S]``; v: ``[B, S, K, V]``.

    Returns:
      ``[B, T, N, V]`` in ``out_dtype``.
    """
    B, K, G, T, S = weights.shape
    V = v.shape[-1]
    w = weights.astype(v.dtype).transpose(0, 4, 1, 2, 3).reshape(B, S, K * G * T)
    full = jnp.einsum("BSY,BSX->BYX", w, v.reshape(B, S, K * V),
                      preferred_element_type=jnp.float32)  # [B, K*G*T, K*V]
    full = full.reshape(B, K, G, T, K, V)
    out = jnp.einsum("BKGTJV,KJ->BTKGV", full, jnp.eye(K, dtype=full.dtype))
    return out.reshape(B, T, K * G, V).astype(out_dtype)


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
