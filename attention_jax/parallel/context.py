"""Context parallelism: the sequence split over a mesh axis (inside a user's ``jax.shard_map``).

Every function here runs on the **local** blocks of one device of the ``axis_name``
mesh axis (P devices)::

  q  [B, T/P, N, H]      k  [B, S/P, K, H]      v  [B, S/P, K, V]

and returns the local ``[B, T/P, N, V]`` output rows, equal to one-device attention
over the whole sequence. K/V are never repeated over the G = N / K query heads.

* :func:`all_gather_attention`: K/V gathered once (one all-gather), the blockwise
  kernel over the whole key sequence; autodiff of the gather reduce-scatters dK/dV.
  Cheap for GQA / MQA, where K/V are K/N the size of Q.
* :func:`attention_jax.parallel.ring.ring_attention`: K/V travel around the ring
  (P - 1 ``ppermute`` steps), each step folded into the online softmax; the backward
  pass sends dK/dV around with K/V. Memory per device does not grow with P.
* :func:`context_decode_attention`: decoding with the KV cache split over the axis;
  the partial outputs are merged with their log-sum-exps in one small collective.

**Layouts.** ``"contiguous"``: device i holds tokens ``[i*L, (i+1)*L)`` (L = T/P).
``"zigzag"``: the sequence is cut into 2P chunks of L/2 and device i holds chunks
i and 2P-1-i, so that under a causal mask every device does the same work
(:func:`to_layout` / :func:`from_layout` reorder a global array).

**Masks at global positions.** Position-based masks (:class:`~attention_jax.masks.Causal`,
``SlidingWindow``, ``Chunked``, ``FromFunction``) and ``score_mod`` see each token's
global position whatever device holds it. :class:`~attention_jax.masks.Segments`
ids are the local tokens' ids (shard them like q / k; the key ids travel with K/V).
:class:`~attention_jax.masks.Lengths` counts are global (a key at global position p is
valid when ``p < kv_lengths[b]``). ``BlockSparse`` (local tile indices) is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import masks
from attention_jax.kernels import blockwise
from attention_jax.parallel.closures import bind_score_mod, convert_score_mod

Array = jax.Array

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str, local_length: int, name: str = "local length") -> int:
    """Validates ``layout``; returns its number of chunks per device (1 or 2)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if layout == "zigzag" and local_length % 2:
        raise ValueError(f"layout='zigzag' needs an even {name}; got {local_length}")
    return 1 if layout == "contiguous" else 2


def chunk_ids(device, num_devices: int, layout: str):
    """Global chunk indices held by ``device``: ``[device]`` or ``[device, 2P-1-device]``.

    >>> chunk_ids(1, 4, "zigzag")
    [1, 6]
    """
    if layout == "contiguous":
        return [device]
    return [device, 2 * num_devices - 1 - device]


def positions(device, num_devices: int, local_length: int, layout: str = "contiguous") -> Array:
    """``[L]`` int32 global positions of the L tokens held by ``device`` (int or traced).

    >>> positions(1, 4, 4, "zigzag").tolist()
    [2, 3, 12, 13]
    """
    nc = check_layout(layout, local_length)
    c = local_length // nc
    ar = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([jnp.asarray(ch, jnp.int32) * c + ar
                            for ch in chunk_ids(device, num_devices, layout)])


def layout_permutation(length: int, num_devices: int, layout: str) -> np.ndarray:
    """``perm`` such that ``x[perm]`` is the sequence in device order (numpy, static)."""
    if length % num_devices:
        raise ValueError(f"sequence length {length} must be a multiple of {num_devices} devices")
    L = length // num_devices
    nc = check_layout(layout, L)
    c = L // nc
    return np.concatenate([ch * c + np.arange(c) for i in range(num_devices)
                           for ch in chunk_ids(i, num_devices, layout)]).astype(np.int32)


def to_layout(x: Array, num_devices: int, layout: str, axis: int = 1) -> Array:
    """Reorders a global ``x`` along ``axis`` so that sharding it contiguously over
    ``num_devices`` gives each device its chunks of ``layout``.

    >>> to_layout(jnp.arange(8)[None], 2, "zigzag").tolist()
    [[0, 1, 6, 7, 2, 3, 4, 5]]
    """
    return jnp.take(x, layout_permutation(x.shape[axis], num_devices, layout), axis=axis)


