"""The mask-object machinery: the :class:`Mask` base, its index types, ``&`` / ``|``, block maps.

* :class:`Index` (where a mask is evaluated elementwise) and :class:`BlockIndex`
  (per-tile bounds at which it is classified), :func:`dense_index`;
* :class:`Mask` (``evaluate``, ``classify``, ``check``, ``dense``), :class:`And`, :class:`Or`;
* :func:`block_map`: EMPTY / PARTIAL / FULL per (query block, key block) tile;
* the helpers the mask classes share (``_register``, ``_int``, ``_positions_2d``).

The concrete masks are in :mod:`attention_jax.masks.structured` (causal, window,
chunks, segments, lengths, functions) and :mod:`attention_jax.masks.sparse`
(:class:`~attention_jax.masks.sparse.BlockSparse`); the dense boolean helpers in
:mod:`attention_jax.masks.dense`. Everything is importable from :mod:`attention_jax.masks`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Index:
    """Broadcasting int32 index arrays at which a mask (or a score_mod) is evaluated.

    ``b`` batch row, ``n`` global head (``head_offset`` + local head), ``q_pos`` /
    ``kv_pos`` absolute positions, ``q_idx`` / ``kv_idx`` local indices into the
    arrays passed in (what :class:`Segments` and :class:`Lengths` read).
    """

    b: Array
    n: Array
    q_pos: Array
    kv_pos: Array
    q_idx: Array
    kv_idx: Array


Index = jax.tree_util.register_dataclass(
    Index, data_fields=["b", "n", "q_pos", "kv_pos", "q_idx", "kv_idx"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """Per-tile bounds at which :meth:`Mask.classify` decides empty / full, conservatively.

    Every field broadcasts to ``[B|1, N|1, nq, nk]``: ``q_lo`` / ``q_hi`` the
    smallest / largest absolute query position of query block i, ``kv_lo`` /
    ``kv_hi`` the same for key block j, ``q_first`` / ``q_last`` and ``kv_first``
    / ``kv_last`` the local indices; ``xp`` is numpy (static structure, at trace
    time) or jax.numpy (data-dependent). ``q_pos`` / ``kv_pos``: every query's /
    key's absolute position, ``[B|1, T]`` / ``[B|1, S]`` (numpy where concrete), for
    masks that classify tiles elementwise
    (:class:`~attention_jax.masks.structured.FromFunction`); None if not given.
    """

    xp: object
    b: Array
    n: Array
    q_lo: Array
    q_hi: Array
    kv_lo: Array
    kv_hi: Array
    q_first: Array
    q_last: Array
    kv_first: Array
    kv_last: Array
    block_q: int
    block_kv: int
    nq: int
    nk: int
    q_pos: Array | None = None
    kv_pos: Array | None = None


class Mask:
    """Base of the structured masks: ``m(b, n, t, s)`` is True where query t attends key s.

    Subclasses define :meth:`evaluate` (elementwise) and :meth:`classify` (per tile:
    ``(any_visible, all_visible)``, allowed to answer "partial" when unsure but never wrong).
    """

    def evaluate(self, idx: Index) -> Array:
        raise NotImplementedError

    def classify(self, blk: BlockIndex) -> tuple[Array, Array]:
        return True, False  # unknown: every tile partial

    def check(self, B: int, N: int, T: int, S: int) -> None:
        """Raises ValueError when the mask's arrays do not fit ``[B, N, T, S]``."""

    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other, "&"))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other, "|"))

    def __call__(self, b, n, t, s) -> Array:
        """Evaluates at positions ``t``, ``s`` (taken as the local indices too)."""
        t, s = jnp.asarray(t, jnp.int32), jnp.asarray(s, jnp.int32)
        return self.evaluate(Index(jnp.asarray(b, jnp.int32), jnp.asarray(n, jnp.int32),
                                   t, s, t, s))

    def dense(self, B: int, N: int, T: int, S: int, *, q_positions=None, kv_positions=None,
              head_offset=0) -> Array:
        """The ``[B, N, T, S]`` boolean array (the reference every backend is tested against).

        Args:
          B, N, T, S: batch, heads, query and key lengths.
          q_positions: ``[T]`` or ``[B, T]`` absolute query positions, default ``arange(T)``.
          kv_positions: ``[S]`` or ``[B, S]``, default ``arange(S)``.
          head_offset: added to the head index (a head-parallel shard's first head).
        """
        self.check(B, N, T, S)
        idx = dense_index(B, N, T, S, q_positions=q_positions, kv_positions=kv_positions,
                          head_offset=head_offset)
        return jnp.broadcast_to(self.evaluate(idx), (B, N, T, S))


