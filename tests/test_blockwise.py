"""Fast-attention backends ("blockwise", "auto", "cudnn") against the einsum reference.

The reference is the einsum path (``ops.attention_core``, implementation "xla"),
which materialises the scores; the blockwise kernel never does, so every check
here compares two independent computations. Small blocks (4 x 4) with T=10,
S=13 give several query and key blocks, ragged last blocks and, with
``is_causal``, skipped and straddling blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import kernels, ops
from attention_jax.kernels import blockwise, dispatch
from tests.helpers import (
    BF16_GRAD_TOL,
    BF16_TOL,
    F32_GRAD_TOL,
    F32_TOL,
    HEADS,
    B,
    H,
    S,
    T,
)
from tests.helpers import check_against_einsum as _check
from tests.helpers import inputs as _inputs
from tests.helpers import mask_of_kind as _mask
from tests.helpers import via_ops as _via_ops

BLOCK = 4


def _blockwise_4x4(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
    return blockwise.blockwise_attention(
        q, k, v, mask, bias, is_causal=is_causal, scale=scale, block_q=BLOCK, block_kv=BLOCK
    )


@pytest.fixture
def small_blocks(monkeypatch):
    """Registered backends ("blockwise", and "auto" above its threshold) use 4 x 4 blocks."""
    monkeypatch.setitem(blockwise._BLOCKS, "cpu", (BLOCK, BLOCK))
    monkeypatch.setitem(dispatch.AUTO_EINSUM_MAX_TS, "cpu", 0)  # auto -> blockwise here


# ---------------------------------------------------------------------------
# Equality with the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "keypad", "full"])
def test_blockwise_matches_reference(heads, is_causal, mask_kind):
    N, K = HEADS[heads]
    q, k, v = _inputs(N, K)
    _check(_blockwise_4x4, q, k, v, _mask(mask_kind, N), is_causal=is_causal)


@pytest.mark.parametrize("impl", ["blockwise", "auto", "xla"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_registered_backends_match_reference(small_blocks, impl, jit):
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K, seed=2)
    _check(_via_ops(impl), q, k, v, _mask("full", N), is_causal=True, jit=jit)


@pytest.mark.parametrize(
    ("T_", "S_", "block_q", "block_kv", "is_causal"),
    [
        (13, 6, 4, 4, False),
        (13, 6, 4, 4, True),  # T > S: late queries see every key
        (5, 17, 4, 4, True),  # T < S: most key blocks skipped
        (16, 16, 8, 4, True),  # block_q > block_kv
        (16, 16, 4, 8, True),  # block_q < block_kv
        (10, 13, 16, 16, False),  # one block larger than T and S
    ],
)
def test_cross_lengths_and_block_shapes(T_, S_, block_q, block_kv, is_causal):
    """T != S, T and S not multiples of the blocks, unequal blocks, one block > T."""
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K, T_, S_, seed=3)

    def fn(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        return blockwise.blockwise_attention(
            q, k, v, mask, bias, is_causal=is_causal, block_q=block_q, block_kv=block_kv
        )

    _check(fn, q, k, v, _mask("query", N, T_, S_), is_causal=is_causal)


@pytest.mark.parametrize(
    "bias_shape", [(1, 4, T, S), (B, 1, 1, S), (T, 1)], ids=["1NTS", "B11S", "T1"]
)
def test_bias_and_its_gradient(bias_shape):
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K, seed=4)
    bias = jnp.asarray(np.random.default_rng(5).standard_normal(bias_shape), jnp.float32)
    _check(_blockwise_4x4, q, k, v, _mask("keypad", N), bias, is_causal=True)


@pytest.mark.parametrize("heads", ["mqa", "gqa"])
def test_bf16_inputs(heads):
    N, K = HEADS[heads]
    q, k, v = _inputs(N, K, dtype=jnp.bfloat16, seed=6)
    _check(_blockwise_4x4, q, k, v, _mask("keypad", N), is_causal=True,
           tol=BF16_TOL, grad_tol=BF16_GRAD_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_gradients_with_matmul_sized_tiles(causal):
    """bf16 at a tile size the dot libraries take (the 4 x 4 tiles above are emitted by
    XLA itself): every backward product must be one XLA:CPU can run in bf16 with a
    float32 result (a transposed operand folded into the dq product was not)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs_sized(64, 16, seed=8))
    _check(blockwise.blockwise_attention, q, k, v, None, is_causal=causal,
           tol=BF16_TOL, grad_tol=BF16_GRAD_TOL)


