"""Blockwise (FlashAttention) attention in pure JAX, with a hand-written backward pass.

The forward pass walks key/value blocks with an online softmax and keeps only the
output and the per-row log-sum-exp; the backward pass recomputes the scores block
by block (FlashAttention-2, Dao 2023). Neither pass materialises ``[B, N, T, S]``:
temporary memory is ``O(B * N * (T + block_q * block_kv))`` instead of ``O(B * N * T * S)``.
The layout is described in :mod:`attention_jax.kernels.tiles`.

Structure (``is_causal``, mask objects of :mod:`attention_jax.masks`) is evaluated per
tile from index arrays, never from a ``[T, S]`` array, and a **block map**
(:func:`attention_jax.masks.block_map`: empty / partial / full per query block x key
block; numpy at trace time when the structure is static, jax.numpy from the data
for segments and lengths) is compacted into, per query block, the list of its full
and of its partial key blocks (and per key block the same over query blocks, for
the backward pass), as splash attention's ``MaskInfo`` and FlexAttention's
``BlockMask`` do. The loops run over those lists: work follows the number of
non-empty tiles, and full tiles skip the elementwise mask. The block map is the
union over batch rows and heads (one loop serves the whole ``[B, K]`` batch of
matmuls). Dense boolean masks and biases keep their broadcast shape
(``[B|1, K|1, T|1, G|1, S|1]``) and are sliced per tile.

``score_mod`` (``fn(score, b, n, t, s)``) is closure-converted, so the arrays it
closes over get gradients; ``sinks`` join each row's denominator after the loops
(the log-sum-exp merge of :func:`merge_partials` with a value-less partial).

The pieces are public for context parallelism (ring attention): :func:`block_forward`
(``(out, lse)`` of a query block against a key block at given positions),
:func:`block_backward` (the gradients of that pair from the final ``out``, ``lse``
and ``dout``) and :func:`merge_partials`.

This module holds the public kernel (:func:`blockwise_attention`,
:func:`blockwise_core`) and its ``custom_vjp``; the loops are in
:mod:`attention_jax.kernels.block_loops`, call resolution and the context-parallel
pieces in :mod:`attention_jax.kernels.block_step`; their public names are re-exported here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attention_jax import masks, ops
from attention_jax.kernels import tiles
from attention_jax.kernels.block_loops import _backward, _compact, _float_consts, _forward
from attention_jax.kernels.block_loops import tile_counts as tile_counts
from attention_jax.kernels.block_step import _BLOCKS as _BLOCKS
from attention_jax.kernels.block_step import _balanced as _balanced
from attention_jax.kernels.block_step import _build, _setup
from attention_jax.kernels.block_step import block_backward as block_backward
from attention_jax.kernels.block_step import block_forward as block_forward
from attention_jax.kernels.block_step import default_block_sizes as default_block_sizes
from attention_jax.kernels.block_step import merge_partials as merge_partials
from attention_jax.kernels.tiles import Config

Array = jax.Array


# ---------------------------------------------------------------------------
# custom_vjp plumbing
# ---------------------------------------------------------------------------


def _sinks_km(sinks, cfg: Config):
    """``[N]`` sink logits -> ``[1, K, M]`` float32 (row m of a block is head m % G)."""
    if sinks is None:
        return None
    s = sinks.astype(jnp.float32).reshape(cfg.K, 1, cfg.G)
    return jnp.broadcast_to(s, (cfg.K, cfg.block_q, cfg.G)).reshape(1, cfg.K, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(cfg, sm_fn, static_ho, q, k, v, mask, bias, sinks, scale, structure,
               q_positions, kv_positions, traced_ho, consts):
    out, _ = _attention_fwd(cfg, sm_fn, static_ho, q, k, v, mask, bias, sinks, scale, structure,
                            q_positions, kv_positions, traced_ho, consts)
    return out


def _attention_fwd(cfg, sm_fn, static_ho, q, k, v, mask, bias, sinks, scale, structure,
                   q_positions, kv_positions, traced_ho, consts):
    ctx, qb, kb, vb, cls = _setup(cfg, sm_fn, q, k, v, mask, bias, scale, structure,
                                  q_positions, kv_positions, static_ho, traced_ho, consts)
    lists = None if cls is None else _compact(cls)
    out, lse = _forward(qb, kb, vb, ctx, lists, _sinks_km(sinks, cfg))
    y = tiles.unblock_q(out, cfg).astype(q.dtype)
    # Residuals: the inputs and the output (already live) plus the O(B*N*T) lse.
    res = (q, k, v, mask, bias, sinks, scale, structure, q_positions, kv_positions, traced_ho,
           consts, y, lse)
    return y, res


def _attention_bwd(cfg, sm_fn, static_ho, res, dy):
    (q, k, v, mask, bias, sinks, scale, structure, q_positions, kv_positions, traced_ho,
     consts, y, lse) = res
    ctx, qb, kb, vb, cls = _setup(cfg, sm_fn, q, k, v, mask, bias, scale, structure,
                                  q_positions, kv_positions, static_ho, traced_ho, consts)
    lists_t = None if cls is None else _compact(cls.T)
    ob = tiles.block_q(y, cfg).astype(jnp.float32)
    dob = tiles.block_q(dy.astype(q.dtype), cfg)
    dq, dk, dv, dbias, dcon = _backward(qb, kb, vb, ob, lse, dob, ctx, lists_t)
    dq = tiles.unblock_q(dq, cfg).astype(q.dtype)
    dk = tiles.unblock_kv(dk, cfg).astype(k.dtype)
    dv = tiles.unblock_kv(dv, cfg).astype(v.dtype)
    if bias is not None:
        dbias = tiles.sum_to(tiles.ungroup_tile(dbias, bias.shape, cfg).astype(bias.dtype), bias)
    dsinks = None
    if sinks is not None:
        delta = jnp.sum(dob.astype(jnp.float32) * ob, axis=-1)  # [nq, B, K, M]
        p_sink = jnp.exp(_sinks_km(sinks, cfg) - lse)  # 0 where lse = +inf
        d = -(p_sink * delta).sum(axis=(0, 1)).reshape(cfg.K, cfg.block_q, cfg.G).sum(axis=1)
        dsinks = tiles.sum_to(d.reshape(cfg.N).astype(sinks.dtype), sinks)
    it = iter(dcon)
    dconsts = tuple(tiles.sum_to(next(it).astype(jnp.result_type(c)), c) if f else None
                    for c, f in zip(consts, _float_consts(consts), strict=True))
    return (tiles.sum_to(dq, q), tiles.sum_to(dk, k), tiles.sum_to(dv, v), None, dbias, dsinks,
            None, None, None, None, None, dconsts)


_attention.defvjp(_attention_fwd, _attention_bwd)



def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | masks.Mask | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | Array | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    score_mod: Callable | None = None,
    sinks: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    head_offset: int | Array = 0,
) -> Array:
    """Memory-efficient attention, equal to :func:`attention_jax.ops.attention_core`.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys (N % K == 0; K/V are never repeated).
      v: ``[B, S, K, V]`` values.
      mask: a mask object (:mod:`attention_jax.masks`; evaluated per tile, empty tiles
        skipped) or a dense boolean broadcastable to ``[B, N, T, S]`` (kept at its
        broadcast shape and sliced per tile); True = attend.
      bias: float, broadcastable to ``[B, N, T, S]``; added to the scaled scores.
        Differentiable (its gradient is summed back to its own shape).
      is_causal: ``Causal()`` at the positions (top-left aligned by default).
      scale: score scale, default ``1/sqrt(H)``; a Python number or a traced scalar
        (no gradient flows to it); any value, zero and negative included.
      block_q, block_kv: block sizes; default :func:`default_block_sizes`. T and S
        need not be multiples (inputs are padded internally, pad keys masked).
      score_mod: ``fn(score, b, n, t, s) -> score`` on the scaled (and biased) float32
        scores before masking; gradients flow to the arrays it closes over.
      sinks: ``[N]`` logits joining each row's softmax denominator (no value); differentiable.
      q_positions, kv_positions: ``[T]`` / ``[B, T]`` and ``[S]`` / ``[B, S]`` absolute
        positions the mask objects and score_mod see (default ``arange``).
      head_offset: global index of the first local head (int or traced scalar).

    Returns:
      ``[B, T, N, V]`` in q's dtype. Scores, softmax and accumulation are float32;
      the two matmuls take the input dtype (bf16 stays bf16 on the MXU/tensor cores)
      with float32 accumulation. Rows that see no key are zeros, with zero
      gradients (no NaN).

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 10, 4, 8)); kv = jnp.ones((1, 13, 2, 8))
    >>> blockwise_attention(q, kv, kv, is_causal=True, block_q=4, block_kv=4).shape
    (1, 10, 4, 8)
    """
    B, T, S, N, K, H, V = ops.check_qkv(q, k, v)
    if sinks is not None and tuple(jnp.shape(sinks)) != (N,):
        raise ValueError(f"sinks must be [num_heads] = [{N}]; got shape {tuple(jnp.shape(sinks))}")
    (cfg, sm_fn, static_ho, dense, structure, q_positions, kv_positions, traced_ho, scale_arr,
     consts) = _build(q, k, v, mask, is_causal=is_causal, scale=scale, block_q=block_q,
                      block_kv=block_kv, score_mod=score_mod, q_positions=q_positions,
                      kv_positions=kv_positions, head_offset=head_offset)
    if math.prod(q.shape) == 0 or S == 0:
        return jnp.zeros((B, T, N, V), q.dtype)
    args = (q, k, v, dense, bias, sinks, scale_arr, structure, q_positions, kv_positions,
            traced_ho, consts)
    if sm_fn is not None:  # a fresh closure-converted function: nothing to cache on
        return _attention(cfg, sm_fn, static_ho, *args)
    return _jit_attention(cfg, None, static_ho, *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jit_attention(cfg, sm_fn, static_ho, *args) -> Array:
    # Jitted so that eager callers do not run the loops op by op.
    return _attention(cfg, sm_fn, static_ho, *args)


def blockwise_core(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | masks.Mask | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    **kwargs,
) -> Array:
    """:func:`blockwise_attention` with the signature of ``ops.attention_core``
    (keywords ``score_mod``, ``sinks``, ``q_positions``, ``kv_positions``,
    ``head_offset`` passed on)."""
    return blockwise_attention(q, k, v, mask, bias, is_causal=is_causal, scale=scale, **kwargs)

