"""Head parallelism on 8 fake CPU devices: numbers, shardings, communication, errors.

The expected values always come from the unsharded ``MultiHeadAttention`` (one
device, no mesh); the sharded program is compiled once per (mesh, heads) case
and its HLO is read for the communication checks.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from attention_jax import MultiHeadAttention
from attention_jax import sharding as sh

# float32: the sharded program sums the heads' partial outputs in another order.
ATOL_F32 = 2e-5
RTOL_F32 = 1e-5

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (data, model)
HEADS = [(8, 8), (8, 4), (8, 2), (8, 1), (16, 4)]  # (N, K)
B, T, S, D, H = 8, 4, 6, 32, 4  # batch, query len, cross key len, width, head dim
DK, DV, V = 24, 20, 6  # cross-attention key / value widths, value head dim
PARAMS = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "k_bias", "v_bias", "o_bias")


def _ids(cases):
    return ["x".join(map(str, c)) for c in cases]


# ---------------------------------------------------------------------------
# Cases: a module, its inputs, and the unsharded answers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """``self``: self-attention, causal, a per-head mask [1, N, T, T] (split over model).
    ``cross``: cross-attention (S != T, other widths), a padding mask [B, 1, 1, S]
    (split over data)."""

    N: int
    K: int
    variant: str

    def module(self, dropout_rate: float = 0.0) -> MultiHeadAttention:
        """A fresh copy of the same parameters on every call (biases non-zero).

        head_parallel shards a module in place, so each caller gets its own clone.
        """
        return nnx.clone(self._module(dropout_rate))

    @functools.cache  # noqa: B019 (a handful of frozen cases)
    def _module(self, dropout_rate: float) -> MultiHeadAttention:
        cross = dict(in_k_features=DK, in_v_features=DV, v_head_dim=V)
        rng = np.random.default_rng(self.N * 10 + self.K)
        return MultiHeadAttention(
            D, self.N, num_kv_heads=self.K, head_dim=H, dropout_rate=dropout_rate,
            kernel_init=_numpy_init(rng), bias_init=_numpy_init(rng, 0.5),
            rngs=nnx.Rngs(params=0, dropout=1), **(cross if self.variant == "cross" else {}),
        )

    @functools.cache  # noqa: B019
    def inputs(self) -> tuple[tuple[jax.Array, ...], dict]:
        rng = np.random.default_rng(self.N * 10 + self.K + 1)
        xq = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
        if self.variant == "self":
            mask = jnp.asarray(rng.random((1, self.N, T, T)) < 0.8)
            return (xq,), dict(mask=mask, is_causal=True)
        xk = jnp.asarray(rng.standard_normal((B, S, DK)), jnp.float32)
        xv = jnp.asarray(rng.standard_normal((B, S, DV)), jnp.float32)
        lengths = np.arange(B) % S + 1  # every row its own length
        return (xq, xk, xv), dict(mask=jnp.asarray(np.arange(S) < lengths[:, None])[:, None, None])

    def cotangent(self) -> jax.Array:
        return jnp.asarray(np.random.default_rng(7).standard_normal((B, T, D)), jnp.float32)


def _numpy_init(rng: np.random.Generator, std: float | None = None):
    """Normal init from numpy (std 1/sqrt(fan_in) by default): no eager jax.random ops,
    whose per-shape compiles would dominate this file's runtime."""

    def init(key, shape, dtype):
        del key
        scale = 1.0 / np.sqrt(shape[0]) if std is None else std
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    return init


def _case(mesh_shape, heads) -> Case:
    variant = ("self", "cross")[(MESHES.index(mesh_shape) + HEADS.index(heads)) % 2]
    return Case(*heads, variant)


