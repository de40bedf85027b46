"""An explicit key/value cache for autoregressive decoding (MHA, GQA, MQA alike).

The cache is a pytree passed in and returned (never hidden module state), sized
by the K key/value heads, not by the N query heads, so GQA and MQA cut its
memory, and the bytes a decode step reads, by K / N:

==========  =================  ==============================================
field       shape              meaning
==========  =================  ==============================================
k           ``[B, L, K, H]``   keys (rope already applied), float or int8
v           ``[B, L, K, V]``   values, float or int8
lengths     ``[B]`` int32      tokens stored per row (rows may differ)
k_scale     ``[B, L, K]``      int8 caches only: per token and head scales
v_scale     ``[B, L, K]``      (bfloat16), ``None`` for float caches
==========  =================  ==============================================

One step (:func:`cached_attention`) takes ``t >= 1`` new tokens per row (a
multi-token prefill and a single-token step are the same call): their keys and
values are written at each row's own length, and query ``i`` of row ``b`` (at
absolute position ``lengths[b] + i``) attends to the keys at positions
``<= lengths[b] + i``, i.e. :func:`attention_jax.masks.causal_mask` with
``offset=lengths``, cut at the row's new length.

**Ragged prompts** (right padded): ``valid_lengths [B]`` says how many of the t
new tokens of each row are real. Only those are stored and counted
(``lengths += valid_lengths``); a padded token is not written, and the next step
of that row starts right after its last real token. The outputs at padded
positions are finite but meaningless (they see the row's real keys); ignore them.

**Capacity.** Writing past ``max_length`` L raises ``ValueError`` when the
lengths are concrete (eager calls). Under ``jax.jit`` the lengths are traced and
nothing can be raised: tokens that would land at position ``>= L`` are **dropped**
(not stored; stored entries are never overwritten), ``lengths`` saturates at L,
and the queries of dropped tokens attend to the stored keys only (their outputs
then differ from a full forward). Size L for the longest sequence, or call
:func:`check_capacity` on concrete lengths between jitted steps.

**Steps read the old cache.** A step with few query rows (``t * N <= 64``
under ``"auto"``, or any t with ``implementation="xla"`` / ``"decode"``)
attends to the cache as it was plus its own t new keys, one softmax over both,
so nothing in the step reads the updated buffer; larger prefills (and ``"blockwise"``
/ ``"cudnn"``) attend to the updated cache. Both give the same numbers.

**int8 caches** (``dtype=jnp.int8``) store ``round(x / s)`` with a symmetric scale
``s = max|x| / 127`` per token and head (over H), the scale in bfloat16, and
dequantize on read. The element error is at most about ``s / 2`` (one half
step; a bfloat16-rounded scale may add a clip of the largest element by under
0.4% of it). Bytes per token: ``K (H + V) + 2 K * 2`` against ``2 K (H + V)``
for bfloat16 (0.52x at H = V = 64, 0.51x at 128).

>>> import jax.numpy as jnp
>>> c = init_cache(2, 16, num_kv_heads=2, head_dim=8)
>>> c.k.shape, c.lengths.tolist(), c.bytes_per_token
((2, 16, 2, 8), [0, 0], 128)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from attention_jax import masks, ops

Array = jax.Array

INT8_MAX = 127
SCALE_DTYPE = jnp.bfloat16


@struct.dataclass
class KVCache:
    """Keys, values and per-row lengths of a decoding batch (a pytree; see module doc)."""

    k: Array  # [B, L, K, H]
    v: Array  # [B, L, K, V]
    lengths: Array  # [B] int32
    k_scale: Array | None = None  # [B, L, K] (int8 caches)
    v_scale: Array | None = None  # [B, L, K] (int8 caches)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_length(self) -> int:
        """L, the positions a row can hold."""
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        """True for an int8 cache (with scales)."""
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache, scales and lengths included."""
        leaves = jax.tree_util.tree_leaves(self)
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one stored token of one row costs: keys, values and their scales."""
        arrays = [self.k, self.v, self.k_scale, self.v_scale]
        return sum(
            int(np.prod(x.shape[2:])) * jnp.dtype(x.dtype).itemsize
            for x in arrays if x is not None
        )


def init_cache(
    batch_size: int,
    max_length: int,
    num_kv_heads: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype: Any = jnp.float32,
) -> KVCache:
    """An empty cache: zeros, ``lengths = 0``.

    Args:
      batch_size: B.
      max_length: L, positions per row.
      num_kv_heads: K.
      head_dim: H.
      v_head_dim: V, default H.
      dtype: a float dtype, or ``jnp.int8`` for a quantized cache with
        bfloat16 scales ``[B, L, K]``.

    Returns:
      A :class:`KVCache`.
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    V = head_dim if v_head_dim is None else v_head_dim
    dtype = jnp.dtype(dtype)
    if not (dtype == jnp.int8 or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"cache dtype must be a float dtype or int8; got {dtype}")
    B, L, K, H = batch_size, max_length, num_kv_heads, head_dim
    k = jnp.zeros((B, L, K, H), dtype)
    v = jnp.zeros((B, L, K, V), dtype)
    lengths = jnp.zeros((B,), jnp.int32)
    if dtype != jnp.int8:
        return KVCache(k, v, lengths)
    # Two buffers, not one shared: a donated cache must not hold the same array twice.
    k_scale, v_scale = (jnp.zeros((B, L, K), SCALE_DTYPE) for _ in range(2))
    return KVCache(k, v, lengths, k_scale, v_scale)


