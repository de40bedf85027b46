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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import masks, ops
from attention_jax.kernels import tiles
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


# ---------------------------------------------------------------------------
# What one call carries into the loops
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Everything a tile needs besides q and k (arrays traced, the rest static)."""

    cfg: Config
    B: int
    mask_g: Array | None  # dense mask, grouped (tiles.group_tile)
    bias_g: Array | None
    structure: masks.Mask | None  # mask objects (is_causal included)
    q_pos: Array | None  # [B|1, Tp] absolute positions (None: arange)
    kv_pos: Array | None
    head_offset: Array | int
    scale: Array  # f32 scalar
    sm_fn: Callable | None  # closure-converted score_mod(score, b, n, t, s, *consts)
    sm_consts: tuple

    @property
    def plain(self) -> bool:
        """No mask of any kind: every tile is full, the loops run over all blocks."""
        return self.mask_g is None and self.structure is None and not self.cfg.kv_padded


def _tile_index(ctx: _Ctx, i, j) -> masks.Index:
    return tiles.tile_index(i, j, ctx.cfg, ctx.B, ctx.q_pos, ctx.kv_pos, ctx.head_offset)


def _scores(qi, kj, i, j, ctx: _Ctx, *, partial: bool, transpose: bool = False):
    """Scores of query block ``i`` against key block ``j`` (bias and score_mod applied).

    Args:
      qi: ``[B, K, M, H]`` (already scaled when ``cfg.prescale``); kj: ``[B, K, bk, H]``.
      partial: evaluate the mask in this tile (the block map says partial).
      transpose: keys-by-queries ``[B, K, bk, M]`` (the backward pass's layout, in
        which three of its four matmuls are plain ``A @ B`` or ``A @ B.T``).

    Returns:
      ``(s, visible, sm_vjp)``: float32 scores, a boolean broadcastable to them or
      None (all visible), and (backward only, with a score_mod) the vjp of the
      score_mod at this tile (``ds -> (ds_raw, *d_consts)``) or None.
    """
    cfg = ctx.cfg
    B, K, M, _ = qi.shape
    bq, bk, G = cfg.block_q, cfg.block_kv, cfg.G
    if transpose:
        s = jnp.einsum("BKSH,BKMH->BKSM", kj, qi, preferred_element_type=jnp.float32)
        tile_shape, out_shape = (bk, bq, G), (B, K, bk, M)

        def lay(x):  # [.., bq, G, bk] -> [.., bk, bq, G]
            return jnp.moveaxis(x, -1, -3)

        def unlay(x):
            return jnp.moveaxis(x, -3, -1)
    else:
        s = jnp.einsum("BKMH,BKSH->BKMS", qi, kj, preferred_element_type=jnp.float32)
        tile_shape, out_shape = (bq, G, bk), (B, K, M, bk)

        def lay(x):
            return x

        unlay = lay
    if not cfg.prescale:
        s = s * ctx.scale
    if ctx.bias_g is None and ctx.sm_fn is None and not partial:
        return s, None, None
    s5 = s.reshape(B, K, *tile_shape)
    if ctx.bias_g is not None:
        s5 = s5 + lay(tiles.tile(ctx.bias_g, i, j, cfg)).astype(jnp.float32)
    idx = _tile_index(ctx, i, j) if (ctx.sm_fn is not None or partial) else None
    sm_vjp = None
    if ctx.sm_fn is not None:
        s5, sm_vjp = _apply_score_mod(ctx, unlay(s5), idx, with_vjp=transpose)
        s5 = lay(s5)
    visible = None
    if partial:
        if ctx.structure is not None:
            visible = lay(ctx.structure.evaluate(idx))
        if ctx.mask_g is not None:
            m = lay(tiles.tile(ctx.mask_g, i, j, cfg))
            visible = m if visible is None else visible & m
        if cfg.kv_padded:
            c = lay(idx.kv_idx < cfg.S)
            visible = c if visible is None else visible & c
        if visible is not None:
            visible = jnp.broadcast_to(visible, (*visible.shape[:-3], *tile_shape))
            visible = visible.reshape((*visible.shape[:-3], *out_shape[2:]))
    if sm_vjp is not None:
        vjp = sm_vjp

        def sm_vjp(ds):  # ds in out_shape -> (ds_raw in out_shape, *d_consts)
            ds_raw, *dc = vjp(unlay(ds.reshape(B, K, *tile_shape)))
            return lay(ds_raw).reshape(out_shape), dc
    return s5.reshape(out_shape), visible, sm_vjp


def _float_consts(consts) -> list[bool]:
    return [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]


def _apply_score_mod(ctx: _Ctx, s5, idx: masks.Index, *, with_vjp: bool):
    """``score_mod`` on a ``[B, K, bq, G, bk]`` tile; with ``with_vjp`` also its vjp
    with respect to the scores and the floating closed-over arrays."""
    consts = ctx.sm_consts
    is_float = _float_consts(consts)

    def fn(s, *fc):
        it = iter(fc)
        full = [next(it) if f else c for c, f in zip(consts, is_float, strict=True)]
        return ctx.sm_fn(s, idx.b, idx.n, idx.q_pos, idx.kv_pos, *full)

    fc = [c for c, f in zip(consts, is_float, strict=True) if f]
    if not with_vjp:
        return fn(s5, *fc), None
    out, vjp = jax.vjp(fn, s5, *fc)
    return out, vjp


# ---------------------------------------------------------------------------
# Tile lists
# ---------------------------------------------------------------------------


def _tile_classes(ctx: _Ctx, N: int, q_positions, kv_positions) -> Array | np.ndarray | None:
    """``[nq, nk]`` int8 classes (union over batch and heads), or None when plain."""
    cfg = ctx.cfg
    if ctx.plain:
        return None
    cls = masks.block_map(ctx.structure, ctx.B, N, cfg.T, cfg.S, cfg.block_q, cfg.block_kv,
                          q_positions=q_positions, kv_positions=kv_positions,
                          head_offset=ctx.head_offset)
    xp = np if isinstance(cls, np.ndarray) else jnp
    any_ = (cls > masks.EMPTY).any(axis=(0, 1))
    full = (cls == masks.FULL).all(axis=(0, 1))
    if ctx.mask_g is not None:  # a dense mask: every non-empty tile evaluates it
        full = xp.zeros_like(full)
    return xp.where(full, masks.FULL, xp.where(any_, masks.PARTIAL, masks.EMPTY)).astype(np.int8)


def _compact(cls):
    """Per row of ``cls [R, C]``: the columns of its full tiles, then of its partial ones.

    Returns ``(full_idx [R, C], n_full [R], part_idx [R, C], n_part [R])`` int32
    (entries past the counts are unused).
    """
    xp = np if isinstance(cls, np.ndarray) else jnp
    C = cls.shape[1]
    cols = xp.arange(C, dtype=np.int32)[None, :]
    out = []
    for kind in (masks.FULL, masks.PARTIAL):
        hit = cls == kind
        order = xp.argsort(xp.where(hit, cols, C + cols), axis=1).astype(np.int32)
        out += [order, hit.sum(axis=1).astype(np.int32)]
    return tuple(out)


def tile_counts(cls) -> dict[str, int]:
    """How many tiles of a ``[nq, nk]`` class map run (full + partial) and are skipped."""
    cls = np.asarray(cls)
    full, part = int((cls == masks.FULL).sum()), int((cls == masks.PARTIAL).sum())
    return {"full": full, "partial": part, "computed": full + part,
            "skipped": cls.size - full - part}


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def _forward(qb, kb, vb, ctx: _Ctx, lists, sinks_km=None):
    """Online softmax. Returns ``(out [nq, B, K, M, V] f32, lse [nq, B, K, M] f32)``.

    ``lists``: :func:`_compact` of the tile classes, or None (all tiles full).
    ``lse`` is +inf for rows that see nothing (no key, no sink), so that the
    backward pass's ``exp(s - lse)`` is exactly 0 there, and their output is 0.
    """
    cfg = ctx.cfg
    _, B, K, M, _ = qb.shape
    V = vb.shape[-1]

    def q_block(i, qi, lst):
        def kv_step(jj, carry, idx_list, partial):
            m, l, acc = carry
            j = jj if idx_list is None else idx_list[jj]
            s, visible, _ = _scores(qi, kb[j], i, j, ctx, partial=partial)
            if visible is not None:
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(axis=-1)
            pv = jnp.einsum(
                "BKMS,BKSV->BKMV", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32
            )
            return m_new, l, acc * corr[..., None] + pv

        refs = (qi, kb, vb, ctx.mask_g, ctx.bias_g, ctx.sm_consts)
        carry = tuple(tiles.varying_like(c, *refs) for c in (
            jnp.full((B, K, M), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, M), jnp.float32),
            jnp.zeros((B, K, M, V), jnp.float32),
        ))
        if lst is None:
            carry = lax.fori_loop(0, cfg.nk, functools.partial(
                kv_step, idx_list=None, partial=False), carry)
        else:
            full_idx, n_full, part_idx, n_part = lst
            carry = lax.fori_loop(0, n_full, functools.partial(
                kv_step, idx_list=full_idx, partial=False), carry)
            carry = lax.fori_loop(0, n_part, functools.partial(
                kv_step, idx_list=part_idx, partial=True), carry)
        m, l, acc = carry
        if sinks_km is not None:  # one more logit per row, with no value
            m_f = jnp.maximum(m, sinks_km)
            corr = jnp.exp(m - m_f)
            l = l * corr + jnp.exp(sinks_km - m_f)
            acc, m = acc * corr[..., None], m_f
        seen = l > 0.0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out, lse

    def step(_, xs):
        i, qi, lst = xs
        return None, q_block(i, qi, lst)

    _, (out, lse) = lax.scan(step, None, (jnp.arange(cfg.nq), qb, lists))
    return out, lse


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the axes where ``shape`` is 1 (keeping them)."""
    axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 < n)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _backward(qb, kb, vb, out, lse, dob, ctx: _Ctx, lists_t):
    """Gradients from the final ``out``/``lse``.

    Returns ``(dq [nq,B,K,M,H] f32, dk [nk,B,K,bk,H] f32, dv [nk,B,K,bk,V] f32,
    dbias | None, d_consts (floating score_mod consts))``.
    """
    cfg = ctx.cfg
    B, K, M = qb.shape[1:4]
    bq, bk, G = cfg.block_q, cfg.block_kv, cfg.G
    delta = jnp.sum(dob.astype(jnp.float32) * out, axis=-1)  # [nq, B, K, M]
    scale = ctx.scale
    k_scale = jnp.float32(1.0) if cfg.prescale else scale  # qb is scaled already
    bias_g = ctx.bias_g
    fconsts = [c for c, f in zip(ctx.sm_consts, _float_consts(ctx.sm_consts), strict=True) if f]

    def kv_block(carry, xs):
        j, kj, vj, lst = xs

        def q_step(ii, inner, idx_list, partial):
            dk, dv, dq, dbias, dcon = inner
            i = ii if idx_list is None else idx_list[ii]
            qi, doi = qb[i], dob[i]
            # Keys by queries, [B, K, bk, M]: four of the five matmuls are then
            # plain A @ B or A @ B.T, which XLA:CPU hands to its fast dot kernels.
            s, visible, sm_vjp = _scores(qi, kj, i, j, ctx, partial=partial, transpose=True)
            p = jnp.exp(s - lse[i][:, :, None, :])
            if visible is not None:
                p = jnp.where(visible, p, 0.0)
            dv = dv + jnp.einsum("BKSM,BKMV->BKSV", p.astype(doi.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("BKSV,BKMV->BKSM", vj, doi, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][:, :, None, :])  # d loss / d (final scores)
            if sm_vjp is not None:
                ds, dc = sm_vjp(ds)
                dcon = tuple(a + b.astype(a.dtype) for a, b in zip(dcon, dc, strict=True))
            dk = dk + k_scale * jnp.einsum("BKSM,BKMH->BKSH", ds.astype(qi.dtype), qi,
                                           preferred_element_type=jnp.float32)
            dqi = scale * jnp.einsum("BKSM,BKSH->BKMH", ds.astype(kj.dtype), kj,
                                     preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, axis=0)
            if dbias is not None:
                ds5 = jnp.moveaxis(ds.reshape(B, K, bk, bq, G), 2, 4)  # [B, K, bq, G, bk]
                tile_shape = (*dbias.shape[:2], bq if dbias.shape[2] > 1 else 1,
                              dbias.shape[3], bk if dbias.shape[4] > 1 else 1)
                start = (0, 0, i * bq if dbias.shape[2] > 1 else 0, 0,
                         j * bk if dbias.shape[4] > 1 else 0)
                old = lax.dynamic_slice(dbias, start, tile_shape)
                dbias = lax.dynamic_update_slice(dbias, old + _reduce_to(ds5, tile_shape), start)
            return dk, dv, dq, dbias, dcon

        dq, dbias, dcon = carry
        refs = (qb, kj, vj, dob, ctx.mask_g, bias_g, ctx.sm_consts)
        inner = (
            tiles.varying_like(jnp.zeros((B, K, bk, kj.shape[-1]), jnp.float32), *refs),
            tiles.varying_like(jnp.zeros((B, K, bk, vj.shape[-1]), jnp.float32), *refs),
            dq, dbias, dcon,
        )
        if lst is None:
            inner = lax.fori_loop(0, cfg.nq, functools.partial(
                q_step, idx_list=None, partial=False), inner)
        else:
            full_idx, n_full, part_idx, n_part = lst
            inner = lax.fori_loop(0, n_full, functools.partial(
                q_step, idx_list=full_idx, partial=False), inner)
            inner = lax.fori_loop(0, n_part, functools.partial(
                q_step, idx_list=part_idx, partial=True), inner)
        dk, dv, dq, dbias, dcon = inner
        return (dq, dbias, dcon), (dk, dv)

    refs = (qb, kb, vb, dob, ctx.mask_g, bias_g, ctx.sm_consts)
    dq0 = tiles.varying_like(jnp.zeros(qb.shape, jnp.float32), *refs)
    dbias0 = None if bias_g is None else tiles.varying_like(
        jnp.zeros(bias_g.shape, jnp.float32), *refs)
    dcon0 = tuple(tiles.varying_like(jnp.zeros(jnp.shape(c), jnp.result_type(c)), *refs)
                  for c in fconsts)
    (dq, dbias, dcon), (dk, dv) = lax.scan(
        kv_block, (dq0, dbias0, dcon0), (jnp.arange(cfg.nk), kb, vb, lists_t))
    return dq, dk, dv, dbias, dcon


# ---------------------------------------------------------------------------
# custom_vjp plumbing
# ---------------------------------------------------------------------------


def _sinks_km(sinks, cfg: Config):
    """``[N]`` sink logits -> ``[1, K, M]`` float32 (row m of a block is head m % G)."""
    if sinks is None:
        return None
    s = sinks.astype(jnp.float32).reshape(cfg.K, 1, cfg.G)
    return jnp.broadcast_to(s, (cfg.K, cfg.block_q, cfg.G)).reshape(1, cfg.K, -1)


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
                                           static_ho if traced_ho is None else traced_ho, (q, k))
    return (cfg, sm_fn, static_ho, dense, structure, q_positions, kv_positions, traced_ho,
            scale_arr, tuple(consts))


