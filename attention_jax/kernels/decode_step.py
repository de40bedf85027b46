"""One decoding step on projected heads: store the new keys / values, then attend.

:func:`cached_attention` is what :meth:`attention_jax.MultiHeadAttention.decode`
(through :func:`attention_jax.layer.decode_layer`) and the head-parallel decode
call: it writes the step into the :class:`~attention_jax.cache.KVCache`
(:func:`attention_jax.cache.update`) and runs the ``"decode"`` kernel
(:func:`attention_jax.kernels.decode.cache_attention`: filled blocks only,
split-K, int8 dequantized per block) or, for large prefills and the other
backends, :func:`attention_jax.ops.dot_product_attention` over the whole cache.
The names are re-exported by :mod:`attention_jax.cache` (where they lived).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from attention_jax import cache as kv_cache
from attention_jax import masks, ops
from attention_jax.kernels import decode

Array = jax.Array


def decode_mask(lengths: Array, t: int, max_length: int,
                valid_lengths: Array | None = None, starts: Array | None = None) -> Array:
    """What the t new queries of each row see in the updated cache.

    Args:
      lengths: ``[B]`` stored tokens *before* the step.
      t: new tokens this step.
      max_length: L.
      valid_lengths: ``[B]`` real new tokens, default t.
      starts: ``[B]`` left-padding slots (never visible), default none.

    Returns:
      ``[B, 1, t, L]`` boolean: key s is visible to query i of row b iff
      ``starts[b] <= s <= lengths[b] + i`` and ``s < min(lengths[b] + valid_lengths[b], L)``.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    valid = jnp.clip(kv_cache.resolve_valid_lengths(valid_lengths, lengths.shape[0], t), 0, t)
    stored = jnp.minimum(lengths + valid, max_length)
    visible = masks.combine_masks(
        masks.causal_mask(t, max_length, offset=lengths),  # [B, 1, t, L]
        masks.padding_mask(stored, max_length),  # [B, 1, 1, L]
    )
    if starts is None:
        return visible
    slots = jnp.arange(max_length, dtype=jnp.int32)
    return visible & (slots >= jnp.asarray(starts, jnp.int32)[:, None])[:, None, None, :]


