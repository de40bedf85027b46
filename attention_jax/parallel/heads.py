"""Head parallelism: attention heads split over the ``model`` axis of a device mesh.

Megatron-style: every device holds the q/k/v kernels of ``N / model`` heads and
the matching rows of the output kernel, computes its heads' attention and its
partial output projection, and one ``psum`` over ``model`` adds the partial
outputs. The batch is split over ``data``. Block shapes per device::

    x:        f32[B/data, T, D]          (replicated over model)
    q_kernel: f32[D, N/model, H]         k_kernel: f32[Dk, K/model | 1, H]
    o_kernel: f32[N/model, V, Do]        o_bias:   f32[Do]  (replicated)
    y_part:   f32[B/data, T, Do]  --psum(model)-->  y: f32[B/data, T, Do]

The local math is :func:`attention_jax.layer.attention_layer` on the local
parameter slices with ``reduce=psum over model`` (so ``o_bias`` is added once,
after the sum); nothing here re-derives attention.

Communication, as read from the compiled HLO (:mod:`attention_jax.hlo`):
forward, one all-reduce of ``y_part`` over ``model``; backward, one all-reduce
over ``model`` (the input cotangents, plus the k/v gradients when replicated)
and one over ``data`` (the parameter gradients), each a tuple op after XLA's
all-reduce combiner.

Dropout runs on each device with the module's key folded with the device's
``model`` and ``data`` indices: the right distribution, not the unsharded bits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import cache as kv_cache
from attention_jax import layer, masks, modules
from attention_jax.cache import KVCache
from attention_jax.config import ALL_PARAM_AXES, KV_HEADS, AttentionConfig
from attention_jax.parallel import context as cp
from attention_jax.parallel import heads_decode, ring
from attention_jax.parallel.mesh import (
    CONTEXT,
    DATA,
    MODEL,
    KVLayout,
    axis_size,
    check_batch,
    context_size,
    explicit_reshard,
    mask_spec,
    module_layout,
    param_specs,
    shard_params,
)

Array = jax.Array

BACKENDS = ("shard_map", "pmap")
CONTEXT_STRATEGIES = ("ring", "all_gather")


def default_context_strategy(num_heads: int, num_kv_heads: int) -> str:
    """The rule: ``"all_gather"`` for GQA / MQA (K < N: the gathered K/V are K/N the
    size of the queries, as Llama 3 trained long context), ``"ring"`` for MHA (K = N:
    gathering would hold the whole sequence's K/V on every device).

    >>> default_context_strategy(8, 2), default_context_strategy(8, 8)
    ('all_gather', 'ring')
    """
    return "all_gather" if num_kv_heads < num_heads else "ring"


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
                 backend: str = "shard_map", context_strategy: str | None = None,
                 context_layout: str = "contiguous"):
        if not isinstance(module, modules.MultiHeadAttention):
            raise TypeError(f"expected a MultiHeadAttention; got {type(module).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        axis_size(mesh, DATA)
        self.layout = module_layout(module, mesh)
        self.context_strategy, self.context_layout = _context_options(
            module, mesh, backend, context_strategy, context_layout)
        self.mesh = mesh
        self.backend = backend
        self.module = shard_params(module, mesh)

    @property
    def config(self) -> AttentionConfig:
        """The wrapped module's :class:`~attention_jax.config.AttentionConfig`."""
        return self.module.config

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
        positions: Array | None = None,
        kv_positions: Array | None = None,
        score_mod=None,
    ) -> Array | tuple[Array, Array]:
        """As :meth:`MultiHeadAttention.__call__`; B must be divisible by ``data``.

        A mask object's arrays (segment ids, lengths) are split over ``data`` with
        the rows; per-head masks and ``score_mod`` see global head indices.
        ``score_mod`` needs ``backend="shard_map"``.

        Returns:
          ``[B, T, Do]`` sharded ``P('data')``, and the weights ``[B, N, T, S]``
          sharded ``P('data', 'model')`` when ``return_weights``.
        """
        module = self.module
        xq, xk, _ = module.resolve_inputs(inputs_q, inputs_k, inputs_v)
        B, T, S = xq.shape[0], xq.shape[1], xk.shape[1]
        check_batch(B, self.mesh)
        if isinstance(mask, masks.Mask):
            mask.check(B, module.config.num_heads, T, S)
        elif mask is not None:
            mask = mask_4d(mask, (B, module.config.num_heads, T, S))
        if score_mod is not None and self.backend != "shard_map":
            raise ValueError(f"score_mod needs backend='shard_map'; this module has "
                             f"backend={self.backend!r}")
        dropout_key = module.dropout_key(deterministic)
        if self.context_strategy is not None:
            _check_context_call(self.mesh, self.context_layout, T, S, mask, return_weights,
                                positions, kv_positions, dropout_key)
        plan = _Plan(
            backend=self.backend, mesh=self.mesh, layout=self.layout, config=module.config,
            specs=tuple(param_specs(module, self.mesh).items()), is_causal=bool(is_causal),
            return_weights=bool(return_weights), context=self.context_strategy,
            context_layout=self.context_layout,
        )
        run = _RUNS[self.backend]
        if score_mod is not None:
            run = functools.partial(_shard_map_impl, score_mod=score_mod)
        y, w = run(
            module.param_values(), Inputs(inputs_q, inputs_k, inputs_v), mask,
            dropout_key, positions, kv_positions, plan=plan,
        )
        return (y, w) if return_weights else y

    # -- decoding ----------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty cache created directly in the head-parallel layout (:func:`cache_specs`).

        As :meth:`MultiHeadAttention.init_cache`; ``batch_size`` must divide over ``data``.
        """
        check_batch(batch_size, self.mesh)
        module = self.module
        abstract = jax.eval_shape(lambda: module.init_cache(batch_size, max_length, dtype))
        specs = heads_decode.cache_specs(module, self.mesh, quantized=abstract.quantized)
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
        check_batch(x.shape[0], self.mesh)
        B, t = x.shape[:2]
        valid = kv_cache.resolve_valid_lengths(valid_lengths, B, t)
        kv_cache.check_capacity(cache, valid)
        if mask is not None:
            mask = mask_4d(mask, (B, module.config.num_heads, t, cache.max_length))
        plan = heads_decode.DecodePlan(
            mesh=self.mesh, layout=self.layout, config=module.config,
            specs=tuple(param_specs(module, self.mesh).items()),
        )
        return heads_decode.shard_map_decode(module.param_values(), x, cache, mask,
                                             valid_lengths, plan=plan)


def mask_4d(mask: Array, shape: tuple[int, int, int, int]) -> Array:
    """``mask`` reshaped to rank 4 after checking it broadcasts to ``shape`` = [B, N, T, S]."""
    if mask.ndim > 4 or any(
        a not in (1, b) for a, b in zip(mask.shape[::-1], shape[::-1], strict=False)
    ):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [batch, heads, q_len, "
            f"kv_len] = {list(shape)}"
        )
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def _context_options(module, mesh: Mesh, backend: str, strategy: str | None,
                     layout: str) -> tuple[str | None, str]:
    """``(strategy, layout)`` on a mesh with a ``context`` axis; ``(None, layout)`` without."""
    if CONTEXT not in mesh.shape:
        if strategy is not None:
            raise ValueError(f"context_strategy={strategy!r} needs a mesh with a 'context' "
                             f"axis (make_mesh(..., context=n)); mesh axes: {tuple(mesh.shape)}")
        return None, layout
    if backend != "shard_map":
        raise ValueError(f"a context axis needs backend='shard_map'; got backend={backend!r}")
    cfg = module.config
    strategy = default_context_strategy(cfg.num_heads, cfg.num_kv_heads) if strategy is None \
        else strategy
    if strategy not in CONTEXT_STRATEGIES:
        raise ValueError(f"context_strategy must be one of {CONTEXT_STRATEGIES}; got {strategy!r}")
    cp.check_layout(layout, 2)
    return strategy, layout


def _check_context_call(mesh: Mesh, layout: str, T: int, S: int, mask, return_weights,
                        positions, kv_positions, dropout_key) -> None:
    """The call options a context-parallel module refuses, with the numbers."""
    c = context_size(mesh)
    for name, n in (("query length T", T), ("key length S", S)):
        if n % c:
            raise ValueError(f"{name}={n} is not divisible by the context axis size {c}")
        cp.check_layout(layout, n // c, f"{name} / context ({n} / {c})")
    if mask is not None and not isinstance(mask, masks.Mask):
        raise TypeError("on a context mesh, masks are mask objects (attention_jax.masks: "
                        "Causal, SlidingWindow, Segments, Lengths, ...), not dense arrays")
    if return_weights:
        raise ValueError("return_weights=True is not available on a context mesh")
    if positions is not None or kv_positions is not None:
        raise ValueError("positions / kv_positions are set by the context layout (the global "
                         "positions of each device's tokens); pass none on a context mesh")
    if dropout_key is not None:
        raise ValueError("attention dropout is not available on a context mesh; call with "
                         "deterministic=True or dropout_rate=0")


def head_parallel(
    module: modules.MultiHeadAttention, mesh: Mesh, *, backend: str = "shard_map",
    context_strategy: str | None = None, context_layout: str = "contiguous",
) -> HeadParallelAttention:
    """Splits ``module``'s heads over ``mesh``'s ``model`` axis (its Params move in place).

    On a mesh with a ``context`` axis (``make_mesh(data, model, context=c)``) the
    sequence is split too: activations are ``[B/data, T/context, D]`` and the layer's
    attention op is :func:`context_attention` (ring or all-gather over ``context``);
    parameters are replicated over ``context``, and the ``model`` psum is unchanged.

    Args:
      module: the attention module; its Params are placed on ``mesh``.
      mesh: a ``('data', 'model')`` or ``('data', 'model', 'context')`` mesh
        (:func:`make_mesh`), Explicit or Auto.
      backend: ``"shard_map"`` (data and model axes) or ``"pmap"`` (the same
        local computation through ``jax.pmap``; needs ``data == 1`` and no context).
      context_strategy: ``"ring"`` or ``"all_gather"``; default
        :func:`default_context_strategy` (all-gather for GQA / MQA, ring for MHA).
      context_layout: ``"contiguous"`` (device i holds tokens ``[i*T/c, (i+1)*T/c)``)
        or ``"zigzag"``: the inputs (and outputs) are in zigzag order, as
        :func:`attention_jax.parallel.context.to_layout` gives (causal balance).

    Returns:
      A :class:`HeadParallelAttention` with the ``__call__`` of the module.

    Raises:
      ValueError: naming N, K and the model axis size when the heads do not split.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attention_jax import MultiHeadAttention
    >>> from attention_jax.parallel.mesh import make_mesh
    >>> mesh = make_mesh(data=1, model=1, devices=jax.devices()[:1])
    >>> hp = head_parallel(MultiHeadAttention(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0)), mesh)
    >>> hp(jnp.ones((2, 3, 16)), is_causal=True).shape
    (2, 3, 16)
    """
    return HeadParallelAttention(module, mesh, backend=backend,
                                 context_strategy=context_strategy,
                                 context_layout=context_layout)
