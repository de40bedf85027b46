"""The module on a ``(data, model, context)`` mesh: one call is the one-device math.

Expected values come from the unsharded ``MultiHeadAttention`` with the same
parameters; the sharded module gets its inputs (and returns its outputs) in the
layout's order (``to_layout``; identity for contiguous). Each case compiles one
program: forward output plus the gradients of ``sum(y * ct)`` w.r.t. every
parameter and the input.
"""

from __future__ import annotations

import functools

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
