"""The per-device body of head parallelism and its two mappings over the mesh.

What one device runs (:func:`_local_forward`: its heads' attention layer on its
parameter slices, with :func:`psum_model` as the layer's ``reduce``), the static
plan of a call (``_Plan``, the jit cache key), the specs of its operands (inputs
over ``data``, masks and positions), and the two ways to map it:
``jax.shard_map`` over the plan's mesh (``_shard_map_run``) or ``jax.pmap`` over
``model`` (``_pmap_run``). On a mesh with a ``context`` axis the layer's attention
op is :func:`context_attention` (ring or all-gather). The module that builds the
plan and calls these (:class:`~attention_jax.parallel.heads.HeadParallelAttention`,
:func:`~attention_jax.parallel.heads.head_parallel`) is
:mod:`attention_jax.parallel.heads`, which re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import layer, masks
from attention_jax.config import ALL_PARAM_AXES, KV_HEADS, AttentionConfig
from attention_jax.parallel import context as cp
from attention_jax.parallel import ring
from attention_jax.parallel.mesh import (
    CONTEXT,
    DATA,
    MODEL,
    KVLayout,
    explicit_reshard,
    mask_spec,
)

Array = jax.Array


def context_attention(strategy: str, layout: str, q, k, v, mask=None, *, is_causal=False,
                      scale=None, dropout_rate=0.0, dropout_rng=None, return_weights=False,
                      implementation=None, score_mod=None, sinks=None, q_positions=None,
                      kv_positions=None, head_offset=0):
    """The ``attention_fn`` of :func:`attention_jax.layer.attention_layer` on a context
    mesh: :func:`~attention_jax.parallel.ring.ring_attention` or
    :func:`~attention_jax.parallel.context.all_gather_attention` over ``context``.

    ``q_positions`` / ``kv_positions`` are the layout's global positions (the ring
    recomputes them from the device index); ``implementation`` is ignored (the kernel
    pieces are blockwise).
    """
    del implementation, q_positions, kv_positions, dropout_rng
    if return_weights or dropout_rate:
        raise ValueError("context parallelism returns no weights and has no dropout")
    if mask is not None and not isinstance(mask, masks.Mask):
        raise TypeError("context parallelism takes mask objects (attention_jax.masks), not "
                        f"dense arrays; got {type(mask).__name__}")
    if is_causal:
        mask = masks.Causal() if mask is None else masks.Causal() & mask
    fn = ring.ring_attention if strategy == "ring" else cp.all_gather_attention
    return fn(q, k, v, axis_name=CONTEXT, mask=mask, score_mod=score_mod, sinks=sinks,
              scale=scale, layout=layout, head_offset=head_offset)


class Inputs(NamedTuple):
    """The call's inputs as given: ``k`` None means "as q" (self-attention), ``v`` None
    "as k". Each present input is passed to the devices, and marked varying, once."""

    q: Array
    k: Array | None = None
    v: Array | None = None


def kv_axis(name: str) -> int | None:
    """Position of the ``kv_heads`` axis in a parameter, None if it has none."""
    axes = ALL_PARAM_AXES[name].axes
    return axes.index(KV_HEADS) if KV_HEADS in axes else None


def local_kv_params(params: dict[str, Array | None], layout: KVLayout,
                    num_kv_heads: int, model_size: int) -> dict[str, Array | None]:
    """With REPLICATED kv heads, this device's one kv head (shard * K // model); else as is."""
    if layout is not KVLayout.REPLICATED:
        return params
    kv = jax.lax.axis_index(MODEL) * num_kv_heads // model_size
    return {
        name: p if p is None or kv_axis(name) is None
        else jax.lax.dynamic_slice_in_dim(p, kv, 1, axis=kv_axis(name))
        for name, p in params.items()
    }