def _positions_2d(pos, length: int, name: str) -> Array:
    """``[length]`` / ``[B, length]`` positions (default arange) -> int32 ``[B|1, length]``."""
    if pos is None:
        return jnp.arange(length, dtype=jnp.int32)[None]
    pos = jnp.asarray(pos)
    if pos.ndim == 1:
        pos = pos[None]
    if pos.ndim != 2 or pos.shape[1] != length:
        raise ValueError(f"{name} must be [{length}] or [batch, {length}]; got shape {pos.shape}")
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer; got dtype {pos.dtype}")
    return pos.astype(jnp.int32)


def dense_index(B, N, T, S, *, q_positions=None, kv_positions=None, head_offset=0) -> Index:
    """The :class:`Index` of a whole ``[B, N, T, S]`` score array."""
    qp = _positions_2d(q_positions, T, "q_positions")
    kp = _positions_2d(kv_positions, S, "kv_positions")
    i32 = jnp.int32
    return Index(
        b=jnp.arange(B, dtype=i32)[:, None, None, None],
        n=(jnp.asarray(head_offset, i32) + jnp.arange(N, dtype=i32))[None, :, None, None],
        q_pos=qp[:, None, :, None],
        kv_pos=kp[:, None, None, :],
        q_idx=jnp.arange(T, dtype=i32)[None, None, :, None],
        kv_idx=jnp.arange(S, dtype=i32)[None, None, None, :],
    )


def _as_mask(x, op: str) -> Mask:
    if not isinstance(x, Mask):
        raise TypeError(
            f"{op} combines mask objects (attention_jax.masks.Causal, ...); got {type(x).__name__}"
            "; combine dense boolean arrays with combine_masks"
        )
    return x


def _register(cls, data: tuple[str, ...] = ()):
    cls = dataclasses.dataclass(frozen=True)(cls)
    meta = tuple(f.name for f in dataclasses.fields(cls) if f.name not in data)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