def _programs(model: nnx.Module, case: Case):
    """Forward (with weights) and input/param gradients of ``sum(y * ct)`` as pure functions."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _, kwargs = case.inputs()
    ct = case.cotangent()

    def forward(params, xs):
        return nnx.merge(graphdef, params, rest)(*xs, return_weights=True, **kwargs)

    def loss(params, xs):
        return jnp.sum(nnx.merge(graphdef, params, rest)(*xs, **kwargs) * ct)

    return params, forward, jax.grad(loss, argnums=(0, 1))


@functools.cache
def _reference(case: Case):
    """Unsharded ``(y, weights)`` and ``(param grads by name, input grads)``."""
    params, forward, grads = _programs(case.module(), case)
    xs, _ = case.inputs()
    out, (g_params, g_xs) = jax.jit(lambda p, xs: (forward(p, xs), grads(p, xs)))(params, xs)
    return out, (_by_name(g_params), g_xs)


def _by_name(state) -> dict[str, jax.Array]:
    """``{'q_kernel': array, ...}`` from a (possibly nested) Param state."""
    return {path[-1]: v.get_value() if hasattr(v, "get_value") else v
            for path, v in nnx.to_flat_state(state)}


@dataclasses.dataclass
class Sharded:
    case: Case
    mesh: jax.sharding.Mesh
    hp: sh.HeadParallelAttention
    out: tuple
    grads: tuple
    fwd_hlo: str
    bwd_hlo: str


@functools.cache
def _sharded(mesh_shape, heads) -> Sharded:
    """Compiles the head-parallel forward and gradients once per case (plain jax.jit)."""
    case = _case(mesh_shape, heads)
    mesh = sh.make_mesh(*mesh_shape)
    hp = sh.head_parallel(case.module(), mesh)
    params, forward, grads = _programs(hp, case)
    xs, _ = case.inputs()
    fwd = jax.jit(forward).lower(params, xs).compile()
    bwd = jax.jit(grads).lower(params, xs).compile()
    return Sharded(case, mesh, hp, fwd(params, xs), bwd(params, xs),
                   fwd.as_text(), bwd.as_text())


GRID = [(m, h) for m in MESHES for h in HEADS]
GRID_IDS = [f"mesh{m[0]}x{m[1]}-N{h[0]}K{h[1]}" for m, h in GRID]


# ---------------------------------------------------------------------------
# The 20-case grid: forward, gradients, placement, communication
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mesh_shape", "heads"), GRID, ids=GRID_IDS)
def test_forward_and_weights_match_one_device(mesh_shape, heads):
    run = _sharded(mesh_shape, heads)
    (y_ref, w_ref), _ = _reference(run.case)
    y, w = run.out
    chex.assert_trees_all_close((y, w), (y_ref, w_ref), atol=ATOL_F32, rtol=RTOL_F32)
    assert w.shape == (B, heads[0], T, S if run.case.variant == "cross" else T)
    assert y.sharding.spec == P(sh.DATA, None, None)
    assert w.sharding.spec == P(sh.DATA, sh.MODEL, None, None)


@pytest.mark.parametrize(("mesh_shape", "heads"), GRID, ids=GRID_IDS)
def test_gradients_match_one_device(mesh_shape, heads):
    run = _sharded(mesh_shape, heads)
    _, (g_ref, gx_ref) = _reference(run.case)
    g_params, g_xs = run.grads
    g = _by_name(g_params)
    assert set(g) == set(PARAMS)
    chex.assert_trees_all_close(g, g_ref, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(g_xs, gx_ref, atol=ATOL_F32, rtol=RTOL_F32)
    # Gradients come back sharded like the parameters they belong to.
    specs = sh.param_specs(run.hp, run.mesh)
    for name, grad in g.items():
        assert grad.sharding.spec == specs[f"module.{name}"], name


@pytest.mark.parametrize(("mesh_shape", "heads"), GRID, ids=GRID_IDS)
def test_each_device_holds_its_slice_of_the_kernels(mesh_shape, heads):
    run = _sharded(mesh_shape, heads)
    (N, K), m = heads, mesh_shape[1]
    dk, dv, v = (DK, DV, V) if run.case.variant == "cross" else (D, D, H)
    k_local = K // m if K % m == 0 else K  # split, or replicated when K < model
    expected = {"q_kernel": (D, N // m, H), "o_kernel": (N // m, v, D),
                "k_kernel": (dk, k_local, H), "v_kernel": (dv, k_local, v),
                "q_bias": (N // m, H), "o_bias": (D,)}
    for name, shape in expected.items():
        array = getattr(run.hp.module, name)[...]
        shapes = {s.data.shape for s in array.addressable_shards}
        assert shapes == {shape}, (name, shapes)
        assert len(array.addressable_shards) == 8


@pytest.mark.parametrize(("mesh_shape", "heads"), GRID, ids=GRID_IDS)
def test_forward_communication_is_one_all_reduce_over_model(mesh_shape, heads):
    run = _sharded(mesh_shape, heads)
    found = sh.collectives(run.fwd_hlo)
    # The psum of the partial outputs, and nothing else (no all-gather of
    # activations: the weights stay split over heads, y over batch).
    assert [c.op for c in found] == ["all-reduce"], found
    assert found[0].groups == sh.axis_groups(run.mesh, sh.MODEL)
    assert found[0].num_operands == 1
    assert found[0].shape.startswith(f"f32[{B // mesh_shape[0]},{T},{D}]")
    counts = sh.collective_counts(run.fwd_hlo)
    assert counts["all-reduce"] == (mesh_shape[1] > 1)  # trivial on a size-1 model axis
    assert counts["all-gather"] == counts["all-to-all"] == counts["reduce-scatter"] == 0


@pytest.mark.parametrize(("mesh_shape", "heads"), GRID, ids=GRID_IDS)
def test_backward_communication(mesh_shape, heads):
    """The backward of ``y = psum_model(local(x, W_local)) + b_o`` needs exactly:

    * over ``model``: the input cotangents (each device only saw its heads'
      share), one per distinct input, plus the 4 replicated k/v params when
      K < model (every device used one slice of them);
    * over ``data``: the 8 parameter gradients (each device saw B / data rows).

    XLA's combiner fuses each set into one tuple all-reduce. Over a size-1 axis
    the all-reduce stays in the HLO but is trivial (single-device groups).
    """
    run = _sharded(mesh_shape, heads)
    K, (d, m) = heads[1], mesh_shape
    n_inputs = 1 if run.case.variant == "self" else 3
    n_kv_replicated = 4 if K % m else 0
    found = sh.collectives(run.bwd_hlo)
    assert [c.op for c in found] == ["all-reduce", "all-reduce"], found
    by_groups = {c.groups: c.num_operands for c in found}
    assert by_groups == {
        sh.axis_groups(run.mesh, sh.MODEL): n_inputs + n_kv_replicated,
        sh.axis_groups(run.mesh, sh.DATA): len(PARAMS),
    }
    assert sh.collective_counts(run.bwd_hlo)["all-reduce"] == (d > 1) + (m > 1)
    expected = {"all-reduce@model": 1} if m > 1 else {}
    expected |= {"all-reduce@data": 1} if d > 1 else {}
    assert sh.collective_summary(run.bwd_hlo, run.mesh) == expected


# ---------------------------------------------------------------------------
# Explicit and Auto meshes, nnx.jit / jax.jit / eager; pmap backend
# ---------------------------------------------------------------------------


def _loss(model, xs, kwargs, ct):
    return jnp.sum(model(*xs, **kwargs) * ct)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
@pytest.mark.parametrize("transform", ["nnx.jit", "jax.jit", "eager"])
def test_axis_types_and_transforms(axis_type, transform):
    case = Case(8, 2, "cross")
    xs, kwargs = case.inputs()
    ct = case.cotangent()
    (y_ref, _), (g_ref, gx_ref) = _reference(case)
    mesh = sh.make_mesh(2, 4, axis_types=axis_type)
    hp = sh.head_parallel(case.module(), mesh)
    assert hp.module.q_kernel[...].sharding.mesh.axis_types == (axis_type, axis_type)

    def step(model, xs):
        y = model(*xs, **kwargs)
        return y, nnx.grad(_loss, argnums=(0, 1))(model, xs, kwargs, ct)

    if transform == "nnx.jit":
        y, (g, gx) = nnx.jit(step)(hp, xs)
    elif transform == "jax.jit":
        graphdef, state = nnx.split(hp)
        y, (g, gx) = jax.jit(lambda s, xs: step(nnx.merge(graphdef, s), xs))(state, xs)
    else:
        # Eager jax.grad of an Explicit-typed loss needs the mesh as context (JAX
        # builds the scalar cotangent on it); jit-compiled code does not.
        with jax.set_mesh(mesh):
            y, (g, gx) = step(hp, xs)
    chex.assert_trees_all_close(y, y_ref, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(_by_name(g), g_ref, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(gx, gx_ref, atol=ATOL_F32, rtol=RTOL_F32)
    assert _by_name(g)["q_kernel"].sharding.spec in (P(None, sh.MODEL, None), P(None, sh.MODEL))


@pytest.mark.parametrize(("axis_type", "model", "case"), [
    (AxisType.Explicit, 8, Case(8, 8, "self")), (AxisType.Explicit, 8, Case(8, 2, "cross")),
    (AxisType.Explicit, 4, Case(16, 4, "self")), (AxisType.Auto, 4, Case(8, 1, "cross")),
], ids=["explicit-m8-N8K8-self", "explicit-m8-N8K2-cross", "explicit-m4-N16K4-self",
        "auto-m4-N8K1-cross"])
def test_pmap_backend_equals_shard_map(axis_type, model, case):
    xs, kwargs = case.inputs()
    ct = case.cotangent()
    mesh = sh.make_mesh(1, model, devices=jax.devices()[:model], axis_types=axis_type)
    outs = {}
    for backend in sh.BACKENDS:
        hp = sh.head_parallel(case.module(), mesh, backend=backend)

        @nnx.jit
        def step(model, xs):
            out = model(*xs, return_weights=True, **kwargs)
            return out, nnx.grad(_loss, argnums=(0, 1))(model, xs, kwargs, ct)

        (y, w), (g, gx) = step(hp, xs)
        outs[backend] = (y, w, _by_name(g), gx)
    chex.assert_trees_all_close(outs["pmap"], outs["shard_map"], atol=ATOL_F32, rtol=RTOL_F32)
    if case.variant == "self":
        return
    # And the eager pmap call (no outer jit) gives the same output.
    hp = sh.head_parallel(case.module(), mesh, backend="pmap")
    chex.assert_trees_all_close(hp(*xs, **kwargs), outs["shard_map"][0],
                                atol=ATOL_F32, rtol=RTOL_F32)


def test_optimizer_step_keeps_shardings_and_matches_one_device():
    case = Case(8, 2, "self")
    xs, kwargs = case.inputs()
    ct = case.cotangent()
    hp = sh.head_parallel(case.module(), sh.make_mesh(2, 4))
    ref = case.module()
    specs_before = {n: getattr(hp.module, n)[...].sharding.spec for n in PARAMS}

    @nnx.jit
    def train_step(model, optimizer, xs):
        loss, grads = nnx.value_and_grad(_loss)(model, xs, kwargs, ct)
        optimizer.update(model, grads)
        return loss

    losses = {}
    for name, model in (("sharded", hp), ("ref", ref)):
        # SGD: Adam would turn rounding noise in the (exactly zero) k_bias
        # gradient into +-lr steps.
        optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=nnx.Param)
        losses[name] = [train_step(model, optimizer, xs) for _ in range(2)]
    chex.assert_trees_all_close(losses["sharded"], losses["ref"], atol=1e-4, rtol=RTOL_F32)
    chex.assert_trees_all_close(
        {n: getattr(hp.module, n)[...] for n in PARAMS},
        {n: getattr(ref, n)[...] for n in PARAMS}, atol=ATOL_F32, rtol=RTOL_F32,
    )
    assert {n: getattr(hp.module, n)[...].sharding.spec for n in PARAMS} == specs_before


# ---------------------------------------------------------------------------
# Dropout under sharding
# ---------------------------------------------------------------------------


def test_dropout_draws_an_independent_mask_per_device():
    rate = 0.5
    case = Case(8, 8, "self")
    (xq,), _ = case.inputs()
    hp = sh.head_parallel(case.module(dropout_rate=rate), sh.make_mesh(2, 4))
    run = nnx.jit(lambda m, x, det: m(x, deterministic=det, return_weights=True),
                  static_argnums=2)
    y_det, w_det = run(hp, xq, True)
    y_ref, w_ref = case.module()(xq, return_weights=True)
    chex.assert_trees_all_close((y_det, w_det), (y_ref, w_ref), atol=ATOL_F32, rtol=RTOL_F32)
    y, w = run(hp, xq, False)
    w, w_det = np.asarray(w), np.asarray(w_det)
    kept = w != 0
    # Every weight is dropped or scaled by 1 / (1 - rate).
    np.testing.assert_allclose(w[kept], w_det[kept] / (1 - rate), rtol=1e-6)
    assert 0.4 < 1 - kept.mean() < 0.6
    # Heads 0 and 2 live on model shards 0 and 1, batch rows 0 and 4 on data
    # shards 0 and 1: with one shared key their masks would be equal.
    assert (kept[0, 0] != kept[0, 2]).any()
    assert (kept[0, 0] != kept[4, 0]).any()
    assert not np.allclose(y, y_det)
    y2, _ = run(hp, xq, False)
    assert not np.allclose(y, y2)  # the rng stream advances


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(data=3), r"data=3 does not divide the number of devices \(8\)"),
    (dict(data=2, model=3), r"data \* model = 2 \* 3 = 6 != number of devices \(8\)"),
    (dict(data=4, model=4), r"4 \* 4 = 16 != number of devices \(8\)"),
    (dict(data=0), r"data=0"),
])
def test_make_mesh_errors_name_the_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(**kwargs)


def test_make_mesh_shapes_and_axis_types():
    mesh = sh.make_mesh(2)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert sh.make_mesh(axis_types=AxisType.Auto).axis_types == (AxisType.Auto,) * 2
    assert dict(sh.make_mesh(1, 2, devices=jax.devices()[:2]).shape) == {"data": 1, "model": 2}


@pytest.mark.parametrize(("N", "K", "model", "match"), [
    (6, 6, 4, r"num_heads N=6 \(num_kv_heads K=6\) is not divisible by the model axis size 4"),
    (12, 3, 4, r"num_kv_heads K=3 \(num_heads N=12\) must be a multiple or a divisor of the "
               r"model axis size 4"),
    (12, 6, 4, r"num_kv_heads K=6 \(num_heads N=12\) must be a multiple or a divisor"),
])
def test_heads_that_do_not_split_raise(N, K, model, match):
    module = MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        sh.head_parallel(module, sh.make_mesh(8 // model, model))
    with pytest.raises(ValueError, match=match):
        sh.kv_layout(N, K, model)


def test_call_errors_name_the_numbers():
    case = Case(8, 2, "self")
    hp = sh.head_parallel(case.module(), sh.make_mesh(2, 4))
    with pytest.raises(ValueError, match=r"batch size 3 is not divisible by the data axis size 2"):
        hp(jnp.ones((3, T, D)))
    # the module's own input checks, shared by the sharded path
    with pytest.raises(ValueError, match=r"inputs_q has 33 features but the module expects 32"):
        hp(jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match=r"inputs_q has batch 8 but inputs_k has 4"):
        hp(jnp.ones((B, T, D)), jnp.ones((4, T, D)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4, 4\) does not broadcast"):
        hp(jnp.ones((B, T, D)), mask=jnp.ones((3, T, T), bool))
    with pytest.raises(ValueError, match=r"backend='pmap' maps over the model axis only; "
                                         r"the mesh has data=2"):
        sh.head_parallel(case.module(), sh.make_mesh(2, 4), backend="pmap")(jnp.ones((B, T, D)))
    with pytest.raises(ValueError, match=r"unknown backend 'mpi'"):
        sh.head_parallel(case.module(), sh.make_mesh(2, 4), backend="mpi")
    with pytest.raises(TypeError, match=r"expected a MultiHeadAttention; got Linear"):
        sh.head_parallel(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), sh.make_mesh(2, 4))


# ---------------------------------------------------------------------------
# Specs from logical names; HLO parsing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("K", "kv_spec"), [(8, sh.MODEL), (2, None)])
def test_param_specs_follow_logical_axis_names(K, kv_spec):
    module = MultiHeadAttention(D, 8, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0))
    specs = sh.param_specs(module, sh.make_mesh(2, 4))
    assert specs == {
        "q_kernel": P(None, sh.MODEL, None), "k_kernel": P(None, kv_spec, None),
        "v_kernel": P(None, kv_spec, None), "o_kernel": P(sh.MODEL, None, None),
        "q_bias": P(sh.MODEL, None), "k_bias": P(kv_spec, None), "v_bias": P(kv_spec, None),
        "o_bias": P(None),
    }
    # Derived from the metadata, not the names: relabel q_kernel's axes.
    module.q_kernel.set_metadata("out_sharding", ("heads", "embed", "head_dim"))
    assert sh.param_specs(module, sh.make_mesh(2, 4))["q_kernel"] == P(sh.MODEL, None, None)
    module.q_kernel.set_metadata("out_sharding", ("embed", "nope", "head_dim"))
    with pytest.raises(ValueError, match=r"no mesh rule for logical axes \['nope'\]"):
        sh.param_specs(module, sh.make_mesh(2, 4))


def test_mask_spec():
    assert sh.mask_spec((B, 1, T, S), 8) == P(sh.DATA, None, None, None)
    assert sh.mask_spec((1, 8, T, S), 8) == P(None, sh.MODEL, None, None)
    assert sh.mask_spec((B, 8, 1, S), 8) == P(sh.DATA, sh.MODEL, None, None)
    assert sh.mask_spec((1, 1, T, S), 8) == P(None, None, None, None)


@pytest.mark.parametrize(("text", "groups"), [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, use", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=[4,2]<=[2,4]T(1,0), use", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("replica_groups=[2,4]<=[8], use", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use",
     ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("replica_groups=mesh['a'=2,'b'=4] {'b':(2)2}, use", ((0, 2), (1, 3), (4, 6), (5, 7))),
    ("replica_groups={}, use", ()),
])
def test_replica_group_formats(text, groups):
    line = f"  %ar = f32[2,3]{{1,0}} all-reduce(%x), channel_id=1, {text}_global_device_ids=true"
    (found,) = sh.collectives(line)
    assert (found.op, found.shape, found.groups) == ("all-reduce", "f32[2,3]{1,0}", groups)


def test_collective_counting_reads_async_and_tuple_ops():
    mesh = sh.make_mesh(2, 4)
    text = "\n".join([
        "  %s = (f32[4]{0}, f32[2]{0}) all-reduce-start(%a, %b), replica_groups={{0,4},{1,5},"
        "{2,6},{3,7}}",
        "  %d = (f32[4]{0}, f32[2]{0}) all-reduce-done(%s)",
        "  %g = f32[8]{0} all-gather(%c), replica_groups=[2,4]<=[8], dimensions={0}",
        "  %t = f32[8]{0} all-reduce(%g), replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}",
        "  %f = f32[8]{0} fusion(%all-reduce.1), kind=kLoop",
    ])
    found = sh.collectives(text)
    assert [(c.op, c.num_operands, c.trivial) for c in found] == [
        ("all-reduce", 2, False), ("all-gather", 1, False), ("all-reduce", 1, True)]
    assert sh.collective_counts(text)["all-reduce"] == 1
    assert sh.collective_counts(text, include_trivial=True)["all-reduce"] == 2
    assert sh.collective_summary(text, mesh) == {"all-reduce@data": 1, "all-gather@model": 1}


def test_rope_module_head_parallel_equals_one_device():
    """Rotary positions are applied inside the shared forward on every device."""
    module = MultiHeadAttention(32, 8, num_kv_heads=2, head_dim=8, rope=10_000.0,
                                rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (4, 6, 32))
    ref = module(x, is_causal=True)
    no_rope = MultiHeadAttention(32, 8, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(3))(
        x, is_causal=True)
    assert not np.allclose(ref, no_rope, atol=1e-3)  # rope changes the result
    hp = sh.head_parallel(nnx.clone(module), sh.make_mesh(2, 4))
    y = nnx.jit(lambda m, x: m(x, is_causal=True))(hp, x)
    chex.assert_trees_all_close(y, ref, atol=ATOL_F32, rtol=RTOL_F32)