# ---------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------


def quantize_int8(x: Array) -> tuple[Array, Array]:
    """Symmetric int8 quantization per vector of the last axis.

    Args:
      x: ``[..., H]`` float.

    Returns:
      ``(q [..., H] int8, scale [...] bfloat16)`` with ``x ~= q * scale``; an
      all-zero vector gets scale 0.
    """
    xf = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(xf), axis=-1) / INT8_MAX).astype(SCALE_DTYPE)  # [...]
    s = scale.astype(jnp.float32)[..., None]
    q = jnp.round(xf / jnp.where(s == 0, 1.0, s))
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize_int8(q: Array, scale: Array, dtype: Any = jnp.float32) -> Array:
    """``[..., H] int8, [...] -> [..., H]`` in ``dtype``."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


# ---------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------


def _is_concrete(*xs: Array | int) -> bool:
    """True when every value can be read on the host (eager), False under tracing."""
    try:
        for x in xs:
            np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def resolve_valid_lengths(valid_lengths: Array | None, batch: int, t: int) -> Array:
    """``[B]`` int32 real tokens per row among t new ones: the given ones checked, or all t.

    Raises:
      ValueError: for a shape other than ``[batch]``, or (eagerly) a value outside ``[0, t]``.
    """
    if valid_lengths is None:
        return jnp.full((batch,), t, jnp.int32)
    valid_lengths = jnp.asarray(valid_lengths, jnp.int32)
    if valid_lengths.shape != (batch,):
        raise ValueError(
            f"valid_lengths must be [batch] = [{batch}]; got shape {valid_lengths.shape}"
        )
    if _is_concrete(valid_lengths):
        bad = np.flatnonzero((np.asarray(valid_lengths) < 0) | (np.asarray(valid_lengths) > t))
        if bad.size:
            b = int(bad[0])
            raise ValueError(
                f"valid_lengths[{b}] = {int(valid_lengths[b])} is outside [0, {t}] "
                f"for {t} new tokens"
            )
    return valid_lengths


def check_capacity(cache: KVCache, new_tokens: Array | int) -> None:
    """Raises if storing ``new_tokens`` (scalar or ``[B]``) would pass ``max_length``.

    Does nothing when the lengths are traced (inside ``jit``); see the module doc.

    Raises:
      ValueError: naming the row, its length, the new tokens and ``max_length``.
    """
    if not _is_concrete(cache.lengths, new_tokens):
        return
    lengths = np.asarray(cache.lengths)
    new = np.broadcast_to(np.asarray(new_tokens), lengths.shape)
    over = np.flatnonzero(lengths + new > cache.max_length)
    if over.size:
        b = int(over[0])
        raise ValueError(
            f"KV cache overflow: row {b} holds {int(lengths[b])} tokens and {int(new[b])} more "
            f"would need {int(lengths[b] + new[b])} positions, but max_length is "
            f"{cache.max_length}; create the cache with a larger max_length"
        )


def positions(cache: KVCache, t: int) -> Array:
    """``[B, t]`` absolute positions of the next t tokens of each row."""
    return cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def update(cache: KVCache, k_new: Array, v_new: Array,
           valid_lengths: Array | None = None) -> KVCache:
    """Stores new keys/values at each row's own length.

    Args:
      cache: the cache.
      k_new: ``[B, t, K, H]`` new keys (rope applied).
      v_new: ``[B, t, K, V]`` new values.
      valid_lengths: ``[B]`` real tokens among the t (right padding), default t.

    Returns:
      The cache with ``lengths + valid_lengths`` (saturated at L) tokens per row.
      Positions ``>= L`` are dropped (see the module doc); eager calls raise
      instead.
    """
    B, t = k_new.shape[:2]
    expected = ((B, t, *cache.k.shape[2:]), (B, t, *cache.v.shape[2:]))
    if (k_new.shape, v_new.shape) != expected or B != cache.batch_size:
        raise ValueError(
            f"new keys {k_new.shape} / values {v_new.shape} do not fit the cache "
            f"k {cache.k.shape} / v {cache.v.shape}: expected {expected[0]} / {expected[1]}"
        )
    valid = resolve_valid_lengths(valid_lengths, B, t)
    check_capacity(cache, valid)
    L = cache.max_length
    pos = positions(cache, t)  # [B, t]
    pos = jnp.where(jnp.arange(t)[None, :] < valid[:, None], pos, L)  # padding -> dropped
    rows = jnp.arange(B)[:, None]  # [B, 1]

    def put(buf: Array, x: Array) -> Array:
        return buf.at[rows, pos].set(x.astype(buf.dtype), mode="drop")

    lengths = jnp.minimum(cache.lengths + valid, L).astype(jnp.int32)
    if not cache.quantized:
        return cache.replace(k=put(cache.k, k_new), v=put(cache.v, v_new), lengths=lengths)
    kq, ks = quantize_int8(k_new)  # [B, t, K, H], [B, t, K]
    vq, vs = quantize_int8(v_new)
    return cache.replace(
        k=put(cache.k, kq), v=put(cache.v, vq), lengths=lengths,
        k_scale=put(cache.k_scale, ks), v_scale=put(cache.v_scale, vs),
    )


def read(cache: KVCache, dtype: Any) -> tuple[Array, Array]:
    """All L positions of keys and values in ``dtype`` (dequantized for int8)."""
    if not cache.quantized:
        return cache.k.astype(dtype), cache.v.astype(dtype)
    return (dequantize_int8(cache.k, cache.k_scale, dtype),
            dequantize_int8(cache.v, cache.v_scale, dtype))


def decode_mask(lengths: Array, t: int, max_length: int,
                valid_lengths: Array | None = None) -> Array:
    """What the t new queries of each row see in the updated cache.

    Args:
      lengths: ``[B]`` stored tokens *before* the step.
      t: new tokens this step.
      max_length: L.
      valid_lengths: ``[B]`` real new tokens, default t.

    Returns:
      ``[B, 1, t, L]`` boolean: key s is visible to query i of row b iff
      ``s <= lengths[b] + i`` and ``s < min(lengths[b] + valid_lengths[b], L)``.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    valid = resolve_valid_lengths(valid_lengths, lengths.shape[0], t)
    stored = jnp.minimum(lengths + valid, max_length)
    return masks.combine_masks(
        masks.causal_mask(t, max_length, offset=lengths),  # [B, 1, t, L]
        masks.padding_mask(stored, max_length),  # [B, 1, 1, L]
    )


