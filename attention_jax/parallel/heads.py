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

This module builds each call's plan and holds the module
(:class:`HeadParallelAttention`, :func:`head_parallel`) and the checks of its
options; the per-device body, the operands' specs and the ``shard_map`` /
``pmap`` mappings are in :mod:`attention_jax.parallel.heads_body`, whose names
are importable from here as before.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from attention_jax import cache as kv_cache
from attention_jax import layer as layer_lib
from attention_jax import masks, modules
from attention_jax.cache import KVCache
from attention_jax.config import AttentionConfig
from attention_jax.parallel import context as cp
from attention_jax.parallel import heads_decode
from attention_jax.parallel.heads_body import (  # noqa: F401 (names of this module before)
    _RUNS,
    Inputs,
    _local_forward,
    _mask_specs,
    _Plan,
    _pmap_run,
    _positions_spec,
    _shard_map_impl,
    _shard_map_run,
    _stack,
    _without_explicit_types,
    context_attention,
    kv_axis,
    local_kv_params,
    psum_model,
)
from attention_jax.parallel.mesh import (
    CONTEXT,
    DATA,
    MODEL,
    axis_size,
    check_batch,
    context_size,
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
        _check_qk_norm(module, mesh)
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
        segment_ids: Array | tuple[Array, Array] | None = None,
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
        if segment_ids is not None:  # a Segments mask object: its ids go over `data`
            mask = layer_lib.with_segments(mask, segment_ids, (B, T), S)
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
        heads_decode.check_cache_length(max_length, self.mesh)  # slots over `context`
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
        module): one psum over ``model`` per step, plus on a context mesh one small psum
        of the partial outputs over ``context``.
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


def _check_qk_norm(module, mesh: Mesh) -> None:
    """Refuses ``qk_norm="full"`` on a ``model`` axis of size > 1: its RMSNorm runs over
    all N * H (K * H) features, which no head shard holds without a collective."""
    m = axis_size(mesh, MODEL)
    if module.config.qk_norm == "full" and m > 1:
        raise ValueError(
            f"qk_norm='full' normalises over all {module.config.num_heads} query heads "
            f"({module.config.num_kv_heads} kv heads), which a head shard does not hold: "
            f"it cannot run on a model axis of size {m} > 1; use qk_norm='head' or model=1")


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
