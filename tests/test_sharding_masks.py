"""Head parallelism with structured masks and score mods equals one device.

Mask objects' arrays (segment ids, lengths) go over ``data`` with the rows;
per-head layouts and score mods see global head indices (``head_offset``).
Tolerance: float32, 2e-5 absolute (as tests/test_sharding.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import masks, scores, sharding

TOL = dict(atol=2e-5, rtol=1e-5)
B, T, D, N = 4, 8, 32, 8


def _segments():
    ids = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1],
                    [0, 1, 1, 2, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3]], np.int32)
    return masks.Segments(jnp.asarray(ids))


MASKS = {
    "window": lambda: masks.Causal() & masks.SlidingWindow(2),
    "segments": lambda: _segments() & masks.Causal(),
    "lengths": lambda: masks.Lengths(jnp.array([8, 5, 3, 1])),
    "per_head_blocks": lambda: masks.BlockSparse(
        np.random.default_rng(0).random((N, 4, 4)) > 0.4, 2, 2),
}


@pytest.mark.parametrize("K", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("kind", list(MASKS))
def test_structured_masks_head_parallel_equal_one_device(K, kind):
    m = aj.MultiHeadAttention(D, N, num_kv_heads=K, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    mask = MASKS[kind]()
    want = m(x, mask=mask)
    hp = sharding.head_parallel(m, sharding.make_mesh(data=2, model=4))
    got = nnx.jit(lambda mod, x, mask: mod(x, mask=mask))(hp, x, mask)
    np.testing.assert_allclose(got, want, **TOL)


def test_segment_ids_head_parallel_and_linen_equal_one_device():
    """``segment_ids=`` on the head-parallel wrapper and the Linen adapter: the same as
    the module's ``mask=Segments(ids)`` (the ids go over ``data`` with the rows)."""
    from attention_jax import linen as ajl

    m = aj.GroupedQueryAttention(D, N, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    ids = _segments().q_ids
    want = m(x, mask=_segments(), is_causal=True)
    np.testing.assert_allclose(m(x, segment_ids=ids, is_causal=True), want, **TOL)
    linen_attn, variables = ajl.from_nnx(m)
    np.testing.assert_allclose(
        linen_attn.apply(variables, x, segment_ids=ids, is_causal=True), want, **TOL)
    hp = sharding.head_parallel(m, sharding.make_mesh(data=2, model=4))
    got = nnx.jit(lambda mod, x, ids: mod(x, segment_ids=ids, is_causal=True))(hp, x, ids)
    np.testing.assert_allclose(got, want, **TOL)


def test_score_mods_see_global_heads_and_train_their_arrays():
    m = aj.GroupedQueryAttention(D, N, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (B, T, D))
    slopes = jnp.asarray(scores.alibi_slopes(N))

    def loss(mod, slopes):
        mod_fn = scores.alibi(slopes)
        cap = scores.softcap(5.0)
        y = mod(x, is_causal=True, score_mod=lambda s, b, n, t, k: cap(mod_fn(s, b, n, t, k),
                                                                        b, n, t, k))
        return jnp.sum(y * jnp.cos(y))

    want, g_want = nnx.value_and_grad(loss, argnums=1)(m, slopes)
    hp = sharding.head_parallel(m, sharding.make_mesh(data=2, model=4))
    got, g_got = nnx.jit(nnx.value_and_grad(loss, argnums=1))(hp, slopes)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(g_got, g_want, atol=1e-5, rtol=1e-4)
    assert np.abs(np.asarray(g_want)).max() > 0  # the slopes get a gradient at all


@pytest.mark.parametrize("axes", [("data",), ("model",)])
def test_blockwise_in_shard_map_closed_over_array_gradient_counted_once(axes):
    """A score_mod closing over an array that every device holds whole (learned ALiBi
    slopes, ``in_specs=P()``): its gradient through the blockwise kernel inside
    ``jax.shard_map`` equals the one-device gradient (it was multiplied by the axis size:
    each tile's vjp of the invariant constant summed over the devices)."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), axes)
    q = jax.random.normal(jax.random.key(2), (8, 16, 4, 8))
    kv = jax.random.normal(jax.random.key(3), (8, 16, 2, 8))
    slopes = jnp.asarray(scores.alibi_slopes(4), jnp.float32)

    def loss(slopes, q, kv):
        y = aj.dot_product_attention(q, kv, kv, is_causal=True, score_mod=scores.alibi(slopes),
                                     implementation="blockwise")
        return jnp.sum(jnp.sin(y))

    want = jax.grad(loss)(slopes, q, kv)

    def local(slopes, q, kv):  # batch rows split over the axis: the losses add up
        return jax.lax.psum(loss(slopes, q, kv), axes[0])

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes[0]), P(axes[0])),
                                    out_specs=P()))
    rows = jax.sharding.NamedSharding(mesh, P(axes[0]))
    q, kv = jax.device_put(q, rows), jax.device_put(kv, rows)
    slopes = jax.device_put(slopes, jax.sharding.NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        got = jax.grad(lambda s: sharded(s, q, kv))(slopes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