def from_layout(x: Array, num_devices: int, layout: str, axis: int = 1) -> Array:
    """Inverse of :func:`to_layout`."""
    perm = layout_permutation(x.shape[axis], num_devices, layout)
    return jnp.take(x, np.argsort(perm), axis=axis)


# ---------------------------------------------------------------------------
# Masks on local blocks
# ---------------------------------------------------------------------------


class GlobalLengths(masks.Mask):
    """:class:`~attention_jax.masks.Lengths` read at global positions: a key at position
    p is valid when ``p < kv_lengths[b]``, a query when ``p < q_lengths[b]``.

    >>> GlobalLengths(jnp.array([3])).dense(1, 1, 1, 2, kv_positions=jnp.array([2, 3])).tolist()
    [[[[True, False]]]]
    """

    kv_lengths: Array
    q_lengths: Array | None = None

    def evaluate(self, idx):
        kl = jnp.asarray(self.kv_lengths)
        out = idx.kv_pos < kl[jnp.minimum(idx.b, kl.shape[0] - 1)]
        if self.q_lengths is not None:
            ql = jnp.asarray(self.q_lengths)
            out = out & (idx.q_pos < ql[jnp.minimum(idx.b, ql.shape[0] - 1)])
        return out

    def classify(self, blk):
        xp = blk.xp
        kl = xp.asarray(self.kv_lengths).astype(np.int32)[:, None, None, None]
        any_, all_ = blk.kv_lo < kl, blk.kv_hi < kl
        if self.q_lengths is not None:
            ql = xp.asarray(self.q_lengths).astype(np.int32)[:, None, None, None]
            any_, all_ = any_ & (blk.q_lo < ql), all_ & (blk.q_hi < ql)
        return any_, all_


GlobalLengths = masks._register(GlobalLengths, data=("kv_lengths", "q_lengths"))


def prepare_mask(mask):
    """The mask as the context-parallel functions read it: ``Lengths`` become
    :class:`GlobalLengths`; dense arrays and ``BlockSparse`` are refused (TypeError)."""
    if mask is None:
        return None
    if isinstance(mask, (masks.And, masks.Or)):
        return type(mask)(prepare_mask(mask.a), prepare_mask(mask.b))
    if isinstance(mask, masks.Lengths):
        return GlobalLengths(mask.kv_lengths, mask.q_lengths)
    if isinstance(mask, masks.BlockSparse):
        raise TypeError("BlockSparse masks are defined on local tiles; context parallelism "
                        "needs a mask at global positions (Causal, SlidingWindow, Segments, ...)")
    if not isinstance(mask, masks.Mask):
        raise TypeError("context-parallel attention takes a mask object of attention_jax.masks "
                        f"(evaluated at global positions); got {type(mask).__name__}")
    return mask


def kv_data(mask) -> tuple[Array, ...]:
    """The per-key arrays of ``mask`` (``Segments`` key ids, ``[B, S_local]``) that
    must travel with K/V, in tree order."""
    if isinstance(mask, (masks.And, masks.Or)):
        return kv_data(mask.a) + kv_data(mask.b)
    if isinstance(mask, masks.Segments):
        return (mask._kv,)
    return ()


def local_mask(mask, q_slice: slice, kv_arrays, kv_slice: slice):
    """``mask`` on the queries ``q_slice`` of the local block against the keys
    ``kv_slice`` of the block whose :func:`kv_data` is ``kv_arrays``."""
    it = iter(kv_arrays)

    def walk(m):
        if isinstance(m, (masks.And, masks.Or)):
            a = walk(m.a)
            return type(m)(a, walk(m.b))
        if isinstance(m, masks.Segments):
            return masks.Segments(m.q_ids[:, q_slice], next(it)[:, kv_slice])
        return m

    return None if mask is None else walk(mask)


def visible(mask, B: int, N: int, q_pos: Array, kv_pos: Array, head_offset=0):
    """Whether any query at ``q_pos [T]`` sees any key at ``kv_pos [S]`` under ``mask``
    (a Python bool when static, else a traced scalar): the ring skips the pairs where not."""
    if mask is None:
        return True
    T, S = q_pos.shape[0], kv_pos.shape[0]
    cls = masks.block_map(mask, B, N, T, S, T, S, q_positions=q_pos, kv_positions=kv_pos,
                          head_offset=head_offset)
    if isinstance(cls, np.ndarray):
        return bool((cls != masks.EMPTY).any())
    return jnp.any(cls != masks.EMPTY)