def psum_model(y: Array) -> Array:
    """The ``reduce`` hook of the head-parallel bodies: the one communication of a call."""
    return jax.lax.psum(y, MODEL)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one head-parallel call (hashable: the jit cache key)."""

    backend: str
    mesh: Mesh
    layout: KVLayout
    config: AttentionConfig
    specs: tuple[tuple[str, P], ...]  # parameter name -> PartitionSpec
    is_causal: bool = False
    return_weights: bool = False
    context: str | None = None  # "ring" / "all_gather" on a mesh with a context axis
    context_layout: str = "contiguous"

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def seq_spec(self) -> str | None:
        """The mesh axis of the sequence dims (None: every device holds all of it)."""
        return None if self.context is None else CONTEXT


def _local_forward(params, inputs: Inputs, mask, dropout_rng, positions, kv_positions, *,
                   plan: _Plan, data_axis: str | None, vma: bool, score_mod=None):
    """One device: its heads' attention layer, the psum over ``model`` inside it.

    Args:
      params: local slices (``q_kernel [D, N/model, H]`` ...); the kv params are
        whole (``[Dk, K, H]``) when the layout is REPLICATED.
      inputs: each present input ``[B/data, ., .]``.
      mask: ``[B/data | 1, N/model | 1, T | 1, S | 1]`` or None.
      dropout_rng: a key shared by all devices, or None.
      positions, kv_positions: ``[T]`` / ``[B/data, T]`` (and S) or None.
      score_mod: the caller's score modifier (it sees global heads: ``head_offset``).

    Returns:
      ``(y [B/data, T, Do], local weights [B/data, N/model, T, S] | None)``.
    """
    if vma:
        # Mark the inputs as varying over model once, so the backward sums each
        # input's cotangent over model once (not once per projection using it).
        inputs = jax.tree.map(lambda x: jax.lax.pcast(x, MODEL, to="varying"), inputs)
    params = local_kv_params(params, plan.layout, plan.config.num_kv_heads, plan.model_size)
    if dropout_rng is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(MODEL))
        if data_axis is not None:
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(data_axis))
    head_offset = 0
    if isinstance(mask, masks.Mask) or score_mod is not None:
        # per-head masks and score mods see this device's global head indices
        head_offset = jax.lax.axis_index(MODEL) * params["q_kernel"].shape[1]
    attention_fn = None
    if plan.context is not None:
        # x: [B/data, T/context, D]; rope and masks see the layout's global positions
        c, P_ = jax.lax.axis_index(CONTEXT), plan.mesh.shape[CONTEXT]
        positions = cp.positions(c, P_, inputs.q.shape[1], plan.context_layout)
        kv_in = inputs.q if inputs.k is None else inputs.k
        kv_positions = cp.positions(c, P_, kv_in.shape[1], plan.context_layout)
        attention_fn = functools.partial(context_attention, plan.context, plan.context_layout)
    out = layer.attention_layer(
        plan.config, params, inputs.q, inputs.k, inputs.v, mask=mask,
        is_causal=plan.is_causal, dropout_rng=dropout_rng, return_weights=plan.return_weights,
        positions=positions, kv_positions=kv_positions, reduce=psum_model,
        score_mod=score_mod, head_offset=head_offset, attention_fn=attention_fn,
    )
    return out if plan.return_weights else (out, None)


def _positions_spec(positions: Array | None) -> P | None:
    """``[T]`` positions are replicated, ``[B, T]`` ones split over data."""
    if positions is None:
        return None
    return P(DATA, None) if positions.ndim == 2 else P(None)


def _mask_specs(mask, num_heads: int, batch: int, seq_axis: str | None = None,
                seq_lens: tuple[int, ...] = ()):
    """Specs of a dense mask (:func:`mask_spec`) or of a mask object's arrays: these are
    per batch row (segment ids, lengths), so a leading dim of B goes over ``data``; with
    ``seq_axis`` (context parallelism), a ``[B|1, T]`` array's token dim goes over it."""
    if mask is None:
        return None
    if not isinstance(mask, masks.Mask):
        return mask_spec(mask.shape, num_heads)

    def leaf_spec(x):
        rows = x.ndim > 0 and x.shape[0] == batch and batch > 1
        tokens = seq_axis if x.ndim == 2 and x.shape[1] in seq_lens else None
        return P(DATA if rows else None, *([tokens] if x.ndim == 2 else
                                           [None] * max(x.ndim - 1, 0)))

    return jax.tree.map(leaf_spec, mask)


