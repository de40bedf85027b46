"""What :mod:`attention_jax.benchmarks.head_parallel` measures, one table row at a time.

The configuration (:class:`Config`, ``MESHES``, ``VARIANTS``, ``QUICK``); the
building blocks (the module and its inputs, jitted forward and gradient,
errors, median times); :func:`run_sharded`, the module head-parallel on one
mesh; the baseline, seed article 000's per-head ``device_put`` loop
(:func:`baseline_forward`, :func:`run_baseline`, its transfers counted); and
:func:`reference_for`, the module on one device. Choosing the meshes and
devices, :func:`~attention_jax.benchmarks.head_parallel.run` and ``main`` are
in :mod:`attention_jax.benchmarks.head_parallel`, the table and plot in
:mod:`attention_jax.benchmarks.head_parallel_report`; every name here is
importable from :mod:`attention_jax.benchmarks.head_parallel` too.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import MultiHeadAttention, ops, sharding

MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
VARIANTS = (("MHA", 8, 8), ("GQA", 8, 2), ("MQA", 8, 1))  # (name, N, K)


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes and what to run.

    Attributes:
      batch: B, divisible by every mesh's ``data`` size.
      seq_len: T (causal self-attention).
      embed: D.
      head_dim: H.
      meshes: ``(data, model)`` shapes; ``data * model`` must be the device count.
      variants: ``(name, N, K)`` triples.
      dtype: parameters, inputs and cotangents (``"float32"`` or ``"bfloat16"``).
      repeats: timed calls per measurement (median reported).
      out: output folder (None: write nothing).
      plot: whether to write the plot.
      seed: parameter and input seed.
    """

    batch: int = 8
    seq_len: int = 128
    embed: int = 256
    head_dim: int = 32
    meshes: tuple[tuple[int, int], ...] = MESHES
    variants: tuple[tuple[str, int, int], ...] = VARIANTS
    dtype: str = "float32"
    repeats: int = 5
    out: str | None = None
    plot: bool = True
    seed: int = 0


QUICK = dict(batch=8, seq_len=8, embed=32, head_dim=8, repeats=2)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def build(cfg: Config, N: int, K: int) -> tuple[MultiHeadAttention, jax.Array, jax.Array]:
    """The module (nonzero biases), inputs x [B, T, D] and a cotangent ct [B, T, D]."""
    dtype = jnp.dtype(cfg.dtype)
    module = MultiHeadAttention(cfg.embed, N, num_kv_heads=K, head_dim=cfg.head_dim,
                                bias_init=nnx.initializers.normal(0.1), param_dtype=dtype,
                                rngs=nnx.Rngs(cfg.seed))
    rng = np.random.default_rng(cfg.seed + 1)
    shape = (cfg.batch, cfg.seq_len, cfg.embed)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    ct = jnp.asarray(rng.standard_normal(shape), dtype)
    return module, x, ct


def programs(model: nnx.Module, ct: jax.Array):
    """``(forward, grads, params)``: pure jitted functions of the split Params.

    ``grads(params, x)`` is the gradient of ``sum(model(x) * ct)`` w.r.t. the
    params and x: one forward and one backward pass.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x, is_causal=True)

    def loss(params, x):
        return jnp.sum(forward(params, x) * ct)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1))), params


def by_name(grads) -> dict[str, np.ndarray]:
    """``{'q_kernel': array, ..., 'x': array}`` from ``(param grads, x grad)``."""
    g_params, g_x = grads
    out = {path[-1]: np.asarray(v.get_value() if hasattr(v, "get_value") else v)
           for path, v in nnx.to_flat_state(g_params)}
    out["x"] = np.asarray(g_x)
    return out


def max_err(a, b) -> float:
    """Largest absolute difference of two arrays or two dicts of arrays (same keys)."""
    if isinstance(a, dict):
        return max(max_err(a[k], b[k]) for k in a)
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (blocked on its result) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compile_timed(jitted, *args):
    """``(compiled, seconds to lower and compile)``."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


# ---------------------------------------------------------------------------
# Head-parallel (shard_map) layout
# ---------------------------------------------------------------------------


def run_sharded(cfg: Config, mesh_shape: tuple[int, int], name: str, N: int, K: int,
                reference: dict, devices=None) -> dict:
    """One table row: the module head-parallel on a ``mesh_shape`` mesh of ``devices``."""
    data, model_size = mesh_shape
    mesh = sharding.make_mesh(data, model_size, devices=devices)
    module, x, ct = build(cfg, N, K)
    hp = sharding.head_parallel(module, mesh)
    forward, grads, params = programs(hp, ct)
    x = jax.device_put(x, NamedSharding(mesh, P(sharding.DATA)))  # once, outside the step
    fwd, fwd_s = compile_timed(forward, params, x)
    bwd, bwd_s = compile_timed(grads, params, x)
    q = hp.module.q_kernel[...]
    per_device = sharding.param_bytes_per_device(hp)
    return {
        "layout": "shard_map",
        "mesh": f"{data}x{model_size}",
        "variant": name, "N": N, "K": K,
        "kv_layout": hp.layout.value,
        "err_fwd": max_err(fwd(params, x), reference["y"]),
        "err_grad": max_err(by_name(bwd(params, x)), reference["grads"]),
        "compile_s": fwd_s + bwd_s,
        "fwd_ms": 1e3 * median_seconds(lambda: fwd(params, x), cfg.repeats),
        "step_ms": 1e3 * median_seconds(lambda: bwd(params, x), cfg.repeats),
        "fwd_collectives": sharding.collective_summary(fwd, mesh),
        "bwd_collectives": sharding.collective_summary(bwd, mesh),
        "transfers_per_call": 0,
        "transfer_bytes_per_call": 0,
        "param_bytes_per_device": max(per_device.values()),
        "param_bytes_total": sum(int(v[...].nbytes)
                                 for _, v in nnx.to_flat_state(nnx.state(hp, nnx.Param))),
        "q_kernel_bytes_per_device": max(s.data.nbytes for s in q.addressable_shards),
        "q_kernel_bytes_total": int(q.nbytes),
    }


