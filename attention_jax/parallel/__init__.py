"""Parallel attention: meshes and logical specs, head parallelism, head-parallel decoding.

* :mod:`attention_jax.parallel.mesh`: ``make_mesh``, the logical-axis rules,
  parameter specs and placement.
* :mod:`attention_jax.parallel.heads`: ``head_parallel`` /
  ``HeadParallelAttention`` (heads over ``model``, batch over ``data``).
* :mod:`attention_jax.parallel.heads_decode`: the KV cache in that layout.

:mod:`attention_jax.sharding` re-exports every name, as before.
"""

from attention_jax.parallel.heads import BACKENDS, HeadParallelAttention, head_parallel
from attention_jax.parallel.heads_decode import cache_specs, shard_cache
from attention_jax.parallel.mesh import (
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

__all__ = [
    "BACKENDS",
    "DATA",
    "MESH_AXES",
    "MODEL",
    "HeadParallelAttention",
    "KVLayout",
    "cache_specs",
    "head_parallel",
    "kv_layout",
    "logical_rules",
    "make_mesh",
    "mask_spec",
    "param_bytes_per_device",
    "param_shardings",
    "param_specs",
    "shard_cache",
    "shard_params",
    "spec_from_logical",
]
