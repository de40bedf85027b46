"""Mask objects: their dense form, their block maps, and every backend against
PyTorch's FlexAttention (forward) and the dense einsum path (forward and gradients).

FlexAttention (``torch.nn.attention.flex_attention``) runs its forward pass on CPU
in torch 2.13.0; its ``mask_mod`` / ``score_mod`` are written here independently
of our mask classes (torch tensors, torch ops). Shapes are tiny and shared so
that the compiled functions are reused: B=2, T=12, S=16, N=4, H=8, 4 x 4 tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_jax import masks as M
from attention_jax import ops, scores
from attention_jax.kernels import blockwise
from tests.helpers import BF16_GRAD_TOL, BF16_TOL, F32_GRAD_TOL, F32_TOL, HEADS

torch = pytest.importorskip("torch")
flex = pytest.importorskip("torch.nn.attention.flex_attention")

B, T, S, H, V = 2, 12, 16, 8, 8
BLK = 4
RNG = np.random.default_rng(0)
Q_IDS = np.array([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 2 + [1] * 6 + [2] * 4])
KV_IDS = np.array([[0] * 6 + [1] * 6 + [-1] * 4, [0] * 3 + [1] * 8 + [2] * 5])
KV_LEN, Q_LEN = np.array([9, 16]), np.array([12, 7])
LAYOUT = M.BlockSparse.random(3, 4, 4, 4, num_random=2, num_heads=4, seed=3)


def _masks():
    """name -> (our mask object, torch mask_mod(b, h, q, kv) at positions 0..)."""
    qi, ki = torch.tensor(Q_IDS), torch.tensor(KV_IDS)
    kl, ql = torch.tensor(KV_LEN), torch.tensor(Q_LEN)
    lay = torch.tensor(LAYOUT.array)
    return {
        "causal": (M.Causal(), lambda b, h, q, kv: kv <= q),
        "causal_br": (M.Causal(S - T), lambda b, h, q, kv: kv <= q + (S - T)),
        "window": (M.Causal() & M.SlidingWindow(3), lambda b, h, q, kv: (kv <= q) & (q - kv <= 3)),
        "window2": (M.SlidingWindow(2, 5), lambda b, h, q, kv: (kv - q >= -2) & (kv - q <= 5)),
        "chunked": (M.Chunked(5) & M.Causal(), lambda b, h, q, kv: (q // 5 == kv // 5) & (kv <= q)),
        "segments": (M.Segments(jnp.asarray(Q_IDS), jnp.asarray(KV_IDS)),
                     lambda b, h, q, kv: (qi[b, q] == ki[b, kv]) & (qi[b, q] >= 0)),
        "lengths": (M.Lengths(jnp.asarray(KV_LEN), jnp.asarray(Q_LEN)),
                    lambda b, h, q, kv: (kv < kl[b]) & (q < ql[b])),
        "blocksparse": (LAYOUT, lambda b, h, q, kv: lay[h, q // 4, kv // 4]),
        "function": (M.FromFunction(lambda b, n, t, s: (t + 2 * s + n) % 3 != 0),
                     lambda b, h, q, kv: (q + 2 * kv + h) % 3 != 0),
        "or": (M.Chunked(4) | (M.Causal() & M.SlidingWindow(1)),
               lambda b, h, q, kv: (q // 4 == kv // 4) | ((kv <= q) & (q - kv <= 1))),
        "seg_causal": (M.Segments(jnp.asarray(Q_IDS), jnp.asarray(KV_IDS)) & M.Causal(),
                       lambda b, h, q, kv: (qi[b, q] == ki[b, kv]) & (qi[b, q] >= 0) & (kv <= q)),
    }


MASKS = _masks()
SLOPES = jnp.asarray(scores.alibi_slopes(4))
_TORCH_SLOPES = torch.tensor(np.asarray(SLOPES))
SCORE_MODS = {
    None: (None, None),
    "softcap": (scores.softcap(1.5), lambda s, b, h, q, kv: 1.5 * torch.tanh(s / 1.5)),
    "alibi": (scores.alibi(SLOPES),
              lambda s, b, h, q, kv: s + _TORCH_SLOPES[h] * (kv - q)),
}


def _qkv(N, K, dtype=jnp.float32, seed=0, T=T, S=S):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype)
                 for s in ((B, T, N, H), (B, S, K, H), (B, S, K, V)))


def _blockwise(q, k, v, mask, **kw):
    return blockwise.blockwise_attention(q, k, v, mask, block_q=BLK, block_kv=BLK, **kw)


def _flex(q, k, v, mask_mod, score_mod):
    N, K = q.shape[2], k.shape[2]
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float32)).transpose(1, 2) for x in (q, k, v))
    bm = flex.create_block_mask(mask_mod, B, N, q.shape[1], k.shape[1], device="cpu",
                                BLOCK_SIZE=4)
    out = flex.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=bm,
                              enable_gqa=N != K)
    return out.transpose(1, 2).numpy()


# ---------------------------------------------------------------------------
# Forward against FlexAttention
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "heads"), [(name, "gqa") for name in MASKS] + [
    ("seg_causal", "mha"), ("seg_causal", "mqa"), ("blocksparse", "mqa"), ("window", "mha")])
def test_masks_match_flex_attention(name, heads):
    N, K = HEADS[heads]
    q, k, v = _qkv(N, K)
    ours, mask_mod = MASKS[name]
    want = _flex(q, k, v, mask_mod, None)
    # FlexAttention gives NaN-free zeros... or not, for rows that see nothing: compare seen rows.
    seen = np.asarray(ours.dense(B, N, T, S).any(-1)).transpose(0, 2, 1)  # [B, T, N]
    for impl in ("blockwise", "xla"):
        got = (_blockwise(q, k, v, ours) if impl == "blockwise" else
               ops.dot_product_attention(q, k, v, ours, implementation="xla"))
        got = np.asarray(got)
        np.testing.assert_allclose(got[seen], want[seen], err_msg=impl, **F32_TOL)
        np.testing.assert_array_equal(got[~seen], 0.0)


@pytest.mark.parametrize(("name", "mod"), [("causal", "softcap"), ("window", "alibi"),
                                           ("segments", "alibi"), ("blocksparse", "softcap")])
def test_score_mods_match_flex_attention(name, mod):
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=1)
    ours, mask_mod = MASKS[name]
    sm, torch_sm = SCORE_MODS[mod]
    want = _flex(q, k, v, mask_mod, torch_sm)
    seen = np.asarray(ours.dense(B, N, T, S).any(-1)).transpose(0, 2, 1)
    for impl in ("blockwise", "xla"):
        got = np.asarray(
            _blockwise(q, k, v, ours, score_mod=sm) if impl == "blockwise" else
            ops.dot_product_attention(q, k, v, ours, score_mod=sm, implementation="xla"))
        np.testing.assert_allclose(got[seen], want[seen], err_msg=impl, **F32_TOL)


# ---------------------------------------------------------------------------
# Gradients against the dense einsum path
# ---------------------------------------------------------------------------


def _loss(fn):
    def loss(q, k, v, sinks, slopes):
        out = fn(q, k, v, sinks, slopes)
        w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4)))


def _compare(mask, *, mod=None, use_sinks=False, heads="gqa", dtype=jnp.float32, jit_outer=True,
             q_positions=None, kv_positions=None):
    N, K = HEADS[heads]
    q, k, v = _qkv(N, K, dtype, seed=2)
    sinks = jnp.asarray(np.random.default_rng(3).standard_normal(N), jnp.float32)

    def make(impl):
        def fn(q, k, v, sinks, slopes):
            sm = {None: None, "alibi": scores.alibi(slopes), "softcap": scores.softcap(2.0)}[mod]
            kw = dict(score_mod=sm, sinks=sinks if use_sinks else None,
                      q_positions=q_positions, kv_positions=kv_positions)
            if impl == "blockwise":
                return _blockwise(q, k, v, mask, **kw)
            return ops.dot_product_attention(q, k, v, mask, implementation="xla", **kw)
        return _loss(fn)

    (l0, g0), (l1, g1) = make("xla")(q, k, v, sinks, SLOPES), make("blockwise")(
        q, k, v, sinks, SLOPES)
    tol, gtol = (F32_TOL, F32_GRAD_TOL) if dtype == jnp.float32 else (BF16_TOL, BF16_GRAD_TOL)
    np.testing.assert_allclose(l1, l0, **tol)
    for name, a, b in zip(["dq", "dk", "dv", "dsinks", "dslopes"], g1, g0, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, err_msg=name, **gtol)
    return g1


@pytest.mark.parametrize(("name", "heads"), [
    (name, "gqa") for name in ("causal", "window", "segments", "lengths", "blocksparse", "or")
] + [("seg_causal", "mha"), ("seg_causal", "mqa")])
def test_mask_gradients_match_einsum(name, heads):
    _compare(MASKS[name][0], heads=heads)


@pytest.mark.parametrize(("mod", "use_sinks"), [("alibi", False), ("softcap", True),
                                                 (None, True), ("alibi", True)])
def test_score_mod_and_sink_gradients_match_einsum(mod, use_sinks):
    g = _compare(MASKS["window"][0], mod=mod, use_sinks=use_sinks)
    if mod == "alibi":
        assert np.abs(np.asarray(g[4])).max() > 0  # the slopes do get a gradient
    if use_sinks:
        assert np.abs(np.asarray(g[3])).max() > 0


def test_positions_decode_step_and_shard():
    """Masks at absolute positions: queries 20.. against keys 8.. (a context-parallel shard)."""
    _compare(M.Causal() & M.SlidingWindow(6), mod="alibi", q_positions=jnp.arange(T) + 20,
             kv_positions=jnp.arange(S) + 8)
    per_row = jnp.stack([jnp.arange(T) + 2, jnp.arange(T) + 5])  # [B, T]
    _compare(M.Causal() & M.SlidingWindow(6), q_positions=per_row)


def test_bf16_structured():
    _compare(MASKS["seg_causal"][0], mod="softcap", use_sinks=True, dtype=jnp.bfloat16)


# ---------------------------------------------------------------------------
# Block maps and skipping
# ---------------------------------------------------------------------------


def test_block_map_counts():
    """The tiles the kernel runs, for T = S = 16 and 4 x 4 tiles (16 tiles)."""
    def count(mask, **kw):
        return blockwise.tile_counts(M.block_map(mask, 1, 4, 16, 16, 4, 4, **kw).max((0, 1)))

    assert count(M.Causal()) == {"full": 6, "partial": 4, "computed": 10, "skipped": 6}
    # window of 4 keys back: the diagonal tile and the one before it, both partial
    assert count(M.Causal() & M.SlidingWindow(3)) == {"full": 0, "partial": 7, "computed": 7,
                                                      "skipped": 9}
    ids = jnp.repeat(jnp.arange(4), 4)[None]  # 4 documents of 4 tokens, aligned with the tiles
    assert count(M.Segments(ids)) == {"full": 4, "partial": 0, "computed": 4, "skipped": 12}
    assert count(M.Segments(ids) & M.Causal())["computed"] == 4
    assert count(None)["computed"] == 16


def test_block_map_static_for_structure_dynamic_for_data():
    assert isinstance(M.block_map(M.Causal() & M.Chunked(4), 1, 1, 8, 8, 4, 4), np.ndarray)
    seg = M.Segments(jnp.zeros((1, 8), jnp.int32))
    out = jax.jit(lambda m: M.block_map(m, 1, 1, 8, 8, 4, 4))(seg)
    assert isinstance(out, jax.Array) and out.tolist() == [[[[2, 2], [2, 2]]]]


@pytest.mark.parametrize("name", ["causal", "window", "segments"])
def test_skipped_tiles_are_never_computed(name):
    """NaN in keys / values of tiles the block map skips: a computed tile would spread
    them (0 * NaN), so finite outputs and gradients prove the tiles were not run."""
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=4, T=16, S=16)
    mask = {"causal": M.Causal(), "window": M.Causal() & M.SlidingWindow(3),
            "segments": M.Segments(jnp.repeat(jnp.arange(4), 4)[None].repeat(B, 0))}[name]
    # Keys 12..15 (tile 3) are seen only by queries 12..15 (tile 3) under all three masks.
    cls = np.asarray(M.block_map(mask, B, N, 16, 16, 4, 4)).max((0, 1))
    assert (cls[:3, 3] == 0).all()
    poison = jnp.zeros((B, 16, 1, 1)).at[:, 12:].set(jnp.nan)
    kp, vp = k + poison, v + poison

    def loss(q, k, v):
        return _blockwise(q[:, :12], k, v, _first_rows(mask, 12)).sum()

    out = _blockwise(q[:, :12], kp, vp, _first_rows(mask, 12))
    assert np.isfinite(np.asarray(out)).all()
    dq, dk, dv = jax.grad(loss, (0, 1, 2))(q, kp, vp)
    assert np.isfinite(np.asarray(dq)).all()
    np.testing.assert_array_equal(np.asarray(dk[:, 12:]), 0.0)
    # and with the poison removed, the same queries give the einsum path's answer
    want = ops.dot_product_attention(q[:, :12], k, v, _first_rows(mask, 12), implementation="xla")
    np.testing.assert_allclose(out, want, **F32_TOL)


def _first_rows(mask, t):
    """The mask for the first t queries (Segments keeps its key ids)."""
    if isinstance(mask, M.Segments):
        return M.Segments(mask.q_ids[:, :t], mask.q_ids)
    return mask


def test_fully_masked_rows_zero_with_finite_gradients():
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=5)
    seg = MASKS["segments"][0]  # batch 0: queries 9..11 are padding (id -1)
    out = _blockwise(q, k, v, seg)
    np.testing.assert_array_equal(np.asarray(out[0, 9:]), 0.0)
    grads = jax.grad(lambda q, k, v: _blockwise(q, k, v, seg).sum(), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(grads[0][0, 9:]), 0.0)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.sampled_from(list(HEADS)),
    tlen=st.sampled_from([8, 12]),
    slen=st.sampled_from([8, 13]),
    left=st.integers(0, 9),
    cuts=st.lists(st.integers(1, 12), min_size=0, max_size=3),
    layout_seed=st.integers(0, 3),
    kind=st.sampled_from(["window", "segments", "blocks"]),
)
def test_property_structured_masks_equal_dense(heads, tlen, slen, left, cuts, layout_seed, kind):
    N, K = HEADS[heads]
    q, k, v = _qkv(N, K, seed=6, T=tlen, S=slen)
    if kind == "window":
        mask = M.Causal(slen - tlen) & M.SlidingWindow(left)
    elif kind == "blocks":
        mask = M.BlockSparse.random(3, 4, 4, 4, num_random=1 + layout_seed % 3, num_heads=N,
                                    seed=layout_seed)
    else:
        def ids(n):
            edges = sorted({c for c in cuts if c < n})
            seg = np.searchsorted(np.array(edges, int), np.arange(n), side="right")
            return np.where(np.arange(n) >= n - layout_seed, -1, seg)[None].repeat(B, 0)
        mask = M.Segments(jnp.asarray(ids(tlen)), jnp.asarray(ids(slen)))
    got = _blockwise(q, k, v, mask)
    want = ops.attention_core(q, k, v, mask.dense(B, N, tlen, slen))
    np.testing.assert_allclose(got, want, **F32_TOL)


# ---------------------------------------------------------------------------
# Objects: dense, pytrees, errors, head-parallel
# ---------------------------------------------------------------------------


def test_dense_rules():
    d = np.asarray(M.SlidingWindow(1, 1).dense(1, 1, 4, 4)[0, 0]).astype(int)
    np.testing.assert_array_equal(d, [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(M.Causal().dense(1, 1, 5, 7)[0, 0],
                                  ops.causal_block(5, 7))
    np.testing.assert_array_equal(M.Causal(2).dense(1, 1, 2, 4)[0, 0],
                                  M.causal_mask(2, 4, offset=2)[0, 0])
    lg = M.BlockSparse.local_global(4, 4, 2, window=1, num_global=1).array[0].astype(int)
    np.testing.assert_array_equal(lg, [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]])
    st_ = M.BlockSparse.strided(4, 4, 2, stride=2).array[0].astype(int)
    np.testing.assert_array_equal(st_, [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]])
    bb = M.BlockSparse.bigbird(1, 1, 1, num_q_blocks=6, num_kv_blocks=6, block_q=2,
                               num_heads=3, seed=0).array
    assert bb.shape == (3, 6, 6) and bb[:, 0].all() and bb[:, :, 0].all()
    assert (bb.sum(-1) >= 3).all()  # band + global + random
    r = M.BlockSparse.random(4, 8, 2, num_random=3, num_heads=2, seed=1).array
    assert (r.sum(-1) == 3).all() and not (r[0] == r[1]).all()  # per head


def test_masks_are_pytrees_through_jit_and_shard_map():
    seg = M.Segments(jnp.asarray(Q_IDS), jnp.asarray(KV_IDS)) & M.Causal()
    leaves, tree = jax.tree.flatten(seg)
    assert len(leaves) == 2 and jax.tree.unflatten(tree, leaves).dense(B, 1, T, S).shape == (
        B, 1, T, S)
    assert jax.tree.leaves(M.Causal() & M.SlidingWindow(3) & LAYOUT) == []
    f = jax.jit(lambda m: m.dense(B, 1, T, S))
    np.testing.assert_array_equal(f(seg), seg.dense(B, 1, T, S))


def test_head_parallel_with_head_offset_equals_one_device():
    """Heads split over 2 devices, each passing its first head as head_offset (traced):
    per-head block layouts and ALiBi slopes come out as on one device."""
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=7)
    mask = LAYOUT & M.Causal()
    heads = P(None, None, "model")

    def local(q, k, v):
        h0 = jax.lax.axis_index("model") * (N // 2)
        return _blockwise(q, k, v, mask, score_mod=scores.alibi(SLOPES), head_offset=h0)

    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads),
                                out_specs=heads))(q, k, v)
    want = ops.dot_product_attention(q, k, v, mask, score_mod=scores.alibi(SLOPES),
                                     implementation="xla")
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_mask_errors_name_the_problem():
    with pytest.raises(ValueError, match="SlidingWindow left must be >= 0; got -1"):
        M.SlidingWindow(-1)
    with pytest.raises(ValueError, match=r"q_ids must be \[2 or 1, 12\]"):
        _blockwise(*_qkv(4, 2), M.Segments(jnp.zeros((2, 5), jnp.int32)))
    with pytest.raises(TypeError, match="Segments q_ids must be integer"):
        M.Segments(jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="BlockSparse layout must be boolean"):
        M.BlockSparse(np.ones((2, 2), int), 2, 2)
    with pytest.raises(TypeError, match="combines mask objects"):
        M.Causal() & jnp.ones((4, 4), bool)
    with pytest.raises(ValueError, match=r"q_positions must be \[12\]"):
        ops.dot_product_attention(*_qkv(4, 2), M.Causal(), q_positions=jnp.arange(5))


# ---------------------------------------------------------------------------
# FromFunction: tiles classified from the function on the index grid
# ---------------------------------------------------------------------------

_CAUSAL_FN = M.FromFunction(lambda b, n, t, s: s <= t)


@pytest.mark.parametrize(("tlen", "slen", "blocks", "where"), [
    (16, 16, (4, 4), {}), (12, 16, (4, 4), {}), (10, 13, (4, 4), {}), (16, 16, (8, 4), {}),
    (4, 16, (4, 4), dict(q_positions=np.arange(4) + 5)),  # a prefill chunk at 5..8
    (12, 12, (4, 4), dict(q_positions=np.arange(12) + 2, kv_positions=np.arange(12) + 6)),
])
def test_from_function_equal_to_causal_skips_the_same_tiles(tlen, slen, blocks, where):
    got = M.block_map(_CAUSAL_FN, 1, 4, tlen, slen, *blocks, **where)
    want = M.block_map(M.Causal(), 1, 4, tlen, slen, *blocks, **where)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got.max((0, 1)), want.max((0, 1)))
    counts = blockwise.tile_counts(got.max((0, 1)))
    assert counts == blockwise.tile_counts(want.max((0, 1)))
    assert counts["skipped"] > 0 and counts["full"] + counts["partial"] > 0


def test_from_function_per_head_and_per_row_classes():
    """A function of the head and the batch row: each (b, n) gets its own classes,
    equal to the dense mask's tile by tile."""
    fn = M.FromFunction(lambda b, n, t, s: (s <= t - 4 * n) | (b == 1))
    cls = M.block_map(fn, 2, 3, 16, 16, 4, 4, head_offset=1)
    dense = np.asarray(fn.dense(2, 3, 16, 16, head_offset=1)).reshape(2, 3, 4, 4, 4, 4)
    any_, all_ = dense.any(axis=(3, 5)), dense.all(axis=(3, 5))
    np.testing.assert_array_equal(cls, np.where(all_, M.FULL, np.where(any_, M.PARTIAL,
                                                                        M.EMPTY)))
    assert cls.shape == (2, 3, 4, 4) and (cls[1] == M.FULL).all()


