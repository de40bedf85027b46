"""The decode kernel: few queries against a long KV cache, read in place.

A decoding step has t = 1 (or a few) queries per head and L cache slots.
:func:`cache_attention` walks the filled part of a head-major
:class:`attention_jax.cache.KVCache` (``[B, K, L, H]``, each head's rows
contiguous): blocks of it, or, while most of the cache is to be read, the whole
cache as it lies (:func:`whole_cache`), with an online softmax and split-K
chunks merged by their log-sum-exps. The token-major ``"decode"`` backend of
:func:`attention_jax.ops.dot_product_attention` (:func:`decode_core` and its flat
contractions) is in :mod:`attention_jax.kernels.decode_flat`; its names are
importable from here as before.

>>> import jax.numpy as jnp
>>> q, kv = jnp.ones((2, 1, 8, 16)), jnp.ones((2, 2, 100, 16))   # kv [B, K, L, H]
>>> cache_attention(q, kv, kv, jnp.array([5, 99]), jnp.ones(2, jnp.int32)).shape
(2, 1, 8, 16)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from attention_jax import ops
from attention_jax.kernels import tiles
from attention_jax.kernels.decode_flat import (  # noqa: F401 (names of this module)
    block_diagonal_queries,
    block_logits,
    block_values,
    decode_core,
    flat_combine,
    flat_logits,
)

Array = jax.Array


# ---------------------------------------------------------------------------
# Attention over a KV cache: only the filled blocks, split-K, read in place
# ---------------------------------------------------------------------------

# Bytes of float32 keys + values (all rows, as the block is computed on: an int8
# or bf16 block is converted first) one cache block should hold, and the bounds on
# its tokens. Measured on 2 CPU cores, one query row, N = 16, H = 64, S = 32768,
# head-major cache, ms by block tokens (9 interleaved rounds, load 0.2-1.2):
#   MHA f32   512: 22.5  1024: 17.5  2048: 22.0      (int8: 11.8 / 9.0 / 15.3)
#   GQA K=4  1024: 7.3   2048: 6.4   4096: 6.5  8192: 8.4  (int8 4096: 4.8)
#   MQA      2048: 4.4   4096: 3.3   8192: 3.1       (int8 8192: 2.5)
# (int8 with the value scales on the weights, :func:`cache_attention`: MHA 1024
# 7.7 ms against 9.1 with them on the value block, GQA 3.9 against 4.4; load 1.1)
# i.e. about 16k head rows (8 MB of float32 keys and values at H = V = 64) per block.
BLOCK_BYTES = 8 << 20
MIN_BLOCK, MAX_BLOCK = 128, 8192
# Split-K: the filled blocks are cut into this many contiguous chunks, each with its
# own online softmax (independent work XLA can run concurrently), merged at the end
# by their log-sum-exps. On CPU one chunk: XLA:CPU already spreads each block's
# products over the cores, and two chunks were slower in the sweep above (MHA f32
# at 1024 tokens 22.4 ms against 17.5, GQA 7.8 against 7.3); MQA was within noise
# either way. On GPU (unmeasured here) 4 chunks, so one query row fills more SMs.
SPLIT_MIN_BLOCKS = 4
CPU_SPLITS, GPU_SPLITS = 1, 4
# A cache holding few tokens: when the default block is longer than this, a second
# loop walks blocks of this many tokens while the longest row holds at most one
# default block (a ``lax.cond`` on the lengths), so a 32k-slot GQA / MQA cache holding
# 1k tokens reads about 1k slots, not the 4k / 8k of one default block. Measured as
# above (attention alone, 32768 slots holding 1022 tokens): GQA 0.95 ms with the
# 4096-token block, 0.31 with 1024; MQA 0.89 with 8192, 0.20 with 1024 (load 0.9).
PARTIAL_BLOCK = 1024
# Tokens read as one row by :func:`head_values` when each kv head has one weight row
# (MHA decoding): 2 (measured, w @ v over a 32k MHA cache, 2 cores, 10 interleaved
# rounds: plain 13.6 ms, folded by 2 7.5, by 4 9.9, by 8 12.3, by 16 20.3). 1: plain.
VALUE_FOLD = 2


def block_tokens(batch: int, max_length: int, bytes_per_token: int,
                 target: int = BLOCK_BYTES) -> int:
    """Tokens per cache block: about ``target`` bytes of keys and values, a power of 2.

    ``bytes_per_token``: of one row's float32 keys and values, ``4 K (H + V)``.
    Clipped to ``[MIN_BLOCK, MAX_BLOCK]`` and to ``max_length``.

    >>> block_tokens(1, 32768, 8192), block_tokens(1, 32768, 2048), block_tokens(4, 100, 512)
    (1024, 4096, 100)
    """
    target = max(1, target // max(1, batch * bytes_per_token))
    tokens = 1 << max(0, target.bit_length() - 1)  # power of 2 at most target
    return int(min(max_length, max(MIN_BLOCK, min(MAX_BLOCK, tokens))))


def num_splits(max_length: int, block: int, platform: str | None = None) -> int:
    """Chunks for split-K: ``CPU_SPLITS`` (1) on CPU, ``GPU_SPLITS`` elsewhere, once
    the cache holds ``SPLIT_MIN_BLOCKS`` blocks, else 1 (see ``SPLIT_MIN_BLOCKS``).

    >>> num_splits(32768, 1024, "cpu"), num_splits(32768, 1024, "gpu")
    (1, 4)
    >>> num_splits(2048, 1024, "gpu")
    1
    """
    platform = platform or jax.default_backend()
    blocks = -(-max_length // block)
    if blocks < SPLIT_MIN_BLOCKS:
        return 1
    return CPU_SPLITS if platform == "cpu" else GPU_SPLITS


def partial_block(block: int, max_length: int) -> int | None:
    """The short block of the few-tokens loop, or None when ``block`` is short already.

    :func:`cache_attention` (default block) walks ``partial_block`` tokens at a
    time while the span it reads, from the first position the mask opens to the
    longest row's end, is at most half a default block.

    >>> partial_block(8192, 32768), partial_block(1024, 32768), partial_block(2048, 2048)
    (1024, None, 1024)
    """
    small = max(MIN_BLOCK, min(PARTIAL_BLOCK, max_length))
    return small if 2 * small <= block else None


def whole_cache(dtype, rows: int, H: int, V: int, max_length: int, block: int,
                platform: str | None = None) -> bool:
    """Whether :func:`cache_attention` may read the whole cache in one piece.

    A block sliced out of the cache is a copy on XLA:CPU (its dots cannot read a
    dynamic slice in place): each block is read, written and read again. Contracting
    the whole cache as it lies reads it once, so while the span to read is over half
    the cache (the branch is taken at run time) one pass over all ``max_length``
    slots costs less than the blocks. Statically allowed on CPU, for a float32 cache
    (an int8 or bf16 one would be converted whole first), when the cache spans more
    than one default ``block``, and while the path's scratch, about four
    ``[B, K, G, t, L]`` float32 arrays (logits, weights and their folded copy), stays
    within a quarter of the cache's bytes: ``16 rows <= H + V`` with ``rows = G * t``
    (MHA and GQA up to G = 8 decoding one token at H = V = 64; not MQA at N = 16).
    Not measured on a GPU, so not taken there.

    >>> whole_cache(jnp.float32, 1, 64, 64, 32768, 1024, "cpu")
    True
    >>> whole_cache(jnp.int8, 1, 64, 64, 32768, 1024, "cpu")
    False
    >>> whole_cache(jnp.float32, 16, 64, 64, 32768, 8192, "cpu")  # MQA, N = 16
    False
    """
    platform = platform or jax.default_backend()
    return (platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and max_length > block
            and 16 * rows <= H + V)


def _read_block(x: Array, start: Array, block: int) -> Array:
    """``x[:, :, start:start + block]`` (the slots of a cache field) as float32.

    Converted on the block only.

    XLA:CPU has no bf16 / f16 dynamic-slice: its float normalization converts the
    operand, the whole cache, to float32, and the loop-invariant conversion is then
    hoisted out of the loop (a cache-sized copy per step). Inside a ``lax.cond``
    the conversion stays fused with the slice. (Slicing the bits instead, a
    ``uint16`` view, was slower: XLA:CPU copies the whole cache around the
    ``bitcast_convert_type``: 94 ms per 32k MHA step against 67.)
    """
    def take(x):
        return lax.dynamic_slice_in_dim(x, start, block, axis=2).astype(jnp.float32)

    if x.dtype.itemsize != 2 or jax.default_backend() != "cpu":
        return take(x)
    shape = (*x.shape[:2], block, *x.shape[3:])
    return lax.cond(start >= 0, take, lambda x: jnp.zeros(shape, jnp.float32), x)


def head_logits(qf: Array, kb: Array) -> Array:
    """Logits of one head-major cache block, ``[B, K, G, t, S]`` float32.

    Args:
      qf: ``[B, t, K, G, H]`` queries; kb: ``[B, K, S, H]`` keys (each head's rows
        contiguous: a matrix-vector product per head, no transpose).
    """
    return jnp.einsum("BTKGH,BKSH->BKGTS", qf, kb, preferred_element_type=jnp.float32)


def head_values(w: Array, vb: Array, fold: int = 1) -> Array:
    """Weighted values of one head-major cache block, ``[B, K, G, t, V]`` float32.

    Args:
      w: ``[B, K, G, t, S]`` weights; vb: ``[B, K, S, V]`` values.
      fold: tokens read as one row when ``G * t == 1`` (below); 1: the plain product.

    With one weight row per kv head (``G * t == 1``, MHA decoding) the product is a
    vector-matrix one, ``w[S] @ vb[S, V]``, which XLA:CPU emits as a slow
    column-major matrix-vector loop (7.9 GB/s over a 32k MHA cache here, against 22
    for a plain reduction). It is computed folded instead (:data:`VALUE_FOLD`): the
    rows ``vb[c i + a]`` of ``c`` consecutive tokens are read as one row
    ``vb'[i] = [vb[c i], ..., vb[c i + c - 1]]`` (a free reshape), the weights as
    ``c`` rows ``w'[a, i] = w[c i + a]``, and the matmul ``w' @ vb'`` (``[c, S/c] @
    [S/c, c V]``, a matrix product XLA hands to its dot library) holds the result in
    its ``c`` diagonal blocks: ``out = sum_a (w' @ vb')[a, a V:(a + 1) V]``.
    :func:`cache_attention` folds by :data:`VALUE_FOLD` on its whole-cache path; on
    1024-token blocks the folded product was slower than the plain one (54.6 against
    33.8 ms per 32k MHA step).
    """
    B, K, G, t, S = w.shape
    c = fold
    if G * t == 1 and c > 1 and S % c == 0:
        V = vb.shape[-1]
        wf = w.reshape(B, K, S // c, c).swapaxes(-1, -2)  # [B, K, c, S/c]: w'[a, i] = w[c i + a]
        full = jnp.einsum("BKAS,BKSX->BKAX", wf, vb.reshape(B, K, S // c, c * V),
                          preferred_element_type=jnp.float32).reshape(B, K, c, c, V)
        return jnp.einsum("BKaaV->BKV", full).reshape(B, K, 1, 1, V)
    return jnp.einsum("BKGTS,BKSV->BKGTV", w, vb, preferred_element_type=jnp.float32)


def _merge(a: tuple[Array, Array, Array], b: tuple[Array, Array, Array]):
    """Merges two online-softmax states ``(m, l, acc)`` by their running maxima."""
    (ma, la, acca), (mb, lb, accb) = a, b
    m = jnp.maximum(ma, mb)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    ca, cb = jnp.exp(ma - m_safe), jnp.exp(mb - m_safe)  # 0 where a side saw nothing
    return m, la * ca + lb * cb, acca * ca[..., None] + accb * cb[..., None]


def cache_attention(
    q: Array,
    k: Array,
    v: Array,
    lengths: Array,
    valid_lengths: Array,
    *,
    k_scale: Array | None = None,
    v_scale: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    block: int | None = None,
    splits: int | None = None,
    score_mod: Callable[..., Array] | None = None,
    sinks: Array | None = None,
    starts: Array | None = None,
    head_offset: Array | int = 0,
    contraction: str | None = None,
) -> Array:
    """t new queries per row against a KV cache that already holds them, filled blocks only.

    The cache is read where it lies (head-major ``[B, K, L, H]``, no copy, no
    dequantized or transposed version of it): a ``lax.while_loop`` walks
    ``block``-token blocks from the first block the mask opens to the last one any
    row has filled, ``max_b min(lengths[b] + valid_lengths[b], L)``, so a 32k-slot
    cache holding 1k tokens costs a 1k step (where a default block of 4k or 8k
    tokens would read more than the 1k, a ``lax.cond`` takes a loop of
    :func:`partial_block` tokens instead). Each block is sliced
    (``dynamic_slice``), converted to float32 (int8: its per-token scales multiply
    the block's logits and weights), and contracted per kv head
    (:func:`head_logits`, :func:`head_values`: matrix-vector products over each
    head's contiguous ``[S, H]`` rows); an online softmax (float32) carries the
    running max, sum and output. Split-K: the blocks are cut into ``splits``
    contiguous chunks walked by the same loop side by side (independent work),
    merged by their log-sum-exps at the end. While more than half of the cache is
    to be read, a float32 cache on CPU is one block of all ``L`` slots instead
    (:func:`whole_cache`: a sliced block is a copy there, the whole cache is not),
    MHA's value product folded by :data:`VALUE_FOLD`. Which of the three loops
    runs is decided at run time from the lengths (``lax.switch``).

    Ragged rows: every row reads the same block range (the longest row's); a
    shorter row's unfilled positions are masked, not skipped.

    Visible keys: slot ``s`` is visible to query ``i`` of row ``b`` iff
    ``starts[b] <= s <= lengths[b] + i``, ``s < min(lengths[b] + valid_lengths[b], L)``
    and ``mask`` allows it (the mask of :func:`attention_jax.cache.decode_mask`).

    Args:
      q: ``[B, t, N, H]`` queries at positions ``lengths + arange(t)``.
      k: ``[B, K, L, H]`` cache keys (float, or int8 with ``k_scale [B, K, L]``),
        the step's new keys already stored (:class:`attention_jax.cache.KVCache`).
      v: ``[B, K, L, V]`` cache values (float, or int8 with ``v_scale``).
      lengths: ``[B]`` int32 tokens stored *before* the step.
      valid_lengths: ``[B]`` int32 real new tokens, in ``[0, t]``.
      mask: optional boolean ``[B|1, N|1, t|1, L]``.
      scale: default ``1/sqrt(H)``.
      block: tokens per block, default :func:`block_tokens` (and, while the
        span to read is at most half of one such block, :func:`partial_block`).
      splits: split-K chunks, default :func:`num_splits`.
      score_mod: ``fn(score, b, n, t, s) -> score`` on each block's scaled float32
        logits, as in :func:`attention_jax.ops.dot_product_attention`; ``t`` / ``s``
        are token positions (slot minus ``starts``), ``n`` the head plus ``head_offset``.
      sinks: ``[N]`` logits joining every row's softmax denominator (no value),
        added once, at the merge.
      starts: ``[B]`` int32 left-padding slots per row (never visible), default 0.
      head_offset: the global index of the first local head (head-parallel callers).
      contraction: None or ``"grouped"`` (per-kv-head products, the only form a
        head-major cache needs). ``"flat"`` (for the token-major cache the kernel
        read before) raises.

    Returns:
      ``[B, t, N, V]`` in q's dtype; a query that sees no key (and no sink) gives zeros.

    >>> import jax.numpy as jnp
    >>> q, kv = jnp.ones((2, 1, 8, 16)), jnp.ones((2, 2, 100, 16))   # kv [B, K, L, H]
    >>> n = jnp.array([5, 99]); cache_attention(q, kv, kv, n, jnp.ones(2, jnp.int32)).shape
    (2, 1, 8, 16)
    """
    B, t, N, H = q.shape
    K, L, V = k.shape[1], k.shape[2], v.shape[-1]
    G = N // K
    quantized = k_scale is not None
    if contraction == "flat":
        raise ValueError("contraction='flat' reads a token-major [B, L, K, H] cache; the "
                         "cache is head-major [B, K, L, H] (attention_jax.cache), whose "
                         "per-head products need no flat form: pass None or 'grouped'")
    if contraction not in (None, "grouped"):
        raise ValueError(f"contraction must be None or 'grouped'; got {contraction!r}")
    if k.ndim != 4 or v.shape[:3] != k.shape[:3] or k.shape[-1] != H or N % K:
        raise ValueError(f"cache keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit "
                         f"q {tuple(q.shape)}: expected [B={B}, K, L, H={H}] / [B, K, L, V] "
                         "with num_heads divisible by K (head-major, attention_jax.cache)")
    auto_block = block is None
    if auto_block:  # float32 bytes: every block is computed on in float32
        block = block_tokens(B, L, 4 * K * (H + V), target=BLOCK_BYTES)
    block = int(min(block, L))
    if splits is None:
        splits = num_splits(L, block)
    P = int(splits)
    scale = ops.default_scale(H) if scale is None else scale
    qf = (q.astype(jnp.float32) * jnp.float32(scale)).reshape(B, t, K, G, H)

    lengths = lengths.astype(jnp.int32)
    starts = jnp.zeros_like(lengths) if starts is None else jnp.asarray(starts, jnp.int32)
    stored = jnp.minimum(lengths + valid_lengths.astype(jnp.int32), L)  # [B]
    hi = jnp.max(stored)  # positions to read
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)).astype(bool)
        mask = jnp.broadcast_to(mask, (*mask.shape[:3], L))
        mask = ops.group_heads(mask, (B, N, t, L), K)  # [B|1, K|1, G|1, t|1, L]
        opened = jnp.any(mask, axis=(0, 1, 2, 3))  # [L]
        first = jnp.where(jnp.any(opened), jnp.argmax(opened), hi).astype(jnp.int32)
        first = jnp.minimum(first, hi)  # first position the mask opens
    else:
        first = jnp.int32(0)
    qpos = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, t] slots
    if score_mod is not None:  # index arrays broadcasting to [B, K, G, t, S]
        b_idx = jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1, 1)
        n_idx = (head_offset + jnp.arange(N, dtype=jnp.int32)).reshape(1, K, G, 1, 1)
        t_idx = (qpos - starts[:, None])[:, None, None, :, None]

    def walk(block: int, P: int, fold: int = 1):
        """``(m, l, acc)`` over ``block``-token blocks in ``P`` chunks, merged
        (``fold``: :func:`head_values`')."""
        lo = (first // block) * block
        n_blocks = (hi - lo + block - 1) // block
        n_iter = (n_blocks + P - 1) // P  # each chunk walks this many blocks
        def block_state(i, p):
            start = lo + (p * n_iter + i) * block  # wanted first position
            real = jnp.minimum(start, L - block)  # dynamic_slice clamps; use the real one
            pos = real + jnp.arange(block, dtype=jnp.int32)  # [S]
            kb, vb = (_read_block(x, real, block) for x in (k, v))  # [B, K, S, H|V] f32
            s = head_logits(qf, kb)  # [B, K, G, t, S]
            if quantized:
                ks = _read_block(k_scale, real, block)  # [B, K, S]
                s = s * ks[:, :, None, None, :]  # [B, K, 1, 1, S]
            if score_mod is not None:
                s_idx = (pos[None, :] - starts[:, None])[:, None, None, None, :]  # [B, 1, 1, 1, S]
                s = jnp.broadcast_to(score_mod(s, b_idx, n_idx, t_idx, s_idx),
                                     s.shape).astype(jnp.float32)
            seen = ((pos[None, None, :] <= qpos[:, :, None])  # causal  [B, t, S]
                    & (pos[None, None, :] >= starts[:, None, None])  # not left padding
                    & (pos[None, None, :] < stored[:, None, None])  # stored
                    & (pos >= start)[None, None, :]  # not in the chunk's previous block
                    & (pos < lo + (p + 1) * n_iter * block)[None, None, :])  # nor the next chunk's
            seen = seen[:, None, None]  # [B, 1, 1, t, S]
            if mask is not None:
                seen = seen & lax.dynamic_slice_in_dim(mask, real, block, axis=-1)
            s = jnp.where(seen, s, -jnp.inf)
            vs = _read_block(v_scale, real, block)[:, :, None, None, :] if quantized else None
            return s, seen, vb, vs  # vs: int8 value scales [B, K, 1, 1, S], for the weights

        def body(i, states):
            out = []
            for p, (m, l, acc) in enumerate(states):
                s, seen, vb, vs = block_state(i, p)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [B, K, G, t]
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                w = jnp.where(seen, jnp.exp(s - m_safe[..., None]), 0.0)
                c = jnp.exp(m - m_safe)
                # int8: sum_s w[s] (v[s] vs[s]) = sum_s (w[s] vs[s]) v[s], the scales on the
                # [.., t, S] weights, not on the [.., S, V] block
                pv = head_values(w if vs is None else w * vs, vb, fold)
                out.append((m_new, l * c + w.sum(-1), acc * c[..., None] + pv))
            return tuple(out)

        shape = (B, K, G, t)
        refs = (qf, k, v, k_scale, v_scale, lengths, valid_lengths, mask, starts, sinks)
        init = tuple(tuple(tiles.varying_like(x, *refs) for x in (
            jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, V), jnp.float32))) for _ in range(P))
        return functools.reduce(_merge, lax.fori_loop(0, n_iter, body, init))

    small = partial_block(block, L) if auto_block else None
    whole = auto_block and whole_cache(k.dtype, G * t, H, V, L, block)
    branches = [lambda: walk(block, P)]
    span = hi - first
    choice = jnp.int32(0)
    if small is not None:  # few tokens to read: short blocks, one chunk (see PARTIAL_BLOCK)
        branches.append(lambda: walk(small, 1))
        choice = jnp.where(span <= block // 2, len(branches) - 1, choice)
    if whole:  # most of the cache to read: all of it, in place (see whole_cache)
        branches.append(lambda: walk(L, 1, fold=VALUE_FOLD))
        choice = jnp.where(2 * span > L, len(branches) - 1, choice)
    if len(branches) == 1:
        m, l, acc = branches[0]()
    else:
        m, l, acc = lax.switch(choice, branches)
    if sinks is not None:  # one more logit per head in the denominator, carrying no value
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, K, G, 1), m.shape)
        m, l, acc = _merge((m, l, acc), (sink, jnp.ones_like(l), jnp.zeros_like(acc)))
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # [B, K, G, t, V]; unseen rows: 0
    return out.transpose(0, 3, 1, 2, 4).reshape(B, t, N, V).astype(q.dtype)