def select_kv_heads(cache: KVCache, first: Array | int, count: int) -> KVCache:
    """The cache's kv heads ``first .. first + count - 1`` (``first`` may be traced).

    A head-parallel device whose query heads share fewer kv heads than a
    replicated cache holds reads only its own (see :mod:`attention_jax.sharding`).
    """
    def take(x: Array | None) -> Array | None:
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, first, count, axis=2)

    return cache.replace(k=take(cache.k), v=take(cache.v), k_scale=take(cache.k_scale),
                         v_scale=take(cache.v_scale))


def cached_attention(
    q: Array,
    k_new: Array,
    v_new: Array,
    cache: KVCache,
    *,
    valid_lengths: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    kv_heads: tuple[Array | int, int] | None = None,
) -> tuple[Array, KVCache]:
    """One decoding step on projected heads: store, then attend to the cache.

    Head counts come from the shapes, so a head-parallel caller passes its
    local heads and its local slice of the cache.

    Args:
      q: ``[B, t, N, H]`` new queries (rope applied).
      k_new: ``[B, t, K, H]``; v_new ``[B, t, K, V]``.
      cache: holds ``lengths`` tokens per row before the step.
      valid_lengths: ``[B]`` real tokens among the t, default t.
      mask: optional extra boolean mask broadcastable to ``[B, N, t, L]``
        (e.g. :func:`attention_jax.masks.sliding_window_mask` with
        ``offset=cache.lengths``), True = attend.
      scale, implementation: as in :func:`attention_jax.ops.dot_product_attention`.
      kv_heads: ``(first, count)``: store all K new heads but attend with only
        these kv heads of the cache (:func:`select_kv_heads`); default all K.

    Returns:
      ``(out [B, t, N, V] in q's dtype, updated cache)``.
    """
    t = q.shape[1]
    contraction = _step_contraction(q, cache, implementation)
    if contraction is not None:
        out = _step_attention(q, k_new, v_new, cache, valid_lengths=valid_lengths, mask=mask,
                              scale=scale, kv_heads=kv_heads, flat=contraction == "decode")
        return out, update(cache, k_new, v_new, valid_lengths)
    new_cache = update(cache, k_new, v_new, valid_lengths)
    full_mask = masks.combine_masks(
        decode_mask(cache.lengths, t, cache.max_length, valid_lengths), mask
    )
    visible = new_cache if kv_heads is None else select_kv_heads(new_cache, *kv_heads)
    k, v = read(visible, q.dtype)  # [B, L, K, H], [B, L, K, V]
    out = ops.dot_product_attention(
        q, k, v, full_mask, scale=scale, implementation=implementation
    )
    return out, new_cache