def _shard_map_impl(params, inputs, mask, rng, positions, kv_positions, *, plan: _Plan,
                    score_mod=None):
    """``jax.shard_map`` of :func:`_local_forward` over the plan's mesh."""
    mesh = plan.mesh
    p_specs = {n: None if p is None else dict(plan.specs)[n] for n, p in params.items()}
    x_spec = P(DATA, plan.seq_spec, None)  # x: [B/data, T | T/context, D] on every model shard
    i_specs = jax.tree.map(lambda _: x_spec, inputs)
    seq_lens = tuple({x.shape[1] for x in jax.tree.leaves(inputs)})
    m_spec = _mask_specs(mask, plan.config.num_heads, inputs.q.shape[0], plan.seq_spec,
                         seq_lens)
    w_spec = P(DATA, MODEL, None, None)  # weights: [B/data, N/model, T, S]
    pos_specs = (_positions_spec(positions), _positions_spec(kv_positions))
    body = functools.partial(_local_forward, plan=plan, data_axis=DATA, vma=True,
                             score_mod=score_mod)

    def run(*args):
        y, w = body(*args)
        return (y, w) if plan.return_weights else y

    params = {n: None if p is None else explicit_reshard(p, mesh, p_specs[n])
              for n, p in params.items()}
    inputs = jax.tree.map(lambda x: explicit_reshard(x, mesh, x_spec), inputs)
    mask = None if mask is None else jax.tree.map(
        lambda m, s: explicit_reshard(m, mesh, s), mask, m_spec)
    positions, kv_positions = (None if p is None else explicit_reshard(p, mesh, s)
                               for p, s in zip((positions, kv_positions), pos_specs,
                                               strict=True))
    out = jax.shard_map(
        run, mesh=mesh,
        in_specs=(p_specs, i_specs, m_spec, None if rng is None else P(), *pos_specs),
        out_specs=(x_spec, w_spec) if plan.return_weights else x_spec,
    )(params, inputs, mask, rng, positions, kv_positions)
    return out if plan.return_weights else (out, None)


# Jitted (also when called eagerly) so that an eager call compiles once. A call with a
# score_mod runs the impl unjitted (the score_mod may close over traced arrays, which a
# static argument would freeze): under the caller's jit it traces once all the same.
_shard_map_run = jax.jit(_shard_map_impl, static_argnames="plan")


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
def _pmap_run(params, inputs, mask, rng, positions, kv_positions, *, plan: _Plan):
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
    if mask is not None and not isinstance(mask, masks.Mask) and mask_spec(
            mask.shape, plan.config.num_heads)[1] == MODEL:
        mask, m_axis = _stack(mask, 1, m), 0  # [m, B, N/m, T, S]
    pmapped = jax.pmap(
        functools.partial(_local_forward, plan=plan, data_axis=None, vma=False),
        axis_name=MODEL, in_axes=(p_axes, None, m_axis, None, None, None), out_axes=(None, 0),
        devices=list(mesh.devices.reshape(-1)),
    )
    if AxisType.Explicit in mesh.axis_types:
        pmapped = _without_explicit_types(pmapped, mesh, 1 + plan.return_weights)
    y, w = pmapped(stacked, inputs, mask, rng, positions, kv_positions)
    if w is not None:  # [m, B, N/m, T, S] -> [B, N, T, S]
        w = jnp.moveaxis(w, 0, 1)
        w = w.reshape(w.shape[0], -1, *w.shape[3:])
    return y, w


_RUNS = {"shard_map": _shard_map_run, "pmap": _pmap_run}
