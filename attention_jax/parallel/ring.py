"""Ring attention (Liu et al. 2023): K/V travel around a mesh axis, the softmax stays online.

On the local blocks of one device of ``axis_name`` (P devices, inside ``jax.shard_map``)::

  q  [B, T/P, N, H]  stays;   (k, v) [B, S/P, K, H|V]  move one device per step

Step s (s = 0 .. P-1): device i holds the K/V block of device ``src = i - s (mod P)``,
sends it on with ``lax.ppermute`` (issued before the block computation, so XLA may
overlap the transfer with it) and folds ``block_forward(q, k_src, v_src)`` into its
running ``(out, lse)`` with ``merge_partials``: P - 1 collective-permutes of K/V.
Every (query chunk, key chunk) pair whose tiles are all masked at the global positions
(causal, window, segments, lengths) is skipped by ``lax.cond``, not computed and dropped.

The arrays a ``score_mod`` closes over (learned ALiBi slopes, ...) are operands of the
``custom_vjp`` (:func:`attention_jax.parallel.closures.convert_score_mod`): their
cotangents are summed over the ring steps on each device, then once over the devices.

The backward pass (``jax.custom_vjp``) walks the same ring: each device computes its
queries' share of dq and the visiting block's dK/dV with ``block_backward`` (from the
*final* output and log-sum-exp), and dK/dV travel with K/V (P permutes of dK/dV, the
last one bringing them home). Residuals: q, k, v, the output and the ``[B, T/P, N]`` lse.

With ``layout="zigzag"`` each device holds 2 chunks (i and 2P-1-i) and the pairs are
formed chunk by chunk: under a causal mask every device runs 2P + 1 chunk pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from attention_jax.kernels import block_step, blockwise, tiles
from attention_jax.parallel import context as cp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    axis_name: str
    layout: str
    score_mod: Callable | None
    block_q: int | None
    block_kv: int | None
    static_scale: float | None
    static_ho: int | None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def ring_attention(q: Array, k: Array, v: Array, *, axis_name: str, mask=None, score_mod=None,
                   sinks: Array | None = None, scale=None, layout: str = "contiguous",
                   head_offset=0, block_q: int | None = None,
                   block_kv: int | None = None) -> Array:
    """Context-parallel attention with K/V passed around the ``axis_name`` ring (in shard_map).

    Args:
      q: ``[B, T/P, N, H]`` the local queries.
      k: ``[B, S/P, K, H]``; v: ``[B, S/P, K, V]``: the local keys / values.
      axis_name: the mesh axis the sequence is split over (P devices).
      mask: a mask object at global positions (see :mod:`attention_jax.parallel.context`).
      score_mod: ``fn(score, b, n, t, s)`` with global positions t, s; gradients flow
        to the arrays it closes over (summed over the ring steps and the devices).
      sinks: ``[N]`` sink logits (differentiable); scale: default ``1/sqrt(H)``.
      layout: ``"contiguous"`` or ``"zigzag"`` (how q, k, v were split).
      head_offset: global index of the first local head (int or traced scalar).
      block_q, block_kv: the blockwise kernel's block sizes inside each step.

    Returns:
      ``[B, T/P, N, V]`` in q's dtype, equal to one-device attention over the sequence.
    """
    B, Tl, Sl, N, K, H, V = blockwise.ops.check_qkv(q, k, v)
    cp.check_layout(layout, Tl, "local query length")
    cp.check_layout(layout, Sl, "local key length")
    if sinks is not None and tuple(jnp.shape(sinks)) != (N,):
        raise ValueError(f"sinks must be [num_heads] = [{N}]; got shape {tuple(jnp.shape(sinks))}")
    sm_fn, consts = None, ()
    if score_mod is not None:  # at one chunk pair's shapes (every pair has them)
        nc = cp.check_layout(layout, Tl)
        cq, ck = Tl // nc, Sl // nc
        q_pos = jnp.arange(cq, dtype=jnp.int32)
        sm_fn, consts = cp.convert_score_mod(
            score_mod, q[:, :cq], k[:, :ck], v[:, :ck], q_positions=q_pos,
            kv_positions=jnp.arange(ck, dtype=jnp.int32), head_offset=head_offset,
            block_q=block_q, block_kv=block_kv)
    st = _Static(axis_name, layout, sm_fn, block_q, block_kv,
                 float(scale) if _is_number(scale) else None,
                 int(head_offset) if _is_number(head_offset) else None)
    traced_scale = None if scale is None or st.static_scale is not None else scale
    traced_ho = None if st.static_ho is not None else jnp.asarray(head_offset, jnp.int32)
    return _ring(st, q, k, v, cp.prepare_mask(mask), sinks, traced_scale, traced_ho, consts)


def ring_tile_counts(q: Array, k: Array, *, axis_name: str, mask=None,
                     layout: str = "contiguous", head_offset=0, block_q: int | None = None,
                     block_kv: int | None = None) -> Array:
    """The number of kernel tiles this device computes in :func:`ring_attention`'s
    forward pass (int32 scalar, in shard_map): the same schedule and the same emptiness
    test that gate the ring's ``lax.cond``, without the attention."""
    st = _Static(axis_name, layout, None, block_q, block_kv, None,
                 int(head_offset) if _is_number(head_offset) else None)
    mask = cp.prepare_mask(mask)
    ho = head_offset if st.static_ho is None else st.static_ho
    P, i = lax.axis_size(axis_name), lax.axis_index(axis_name)
    B, N = q.shape[0], q.shape[2]
    data = cp.kv_data(mask)
    total = jnp.int32(0)
    for s in range(P):  # only the mask's per-key arrays travel
        if s:
            data = _ppermute(data, st, P)
        for pair in _pairs(st, P, i, s, q.shape[1], k.shape[1], mask, data):
            qs, ks, qp, kp, m = pair
            bq, bk = blockwise.default_block_sizes(qp.shape[0], kp.shape[0])
            n = cp.computed_tiles(m, B, N, qp, kp, block_q or bq, block_kv or bk, ho)
            total = total + jnp.where(cp.visible(m, B, N, qp, kp, ho), n, 0)
    return total


