"""Head parallelism on a device mesh vs the seed's per-head ``device_put`` loop.

For each mesh shape ``(data, model)`` and each of MHA / GQA / MQA, the module is
split over the mesh with :func:`attention_jax.sharding.head_parallel` and its
jitted forward and gradient (``sum(y * ct)`` w.r.t. every parameter and the
input) are compared with the same module on one device. The table shows the
errors, compile and step times, the collectives XLA put in the compiled
programs (:func:`attention_jax.sharding.collective_summary`), host-level
transfers per call, and the parameter bytes each device holds.

The baseline is a JAX version of seed article 000's approach: for each head
``i``, ``jax.device_put`` the input and that head's weight slices
(``q_kernel[:, i]``, ``k_kernel[:, i // G]``, ...) to device ``i % n``, compute
the head there, ``device_put`` its output back to device 0 and project there.
Same math as the module, but every call moves inputs and weights between
devices from Python; its transfers are counted.

Importing this module sets no device flag. ``attention-jax shard`` (and
``experiments/head_parallel.py``) ask for 8 fake CPU devices before JAX starts
when there is no accelerator (``--devices N`` for N). Fake devices share the
host's cores: times there prove nothing about speed, only the counts and errors
mean something. Without ``--meshes`` it runs every ``data x model`` mesh of the
device count that the shapes allow (8 devices: 1x8 2x4 4x2 8x1).

Writes ``head_parallel.json`` and ``head_parallel.png`` under ``--out``
(default: the scratch folder :func:`attention_jax.cli.default_out`).

    attention-jax shard [--quick] [--devices 8] [--dtype bfloat16] [--out DIR]
    python experiments/head_parallel.py [--quick] [--meshes 2x4 1x8] [--variants MQA]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import MultiHeadAttention, ops, sharding
from attention_jax.cli import (
    default_out,
    format_collectives,
    print_table,
    print_text,
    progress_bar,
)
from attention_jax.demo import format_table

MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
VARIANTS = (("MHA", 8, 8), ("GQA", 8, 2), ("MQA", 8, 1))  # (name, N, K)
FAKE_NOTE = ("note: fake CPU devices share this host's cores; the times above prove nothing "
             "about speed, only the errors, collectives, transfers and bytes mean something.")


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
# Driver
# ---------------------------------------------------------------------------


def reference_for(cfg: Config, N: int, K: int) -> dict:
    """Forward and gradients of the unsharded module on one device."""
    module, x, ct = build(cfg, N, K)
    forward, grads, params = programs(module, ct)
    return {"y": np.asarray(forward(params, x)), "grads": by_name(grads(params, x))}


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed columns of the result rows."""
    out = []
    for r in rows:
        moved = (f"{r['transfers_per_call']} ({r['transfer_bytes_per_call'] / 1024:.0f} KiB)"
                 if r["transfers_per_call"] else "0")
        out.append({
            "layout": r["layout"], "mesh": r["mesh"], "attn": f"{r['variant']} {r['N']}/{r['K']}",
            "err_fwd": r["err_fwd"], "err_grad": r["err_grad"],
            "compile_s": r["compile_s"], "fwd_ms": r["fwd_ms"], "step_ms": r["step_ms"],
            "fwd collectives": format_collectives(r["fwd_collectives"]),
            "fwd+bwd collectives": format_collectives(r["bwd_collectives"]),
            "host puts/call": moved,
            "param KiB/dev": r["param_bytes_per_device"] / 1024,
        })
    return out


