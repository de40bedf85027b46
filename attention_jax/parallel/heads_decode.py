"""Head-parallel decoding: the KV cache in the head-parallel layout, one psum per step.

Rows over ``data``; kv heads over ``model`` when they are split (K % model == 0),
replicated when K < model (every device then stores all K heads, identical
copies, and attends with its group's one). A step is
:func:`attention_jax.layer.decode_layer` on each device's slices with
``reduce=psum over model``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import layer, modules
from attention_jax.cache import KVCache
from attention_jax.config import AttentionConfig
from attention_jax.parallel.mesh import (
    DATA,
    MODEL,
    KVLayout,
    check_batch,
    explicit_reshard,
    mask_spec,
    module_layout,
)

Array = jax.Array


def layout_cache_specs(layout: KVLayout, quantized: bool) -> KVCache:
    """The specs of a cache's fields for a kv layout (see :func:`cache_specs`)."""
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
    >>> from attention_jax.parallel.mesh import MESH_AXES
    >>> from flax import nnx
    >>> mesh = jax.sharding.AbstractMesh((2, 4), MESH_AXES)  # or make_mesh(2, 4)
    >>> gqa = MultiHeadAttention(16, 8, num_kv_heads=2, rngs=nnx.Rngs(0))
    >>> specs = cache_specs(gqa, mesh)
    >>> tuple(specs.k), tuple(specs.lengths)
    (('data', None, None, None), ('data',))
    """
    return layout_cache_specs(module_layout(module, mesh), quantized)


def shard_cache(cache: KVCache, module: modules.MultiHeadAttention, mesh: Mesh) -> KVCache:
    """Places ``cache`` (e.g. one filled on a single device) in the head-parallel layout.

    Raises:
      ValueError: when the batch does not divide over ``data`` or the cache's
        heads do not fit the module.
    """
    check_batch(cache.batch_size, mesh)
    if cache.num_kv_heads != module.config.num_kv_heads:
        raise ValueError(
            f"the cache holds {cache.num_kv_heads} kv heads but the module has "
            f"K={module.config.num_kv_heads}"
        )
    specs = cache_specs(module, mesh, quantized=cache.quantized)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything static about one head-parallel decode step (the jit cache key)."""

    mesh: Mesh
    layout: KVLayout
    config: AttentionConfig
    specs: tuple[tuple[str, P], ...]  # parameter name -> PartitionSpec

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]


def _local_decode(params, x, cache, mask, valid_lengths, *, plan: DecodePlan
                  ) -> tuple[Array, KVCache]:
    """One device's decode step: :func:`layer.decode_layer` on local slices, one psum.

    Args:
      params: local slices (kv params whole when the layout is REPLICATED).
      x: ``[B/data, t, D]``.
      cache: ``k [B/data, L, K/model | K, H]`` ..., ``lengths [B/data]``.
      mask: ``[B/data | 1, N/model | 1, t | 1, L | 1]`` or None.
      valid_lengths: ``[B/data]`` or None.

    Returns:
      ``(y [B/data, t, Do] summed over model, the local cache after the step)``.
    """
    kv_heads = None
    if plan.layout is KVLayout.REPLICATED:
        # Store all K heads (identical replicas everywhere), attend with this
        # device's group: its query heads all share kv head shard * K // model.
        kv_heads = (jax.lax.axis_index(MODEL) * plan.config.num_kv_heads // plan.model_size, 1)
    return layer.decode_layer(
        plan.config, params, x, cache, mask=mask, valid_lengths=valid_lengths,
        kv_heads=kv_heads, reduce=lambda y: jax.lax.psum(y, MODEL),
    )


@functools.partial(jax.jit, static_argnames="plan")
def shard_map_decode(params, x, cache, mask, valid_lengths, *, plan: DecodePlan):
    """``jax.shard_map`` of one decode step over the plan's mesh."""
    mesh = plan.mesh
    p_specs = {n: None if p is None else dict(plan.specs)[n] for n, p in params.items()}
    x_spec = P(DATA, None, None)
    c_specs = layout_cache_specs(plan.layout, cache.quantized)
    m_spec = None if mask is None else mask_spec(mask.shape, plan.config.num_heads)
    l_spec = None if valid_lengths is None else P(DATA)
    params = {n: None if p is None else explicit_reshard(p, mesh, p_specs[n])
              for n, p in params.items()}
    x = explicit_reshard(x, mesh, x_spec)
    cache = jax.tree.map(lambda a, s: explicit_reshard(a, mesh, s), cache, c_specs)
    mask = None if mask is None else explicit_reshard(mask, mesh, m_spec)
    if valid_lengths is not None:
        valid_lengths = explicit_reshard(jnp.asarray(valid_lengths, jnp.int32), mesh, l_spec)
    return jax.shard_map(
        functools.partial(_local_decode, plan=plan), mesh=mesh,
        in_specs=(p_specs, x_spec, c_specs, m_spec, l_spec),
        out_specs=(x_spec, c_specs),
    )(params, x, cache, mask, valid_lengths)
