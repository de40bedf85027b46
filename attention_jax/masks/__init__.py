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

The package is split by kind; every name is importable from here:

* :mod:`attention_jax.masks.dense`: the dense boolean helpers (``causal_mask``, ...);
* :mod:`attention_jax.masks.base`: ``Mask``, ``Index``, ``BlockIndex``, ``And``,
  ``Or``, ``block_map`` and ``EMPTY`` / ``PARTIAL`` / ``FULL``;
* :mod:`attention_jax.masks.structured`: ``Causal``, ``SlidingWindow``, ``Chunked``,
  ``Segments``, ``Lengths``, ``FromFunction``;
* :mod:`attention_jax.masks.sparse`: ``BlockSparse`` and its patterns.
"""

# The ``_name as _name`` imports keep the private helpers at their old address
# (``masks._positions_2d`` and ``masks._register`` are used by the kernels and parallel/).
from attention_jax.masks.base import (
    EMPTY,
    FULL,
    PARTIAL,
    And,
    BlockIndex,
    Index,
    Mask,
    Or,
    block_map,
    dense_index,
)
from attention_jax.masks.base import _as_mask as _as_mask
from attention_jax.masks.base import _block_bounds as _block_bounds
from attention_jax.masks.base import _concrete as _concrete
from attention_jax.masks.base import _int as _int
from attention_jax.masks.base import _positions_2d as _positions_2d
from attention_jax.masks.base import _register as _register
from attention_jax.masks.dense import _positions as _positions
from attention_jax.masks.dense import causal_mask, combine_masks, padding_mask, sliding_window_mask
from attention_jax.masks.sparse import BlockSparse
from attention_jax.masks.sparse import _Layout as _Layout
from attention_jax.masks.structured import (
    Causal,
    Chunked,
    FromFunction,
    Lengths,
    Segments,
    SlidingWindow,
)
from attention_jax.masks.structured import _block_id_bounds as _block_id_bounds
from attention_jax.masks.structured import _gather_ids as _gather_ids

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "And",
    "BlockIndex",
    "BlockSparse",
    "Causal",
    "Chunked",
    "FromFunction",
    "Index",
    "Lengths",
    "Mask",
    "Or",
    "Segments",
    "SlidingWindow",
    "block_map",
    "causal_mask",
    "combine_masks",
    "dense_index",
    "padding_mask",
    "sliding_window_mask",
]
