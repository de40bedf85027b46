"""The "decode" backend (cache read in place) against the einsum reference, and its auto rule.

The reference is ``ops.attention_core`` (einsum contractions per kv head); the
decode backend contracts the flattened ``[B, S, K*H]`` rows against block-diagonal
queries instead, so the two share only the mask and softmax code. ``cache_attention``
reads a head-major ``[B, K, L, H]`` cache (``attention_jax.cache``), checked against the
einsum path over the token-major copy of the same keys.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention, kernels, masks, ops
from attention_jax.kernels import decode, dispatch
from tests.helpers import BF16_GRAD_TOL, BF16_TOL, F32_TOL, HEADS
from tests.helpers import check_against_einsum as _check
from tests.helpers import inputs as _inputs
from tests.helpers import mask_of_kind as _mask
from tests.helpers import via_ops as _via_ops


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("mask_kind", [None, "keypad", "query"])
def test_decode_matches_reference(heads, T, mask_kind):
    N, K = HEADS[heads]
    q, k, v = _inputs(N, K, T=T)
    _check(decode.decode_core, q, k, v, _mask(mask_kind, N, T=T), is_causal=T > 1)


def test_decode_with_bias_offset_causal_mask_and_no_jit():
    """A per-row causal mask with offsets (as the KV cache builds it) and a bias, eagerly;
    the second row's first query also sees no key at all (zeros, finite gradients)."""
    N, K = HEADS["gqa"]
    T, S = 2, 13
    q, k, v = _inputs(N, K, T=T, S=S)
    mask = masks.causal_mask(T, S, offset=jnp.array([4, 9]))  # [B, 1, T, S]
    mask = mask & jnp.asarray([[[[True], [True]]], [[[False], [True]]]])
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, N, T, S)), jnp.float32)
    _check(_via_ops("decode"), q, k, v, mask, bias, is_causal=False, jit=False)


@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_decode_bf16_matches_reference(heads):
    N, K = HEADS[heads]
    q, k, v = _inputs(N, K, T=1, dtype=jnp.bfloat16)
    _check(decode.decode_core, q, k, v, _mask("keypad", N, T=1), is_causal=False,
           tol=BF16_TOL, grad_tol=BF16_GRAD_TOL)


def test_flat_contractions_equal_the_einsum_ones():
    """Each swapped contraction alone: logits [B, K, G, T, S] and combine [B, T, N, V]."""
    N, K = 6, 2
    q, k, v = _inputs(N, K, T=2)
    np.testing.assert_allclose(decode.flat_logits(q, k, scale=0.3),
                               ops.attention_logits(q, k, scale=0.3), **F32_TOL)
    w = jax.nn.softmax(ops.attention_logits(q, k), axis=-1)
    np.testing.assert_allclose(decode.flat_combine(w, v, jnp.float32),
                               ops.combine_values(w, v, jnp.float32), **F32_TOL)


def test_auto_takes_decode_for_few_queries_on_a_long_cache_on_cpu():
    def shaped(t, s, n=16, k=4):
        kv = jax.ShapeDtypeStruct((1, s, k, 64), jnp.float32)
        return jax.ShapeDtypeStruct((1, t, n, 64), jnp.float32), kv, kv

    choose = kernels.choose_implementation
    assert choose(*shaped(1, 128), platform="cpu") == "decode"  # T*N = 16: any S
    assert choose(*shaped(1, 32768), platform="cpu") == "decode"
    assert choose(*shaped(4, 1024), platform="cpu") == "xla"  # T*N = 64: short cache
    assert choose(*shaped(4, dispatch.AUTO_DECODE_MIN_S), platform="cpu") == "decode"
    assert choose(*shaped(16, 8192), platform="cpu") == "blockwise"  # T*N = 256
    assert choose(*shaped(1, 1 << 21), platform="cpu") == "blockwise"  # scores too large
    assert choose(*shaped(1, 32768), platform="gpu") != "decode"  # CPU only