def _int(x, name: str, minimum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int; got {x!r}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {x}")
    return int(x)


class And(Mask):
    """Visible where both are (``a & b``)."""

    a: Mask
    b: Mask

    def check(self, B, N, T, S):
        self.a.check(B, N, T, S)
        self.b.check(B, N, T, S)

    def evaluate(self, idx):
        return self.a.evaluate(idx) & self.b.evaluate(idx)

    def classify(self, blk):
        (a0, a1), (b0, b1) = self.a.classify(blk), self.b.classify(blk)
        return a0 & b0, a1 & b1


And = _register(And, data=("a", "b"))


class Or(Mask):
    """Visible where either is (``a | b``)."""

    a: Mask
    b: Mask

    def check(self, B, N, T, S):
        self.a.check(B, N, T, S)
        self.b.check(B, N, T, S)

    def evaluate(self, idx):
        return self.a.evaluate(idx) | self.b.evaluate(idx)

    def classify(self, blk):
        (a0, a1), (b0, b1) = self.a.classify(blk), self.b.classify(blk)
        return a0 | b0, a1 | b1


Or = _register(Or, data=("a", "b"))


# ---------------------------------------------------------------------------
# Block maps
# ---------------------------------------------------------------------------

EMPTY, PARTIAL, FULL = 0, 1, 2


def _concrete(x) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def _block_bounds(xp, pos, length: int, block: int, nblocks: int):
    """(lo, hi) absolute positions per block of ``pos [B|1, length]`` (default arange)."""
    if pos is None:
        first = np.arange(nblocks) * block
        last = np.minimum(first + block, length) - 1
        return first[None], last[None]
    pos = xp.asarray(pos).astype(np.int32)
    pos = pos[None] if pos.ndim == 1 else pos
    pad = nblocks * block - length
    pos = xp.pad(pos, ((0, 0), (0, pad)), mode="edge") if pad else pos
    pos = pos.reshape(pos.shape[0], nblocks, block)
    return pos.min(axis=-1), pos.max(axis=-1)


def _all_positions(xp, pos, length: int):
    """int32 ``[B|1, length]`` positions of every token (a numpy arange by default)."""
    if pos is None:
        return np.arange(length, dtype=np.int32)[None]
    pos = (np if _concrete(pos) else xp).asarray(pos).astype(np.int32)
    return pos[None] if pos.ndim == 1 else pos


def block_map(mask: Mask | None, B: int, N: int, T: int, S: int, block_q: int, block_kv: int, *,
              q_positions=None, kv_positions=None, head_offset=0):
    """Classifies every (query block, key block) tile: ``EMPTY`` (0), ``PARTIAL`` (1), ``FULL`` (2).

    Computed in numpy at trace time when nothing it reads is traced (causal, window,
    chunks, a layout, static positions), otherwise with jax.numpy from the data
    (segments, lengths, traced positions). A tile with padded keys (past S) is
    never FULL. Conservative: a tile may be PARTIAL when it is in fact empty or full.
    A :class:`~attention_jax.masks.structured.FromFunction` is classified exactly, by
    evaluating its function on every (query, key) pair, when the positions and heads
    are concrete and the grid is small enough
    (:data:`~attention_jax.masks.structured.FROM_FUNCTION_MAX_GRID`).

    Returns:
      int8 ``[B|1, N|1, nq, nk]`` (a numpy array when static).

    >>> from attention_jax.masks import Causal
    >>> block_map(Causal(), 1, 1, 4, 4, 2, 2)[0, 0].tolist()
    [[1, 0], [2, 1]]
    """
    nq, nk = -(-T // block_q), -(-S // block_kv)
    if mask is not None:
        mask.check(B, N, T, S)
    static = _concrete((mask, q_positions, kv_positions, head_offset))
    xp = np if static else jnp
    if mask is None:
        any_, all_ = np.ones((1, 1, nq, nk), bool), np.ones((1, 1, nq, nk), bool)
    else:
        q_lo, q_hi = _block_bounds(xp, q_positions, T, block_q, nq)
        kv_lo, kv_hi = _block_bounds(xp, kv_positions, S, block_kv, nk)
        q_first = np.arange(nq) * block_q
        kv_first = np.arange(nk) * block_kv
        blk = BlockIndex(
            xp=xp,
            b=np.arange(B)[:, None, None, None],
            n=((np if _concrete(head_offset) else xp).asarray(head_offset)
               + np.arange(N))[None, :, None, None],
            q_lo=q_lo[:, None, :, None], q_hi=q_hi[:, None, :, None],
            kv_lo=kv_lo[:, None, None, :], kv_hi=kv_hi[:, None, None, :],
            q_first=q_first[None, None, :, None],
            q_last=(np.minimum(q_first + block_q, T) - 1)[None, None, :, None],
            kv_first=kv_first[None, None, None, :],
            kv_last=(np.minimum(kv_first + block_kv, S) - 1)[None, None, None, :],
            block_q=block_q, block_kv=block_kv, nq=nq, nk=nk,
            q_pos=_all_positions(xp, q_positions, T),
            kv_pos=_all_positions(xp, kv_positions, S),
        )
        any_, all_ = mask.classify(blk)
        any_ = xp.broadcast_to(xp.asarray(any_, bool), xp.broadcast_shapes(
            xp.shape(any_), xp.shape(all_), (1, 1, nq, nk)))
        all_ = xp.broadcast_to(xp.asarray(all_, bool), any_.shape)
    if nk * block_kv != S:  # the last key block holds padding
        all_ = all_ & (np.arange(nk) < nk - 1)
    cls = xp.where(all_ & any_, FULL, xp.where(any_, PARTIAL, EMPTY)).astype(np.int8)
    return cls
