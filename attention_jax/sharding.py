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
parameter slices, with the psum as its ``reduce`` hook; nothing re-derives
attention. The code lives in :mod:`attention_jax.parallel` (``mesh``, ``heads``,
``heads_decode``); this module re-exports every name, as before.

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

from attention_jax.hlo import COLLECTIVE_OPS as COLLECTIVE_OPS
from attention_jax.hlo import Collective as Collective
from attention_jax.hlo import axis_groups as axis_groups
from attention_jax.hlo import collective_counts as collective_counts
from attention_jax.hlo import collective_summary as collective_summary
from attention_jax.hlo import collectives as collectives
from attention_jax.hlo import group_axes as group_axes
from attention_jax.parallel.heads import BACKENDS as BACKENDS
from attention_jax.parallel.heads import CONTEXT_STRATEGIES as CONTEXT_STRATEGIES
from attention_jax.parallel.heads import HeadParallelAttention as HeadParallelAttention
from attention_jax.parallel.heads import head_parallel as head_parallel
from attention_jax.parallel.heads_decode import cache_specs as cache_specs
from attention_jax.parallel.heads_decode import shard_cache as shard_cache
from attention_jax.parallel.mesh import CONTEXT as CONTEXT
from attention_jax.parallel.mesh import DATA as DATA
from attention_jax.parallel.mesh import MESH_AXES as MESH_AXES
from attention_jax.parallel.mesh import MODEL as MODEL
from attention_jax.parallel.mesh import KVLayout as KVLayout
from attention_jax.parallel.mesh import kv_layout as kv_layout
from attention_jax.parallel.mesh import logical_rules as logical_rules
from attention_jax.parallel.mesh import make_mesh as make_mesh
from attention_jax.parallel.mesh import mask_spec as mask_spec
from attention_jax.parallel.mesh import param_bytes_per_device as param_bytes_per_device
from attention_jax.parallel.mesh import param_shardings as param_shardings
from attention_jax.parallel.mesh import param_specs as param_specs
from attention_jax.parallel.mesh import shard_params as shard_params
from attention_jax.parallel.mesh import spec_from_logical as spec_from_logical