def test_module_decode_uses_the_same_numbers_with_either_backend():
    """KV-cache decoding through auto (-> decode) equals the einsum backend."""
    outs = []
    for impl in ("decode", "xla"):
        m = MultiHeadAttention(32, 8, num_kv_heads=2, implementation=impl, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (2, 6, 32))
        cache = m.init_cache(2, 8)
        y0, cache = m.decode(x[:, :5], cache, valid_lengths=jnp.array([5, 3]))
        y1, cache = m.decode(x[:, 5:], cache)
        outs.append((y0, y1))
    np.testing.assert_allclose(outs[0][0], outs[1][0], **F32_TOL)
    np.testing.assert_allclose(outs[0][1], outs[1][1], **F32_TOL)
    assert "decode" in ops.available_implementations()


# --------------------------------------------------------------------------- cache_attention


def _cache_inputs(N, K, t, L, dtype=jnp.float32, seed=0):
    """q ``[2, t, N, 16]``, token-major k ``[2, L, K, 16]`` and v ``[2, L, K, 8]``."""
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((2, t, N, 16)), jnp.float32)
    k = jnp.asarray(r.standard_normal((2, L, K, 16)), jnp.float32)
    v = jnp.asarray(r.standard_normal((2, L, K, 8)), jnp.float32)
    return q, k, v


def _head_major(x):
    """``[B, L, K, ...]`` as the cache stores it, ``[B, K, L, ...]``."""
    return jnp.swapaxes(x, 1, 2)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize(("block", "splits", "contraction"),
                         [(7, 1, None), (7, 3, "grouped"), (16, 2, None), (50, 1, "grouped")])
def test_cache_attention_matches_reference(heads, block, splits, contraction):
    """Blocks that do not divide L (clamped last block), several chunks, ragged rows with
    padded queries; against the einsum path over all L positions with cache.decode_mask."""
    from attention_jax import cache as kv

    N, K = HEADS[heads]
    t, L = 3, 50
    q, k, v = _cache_inputs(N, K, t, L)
    lengths, valid = jnp.array([4, 44]), jnp.array([3, 2])
    expected = ops.dot_product_attention(q, k, v, kv.decode_mask(lengths, t, L, valid),
                                         implementation="xla")
    out = decode.cache_attention(q, _head_major(k), _head_major(v), lengths, valid,
                                 block=block, splits=splits, contraction=contraction)
    np.testing.assert_allclose(out, expected, **F32_TOL)


@pytest.mark.parametrize("contraction", [None, "grouped"])
def test_cache_attention_int8_window_and_an_empty_row(contraction):
    """int8 blocks dequantized in the loop equal the dequantized cache; a window mask (the loop
    starts at its first open block); a row whose queries see nothing gives zeros."""
    from attention_jax import cache as kv

    N, K, t, L = 4, 2, 2, 40
    q, k, v = _cache_inputs(N, K, t, L, seed=1)
    (kq, ks), (vq, vs) = kv.quantize_int8(k), kv.quantize_int8(v)
    lengths, valid = jnp.array([30, 20]), jnp.array([2, 2])
    window = masks.sliding_window_mask(t, L, window=5, offset=lengths)  # [B, 1, t, L]
    window = window & jnp.array([True, False])[:, None, None, None]  # row 1 sees nothing
    mask = masks.combine_masks(kv.decode_mask(lengths, t, L, valid), window)
    expected = ops.dot_product_attention(q, kv.dequantize_int8(kq, ks), kv.dequantize_int8(vq, vs),
                                         mask, implementation="xla")
    kq, ks, vq, vs = (_head_major(x) for x in (kq, ks, vq, vs))  # scales [B, K, L]
    out = decode.cache_attention(q, kq, vq, lengths, valid, k_scale=ks, v_scale=vs,
                                 mask=window, block=8, splits=2, contraction=contraction)
    np.testing.assert_allclose(out, expected, **F32_TOL)
    np.testing.assert_array_equal(out[1], 0.0)