def _pairs(st: _Static, P, i, s, Tl: int, Sl: int, mask, data):
    """(q slice, kv slice, q positions, kv positions, local mask) of every chunk pair
    of step ``s`` (the block held is device ``(i - s) % P``'s)."""
    nc = cp.check_layout(st.layout, Tl)
    cq, ck = Tl // nc, Sl // nc
    q_pos = cp.positions(i, P, Tl, st.layout)
    kv_pos = cp.positions((i - s) % P, P, Sl, st.layout)
    for a in range(nc):
        for b in range(nc):
            qs, ks = slice(a * cq, (a + 1) * cq), slice(b * ck, (b + 1) * ck)
            yield qs, ks, q_pos[qs], kv_pos[ks], cp.local_mask(mask, qs, data, ks)


def _cond(pred, fn, operand):
    """``fn(operand)`` where ``pred`` (a bool or a traced scalar), else ``operand``."""
    if pred is True:
        return fn(operand)
    if pred is False:
        return operand
    return lax.cond(pred, fn, lambda x: x, operand)


def _ppermute(x, st: _Static, P: int):
    perm = [(j, (j + 1) % P) for j in range(P)]
    return jax.tree.map(lambda a: lax.ppermute(a, st.axis_name, perm), x)


def _kernel_kw(st: _Static, scale, ho):
    return dict(head_offset=ho, block_q=st.block_q, block_kv=st.block_kv,
                scale=st.static_scale if scale is None else scale)