def check_step_inputs(q: Array, k_new: Array, v_new: Array, cache: kv_cache.KVCache,
                      mask: Array | None, kv_heads: tuple[Array | int, int] | None = None) -> None:
    """Trace-time checks of a step: ranks, dtypes, head counts and the mask.

    Raises:
      ValueError: a rank or shape that does not fit (naming the expected
        ``[B, N, t, L]`` for the mask).
      TypeError: a mask that is not boolean (decode takes no additive masks), or
        float queries / keys / values expected.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [B, t, N, H]; got shape {tuple(q.shape)}")
    B, t, N, H = q.shape
    K = k_new.shape[2] if k_new.ndim == 4 else None
    if kv_heads is not None:
        K = kv_heads[1]  # the queries attend with these kv heads only
    if k_new.ndim != 4 or v_new.ndim != 4 or N % K or k_new.shape[-1] != H:
        raise ValueError(
            f"new keys {tuple(k_new.shape)} / values {tuple(v_new.shape)} do not fit q "
            f"{tuple(q.shape)}: expected [B={B}, t={t}, K, H={H}] with N={N} divisible by K"
        )
    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array; got dtype {x.dtype}")
    if mask is None:
        return
    mask = jnp.asarray(mask) if not hasattr(mask, "dtype") else mask
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"decode mask must be boolean (True = attend); got dtype {mask.dtype}. Decoding "
            "takes no additive float masks: pass mask != 0 or a bias-free boolean mask"
        )
    shape = (B, N, t, cache.max_length)
    if mask.ndim > 4 or any(a not in (1, b) for a, b in
                            zip(mask.shape[::-1], shape[::-1], strict=False)):
        raise ValueError(
            f"decode mask of shape {tuple(mask.shape)} does not broadcast to "
            f"[B, N, t, L] = {list(shape)} (L = the cache's max_length)"
        )


# "auto" (and None) runs the block kernel for steps of at most this many new tokens.
STEP_MAX_T = 16


def cached_attention(
    q: Array,
    k_new: Array,
    v_new: Array,
    cache: kv_cache.KVCache,
    *,
    valid_lengths: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    kv_heads: tuple[Array | int, int] | None = None,
    block: int | None = None,
    splits: int | None = None,
    score_mod: Callable[..., Array] | None = None,
    sinks: Array | None = None,
    head_offset: Array | int = 0,
) -> tuple[Array, kv_cache.KVCache]:
    """One decoding step on projected heads: store, then attend to the cache.

    Head counts come from the shapes, so a head-parallel caller passes its
    local heads and its local slice of the cache. The new keys and values are
    written first (in place), then the queries attend to the updated cache.

    Backends: ``"decode"``, and ``"auto"`` / None for ``t <= STEP_MAX_T``, run
    :func:`attention_jax.kernels.decode.cache_attention` (filled blocks only,
    split-K, int8 dequantized per block, no cache-sized copy); ``"xla"``,
    ``"blockwise"``, ``"cudnn"`` and larger prefills under ``"auto"`` read all
    L positions (dequantized) through :func:`attention_jax.ops.dot_product_attention`.

    Args:
      q: ``[B, t, N, H]`` new queries (rope applied).
      k_new: ``[B, t, K, H]``; v_new ``[B, t, K, V]``.
      cache: holds ``lengths`` tokens per row before the step.
      valid_lengths: ``[B]`` integer real tokens among the t, default t.
      mask: optional extra boolean mask broadcastable to ``[B, N, t, L]``
        (e.g. :func:`attention_jax.masks.sliding_window_mask` with
        ``offset=cache.lengths``), True = attend. The kernel starts at the
        first block the mask opens, so a window reads only the window.
      scale, implementation: as in :func:`attention_jax.ops.dot_product_attention`.
      kv_heads: ``(first, count)``: store all K new heads but attend with only
        these kv heads of the cache (:func:`select_kv_heads`); default all K.
      block, splits: the kernel's block tokens and split-K chunks (defaults:
        :func:`~attention_jax.kernels.decode.block_tokens`, ``num_splits``).
      score_mod: ``fn(score, b, n, t, s) -> score`` (e.g. :func:`attention_jax.scores.softcap`)
        on the scaled logits, at token positions (slot minus ``cache.starts``).
      sinks: ``[N]`` attention-sink logits (one per query head).
      head_offset: global index of the first local query head (head-parallel
        callers), what score_mod sees as ``n``.

    Returns:
      ``(out [B, t, N, V] in q's dtype, updated cache)``.
    """
    check_step_inputs(q, k_new, v_new, cache, mask, kv_heads)
    B, t = q.shape[:2]
    if sinks is not None and tuple(jnp.shape(sinks)) != (q.shape[2],):
        raise ValueError(f"sinks must be [num_heads] = [{q.shape[2]}]; "
                         f"got shape {tuple(jnp.shape(sinks))}")
    new_cache = kv_cache.update(cache, k_new, v_new, valid_lengths)
    valid = new_cache.lengths - cache.lengths + (new_cache.dropped - cache.dropped)  # clipped
    impl = implementation or ops.default_implementation()
    visible = new_cache if kv_heads is None else kv_cache.select_kv_heads(new_cache, *kv_heads)
    if impl == "decode" or (impl == "auto" and t <= STEP_MAX_T):
        out = decode.cache_attention(
            q, visible.k, visible.v, cache.lengths, valid, k_scale=visible.k_scale,
            v_scale=visible.v_scale, mask=mask, scale=scale, block=block, splits=splits,
            score_mod=score_mod, sinks=sinks, starts=cache.starts, head_offset=head_offset,
        )
        return out, new_cache
    full_mask = masks.combine_masks(
        decode_mask(cache.lengths, t, cache.max_length, valid, cache.starts), mask
    )
    k, v = kv_cache.read(visible, q.dtype)  # [B, L, K, H], [B, L, K, V]
    extra = {}
    if score_mod is not None:  # token positions: slot minus the row's left padding
        starts = cache.starts[:, None]
        extra = dict(score_mod=score_mod, head_offset=head_offset,
                     q_positions=kv_cache.positions(cache, t) - starts,
                     kv_positions=jnp.arange(cache.max_length, dtype=jnp.int32)[None] - starts)
    out = ops.dot_product_attention(
        q, k, v, full_mask, scale=scale, implementation=implementation, sinks=sinks, **extra
    )
    return out, new_cache
