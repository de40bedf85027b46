"""An explicit key/value cache for autoregressive decoding (MHA, GQA, MQA alike).

The cache is a pytree passed in and returned (never hidden module state), sized
by the K key/value heads, not by the N query heads, so GQA and MQA cut its
memory, and the bytes a decode step reads, by K / N:

==========  =================  ==============================================
field       shape              meaning
==========  =================  ==============================================
k           ``[B, K, L, H]``   keys (rope already applied), float or int8
v           ``[B, K, L, V]``   values, float or int8
lengths     ``[B]`` int32      slots filled per row (rows may differ)
starts      ``[B]`` int32      left-padding slots at the front of each row (0)
k_scale     ``[B, K, L]``      int8 caches only: per token and head scales
v_scale     ``[B, K, L]``      (float32), ``None`` for float caches
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

**Left-padded prompts**: a batch of prompts padded on the left (as tokenizers
pad for generation) is prefilled as it is, padding included, into a cache made
by :func:`left_padded` with each row's padding count: slots before
``starts[b]`` are never attended to, and the rope / mask / score_mod position
of the token in slot ``p`` is ``p - starts[b]`` (:func:`token_positions`), so a
row's first real token sits at position 0 whatever its padding.

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
``s = max|x| / 127`` per token and head (over H), the scale in float32, and the
step dequantizes each block it reads (never the whole cache). The element error
is at most ``s / 2`` (one half step). Bytes per token: ``K (H + V) + 2 K * 4``
against ``2 K (H + V)`` for bfloat16 (0.53x at H = V = 64, 0.52x at 128) and
``4 K (H + V)`` for float32 (0.27x / 0.26x). The scales are float32, not
bfloat16, because XLA:CPU converts a whole bf16 array to float32 to scatter into
it or slice it dynamically (a cache-sized copy every step). On CPU each dequantized
block is a float32 copy the step writes and reads again, while a float32 cache more
than half of which is read is contracted where it lies
(:func:`attention_jax.kernels.decode.whole_cache`): there an int8 step costs
1.2-1.6x a float32 one (MHA and GQA, 8k-32k tokens, ``attention-jax decode``). int8
saves memory on CPU, not time.

**bf16 caches** halve the bytes. On GPU they are read in place like the others.
On CPU, XLA's float normalization turns the step's bf16 scatter (the write) and
bf16 dynamic slices (the block reads) into float32 operations on the whole
buffer, so a bf16 cache step on CPU copies the cache (measured in
``attention-jax decode``); use float32 or int8 caches there.

**Layout** ``[B, K, L, H]`` (head-major, torch's and Hugging Face's): each kv
head's keys are one contiguous ``[L, H]`` matrix per row, so a decode step's
per-head products are plain matrix-vector products that read the cache once,
with no transpose (:func:`attention_jax.kernels.decode.cache_attention`). It
replaced ``[B, L, K, H]`` (token-major), whose per-head contraction has its batch
dim K between S and H in memory: measured on 2 CPU cores, one query row,
N = 16, H = 64, S = 32768, attention alone, best block of each, load 0.6-1.4:
float32 MHA 28.5 -> 21.5 ms, GQA K = 4 9.5 -> 7.2 ms, int8 MHA 17.8 -> 7.7 ms.
The new tokens ``[B, t, K, H]`` of a step are scattered into slots along axis 2
(:func:`put_slots`); :func:`read` returns the token-major ``[B, L, K, H]`` that
:func:`attention_jax.ops.dot_product_attention` takes (a copy, for the paths
that read all L slots anyway).

>>> import jax.numpy as jnp
>>> c = init_cache(2, 16, num_kv_heads=2, head_dim=8)
>>> c.k.shape, c.lengths.tolist(), c.bytes_per_token
((2, 2, 16, 8), [0, 0], 128)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from attention_jax.cache_checks import (  # noqa: F401  (re-exported)
    _CHECKIFY,
    _is_concrete,
    check_capacity,
    checked,
    resolve_valid_lengths,
)

Array = jax.Array

INT8_MAX = 127
SCALE_DTYPE = jnp.float32
#: The axes of a cache's ``k`` / ``v`` (``[B, K, L, H]``) and scales (``[B, K, L]``)
#: that hold the kv heads and the slots.
HEAD_AXIS, SLOT_AXIS = 1, 2


@struct.dataclass
class KVCache:
    """Keys, values and per-row lengths of a decoding batch (a pytree; see module doc).

    ``dropped`` and ``clipped`` (``[B]`` int32) are the bookkeeping of jitted
    steps (see "Capacity"): tokens not stored because the row was full, and
    steps whose ``valid_lengths`` was outside ``[0, t]`` and was clipped.
    ``starts`` (``[B]`` int32) counts the left-padding slots of each row (see
    "Left-padded prompts"). Left out (None), the three are zeros shaped like
    ``lengths`` (and, for a cache of ``PartitionSpec`` s, the spec of
    ``lengths``), so ``KVCache(k, v, lengths)`` keeps working.
    """

    k: Array  # [B, K, L, H]
    v: Array  # [B, K, L, V]
    lengths: Array  # [B] int32
    k_scale: Array | None = None  # [B, K, L] (int8 caches)
    v_scale: Array | None = None  # [B, K, L] (int8 caches)
    dropped: Array | None = None  # [B] int32: tokens lost to a full row
    clipped: Array | None = None  # [B] int32: steps with valid_lengths outside [0, t]
    starts: Array | None = None  # [B] int32: left-padding slots (never attended)

    def __post_init__(self):
        for name in ("dropped", "clipped", "starts"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, _like_lengths(self.lengths))

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_length(self) -> int:
        """L, the positions a row can hold."""
        return self.k.shape[SLOT_AXIS]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[HEAD_AXIS]

    @property
    def quantized(self) -> bool:
        """True for an int8 cache (with scales)."""
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache, scales, lengths and bookkeeping included."""
        leaves = jax.tree_util.tree_leaves(self)
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one stored token of one row costs: keys, values and their scales."""
        arrays = [self.k, self.v, self.k_scale, self.v_scale]
        return sum(
            x.shape[HEAD_AXIS] * int(np.prod(x.shape[SLOT_AXIS + 1:]))
            * jnp.dtype(x.dtype).itemsize
            for x in arrays if x is not None
        )

    def check(self) -> KVCache:
        """Raises if a (jitted) step dropped tokens or clipped ``valid_lengths``; else self.

        Call it on the cache a jitted step returned (it reads ``dropped`` and
        ``clipped``, a device-to-host copy of ``2 B`` integers).

        Raises:
          ValueError: naming the rows, their dropped tokens / clipped steps, and
            ``max_length``.
        """
        dropped, clipped = np.asarray(self.dropped), np.asarray(self.clipped)
        problems = []
        for b in np.flatnonzero(dropped):
            problems.append(f"row {b} dropped {int(dropped[b])} tokens (max_length is "
                            f"{self.max_length}; its length is {int(self.lengths[b])})")
        for b in np.flatnonzero(clipped):
            problems.append(f"row {b} had valid_lengths outside [0, t] in {int(clipped[b])} "
                            "steps (clipped)")
        if problems:
            raise ValueError("KV cache bookkeeping: " + "; ".join(problems))
        return self


def _like_lengths(lengths: Any) -> Any:
    """Zeros ``[B]`` int32 for an array ``lengths``; ``lengths`` itself for anything else.

    A cache of ``PartitionSpec`` s (``sharding.cache_specs``) thus gets the
    lengths' spec for its bookkeeping; placeholders jax puts in trees pass through.
    """
    if isinstance(lengths, (jax.Array, np.ndarray)) or hasattr(lengths, "aval"):
        return jnp.zeros(jnp.shape(lengths), jnp.int32)
    if isinstance(lengths, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(lengths.shape, jnp.int32, sharding=lengths.sharding)
    return lengths


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
        float32 scales ``[B, K, L]``.

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
    k = jnp.zeros((B, K, L, H), dtype)
    v = jnp.zeros((B, K, L, V), dtype)
    lengths = jnp.zeros((B,), jnp.int32)
    if dtype != jnp.int8:
        return KVCache(k, v, lengths)
    # Two buffers, not one shared: a donated cache must not hold the same array twice.
    k_scale, v_scale = (jnp.zeros((B, K, L), SCALE_DTYPE) for _ in range(2))
    return KVCache(k, v, lengths, k_scale, v_scale)


# ---------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------


def quantize_int8(x: Array) -> tuple[Array, Array]:
    """Symmetric int8 quantization per vector of the last axis.

    Args:
      x: ``[..., H]`` float.

    Returns:
      ``(q [..., H] int8, scale [...] float32)`` with ``x ~= q * scale``; an
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


