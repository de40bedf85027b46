"""Head parallelism: attention heads split over the ``model`` axis of a device mesh.

Megatron-style: every device holds the q/k/v kernels of ``N / model`` heads and
the matching rows of the output kernel, computes its heads' attention and its
partial output projection, and one ``psum`` over ``model`` adds the partial
outputs. The batch is split over ``data``. Block shapes per device::

    x:        f32[B/data, T, D]          (replicated over model)
    q_kernel: f32[D, N/model, H]         k_kernel: f32[Dk, K/model | 1, H]
    o_kernel: f32[N/model, V, Do]        o_bias:   f32[Do]  (replicated)
    y_part:   f32[B/data, T, Do]  --psum(model)-->  y: f32[B/data, T, Do]

The local math is :func:`attention_jax.modules.attention_forward` on the local
parameter slices; nothing here re-derives attention.

Which mesh axis a parameter dim goes to is decided by its *logical* axis names
(the ``out_sharding`` metadata of each ``nnx.Param``) and the rules of
:func:`logical_rules`, never by parameter names.

Key/value heads (GQA/MQA) follow :class:`KVLayout`: with ``K % model == 0`` they
are split like the query heads; with ``model % K == 0`` (fewer key/value heads
than devices) they are replicated and each device slices out the one key/value
head its query heads share, with no extra communication in the forward (the
backward sums those replicated kernels' gradients over ``model``).

Communication, as read from the compiled HLO (:mod:`attention_jax.hlo`,
re-exported here: :func:`collectives`, :func:`collective_summary`):
forward, one all-reduce of ``y_part`` over ``model``; backward, one all-reduce
over ``model`` (the input cotangents, plus the k/v gradients when replicated)
and one over ``data`` (the parameter gradients), each a tuple op after XLA's
all-reduce combiner.

Dropout runs on each device with the module's key folded with the device's
``model`` and ``data`` indices: the right distribution, not the unsharded bits.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> from attention_jax import MultiHeadAttention
>>> mesh = make_mesh(data=1, model=1, devices=jax.devices()[:1])
>>> hp = head_parallel(MultiHeadAttention(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0)), mesh)
>>> hp(jnp.ones((2, 3, 16)), is_causal=True).shape
(2, 3, 16)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import cache as kv_cache
from attention_jax import modules
from attention_jax.cache import KVCache
from attention_jax.hlo import COLLECTIVE_OPS as COLLECTIVE_OPS  # re-exported (API)
from attention_jax.hlo import Collective as Collective
from attention_jax.hlo import axis_groups as axis_groups
from attention_jax.hlo import collective_counts as collective_counts
from attention_jax.hlo import collective_summary as collective_summary
from attention_jax.hlo import collectives as collectives
from attention_jax.hlo import group_axes as group_axes
from attention_jax.modules import EMBED, HEAD_DIM, HEADS, KV_HEADS, PARAM_AXES

Array = jax.Array

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)
BACKENDS = ("shard_map", "pmap")


# ---------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------


def make_mesh(
    data: int = 1,
    model: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: AxisType | Sequence[AxisType] | None = None,
) -> Mesh:
    """A ``(data, model)`` mesh over ``devices``.

    Args:
      data: size of the ``data`` axis (batch parallelism).
      model: size of the ``model`` axis (head parallelism); default
        ``len(devices) // data``.
      devices: default ``jax.devices()``; all of them are used.
      axis_types: one :class:`jax.sharding.AxisType` for both axes, or one per
        axis; default that of ``jax.make_mesh`` (``Explicit`` on jax 0.10).

    Raises:
      ValueError: naming the numbers when ``data * model`` is not the device count.

    >>> mesh = make_mesh(1, devices=jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'model': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data < 1 or (model is not None and model < 1):
        raise ValueError(f"mesh axis sizes must be >= 1; got data={data}, model={model}")
    if model is None:
        if n % data:
            raise ValueError(f"data={data} does not divide the number of devices ({n})")
        model = n // data
    if data * model != n:
        raise ValueError(
            f"data * model = {data} * {model} = {data * model} != number of devices ({n})"
        )
    if isinstance(axis_types, AxisType):
        axis_types = (axis_types, axis_types)
    axis_types = None if axis_types is None else tuple(axis_types)
    return jax.make_mesh((data, model), MESH_AXES, axis_types=axis_types, devices=devices)


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} lack {axis!r}; use make_mesh()")
    return mesh.shape[axis]


