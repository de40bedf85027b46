"""Head-parallel decoding: the KV cache in the head-parallel layout, one psum per step.

Rows over ``data``; kv heads over ``model`` when they are split (K % model == 0),
replicated when K < model (every device then stores all K heads, identical
copies, and attends with its group's one). A step is
:func:`attention_jax.layer.decode_layer` on each device's slices with
``reduce=psum over model``.

On a mesh with a ``context`` axis (c devices) the cache is also split along its
length: device j holds slots ``[j*L/c, (j+1)*L/c)`` of every row. A step
(:func:`_local_context_decode`) projects the new tokens on every device of the axis
(x is replicated over it), writes each into the device that holds its slot, attends
to the local slots only (the blockwise kernel's ``block_forward``, slots at global
positions) and merges the partial outputs with their log-sum-exps in one small
collective over ``context`` (:func:`attention_jax.parallel.context.merge_over`,
``[c, B, t, N, V+1]`` floats), then the psum over ``model`` as above: nothing the
size of the cache moves, so a cache longer than one device's memory still decodes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import cache as kv_cache
from attention_jax import layer, modules, ops
from attention_jax.cache import KVCache
from attention_jax.config import AttentionConfig
from attention_jax.kernels import blockwise
from attention_jax.parallel import context as cp
from attention_jax.parallel.mesh import (
    CONTEXT,
    DATA,
    MODEL,
    KVLayout,
    check_batch,
    explicit_reshard,
    mask_spec,
    module_layout,
)

Array = jax.Array


def layout_cache_specs(layout: KVLayout, quantized: bool, context: bool = False) -> KVCache:
    """The specs of a cache's fields for a kv layout (see :func:`cache_specs`); with
    ``context`` the slots are split over the ``context`` axis."""
    kv = MODEL if layout is KVLayout.SPLIT else None
    seq = CONTEXT if context else None
    heads = P(DATA, kv, seq, None)  # [B, K, L, H]
    scales = P(DATA, kv, seq) if quantized else None
    return KVCache(k=heads, v=heads, lengths=P(DATA), k_scale=scales, v_scale=scales)


def cache_specs(module: modules.MultiHeadAttention, mesh: Mesh, *,
                quantized: bool = False) -> KVCache:
    """``PartitionSpec`` of each field of ``module``'s :class:`KVCache` on ``mesh``.

    Rows over ``data``; kv heads over ``model`` when they are split (K % model
    == 0), replicated when K < model (every device then stores all K heads,
    identical copies, and attends with its group's one); on a mesh with a
    ``context`` axis the slots (the cache's length) over ``context``.

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
    return layout_cache_specs(module_layout(module, mesh), quantized, has_context(mesh))


def has_context(mesh: Mesh) -> bool:
    """Whether ``mesh`` has a ``context`` axis (the cache's slots are split over it)."""
    return CONTEXT in mesh.axis_names


def check_cache_length(max_length: int, mesh: Mesh) -> None:
    """Raises ValueError naming both numbers when the slots do not divide over ``context``."""
    c = mesh.shape.get(CONTEXT, 1)
    if max_length % c:
        raise ValueError(f"cache max_length {max_length} is not divisible by the context "
                         f"axis size {c}")


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
    check_cache_length(cache.max_length, mesh)
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


def _local_context_decode(params, x, cache, mask, valid_lengths, *, plan: DecodePlan
                          ) -> tuple[Array, KVCache]:
    """One device's decode step with the cache's slots split over ``context``.

    Args:
      params: local slices (kv params whole when the layout is REPLICATED).
      x: ``[B/data, t, D]`` (the same on every device of ``context``).
      cache: ``k [B/data, K/model | K, L/context, H]`` ..., this device's slots;
        ``lengths`` / ``starts`` ``[B/data]`` global (the same on the axis).
      mask: ``[B/data | 1, N/model | 1, t | 1, L/context | 1]`` or None.
      valid_lengths: ``[B/data]`` or None.

    Returns:
      ``(y [B/data, t, Do] summed over model, the local cache after the step)``; the
      same slots stored and the same bookkeeping as :func:`attention_jax.cache.update`.
    """
    cfg = plan.config
    p, dtype = layer._cast_params(params, x, dtype=cfg.dtype)
    B, t = x.shape[:2]
    Lc, c = cache.max_length, jax.lax.axis_index(CONTEXT)
    L = Lc * jax.lax.axis_size(CONTEXT)
    pos = kv_cache.token_positions(cache, t)  # [B, t] global: slot - starts
    q, k, v = layer._project_qkv(p, x, x, x, dtype=dtype, rope=cfg.rope, positions=pos,
                                 kv_positions=pos, config=cfg)
    new = _store_local(cache, k, v, valid_lengths, offset=c * Lc, max_length=L)
    n_local = q.shape[2]
    head_offset = jax.lax.axis_index(MODEL) * n_local
    visible = new
    if plan.layout is KVLayout.REPLICATED:  # attend with this device's group's kv head
        first = jax.lax.axis_index(MODEL) * cfg.num_kv_heads // plan.model_size
        visible = kv_cache.select_kv_heads(new, first, 1)
    k_all, v_all = kv_cache.read(visible, q.dtype)  # [B, L/c, K', H]: this device's slots
    slots = c * Lc + jnp.arange(Lc, dtype=jnp.int32)  # [L/c] global
    q_slots = kv_cache.positions(cache, t)  # [B, t]
    seen = ((slots[None, None, :] <= q_slots[:, :, None])  # causal
            & (slots[None, None, :] < new.lengths[:, None, None])  # stored
            & (slots[None, None, :] >= cache.starts[:, None, None]))  # not left padding
    if cfg.sliding_window is not None:
        seen = seen & (slots[None, None, :] > q_slots[:, :, None] - cfg.sliding_window)
    seen = seen[:, None]  # [B, 1, t, L/c]
    if mask is not None:
        seen = seen & mask
    out, lse = blockwise.block_forward(
        q, k_all, v_all, seen, score_mod=layer._with_softcap(cfg, None), scale=cfg.scale,
        q_positions=pos, kv_positions=slots[None] - cache.starts[:, None],
        head_offset=head_offset)
    out, _ = cp.merge_over(out, lse, CONTEXT, p.get("sinks"))
    y = ops.merge_heads(out.astype(q.dtype), p["o_kernel"])
    return layer.add_output_bias(jax.lax.psum(y, MODEL), params), new


def _store_local(cache: KVCache, k_new: Array, v_new: Array, valid_lengths, *, offset,
                 max_length: int) -> KVCache:
    """:func:`attention_jax.cache.update` on this device's slots ``[offset, offset + L/c)``
    of a cache of ``max_length`` slots: each new token is written where its slot lives
    (nowhere else), the bookkeeping (global) is the same on every device."""
    B, t = k_new.shape[:2]
    given = kv_cache.resolve_valid_lengths(valid_lengths, B, t)
    valid = jnp.clip(given, 0, t)
    Lc = cache.max_length
    slot = kv_cache.positions(cache, t)  # [B, t] global
    local = slot - offset
    keep = (jnp.arange(t)[None, :] < valid[:, None]) & (local >= 0) & (local < Lc)
    local = jnp.where(keep, local, Lc)  # elsewhere (or padding, or past the end): dropped

    def put(buf: Array, x: Array) -> Array:
        return kv_cache.put_slots(buf, local, x)

    lengths = jnp.minimum(cache.lengths + valid, max_length).astype(jnp.int32)
    book = dict(lengths=lengths,
                dropped=cache.dropped + (cache.lengths + valid - lengths).astype(jnp.int32),
                clipped=cache.clipped + (given != valid).astype(jnp.int32))
    if not cache.quantized:
        return cache.replace(k=put(cache.k, k_new), v=put(cache.v, v_new), **book)
    kq, ks = kv_cache.quantize_int8(k_new)
    vq, vs = kv_cache.quantize_int8(v_new)
    return cache.replace(k=put(cache.k, kq), v=put(cache.v, vq), k_scale=put(cache.k_scale, ks),
                         v_scale=put(cache.v_scale, vs), **book)


@functools.partial(jax.jit, static_argnames="plan")
def shard_map_decode(params, x, cache, mask, valid_lengths, *, plan: DecodePlan):
    """``jax.shard_map`` of one decode step over the plan's mesh (the cache's slots over
    ``context`` too when the mesh has that axis: :func:`_local_context_decode`)."""
    mesh = plan.mesh
    context = has_context(mesh)
    if context:
        check_cache_length(cache.max_length, mesh)
    p_specs = {n: None if p is None else dict(plan.specs)[n] for n, p in params.items()}
    x_spec = P(DATA, None, None)
    c_specs = layout_cache_specs(plan.layout, cache.quantized, context)
    m_spec = None if mask is None else mask_spec(mask.shape, plan.config.num_heads)
    if context and mask is not None and mask.shape[-1] > 1:
        m_spec = P(*tuple(m_spec)[:3], CONTEXT)
    l_spec = None if valid_lengths is None else P(DATA)
    params = {n: None if p is None else explicit_reshard(p, mesh, p_specs[n])
              for n, p in params.items()}
    x = explicit_reshard(x, mesh, x_spec)
    cache = jax.tree.map(lambda a, s: explicit_reshard(a, mesh, s), cache, c_specs)
    mask = None if mask is None else explicit_reshard(mask, mesh, m_spec)
    if valid_lengths is not None:
        valid_lengths = explicit_reshard(jnp.asarray(valid_lengths, jnp.int32), mesh, l_spec)
    body = _local_context_decode if context else _local_decode
    return jax.shard_map(
        functools.partial(body, plan=plan), mesh=mesh,
        in_specs=(p_specs, x_spec, c_specs, m_spec, l_spec),
        out_specs=(x_spec, c_specs),
    )(params, x, cache, mask, valid_lengths)