def positions(cache: KVCache, t: int) -> Array:
    """``[B, t]`` the slots the next t tokens of each row are written to."""
    return cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def token_positions(cache: KVCache, t: int) -> Array:
    """``[B, t]`` positions of the next t tokens (for rope, masks, score_mod): slot - starts.

    >>> import jax.numpy as jnp
    >>> c = left_padded(init_cache(2, 8, 1, 4), jnp.array([0, 3]))
    >>> token_positions(c, 4).tolist()
    [[0, 1, 2, 3], [-3, -2, -1, 0]]
    """
    return positions(cache, t) - cache.starts[:, None]


def left_padded(cache: KVCache, padding: Array) -> KVCache:
    """The cache with ``padding[b]`` left-padding slots in row b (``starts = padding``).

    Prefill the left-padded prompts ``[B, T]`` into it as they are: slots
    ``< padding[b]`` are written but never attended to, and positions count from
    the first real token (:func:`token_positions`). For an attention mask
    ``[B, T]`` (1 = token) of left-padded prompts, ``padding = T - mask.sum(1)``.

    Raises:
      ValueError: a ``padding`` that is not ``[B]`` integers.
    """
    padding = jnp.asarray(padding)
    if padding.shape != (cache.batch_size,) or not jnp.issubdtype(padding.dtype, jnp.integer):
        raise ValueError(f"padding must be [batch] = [{cache.batch_size}] integers; got shape "
                         f"{tuple(padding.shape)} dtype {padding.dtype}")
    return cache.replace(starts=padding.astype(jnp.int32))