# ---------------------------------------------------------------------------
# Baseline: the seed's per-head device_put loop
# ---------------------------------------------------------------------------


class TransferCounter:
    """``device_put`` that counts the calls that move data and their bytes."""

    def __init__(self):
        self.count = 0
        self.bytes = 0

    def put(self, x: jax.Array, device: jax.Device) -> jax.Array:
        if not (isinstance(x, jax.Array) and x.devices() == {device}):
            self.count += 1
            self.bytes += int(x.nbytes)
        return jax.device_put(x, device)


@jax.jit
def _one_head(x, wq, bq, wk, bk, wv, bv):
    """One head's attention on whichever device its (committed) inputs live.

    x [B, T, D]; w* [D, 1, H]; b* [1, H] -> [B, T, 1, V].
    """
    q = ops.project_heads(x, wq, bq)
    k = ops.project_heads(x, wk, bk)
    v = ops.project_heads(x, wv, bv)
    return ops.dot_product_attention(q, k, v, is_causal=True)


@jax.jit
def _project_out(heads, o_kernel, o_bias):
    """[B, T, N, V] heads -> [B, T, Do] on device 0."""
    return ops.merge_heads(heads, o_kernel) + o_bias


def baseline_forward(params: dict, x: jax.Array, devices, counter: TransferCounter) -> jax.Array:
    """Seed 000, in JAX: head ``i`` runs on ``devices[i % n]``, outputs gathered on device 0.

    Args:
      params: the module's parameters by name (on device 0), with biases.
      x: [B, T, D] on device 0.
      devices: the devices to spread heads over.
      counter: counts every ``device_put`` that moves data.
    """
    N, K = params["q_kernel"].shape[1], params["k_kernel"].shape[1]
    G = N // K
    home = devices[0]
    outs = []
    for i in range(N):
        dev, j = devices[i % len(devices)], i // G
        args = (x,
                params["q_kernel"][:, i:i + 1], params["q_bias"][i:i + 1],
                params["k_kernel"][:, j:j + 1], params["k_bias"][j:j + 1],
                params["v_kernel"][:, j:j + 1], params["v_bias"][j:j + 1])
        head = _one_head(*(counter.put(a, dev) for a in args))
        outs.append(counter.put(head, home))
    return _project_out(jnp.concatenate(outs, axis=2), params["o_kernel"], params["o_bias"])


def run_baseline(cfg: Config, name: str, N: int, K: int, reference: dict,
                 devices=None) -> dict:
    """The baseline's table row (forward only, like the seed)."""
    devices = jax.devices() if devices is None else list(devices)
    module, x, _ = build(cfg, N, K)
    home = devices[0]
    params = {n: jax.device_put(getattr(module, n)[...], home)
              for n in ("q_kernel", "k_kernel", "v_kernel", "o_kernel",
                        "q_bias", "k_bias", "v_bias", "o_bias")}
    # slices are taken on device 0 first, so the counted puts are the cross-device moves
    x = jax.device_put(x, home)
    t = time.perf_counter()
    counter = TransferCounter()
    y = baseline_forward(params, x, devices, counter)
    jax.block_until_ready(y)
    first_s = time.perf_counter() - t
    fwd_s = median_seconds(lambda: baseline_forward(params, x, devices, TransferCounter()),
                           cfg.repeats)
    total = sum(int(v.nbytes) for v in params.values())
    return {
        "layout": "device_put loop",
        "mesh": f"{len(devices)} dev",
        "variant": name, "N": N, "K": K,
        "kv_layout": "per head",
        "err_fwd": max_err(y, reference["y"]),
        "err_grad": None,
        "compile_s": first_s,
        "fwd_ms": 1e3 * fwd_s,
        "step_ms": None,
        "fwd_collectives": {},
        "bwd_collectives": {},
        "transfers_per_call": counter.count,
        "transfer_bytes_per_call": counter.bytes,
        "param_bytes_per_device": total,  # all weights live on device 0
        "param_bytes_total": total,
        "q_kernel_bytes_per_device": int(params["q_kernel"].nbytes),
        "q_kernel_bytes_total": int(params["q_kernel"].nbytes),
    }


def expected_baseline_transfers(N: int, n_devices: int, use_bias: bool = True) -> int:
    """Per forward: every head off device 0 gets x + 3 kernels (+ 3 biases) and returns 1."""
    off = sum(1 for i in range(N) if i % n_devices)
    return off * ((7 if use_bias else 4) + 1)


# ---------------------------------------------------------------------------
# Reference: the unsharded module on one device
# ---------------------------------------------------------------------------


def reference_for(cfg: Config, N: int, K: int) -> dict:
    """Forward and gradients of the unsharded module on one device."""
    module, x, ct = build(cfg, N, K)
    forward, grads, params = programs(module, ct)
    return {"y": np.asarray(forward(params, x)), "grads": by_name(grads(params, x))}