# ---------------------------------------------------------------------------
# Logical axes -> mesh axes
# ---------------------------------------------------------------------------


class KVLayout(enum.Enum):
    """How key/value heads sit on the ``model`` axis."""

    SPLIT = "split"  # K % model == 0: K / model kv heads per device
    REPLICATED = "replicated"  # model % K == 0: all K everywhere, one used per device


def kv_layout(num_heads: int, num_kv_heads: int, model_size: int) -> KVLayout:
    """Chooses the key/value layout for N query heads, K kv heads and the model axis size.

    Raises:
      ValueError: naming N, K and the axis size when N % model != 0, or when K
        neither is a multiple of nor divides the model axis size.

    >>> kv_layout(8, 2, 4), kv_layout(8, 4, 4)
    (<KVLayout.REPLICATED: 'replicated'>, <KVLayout.SPLIT: 'split'>)
    """
    N, K, m = num_heads, num_kv_heads, model_size
    if N % m:
        raise ValueError(
            f"num_heads N={N} (num_kv_heads K={K}) is not divisible by the model axis size {m}"
        )
    if K % m == 0:
        return KVLayout.SPLIT
    if m % K == 0:
        return KVLayout.REPLICATED
    raise ValueError(
        f"num_kv_heads K={K} (num_heads N={N}) must be a multiple or a divisor of the model "
        f"axis size {m}"
    )


def logical_rules(layout: KVLayout) -> tuple[tuple[str, str | None], ...]:
    """Logical axis -> mesh axis pairs (Flax ``logical_axis_rules`` format).

    >>> dict(logical_rules(KVLayout.REPLICATED))
    {'embed': None, 'heads': 'model', 'kv_heads': None, 'head_dim': None}
    """
    return (
        (EMBED, None),
        (HEADS, MODEL),
        (KV_HEADS, MODEL if layout is KVLayout.SPLIT else None),
        (HEAD_DIM, None),
    )


def _module_layout(module: modules.MultiHeadAttention, mesh: Mesh) -> KVLayout:
    return kv_layout(module.num_heads, module.num_kv_heads, _axis_size(mesh, MODEL))


def spec_from_logical(logical: Sequence[str | None] | None, rules) -> P:
    """Maps logical axis names to a ``PartitionSpec`` through ``rules``.

    Raises:
      ValueError: for a logical name with no rule.
    """
    if not logical:
        return P()
    table = dict(rules)
    unknown = [a for a in logical if a is not None and a not in table]
    if unknown:
        raise ValueError(f"no mesh rule for logical axes {unknown}; rules: {table}")
    return P(*(None if a is None else table[a] for a in logical))


def param_specs(module: nnx.Module, mesh: Mesh) -> dict[str, P]:
    """``PartitionSpec`` of every ``nnx.Param``, from its ``out_sharding`` logical names.

    The rules (:func:`logical_rules`) are those of the :class:`MultiHeadAttention`
    a Param belongs to (its key/value layout depends on K and the model axis
    size); a Param outside any attention module gets the ``SPLIT`` rules.

    Returns:
      ``{dotted path: spec}``; for a :class:`MultiHeadAttention` the paths are the
      parameter names, e.g. ``{'q_kernel': P(None, 'model', None), ...}``.
      A Param without logical names is replicated (``P()``).
    """
    owners = {
        tuple(path): logical_rules(_module_layout(node, mesh))
        for path, node in nnx.iter_graph(module)
        if isinstance(node, modules.MultiHeadAttention)
    }
    specs = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        prefixes = [path[:i] for i in range(len(path), -1, -1)]
        rules = next((owners[p] for p in prefixes if p in owners), logical_rules(KVLayout.SPLIT))
        name = ".".join(str(k) for k in path)
        specs[name] = spec_from_logical(var.get_metadata().get("out_sharding"), rules)
    return specs


def param_shardings(module: nnx.Module, mesh: Mesh) -> dict[str, NamedSharding]:
    """:func:`param_specs` as ``NamedSharding`` on ``mesh``."""
    return {name: NamedSharding(mesh, spec) for name, spec in param_specs(module, mesh).items()}


