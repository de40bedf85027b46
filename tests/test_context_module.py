"""The module on a ``(data, model, context)`` mesh: one call is the one-device math.

Expected values come from the unsharded ``MultiHeadAttention`` with the same
parameters; the sharded module gets its inputs (and returns its outputs) in the
layout's order (``to_layout``; identity for contiguous). Each case compiles one
program: forward output plus the gradients of ``sum(y * ct)`` w.r.t. every
parameter and the input.
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from attention_jax import MultiHeadAttention, masks
from attention_jax import sharding as sh
from attention_jax.parallel import context as cp
from tests.helpers import jitted

ATOL_F32, RTOL_F32 = 2e-5, 1e-5  # the ring / gather merge softmaxes in another order
B, T, D, H = 2, 16, 16, 4
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
PARAMS = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "k_bias", "v_bias", "o_bias")


def _module(heads: str) -> MultiHeadAttention:
    N, K = HEADS[heads]
    rng = np.random.default_rng(N * 10 + K)

    def init(std=None):
        def f(key, shape, dtype):
            scale = 1.0 / np.sqrt(shape[0]) if std is None else std
            return jnp.asarray(rng.standard_normal(shape) * scale, dtype)
        return f

    return MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, kernel_init=init(),
                              bias_init=init(0.5), rngs=nnx.Rngs(0))


@functools.cache
def _data():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    ids = jnp.asarray(np.array([[0] * 3 + [1] * 9 + [2] * 4, [0] * 11 + [1] * 5]), jnp.int32)
    return x, ct, ids


def _mask(name: str, ids):
    return {"causal": None, "window": masks.SlidingWindow(5), "segments": masks.Segments(ids)}[name]


def _loss(model, x, mask, ct):
    return jnp.sum(model(x, mask=mask, is_causal=True) * ct)


def _run(model, x, mask, ct):
    y = model(x, mask=mask, is_causal=True)
    grads = nnx.grad(_loss, argnums=(0, 1))(model, x, mask, ct)
    return y, grads


def _param_grads(g) -> dict[str, jax.Array]:
    return {path[-1]: v.get_value() if hasattr(v, "get_value") else v
            for path, v in nnx.to_flat_state(g) if path[-1] in PARAMS}


# (data, model, context) x strategy x layout x heads x mask: a covering subset (every mesh
# with both strategies and both layouts; every heads and mask value with both strategies).
CASES = [
    ((1, 1, 8), "ring", "zigzag", "mha", "causal"),
    ((1, 1, 8), "all_gather", "contiguous", "gqa", "segments"),
    ((1, 2, 4), "ring", "contiguous", "gqa", "window"),
    ((1, 2, 4), "all_gather", "zigzag", "mqa", "causal"),
    ((2, 2, 2), "ring", "zigzag", "mqa", "segments"),
    ((2, 2, 2), "all_gather", "contiguous", "mha", "window"),
    ((2, 1, 4), "ring", "contiguous", "mha", "segments"),
    ((2, 1, 4), "all_gather", "zigzag", "gqa", "window"),
]


@pytest.mark.parametrize("mesh_shape,strategy,layout,heads,mask_name", CASES,
                         ids=["x".join(map(str, c[0])) + "-" + "-".join(c[1:]) for c in CASES])
def test_module_matches_one_device(mesh_shape, strategy, layout, heads, mask_name):
    x, ct, ids = _data()
    ref = _module(heads)
    y_ref, (g_ref, gx_ref) = nnx.jit(_run)(ref, x, _mask(mask_name, ids), ct)
    c = mesh_shape[2]
    mesh = sh.make_mesh(*mesh_shape[:2], context=c, axis_types=AxisType.Auto)
    hp = sh.head_parallel(_module(heads), mesh, context_strategy=strategy,
                          context_layout=layout)
    to = functools.partial(cp.to_layout, num_devices=c, layout=layout)
    y, (g, gx) = nnx.jit(_run)(hp, to(x), _mask(mask_name, to(ids)), to(ct))
    chex.assert_trees_all_close(y, to(y_ref), atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(gx, to(gx_ref), atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(_param_grads(g), _param_grads(g_ref), atol=ATOL_F32,
                                rtol=RTOL_F32)
    assert y.sharding.spec[1] == "context"  # y: [B/data, T/context, D]


def test_optimizer_steps_and_model_all_reduce_count():
    """Two SGD steps equal one device's; the forward keeps head parallelism's single
    all-reduce over ``model`` (the context axis adds only its own collectives)."""
    x, ct, _ = _data()
    mesh = sh.make_mesh(1, 2, context=4, axis_types=AxisType.Auto)
    hp = sh.head_parallel(_module("gqa"), mesh, context_strategy="ring")
    ref = _module("gqa")

    @nnx.jit
    def train_step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(_loss)(model, x, None, ct)
        optimizer.update(model, grads)
        return loss

    losses = {}
    for name, model in (("sharded", hp), ("ref", ref)):
        optimizer = nnx.Optimizer(model, optax.sgd(1e-2, momentum=0.9), wrt=nnx.Param)
        losses[name] = [train_step(model, optimizer, x) for _ in range(2)]
    chex.assert_trees_all_close(losses["sharded"], losses["ref"], atol=1e-4, rtol=RTOL_F32)
    chex.assert_trees_all_close({n: getattr(hp.module, n)[...] for n in PARAMS},
                                {n: getattr(ref, n)[...] for n in PARAMS}, atol=ATOL_F32,
                                rtol=RTOL_F32)

    fwd = nnx.jit(lambda m, x: m(x, is_causal=True))
    summary = sh.collective_summary(fwd.lower(hp, x).compile(), mesh)
    heads_only = sh.head_parallel(_module("gqa"), sh.make_mesh(1, 2, devices=jax.devices()[:2],
                                                                axis_types=AxisType.Auto))
    base = sh.collective_summary(fwd.lower(heads_only, x).compile(), heads_only.mesh)
    assert summary.get("all-reduce@model") == base.get("all-reduce@model") == 1, (summary, base)
    # the ring's K/V (permutes carry source-target pairs, not groups: no axis attributed)
    assert sum(v for k, v in summary.items() if k.startswith("collective-permute")) >= 2, summary
    assert not any(k.startswith("all-gather") for k in summary), summary


def test_make_mesh_context_axis_and_errors():
    assert tuple(sh.make_mesh(2, 4).axis_names) == ("data", "model")
    mesh = sh.make_mesh(2, 2, context=2)
    assert dict(mesh.shape) == {"data": 2, "model": 2, "context": 2}
    assert dict(sh.make_mesh(2, context=2).shape)["model"] == 2
    with pytest.raises(ValueError, match=r"data \* model \* context = 2 \* 2 \* 3 = 12"):
        sh.make_mesh(2, 2, context=3)
    with pytest.raises(ValueError, match="needs a mesh with a 'context' axis"):
        sh.head_parallel(_module("mha"), sh.make_mesh(2, 4), context_strategy="ring")
    with pytest.raises(ValueError, match="context_strategy must be one of"):
        sh.head_parallel(_module("mha"), mesh, context_strategy="ulysses")
    hp = sh.head_parallel(_module("mqa"), mesh)
    assert hp.context_strategy == "all_gather"  # the documented default for K < N
    x = jnp.ones((2, 6, D))
    with pytest.raises(ValueError, match=r"even query length T / context \(6 / 2\); got 3"):
        sh.head_parallel(_module("mha"), mesh, context_layout="zigzag")(x)
    with pytest.raises(TypeError, match="mask objects"):
        hp(jnp.ones((2, 8, D)), mask=jnp.ones((8, 8), bool))
    with pytest.raises(ValueError, match="positions / kv_positions"):
        hp(jnp.ones((2, 8, D)), positions=jnp.arange(8))


# ---------------------------------------------------------------------------
# Decoding with the cache's slots split over context
# ---------------------------------------------------------------------------

DEC_L = 16  # cache slots: 2 per device on (1, 1, 8), 4 on (1, 2, 4)
DEC_PROMPT = np.array([7, 4])  # ragged prompts (right padded to 7)
DEC_STEPS = 4  # row 0 ends at slot 11: its tokens span 6 of 8 devices


def _dec_module(heads: str, **options) -> MultiHeadAttention:
    N, K = HEADS[heads]
    m = MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rope=10_000.0, rngs=nnx.Rngs(3),
                           **options)
    for name in ("q_bias", "k_bias", "v_bias", "o_bias", "sinks"):
        p = getattr(m, name, None)
        if p is not None:  # non-zero: a bias added per device (not once) would show
            p[...] = jax.random.normal(jax.random.key(len(name)), p.shape) * 0.5
    return m


def _dec_tokens():
    return jax.random.normal(jax.random.key(7), (B, int(DEC_PROMPT.max()) + DEC_STEPS, D))


def _dec_run(decode, cache, x, mask_fn=None):
    """Ragged prefill, then DEC_STEPS single tokens: (outputs, cache)."""
    p0 = int(DEC_PROMPT.max())
    kw = {} if mask_fn is None else {"mask": mask_fn(cache, p0)}
    y, cache = decode(x[:, :p0], cache, valid_lengths=jnp.asarray(DEC_PROMPT), **kw)
    ys = [y]
    for i in range(DEC_STEPS):
        kw = {} if mask_fn is None else {"mask": mask_fn(cache, 1)}
        y, cache = decode(x[:, p0 + i:p0 + i + 1], cache, **kw)
        ys.append(y)
    return ys, cache


DECODE_CASES = [((1, 1, 8), h, {}) for h in HEADS] + [((1, 2, 4), h, {}) for h in HEADS] + [
    ((2, 2, 2), "gqa", {"softcap": 2.0, "sinks": True, "sliding_window": 5}),
    ((1, 2, 4), "mqa", {"dtype_cache": jnp.int8}),
]


@pytest.mark.parametrize(
    "mesh_shape,heads,options", DECODE_CASES,
    ids=["x".join(map(str, c[0])) + "-" + c[1] + "".join("-" + k for k in c[2])
         for c in DECODE_CASES])
def test_decode_over_context_equals_one_device(mesh_shape, heads, options):
    """Prefill + steps with the cache's slots over ``context`` = the one-device decode
    (outputs and the cache, gathered); each slot stored on the device that holds it."""
    options = dict(options)
    cache_dtype = options.pop("dtype_cache", None)
    ref = _dec_module(heads, **options)
    mesh = sh.make_mesh(*mesh_shape[:2], context=mesh_shape[2])
    hp = sh.head_parallel(_dec_module(heads, **options), mesh)
    x = _dec_tokens()
    ys0, c0 = _dec_run(jitted(ref, "decode"), ref.init_cache(B, DEC_L, cache_dtype), x)
    c1 = hp.init_cache(B, DEC_L, cache_dtype)
    assert c1.k.sharding.spec[2] == "context"
    for shard in c1.k.addressable_shards:
        assert shard.data.shape[2] == DEC_L // mesh_shape[2]  # slots split, not copied
    step = nnx.jit(lambda hp, x, c, **kw: hp.decode(x, c, **kw), donate_argnums=2)
    ys1, c1 = _dec_run(lambda x, c, **kw: step(hp, x, c, **kw), c1, x)
    for y0, y1 in zip(ys0, ys1, strict=True):
        chex.assert_trees_all_close(y1, y0, atol=ATOL_F32, rtol=RTOL_F32)
    assert c1.k.sharding.spec[2] == "context"
    np.testing.assert_array_equal(c1.lengths, DEC_PROMPT + DEC_STEPS)
    if cache_dtype is None:
        chex.assert_trees_all_close(c1, c0, atol=ATOL_F32, rtol=RTOL_F32)
    else:  # a rounding tie may fall the other way: one quantization step
        assert int(jnp.max(jnp.abs(c1.k.astype(jnp.int32) - c0.k.astype(jnp.int32)))) <= 1


def test_decode_over_context_with_a_mask_and_left_padding():
    """A dense [B, 1, t, L] mask (sharded over context with the slots) and left-padded rows."""
    from attention_jax import cache as kv_cache

    ref, hp = _dec_module("gqa"), sh.head_parallel(_dec_module("gqa"),
                                                    sh.make_mesh(1, 2, context=4))
    pad = jnp.array([0, 3])

    def window(cache, t):
        return masks.sliding_window_mask(t, DEC_L, window=4, offset=cache.lengths)

    x = _dec_tokens()
    ys0, _ = _dec_run(jitted(ref, "decode"), kv_cache.left_padded(ref.init_cache(B, DEC_L), pad),
                      x, window)
    ys1, _ = _dec_run(hp.decode, kv_cache.left_padded(hp.init_cache(B, DEC_L), pad), x, window)
    for y0, y1 in zip(ys0, ys1, strict=True):
        chex.assert_trees_all_close(y1, y0, atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("mesh_shape,heads", [((1, 1, 8), "gqa"), ((1, 2, 4), "mha"),
                                              ((1, 2, 4), "mqa")],
                         ids=["1x1x8-gqa", "1x2x4-mha", "1x2x4-mqa"])
def test_decode_step_hlo_one_small_collective_over_context(mesh_shape, heads):
    """One step: one all-reduce over ``context`` of ``[c, B, t, N/model, V+1]`` floats (the
    partials), the psum over ``model``, and no all-gather (of the cache or anything)."""
    mesh = sh.make_mesh(*mesh_shape[:2], context=mesh_shape[2])
    hp = sh.head_parallel(_dec_module(heads), mesh)
    graphdef, state = nnx.split(hp)

    def step(state, x, cache):
        return nnx.merge(graphdef, state).decode(x, cache)

    def compiled(length):
        cache = hp.init_cache(B, length)
        return jax.jit(step).lower(state, _dec_tokens()[:, :1], cache).compile()

    def all_reduce_sizes(text):
        return sorted(int(np.prod([int(d) for d in m.split(",") if d]))
                      for m in re.findall(r"f32\[([\d,]*)\][^\n]*all-reduce\(", text))

    short, long = compiled(DEC_L), compiled(8 * DEC_L)
    summary = sh.collective_summary(short, mesh)
    want = {"all-reduce@context": 1}
    if mesh_shape[1] > 1:
        want["all-reduce@model"] = 1
    assert summary == want, summary
    assert sh.collective_summary(long, mesh) == want
    c, N = mesh_shape[2], HEADS[heads][0]
    partials = c * B * 1 * (N // mesh_shape[1]) * (H + 1)  # [c, B, t, N/model, V+1]
    sizes = all_reduce_sizes(short.as_text())
    assert partials in sizes and max(sizes) <= max(partials, B * D), (sizes, partials)
    assert all_reduce_sizes(long.as_text()) == sizes  # nothing grows with the cache


def test_decode_over_context_cache_length_and_a_placed_cache():
    hp = sh.head_parallel(_dec_module("gqa"), sh.make_mesh(1, 2, context=4))
    one_device = _dec_module("gqa").init_cache(B, 14)
    with pytest.raises(ValueError, match="max_length 14 is not divisible by the context axis "
                                         "size 4"):
        sh.shard_cache(one_device, hp.module, hp.mesh)
    with pytest.raises(ValueError, match="max_length 14 is not divisible by the context axis "
                                         "size 4"):
        hp.init_cache(B, 14)  # named by the module too (not jax's IndivisibleError)
    # a cache prefilled on one device, placed over context, continues there
    ref, x = _dec_module("gqa"), _dec_tokens()
    _, c0 = ref.decode(x[:, :6], ref.init_cache(B, 16))
    c1 = sh.shard_cache(c0, hp.module, hp.mesh)
    assert c1.k.sharding.spec == jax.sharding.PartitionSpec("data", "model", "context", None)
    y0, c0 = ref.decode(x[:, 6:7], c0)
    y1, c1 = hp.decode(x[:, 6:7], c1)
    chex.assert_trees_all_close(y1, y0, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(c1, c0, atol=ATOL_F32, rtol=RTOL_F32)
