"""Attention masks, True = attend: dense boolean arrays and structured mask objects.

Dense masks broadcast to ``[B, N, T, S]`` (batch, heads, query length, key
length); combine them with :func:`combine_masks` or ``&``.

>>> import jax.numpy as jnp
>>> m = combine_masks(causal_mask(3), padding_mask(jnp.array([2, 3]), 3))
>>> m.shape
(2, 1, 3, 3)
>>> m[0, 0].astype(int).tolist()
[[1, 0, 0], [1, 1, 0], [1, 1, 0]]

Mask objects (:class:`Causal`, :class:`SlidingWindow`, :class:`Chunked`,
:class:`Segments`, :class:`Lengths`, :class:`BlockSparse`, :class:`FromFunction`,
combined with ``&`` and ``|``) describe the same thing without a ``[T, S]``
array: ``ops.dot_product_attention(mask=...)`` takes them, the blockwise kernel
evaluates them per tile and skips tiles they hide. They are JAX pytrees (array
fields are leaves, the rest is static), so they pass through ``jax.jit``,
``shard_map`` and ``custom_vjp``.

Structured masks see **absolute positions**: the query and key positions given
to :func:`dot_product_attention` (``q_positions`` / ``kv_positions``, default
``arange``) and the global head index (``head_offset`` + local head), so that
``Causal() & SlidingWindow(4096)`` means the same in training, in a prefill and
in a decode step. :class:`Segments` and :class:`Lengths` hold per-token data and
are indexed by the local query / key index (the arrays describe the tokens passed in).

>>> m = Causal() & SlidingWindow(1)
>>> m.dense(1, 1, 3, 3)[0, 0].astype(int).tolist()
[[1, 0, 0], [1, 1, 0], [0, 1, 1]]
>>> m.dense(1, 1, 1, 4, q_positions=jnp.array([2]))[0, 0].astype(int).tolist()  # decode step
[[0, 1, 1, 0]]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _positions(q_len: int, kv_len: int, offset) -> tuple[Array, Array]:
    """Query positions ``[B|1, 1, T, 1]`` (shifted by ``offset``) and key ``[1, 1, 1, S]``."""
    offset = jnp.asarray(offset, dtype=jnp.int32)
    if offset.ndim > 1:
        raise ValueError(f"offset must be a scalar or [batch]; got shape {offset.shape}")
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[None, :] + offset.reshape(-1, 1)  # [B|1, T]
    return q_pos[:, None, :, None], jnp.arange(kv_len, dtype=jnp.int32)[None, None, None, :]


def causal_mask(q_len: int, kv_len: int | None = None, *, offset=0) -> Array:
    """Query at position ``offset + t`` attends keys ``s <= offset + t``.

    Args:
      q_len: T.
      kv_len: S, default T.
      offset: absolute position of the first query: a scalar, or ``[B]`` for a
        batch whose rows sit at different positions (decoding a ragged batch).
        ``offset=0`` is top-left aligned (torch's ``is_causal``); ``offset=S-T``
        is bottom-right aligned (the last query sees every key).

    Returns:
      ``[1 or B, 1, T, S]`` boolean.

    >>> causal_mask(2, 4, offset=2).astype(int)[0, 0].tolist()
    [[1, 1, 1, 0], [1, 1, 1, 1]]
    """
    kv_len = q_len if kv_len is None else kv_len
    q_pos, k_pos = _positions(q_len, kv_len, offset)
    return k_pos <= q_pos


def sliding_window_mask(q_len: int, kv_len: int | None = None, *, window: int, offset=0) -> Array:
    """Causal local attention: a query at position p sees keys ``p - window < s <= p``.

    Args:
      q_len, kv_len, offset: as in :func:`causal_mask`.
      window: how many keys (the query's own included) each query sees; >= 1.

    Returns:
      ``[1 or B, 1, T, S]`` boolean.

    >>> sliding_window_mask(4, window=2).astype(int)[0, 0].tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    kv_len = q_len if kv_len is None else kv_len
    q_pos, k_pos = _positions(q_len, kv_len, offset)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def padding_mask(lengths: Array, kv_len: int, *, q_lengths: Array | None = None,
                 q_len: int | None = None) -> Array:
    """Keys at or past each row's length are hidden (right padding).

    Args:
      lengths: ``[B]`` valid key counts.
      kv_len: S.
      q_lengths: optional ``[B]`` valid query counts; padded queries then see no
        key, so their output rows are zeros.
      q_len: T, required with ``q_lengths``.

    Returns:
      ``[B, 1, 1, S]`` boolean, or ``[B, 1, T, S]`` with ``q_lengths``.
    """
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be [batch]; got shape {lengths.shape}")
    mask = jnp.arange(kv_len)[None, :] < lengths[:, None]  # [B, S]
    mask = mask[:, None, None, :]
    if q_lengths is None:
        return mask
    if q_len is None:
        raise ValueError("q_lengths needs q_len")
    q_lengths = jnp.asarray(q_lengths)
    if q_lengths.shape != lengths.shape:
        raise ValueError(
            f"q_lengths {q_lengths.shape} and lengths {lengths.shape} must both be [batch]"
        )
    q_valid = jnp.arange(q_len)[None, :] < q_lengths[:, None]  # [B, T]
    return mask & q_valid[:, None, :, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks (``None`` entries are skipped).

    Returns ``None`` when every mask is ``None``.
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = out & m.astype(bool)
    return out


# ---------------------------------------------------------------------------
# Mask objects
# ---------------------------------------------------------------------------


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
    time) or jax.numpy (data-dependent).
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


class _Layout:
    """A numpy boolean layout ``[N|1, nq, nk]`` that hashes by value (static pytree aux data)."""

    def __init__(self, layout):
        self.array = np.ascontiguousarray(np.asarray(layout, bool))
        self.array.setflags(write=False)

    def __hash__(self):
        return hash((self.array.shape, self.array.tobytes()))

    def __eq__(self, other):
        return isinstance(other, _Layout) and self.array.shape == other.array.shape and bool(
            (self.array == other.array).all())

    def __repr__(self):
        return f"layout{self.array.shape}"


class BlockSparse(Mask):
    """Query block t // block_q sees key block s // block_kv where ``layout`` is True.

    Args:
      layout: boolean ``[nq, nk]``, or ``[N, nq, nk]`` per (global) head; a concrete
        (numpy) array: the block map is computed from it at trace time.
      block_q, block_kv: the layout's block sizes (independent of the kernel's tiles).

    Positions outside the layout see nothing.

    >>> import numpy as np
    >>> m = BlockSparse(np.eye(2, dtype=bool), 2, 2)
    >>> m.dense(1, 1, 4, 4)[0, 0].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """

    layout: object
    block_q: int
    block_kv: int

    def __post_init__(self):
        if not isinstance(self.layout, _Layout):
            if isinstance(self.layout, jax.core.Tracer):
                raise TypeError("BlockSparse layout must be concrete (numpy), not traced")
            arr = np.asarray(self.layout)
            if arr.ndim not in (2, 3) or arr.dtype != bool:
                raise ValueError(
                    f"BlockSparse layout must be boolean [nq, nk] or [N, nq, nk]; got "
                    f"{arr.dtype} {arr.shape}")
            object.__setattr__(self, "layout", _Layout(arr if arr.ndim == 3 else arr[None]))
        _int(self.block_q, "BlockSparse block_q", 1)
        _int(self.block_kv, "BlockSparse block_kv", 1)

    @property
    def array(self) -> np.ndarray:
        """The layout as ``[N|1, nq, nk]`` numpy booleans."""
        return self.layout.array

    def evaluate(self, idx):
        lay = self.array
        nl, nq, nk = lay.shape
        r, c = idx.q_pos // self.block_q, idx.kv_pos // self.block_kv
        inside = (r >= 0) & (r < nq) & (c >= 0) & (c < nk)
        n = jnp.zeros_like(idx.n) if nl == 1 else jnp.clip(idx.n, 0, nl - 1)
        return inside & jnp.asarray(lay)[n, jnp.clip(r, 0, nq - 1), jnp.clip(c, 0, nk - 1)]

    def classify(self, blk):
        xp, lay = blk.xp, self.array
        nl, nq, nk = lay.shape
        prefix = np.zeros((nl, nq + 1, nk + 1), np.int32)
        prefix[:, 1:, 1:] = lay.cumsum(1).cumsum(2)
        prefix = xp.asarray(prefix)
        r0, r1 = blk.q_lo // self.block_q, blk.q_hi // self.block_q
        c0, c1 = blk.kv_lo // self.block_kv, blk.kv_hi // self.block_kv
        area = (r1 - r0 + 1) * (c1 - c0 + 1)
        r0, r1 = xp.clip(r0, 0, nq), xp.clip(r1 + 1, 0, nq)
        c0, c1 = xp.clip(c0, 0, nk), xp.clip(c1 + 1, 0, nk)
        n = xp.zeros_like(blk.n) if nl == 1 else xp.clip(blk.n, 0, nl - 1)
        count = prefix[n, r1, c1] - prefix[n, r0, c1] - prefix[n, r1, c0] + prefix[n, r0, c0]
        return count > 0, count == area

    @classmethod
    def from_rule(cls, rule, num_q_blocks, num_kv_blocks, block_q, block_kv=None, num_heads=1):
        """``layout[n, i, j] = rule(n, i, j)`` on numpy index grids."""
        n, i, j = np.ogrid[:num_heads, :num_q_blocks, :num_kv_blocks]
        lay = np.broadcast_to(rule(n, i, j), (num_heads, num_q_blocks, num_kv_blocks))
        return cls(np.array(lay, bool), block_q, block_kv or block_q)

    @classmethod
    def local_global(cls, num_q_blocks, num_kv_blocks, block_q, block_kv=None, *, window=1,
                     num_global=1, causal=False):
        """Local blocks ``|i - j| < window`` plus ``num_global`` global blocks (rows and columns
        that see / are seen by everything), the Longformer / ETC pattern."""
        def rule(n, i, j):
            m = (abs(i - j) < window) | (i < num_global) | (j < num_global)
            return m & (j <= i) if causal else m
        return cls.from_rule(rule, num_q_blocks, num_kv_blocks, block_q, block_kv)

    @classmethod
    def strided(cls, num_q_blocks, num_kv_blocks, block_q, block_kv=None, *, stride,
                window=1, causal=True):
        """Sparse Transformer's strided pattern: ``|i - j| < window`` or ``(i - j) % stride == 0``.
        """
        _int(stride, "stride", 1)

        def rule(n, i, j):
            m = (abs(i - j) < window) | ((i - j) % stride == 0)
            return m & (j <= i) if causal else m
        return cls.from_rule(rule, num_q_blocks, num_kv_blocks, block_q, block_kv)

    @classmethod
    def random(cls, num_q_blocks, num_kv_blocks, block_q, block_kv=None, *, num_random,
               num_heads=1, seed=0):
        """Each query block of each head sees ``num_random`` key blocks drawn from ``seed``."""
        rng = np.random.default_rng(seed)
        lay = np.zeros((num_heads, num_q_blocks, num_kv_blocks), bool)
        k = min(num_random, num_kv_blocks)
        for n in range(num_heads):
            for i in range(num_q_blocks):
                lay[n, i, rng.choice(num_kv_blocks, k, replace=False)] = True
        return cls(lay, block_q, block_kv or block_q)

    @classmethod
    def bigbird(cls, window, num_global, num_random, *, num_q_blocks, num_kv_blocks, block_q,
                block_kv=None, num_heads=1, seed=0):
        """BigBird: a band of ``window`` blocks each side, ``num_global`` global blocks and
        ``num_random`` random key blocks per query block and head."""
        lg = cls.local_global(num_q_blocks, num_kv_blocks, block_q, block_kv, window=window + 1,
                              num_global=num_global).array
        rnd = cls.random(num_q_blocks, num_kv_blocks, block_q, block_kv, num_random=num_random,
                         num_heads=num_heads, seed=seed).array
        return cls(lg | rnd, block_q, block_kv or block_q)


BlockSparse = _register(BlockSparse)


class FromFunction(Mask):
    """``fn(b, n, t, s) -> bool`` on broadcasting int32 arrays (FlexAttention's ``mask_mod``).

    ``t``, ``s`` are absolute positions, ``n`` the global head. The blockwise
    kernel evaluates it in every tile (no tile is known empty or full); prefer the
    structured classes where they fit.

    >>> FromFunction(lambda b, n, t, s: (t + s) % 2 == 0).dense(1, 1, 2, 2)[0, 0].tolist()
    [[True, False], [False, True]]
    """

    fn: object

    def evaluate(self, idx):
        return jnp.asarray(self.fn(idx.b, idx.n, idx.q_pos, idx.kv_pos), bool)


FromFunction = _register(FromFunction)


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


def block_map(mask: Mask | None, B: int, N: int, T: int, S: int, block_q: int, block_kv: int, *,
              q_positions=None, kv_positions=None, head_offset=0):
    """Classifies every (query block, key block) tile: ``EMPTY`` (0), ``PARTIAL`` (1), ``FULL`` (2).

    Computed in numpy at trace time when nothing it reads is traced (causal, window,
    chunks, a layout, static positions), otherwise with jax.numpy from the data
    (segments, lengths, traced positions). A tile with padded keys (past S) is
    never FULL. Conservative: a tile may be PARTIAL when it is in fact empty or full.

    Returns:
      int8 ``[B|1, N|1, nq, nk]`` (a numpy array when static).

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
            n=(xp.asarray(head_offset) + np.arange(N))[None, :, None, None],
            q_lo=q_lo[:, None, :, None], q_hi=q_hi[:, None, :, None],
            kv_lo=kv_lo[:, None, None, :], kv_hi=kv_hi[:, None, None, :],
            q_first=q_first[None, None, :, None],
            q_last=(np.minimum(q_first + block_q, T) - 1)[None, None, :, None],
            kv_first=kv_first[None, None, None, :],
            kv_last=(np.minimum(kv_first + block_kv, S) - 1)[None, None, None, :],
            block_q=block_q, block_kv=block_kv, nq=nq, nk=nk,
        )
        any_, all_ = mask.classify(blk)
        any_ = xp.broadcast_to(xp.asarray(any_, bool), xp.broadcast_shapes(
            xp.shape(any_), xp.shape(all_), (1, 1, nq, nk)))
        all_ = xp.broadcast_to(xp.asarray(all_, bool), any_.shape)
    if nk * block_kv != S:  # the last key block holds padding
        all_ = all_ & (np.arange(nk) < nk - 1)
    cls = xp.where(all_ & any_, FULL, xp.where(any_, PARTIAL, EMPTY)).astype(np.int8)
    return cls