def shard_params(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every Param of ``module`` (in place) to its :func:`param_shardings`."""
    shardings = param_shardings(module, mesh)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    placed = [(path, jax.device_put(var.get_value(), shardings[".".join(map(str, path))]))
              for path, var in flat]
    nnx.update(module, nnx.from_flat_state(placed))
    return module


def mask_spec(mask_shape: Sequence[int], num_heads: int) -> P:
    """Spec of a ``[B|1, N|1, T|1, S|1]`` mask: batch on ``data``, heads on ``model``.

    A dim of size 1 is broadcast, hence replicated.

    >>> tuple(mask_spec((4, 1, 5, 5), 8)), tuple(mask_spec((1, 8, 5, 5), 8))
    (('data', None, None, None), (None, 'model', None, None))
    """
    b, n = mask_shape[0], mask_shape[1]
    return P(DATA if b > 1 else None, MODEL if n > 1 and n == num_heads else None, None, None)


# ---------------------------------------------------------------------------
# The local (per-device) computation, shared by both backends
# ---------------------------------------------------------------------------


def _kv_axis(name: str) -> int | None:
    """Position of the ``kv_heads`` axis in a parameter, None if it has none."""
    axes = PARAM_AXES[name][0]
    return axes.index(KV_HEADS) if KV_HEADS in axes else None


def _local_forward(
    params: dict[str, Array | None],
    xs: tuple[Array, ...],
    mask: Array | None,
    dropout_rng: Array | None,
    *,
    layout: KVLayout,
    num_kv_heads: int,
    model_size: int,
    data_axis: str | None,
    vma: bool,
    forward_kwargs: dict[str, Any],
) -> tuple[Array, Array | None]:
    """One device: its heads' attention, one psum over ``model``, then ``o_bias``.

    Args:
      params: local slices (``q_kernel [D, N/model, H]`` ...); the kv params are
        whole (``[Dk, K, H]``) when ``layout`` is REPLICATED.
      xs: ``(x_q,)`` (self-attention), ``(x_q, x_kv)`` or ``(x_q, x_k, x_v)``,
        each ``[B/data, ., .]``.
      mask: ``[B/data | 1, N/model | 1, T | 1, S | 1]`` or None.
      dropout_rng: a key shared by all devices, or None.

    Returns:
      ``(y [B/data, T, Do] summed over model, local weights [B/data, N/model, T, S] | None)``.
    """
    if vma:
        # Mark the inputs as varying over model once, so the backward sums each
        # input's cotangent over model once (not once per projection using it).
        xs = tuple(jax.lax.pcast(x, MODEL, to="varying") for x in xs)
    xq, xk, xv = (xs * 3)[:3] if len(xs) == 1 else (xs[0], xs[1], xs[-1])
    shard = jax.lax.axis_index(MODEL)
    if layout is KVLayout.REPLICATED:
        # This device's query heads all share kv head shard * K // model.
        kv = shard * num_kv_heads // model_size
        params = {
            name: p if p is None or _kv_axis(name) is None
            else jax.lax.dynamic_slice_in_dim(p, kv, 1, axis=_kv_axis(name))
            for name, p in params.items()
        }
    if dropout_rng is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, shard)
        if data_axis is not None:
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(data_axis))
    y, weights = modules.attention_forward(
        params, xq, xk, xv, mask=mask, dropout_rng=dropout_rng, **forward_kwargs
    )
    y = jax.lax.psum(y, MODEL)  # [B/data, T, Do]: the only communication
    y = modules.add_output_bias(y, params)
    return y, weights


def _explicit_reshard(x: Array, mesh: Mesh, spec: P) -> Array:
    """On Explicit mesh axes, moves ``x`` to ``spec`` (shard_map demands matching types).

    Auto axes need nothing: shard_map reshards its operands itself.
    """
    explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t == AxisType.Explicit}
    if not explicit:
        return x
    spec = P(*(a if a in explicit else None for a in spec))
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one head-parallel call (hashable: the jit cache key)."""

    backend: str
    mesh: Mesh
    layout: KVLayout
    num_heads: int
    num_kv_heads: int
    specs: tuple[tuple[str, P], ...]  # parameter name -> PartitionSpec
    forward_kwargs: tuple[tuple[str, Any], ...]  # for attention_forward

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def return_weights(self) -> bool:
        return dict(self.forward_kwargs)["return_weights"]

    def body(self, *, data_axis: str | None, vma: bool):
        """:func:`_local_forward` with this plan's static arguments bound."""
        return functools.partial(
            _local_forward, layout=self.layout, num_kv_heads=self.num_kv_heads,
            model_size=self.model_size, data_axis=data_axis, vma=vma,
            forward_kwargs=dict(self.forward_kwargs),
        )


@functools.partial(jax.jit, static_argnames="plan")
def _shard_map_run(params, xs, mask, rng, *, plan: _Plan):
    """``jax.shard_map`` of :func:`_local_forward` over the plan's mesh.

    Jitted (also when called eagerly) so that an eager call compiles once.
    """
    mesh = plan.mesh
    p_specs = {n: None if p is None else dict(plan.specs)[n] for n, p in params.items()}
    x_spec = P(DATA, None, None)  # x: [B/data, T, D] on every model shard
    m_spec = None if mask is None else mask_spec(mask.shape, plan.num_heads)
    w_spec = P(DATA, MODEL, None, None)  # weights: [B/data, N/model, T, S]
    body = plan.body(data_axis=DATA, vma=True)

    def run(params, xs, mask, rng):
        y, w = body(params, xs, mask, rng)
        return (y, w) if plan.return_weights else y

    params = {n: None if p is None else _explicit_reshard(p, mesh, p_specs[n])
              for n, p in params.items()}
    xs = tuple(_explicit_reshard(x, mesh, x_spec) for x in xs)
    mask = None if mask is None else _explicit_reshard(mask, mesh, m_spec)
    out = jax.shard_map(
        run, mesh=mesh,
        in_specs=(p_specs, (x_spec,) * len(xs), m_spec, None if rng is None else P()),
        out_specs=(x_spec, w_spec) if plan.return_weights else x_spec,
    )(params, xs, mask, rng)
    return out if plan.return_weights else (out, None)


def _without_explicit_types(fn, mesh: Mesh, num_outputs: int):
    """``fn`` run with ``mesh``'s Explicit axes made Auto, outside any context mesh.

    pmap is a shard_map over its own one-axis mesh: it can neither run under
    another context mesh nor transpose back to sharding-in-types, so on an
    Explicit mesh it is called through ``auto_axes`` with an empty abstract mesh.
    ``fn`` returns a pair with ``num_outputs`` arrays then Nones; they come back
    typed replicated.
    """
    explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                     if t == AxisType.Explicit)
    empty = jax.sharding.AbstractMesh((), (), axis_types=())

    def run(*args):
        with jax.sharding.use_abstract_mesh(empty):
            return fn(*args)

    replicated = NamedSharding(mesh, P())
    out_sharding = tuple(replicated if i < num_outputs else None for i in range(2))
    return jax.sharding.auto_axes(run, axes=explicit, out_sharding=out_sharding)


