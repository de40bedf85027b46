"""Head-parallel decoding on 8 fake CPU devices: the KV cache in the sharded layout.

Expected values come from the unsharded module's ``decode`` on the same steps
(itself proven equal to the full causal forward in ``test_cache.py``); one case
also checks the sharded steps against the full forward directly.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from attention_jax import MultiHeadAttention, masks
from attention_jax import sharding as sh
from tests.helpers import INT8_CACHE_TOL, jitted

# float32: the sharded step sums the heads' partial outputs in another order.
ATOL_F32 = 2e-5
RTOL_F32 = 1e-5

MESHES = [(1, 8), (2, 4)]  # (data, model)
HEADS = [(8, 8), (8, 2), (8, 1), (16, 4)]  # (N, K): split, replicated, replicated, either
B, D, H, L = 4, 32, 4, 12  # batch, width, head dim, cache length
PROMPT = np.array([3, 5, 2, 4])  # ragged prompt lengths (right padded to 5)
STEPS = 3


def _module(N: int, K: int, *, rope: float | None = 10_000.0) -> MultiHeadAttention:
    m = MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rope=rope, rngs=nnx.Rngs(0))
    # non-zero biases, so that a bias applied per device (not once) would show
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        p = getattr(m, name)
        p[...] = jax.random.normal(jax.random.key(hash(name) % 97), p.shape) * 0.1
    return m


def _tokens() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (B, int(PROMPT.max()) + STEPS, D))


def _run(decode, cache, x):
    """Ragged prefill, then STEPS single tokens. Returns outputs [B, STEPS+1 chunks] and cache."""
    P0 = int(PROMPT.max())
    y, cache = decode(x[:, :P0], cache, valid_lengths=jnp.asarray(PROMPT))
    ys = [y]
    for i in range(STEPS):
        y, cache = decode(x[:, P0 + i:P0 + i + 1], cache)
        ys.append(y)
    return ys, cache


def _pair(N, K, mesh_shape, dtype=None, axis_types=None):
    m = _module(N, K)
    hp = sh.head_parallel(nnx.clone(m), sh.make_mesh(*mesh_shape, axis_types=axis_types))
    return m, hp, m.init_cache(B, L, dtype), hp.init_cache(B, L, dtype)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("heads", HEADS, ids=lambda s: "x".join(map(str, s)))
def test_sharded_decode_equals_unsharded(heads, mesh_shape):
    _check_jitted_sharded_steps(heads, mesh_shape)


def _check_jitted_sharded_steps(heads, mesh_shape):
    """The jitted head-parallel steps (cache donated) equal the unsharded module's."""
    m, hp, c0, c1 = _pair(*heads, mesh_shape)
    x = _tokens()
    ys0, c0 = _run(jitted(m, "decode"), c0, x)
    step = nnx.jit(lambda hp, x, c, **kw: hp.decode(x, c, **kw), donate_argnums=2)
    ys1, c1 = _run(lambda x, c, **kw: step(hp, x, c, **kw), c1, x)
    for y0, y1 in zip(ys0, ys1, strict=True):
        chex.assert_trees_all_close(y1, y0, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(c1, c0, atol=ATOL_F32, rtol=RTOL_F32)
    np.testing.assert_array_equal(c1.lengths, PROMPT + STEPS)


def test_sharded_decode_in_short_blocks_equals_unsharded(monkeypatch):
    """The kernel's few-tokens loop (a lax.cond on the lengths, see
    kernels.decode.partial_block) per device: 4-token blocks while a row holds at most
    6 of the 12 slots (the prefill and the first step), the 12-token block after."""
    from attention_jax.kernels import decode

    monkeypatch.setattr(decode, "PARTIAL_BLOCK", 4)
    monkeypatch.setattr(decode, "MIN_BLOCK", 2)
    assert decode.block_tokens(B, L, 4 * 2 * 2 * H) == L and decode.partial_block(L, L) == 4
    _check_jitted_sharded_steps((8, 2), (2, 4))


def test_sharded_steps_equal_the_full_causal_forward():
    """Token by token through the sharded cache = the unsharded full forward (row 0 prompt 3)."""
    m, hp, _, cache = _pair(8, 2, (2, 4))
    x = _tokens()[:, :6]
    expected = jitted(m)(x, is_causal=True)
    ys = []
    for i in range(6):
        y, cache = hp.decode(x[:, i:i + 1], cache)
        ys.append(y)
    chex.assert_trees_all_close(jnp.concatenate(ys, 1), expected, atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["split", "replicated"])
def test_sharded_int8_cache_equals_unsharded_int8(heads):
    m, hp, c0, c1 = _pair(*heads, (2, 4), dtype=jnp.int8)
    x = _tokens()
    ys0, c0 = _run(jitted(m, "decode"), c0, x)
    ys1, c1 = _run(hp.decode, c1, x)
    assert c1.k.dtype == jnp.int8
    assert tuple(c1.k_scale.sharding.spec) == tuple(c1.k.sharding.spec)[:3]
    # The sharded projections round differently in the last bit, so a value on a
    # rounding tie may quantize one step apart; nothing else may differ.
    steps = [int(jnp.max(jnp.abs(a.astype(jnp.int32) - b.astype(jnp.int32))))
             for a, b in ((c1.k, c0.k), (c1.v, c0.v))]
    assert max(steps) <= 1, steps
    if max(steps) == 0:  # the same quantized cache: the same outputs
        chex.assert_trees_all_close(ys1, ys0, atol=ATOL_F32, rtol=RTOL_F32)
    else:  # a value one step apart: within the error int8 makes anyway
        scale = max(float(jnp.abs(y).max()) for y in ys0)
        for y0, y1 in zip(ys0, ys1, strict=True):
            assert float(jnp.abs(y1 - y0).max()) <= INT8_CACHE_TOL * scale


@pytest.mark.parametrize(
    ("heads", "kv_spec", "local_kv"),
    [((8, 8), "model", 2), ((8, 2), None, 2), ((8, 1), None, 1), ((16, 4), "model", 1)],
    ids=["mha-split", "gqa-replicated", "mqa-replicated", "gqa-split"],
)
def test_cache_layout_follows_the_heads(heads, kv_spec, local_kv):
    """k/v: rows over data, kv heads over model when split, all K on each device otherwise."""
    _, hp, _, cache = _pair(*heads, (2, 4))
    want = P("data", kv_spec, None, None)  # [B, K, L, H]
    assert cache.k.sharding.spec == want and cache.v.sharding.spec == want
    assert cache.lengths.sharding.spec == P("data")
    for shard in cache.k.addressable_shards:
        assert shard.data.shape == (B // 2, local_kv, L, H)
    _, cache = hp.decode(_tokens()[:, :2], cache)  # the step keeps the layout
    assert cache.k.sharding.spec == want


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["split", "replicated"])
def test_decode_step_has_one_all_reduce_over_model(heads):
    """The compiled step's only collective is the psum of the partial outputs."""
    mesh = sh.make_mesh(2, 4)
    m = _module(*heads)
    hp = sh.head_parallel(m, mesh)
    cache = hp.init_cache(B, L)
    graphdef, state = nnx.split(hp)

    def step(state, x, cache):
        return nnx.merge(graphdef, state).decode(x, cache)

    compiled = jax.jit(step).lower(state, _tokens()[:, :1], cache).compile()
    assert sh.collective_summary(compiled, mesh) == {"all-reduce@model": 1}


def test_auto_mesh_and_a_prefilled_unsharded_cache():
    """A cache filled on one device, placed with shard_cache, continues on an Auto mesh."""
    m, hp, c0, _ = _pair(8, 4, (2, 4), axis_types=AxisType.Auto)
    x = _tokens()
    y, c0 = m.decode(x[:, :4], c0)
    c1 = sh.shard_cache(c0, hp.module, hp.mesh)
    assert c1.k.sharding.spec == P("data", "model", None, None)
    window = masks.sliding_window_mask(1, L, window=3, offset=c0.lengths)  # [B, 1, 1, L]
    y0, c0 = m.decode(x[:, 4:5], c0, mask=window)
    y1, c1 = hp.decode(x[:, 4:5], c1, mask=window)
    chex.assert_trees_all_close(y1, y0, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(c1, c0, atol=ATOL_F32, rtol=RTOL_F32)


def test_sharded_decode_errors_name_the_numbers():
    m, hp, c0, cache = _pair(8, 2, (2, 4))
    with pytest.raises(ValueError, match="batch size 3 is not divisible by the data axis size 2"):
        hp.init_cache(3, L)
    with pytest.raises(ValueError, match=r"K=2"):
        hp.decode(_tokens()[:, :1], MultiHeadAttention(D, 8, head_dim=H, rngs=nnx.Rngs(0))
                  .init_cache(B, L))
    with pytest.raises(ValueError, match="x has batch 2 but the cache has 4"):
        hp.decode(_tokens()[:2, :1], cache)
    with pytest.raises(ValueError, match="has 16 features but the module expects 32"):
        hp.decode(jnp.ones((B, 1, 16)), cache)
    with pytest.raises(ValueError, match="would need 13 positions, but max_length is 12"):
        hp.decode(jnp.ones((B, 13, D)), cache)
    with pytest.raises(ValueError, match="cache holds 8 kv heads but the module has K=2"):
        sh.shard_cache(MultiHeadAttention(D, 8, head_dim=H, rngs=nnx.Rngs(0)).init_cache(B, L),
                       hp.module, hp.mesh)
    with pytest.raises(ValueError, match="does not broadcast"):
        hp.decode(_tokens()[:, :1], cache, mask=jnp.ones((B, 3, 1, L), bool))
