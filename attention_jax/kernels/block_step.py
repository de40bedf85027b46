"""Resolving one blockwise call, and the per-block pieces for context parallelism.

* :func:`default_block_sizes` (the per-platform ``_BLOCKS`` table), ``_build``
  (validates a call: block sizes, scale, structure, positions, score_mod) and
  ``_setup`` (blocks the operands, builds the loop context and the tile classes);
* :func:`merge_partials`, :func:`block_forward` and :func:`block_backward`, public
  for ring attention (:mod:`attention_jax.parallel.ring`, :mod:`attention_jax.parallel.context`).

The loops themselves are in :mod:`attention_jax.kernels.block_loops`, the public
kernel (``custom_vjp``) in :mod:`attention_jax.kernels.blockwise`, which re-exports
the public names here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks, ops
from attention_jax.kernels import closures, tiles
from attention_jax.kernels.block_loops import _backward, _compact, _Ctx, _forward, _tile_classes
from attention_jax.kernels.tiles import Config

Array = jax.Array

# ``(block_q, block_kv)`` per platform; see :func:`default_block_sizes` (measured in
# experiments/results/auto_rule_cpu.md).
_BLOCKS: dict[str, tuple[int, int]] = {
    "cpu": (256, 512),
    # Not measured on a GPU (no device was lent to the session that wrote this):
    # 512 keeps the number of sequential loop steps low, which is what XLA's
    # while loops on GPU are sensitive to. "auto" prefers cuDNN there anyway.
    "gpu": (512, 512),
}


def default_block_sizes(T: int, S: int, platform: str | None = None) -> tuple[int, int]:
    """``(block_q, block_kv)`` for ``platform`` (default: JAX's default backend).

    A length that is not a multiple of the platform block is split into equal
    blocks (rounded up to 8) instead, so the padding stays small: T = 384 on CPU
    gives two blocks of 192, not 256 + 256 with 128 padded rows. Short sequences
    (and decoding, T = 1) get one unpadded block.

    CPU: 256 x 512, measured on the 2-core development machine (forward +
    backward, f32, H=64); the table is in ``experiments/results/auto_rule_cpu.md``.
    GPU: 512 x 512 (not measured).
    """
    platform = platform or jax.default_backend()
    bq, bk = _BLOCKS.get(platform, _BLOCKS["gpu"])
    return _balanced(T, bq), _balanced(S, bk)


def _balanced(length: int, block: int) -> int:
    """The smallest multiple of 8 (or ``length`` itself) that covers ``length`` in as
    few blocks as ``block`` does."""
    if length <= block:
        return max(length, 1)
    n = -(-length // block)
    per_block = -(-length // n)
    return min(block, -(-per_block // 8) * 8)


def _setup(cfg, sm_fn, q, k, v, mask, bias, scale, structure, q_positions, kv_positions,
           static_ho, traced_ho, consts):
    if cfg.prescale:
        q = q * scale.astype(q.dtype)
    qb = tiles.block_q(q, cfg)
    kb, vb = tiles.block_kv(k, cfg), tiles.block_kv(v, cfg)
    ctx = _Ctx(
        cfg=cfg, B=q.shape[0],
        mask_g=None if mask is None else tiles.group_tile(mask.astype(bool), cfg, False),
        bias_g=None if bias is None else tiles.group_tile(bias, cfg, 0),
        structure=structure,
        q_pos=tiles.padded_positions(q_positions, cfg.T, cfg.nq * cfg.block_q),
        kv_pos=tiles.padded_positions(kv_positions, cfg.S, cfg.nk * cfg.block_kv),
        head_offset=static_ho if traced_ho is None else traced_ho,
        scale=scale, sm_fn=sm_fn, sm_consts=tuple(consts),
    )
    cls = _tile_classes(ctx, cfg.N, q_positions, kv_positions)
    return ctx, qb, kb, vb, cls


def _can_prescale(dtype, scale) -> bool:
    """Scaling q before the matmul rounds it: fine in float32, exact for a (static)
    positive power of two; otherwise the scores are scaled in float32 instead."""
    if jnp.dtype(dtype).itemsize >= 4:
        return True
    if not isinstance(scale, (int, float)) or not scale > 0:
        return False
    return math.log2(scale).is_integer()


def _is_static_number(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def _build(q, k, v, mask, *, is_causal, scale, block_q, block_kv, score_mod, q_positions,
           kv_positions, head_offset):
    """Validates and resolves one call: ``(cfg, sm_fn, static_ho, dense_mask, structure,
    q_positions, kv_positions, traced_ho, scale_array, consts)``."""
    B, T, S, N, K, H, V = ops.check_qkv(q, k, v)
    dbq, dbk = default_block_sizes(T, S)
    block_q = dbq if block_q is None else int(block_q)
    block_kv = dbk if block_kv is None else int(block_kv)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1; got block_q={block_q}, block_kv={block_kv}")
    structure = mask if isinstance(mask, masks.Mask) else None
    dense = None if structure is not None else mask
    if is_causal:
        structure = masks.Causal() if structure is None else masks.Causal() & structure
    if structure is not None:
        structure.check(B, N, T, S)
    if scale is None:
        scale = ops.default_scale(H)
    if _is_static_number(scale):
        scale = float(scale)
    cfg = Config(T=T, S=S, K=K, G=N // K, block_q=block_q, block_kv=block_kv,
                 prescale=_can_prescale(q.dtype, scale))
    scale_arr = jnp.asarray(scale, jnp.float32)
    if scale_arr.ndim:
        raise ValueError(f"scale must be a scalar; got shape {scale_arr.shape}")
    static_ho = int(head_offset) if _is_static_number(head_offset) else None
    traced_ho = None if static_ho is not None else jnp.asarray(head_offset, jnp.int32)
    q_positions = None if q_positions is None else masks._positions_2d(q_positions, T,
                                                                        "q_positions")
    kv_positions = None if kv_positions is None else masks._positions_2d(kv_positions, S,
                                                                         "kv_positions")
    sm_fn, consts = None, ()
    if score_mod is not None:
        sm_fn, consts = _convert_score_mod(score_mod, cfg, B, q_positions, kv_positions,
                                           static_ho if traced_ho is None else traced_ho, (q, k, v))
    return (cfg, sm_fn, static_ho, dense, structure, q_positions, kv_positions, traced_ho,
            scale_arr, tuple(consts))


def _convert_score_mod(score_mod, cfg: Config, B, q_positions, kv_positions, head_offset,
                       operands):
    """score_mod closure-converted at the tile shapes
    (:func:`attention_jax.kernels.closures.convert_varying`), so closed-over arrays
    become explicit (differentiable) operands of the custom_vjp, marked varying over
    the shard_map axes of ``operands`` (their gradient is summed over devices once)."""
    qp = tiles.padded_positions(q_positions, cfg.T, cfg.nq * cfg.block_q)
    kp = tiles.padded_positions(kv_positions, cfg.S, cfg.nk * cfg.block_kv)
    idx = tiles.tile_index(0, 0, cfg, B, qp, kp, head_offset)
    tile_shape = (B, cfg.K, cfg.block_q, cfg.G, cfg.block_kv)

    def fn(s, b, n, t, kv):
        out = jnp.asarray(score_mod(s, b, n, t, kv))
        return jnp.broadcast_to(out, tile_shape).astype(jnp.float32)

    example = jax.ShapeDtypeStruct(tile_shape, jnp.float32)
    return closures.convert_varying(fn, (example, idx.b, idx.n, idx.q_pos, idx.kv_pos),
                                    operands)



# ---------------------------------------------------------------------------
# Pieces for context parallelism
# ---------------------------------------------------------------------------


def merge_partials(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array):
    """Log-sum-exp merge of two partial attentions over disjoint key sets.

    Args:
      out_a, out_b: ``[B, T, N, V]`` normalised partial outputs.
      lse_a, lse_b: ``[B, T, N]`` float32 log-sum-exp of each part's scores
        (``-inf`` for a row that saw no key in that part).

    Returns:
      ``(out [B, T, N, V] float32, lse [B, T, N] float32)``, as if one softmax had
      run over both key sets. Adding sinks is a merge with ``out_b = 0`` and
      ``lse_b = sinks``.

    >>> import jax.numpy as jnp
    >>> o, l = merge_partials(jnp.ones((1, 1, 1, 2)), jnp.zeros((1, 1, 1)),
    ...                       jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1)))
    >>> o.tolist(), round(float(l[0, 0, 0]), 4)
    ([[[[0.5, 0.5]]]], 0.6931)
    """
    lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
    m = jnp.maximum(lse_a, lse_b)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)
    total = wa + wb
    seen = total > 0
    lse = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
    out = (out_a.astype(jnp.float32) * (wa * inv)[..., None]
           + out_b.astype(jnp.float32) * (wb * inv)[..., None])
    return out, lse


def _pair(q, k, v, mask, score_mod, q_positions, kv_positions, head_offset, scale, block_q,
          block_kv):
    """:func:`_build` then :func:`_setup` for one (query block, key block) pair:
    ``(cfg, ctx, qb, kb, vb, tile classes)``."""
    (cfg, sm_fn, static_ho, dense, structure, q_positions, kv_positions, traced_ho, scale_arr,
     consts) = _build(q, k, v, mask, is_causal=False, scale=scale, block_q=block_q,
                      block_kv=block_kv, score_mod=score_mod, q_positions=q_positions,
                      kv_positions=kv_positions, head_offset=head_offset)
    ctx, qb, kb, vb, cls = _setup(cfg, sm_fn, q, k, v, dense, None, scale_arr, structure,
                                  q_positions, kv_positions, static_ho, traced_ho, consts)
    return cfg, ctx, qb, kb, vb, cls


def block_forward(q, k, v, mask=None, *, score_mod=None, q_positions=None, kv_positions=None,
                  head_offset=0, scale=None, block_q=None, block_kv=None):
    """One query block against one key block, unnormalised across blocks.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, V]`` (a shard each).
      mask, score_mod, head_offset, scale, block_q, block_kv: as in
        :func:`blockwise_attention` (``is_causal`` is ``mask=Causal()`` here).
      q_positions, kv_positions: the shards' absolute positions (``[T]`` / ``[B, T]``,
        ``[S]`` / ``[B, S]``).

    Returns:
      ``(out [B, T, N, V] float32, lse [B, T, N] float32)``; ``lse = -inf`` (and
      out 0) for rows that see no key of this block. Combine with :func:`merge_partials`.
    """
    cfg, ctx, qb, kb, vb, cls = _pair(q, k, v, mask, score_mod, q_positions, kv_positions,
                                      head_offset, scale, block_q, block_kv)
    out, lse = _forward(qb, kb, vb, ctx, None if cls is None else _compact(cls))
    lse = jnp.where(jnp.isinf(lse), -jnp.inf, lse)
    return tiles.unblock_q(out, cfg), tiles.unblock_q(lse[..., None], cfg)[..., 0]


def block_backward(q, k, v, out, lse, dout, mask=None, *, score_mod=None, q_positions=None,
                   kv_positions=None, head_offset=0, scale=None, block_q=None, block_kv=None):
    """Gradients of one (query block, key block) pair given the *final* output.

    Args:
      q, k, v, mask, ...: as in :func:`block_forward`.
      out: ``[B, T, N, V]`` the final (merged over all key blocks) output.
      lse: ``[B, T, N]`` its final log-sum-exp (``-inf`` for rows that saw nothing).
      dout: ``[B, T, N, V]`` the cotangent of the final output.

    Returns:
      ``(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, V])`` float32: this key
      block's share of dq (sum over blocks) and its own dk, dv.
    """
    cfg, ctx, qb, kb, vb, cls = _pair(q, k, v, mask, score_mod, q_positions, kv_positions,
                                      head_offset, scale, block_q, block_kv)
    return backward_tiles(cfg, ctx, qb, kb, vb, cls, out, lse, dout, q.dtype)[:3]


def backward_tiles(cfg, ctx, qb, kb, vb, cls, out, lse, dout, dtype):
    """The backward loop of one block pair from :func:`_setup`'s pieces and the *final*
    ``out`` / ``lse`` / ``dout`` (as in :func:`block_backward`); shared with the ring's
    backward, which also needs the closed-over constants' cotangents.

    Returns:
      ``(dq, dk, dv, dconsts)``: as :func:`block_backward`'s, plus a tuple of the float
      score_mod constants' cotangents (empty without a score_mod).
    """
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(jnp.float32))
    lse_b = tiles.block_q(lse[..., None], cfg)[..., 0]
    lse_b = jnp.where(jnp.arange(cfg.nq * cfg.block_q).reshape(cfg.nq, 1, 1, cfg.block_q, 1)
                      .repeat(cfg.G, 4).reshape(cfg.nq, 1, 1, -1) < cfg.T, lse_b, jnp.inf)
    ob = tiles.block_q(out, cfg).astype(jnp.float32)
    dob = tiles.block_q(dout.astype(dtype), cfg)
    dq, dk, dv, _, dcon = _backward(qb, kb, vb, ob, lse_b, dob, ctx,
                                    None if cls is None else _compact(cls.T))
    return (tiles.unblock_q(dq, cfg), tiles.unblock_kv(dk, cfg), tiles.unblock_kv(dv, cfg),
            tuple(dcon))
