"""The loops of the blockwise kernel: tile scores, tile lists, the forward and backward passes.

* ``_Ctx``: what one call carries into the loops; ``_scores``: the scores of one
  (query block, key block) tile with bias, score_mod and mask applied;
* ``_tile_classes`` / ``_compact``: the block map reduced to per-row lists of full
  and partial tiles; :func:`tile_counts`;
* ``_forward`` (online softmax) and ``_backward`` (FlashAttention-2 recomputation).

The public kernel and its ``custom_vjp`` are in :mod:`attention_jax.kernels.blockwise`;
resolving a call (block sizes, scale, score_mod) and the context-parallel pieces
(``block_forward``, ``block_backward``, ``merge_partials``) in
:mod:`attention_jax.kernels.block_step`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import masks
from attention_jax.kernels import tiles
from attention_jax.kernels.tiles import Config

Array = jax.Array


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
            # dq^T = k^T @ ds: both operands row-major in their contraction (ds @ k would
            # contract ds's leading dim, a transposed operand XLA:CPU's dot library
            # declines and the fallback runs at half the speed).
            dqi = scale * jnp.einsum("BKHS,BKSM->BKHM", kjT, ds.astype(kjT.dtype),
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
        # [B, K, H, bk], materialised: XLA would fold a bare transpose back into the dot
        kjT = lax.optimization_barrier(jnp.swapaxes(kj, -1, -2))
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
    # dq accumulates transposed, [nq, B, K, H, M] (see q_step)
    dq0 = tiles.varying_like(jnp.zeros((*qb.shape[:-2], qb.shape[-1], M), jnp.float32), *refs)
    dbias0 = None if bias_g is None else tiles.varying_like(
        jnp.zeros(bias_g.shape, jnp.float32), *refs)
    dcon0 = tuple(tiles.varying_like(jnp.zeros(jnp.shape(c), jnp.result_type(c)), *refs)
                  for c in fconsts)
    (dq, dbias, dcon), (dk, dv) = lax.scan(
        kv_block, (dq0, dbias0, dcon0), (jnp.arange(cfg.nk), kb, vb, lists_t))
    return jnp.swapaxes(dq, -1, -2), dk, dv, dbias, dcon