def inputs_sized(T, H, *, seed):
    """GQA ``q [2, T, 4, H]``, ``k`` / ``v [2, T, 2, H]``, float32."""
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32)
                 for s in ((2, T, 4, H), (2, T, 2, H), (2, T, 2, H)))


def test_fully_masked_rows_are_zero_with_zero_gradient():
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K, seed=7)
    mask = _mask("full", N)
    out = _blockwise_4x4(q, k, v, mask, is_causal=True)
    np.testing.assert_array_equal(np.asarray(out[:, T - 1]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[0, 3, 1]), 0.0)
    dq = jax.grad(lambda q: _blockwise_4x4(q, k, v, mask, is_causal=True).sum())(q)
    assert np.all(np.isfinite(np.asarray(dq)))
    np.testing.assert_array_equal(np.asarray(dq[:, T - 1]), 0.0)
    # Every key hidden: the whole output and every gradient are zero, not NaN.
    none = jnp.zeros((1, 1, 1, S), bool)
    grads = jax.grad(lambda *a: _blockwise_4x4(*a, none).sum(), (0, 1, 2))(q, k, v)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------
# Switch, remat, cudnn
# ---------------------------------------------------------------------------


def test_default_is_auto_and_weights_fall_back_to_einsum():
    assert ops.default_implementation() == "auto"
    assert {"xla", "blockwise", "cudnn", "auto"} <= set(ops.available_implementations())
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K)
    out, weights = ops.dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    assert weights.shape == (B, N, T, S)
    np.testing.assert_allclose(out, ops.attention_core(q, k, v, is_causal=True), **F32_TOL)


def test_auto_rules():
    def shaped(t, s, dtype=jnp.float32, h=64):
        kv = jax.ShapeDtypeStruct((1, s, 2, h), dtype)
        return jax.ShapeDtypeStruct((1, t, 8, h), dtype), kv, kv

    limit = dispatch.AUTO_EINSUM_MAX_TS["cpu"]
    assert kernels.choose_implementation(*shaped(64, 64), platform="cpu") == "xla"
    assert kernels.choose_implementation(*shaped(limit, 2), platform="cpu") == "blockwise"
    assert kernels.choose_implementation(*shaped(4096, 4096), platform="cpu") == "blockwise"
    bf16 = shaped(4096, 4096, jnp.bfloat16)
    assert kernels.choose_implementation(*bf16, platform="gpu") == "cudnn"
    # Not cuDNN-able on GPU: float32, or head size 12.
    assert kernels.choose_implementation(*shaped(4096, 4096), platform="gpu") == "blockwise"
    odd_h = shaped(4096, 4096, jnp.bfloat16, h=12)
    assert kernels.choose_implementation(*odd_h, platform="gpu") == "blockwise"


def test_cudnn_reasons_name_the_problem():
    q, k, v = _inputs(4, 2)
    with pytest.raises(ValueError, match=r"GPU.*'cpu'"):
        ops.dot_product_attention(q, k, v, implementation="cudnn")
    assert "float32" in kernels.cudnn_unsupported_reason(q, k, v, platform="gpu")
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    assert "head size" in kernels.cudnn_unsupported_reason(qb, kb, vb, platform="gpu")  # H=8, V=6
    q12 = jnp.zeros((1, 4, 4, 12), jnp.bfloat16)
    assert "12" in kernels.cudnn_unsupported_reason(q12, q12[:, :, :2], q12[:, :, :2],
                                                    platform="gpu")
    q16 = jnp.zeros((1, 5, 4, 16), jnp.bfloat16)
    m = jnp.ones((1, 1, 1, 5), bool)
    assert "even" in kernels.cudnn_unsupported_reason(q16, q16, q16, m, platform="gpu")
    assert kernels.cudnn_unsupported_reason(q16, q16, q16, platform="gpu") is None