def _stack(x: Array, axis: int, m: int) -> Array:
    """``[..., n, ...] -> [m, ..., n/m, ...]``: per-device slices of ``axis``, stacked."""
    shape = x.shape
    x = x.reshape((*shape[:axis], m, shape[axis] // m, *shape[axis + 1:]))
    return jnp.moveaxis(x, axis, 0)


@functools.partial(jax.jit, static_argnames="plan")
def _pmap_run(params, xs, mask, rng, *, plan: _Plan):
    """Stacks per-device slices ``[model, ...]`` and runs :func:`_local_forward` in pmap.

    Always under jit, so that eager calls and traced calls see the same operand types.
    """
    mesh, m = plan.mesh, plan.model_size
    if mesh.shape[DATA] != 1:
        raise ValueError(
            f"backend='pmap' maps over the model axis only; the mesh has data="
            f"{mesh.shape[DATA]} (use backend='shard_map' for data parallelism)"
        )
    split = {n: next((i for i, a in enumerate(spec) if a == MODEL), None)
             for n, spec in plan.specs}
    stacked = {n: p if p is None or split[n] is None else _stack(p, split[n], m)
               for n, p in params.items()}  # e.g. q_kernel: [m, D, N/m, H]
    p_axes = {n: None if p is None or split[n] is None else 0 for n, p in params.items()}
    m_axis = None
    if mask is not None and mask_spec(mask.shape, plan.num_heads)[1] == MODEL:
        mask, m_axis = _stack(mask, 1, m), 0  # [m, B, N/m, T, S]
    pmapped = jax.pmap(
        plan.body(data_axis=None, vma=False), axis_name=MODEL,
        in_axes=(p_axes, None, m_axis, None), out_axes=(None, 0),
        devices=list(mesh.devices.reshape(-1)),
    )
    if AxisType.Explicit in mesh.axis_types:
        pmapped = _without_explicit_types(pmapped, mesh, 1 + plan.return_weights)
    y, w = pmapped(stacked, xs, mask, rng)
    if w is not None:  # [m, B, N/m, T, S] -> [B, N, T, S]
        w = jnp.moveaxis(w, 0, 1)
        w = w.reshape(w.shape[0], -1, *w.shape[3:])
    return y, w


_BACKENDS = {"shard_map": _shard_map_run, "pmap": _pmap_run}


# ---------------------------------------------------------------------------
# Decoding: the KV cache in the head-parallel layout
# ---------------------------------------------------------------------------


def _cache_specs(layout: KVLayout, quantized: bool) -> KVCache:
    kv = MODEL if layout is KVLayout.SPLIT else None
    heads = P(DATA, None, kv, None)
    scales = P(DATA, None, kv) if quantized else None
    return KVCache(k=heads, v=heads, lengths=P(DATA), k_scale=scales, v_scale=scales)


def cache_specs(module: modules.MultiHeadAttention, mesh: Mesh, *,
                quantized: bool = False) -> KVCache:
    """``PartitionSpec`` of each field of ``module``'s :class:`KVCache` on ``mesh``.

    Rows over ``data``; kv heads over ``model`` when they are split (K % model
    == 0), replicated when K < model (every device then stores all K heads,
    identical copies, and attends with its group's one).

    Returns:
      A :class:`KVCache` whose fields are specs (scales None unless ``quantized``).

    >>> from attention_jax import MultiHeadAttention
    >>> from flax import nnx
    >>> mesh = jax.sharding.AbstractMesh((2, 4), MESH_AXES)  # or make_mesh(2, 4)
    >>> gqa = MultiHeadAttention(16, 8, num_kv_heads=2, rngs=nnx.Rngs(0))
    >>> specs = cache_specs(gqa, mesh)
    >>> tuple(specs.k), tuple(specs.lengths)
    (('data', None, None, None), ('data',))
    """
    return _cache_specs(_module_layout(module, mesh), quantized)


def shard_cache(cache: KVCache, module: modules.MultiHeadAttention, mesh: Mesh) -> KVCache:
    """Places ``cache`` (e.g. one filled on a single device) in the head-parallel layout.

    Raises:
      ValueError: when the batch does not divide over ``data`` or the cache's
        heads do not fit the module.
    """
    _check_batch(cache.batch_size, mesh)
    if cache.num_kv_heads != module.num_kv_heads:
        raise ValueError(
            f"the cache holds {cache.num_kv_heads} kv heads but the module has "
            f"K={module.num_kv_heads}"
        )
    specs = cache_specs(module, mesh, quantized=cache.quantized)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


def _check_batch(batch: int, mesh: Mesh) -> None:
    data = _axis_size(mesh, DATA)
    if batch % data:
        raise ValueError(f"batch size {batch} is not divisible by the data axis size {data}")


def _local_decode(
    params: dict[str, Array | None],
    x: Array,
    cache: KVCache,
    mask: Array | None,
    valid_lengths: Array | None,
    *,
    layout: KVLayout,
    num_kv_heads: int,
    model_size: int,
    decode_kwargs: dict[str, Any],
) -> tuple[Array, KVCache]:
    """One device's decode step: :func:`modules.decode_forward` on local slices, one psum.

    Args:
      params: local slices as in :func:`_local_forward` (kv params whole when
        ``layout`` is REPLICATED).
      x: ``[B/data, t, D]``.
      cache: ``k [B/data, L, K/model | K, H]`` ..., ``lengths [B/data]``.
      mask: ``[B/data | 1, N/model | 1, t | 1, L | 1]`` or None.
      valid_lengths: ``[B/data]`` or None.

    Returns:
      ``(y [B/data, t, Do] summed over model, the local cache after the step)``.
    """
    kv_heads = None
    if layout is KVLayout.REPLICATED:
        # Store all K heads (identical replicas everywhere), attend with this
        # device's group: its query heads all share kv head shard * K // model.
        kv_heads = (jax.lax.axis_index(MODEL) * num_kv_heads // model_size, 1)
    y, cache = modules.decode_forward(
        params, x, cache, mask=mask, valid_lengths=valid_lengths, kv_heads=kv_heads,
        **decode_kwargs,
    )
    y = jax.lax.psum(y, MODEL)  # [B/data, t, Do]: the only communication
    y = modules.add_output_bias(y, params)
    return y, cache


@functools.partial(jax.jit, static_argnames="plan")
def _shard_map_decode(params, x, cache, mask, valid_lengths, *, plan: _Plan):
    """``jax.shard_map`` of :func:`_local_decode` over the plan's mesh."""
    mesh = plan.mesh
    p_specs = {n: None if p is None else dict(plan.specs)[n] for n, p in params.items()}
    x_spec = P(DATA, None, None)
    c_specs = _cache_specs(plan.layout, cache.quantized)
    m_spec = None if mask is None else mask_spec(mask.shape, plan.num_heads)
    l_spec = None if valid_lengths is None else P(DATA)
    body = functools.partial(
        _local_decode, layout=plan.layout, num_kv_heads=plan.num_kv_heads,
        model_size=plan.model_size, decode_kwargs=dict(plan.forward_kwargs),
    )
    params = {n: None if p is None else _explicit_reshard(p, mesh, p_specs[n])
              for n, p in params.items()}
    x = _explicit_reshard(x, mesh, x_spec)
    cache = jax.tree.map(lambda a, s: _explicit_reshard(a, mesh, s), cache, c_specs)
    mask = None if mask is None else _explicit_reshard(mask, mesh, m_spec)
    if valid_lengths is not None:
        valid_lengths = _explicit_reshard(jnp.asarray(valid_lengths, jnp.int32), mesh, l_spec)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(p_specs, x_spec, c_specs, m_spec, l_spec),
        out_specs=(x_spec, c_specs),
    )(params, x, cache, mask, valid_lengths)


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------


class HeadParallelAttention(nnx.Module):
    """A :class:`MultiHeadAttention` whose heads are split over a mesh's ``model`` axis.

    Holds the wrapped module (its Params sharded in place) and the mesh, so
    ``nnx.jit``, ``nnx.grad`` and ``nnx.Optimizer`` see the same Params, and
    gradients come back sharded like them. Build it with :func:`head_parallel`.

    Dropout: each device draws its own mask from the module's dropout key
    folded with its ``model`` (and ``data``) index, so masks have the right
    distribution but are not the bits the unsharded module would draw.
    """

    def __init__(self, module: modules.MultiHeadAttention, mesh: Mesh, *,
                 backend: str = "shard_map"):
        if not isinstance(module, modules.MultiHeadAttention):
            raise TypeError(f"expected a MultiHeadAttention; got {type(module).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        _axis_size(mesh, DATA)
        self.layout = _module_layout(module, mesh)
        self.mesh = mesh
        self.backend = backend
        self.module = shard_params(module, mesh)

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        is_causal: bool = False,
        deterministic: bool | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, Array]:
        """As :meth:`MultiHeadAttention.__call__`; B must be divisible by ``data``.

        Returns:
          ``[B, T, Do]`` sharded ``P('data')``, and the weights ``[B, N, T, S]``
          sharded ``P('data', 'model')`` when ``return_weights``.
        """
        module = self.module
        xq, xk, xv = module.resolve_inputs(inputs_q, inputs_k, inputs_v)
        # distinct operands only: self-attention passes x once (marked varying once)
        xs = (xq,) if xk is xq and xv is xq else (xq, xk) if xv is xk else (xq, xk, xv)
        B, T, S = xq.shape[0], xq.shape[1], xk.shape[1]
        _check_batch(B, self.mesh)
        if mask is not None:
            mask = _mask_4d(mask, (B, module.num_heads, T, S))
        params = module.param_values()
        rng = module.dropout_key(deterministic)
        kwargs = dict(
            is_causal=is_causal, scale=module.scale,
            dropout_rate=0.0 if rng is None else module.dropout_rate,
            return_weights=return_weights, implementation=module.implementation,
            dtype=module.dtype, rope=module.rope,
        )
        plan = _Plan(
            backend=self.backend, mesh=self.mesh, layout=self.layout,
            num_heads=module.num_heads, num_kv_heads=module.num_kv_heads,
            specs=tuple(param_specs(module, self.mesh).items()),
            forward_kwargs=tuple(sorted(kwargs.items())),
        )
        y, w = _BACKENDS[self.backend](params, xs, mask, rng, plan=plan)
        return (y, w) if return_weights else y


    # -- decoding ----------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty cache created directly in the head-parallel layout (:func:`cache_specs`).

        As :meth:`MultiHeadAttention.init_cache`; ``batch_size`` must divide over ``data``.
        """
        _check_batch(batch_size, self.mesh)
        module = self.module
        abstract = jax.eval_shape(lambda: module.init_cache(batch_size, max_length, dtype))
        specs = cache_specs(module, self.mesh, quantized=abstract.quantized)
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs)
        make = jax.jit(lambda: module.init_cache(batch_size, max_length, dtype),
                       out_shardings=shardings)
        return make()

    def decode(
        self,
        x: Array,
        cache: KVCache,
        *,
        mask: Array | None = None,
        valid_lengths: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """As :meth:`MultiHeadAttention.decode`, each device with its heads' slice of the cache.

        Always runs through ``jax.shard_map`` (also for a ``backend="pmap"``
        module): one psum over ``model`` per step, nothing else communicated.
        The cache stays in (or is moved to) the layout of :func:`cache_specs`.

        Args:
          x: ``[B, t, D]``, B divisible by ``data``.
          cache: from :meth:`init_cache` (or :func:`shard_cache`) or a previous step.
          mask, valid_lengths: see :meth:`MultiHeadAttention.decode`.

        Returns:
          ``(y [B, t, Do] sharded P('data'), updated cache)``.

        Raises:
          ValueError: as the module's decode, when eager and a row would pass
            ``max_length``, and when B does not divide over ``data``.
        """
        module = self.module
        module.check_decode_inputs(x, cache)
        _check_batch(x.shape[0], self.mesh)
        B, t = x.shape[:2]
        valid = kv_cache.resolve_valid_lengths(valid_lengths, B, t)
        kv_cache.check_capacity(cache, valid)
        if mask is not None:
            mask = _mask_4d(mask, (B, module.num_heads, t, cache.max_length))
        kwargs = dict(scale=module.scale, rope=module.rope,
                      implementation=module.implementation, dtype=module.dtype)
        plan = _Plan(
            backend="shard_map", mesh=self.mesh, layout=self.layout,
            num_heads=module.num_heads, num_kv_heads=module.num_kv_heads,
            specs=tuple(param_specs(module, self.mesh).items()),
            forward_kwargs=tuple(sorted(kwargs.items())),
        )
        return _shard_map_decode(module.param_values(), x, cache, mask, valid_lengths, plan=plan)


def _mask_4d(mask: Array, shape: tuple[int, int, int, int]) -> Array:
    """``mask`` reshaped to rank 4 after checking it broadcasts to ``shape`` = [B, N, T, S]."""
    if mask.ndim > 4 or any(
        a not in (1, b) for a, b in zip(mask.shape[::-1], shape[::-1], strict=False)
    ):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [batch, heads, q_len, "
            f"kv_len] = {list(shape)}"
        )
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def head_parallel(
    module: modules.MultiHeadAttention, mesh: Mesh, *, backend: str = "shard_map"
) -> HeadParallelAttention:
    """Splits ``module``'s heads over ``mesh``'s ``model`` axis (its Params move in place).

    Args:
      module: the attention module; its Params are placed on ``mesh``.
      mesh: a ``('data', 'model')`` mesh (:func:`make_mesh`), Explicit or Auto.
      backend: ``"shard_map"`` (data and model axes) or ``"pmap"`` (the same
        local computation through ``jax.pmap``; needs ``data == 1``).

    Returns:
      A :class:`HeadParallelAttention` with the ``__call__`` of the module.

    Raises:
      ValueError: naming N, K and the model axis size when the heads do not split.
    """
    return HeadParallelAttention(module, mesh, backend=backend)


def param_bytes_per_device(module: nnx.Module) -> dict[int, int]:
    """Bytes of Params each device holds, ``{device id: bytes}``."""
    out: dict[int, int] = {}
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        for shard in var.get_value().addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out
