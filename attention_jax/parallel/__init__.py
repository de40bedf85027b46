"""Parallel attention: meshes and logical specs, head parallelism, head-parallel decoding.

* :mod:`attention_jax.parallel.mesh`: ``make_mesh``, the logical-axis rules,
  parameter specs and placement.
* :mod:`attention_jax.parallel.heads`: ``head_parallel`` /
  ``HeadParallelAttention`` (heads over ``model``, batch over ``data``).
* :mod:`attention_jax.parallel.heads_decode`: the KV cache in that layout.
* :mod:`attention_jax.parallel.context` / :mod:`attention_jax.parallel.ring`: the
  sequence split over a ``context`` axis (``all_gather_attention``, ``ring_attention``,
  ``context_decode_attention`` for users' own ``shard_map``; zigzag layout helpers).

:mod:`attention_jax.sharding` re-exports every name, as before.
"""

from attention_jax.parallel.context import (
    LAYOUTS,
    all_gather_attention,
    context_decode_attention,
    from_layout,
    to_layout,
)
from attention_jax.parallel.heads import (
    BACKENDS,
    CONTEXT_STRATEGIES,
    HeadParallelAttention,
    default_context_strategy,
    head_parallel,
)
from attention_jax.parallel.heads_decode import cache_specs, shard_cache
from attention_jax.parallel.mesh import (
    CONTEXT,
    DATA,
    MESH_AXES,
    MODEL,
    KVLayout,
    kv_layout,
    logical_rules,
    make_mesh,
    mask_spec,
    param_bytes_per_device,
    param_shardings,
    param_specs,
    shard_params,
    spec_from_logical,
)
from attention_jax.parallel.ring import ring_attention, ring_tile_counts

__all__ = [
    "BACKENDS",
    "CONTEXT",
    "CONTEXT_STRATEGIES",
    "DATA",
    "LAYOUTS",
    "MESH_AXES",
    "MODEL",
    "HeadParallelAttention",
    "KVLayout",
    "all_gather_attention",
    "cache_specs",
    "context_decode_attention",
    "default_context_strategy",
    "from_layout",
    "head_parallel",
    "kv_layout",
    "logical_rules",
    "make_mesh",
    "mask_spec",
    "param_bytes_per_device",
    "param_shardings",
    "param_specs",
    "ring_attention",
    "ring_tile_counts",
    "shard_cache",
    "shard_params",
    "spec_from_logical",
    "to_layout",
]
