"""Context parallelism on 8 fake CPU devices: ring / all-gather attention equal one device.

The expected values come from ``ops.dot_product_attention(implementation="xla")`` on the
whole (unsharded, natural-order) sequence; the sharded functions run inside
``jax.shard_map`` on a ``(data=2, context=4)`` mesh, their inputs reordered by
``to_layout`` for the zigzag layout. Each case compiles forward + gradients once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from attention_jax import hlo, masks, ops, scores
from attention_jax.parallel import context as cp
from attention_jax.parallel import ring

# float32: the ring merges the key blocks' softmaxes in another order than one device.
ATOL_F32, RTOL_F32 = 2e-5, 1e-5
GRAD_ATOL_F32 = 5e-5

DATA, CTX = 2, 4
B, T, H = 2, 32, 8  # batch, global sequence length, head dim
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (N, K)
STRATEGIES = {"ring": ring.ring_attention, "all_gather": cp.all_gather_attention}


@functools.cache
def _mesh():
    return jax.make_mesh((DATA, CTX), ("data", "context"), axis_types=(AxisType.Auto,) * 2)


def _inputs(heads: str, seed: int = 0):
    N, K = HEADS[heads]
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    w = jax.random.normal(ks[3], (B, T, N, H))  # the cotangent of the output
    ids = jnp.array([[0] * 5 + [1] * 14 + [2] * 13, [0] * 20 + [1] * 10 + [-1] * 2], jnp.int32)
    return q, k, v, w, ids


LENGTHS = (27, 13)  # global valid lengths of the two rows


def _mask(name: str, ids=None, lengths=None):
    if name == "causal":
        return masks.Causal()
    if name == "window":
        return masks.Causal() & masks.SlidingWindow(6)
    if name == "segments":
        return masks.Causal() & masks.Segments(ids)
    if name == "lengths":
        return masks.Lengths(jnp.array(LENGTHS) if lengths is None else lengths)
    raise ValueError(name)


def _sharded(strategy, layout, mask_name, **kw):
    """``f(q, k, v, ids) -> out`` on global arrays (already in ``layout`` order); per-row
    mask data (segment ids, lengths) is sharded with the batch."""
    fn = STRATEGIES[strategy]
    seq = P("data", "context")

    def body(q, k, v, ids, lengths):
        m = _mask(mask_name, ids, lengths)
        return fn(q, k, v, axis_name="context", mask=m, layout=layout, **kw)

    f = jax.shard_map(body, mesh=_mesh(), in_specs=(seq, seq, seq, seq, P("data")),
                      out_specs=seq)
    return lambda q, k, v, ids: f(q, k, v, ids, jnp.array(LENGTHS))


def _reference(q, k, v, mask, **kw):
    return ops.dot_product_attention(q, k, v, mask=mask, implementation="xla", **kw)


def _check_case(strategy, layout, heads, mask_name, **kw):
    q, k, v, w, ids = _inputs(heads)
    mask = _mask(mask_name, ids)
    f = _sharded(strategy, layout, mask_name, **kw)

    def loss(q, k, v, ids):
        return jnp.sum(f(q, k, v, ids) * to(w))

    def ref_loss(q, k, v):
        return jnp.sum(_reference(q, k, v, mask, **kw) * w)

    def to(x):
        return cp.to_layout(x, CTX, layout)

    def back(x):
        return cp.from_layout(x, CTX, layout)

    run = jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))
    out, grads = run(to(q), to(k), to(v), to(ids))
    # the one-device reference jitted too (eagerly each of its operations compiles alone)
    ref = jax.jit(lambda q, k, v: (_reference(q, k, v, mask, **kw),
                                   jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)))
    ref_out, ref_grads = ref(q, k, v)
    np.testing.assert_allclose(back(out), ref_out, atol=ATOL_F32, rtol=RTOL_F32)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(back(g), r, atol=GRAD_ATOL_F32, rtol=RTOL_F32, err_msg=name)


# A covering subset of strategy x layout x heads x mask (every pair of values appears).
CASES = [
    ("ring", "contiguous", "mha", "causal"),
    ("ring", "contiguous", "gqa", "window"),
    ("ring", "contiguous", "mqa", "segments"),
    ("ring", "zigzag", "gqa", "causal"),
    ("ring", "zigzag", "mqa", "window"),
    ("ring", "zigzag", "mha", "segments"),
    ("all_gather", "contiguous", "mqa", "causal"),
    ("all_gather", "contiguous", "mha", "window"),
    ("all_gather", "contiguous", "gqa", "segments"),
    ("all_gather", "zigzag", "mha", "causal"),
    ("all_gather", "zigzag", "gqa", "window"),
    ("all_gather", "zigzag", "mqa", "segments"),
]


@pytest.mark.parametrize("strategy,layout,heads,mask_name", CASES,
                         ids=["-".join(c) for c in CASES])
def test_matches_one_device(strategy, layout, heads, mask_name):
    _check_case(strategy, layout, heads, mask_name)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_global_lengths_and_sinks(strategy):
    """Lengths are global counts (compared with global positions); sinks join every row."""
    _check_case(strategy, "zigzag", "gqa", "lengths", sinks=jnp.array([0.5, -1.0, 0.0, 2.0]))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_score_mod_at_global_positions(strategy):
    """A distance penalty |t - s| is only right if t, s are the tokens' global positions."""
    def score_mod(s, b, n, t, kv):
        return s - 0.05 * jnp.abs(t - kv).astype(jnp.float32)

    _check_case(strategy, "contiguous", "gqa", "causal", score_mod=score_mod)


