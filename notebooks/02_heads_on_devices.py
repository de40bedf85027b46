# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Heads on devices
#
# The heads of an attention layer are independent until the output projection
# adds them up. That makes them a natural unit to spread over devices: give each
# device a few heads, let it project, attend and project out on its own, then
# add the partial outputs. This is *head parallelism* (the attention half of
# Megatron-style tensor parallelism).
#
# There are two ways to do it. The direct way keeps all weights on one device
# and, at every call, copies each head's inputs and weight slices to another
# device, runs the head there and copies the result back. The way
# `attention_jax.sharding.head_parallel` takes is to place every weight once,
# sharded by head, and compile one program for all devices in which the only
# communication is a single sum of the partial outputs. This notebook shows
# where the weights end up, which collectives the compiler emits, and compares
# both ways for errors and data movement.
#
# We have no accelerators here, so we ask XLA for 8 *fake* CPU devices. That
# must happen before JAX starts, hence the first lines of the first cell. Fake
# devices share the host's cores: they show placement and communication
# faithfully, but their timings say nothing about speed.

# %%
from attention_jax import runtime

runtime.use_fake_cpu_devices(8)  # sets XLA_FLAGS; must run before JAX initialises

import importlib.util  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attention_jax import sharding  # noqa: E402
from attention_jax.demo import format_table  # noqa: E402

devices = jax.devices("cpu")
print(f"jax {jax.__version__}: {len(devices)} CPU devices: {devices}")
assert len(devices) == 8, "restart the kernel: JAX started before the flag was set"

# %% [markdown]
# The experiment `experiments/head_parallel.py` already contains everything we
# need: a builder for the layer and its inputs, jitted forward and gradient
# programs, and a JAX version of the per-head copying approach. `experiments/`
# is a folder of scripts, not a package, so we load the file by its path.

# %%
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments").is_dir())


