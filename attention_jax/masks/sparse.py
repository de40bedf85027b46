"""Block-sparse masks: :class:`BlockSparse` and its patterns.

A boolean layout of (query block, key block) pairs, built directly or with
:meth:`BlockSparse.from_rule`, :meth:`BlockSparse.local_global` (Longformer / ETC),
:meth:`BlockSparse.strided` (Sparse Transformer), :meth:`BlockSparse.random` and
:meth:`BlockSparse.bigbird`. The base class and block maps are in
:mod:`attention_jax.masks.base`, the other mask objects in
:mod:`attention_jax.masks.structured`; all are importable from :mod:`attention_jax.masks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.masks.base import Mask, _int, _register


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