def _record_block_tokens(monkeypatch) -> list[int]:
    """A list that fills, from inside the taken branch of ``cache_attention``, with the
    tokens of each block its loop reads (``decode.head_logits`` patched to report them)."""
    seen = []
    logits = decode.head_logits

    def recording(qf, kb):
        jax.debug.callback(lambda n: seen.append(int(n)), kb.shape[2])
        return logits(qf, kb)

    monkeypatch.setattr(decode, "head_logits", recording)
    return seen


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize(("lengths", "window", "walked"), [
    ((3, 20), None, 8),  # longest row ends at 22 <= 64 / 2: the short blocks
    ((3, 40), None, 64),  # ends at 42: the default block
    ((40, 50), 10, 8),  # a window: from its first open slot (about 30) to 51
])
def test_cache_attention_reads_few_tokens_in_short_blocks(heads, lengths, window, walked,
                                                          monkeypatch):
    """A default block of 64 tokens over L = 64 (partial_block 8): the span to read decides
    which loop runs (recorded from inside the taken branch), and both give the reference."""
    from attention_jax import cache as kv

    monkeypatch.setattr(decode, "PARTIAL_BLOCK", 8)
    monkeypatch.setattr(decode, "MIN_BLOCK", 4)
    N, K = HEADS[heads]
    t, L = 2, 64
    assert decode.block_tokens(2, L, 4 * K * 24) == L and decode.partial_block(L, L) == 8
    q, k, v = _cache_inputs(N, K, t, L, seed=2)
    lengths, valid = jnp.array(lengths), jnp.array([2, 1])
    mask = kv.decode_mask(lengths, t, L, valid)
    win = None
    if window is not None:
        win = masks.sliding_window_mask(t, L, window=window, offset=lengths)
        mask = masks.combine_masks(mask, win)
    expected = ops.dot_product_attention(q, k, v, mask, implementation="xla")
    seen = _record_block_tokens(monkeypatch)
    # a new function for each case: jit's cache would reuse another case's trace (the same
    # shapes) and its callback
    out = jax.jit(lambda *a: decode.cache_attention(*a, mask=win))(
        q, _head_major(k), _head_major(v), lengths, valid)
    jax.effects_barrier()
    np.testing.assert_allclose(out, expected, **F32_TOL)
    assert seen and set(seen) == {walked}, seen