def _convert_score_mod(score_mod, cfg: Config, B, q_positions, kv_positions, head_offset,
                       operands):
    """``jax.closure_convert`` of score_mod at the tile shapes, so closed-over arrays
    become explicit (differentiable) operands of the custom_vjp. The example
    arguments are real (tiny) arrays, varying over the same shard_map axes as the
    tiles the kernel will pass."""
    qp = tiles.padded_positions(q_positions, cfg.T, cfg.nq * cfg.block_q)
    kp = tiles.padded_positions(kv_positions, cfg.S, cfg.nk * cfg.block_kv)
    idx = tiles.tile_index(0, 0, cfg, B, qp, kp, head_offset)
    tile_shape = (B, cfg.K, cfg.block_q, cfg.G, cfg.block_kv)

    def fn(s, b, n, t, kv):
        out = jnp.asarray(score_mod(s, b, n, t, kv))
        return jnp.broadcast_to(out, tile_shape).astype(jnp.float32)

    example = tiles.varying_like(jnp.zeros(tile_shape, jnp.float32), *operands)
    return jax.closure_convert(fn, example, idx.b, idx.n, idx.q_pos, idx.kv_pos)


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
    (cfg, sm_fn, static_ho, dense, structure, q_positions, kv_positions, traced_ho, scale_arr,
     consts) = _build(q, k, v, mask, is_causal=False, scale=scale, block_q=block_q,
                      block_kv=block_kv, score_mod=score_mod, q_positions=q_positions,
                      kv_positions=kv_positions, head_offset=head_offset)
    ctx, qb, kb, vb, cls = _setup(cfg, sm_fn, q, k, v, dense, None, scale_arr, structure,
                                  q_positions, kv_positions, static_ho, traced_ho, consts)
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
    (cfg, sm_fn, static_ho, dense, structure, q_positions, kv_positions, traced_ho, scale_arr,
     consts) = _build(q, k, v, mask, is_causal=False, scale=scale, block_q=block_q,
                      block_kv=block_kv, score_mod=score_mod, q_positions=q_positions,
                      kv_positions=kv_positions, head_offset=head_offset)
    ctx, qb, kb, vb, cls = _setup(cfg, sm_fn, q, k, v, dense, None, scale_arr, structure,
                                  q_positions, kv_positions, static_ho, traced_ho, consts)
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(jnp.float32))
    lse_b = tiles.block_q(lse[..., None], cfg)[..., 0]
    lse_b = jnp.where(jnp.arange(cfg.nq * cfg.block_q).reshape(cfg.nq, 1, 1, cfg.block_q, 1)
                      .repeat(cfg.G, 4).reshape(cfg.nq, 1, 1, -1) < cfg.T, lse_b, jnp.inf)
    ob = tiles.block_q(out, cfg).astype(jnp.float32)
    dob = tiles.block_q(dout.astype(q.dtype), cfg)
    dq, dk, dv, _, _ = _backward(qb, kb, vb, ob, lse_b, dob, ctx,
                                 None if cls is None else _compact(cls.T))
    return tiles.unblock_q(dq, cfg), tiles.unblock_kv(dk, cfg), tiles.unblock_kv(dv, cfg)
