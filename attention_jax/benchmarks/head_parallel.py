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
(default: the scratch folder :func:`attention_jax.cli.default_out`). With
``--context`` it runs the context-parallel benchmark instead
(:func:`attention_jax.benchmarks.context.main` with the other arguments: per-device
memory and collectives against T for context in {1, 2, 4, 8}, ring vs all-gather,
contiguous vs zigzag; ``context.json``, ``context.md`` and ``context.png``).

    attention-jax shard [--quick] [--devices 8] [--dtype bfloat16] [--out DIR]
    attention-jax shard --context [--quick] [--lengths 1024 4096] [--out DIR]
    python experiments/head_parallel.py [--quick] [--meshes 2x4 1x8] [--variants MQA]

This module chooses the meshes and devices and runs everything (:func:`run`,
:func:`main`); the configuration and the measuring of each row (sharded,
baseline, reference) are in :mod:`attention_jax.benchmarks.head_parallel_measure`,
the table and plot in :mod:`attention_jax.benchmarks.head_parallel_report`.
Their names are importable from here as before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

from attention_jax.benchmarks.head_parallel_measure import (  # noqa: F401 (names of this module)
    MESHES,
    QUICK,
    VARIANTS,
    Config,
    TransferCounter,
    _one_head,
    _project_out,
    baseline_forward,
    build,
    by_name,
    compile_timed,
    expected_baseline_transfers,
    max_err,
    median_seconds,
    programs,
    reference_for,
    run_baseline,
    run_sharded,
)
from attention_jax.benchmarks.head_parallel_report import plot, table_rows
from attention_jax.cli import default_out, print_table, print_text, progress_bar
from attention_jax.demo import format_table

FAKE_NOTE = ("note: fake CPU devices share this host's cores; the times above prove nothing "
             "about speed, only the errors, collectives, transfers and bytes mean something.")


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


def run(cfg: Config = Config()) -> dict:  # noqa: B008 (Config is a frozen dataclass)
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
    """``attention-jax shard``: parses ``argv`` (default ``sys.argv[1:]``) and runs.

    ``--context`` anywhere in ``argv`` hands the other arguments to
    :func:`attention_jax.benchmarks.context.main` (the context-parallel benchmark).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--context" in argv:
        from attention_jax.benchmarks import context

        return context.main([a for a in argv if a != "--context"])
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
    parser.add_argument("--context", action="store_true",
                        help="run the context-parallel benchmark instead "
                             "(attention_jax.benchmarks.context; its options follow)")
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
