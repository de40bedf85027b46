"""Meshes and logical axes: which mesh axis each parameter and activation dim goes to.

Which mesh axis a parameter dim goes to is decided by its *logical* axis names
(the ``out_sharding`` metadata of each ``nnx.Param``, from
:data:`attention_jax.config.PARAM_AXES`) and the rules of :func:`logical_rules`,
never by parameter names.

Key/value heads (GQA/MQA) follow :class:`KVLayout`: with ``K % model == 0`` they
are split like the query heads; with ``model % K == 0`` (fewer key/value heads
than devices) they are replicated and each device uses the one key/value head
its query heads share.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import modules
from attention_jax.config import EMBED, HEAD_DIM, HEADS, KV_HEADS

Array = jax.Array

DATA, MODEL, CONTEXT = "data", "model", "context"
MESH_AXES = (DATA, MODEL)
CONTEXT_MESH_AXES = (DATA, MODEL, CONTEXT)


def make_mesh(
    data: int = 1,
    model: int | None = None,
    context: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: AxisType | Sequence[AxisType] | None = None,
) -> Mesh:
    """A ``(data, model)`` mesh over ``devices``, or ``(data, model, context)`` when
    ``context`` is given.

    Args:
      data: size of the ``data`` axis (batch parallelism).
      model: size of the ``model`` axis (head parallelism); default
        ``len(devices) // (data * context)``.
      context: size of the ``context`` axis (the sequence split over devices,
        :mod:`attention_jax.parallel.context`); None (default): no such axis.
      devices: default ``jax.devices()``; all of them are used.
      axis_types: one :class:`jax.sharding.AxisType` for every axis, or one per
        axis; default that of ``jax.make_mesh`` (``Explicit`` on jax 0.10).

    Raises:
      ValueError: naming the numbers when the axis sizes do not multiply to the
        device count.

    >>> mesh = make_mesh(1, devices=jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'model': 1}
    >>> dict(make_mesh(1, 1, context=1, devices=jax.devices()[:1]).shape)
    {'data': 1, 'model': 1, 'context': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    c = 1 if context is None else context
    if data < 1 or (model is not None and model < 1) or c < 1:
        raise ValueError(f"mesh axis sizes must be >= 1; got data={data}, model={model}, "
                         f"context={context}")
    if model is None:
        if n % (data * c):
            what = f"data={data}" if context is None else f"data * context = {data} * {c}"
            raise ValueError(f"{what} does not divide the number of devices ({n})")
        model = n // (data * c)
    if data * model * c != n:
        what = "data * model" if context is None else "data * model * context"
        sizes = f"{data} * {model}" if context is None else f"{data} * {model} * {c}"
        raise ValueError(f"{what} = {sizes} = {data * model * c} != number of devices ({n})")
    shape, names = ((data, model), MESH_AXES) if context is None else (
        (data, model, c), CONTEXT_MESH_AXES)
    if isinstance(axis_types, AxisType):
        axis_types = (axis_types,) * len(shape)
    axis_types = None if axis_types is None else tuple(axis_types)
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)


def context_size(mesh: Mesh) -> int:
    """Size of ``mesh``'s ``context`` axis; 1 when it has none."""
    return mesh.shape.get(CONTEXT, 1)


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of ``axis`` in ``mesh``.

    Raises:
      ValueError: when the mesh has no such axis (e.g. not made by :func:`make_mesh`).
    """
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


def module_layout(module: modules.MultiHeadAttention, mesh: Mesh) -> KVLayout:
    """The :class:`KVLayout` of ``module``'s heads on ``mesh``'s model axis."""
    cfg = module.config
    return kv_layout(cfg.num_heads, cfg.num_kv_heads, axis_size(mesh, MODEL))


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
        tuple(path): logical_rules(module_layout(node, mesh))
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


def check_batch(batch: int, mesh: Mesh) -> None:
    """Raises ValueError naming both numbers when ``batch`` does not divide over ``data``."""
    data = axis_size(mesh, DATA)
    if batch % data:
        raise ValueError(f"batch size {batch} is not divisible by the data axis size {data}")


def explicit_reshard(x: Array, mesh: Mesh, spec: P) -> Array:
    """On Explicit mesh axes, moves ``x`` to ``spec`` (shard_map demands matching types).

    Auto axes need nothing: shard_map reshards its operands itself.
    """
    explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t == AxisType.Explicit}
    if not explicit:
        return x
    spec = P(*(a if a in explicit else None for a in spec))
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def param_bytes_per_device(module: nnx.Module) -> dict[int, int]:
    """Bytes of Params each device holds, ``{device id: bytes}``."""
    out: dict[int, int] = {}
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        for shard in var.get_value().addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out