def put_slots(buf: Array, slots: Array, x: Array) -> Array:
    """``buf`` with token ``i`` of row ``b`` of ``x`` stored at slot ``slots[b, i]``.

    Args:
      buf: a cache field, ``[B, K, L, H]`` (``k`` / ``v``) or ``[B, K, L]`` (scales).
      slots: ``[B, t]`` int32; a slot ``>= L`` drops its token (nothing written).
      x: ``[B, t, K, H]`` or ``[B, t, K]``, token-major as projected.

    Returns:
      The updated ``buf`` (in place under a donating ``jit``: one scatter).

    >>> import jax.numpy as jnp
    >>> put_slots(jnp.zeros((1, 2, 3)), jnp.array([[1, 3]]), jnp.ones((1, 2, 2))).tolist()
    [[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]
    """
    rows = jnp.arange(buf.shape[0])[:, None]  # [B, 1]
    # Advanced indices split by a slice: their dims [B, t] lead, then K (and H).
    return buf.at[rows, :, slots].set(x.astype(buf.dtype), mode="drop")


def token_major(x: Array) -> Array:
    """A cache field ``[B, K, L, ...]`` as ``[B, L, K, ...]`` (a transposed copy)."""
    return jnp.swapaxes(x, HEAD_AXIS, SLOT_AXIS)