def computed_tiles(mask, B: int, N: int, q_pos, kv_pos, block_q: int, block_kv: int,
                   head_offset=0) -> Array:
    """How many kernel tiles ``block_q x block_kv`` of the pair (q_pos, kv_pos) are not
    empty (int32; what the blockwise kernel runs)."""
    T, S = q_pos.shape[0], kv_pos.shape[0]
    if mask is None:
        return jnp.int32(-(-T // block_q) * -(-S // block_kv))
    cls = masks.block_map(mask, B, N, T, S, block_q, block_kv, q_positions=q_pos,
                          kv_positions=kv_pos, head_offset=head_offset)
    return jnp.asarray((cls != masks.EMPTY).any(axis=(0, 1)).sum(), jnp.int32)


# ---------------------------------------------------------------------------
# All-gather
# ---------------------------------------------------------------------------


def all_gather_attention(q: Array, k: Array, v: Array, *, axis_name: str, mask=None,
                         score_mod=None, sinks: Array | None = None, scale=None,
                         layout: str = "contiguous", head_offset=0, block_q: int | None = None,
                         block_kv: int | None = None) -> Array:
    """Context-parallel attention with K/V all-gathered over ``axis_name`` (in shard_map).

    Args:
      q: ``[B, T/P, N, H]`` the local queries.
      k: ``[B, S/P, K, H]``; v: ``[B, S/P, K, V]``: the local keys / values.
      axis_name: the mesh axis the sequence is split over (P devices).
      mask: a mask object at global positions (see the module docstring), or None.
      score_mod: ``fn(score, b, n, t, s)`` with global positions t, s; gradients
        flow to the arrays it closes over (summed over the devices, see
        :func:`attention_jax.parallel.closures.convert_score_mod`).
      sinks: ``[N]`` sink logits; scale: default ``1/sqrt(H)``.
      layout: ``"contiguous"`` or ``"zigzag"`` (how q, k, v were split).
      head_offset: global index of the first local head (head parallelism).
      block_q, block_kv: the blockwise kernel's block sizes.

    Returns:
      ``[B, T/P, N, V]`` in q's dtype. One all-gather of K/V (stacked when H == V and
      the dtypes agree) in the forward pass; its transpose reduce-scatters dK/dV.
    """
    P, i = lax.axis_size(axis_name), lax.axis_index(axis_name)
    Tl, Sl = q.shape[1], k.shape[1]
    check_layout(layout, Tl, "local query length")
    check_layout(layout, Sl, "local key length")
    mask = prepare_mask(mask)
    q_pos = positions(i, P, Tl, layout)
    kv_pos = layout_permutation(P * Sl, P, layout)  # [S] static: device order
    if k.shape[-1] == v.shape[-1] and k.dtype == v.dtype:
        kv = lax.all_gather(jnp.stack([k, v]), axis_name, axis=2, tiled=True)  # [2, B, S, K, H]
        k_all, v_all = kv[0], kv[1]
    else:
        k_all = lax.all_gather(k, axis_name, axis=1, tiled=True)
        v_all = lax.all_gather(v, axis_name, axis=1, tiled=True)
    gathered = tuple(lax.all_gather(x, axis_name, axis=1, tiled=True) for x in kv_data(mask))
    m = local_mask(mask, slice(None), gathered, slice(None))
    if score_mod is not None:
        score_mod = bind_score_mod(*convert_score_mod(
            score_mod, q, k_all, v_all, q_positions=q_pos, kv_positions=kv_pos,
            head_offset=head_offset, block_q=block_q, block_kv=block_kv))
    return blockwise.blockwise_attention(
        q, k_all, v_all, m, score_mod=score_mod, sinks=sinks, scale=scale, block_q=block_q,
        block_kv=block_kv, q_positions=q_pos, kv_positions=kv_pos, head_offset=head_offset)


# ---------------------------------------------------------------------------
# Decoding with the cache split over the axis
# ---------------------------------------------------------------------------


def merge_all(out: Array, lse: Array) -> tuple[Array, Array]:
    """Merges P partial attentions ``out [P, B, T, N, V]``, ``lse [P, B, T, N]`` (over
    disjoint key sets) into ``(out [B, T, N, V], lse [B, T, N])`` float32.

    >>> o, l = merge_all(jnp.array([1.0, 3.0]).reshape(2, 1, 1, 1, 1), jnp.zeros((2, 1, 1, 1)))
    >>> float(o[0, 0, 0, 0])
    2.0
    """
    lse = lse.astype(jnp.float32)
    m = lse.max(axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)  # [P, B, T, N]; 0 where -inf
    total = w.sum(axis=0)
    seen = total > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
    merged = jnp.einsum("PBTN,PBTNV->BTNV", w, out.astype(jnp.float32)) * inv[..., None]
    lse_m = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return merged, lse_m


def context_decode_attention(q: Array, k_cache: Array, v_cache: Array, lengths: Array, *,
                             axis_name: str, q_positions: Array | None = None, mask=None,
                             score_mod=None, sinks: Array | None = None, scale=None,
                             head_offset=0) -> Array:
    """One decode (or chunked-prefill) step against a KV cache split over ``axis_name``.

    Device i holds cache rows ``[i*L, (i+1)*L)`` (contiguous, L = S/P) and the same
    queries as every other device of the axis. Each device attends to its part; the
    partial outputs and log-sum-exps are merged after **one** collective (a psum of
    the ``[P, B, T, N, V+1]`` partials, each device filling its row: flash-decoding
    across devices); the result is replicated over ``axis_name`` (out_specs without it).

    Args:
      q: ``[B, T, N, H]`` the new queries (replicated over ``axis_name``).
      k_cache: ``[B, S/P, K, H]``; v_cache: ``[B, S/P, K, V]``: the local cache rows.
      lengths: ``[B]`` valid cache length per row (global, the new tokens included).
      axis_name: the mesh axis the cache is split over.
      q_positions: ``[T]`` / ``[B, T]`` global query positions; default the last T
        positions ``lengths - T + arange(T)``. Queries see keys ``<=`` their position.
      mask, score_mod, sinks, scale, head_offset: as in :func:`all_gather_attention`
        (``mask`` is and-ed with the causal and length masks).

    Returns:
      ``[B, T, N, V]`` in q's dtype, replicated over ``axis_name``.
    """
    B, T, N, _ = q.shape
    P, i = lax.axis_size(axis_name), lax.axis_index(axis_name)
    Sl = k_cache.shape[1]
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [batch] = [{B}]; got shape {lengths.shape}")
    if q_positions is None:
        q_positions = lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None]  # [B, T]
    kv_pos = positions(i, P, Sl)
    m = masks.Causal() & GlobalLengths(lengths)
    if mask is not None:
        m = m & prepare_mask(mask)
    out, lse = blockwise.block_forward(q, k_cache, v_cache, m, score_mod=score_mod,
                                       q_positions=q_positions, kv_positions=kv_pos,
                                       head_offset=head_offset, scale=scale)
    out, _ = merge_over(out, lse, axis_name, sinks)
    return out.astype(q.dtype)


def merge_over(out: Array, lse: Array, axis_name: str, sinks: Array | None = None
               ) -> tuple[Array, Array]:
    """Merges every device's partial attention over ``axis_name`` in **one** collective.

    Args:
      out: ``[B, T, N, V]`` this device's normalised partial output (its keys only).
      lse: ``[B, T, N]`` its log-sum-exp (``-inf`` for rows that saw none of its keys).
      axis_name: the mesh axis the keys are split over (P devices).
      sinks: ``[N]`` sink logits joined after the merge, or None.

    Returns:
      ``(out [B, T, N, V], lse [B, T, N])`` float32, the same on every device of the
      axis: a psum of the ``[P, B, T, N, V+1]`` partials, each device filling its row
      (an all-gather whose result shard_map knows to be invariant over the axis).
    """
    P, i = lax.axis_size(axis_name), lax.axis_index(axis_name)
    packed = jnp.concatenate([out, lse[..., None]], axis=-1)  # [B, T, N, V+1]
    rows = jnp.zeros((P, *packed.shape), packed.dtype).at[i].set(packed)
    packed = lax.psum(rows, axis_name)
    out, lse = merge_all(packed[..., :-1], packed[..., -1])
    if sinks is not None:
        s = jnp.broadcast_to(sinks.astype(jnp.float32), lse.shape)
        out, lse = blockwise.merge_partials(out, lse, jnp.zeros_like(out), s)
    return out, lse


__all__ = [
    "LAYOUTS", "GlobalLengths", "all_gather_attention", "bind_score_mod", "check_layout",
    "chunk_ids", "computed_tiles", "context_decode_attention", "convert_score_mod",
    "from_layout", "kv_data", "layout_permutation", "local_mask", "merge_all", "merge_over",
    "positions", "prepare_mask", "to_layout", "visible",
]