@pytest.mark.parametrize(("heads", "t", "L"), [
    ("mha", 1, 64), ("mha", 1, 63), ("mha", 2, 64), ("gqa", 1, 64), ("mqa", 1, 64),
])
@pytest.mark.parametrize(("lengths", "window", "whole"), [
    ((40, 60), None, True),  # longest row ends at 61 > 64 / 2: the whole cache, in place
    ((10, 25), None, False),  # ends at 26: the blocks
    ((50, 60), 6, False),  # a window: the span from its first open slot is short
])
def test_cache_attention_reads_a_mostly_full_cache_whole(heads, t, L, lengths, window, whole,
                                                         monkeypatch):
    """Default blocks of a few slots (BLOCK_BYTES patched): while the span to read is over
    half the cache, a float32 cache is contracted whole (recorded from inside the taken
    branch; MHA's one weight row per head folded, decode.VALUE_FOLD, when L is even), with
    ragged rows, a softcap score_mod and sinks; both paths give the reference."""
    from attention_jax import cache as kv
    from attention_jax import scores

    monkeypatch.setattr(decode, "BLOCK_BYTES", 8 * 4 * 4 * 64)
    monkeypatch.setattr(decode, "MIN_BLOCK", 4)
    N, K = HEADS[heads]
    r = np.random.default_rng(3)
    q = jnp.asarray(r.standard_normal((2, t, N, 32)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((2, L, K, 32)), jnp.float32) for _ in range(2))
    block = decode.block_tokens(2, L, 4 * K * 64, target=decode.BLOCK_BYTES)
    assert block < L and decode.whole_cache(k.dtype, N // K * t, 32, 32, L, block)
    lengths, valid = jnp.array(lengths), jnp.array([t, 1])
    sinks = jnp.asarray(r.standard_normal(N), jnp.float32)
    mask = kv.decode_mask(lengths, t, L, valid)
    win = None
    if window is not None:
        win = masks.sliding_window_mask(t, L, window=window, offset=lengths)
        mask = masks.combine_masks(mask, win)
    qpos = lengths[:, None] + jnp.arange(t)
    expected = ops.dot_product_attention(q, k, v, mask, implementation="xla",
                                         score_mod=scores.softcap(5.0), sinks=sinks,
                                         q_positions=qpos, kv_positions=jnp.arange(L))
    seen = _record_block_tokens(monkeypatch)
    out = jax.jit(lambda *a: decode.cache_attention(
        *a, mask=win, score_mod=scores.softcap(5.0), sinks=sinks))(
        q, _head_major(k), _head_major(v), lengths, valid)
    jax.effects_barrier()
    np.testing.assert_allclose(out, expected, **F32_TOL)
    assert seen and (set(seen) == {L}) == whole, seen


def test_value_fold_equals_the_plain_product():
    """head_values folded by 2 and 4 (one weight row per head) equals the plain product;
    with several rows, or a length the fold does not divide, the plain product runs."""
    r = np.random.default_rng(4)
    vb = jnp.asarray(r.standard_normal((2, 3, 12, 5)), jnp.float32)
    for rows in ((1, 1), (2, 1), (1, 3)):
        w = jnp.asarray(r.random((2, 3, *rows, 12)), jnp.float32)
        plain = decode.head_values(w, vb)
        for fold in (2, 4, 5):
            np.testing.assert_allclose(decode.head_values(w, vb, fold), plain, **F32_TOL)


def test_block_and_split_rules():
    assert decode.block_tokens(1, 32768, 1 << 20) == decode.MIN_BLOCK
    assert decode.block_tokens(1, 100, 4) == 100  # capped by the cache
    assert decode.block_tokens(1, 1 << 20, 4) == decode.MAX_BLOCK
    bt = decode.block_tokens(2, 1 << 20, 512)
    assert bt & (bt - 1) == 0 and 2 * bt * 512 <= decode.BLOCK_BYTES < 4 * bt * 512
    # float32 MHA / GQA / MQA at N = 16, H = V = 64: the measured best blocks
    assert [decode.block_tokens(1, 32768, 4 * K * 128) for K in (16, 4, 1)] == [1024, 4096, 8192]
    assert decode.num_splits(4096, 4096, "cpu") == 1
    assert decode.num_splits(32768, 1024, "cpu") == 1  # XLA:CPU spreads each block itself
    assert decode.num_splits(32768, 1024, "gpu") == decode.GPU_SPLITS
    assert decode.num_splits(2048, 1024, "gpu") == 1  # fewer than SPLIT_MIN_BLOCKS blocks


def test_block_contractions_agree_and_a_bad_one_is_named():
    """Token-major flat and grouped blocks, and the head-major ones, give the same numbers."""
    q, k, v = _cache_inputs(8, 4, 1, 24)
    qf = q.reshape(2, 1, 4, 2, 16)
    grouped = decode.block_logits(qf, k)
    np.testing.assert_allclose(decode.block_logits(qf, k, decode.block_diagonal_queries(qf)),
                               grouped, **F32_TOL)
    np.testing.assert_allclose(decode.head_logits(qf, _head_major(k)), grouped, **F32_TOL)
    w = jax.nn.softmax(grouped, axis=-1)
    np.testing.assert_allclose(decode.block_values(w, v, flat=True),
                               decode.block_values(w, v), **F32_TOL)
    np.testing.assert_allclose(decode.head_values(w, _head_major(v)),
                               decode.block_values(w, v), **F32_TOL)
    kh, vh, n, one = _head_major(k), _head_major(v), jnp.array([3, 5]), jnp.ones(2, jnp.int32)
    with pytest.raises(ValueError, match=r"contraction must be .* got 'diagonal'"):
        decode.cache_attention(q, kh, vh, n, one, contraction="diagonal")
    with pytest.raises(ValueError, match=r"'flat' reads a token-major .* head-major"):
        decode.cache_attention(q, kh, vh, n, one, contraction="flat")
    with pytest.raises(ValueError, match=r"cache keys \(2, 24, 4, 16\) .* \[B=2, K, L, H=16\]"):
        decode.cache_attention(q, k, vh, n, one)  # a token-major cache: named, not misread


# One step through the module, jitted with the cache donated, for the HLO checks.
HLO_L = 8192


def _compiled_step(variant, dtype, t, length, monkeypatch):
    monkeypatch.setattr(decode, "BLOCK_BYTES", 1 << 14)  # 16 KB blocks: many per cache
    monkeypatch.setattr(decode, "MIN_BLOCK", 16)
    N, K = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}[variant]
    m = MultiHeadAttention(64, N, num_kv_heads=K, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)

    def step(params, x, c):
        return nnx.merge(graphdef, params).decode(x, c)

    cache = m.init_cache(1, length, dtype)
    compiled = jax.jit(step, donate_argnums=2).lower(params, jnp.ones((1, t, 64)), cache).compile()
    return compiled, cache