def plot(result: dict, path: Path) -> bool:
    """Step/forward times per mesh and variant, baseline forward as a dashed line."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    meshes = list(dict.fromkeys(r["mesh"] for r in rows if r["layout"] == "shard_map"))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(variants))
    for vi, var in enumerate(variants):
        fwd = [next(r["fwd_ms"] for r in rows if r["mesh"] == m and r["variant"] == var
                    and r["layout"] == "shard_map") for m in meshes]
        pos = np.arange(len(meshes)) + vi * width
        bars = ax_t.bar(pos, fwd, width, label=f"{var} shard_map fwd")
        base = [r for r in rows if r["layout"] != "shard_map" and r["variant"] == var]
        if base:
            ax_t.axhline(base[0]["fwd_ms"], ls="--", color=bars[0].get_facecolor(),
                         label=f"{var} device_put loop fwd")
        kib = [next(r["param_bytes_per_device"] for r in rows if r["mesh"] == m
                    and r["variant"] == var and r["layout"] == "shard_map") / 1024
               for m in meshes]
        ax_b.bar(pos, kib, width, label=var)
    for ax in (ax_t, ax_b):
        ax.set_xticks(np.arange(len(meshes)) + width * (len(variants) - 1) / 2, meshes)
        ax.set_xlabel("mesh (data x model)")
    ax_t.set_ylabel("forward ms (median)")
    ax_t.set_title(f"forward time on {result['device']}")
    ax_t.legend(fontsize=7)
    ax_b.set_ylabel("parameter KiB per device")
    ax_b.set_title("parameter bytes per device")
    ax_b.legend(fontsize=7)
    if result["fake_devices"]:
        fig.text(0.5, 0.005, "fake CPU devices sharing the host's cores: times prove nothing "
                 "about speed", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def mesh_shapes(n_devices: int, cfg: Config) -> tuple[tuple[int, int], ...]:
    """Every ``(data, model)`` with ``data * model == n_devices`` that the shapes allow.

    ``data`` must divide the batch, ``model`` every variant's N, and K and ``model``
    one another (kv heads split or replicated). Largest ``model`` first; for 8
    devices and the default config: ``MESHES``.
    """
    return tuple(
        (n_devices // m, m) for m in range(n_devices, 0, -1)
        if n_devices % m == 0 and cfg.batch % (n_devices // m) == 0
        and all(N % m == 0 and (K % m == 0 or m % K == 0) for _, N, K in cfg.variants))


def default_meshes(cfg: Config) -> tuple[tuple[int, int], ...]:
    """The meshes of the default devices, else of the CPU devices; more than one device first.

    Raises:
      ValueError: when no mesh of either device count fits the shapes.
    """
    counts = list(dict.fromkeys((jax.device_count(), len(jax.devices("cpu")))))
    for n in sorted(counts, key=lambda n: n < 2):  # stable: default devices first
        if meshes := mesh_shapes(n, cfg):
            return meshes
    raise ValueError(
        f"no data x model mesh of {' or '.join(map(str, counts))} devices fits batch "
        f"{cfg.batch} and heads (N, K) {[(N, K) for _, N, K in cfg.variants]}: data must "
        "divide the batch and model the heads; try --devices 8 or --meshes")


def pick_devices(meshes) -> list[jax.Device]:
    """The default devices if some mesh fits them, else the (fake) CPU devices.

    On a one-GPU machine the 8-device meshes fit only the CPU platform, which
    :func:`attention_jax.runtime.use_fake_cpu_devices` gave 8 devices.
    """
    devices = jax.devices()
    if any(m[0] * m[1] == len(devices) for m in meshes):
        return devices
    cpus = jax.devices("cpu")
    if any(m[0] * m[1] == len(cpus) for m in meshes):
        print(f"{len(devices)} {devices[0].platform} device(s) fit no mesh of {list(meshes)}; "
              f"using the {len(cpus)} CPU devices")
        return cpus
    raise ValueError(f"no mesh of {list(meshes)} fits {len(devices)} devices "
                     f"({len(cpus)} CPU devices)")


def run(cfg: Config = Config()) -> dict:
    """Runs every mesh x variant and the baselines; prints the table, writes JSON and a plot.

    Returns:
      ``{"config", "device", "fake_devices", "rows": [row dicts], "table", "files"}``;
      each row has ``err_fwd``, ``err_grad``, ``fwd_collectives``, ``bwd_collectives``,
      ``transfers_per_call``, ``q_kernel_bytes_per_device`` and the other columns.
    """
    devices = pick_devices(cfg.meshes)
    fake = devices[0].platform == "cpu"
    meshes = [tuple(m) for m in cfg.meshes if m[0] * m[1] == len(devices)]
    skipped = [tuple(m) for m in cfg.meshes if tuple(m) not in meshes]
    if skipped:
        print(f"skipping meshes {skipped}: they need data * model = {len(devices)} devices")
    shape = f"[B={cfg.batch}, T={cfg.seq_len}, D={cfg.embed}], H={cfg.head_dim}"
    print_text(f"jax {jax.__version__} on {len(devices)} x {devices[0].platform} "
               f"({devices[0].device_kind}); causal self-attention, inputs {shape}, {cfg.dtype}")
    rows = []
    with progress_bar(len(cfg.variants) * (len(meshes) + 1), "shard") as bar:
        for name, N, K in cfg.variants:
            reference = reference_for(cfg, N, K)
            for mesh_shape in meshes:
                bar.set_postfix_str(f"{name} {mesh_shape[0]}x{mesh_shape[1]}")
                rows.append(run_sharded(cfg, mesh_shape, name, N, K, reference, devices))
                bar.update(1)
            bar.set_postfix_str(f"{name} device_put loop")
            rows.append(run_baseline(cfg, name, N, K, reference, devices))
            bar.update(1)
    table = format_table(table_rows(rows))
    print_table(table_rows(rows), caption=(
        "err_*: max |difference| vs the same module on one device (grad: every parameter and "
        "the input); step = jit(grad of sum(y*ct)), i.e. forward + backward; host puts/call: "
        "device_put calls that move data in one forward."), key_columns=3)
    if fake:
        print_text(FAKE_NOTE)
    result = {"config": dataclasses.asdict(cfg), "device": devices[0].device_kind,
              "platform": devices[0].platform, "num_devices": len(devices),
              "jax": jax.__version__, "fake_devices": fake, "rows": rows, "table": table,
              "files": []}
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / "head_parallel.json"
        result["files"].append(str(json_path))
        if cfg.plot and plot(result, out / "head_parallel.png"):
            result["files"].append(str(out / "head_parallel.png"))
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print_text("wrote " + ", ".join(result["files"]))
    return result


def _mesh_arg(text: str) -> tuple[int, int]:
    try:
        data, model = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"mesh must look like 2x4 (data x model); got {text!r}") from None
    return data, model


def main(argv=None) -> dict:
    """``attention-jax shard``: parses ``argv`` (default ``sys.argv[1:]``) and runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="output folder (default: experiments/out in a source checkout, "
                             "else ./attention-jax-out)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    parser.add_argument("--meshes", type=_mesh_arg, nargs="+", default=None,
                        metavar="DATAxMODEL",
                        help="e.g. 1x8 2x4 (default: every mesh of the device count that fits)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameters, inputs and cotangents (default float32)")
    parser.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS],
                        default=None, help="which of MHA GQA MQA (default all)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    args = parser.parse_args(argv)
    kwargs = dict(QUICK) if args.quick else {}
    if args.variants:
        kwargs["variants"] = tuple(v for v in VARIANTS if v[0] in args.variants)
    if args.repeats is not None:
        kwargs["repeats"] = args.repeats
    out = str(default_out()) if args.out is None else args.out
    cfg = Config(out=out, dtype=args.dtype, plot=not args.no_plot, **kwargs)
    try:
        meshes = tuple(args.meshes) if args.meshes else default_meshes(cfg)
    except ValueError as err:
        parser.error(str(err))
    return run(dataclasses.replace(cfg, meshes=meshes))