def test_ring_sinks_gradient():
    """d loss / d sinks of the ring (summed over the context devices) equals one device's."""
    q, k, v, w, ids = _inputs("mqa")
    sinks = jnp.array([0.5, -1.0, 0.0, 2.0])
    seq = P("data", "context")

    def sharded(sinks, q, k, v):
        body = functools.partial(ring.ring_attention, axis_name="context", mask=masks.Causal())
        f = jax.shard_map(lambda s, q, k, v: body(q, k, v, sinks=s), mesh=_mesh(),
                          in_specs=(P(), seq, seq, seq), out_specs=seq)
        return jnp.sum(f(sinks, q, k, v) * w)

    def ref(sinks):
        return jnp.sum(_reference(q, k, v, masks.Causal(), sinks=sinks) * w)

    got = jax.jit(jax.grad(sharded))(sinks, q, k, v)
    np.testing.assert_allclose(got, jax.grad(ref)(sinks), atol=GRAD_ATOL_F32, rtol=RTOL_F32)


SLOPE_CASES = [("ring", "contiguous", "in_specs"), ("ring", "zigzag", "closed"),
               ("all_gather", "zigzag", "in_specs"), ("all_gather", "contiguous", "closed")]


@pytest.mark.parametrize("strategy,layout,how", SLOPE_CASES, ids=["-".join(c) for c in SLOPE_CASES])
def test_score_mod_closure_gradients(strategy, layout, how):
    """Learned ALiBi slopes closed over by score_mod get one device's gradient (summed once
    over the devices, not once per device or per tile), passed replicated through
    ``in_specs`` or closed over by the shard_map body; q, k, v gradients unchanged."""
    q, k, v, w, _ = _inputs("gqa")
    slopes = jnp.array([0.3, -0.1, 0.05, 0.2])
    fn, seq = STRATEGIES[strategy], P("data", "context")
    to = functools.partial(cp.to_layout, num_devices=CTX, layout=layout)

    def body(sl, q, k, v):
        return fn(q, k, v, axis_name="context", mask=masks.Causal(), layout=layout,
                  score_mod=scores.alibi(sl))

    def sharded(sl, q, k, v):
        if how == "in_specs":
            f = jax.shard_map(body, mesh=_mesh(), in_specs=(P(), seq, seq, seq), out_specs=seq)
            return jnp.sum(f(sl, q, k, v) * to(w))
        f = jax.shard_map(functools.partial(body, sl), mesh=_mesh(), in_specs=(seq,) * 3,
                          out_specs=seq)
        return jnp.sum(f(q, k, v) * to(w))

    def ref(sl, q, k, v):
        out = _reference(q, k, v, masks.Causal(), score_mod=scores.alibi(sl))
        return jnp.sum(out * w)

    got = jax.jit(jax.grad(sharded, argnums=(0, 1, 2, 3)))(slopes, to(q), to(k), to(v))
    want = jax.grad(ref, argnums=(0, 1, 2, 3))(slopes, q, k, v)
    assert float(jnp.abs(want[0]).min()) > 1.0  # a gradient that a wrong sum would show
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=GRAD_ATOL_F32, err_msg="slopes")
    for name, g, r in zip("qkv", got[1:], want[1:], strict=True):
        np.testing.assert_allclose(cp.from_layout(g, CTX, layout), r, atol=GRAD_ATOL_F32,
                                   rtol=RTOL_F32, err_msg=name)


# ---------------------------------------------------------------------------
# Communication (HLO of the forward pass)
# ---------------------------------------------------------------------------


def _forward_hlo(strategy, layout="contiguous", heads="gqa"):
    q, k, v, _, ids = _inputs(heads)
    f = jax.jit(_sharded(strategy, layout, "causal"))
    return f.lower(q, k, v, ids).compile()


