"""KV-cache decoding: equal to the full causal forward pass, ragged prompts, overflow, int8.

The expected values are the module's full forward pass with ``is_causal=True``
(itself checked against NumPy in test_modules.py); decoding shares only the
projections with it, not the cache, the positions or the masks under test.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import cache as kv
from tests.helpers import BF16_CACHE_TOL, INT8_CACHE_TOL, jitted

ATOL_F32 = RTOL_F32 = 1e-5
ATOL_INT8, ATOL_BF16_CACHE = INT8_CACHE_TOL, BF16_CACHE_TOL  # relative to max|y|

VARIANTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
ROPE = {"norope": None, "rope": 10_000.0}
# Shared shapes (so eager runs reuse compiled ops): batch, cache length, width.
B, L, D = 3, 8, 16


def _module(variant, rope, **kwargs):
    N, K = VARIANTS[variant]
    return aj.MultiHeadAttention(
        D, N, num_kv_heads=K, rope=rope, bias_init=nnx.initializers.normal(0.5),
        rngs=nnx.Rngs(0), **kwargs,
    )


def _decode_fn(jit: bool):
    def step(m, x, c, valid=None):
        return m.decode(x, c, valid_lengths=valid)

    return nnx.jit(step, donate_argnums=2) if jit else step


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("rope", ROPE)
@pytest.mark.parametrize("variant", VARIANTS)
def test_token_by_token_equals_full_forward(variant, rope, jit):
    m = _module(variant, ROPE[rope])
    x = jax.random.normal(jax.random.key(1), (B, 5, D))
    expected = jitted(m)(x, is_causal=True)
    step = _decode_fn(jit)
    cache = m.init_cache(B, L)
    ys = []
    for i in range(x.shape[1]):
        y, cache = step(m, x[:, i:i + 1], cache)
        ys.append(y)
    chex.assert_trees_all_close(jnp.concatenate(ys, 1), expected, atol=ATOL_F32, rtol=RTOL_F32)
    np.testing.assert_array_equal(cache.lengths, [5] * B)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("rope", ROPE)
@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_prefill_then_steps_equals_full_forward(variant, rope, jit):
    """Right-padded prompts of lengths 2, 5, 3; then a 2-token chunk; then a single step."""
    _check_ragged(variant, rope, jit, implementation=None)


# "auto"/"xla"/"decode" decode steps read the old cache and the new tokens apart
# (cache._step_attention); "blockwise" attends to the updated cache (the general path).
@pytest.mark.parametrize("implementation", ["xla", "decode", "blockwise"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_decode_paths_equal_full_forward(variant, implementation):
    _check_ragged(variant, "rope", True, implementation=implementation)


def _check_ragged(variant, rope, jit, *, implementation):
    m = _module(variant, ROPE[rope], implementation=implementation)
    prompt = np.array([2, 5, 3])
    P, n_after = int(prompt.max()), 3
    seqs = jax.random.normal(jax.random.key(2), (B, P + n_after, D))
    expected = jitted(m)(seqs, is_causal=True)  # row b is real on [0, prompt[b] + n_after)
    # The padding is noise that must not leak into the cache.
    noise = 10.0 * jax.random.normal(jax.random.key(3), (B, P, D))
    pad = np.arange(P)[None, :, None] >= prompt[:, None, None]
    x_prefill = jnp.where(pad, noise, seqs[:, :P])

    def tokens(start, t):  # [B, t, D]: row b's tokens start[b] .. start[b] + t - 1
        idx = start[:, None] + np.arange(t)[None, :]
        return seqs[np.arange(B)[:, None], idx], idx

    step = _decode_fn(jit)
    cache = m.init_cache(B, L)
    y, cache = step(m, x_prefill, cache, jnp.asarray(prompt))
    np.testing.assert_array_equal(cache.lengths, prompt)
    for b in range(B):
        chex.assert_trees_all_close(y[b, :prompt[b]], expected[b, :prompt[b]],
                                    atol=ATOL_F32, rtol=RTOL_F32)
    pos = prompt.copy()
    for t in (2, 1):
        x, idx = tokens(pos, t)
        y, cache = step(m, x, cache)
        chex.assert_trees_all_close(y, expected[np.arange(B)[:, None], idx],
                                    atol=ATOL_F32, rtol=RTOL_F32)
        pos += t
    np.testing.assert_array_equal(cache.lengths, prompt + n_after)


def test_padded_tokens_are_not_stored():
    m = _module("gqa", None)
    cache = m.init_cache(B, L)
    valid = np.array([1, 3, 0])
    _, cache = m.decode(jnp.ones((B, 5, D)), cache, valid_lengths=jnp.asarray(valid))
    np.testing.assert_array_equal(cache.lengths, valid)
    stored = np.abs(np.asarray(cache.k)).sum((1, 3)) > 0  # [B, L]
    np.testing.assert_array_equal(stored, np.arange(L)[None, :] < valid[:, None])


def test_extra_mask_sliding_window_equals_full_forward():
    m = _module("gqa", 100.0)
    x = jax.random.normal(jax.random.key(4), (B, 7, D))
    expected = jitted(m)(x, mask=aj.sliding_window_mask(7, window=3))
    cache = m.init_cache(B, L)
    y1, cache = m.decode(x[:, :5], cache, mask=aj.sliding_window_mask(5, L, window=3))
    ys = [y1]
    for i in range(5, 7):
        w = aj.sliding_window_mask(1, L, window=3, offset=cache.lengths)
        y, cache = m.decode(x[:, i:i + 1], cache, mask=w)
        ys.append(y)
    chex.assert_trees_all_close(jnp.concatenate(ys, 1), expected, atol=ATOL_F32, rtol=RTOL_F32)


def test_cache_is_a_typed_pytree_sized_by_kv_heads():
    m = aj.MultiHeadAttention(D, 8, num_kv_heads=2, head_dim=6, v_head_dim=3, rngs=nnx.Rngs(0))
    c = m.init_cache(3, 5)
    assert isinstance(c, kv.KVCache)
    assert (c.k.shape, c.v.shape, c.lengths.shape) == ((3, 2, 5, 6), (3, 2, 5, 3), (3,))
    assert c.lengths.dtype == jnp.int32 and c.k.dtype == jnp.float32 and not c.quantized
    leaves, tree = jax.tree_util.tree_flatten(c)
    assert len(leaves) == 6  # k, v, lengths, dropped, clipped, starts
    np.testing.assert_array_equal(c.dropped, [0, 0, 0])
    np.testing.assert_array_equal(c.starts, [0, 0, 0])
    assert kv.KVCache(c.k, c.v, c.lengths).clipped.shape == (3,)  # old constructor still works
    c2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(c2, kv.KVCache)
    assert c.bytes_per_token == m.kv_bytes_per_token() == 2 * (6 + 3) * 4
    assert m.init_cache(1, 1, jnp.bfloat16).k.dtype == jnp.bfloat16


def test_overflow_raises_eagerly_with_the_numbers():
    m = _module("mqa", None)
    cache = m.init_cache(2, 4)
    _, cache = m.decode(jnp.ones((2, 3, D)), cache, valid_lengths=jnp.array([3, 1]))
    with pytest.raises(ValueError, match=r"row 0 holds 3 tokens and 2 more.*max_length is 4"):
        m.decode(jnp.ones((2, 2, D)), cache)
    with pytest.raises(ValueError, match=r"need 5 positions, but max_length is 4"):
        m.decode(jnp.ones((2, 5, D)), m.init_cache(2, 4))
    # Padding beyond the capacity is fine: only real tokens count.
    _, c = m.decode(jnp.ones((2, 2, D)), cache, valid_lengths=jnp.array([1, 2]))
    np.testing.assert_array_equal(c.lengths, [4, 3])
    with pytest.raises(ValueError, match=r"valid_lengths\[1\] = 3 is outside \[0, 2\]"):
        m.decode(jnp.ones((2, 2, D)), cache, valid_lengths=jnp.array([0, 3]))


def test_overflow_under_jit_drops_writes_and_saturates():
    """Documented: inside jit, tokens at positions >= L are dropped (and counted), lengths stop
    at L, and ``cache.check()`` raises on the result."""
    m = _module("gqa", 10_000.0)
    x = jax.random.normal(jax.random.key(5), (1, 6, D))
    step = _decode_fn(jit=True)
    _, big = m.decode(x, m.init_cache(1, 8))  # reference: room for everything
    big_k = np.asarray(big.k)
    _, c = step(m, x[:, :3], m.init_cache(1, 4))
    _, c = step(m, x[:, 3:6], c)  # 3 more tokens: only one fits
    np.testing.assert_array_equal(c.lengths, [4])
    np.testing.assert_array_equal(c.dropped, [2])
    with pytest.raises(ValueError, match=r"row 0 dropped 2 tokens \(max_length is 4"):
        c.check()
    chex.assert_trees_all_close(c.k[:, :, :4], big_k[:, :, :4], atol=ATOL_F32, rtol=RTOL_F32)
    _, c = step(m, x[:, 5:6], c)  # a full cache stays as is
    np.testing.assert_array_equal(c.lengths, [4])
    np.testing.assert_array_equal(c.dropped, [3])
    chex.assert_trees_all_close(c.k[:, :, :4], big_k[:, :, :4], atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8], ids=["f32", "int8"])
def test_donated_cache_is_consumed_under_jit(dtype):
    m = _module("mha", None)
    step = _decode_fn(jit=True)
    c0 = m.init_cache(B, L, dtype)
    _, c1 = step(m, jnp.ones((B, 1, D)), c0)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(c0))
    np.testing.assert_array_equal(c1.lengths, [1] * B)


# --------------------------------------------------------------------------- int8


def test_quantize_int8_error_is_half_a_step():
    x = 3.0 * jax.random.normal(jax.random.key(6), (4, 5, 2, 64))
    q, s = kv.quantize_int8(x)
    assert q.dtype == jnp.int8 and s.shape == (4, 5, 2) and s.dtype == jnp.float32
    xn = np.asarray(x, np.float64)
    step = np.abs(xn).max(-1) / 127  # exact scale, numpy
    err = np.abs(np.asarray(kv.dequantize_int8(q, s), np.float64) - xn)
    assert np.all(err <= step[..., None] * (0.5 + 1e-5) + 1e-7)  # half a step (f32 rounding)
    assert np.all(np.asarray(q) == 0) == np.all(xn == 0)
    z, zs = kv.quantize_int8(jnp.zeros((2, 8)))
    np.testing.assert_array_equal(kv.dequantize_int8(z, zs), np.zeros((2, 8)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_cache_error_bounded_against_float_caches(variant):
    m = _module(variant, 10_000.0)
    x = jax.random.normal(jax.random.key(7), (B, 7, D))
    step = _decode_fn(jit=True)
    out = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16), ("int8", jnp.int8)):
        cache = m.init_cache(B, L, dtype)
        y0, cache = step(m, x[:, :5], cache)  # prefill, then two steps
        y1, cache = step(m, x[:, 5:6], cache)
        y2, cache = step(m, x[:, 6:7], cache)
        out[name] = np.asarray(jnp.concatenate([y0, y1, y2], 1))
    scale = np.abs(out["f32"]).max()
    err_int8 = np.abs(out["int8"] - out["f32"]).max()
    err_bf16 = np.abs(out["bf16"] - out["f32"]).max()
    assert err_int8 <= ATOL_INT8 * scale, (err_int8, scale)
    assert err_bf16 <= ATOL_BF16_CACHE * scale, (err_bf16, scale)
    assert np.abs(out["int8"] - out["bf16"]).max() <= (ATOL_INT8 + ATOL_BF16_CACHE) * scale
    assert err_int8 > 0  # really quantized


def test_int8_bytes_per_token_half_of_bf16():
    """H = V = 64, K = 2: int8 2*64*2 + scales 2*2*4 bytes = 272 against bf16 512."""
    m = aj.MultiHeadAttention(512, 8, num_kv_heads=2, rngs=nnx.Rngs(0))
    c8, c16 = m.init_cache(1, 4, jnp.int8), m.init_cache(1, 4, jnp.bfloat16)
    assert c8.quantized and c8.k_scale.shape == (1, 2, 4)  # [B, K, L]
    assert c16.bytes_per_token == m.kv_bytes_per_token(jnp.bfloat16) == 2 * 2 * 64 * 2
    assert c8.bytes_per_token == 2 * 2 * 64 + 2 * 2 * 4
    assert c8.bytes_per_token / c16.bytes_per_token <= 0.54
    # nbytes counts every array the cache holds, lengths included
    assert c8.nbytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(c8))
    assert c8.nbytes == 4 * c8.bytes_per_token + 4 * 4  # lengths, dropped, clipped, starts


def test_decode_shape_errors():
    m = _module("gqa", None)
    with pytest.raises(ValueError, match=r"do not fit the module: expected \[B, K=2, L, H=4\]"):
        m.decode(jnp.ones((B, 1, D)), kv.init_cache(B, L, num_kv_heads=4, head_dim=4))
    with pytest.raises(ValueError, match="x has batch 2 but the cache has 3"):
        m.decode(jnp.ones((2, 1, D)), m.init_cache(B, L))
    with pytest.raises(ValueError, match=r"do not fit the cache"):
        kv.update(kv.init_cache(B, L, num_kv_heads=2, head_dim=4),
                  jnp.ones((B, 1, 4, 4)), jnp.ones((B, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"valid_lengths must be \[batch\] = \[3\]"):
        m.decode(jnp.ones((B, 2, D)), m.init_cache(B, L), valid_lengths=jnp.array([1, 2]))
    cross = aj.MultiHeadAttention(D, 4, in_k_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decode is self-attention"):
        cross.decode(jnp.ones((B, 1, D)), cross.init_cache(B, L))


# --------------------------------------------------------------------------- bookkeeping


def test_valid_lengths_outside_range_under_jit_are_clipped_and_counted():
    """valid_lengths [-1, 5] for t = 2 under jit: stored as [0, 2], lengths stay consistent,
    clipped counts the step per row, check() names both rows."""
    m = _module("gqa", None)
    step = _decode_fn(jit=True)
    x = jax.random.normal(jax.random.key(8), (2, 2, D))
    _, c = step(m, x, m.init_cache(2, L), jnp.array([-1, 5]))
    np.testing.assert_array_equal(c.lengths, [0, 2])
    np.testing.assert_array_equal(c.clipped, [1, 1])
    np.testing.assert_array_equal(c.dropped, [0, 0])
    stored = np.abs(np.asarray(c.k)).sum((1, 3)) > 0  # [B, L]
    np.testing.assert_array_equal(stored.sum(1), [0, 2])
    with pytest.raises(ValueError, match=r"row 0 had valid_lengths outside \[0, t\] in 1"):
        c.check()
    _, ok = step(m, x, m.init_cache(2, L), jnp.array([1, 2]))
    assert ok.check() is ok


def test_float_valid_lengths_and_float_or_misshaped_masks_are_refused():
    m = _module("gqa", None)
    c = m.init_cache(B, L)
    x = jnp.ones((B, 2, D))
    with pytest.raises(TypeError, match=r"valid_lengths must be integers.*float32"):
        m.decode(x, c, valid_lengths=jnp.array([1.0, 2.0, 1.5]))
    with pytest.raises(TypeError, match=r"mask must be boolean.*float32"):
        m.decode(x, c, mask=jnp.zeros((B, 1, 2, L)))  # an additive mask
    with pytest.raises(ValueError, match=r"does not broadcast to \[B, N, t, L\] = \[3, 4, 2, 8\]"):
        m.decode(x, c, mask=jnp.ones((B, 1, 2, L + 1), bool))
    # the same checks hold under jit (they are static)
    step = nnx.jit(lambda m, x, c, mask: m.decode(x, c, mask=mask))
    with pytest.raises(TypeError, match=r"mask must be boolean"):
        step(m, x, c, jnp.zeros((B, 1, 2, L)))


def test_checked_mode_raises_inside_jit():
    """kv.checked: the data-dependent checks raise through checkify from a jitted step."""
    from jax.experimental import checkify

    m = _module("mqa", None)
    graphdef, params = nnx.split(m)

    def step(params, x, c, valid):
        return nnx.merge(graphdef, params).decode(x, c, valid_lengths=valid)

    run = kv.checked(step, donate_argnums=2)
    x = jnp.ones((2, 3, D))
    _, c = run(params, x, m.init_cache(2, 4), jnp.array([3, 1]))
    np.testing.assert_array_equal(c.lengths, [3, 1])
    with pytest.raises(checkify.JaxRuntimeError, match="KV cache overflow"):
        run(params, x, c, jnp.array([2, 1]))  # row 0: 3 + 2 > 4
    with pytest.raises(checkify.JaxRuntimeError, match=r"valid_lengths outside \[0, 3\]"):
        run(params, x, m.init_cache(2, 4), jnp.array([4, 0]))


# --------------------------------------------------------------------------- the step kernel


@pytest.fixture
def small_blocks(monkeypatch):
    """Kernel blocks of 4 tokens, two split-K chunks from 2 blocks on (CPU's default is
    one chunk): every step walks several blocks in each of two chunks."""
    from attention_jax.kernels import decode

    monkeypatch.setattr(decode, "BLOCK_BYTES", 1)
    monkeypatch.setattr(decode, "CPU_SPLITS", 2)
    monkeypatch.setattr(decode, "MIN_BLOCK", 4)
    monkeypatch.setattr(decode, "SPLIT_MIN_BLOCKS", 2)
    return decode


LONG = 24  # cache slots for the kernel tests (6 blocks of 4)
CACHES = {"f32": (jnp.float32, ATOL_F32), "bf16": (jnp.bfloat16, ATOL_BF16_CACHE),
          "int8": (jnp.int8, ATOL_INT8)}


@pytest.mark.parametrize(("variant", "cache_dtype"), [
    ("mha", "f32"), ("gqa", "f32"), ("mqa", "f32"), ("gqa", "bf16"), ("gqa", "int8"),
])
def test_kernel_paths_equal_full_forward(small_blocks, variant, cache_dtype):
    """Through the module under jit: a ragged prefill (2, 9, 5 real of 9), a 16-token step,
    a 3-token step and a single step, all against the full causal forward; f32 to 1e-5,
    bf16 / int8 caches relative to max|y|."""
    dtype, tol = CACHES[cache_dtype]
    m = _module(variant, 10_000.0, implementation="decode")
    prompt = np.array([2, 9, 5])
    P, n_after = int(prompt.max()), 16 + 3 + 1
    seqs = jax.random.normal(jax.random.key(9), (B, P + n_after, D))
    expected = np.asarray(jitted(m)(seqs, is_causal=True))
    scale = 1.0 if cache_dtype == "f32" else np.abs(expected).max()
    step = _decode_fn(jit=True)
    cache = m.init_cache(B, LONG + 8, dtype)
    pad = np.arange(P)[None, :, None] >= prompt[:, None, None]
    y, cache = step(m, jnp.where(pad, 0.0, seqs[:, :P]), cache, jnp.asarray(prompt))
    for b in range(B):
        np.testing.assert_allclose(y[b, :prompt[b]], expected[b, :prompt[b]],
                                   atol=tol * scale, rtol=RTOL_F32)
    pos = prompt.copy()
    for t in (16, 3, 1):
        idx = pos[:, None] + np.arange(t)[None, :]
        x = seqs[np.arange(B)[:, None], idx]
        y, cache = step(m, x, cache)
        np.testing.assert_allclose(y, expected[np.arange(B)[:, None], idx],
                                   atol=tol * scale, rtol=RTOL_F32)
        pos += t
    np.testing.assert_array_equal(cache.lengths, prompt + n_after)


def test_kernel_window_mask_equals_full_forward(small_blocks):
    m = _module("gqa", 100.0, implementation="decode")
    n = 14
    x = jax.random.normal(jax.random.key(4), (B, n, D))
    expected = jitted(m)(x, mask=aj.sliding_window_mask(n, window=3))
    step = nnx.jit(lambda m, x, c, w: m.decode(x, c, mask=w))
    cache = m.init_cache(B, LONG)
    y1, cache = step(m, x[:, :10], cache, aj.sliding_window_mask(10, LONG, window=3))
    ys = [y1]
    for i in range(10, n):
        w = aj.sliding_window_mask(1, LONG, window=3, offset=cache.lengths)
        y, cache = step(m, x[:, i:i + 1], cache, w)
        ys.append(y)
    chex.assert_trees_all_close(jnp.concatenate(ys, 1), expected, atol=ATOL_F32, rtol=RTOL_F32)


def test_partially_filled_cache_equals_tight_cache(small_blocks):
    """A 24-slot cache holding 7 tokens gives the outputs of an 8-slot one; its blocks past the
    filled ones are not read (NaN there would reach the output if they were)."""
    small_blocks.SPLIT_MIN_BLOCKS = 1 << 30  # one chunk: the loop reads blocks 0, 1 only
    m = _module("mqa", 10_000.0, implementation="decode")
    x = jax.random.normal(jax.random.key(10), (B, 8, D))
    step = _decode_fn(jit=True)
    outs = []
    for slots in (8, LONG):
        cache = m.init_cache(B, slots)
        _, cache = step(m, x[:, :7], cache)
        if slots == LONG:
            cache = cache.replace(v=cache.v.at[:, :, 8:].set(jnp.nan))
        y, cache = step(m, x[:, 7:8], cache)
        outs.append(y)
    assert np.isfinite(np.asarray(outs[1])).all()
    chex.assert_trees_all_close(outs[1], outs[0], atol=ATOL_F32, rtol=RTOL_F32)