def update(cache: KVCache, k_new: Array, v_new: Array,
           valid_lengths: Array | None = None) -> KVCache:
    """Stores new keys/values at each row's own length, in place under a donating ``jit``.

    Args:
      cache: the cache.
      k_new: ``[B, t, K, H]`` new keys (rope applied).
      v_new: ``[B, t, K, V]`` new values.
      valid_lengths: ``[B]`` integer real tokens among the t (right padding), default t.

    Returns:
      The cache with ``lengths + valid_lengths`` (saturated at L) tokens per row.
      Under ``jit``: ``valid_lengths`` is clipped to ``[0, t]`` (counted in
      ``clipped``) and tokens at positions ``>= L`` are dropped (counted in
      ``dropped``); eager calls raise instead.

    Raises:
      ValueError: shapes that do not fit the cache; eagerly, an overflow or a
        ``valid_lengths`` outside ``[0, t]``.
      TypeError: float ``valid_lengths``; new keys or values that are not floats.
    """
    B, t = k_new.shape[:2]
    K = cache.num_kv_heads
    expected = ((B, t, K, *cache.k.shape[3:]), (B, t, K, *cache.v.shape[3:]))
    if (k_new.shape, v_new.shape) != expected or B != cache.batch_size:
        raise ValueError(
            f"new keys {k_new.shape} / values {v_new.shape} do not fit the cache "
            f"k {cache.k.shape} / v {cache.v.shape}: expected {expected[0]} / {expected[1]}"
        )
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array; got dtype {x.dtype}")
    given = resolve_valid_lengths(valid_lengths, B, t)
    valid = jnp.clip(given, 0, t)
    check_capacity(cache, valid)
    L = cache.max_length
    pos = positions(cache, t)  # [B, t]
    pos = jnp.where(jnp.arange(t)[None, :] < valid[:, None], pos, L)  # padding -> dropped

    def put(buf: Array, x: Array) -> Array:
        return put_slots(buf, pos, x)

    lengths = jnp.minimum(cache.lengths + valid, L).astype(jnp.int32)
    book = dict(
        lengths=lengths,
        dropped=cache.dropped + (cache.lengths + valid - lengths).astype(jnp.int32),
        clipped=cache.clipped + (given != valid).astype(jnp.int32),
    )
    if not cache.quantized:
        return cache.replace(k=put(cache.k, k_new), v=put(cache.v, v_new), **book)
    kq, ks = quantize_int8(k_new)  # [B, t, K, H], [B, t, K]
    vq, vs = quantize_int8(v_new)
    return cache.replace(
        k=put(cache.k, kq), v=put(cache.v, vq),
        k_scale=put(cache.k_scale, ks), v_scale=put(cache.v_scale, vs), **book,
    )


def read(cache: KVCache, dtype: Any) -> tuple[Array, Array]:
    """All L positions of keys and values, token-major ``[B, L, K, H]``, in ``dtype``.

    Dequantized for int8. A full-size copy, in the layout
    :func:`attention_jax.ops.dot_product_attention` takes: the decode step does
    not use it (it reads blocks in place).
    """
    if not cache.quantized:
        return token_major(cache.k).astype(dtype), token_major(cache.v).astype(dtype)
    return (token_major(dequantize_int8(cache.k, cache.k_scale, dtype)),
            token_major(dequantize_int8(cache.v, cache.v_scale, dtype)))


def select_kv_heads(cache: KVCache, first: Array | int, count: int) -> KVCache:
    """The cache's kv heads ``first .. first + count - 1`` (``first`` may be traced).

    A head-parallel device whose query heads share fewer kv heads than a
    replicated cache holds reads only its own (see :mod:`attention_jax.sharding`).
    """
    def take(x: Array | None) -> Array | None:
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, first, count,
                                                                     axis=HEAD_AXIS)

    return cache.replace(k=take(cache.k), v=take(cache.v), k_scale=take(cache.k_scale),
                         v_scale=take(cache.v_scale))


# The step (store, then attend) lives with the decode kernel; these names stay here too.
_STEP_NAMES = ("cached_attention", "decode_mask", "check_step_inputs", "STEP_MAX_T")


def __getattr__(name: str):
    if name in _STEP_NAMES:
        from attention_jax.kernels import decode_step

        return getattr(decode_step, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
