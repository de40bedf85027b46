"""Dense boolean masks, True = attend, broadcasting to ``[B, N, T, S]``.

:func:`causal_mask`, :func:`sliding_window_mask`, :func:`padding_mask` and
:func:`combine_masks` (logical AND). The mask objects are in
:mod:`attention_jax.masks.base` (the protocol, ``&`` / ``|``, block maps),
:mod:`attention_jax.masks.structured` and :mod:`attention_jax.masks.sparse`; all
are importable from :mod:`attention_jax.masks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
