"""The pure core: masks, shape checks and the einsum attention, against NumPy.

The NumPy reference here repeats K/V heads explicitly (the obvious, slow way), so
it is independent of the grouped einsums under test. PyTorch equivalence lives
in test_equivalence.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import masks, ops
from tests.helpers import numpy_attention

ATOL_F32 = RTOL_F32 = 1e-5
ATOL_BF16 = RTOL_BF16 = 2e-2

VARIANTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _qkv(key, B=2, T=5, S=7, N=4, K=2, H=8, V=6, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, S, K, H), dtype)
    v = jax.random.normal(kv, (B, S, K, V), dtype)
    return q, k, v


# --------------------------------------------------------------------------- masks


def test_causal_mask_offsets():
    np.testing.assert_array_equal(masks.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
    # bottom-right alignment: the last query sees every key
    m = masks.causal_mask(2, 5, offset=3)[0, 0]
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # per-row offsets give a [B, 1, T, S] mask
    m = masks.causal_mask(1, 4, offset=jnp.array([0, 2]))
    assert m.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(m[:, 0, 0], [[1, 0, 0, 0], [1, 1, 1, 0]])


def test_sliding_window_mask():
    m = masks.sliding_window_mask(5, window=3)[0, 0]
    expected = np.array([[i - 3 < j <= i for j in range(5)] for i in range(5)])
    np.testing.assert_array_equal(m, expected)
    # window >= T is plain causal
    np.testing.assert_array_equal(masks.sliding_window_mask(4, window=10), masks.causal_mask(4))
    with pytest.raises(ValueError, match="window must be >= 1; got 0"):
        masks.sliding_window_mask(4, window=0)


def test_padding_mask_and_combination():
    m = masks.padding_mask(jnp.array([1, 3]), 4)
    assert m.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(m[:, 0, 0], [[1, 0, 0, 0], [1, 1, 1, 0]])
    m = masks.padding_mask(jnp.array([1, 3]), 4, q_lengths=jnp.array([2, 1]), q_len=3)
    assert m.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(m[0, 0, :, 0], [1, 1, 0])
    both = masks.combine_masks(masks.causal_mask(4), None, masks.padding_mask(jnp.array([2]), 4))
    np.testing.assert_array_equal(both[0, 0], np.tril(np.ones((4, 4), bool)) & (np.arange(4) < 2))
    assert masks.combine_masks(None, None) is None
    with pytest.raises(ValueError, match=r"lengths must be \[batch\]"):
        masks.padding_mask(jnp.ones((2, 2), int), 4)
    with pytest.raises(ValueError, match="q_lengths needs q_len"):
        masks.padding_mask(jnp.array([1]), 4, q_lengths=jnp.array([1]))


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_numpy(variant, jit):
    N, K = VARIANTS[variant]
    q, k, v = _qkv(jax.random.key(0), N=N, K=K)
    mask = masks.combine_masks(masks.causal_mask(5, 7, offset=2),
                               masks.padding_mask(jnp.array([7, 4]), 7))
    fn = jax.jit(ops.dot_product_attention, static_argnames="return_weights")
    fn = fn if jit else ops.dot_product_attention
    out, w = fn(q, k, v, mask, return_weights=True)
    ref_out, ref_w = numpy_attention(q, k, v, mask)
    chex.assert_trees_all_close(out, ref_out.astype(np.float32), atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(w, ref_w.astype(np.float32), atol=ATOL_F32, rtol=RTOL_F32)


def test_is_causal_equals_explicit_mask_and_scale():
    q, k, v = _qkv(jax.random.key(1), T=6, S=6)
    a = ops.dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    ref, _ = numpy_attention(q, k, v, np.tril(np.ones((6, 6), bool)), scale=0.3)
    chex.assert_trees_all_close(a, ref.astype(np.float32), atol=ATOL_F32, rtol=RTOL_F32)


def test_bias_is_added_to_logits():
    q, k, v = _qkv(jax.random.key(2))
    bias = jax.random.normal(jax.random.key(3), (1, 4, 5, 7))
    out = ops.dot_product_attention(q, k, v, bias=bias)
    # a bias of -inf-like size on a key equals masking it
    big = jnp.where(jnp.arange(7) < 3, 0.0, -1e9)
    chex.assert_trees_all_close(
        ops.dot_product_attention(q, k, v, bias=big),
        ops.dot_product_attention(q, k, v, mask=jnp.arange(7) < 3), atol=ATOL_F32,
    )
    assert not np.allclose(out, ops.dot_product_attention(q, k, v), atol=1e-3)


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = _qkv(jax.random.key(4))
    mask = jnp.ones((2, 1, 5, 7), bool).at[0, :, 1].set(False).at[1].set(False)
    out = ops.dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.all(np.isfinite(out))
    grads = jax.grad(lambda *a: ops.dot_product_attention(*a, mask).sum(), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(grads[0][1], 0.0)  # no key seen, no gradient to q


def test_bf16_softmax_in_float32_with_large_logits():
    q, k, v = _qkv(jax.random.key(5))
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q * 30, k * 30, v))
    out = ops.dot_product_attention(q16, k16, v16, is_causal=False)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(out.astype(np.float32)))
    ref, _ = numpy_attention(q16.astype(np.float32), k16.astype(np.float32), v16.astype(np.float32))
    chex.assert_trees_all_close(out.astype(np.float32), ref.astype(np.float32),
                                atol=ATOL_BF16, rtol=RTOL_BF16)
    _, w = ops.dot_product_attention(q16, k16, v16, return_weights=True)
    assert w.dtype == jnp.float32


def test_dropout():
    q, k, v = _qkv(jax.random.key(6), S=64)
    rng = jax.random.key(7)
    _, w = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng,
                                     return_weights=True)
    dropped = float(jnp.mean(w == 0))
    assert 0.4 < dropped < 0.6
    # surviving weights are rescaled by 1 / (1 - rate): rows still sum to 1 on average
    assert abs(float(w.sum(-1).mean()) - 1.0) < 0.05
    out1 = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    out2 = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    np.testing.assert_array_equal(out1, out2)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((2, 5, 4, 8), (2, 7, 3, 8), (2, 7, 3, 8)), r"query heads \(4\) must be a multiple of "
                                                      r"key/value heads \(3\)"),
        (((2, 5, 4, 8), (3, 7, 2, 8), (3, 7, 2, 8)), "batch sizes differ: q 2, k 3, v 3"),
        (((2, 5, 4, 8), (2, 7, 2, 8), (2, 6, 2, 8)), "key length 7 != value length 6"),
        (((2, 5, 4, 8), (2, 7, 2, 4), (2, 7, 2, 8)), "query head size 8 != key head size 4"),
        (((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 1, 8)), "key heads 2 != value heads 1"),
        (((2, 5, 32), (2, 7, 2, 8), (2, 7, 2, 8)), r"q must have rank 4"),
    ],
)
def test_shape_errors_name_the_numbers(shapes, match):
    q, k, v = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ops.dot_product_attention(q, k, v)


def test_argument_errors():
    q, k, v = _qkv(jax.random.key(8))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 5, 7\) does not broadcast to "
                                         r"\[batch, heads, q_len, kv_len\] = \[2, 4, 5, 7\]"):
        ops.dot_product_attention(q, k, v, jnp.ones((3, 1, 5, 7), bool))
    with pytest.raises(ValueError, match=r"bias of shape \(5, 6\)"):
        ops.dot_product_attention(q, k, v, bias=jnp.zeros((5, 6)))
    with pytest.raises(ValueError, match="mask must be boolean"):
        ops.dot_product_attention(q, k, v, jnp.ones((5, 7)))
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        ops.dot_product_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\); got 1.0"):
        ops.dot_product_attention(q, k, v, dropout_rate=1.0, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        ops.dot_product_attention(q, k, v, implementation="nope")