def load_script(path: Path, name: str):
    """Imports a script file as a module (registered first: its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


exp = load_script(ROOT / "experiments" / "head_parallel.py", "experiments_head_parallel")

# Tiny shapes: batch 4, 8 tokens, width 32, 8 query heads of size 4.
cfg = exp.Config(batch=4, seq_len=8, embed=32, head_dim=4, meshes=((2, 4),),
                 repeats=2, out=None, plot=False)
print(cfg)

# %% [markdown]
# ## A mesh
#
# A mesh arranges the devices in a grid with named axes. `make_mesh(data=2,
# model=4)` makes a $2 \times 4$ grid: the batch is split along `data`, the heads
# along `model`. Each of the 2 data rows holds a full copy of the layer, spread
# over its 4 devices.

# %%
mesh = sharding.make_mesh(data=2, model=4, devices=devices)
print(mesh)
print(mesh.devices)

# %% [markdown]
# ## Where the weights go
#
# We build a GQA layer with $N = 8$ query heads and $K = 2$ key/value heads and
# hand it to `head_parallel`. Each parameter carries *logical* axis names
# (`heads`, `kv_heads`, `embed`, `head_dim`); the sharding module maps them to mesh
# axes. The query heads go to `model`: with 4 devices per row, each holds 2 of
# the 8. The 2 key/value heads cannot be split four ways, so they are
# replicated and each device picks the one its query heads read (the
# `REPLICATED` layout); with $K = 8$ they would be split like the queries.

# %%
N, K = 8, 2
gqa, x, ct = exp.build(cfg, N, K)
hp = sharding.head_parallel(gqa, mesh)
print(f"N={N}, K={K}: key/value layout {hp.layout}")
for name, spec in sharding.param_specs(hp.module, mesh).items():
    print(f"  {name:9s} {getattr(hp.module, name).shape!s:12s} -> {spec}")

# %% [markdown]
# `jax.debug.visualize_array_sharding` draws which device holds which block of a
# 1-D or 2-D array. Our kernels are 3-D, so we draw 2-D views of them: the
# kernel `q_kernel [D, N, H]` as a `[D, N*H]` matrix (one column band per device,
# two heads each), `o_kernel [N, V, D]` as `[N*V, D]` (one row band per device).
# Reshaping keeps the sharding because the sharded head axis stays the major
# axis of the merged one. Every device of a `model` column appears twice
# (e.g. `CPU 0,4`): the two `data` rows hold the same weights.

# %%
def matrix_view(name: str, value: jax.Array) -> jax.Array:
    """A 2-D view of a kernel: fan-in axes as rows, the rest as columns."""
    n_in = 2 if name == "o_kernel" else 1
    return value.reshape(int(np.prod(value.shape[:n_in])), -1)


for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel"):
    value = getattr(hp.module, name)[...]
    view = matrix_view(name, value)
    print(f"{name} {value.shape} viewed as {view.shape}: {value.sharding.spec}")
    jax.debug.visualize_array_sharding(view)

# %% [markdown]
# With $K = 8$ (MHA) the key kernel is split like the query kernel instead:

# %%
mha_hp = sharding.head_parallel(exp.build(cfg, 8, 8)[0], mesh)
print(f"N=8, K=8: key/value layout {mha_hp.layout}")
jax.debug.visualize_array_sharding(matrix_view("k_kernel", mha_hp.module.k_kernel[...]))

# %% [markdown]
# The parameter bytes per device follow: each device holds a quarter of the
# query and output kernels and all of the small replicated key/value kernels.

# %%
per_device = sharding.param_bytes_per_device(hp)
specs = sharding.param_specs(hp.module, mesh)
nbytes = {n: int(getattr(hp.module, n)[...].nbytes) for n in specs}
model = mesh.shape[sharding.MODEL]
expected = sum(b // (model if sharding.MODEL in specs[n] else 1) for n, b in nbytes.items())
print(f"parameter bytes: {sum(nbytes.values())} in all; per device: {per_device}")
print(f"expected per device: {expected}")
assert set(per_device.values()) == {expected}

# %% [markdown]
# ## Activations
#
# The output `y [B, T, D]` comes back split over `data` along the batch and
# complete on every `model` device (the partial outputs have been summed). The
# attention weights `[B, N, T, S]`, if asked for, stay where they were computed:
# batch over `data`, heads over `model`. We draw `y` as `[B, T*D]` and the weights
# of the first query and key position as a `[B, N]` grid.

# %%
y, w = hp(x, is_causal=True, return_weights=True)
print(f"y {y.shape}: {y.sharding.spec};  weights {w.shape}: {w.sharding.spec}")
jax.debug.visualize_array_sharding(y.reshape(y.shape[0], -1))
jax.debug.visualize_array_sharding(w[:, :, 0, 0])

# %% [markdown]
# ## Communication, read from the compiled program
#
# `exp.programs` returns a jitted forward and a jitted gradient (of
# `sum(y * ct)` with respect to every parameter and the input) as pure functions
# of the parameters. We compile them and list the collective operations XLA put
# into the program (`sharding.collective_summary` reads them from the HLO text
# and names the mesh axes each one spans).
#
# The forward has exactly one: the all-reduce (sum) of the partial outputs over
# `model`. The gradient program has two. One over `model`: the input's gradient
# is a sum over all heads, and so are the gradients of the replicated key/value
# kernels. One over `data`: each parameter's gradient is summed over the two
# halves of the batch. (The forward's sum is not in it: the gradient of
# `sum(y * ct)` does not need `y` itself, so XLA drops that computation.) XLA's
# combiner fuses the sums over one axis into a single tuple all-reduce.

# %%
forward, grads, params = exp.programs(hp, ct)
fwd_compiled = forward.lower(params, x).compile()
bwd_compiled = grads.lower(params, x).compile()
fwd_summary = sharding.collective_summary(fwd_compiled, mesh)
bwd_summary = sharding.collective_summary(bwd_compiled, mesh)
print("forward:           ", fwd_summary)
print("forward + backward:", bwd_summary)
for c in sharding.collectives(fwd_compiled):
    if not c.trivial:
        print(f"  forward {c.op} of {c.shape}, groups {c.groups}")
        assert c.groups == sharding.axis_groups(mesh, sharding.MODEL)  # the mesh's rows
assert fwd_summary == {"all-reduce@model": 1}
assert bwd_summary == {"all-reduce@model": 1, "all-reduce@data": 1}

# %% [markdown]
# The groups of the forward all-reduce are the rows of the mesh: devices 0-3
# add their partial outputs, and so do devices 4-7, each group for its half of
# the batch.
#
# ## The per-head copying approach
#
# Here is that approach in JAX, as the experiment implements it. Head $i$ runs
# on device $i \bmod n$: the input and the head's weight slices are copied there
# with `jax.device_put`, the head's attention runs there, its output is copied
# back to device 0, and device 0 does the output projection. Every call moves
# the same weights again, from Python, one array at a time.

# %%
print(inspect.getsource(exp.baseline_forward))

# %% [markdown]
# ## Side by side
#
# For MHA, GQA and MQA with $N = 8$ we run both approaches and compare them with
# the same layer on a single device: `err_fwd` is the largest difference of the
# outputs, `err_grad` that of all gradients (the copying approach as written
# has no backward). `host puts/call` counts the `device_put` calls that move data
# in one forward: the sharded layer has none, since its weights were placed
# once and the input is placed once outside the step.

# %%
rows = []
for name, n_heads, n_kv in cfg.variants:
    reference = exp.reference_for(cfg, n_heads, n_kv)
    rows.append(exp.run_sharded(cfg, (2, 4), name, n_heads, n_kv, reference, devices))
    rows.append(exp.run_baseline(cfg, name, n_heads, n_kv, reference, devices))
print(format_table(exp.table_rows(rows)))
print(exp.FAKE_NOTE)

# %%
ATOL_FWD, ATOL_GRAD = 1e-5, 1e-4  # float32, these sizes
for r in rows:
    assert r["err_fwd"] < ATOL_FWD, r
    if r["layout"] == "shard_map":
        assert r["err_grad"] < ATOL_GRAD, r
        assert r["fwd_collectives"] == {"all-reduce@model": 1}, r
        assert r["transfers_per_call"] == 0
    else:
        expected = exp.expected_baseline_transfers(r["N"], len(devices))
        assert r["transfers_per_call"] == expected, (r["transfers_per_call"], expected)
print("max forward error:", max(r["err_fwd"] for r in rows))

# %% [markdown]
# Both approaches compute the same function; they differ in what moves. A
# picture of the last two columns:

# %%
labels = [f"{r['variant']}\n{'shard_map' if r['layout'] == 'shard_map' else 'device_put loop'}"
          for r in rows]
fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(10, 3.4))
ax_t.bar(labels, [r["transfer_bytes_per_call"] / 1024 for r in rows], color="tab:red")
ax_t.set_ylabel("KiB copied by device_put per call")
ax_t.set_title("host-driven transfers per forward")
ax_b.bar(labels, [r["param_bytes_per_device"] / 1024 for r in rows], color="tab:blue")
ax_b.set_ylabel("parameter KiB on the fullest device")
ax_b.set_title("parameter memory per device")
for ax in (ax_t, ax_b):
    ax.tick_params(axis="x", labelsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# What the comparison shows:
#
# * **Same numbers.** Both agree with the single-device layer to float32
#   rounding, and the sharded layer's gradients do too.
# * **Communication.** The sharded forward has one all-reduce of the output
#   `[B/data, T, D]` per call, inside the compiled program. The copying loop
#   issues $8$ host-driven transfers for each head not on device 0 (input,
#   three kernels, three biases, and the output coming back), every call.
# * **Memory.** The `device_put` loop keeps all weights on device 0; the sharded
#   layer divides the query and output kernels by the `model` axis size.
#
# `head_parallel(..., backend="pmap")` runs the same per-device function through
# `jax.pmap` instead of `jax.shard_map` (model axis only); the tests check that
# both give the same result.