# ---------------------------------------------------------------------------
# The step path: attend to the old cache and the new tokens, never to the update
# ---------------------------------------------------------------------------


def _step_contraction(q: Array, cache: KVCache, implementation: str | None) -> str | None:
    """``"xla"`` or ``"decode"`` when a step takes the two-part path, None for the general one.

    A step (few query rows, ``t * N <= AUTO_DECODE_MAX_ROWS``) under ``"auto"``
    takes it with the contraction ``auto`` would pick for those shapes (the
    in-place ``"decode"`` one on CPU, einsum elsewhere); ``"xla"`` and
    ``"decode"`` always do. ``"blockwise"``, ``"cudnn"`` and larger prefills
    attend to the updated cache through :func:`ops.dot_product_attention`.
    """
    from attention_jax.kernels import dispatch

    impl = implementation or ops.default_implementation()
    if impl in ("xla", "decode"):
        return impl
    if impl != "auto" or q.shape[1] * q.shape[2] > dispatch.AUTO_DECODE_MAX_ROWS:
        return None
    k = jax.ShapeDtypeStruct(cache.k.shape, q.dtype)
    v = jax.ShapeDtypeStruct(cache.v.shape, q.dtype)
    return "decode" if dispatch.choose_implementation(q, k, v) == "decode" else "xla"


def _stored(cache: KVCache, x: Array, dtype: Any) -> Array:
    """New keys or values as the cache will give them back (int8 round trip, cache dtype)."""
    if cache.quantized:
        return dequantize_int8(*quantize_int8(x), dtype)
    return x.astype(cache.k.dtype).astype(dtype)