def test_ring_forward_hlo_permutes_kv_and_gathers_nothing():
    counts = hlo.collective_counts(_forward_hlo("ring"))
    assert counts.get("all-gather", 0) == 0, counts
    assert counts.get("all-reduce", 0) == 0, counts
    # k and v each sent once per ring step (the steps are one scan body): >= 2 permutes
    assert counts.get("collective-permute", 0) >= 2, counts


def test_all_gather_forward_hlo_one_gather():
    counts = hlo.collective_counts(_forward_hlo("all_gather"))
    assert counts.get("all-gather", 0) == 1, counts  # K and V stacked into one
    assert counts.get("collective-permute", 0) == 0, counts


# ---------------------------------------------------------------------------
# Load balance
# ---------------------------------------------------------------------------


def _tile_counts(layout, P_=8, L=32, block=8):
    mesh = jax.make_mesh((P_,), ("context",), axis_types=(AxisType.Auto,))
    q = jnp.zeros((1, P_ * L, 1, 4))

    def body(q):
        n = ring.ring_tile_counts(q, q, axis_name="context", mask=masks.Causal(), layout=layout,
                                  block_q=block, block_kv=block)
        return n[None]

    f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "context"), out_specs=P("context"))
    return np.asarray(jax.jit(f)(q))


def test_zigzag_balances_causal_work():
    zig, cont = _tile_counts("zigzag"), _tile_counts("contiguous")
    # one device's share of the lower triangle of a 256 x 256 causal map in 8 x 8 tiles
    total = 32 * 33 // 2
    assert zig.sum() == cont.sum() == total, (zig, cont)
    assert (zig.max() - zig.min()) / zig.max() <= 0.10, zig
    assert cont.max() > 2 * cont.min(), cont  # contiguous is unbalanced: the test can fail


# ---------------------------------------------------------------------------
# Decoding with the cache split over `context`
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads,steps", [("gqa", 1), ("mqa", 3)])
def test_context_decode_matches_full_cache(heads, steps):
    N, K = HEADS[heads]
    S = 32
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (B, steps, N, H))
    kc = jax.random.normal(ks[1], (B, S, K, H))
    vc = jax.random.normal(ks[2], (B, S, K, H))
    lengths = jnp.array([21, 7])  # row 1's keys all sit on the first two devices
    seq, rep = P("data", "context"), P("data")

    f = jax.jit(jax.shard_map(
        lambda q, kc, vc, n: cp.context_decode_attention(q, kc, vc, n, axis_name="context"),
        mesh=_mesh(), in_specs=(rep, seq, seq, rep), out_specs=rep))
    compiled = f.lower(q, kc, vc, lengths).compile()
    got = compiled(q, kc, vc, lengths)
    q_pos = lengths[:, None] - steps + jnp.arange(steps)[None]
    want = _reference(q, kc, vc, masks.Causal() & masks.Lengths(lengths), q_positions=q_pos)
    np.testing.assert_allclose(got, want, atol=ATOL_F32, rtol=RTOL_F32)
    counts = hlo.collective_counts(compiled)
    assert sum(counts.values()) == 1, counts  # one collective per step


# ---------------------------------------------------------------------------
# Layouts and errors (no compilation)
# ---------------------------------------------------------------------------


def test_layout_round_trip_and_positions():
    x = jnp.arange(2 * 16).reshape(2, 16)
    z = cp.to_layout(x, 4, "zigzag")
    assert z[0, :4].tolist() == [0, 1, 14, 15]  # device 0: chunks 0 and 7
    np.testing.assert_array_equal(cp.from_layout(z, 4, "zigzag"), x)
    perm = cp.layout_permutation(16, 4, "zigzag")
    assert sorted(perm.tolist()) == list(range(16))
    assert cp.positions(3, 4, 4, "contiguous").tolist() == [12, 13, 14, 15]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.check_layout("striped", 4)
    with pytest.raises(ValueError, match="even local query length; got 3"):
        cp.check_layout("zigzag", 3, "local query length")
    with pytest.raises(ValueError, match="multiple of 4 devices"):
        cp.layout_permutation(10, 4, "contiguous")
    with pytest.raises(TypeError, match="BlockSparse"):
        cp.prepare_mask(masks.BlockSparse.local_global(2, 2, 4, window=1))
    with pytest.raises(TypeError, match="mask object"):
        cp.prepare_mask(jnp.ones((4, 4), bool))
    assert isinstance(cp.prepare_mask(masks.Causal() & masks.Lengths(jnp.array([3]))).b,
                      cp.GlobalLengths)