def _pair_backward(q, k, v, out, lse, dout, mask, *, sm_fn, consts, q_positions,
                   kv_positions, head_offset, scale, block_q, block_kv):
    """``blockwise.block_backward`` of one chunk pair with the score_mod's arrays explicit.

    Args:
      q, k, v, out, lse, dout, mask, q_positions, kv_positions, head_offset, scale,
        block_q, block_kv: as in :func:`attention_jax.kernels.blockwise.block_backward`.
      sm_fn, consts: from :func:`attention_jax.parallel.closures.convert_score_mod`.

    Returns:
      ``(dq, dk, dv, dconsts)`` float32; ``dconsts`` the cotangents of the floating consts.
    """
    kw = dict(q_positions=q_positions, kv_positions=kv_positions, head_offset=head_offset,
              scale=scale, block_q=block_q, block_kv=block_kv)
    if sm_fn is None:
        return (*blockwise.block_backward(q, k, v, out, lse, dout, mask, **kw), ())
    (cfg, _, static_ho, dense, structure, q_pos, kv_pos, traced_ho, scale_arr,
     _) = block_step._build(q, k, v, mask, is_causal=False, score_mod=None, **kw)
    tile = (q.shape[0], cfg.K, cfg.block_q, cfg.G, cfg.block_kv)

    def tile_mod(s, b, n, t, kv, *cs):  # what the kernel's own conversion returns
        return jnp.broadcast_to(jnp.asarray(sm_fn(s, b, n, t, kv, *cs)), tile).astype(
            jnp.float32)

    ctx, qb, kb, vb, cls = block_step._setup(cfg, tile_mod, q, k, v, dense, None, scale_arr,
                                             structure, q_pos, kv_pos, static_ho, traced_ho,
                                             consts)
    return block_step.backward_tiles(cfg, ctx, qb, kb, vb, cls, out, lse, dout, q.dtype)


def _float_consts(consts) -> list:
    return [c for c in consts if jnp.issubdtype(jnp.result_type(c), jnp.inexact)]


def _forward(st: _Static, q, k, v, mask, sinks, scale, traced_ho, consts):
    B, Tl, N, _ = q.shape
    Sl, V = k.shape[1], v.shape[-1]
    P, i = lax.axis_size(st.axis_name), lax.axis_index(st.axis_name)
    ho = st.static_ho if traced_ho is None else traced_ho
    nc = cp.check_layout(st.layout, Tl)
    cq = Tl // nc
    refs = (q, k, v, mask, traced_ho)
    accs = tuple((tiles.varying_like(jnp.zeros((B, cq, N, V), jnp.float32), *refs),
                  tiles.varying_like(jnp.full((B, cq, N), -jnp.inf, jnp.float32), *refs))
                 for _ in range(nc))
    kw = _kernel_kw(st, scale, ho)
    kw["score_mod"] = cp.bind_score_mod(st.score_mod, consts)

    def fold(accs, cur, s):
        k_, v_, data = cur
        accs = list(accs)
        for a_b, (qs, ks, qp, kp, m) in enumerate(_pairs(st, P, i, s, Tl, Sl, mask, data)):
            a = a_b // nc

            def run(acc, qs=qs, ks=ks, qp=qp, kp=kp, m=m):
                o, lse = blockwise.block_forward(q[:, qs], k_[:, ks], v_[:, ks], m,
                                                 q_positions=qp, kv_positions=kp, **kw)
                return blockwise.merge_partials(acc[0], acc[1], o, lse)

            accs[a] = _cond(cp.visible(m, B, N, qp, kp, ho), run, accs[a])
        return tuple(accs)

    def body(carry, s):
        accs, cur = carry
        nxt = _ppermute(cur, st, P)  # issued first: the transfer can overlap the fold
        return (fold(accs, cur, s), nxt), None

    cur = (k, v, cp.kv_data(mask))
    if P > 1:
        (accs, cur), _ = lax.scan(body, (accs, cur), jnp.arange(P - 1))
    accs = fold(accs, cur, P - 1)
    out = jnp.concatenate([a[0] for a in accs], axis=1)  # [B, T/P, N, V] f32
    lse = jnp.concatenate([a[1] for a in accs], axis=1)  # [B, T/P, N]
    if sinks is not None:
        s_lse = jnp.broadcast_to(sinks.astype(jnp.float32), lse.shape)
        out, lse = blockwise.merge_partials(out, lse, jnp.zeros_like(out), s_lse)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st, q, k, v, mask, sinks, scale, traced_ho, consts):
    return _forward(st, q, k, v, mask, sinks, scale, traced_ho, consts)[0]


def _ring_fwd(st, q, k, v, mask, sinks, scale, traced_ho, consts):
    y, lse = _forward(st, q, k, v, mask, sinks, scale, traced_ho, consts)
    return y, (q, k, v, mask, sinks, scale, traced_ho, consts, y, lse)


