"""Structured mask objects: :class:`Causal`, :class:`SlidingWindow`, :class:`Chunked`,
:class:`Segments`, :class:`Lengths` and :class:`FromFunction`.

Each defines ``evaluate`` (elementwise, on an :class:`~attention_jax.masks.base.Index`)
and ``classify`` (per tile, for :func:`~attention_jax.masks.base.block_map`). The base
class, ``&`` / ``|`` and block maps are in :mod:`attention_jax.masks.base`,
:class:`~attention_jax.masks.sparse.BlockSparse` in :mod:`attention_jax.masks.sparse`;
all are importable from :mod:`attention_jax.masks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.masks.base import Mask, _int, _register

Array = jax.Array


class Causal(Mask):
    """Query at position t sees keys s <= t + offset (``offset = S - T``: bottom-right).

    >>> Causal().dense(1, 1, 2, 3)[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0]]
    """

    offset: int = 0

    def __post_init__(self):
        _int(self.offset, "Causal offset")

    def evaluate(self, idx):
        return idx.kv_pos <= idx.q_pos + self.offset

    def classify(self, blk):
        return blk.kv_lo <= blk.q_hi + self.offset, blk.kv_hi <= blk.q_lo + self.offset


Causal = _register(Causal)


class SlidingWindow(Mask):
    """t - left <= s <= t + right (``SlidingWindow(w - 1) & Causal()``: w keys, own included).

    >>> SlidingWindow(1).dense(1, 1, 3, 3)[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """

    left: int
    right: int = 0

    def __post_init__(self):
        _int(self.left, "SlidingWindow left", 0)
        _int(self.right, "SlidingWindow right", 0)

    def evaluate(self, idx):
        d = idx.kv_pos - idx.q_pos
        return (d >= -self.left) & (d <= self.right)

    def classify(self, blk):
        any_ = (blk.kv_hi >= blk.q_lo - self.left) & (blk.kv_lo <= blk.q_hi + self.right)
        all_ = (blk.kv_lo >= blk.q_hi - self.left) & (blk.kv_hi <= blk.q_lo + self.right)
        return any_, all_


SlidingWindow = _register(SlidingWindow)


class Chunked(Mask):
    """t // size == s // size (Llama 4 style local chunks; ``& Causal()`` for causal ones).

    >>> Chunked(2).dense(1, 1, 3, 3)[0, 0].astype(int).tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """

    size: int

    def __post_init__(self):
        _int(self.size, "Chunked size", 1)

    def evaluate(self, idx):
        return idx.q_pos // self.size == idx.kv_pos // self.size

    def classify(self, blk):
        c = self.size
        q0, q1, k0, k1 = blk.q_lo // c, blk.q_hi // c, blk.kv_lo // c, blk.kv_hi // c
        return (k1 >= q0) & (k0 <= q1), (q0 == q1) & (k0 == k1) & (q0 == k0)


Chunked = _register(Chunked)


def _gather_ids(ids: Array, b: Array, i: Array) -> Array:
    ids = jnp.asarray(ids)
    return ids[jnp.minimum(b, ids.shape[0] - 1), jnp.clip(i, 0, ids.shape[1] - 1)]


def _block_id_bounds(xp, ids, block: int, nblocks: int):
    """Per block of ``ids [B, L]``: (min, max) of the valid (>= 0) ids and whether all are valid.

    Returns three ``[B, nblocks]`` arrays (min = big, max = -1 where none is valid).
    """
    ids = xp.asarray(ids).astype(np.int32)
    B, L = ids.shape
    pad = nblocks * block - L
    ids = xp.pad(ids, ((0, 0), (0, pad)), mode="edge") if pad else ids
    ids = ids.reshape(B, nblocks, block)
    valid = ids >= 0
    big = np.int32(np.iinfo(np.int32).max)
    lo = xp.where(valid, ids, big).min(axis=-1)
    hi = xp.where(valid, ids, -1).max(axis=-1)
    return lo, hi, valid.all(axis=-1)


class Segments(Mask):
    """Packed documents: a query sees the keys of its own segment; negative ids are padding.

    Args:
      q_ids: ``[B, T]`` integer segment ids of the queries.
      kv_ids: ``[B, S]`` of the keys; default ``q_ids`` (self-attention).

    A query or key with a negative id sees / is seen by nothing (its row is zeros).

    >>> import jax.numpy as jnp
    >>> Segments(jnp.array([[0, 0, 1, -1]])).dense(1, 1, 4, 4)[0, 0].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    """

    q_ids: Array
    kv_ids: Array | None = None

    def __post_init__(self):
        for name in ("q_ids", "kv_ids"):
            x = getattr(self, name)
            if x is None or not hasattr(x, "shape"):
                continue
            if len(x.shape) != 2:
                raise ValueError(f"Segments {name} must be [batch, length]; got shape {x.shape}")
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"Segments {name} must be integer; got dtype {x.dtype}")

    @property
    def _kv(self):
        return self.q_ids if self.kv_ids is None else self.kv_ids

    def check(self, B, N, T, S):
        for name, x, L in (("q_ids", self.q_ids, T), ("kv_ids", self._kv, S)):
            if x.shape[0] not in (1, B) or x.shape[1] != L:
                what = " (kv_ids defaults to q_ids)" if self.kv_ids is None else ""
                raise ValueError(
                    f"Segments {name} must be [{B} or 1, {L}]; got shape {tuple(x.shape)}{what}")

    def evaluate(self, idx):
        qi = _gather_ids(self.q_ids, idx.b, idx.q_idx)
        ki = _gather_ids(self._kv, idx.b, idx.kv_idx)
        return (qi == ki) & (qi >= 0)

    def classify(self, blk):
        xp = blk.xp
        qlo, qhi, qall = _block_id_bounds(xp, self.q_ids, blk.block_q, blk.nq)
        klo, khi, kall = _block_id_bounds(xp, self._kv, blk.block_kv, blk.nk)
        qlo, qhi, qall = (x[:, None, :, None] for x in (qlo, qhi, qall))
        klo, khi, kall = (x[:, None, None, :] for x in (klo, khi, kall))
        any_ = (qhi >= klo) & (khi >= qlo)  # valid id ranges overlap
        all_ = qall & kall & (qlo == qhi) & (klo == khi) & (qlo == klo)
        return any_, all_


Segments = _register(Segments, data=("q_ids", "kv_ids"))


class Lengths(Mask):
    """Keys at local index >= ``kv_lengths[b]`` are hidden; queries >= ``q_lengths[b]`` see none.

    >>> import jax.numpy as jnp
    >>> Lengths(jnp.array([2])).dense(1, 1, 1, 3)[0, 0].astype(int).tolist()
    [[1, 1, 0]]
    """

    kv_lengths: Array
    q_lengths: Array | None = None

    def __post_init__(self):
        for name in ("kv_lengths", "q_lengths"):
            x = getattr(self, name)
            if x is not None and hasattr(x, "shape") and len(x.shape) != 1:
                raise ValueError(f"Lengths {name} must be [batch]; got shape {x.shape}")

    def check(self, B, N, T, S):
        for name in ("kv_lengths", "q_lengths"):
            x = getattr(self, name)
            if x is not None and x.shape[0] not in (1, B):
                raise ValueError(f"Lengths {name} must be [{B}]; got shape {tuple(x.shape)}")

    def evaluate(self, idx):
        kl = jnp.asarray(self.kv_lengths)
        out = idx.kv_idx < kl[jnp.minimum(idx.b, kl.shape[0] - 1)]
        if self.q_lengths is not None:
            ql = jnp.asarray(self.q_lengths)
            out = out & (idx.q_idx < ql[jnp.minimum(idx.b, ql.shape[0] - 1)])
        return out

    def classify(self, blk):
        xp = blk.xp
        kl = xp.asarray(self.kv_lengths).astype(np.int32)[:, None, None, None]
        any_, all_ = blk.kv_first < kl, blk.kv_last < kl
        if self.q_lengths is not None:
            ql = xp.asarray(self.q_lengths).astype(np.int32)[:, None, None, None]
            any_, all_ = any_ & (blk.q_first < ql), all_ & (blk.q_last < ql)
        return any_, all_


Lengths = _register(Lengths, data=("kv_lengths", "q_lengths"))


#: Tiles of a FromFunction are classified by evaluating its function on every (query,
#: key) pair at trace time when there are at most this many pairs (times the batch
#: rows and heads it depends on); above, every tile is partial (conservative).
FROM_FUNCTION_MAX_GRID = 2**26


def _concrete_numpy(x):
    """``x`` as a numpy array, or None when it is traced."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _grid_classes(fn, blk, max_grid: int | None = None):
    """``(any_visible, all_visible)`` per tile ``[B|1, N|1, nq, nk]`` from ``fn`` on the full
    index grid, one query block at a time; None when an input (or fn's result) is traced
    or the grid is larger than ``max_grid`` (default :data:`FROM_FUNCTION_MAX_GRID`).

    Padded queries (past T) are left out; padded keys (past S) count as hidden for
    ``any`` and visible for ``all`` (:func:`~attention_jax.masks.base.block_map` makes
    the last key block partial anyway).
    """
    max_grid = FROM_FUNCTION_MAX_GRID if max_grid is None else max_grid
    b, n = _concrete_numpy(blk.b), _concrete_numpy(blk.n)
    qp, kp = _concrete_numpy(blk.q_pos), _concrete_numpy(blk.kv_pos)
    if any(x is None for x in (b, n, qp, kp)):
        return None
    bq, bk, nq, nk = blk.block_q, blk.block_kv, blk.nq, blk.nk
    if nq * bq * nk * bk > max_grid:
        return None
    T, S = qp.shape[1], kp.shape[1]
    pad = ((0, 0), (0, 0), (0, 0), (0, nk * bk - S))
    i32 = jnp.int32
    anys, alls = [], []
    with jax.ensure_compile_time_eval():
        args = [jnp.asarray(b, i32), jnp.asarray(n, i32), None,
                jnp.asarray(kp[:, None, None, :], i32)]
        for i in range(nq):
            lo, hi = i * bq, min((i + 1) * bq, T)
            args[2] = jnp.asarray(qp[:, None, lo:hi, None], i32)
            vis = jnp.asarray(fn(*args), bool)
            if isinstance(vis, jax.core.Tracer):
                return None
            vis = np.asarray(vis)
            vis = np.broadcast_to(vis, np.broadcast_shapes(vis.shape, (1, 1, hi - lo, S)))
            if i == 0 and vis.shape[0] * vis.shape[1] * nq * bq * nk * bk > max_grid:
                return None  # fn reads b or n: the grid is B or N times larger
            tiles_shape = (*vis.shape[:2], hi - lo, nk, bk)
            anys.append(np.pad(vis, pad, constant_values=False).reshape(tiles_shape)
                        .any(axis=(2, 4)))
            alls.append(np.pad(vis, pad, constant_values=True).reshape(tiles_shape)
                        .all(axis=(2, 4)))
    return np.stack(anys, axis=2), np.stack(alls, axis=2)


class FromFunction(Mask):
    """``fn(b, n, t, s) -> bool`` on broadcasting int32 arrays (FlexAttention's ``mask_mod``).

    ``t``, ``s`` are absolute positions, ``n`` the global head. Its tiles are
    classified (empty tiles skipped, full ones unmasked) by evaluating ``fn`` on
    every (query, key) pair at trace time, when the positions and heads are
    concrete, ``fn`` closes over no traced array and the grid holds at most
    :data:`FROM_FUNCTION_MAX_GRID` pairs; otherwise every tile is evaluated
    (partial). Prefer the structured classes where they fit: they classify from
    bounds, at any size.

    >>> FromFunction(lambda b, n, t, s: (t + s) % 2 == 0).dense(1, 1, 2, 2)[0, 0].tolist()
    [[True, False], [False, True]]
    """

    fn: object

    def evaluate(self, idx):
        return jnp.asarray(self.fn(idx.b, idx.n, idx.q_pos, idx.kv_pos), bool)

    def classify(self, blk):
        out = _grid_classes(self.fn, blk)
        return (True, False) if out is None else out


FromFunction = _register(FromFunction)