@pytest.mark.parametrize(("variant", "dtype", "t"), [
    ("mha", jnp.float32, 1), ("gqa", jnp.float32, 1), ("mqa", jnp.float32, 1),
    ("gqa", jnp.int8, 1), ("gqa", jnp.float32, 4), ("mha", jnp.int8, 4),
])
def test_jitted_donated_step_has_no_cache_sized_copy(variant, dtype, t, monkeypatch):
    """Buffer assignment of a jitted step with the cache donated: every cache buffer is
    aliased in -> out, and no HLO instruction copies, transposes or converts an array of
    a cache field's size (in any shape). The scratch (temp) is a few blocks, the same for
    a cache twice as long; where the whole-cache path is compiled in
    (``decode.whole_cache``), its ``[B, K, G, t, L]`` scratch grows with L, by at most
    a quarter of what the cache grows.

    bf16 caches are not checked on CPU: XLA:CPU has no bf16 dynamic-slice or scatter and
    converts the cache for them (see attention_jax/cache.py, "bf16 caches")."""
    compiled, cache = _compiled_step(variant, dtype, t, HLO_L, monkeypatch)
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes >= cache.nbytes
    longer_compiled, longer_cache = _compiled_step(variant, dtype, t, 2 * HLO_L, monkeypatch)
    longer = longer_compiled.memory_analysis()
    _, K, L, H = cache.k.shape
    G = 4 // K
    block = decode.block_tokens(1, L, 4 * K * 2 * H, target=decode.BLOCK_BYTES)
    if decode.whole_cache(dtype, G * t, H, H, L, block):
        grown = longer.temp_size_in_bytes - mem.temp_size_in_bytes
        assert grown <= (longer_cache.nbytes - cache.nbytes) / 4, (grown, cache.nbytes)
    else:
        assert longer.temp_size_in_bytes <= mem.temp_size_in_bytes + 1024, (
            longer.temp_size_in_bytes, mem.temp_size_in_bytes)
    assert mem.temp_size_in_bytes < cache.nbytes / 2
    field = math.prod(cache.k.shape)
    pattern = re.compile(r"= \w+\[([\d,]*)\]\S* (copy|transpose|convert)\(")
    bad = [line.strip()[:160] for line in compiled.as_text().splitlines()
           if (hit := pattern.search(line))
           and math.prod(int(d) for d in hit.group(1).split(",") if d) >= field]
    assert not bad, bad[:3]