@pytest.mark.parametrize("heads", ["mqa", "gqa"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_cudnn_mapping_through_jax_nn_xla(heads, is_causal):
    """The cudnn backend's mask/bias/GQA mapping, run by jax.nn's XLA path on CPU."""
    N, K = HEADS[heads]
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((B, t, n, H)), jnp.float32)
               for t, n in ((T, N), (S, K), (S, K)))
    mask = _mask("full", N)
    bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)

    def fn(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        return dispatch.jax_nn_attention(q, k, v, mask, bias, is_causal=is_causal,
                                         implementation="xla")

    _check(fn, q, k, v, mask, bias, is_causal=is_causal)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_remat_same_values_and_gradients(small_blocks, impl):
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K, seed=9)
    mask = _mask("keypad", N)

    def loss(q, k, v, remat):
        out = ops.dot_product_attention(q, k, v, mask, is_causal=True, implementation=impl,
                                        remat=remat)
        return jnp.sum(out * out)

    plain = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
    (l0, g0), (l1, g1) = plain(q, k, v, False), plain(q, k, v, True)
    np.testing.assert_allclose(l0, l1, **F32_TOL)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(a, b, **F32_GRAD_TOL)


@pytest.mark.parametrize(
    ("length", "block", "want"),
    [(1, 512, 1), (100, 512, 100), (512, 512, 512), (384, 256, 192), (513, 256, 176)],
)
def test_default_blocks_are_balanced(length, block, want):
    """A ragged length is split into equal blocks (multiple of 8), not padded to the block."""
    got = blockwise._balanced(length, block)
    assert got == want
    assert -(-length // got) == -(-length // block)  # as few blocks as the platform size


def test_single_query_row_default_blocks():
    """Decoding shape (T = 1) with the platform's default blocks."""
    N, K = HEADS["gqa"]
    q, k, v = _inputs(N, K, 1, S, seed=10)
    _check(blockwise.blockwise_core, q, k, v, _mask("keypad", N, 1, S), is_causal=False)


def test_bad_block_size_raises():
    q, k, v = _inputs(4, 2)
    with pytest.raises(ValueError, match="block_q=0"):
        blockwise.blockwise_attention(q, k, v, block_q=0)


@pytest.mark.parametrize("kv_sharded", [True, False], ids=["gqa-kv-sharded", "mqa-kv-replicated"])
def test_blockwise_inside_shard_map(kv_sharded):
    """Head-parallel use: heads split over 2 devices, K/V sharded (GQA) or replicated
    (MQA), a shared bias; values and all gradients equal the single-device reference."""
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    N, K = (4, 2) if kv_sharded else (4, 1)
    q, k, v = _inputs(N, K, seed=11)
    mask = _mask("keypad", N)
    bias = jnp.asarray(np.random.default_rng(12).standard_normal((1, 1, T, S)), jnp.float32)
    heads, kv_spec = P(None, None, "model"), P(None, None, "model") if kv_sharded else P()

    def sharded(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        def local(q, k, v, mask, bias):
            return _blockwise_4x4(q, k, v, mask, bias, is_causal=is_causal, scale=scale)

        return jax.shard_map(local, mesh=mesh, in_specs=(heads, kv_spec, kv_spec, P(), P()),
                             out_specs=heads)(q, k, v, mask, bias)

    _check(sharded, q, k, v, mask, bias, is_causal=True)


# ---------------------------------------------------------------------------
# Memory (compile-time analysis, nothing runs)
# ---------------------------------------------------------------------------


def _temp_bytes(fn, t):
    """Temporary bytes of jit(grad) of ``fn`` at B=1, T=S=t, N=4, K=2, H=32."""
    q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
    grad = jax.grad(lambda q, k, v: fn(q, k, v, is_causal=True).sum(), (0, 1, 2))
    return jax.jit(grad).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_temp_memory_is_small_and_linear_in_t():
    blk = {t: _temp_bytes(blockwise.blockwise_core, t) for t in (2048, 4096)}
    ein = _temp_bytes(ops.attention_core, 2048)
    # einsum keeps [B, N, T, S] f32 scores (64 MiB here); blockwise O(T) plus one tile.
    assert ein >= 4 * 2048 * 2048 * 4
    assert blk[2048] * 8 <= ein, (blk, ein)
    assert blk[4096] <= 2.5 * blk[2048], blk  # ~linear: doubling T at most ~doubles it