def _step_attention(
    q: Array,
    k_new: Array,
    v_new: Array,
    cache: KVCache,
    *,
    valid_lengths: Array | None,
    mask: Array | None,
    scale: float | None,
    kv_heads: tuple[Array | int, int] | None,
    flat: bool,
) -> Array:
    """:func:`cached_attention`'s output computed from the cache *before* the update.

    Reading the updated buffer would make XLA keep two versions of the whole
    cache (the in-place update and a copy to read), copying it several times a
    step; here the step reads the old cache once and the t new tokens apart:

    * old key ``s`` (``[B, L]``): visible iff ``s < lengths[b]`` (every stored
      token precedes every new query) and the extra mask allows position s;
    * new key ``j`` (``[B, t]``): visible to query ``i`` iff ``j <= i``,
      ``j < valid_lengths[b]`` and ``lengths[b] + j < L`` (it gets stored), and
      the extra mask allows position ``lengths[b] + j``.

    One softmax runs over both parts (float32), the same masks and weights as
    the general path, so the results agree with it to rounding.

    Returns:
      ``[B, t, N, V]`` in q's dtype.
    """
    from attention_jax.kernels import decode

    B, t, N, _ = q.shape
    L = cache.max_length
    valid = resolve_valid_lengths(valid_lengths, B, t)
    k_in, v_in = _stored(cache, k_new, q.dtype), _stored(cache, v_new, q.dtype)
    old = cache
    if kv_heads is not None:
        old = select_kv_heads(cache, *kv_heads)
        first, count = kv_heads
        k_in, v_in = (jax.lax.dynamic_slice_in_dim(x, first, count, axis=2) for x in (k_in, v_in))
    k_old, v_old = read(old, q.dtype)  # [B, L, K, H], [B, L, K, V]

    lengths = cache.lengths
    j = jnp.arange(t, dtype=jnp.int32)
    stored = (j[None, :] < valid[:, None]) & (lengths[:, None] + j[None, :] < L)  # [B, t]
    mask_old = masks.padding_mask(lengths, L)  # [B, 1, 1, L]
    mask_new = ops.causal_block(t, t)[None, None] & stored[:, None, None, :]  # [B, 1, t, t]
    if mask is not None:
        extra = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)).astype(bool)
        extra = jnp.broadcast_to(extra, (*extra.shape[:3], L))  # [B|1, N|1, t|1, L]
        where = jnp.minimum(lengths[:, None] + j[None, :], L - 1)  # [B, t]
        eb, en, et, _ = extra.shape
        extra_new = jnp.take_along_axis(
            jnp.broadcast_to(extra, (B, en, et, L)),
            jnp.broadcast_to(where[:, None, None, :], (B, en, et, t)), axis=-1,
        )  # [B, N|1, t|1, t]
        mask_old, mask_new = mask_old & extra, mask_new & extra_new
    Nm = N if mask_old.shape[1] == N or mask_new.shape[1] == N else 1
    full = jnp.concatenate(
        [jnp.broadcast_to(mask_old, (B, Nm, t, L)), jnp.broadcast_to(mask_new, (B, Nm, t, t))],
        axis=-1,
    )  # [B, N|1, t, L + t]
    K = k_old.shape[2]
    full = ops.group_heads(full, (B, N, t, L + t), K)  # [B, K|1, G|1, t, L + t]

    logits_fn = decode.flat_logits if flat else ops.attention_logits
    combine_fn = decode.flat_combine if flat else ops.combine_values
    logits = jnp.concatenate(
        [logits_fn(q, k_old, scale=scale), ops.attention_logits(q, k_in, scale=scale)], axis=-1
    )  # [B, K, G, t, L + t] float32
    weights = ops.attention_weights(logits, full)
    out = (combine_fn(weights[..., :L], v_old, jnp.float32)
           + ops.combine_values(weights[..., L:], v_in, jnp.float32))  # [B, t, N, V]
    return out.astype(q.dtype)