def test_from_function_conservative_when_traced_or_too_large(monkeypatch):
    from attention_jax.masks import structured

    everywhere = np.full((1, 1, 2, 2), M.PARTIAL)
    x = jnp.arange(8)
    traced = jax.jit(lambda x: M.block_map(M.FromFunction(lambda b, n, t, s: x[s] <= x[t]),
                                           1, 1, 8, 8, 4, 4))(x)
    np.testing.assert_array_equal(traced, everywhere)
    monkeypatch.setattr(structured, "FROM_FUNCTION_MAX_GRID", 63)  # the grid has 64 pairs
    np.testing.assert_array_equal(M.block_map(_CAUSAL_FN, 1, 1, 8, 8, 4, 4), everywhere)
    monkeypatch.setattr(structured, "FROM_FUNCTION_MAX_GRID", 64)
    np.testing.assert_array_equal(M.block_map(_CAUSAL_FN, 1, 1, 8, 8, 4, 4)[0, 0],
                                  [[M.PARTIAL, M.EMPTY], [M.FULL, M.PARTIAL]])


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_from_function_causal_outputs_and_gradients_equal_causal(heads):
    """The same tiles run with the same numbers: equal to Causal() on the blockwise path,
    and to the einsum path within tolerance (forward and gradients, with sinks and ALiBi)."""
    _compare(_CAUSAL_FN, heads=heads, mod="alibi", use_sinks=True)
    N, K = HEADS[heads]
    q, k, v = _qkv(N, K, seed=8, T=16, S=16)

    def grads(mask):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(
            _blockwise(q, k, v, mask) * jnp.cos(q[..., :V])), (0, 1, 2)))(q, k, v)

    (l0, g0), (l1, g1) = grads(M.Causal()), grads(_CAUSAL_FN)
    np.testing.assert_array_equal(l1, l0)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_array_equal(a, b)


def test_from_function_skipped_tiles_are_never_computed():
    """NaN keys / values in the tiles the function hides stay out of outputs and gradients."""
    N, K = HEADS["gqa"]
    q, k, v = _qkv(N, K, seed=4, T=16, S=16)
    poison = jnp.zeros((B, 16, 1, 1)).at[:, 12:].set(jnp.nan)
    kp, vp = k + poison, v + poison
    out = _blockwise(q[:, :12], kp, vp, _CAUSAL_FN)
    assert np.isfinite(np.asarray(out)).all()
    dq, dk, _ = jax.grad(lambda q, k, v: _blockwise(q[:, :12], k, v, _CAUSAL_FN).sum(),
                         (0, 1, 2))(q, kp, vp)
    assert np.isfinite(np.asarray(dq)).all()
    np.testing.assert_array_equal(np.asarray(dk[:, 12:]), 0.0)