def _ring_bwd(st, res, dy):
    q, k, v, mask, sinks, scale, traced_ho, consts, y, lse = res
    B, Tl, N, H = q.shape
    Sl, K, V = k.shape[1], k.shape[2], v.shape[-1]
    P, i = lax.axis_size(st.axis_name), lax.axis_index(st.axis_name)
    ho = st.static_ho if traced_ho is None else traced_ho
    nc = cp.check_layout(st.layout, Tl)
    cq, ck = Tl // nc, Sl // nc
    refs = (q, k, v, mask, traced_ho, dy, consts)
    zeros = lambda shape: tiles.varying_like(jnp.zeros(shape, jnp.float32), *refs)  # noqa: E731
    dq = tuple(zeros((B, cq, N, H)) for _ in range(nc))
    dkv = (tuple(zeros((B, ck, K, H)) for _ in range(nc)),
           tuple(zeros((B, ck, K, V)) for _ in range(nc)))
    fconsts = _float_consts(consts)
    dcon = tuple(tiles.varying_like(jnp.zeros(jnp.shape(c), jnp.result_type(c)), *refs)
                 for c in fconsts)  # stays on this device: summed over the ring steps
    kw = _kernel_kw(st, scale, ho)

    def grads(dq, dkv, dcon, cur, s):
        k_, v_, data = cur
        dq, dk, dv = list(dq), list(dkv[0]), list(dkv[1])
        for a_b, (qs, ks, qp, kp, m) in enumerate(_pairs(st, P, i, s, Tl, Sl, mask, data)):
            a, b = divmod(a_b, nc)

            def run(acc, qs=qs, ks=ks, qp=qp, kp=kp, m=m):
                *g, gc = _pair_backward(q[:, qs], k_[:, ks], v_[:, ks], y[:, qs], lse[:, qs],
                                        dy[:, qs], m, sm_fn=st.score_mod, consts=consts,
                                        q_positions=qp, kv_positions=kp, **kw)
                return (tuple(x + d for x, d in zip(acc[0], g, strict=True)),
                        tuple(x + d.astype(x.dtype) for x, d in zip(acc[1], gc, strict=True)))

            (dq[a], dk[b], dv[b]), dcon = _cond(cp.visible(m, B, N, qp, kp, ho), run,
                                                ((dq[a], dk[b], dv[b]), dcon))
        return tuple(dq), (tuple(dk), tuple(dv)), dcon

    def body(carry, s):
        dq, cur, dkv, dcon = carry
        nxt = _ppermute(cur, st, P)
        dq, dkv, dcon = grads(dq, dkv, dcon, cur, s)
        return (dq, nxt, _ppermute(dkv, st, P), dcon), None  # dK/dV travel with K/V

    cur = (k, v, cp.kv_data(mask))
    if P > 1:
        (dq, cur, dkv, dcon), _ = lax.scan(body, (dq, cur, dkv, dcon), jnp.arange(P - 1))
    dq, dkv, dcon = grads(dq, dkv, dcon, cur, P - 1)
    if P > 1:
        dkv = _ppermute(dkv, st, P)  # the last hop brings each block's dK/dV home
    dq = jnp.concatenate(dq, axis=1).astype(q.dtype)
    dk = jnp.concatenate(dkv[0], axis=1).astype(k.dtype)
    dv = jnp.concatenate(dkv[1], axis=1).astype(v.dtype)
    dsinks = None
    if sinks is not None:
        delta = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)  # [B, T, N]
        p_sink = jnp.exp(sinks.astype(jnp.float32) - lse)
        dsinks = tiles.sum_to((-(p_sink * delta).sum(axis=(0, 1))).astype(sinks.dtype), sinks)
    it = iter(dcon)
    dconsts = tuple(tiles.sum_to(next(it).astype(jnp.result_type(c)), c)
                    if jnp.issubdtype(jnp.result_type(c), jnp.inexact) else None for c in consts)
    return (tiles.sum_to(dq, q), tiles.sum_to(dk, k), tiles.sum_to(dv, v), None, dsinks, None,
            None, dconsts)


_ring.defvjp(_ring_fwd, _ring_bwd)
