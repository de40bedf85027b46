"""The ``attention-jax`` command line (also ``python -m attention_jax``).

Subcommands::

  attention-jax [demo] [--seq-len T] [--batch B] ...   the main job (the default)
  attention-jax bench  [--quick | --tiny] ...          experiments/bench_attention.py
  attention-jax decode [--quick] ...                   experiments/decode_bench.py
  attention-jax shard  [--quick] ...                   experiments/head_parallel.py

Every subcommand takes ``--devices N`` (fake CPU devices, requested before JAX
starts; on a machine with an accelerator its devices stay the default),
``--dtype {float32,bfloat16}`` and ``--out DIR``. ``bench``, ``decode`` and
``shard`` are thin fronts: they load the script from the ``experiments/`` folder
of the source checkout (it is not part of the installed package) and call its
``main(argv)`` with the common options and every option they do not know.

The module also holds the terminal output the subcommands share: rich tables
(:func:`print_table`) and one progress bar (:func:`progress_bar`). It imports no
JAX at module level, so the device flag can still be set after importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import attention_jax

PROG = "attention-jax"
DTYPES = ("float32", "bfloat16")
# The experiments live next to the package in a source checkout, not in the wheel.
EXPERIMENTS_DIR = Path(attention_jax.__file__).resolve().parent.parent / "experiments"
# Width of tables written to a file or pipe (rich would wrap them at 80 columns).
LOG_WIDTH = 200


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A subcommand that runs a script of ``experiments/``.

    Attributes:
      script: file name in ``experiments/``.
      devices: default ``--devices``.
      dtype_default: what the script does without ``--dtype``.
      out_default: where the script writes without ``--out``.
      summary: one line for ``attention-jax --help``.
      description: a few sentences for ``attention-jax <name> --help``.
    """

    script: str
    devices: int
    dtype_default: str
    out_default: str
    summary: str
    description: str


EXPERIMENTS = {
    "bench": Experiment(
        script="bench_attention.py", devices=1, dtype_default="float32",
        out_default="experiments/results",
        summary="time attention backends against PyTorch, jax.nn and Flax NNX",
        description=(
            "Times the attention core (xla, blockwise, auto, jax.nn, torch SDPA) and whole "
            "layers (attention_jax, flax.nnx, torch) forward and forward+backward, sweeps T, "
            "and reads XLA's temporary memory. Needs torch. Writes bench_attention_<backend>"
            ".json and plots. --quick: fewer repetitions, T <= 2048; --tiny: toy shapes "
            "(seconds, for smoke tests)."),
    ),
    "decode": Experiment(
        script="decode_bench.py", devices=1,
        dtype_default="bfloat16 on GPU, float32 on CPU", out_default="experiments/results",
        summary="time one KV-cache decode step of MHA / GQA / MQA vs cache length",
        description=(
            "Times one jit-compiled decode step (cache donated) of MHA, GQA and MQA, float and "
            "int8 caches, for cache lengths S, against the same step in PyTorch; on a GPU also "
            "against the KV-bytes / HBM-bandwidth floor. Writes decode_bench_<backend>.json, "
            ".md and .png. --quick: S in {256, 1024}."),
    ),
    "shard": Experiment(
        script="head_parallel.py", devices=8, dtype_default="float32",
        out_default="experiments/out",
        summary="head parallelism on device meshes vs a per-head device_put loop",
        description=(
            "Splits MHA, GQA and MQA over every (data x model) mesh of the devices with "
            "sharding.head_parallel, checks forward and gradients against one device and "
            "counts collectives, host transfers and parameter bytes per device. Writes "
            "head_parallel.json and .png. With fake CPU devices only errors and counts mean "
            "something, not times. --quick: tiny shapes."),
    ),
}

DEMO_SUMMARY = "MHA, GQA and MQA side by side (the main job; the default subcommand)"
DEMO_DESCRIPTION = (
    "Builds MHA, GQA and MQA of one width, checks each forward against PyTorch (when "
    "installed), runs it head-parallel on all devices and prints one row per variant: "
    "parameters, KV-cache bytes per token, errors, collectives, and forward, "
    "forward+backward and single-token decode-step times (median). --out DIR also writes "
    "DIR/demo.json.")


class CliError(Exception):
    """A usage problem found after parsing (reported as ``attention-jax: error: ...``)."""


# ---------------------------------------------------------------------------
# Terminal output shared by the subcommands
# ---------------------------------------------------------------------------


def console() -> Console:
    """A rich console on stdout; plain text, ``LOG_WIDTH`` wide, when it is not a terminal.

    A file or pipe has no width: ``COLUMNS`` (which some launchers set to 80)
    is ignored there, so tables are never cut to fit it.
    """
    out = Console()
    if out.is_terminal:
        return out
    return Console(width=LOG_WIDTH)


def format_value(value: object) -> str:
    """A table cell: ``None`` -> ``n/a``, small floats in e-notation, others with 2 decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def rich_table(rows: Sequence[dict], *, title: str | None = None,
               caption: str | None = None) -> Table:
    """Rows of dicts (the first row's keys are the columns) as a rich table."""
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left",
                  caption_justify="left")
    columns = list(rows[0]) if rows else []
    for col in columns:
        numeric = all(isinstance(r.get(col), int | float) or r.get(col) is None for r in rows)
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)
    for row in rows:
        table.add_row(*(format_value(row.get(col)) for col in columns))
    return table


def print_table(rows: Sequence[dict], *, title: str | None = None,
                caption: str | None = None) -> None:
    """Prints :func:`rich_table` on stdout."""
    console().print(rich_table(rows, title=title, caption=caption))


class ProgressBar:
    """A rich progress bar with the two calls the experiments use (tqdm's names)."""

    def __init__(self, progress: Progress, task):
        self._progress = progress
        self._task = task

    def update(self, n: int = 1) -> None:
        """Advances the bar by ``n`` steps."""
        self._progress.update(self._task, advance=n)

    def set_postfix_str(self, text: str) -> None:
        """Shows ``text`` (e.g. the running section) after the bar."""
        self._progress.update(self._task, postfix=text)


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator[ProgressBar]:
    """A progress bar of ``total`` steps on stdout (one final line when not a terminal)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        TextColumn("{task.fields[postfix]}"), console=console(),
    )
    with progress:
        yield ProgressBar(progress, progress.add_task(description, total=total, postfix=""))


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (device counts, shapes, repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser, *, devices: int, dtype_default: str,
                out_help: str) -> None:
    common = parser.add_argument_group("common options (every subcommand)")
    if not parser.add_help:
        common.add_argument("-h", "--help", action="store_true",
                            help="show this help and the experiment's own options, then exit")
    common.add_argument(
        "--devices", type=_positive_int, default=devices, metavar="N",
        help=f"fake CPU devices to expose when there is no accelerator (default {devices}); "
             "an accelerator's devices stay the default. Ignored when XLA_FLAGS already sets "
             "a count.")
    common.add_argument("--dtype", choices=DTYPES, default=None,
                        help=f"parameter and activation dtype (default: {dtype_default})")
    common.add_argument("--out", type=Path, default=None, metavar="DIR", help=out_help)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``attention-jax``: one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Multi-head, grouped-query and multi-query attention for JAX / Flax NNX: "
                    "the main job and the experiments.",
        epilog=f"Without a subcommand, runs demo (so `{PROG} --seq-len 64` is `{PROG} demo "
               f"--seq-len 64`). `{PROG} SUBCOMMAND --help` lists its options; bench, decode "
               "and shard forward the options they do not know to their script in "
               "experiments/ (a source checkout).",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {attention_jax.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    demo = sub.add_parser("demo", help=DEMO_SUMMARY, description=DEMO_DESCRIPTION,
                          allow_abbrev=False)
    demo.set_defaults(subparser=demo)
    _add_common(demo, devices=8, dtype_default="float32",
                out_help="also write DIR/demo.json (config, devices and the table's rows)")
    demo.add_argument("--seq-len", type=_positive_int, default=256, metavar="T",
                      help="sequence length T (default 256)")
    demo.add_argument("--batch", type=_positive_int, default=4, metavar="B",
                      help="batch size B (default 4)")
    demo.add_argument("--repeats", type=_positive_int, default=5,
                      help="timed calls per median (default 5)")
    for name, exp in EXPERIMENTS.items():
        p = sub.add_parser(
            name, help=exp.summary, add_help=False, allow_abbrev=False,
            description=f"{exp.description} Runs experiments/{exp.script}.",
            epilog=f"Any other option goes to experiments/{exp.script} (its options are listed "
                   "below when it is found).",
        )
        p.set_defaults(subparser=p)
        _add_common(p, devices=exp.devices, dtype_default=exp.dtype_default,
                    out_help=f"folder for the JSON and plots (default {exp.out_default})")
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    """``demo`` prepended when no subcommand is named (no arguments, or options only)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["demo", *argv]
    return argv


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _request_devices(count: int) -> None:
    """Fake CPU devices before JAX starts; a note when ``XLA_FLAGS`` already chose a count."""
    from attention_jax import runtime

    flags = os.environ.get("XLA_FLAGS", "")
    if runtime._FLAG in flags and f"{runtime._FLAG}={count}" not in flags:
        print(f"{PROG}: note: XLA_FLAGS already sets the CPU device count ({flags!r}); "
              f"--devices {count} is ignored", file=sys.stderr)
    runtime.use_fake_cpu_devices(count)


def load_experiment(name: str) -> ModuleType:
    """The script of subcommand ``name`` loaded from ``EXPERIMENTS_DIR`` as a module.

    Raises:
      CliError: when the script is not there (an installed package has no experiments).
    """
    path = EXPERIMENTS_DIR / EXPERIMENTS[name].script
    if not path.is_file():
        raise CliError(
            f"'{name}' runs experiments/{EXPERIMENTS[name].script}, which is not at {path}. "
            "The experiments are not part of the installed package: they need a source "
            "checkout (git clone the repository, then pip install -e . inside it).")
    module_name = f"attention_jax_experiments.{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def forwarded_argv(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The experiment's argv: the options it did not parse, then ``--dtype`` / ``--out``."""
    argv = list(extra)
    if args.dtype is not None:
        argv += ["--dtype", args.dtype]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv


def run_experiment(name: str, argv: list[str]) -> int:
    """Calls the experiment's ``main(argv)`` with ``sys.argv`` showing the subcommand."""
    module = load_experiment(name)
    saved = sys.argv
    sys.argv = [f"{PROG} {name}", *argv]  # its usage line and recorded command
    try:
        result = module.main(argv)
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else 0


def run_demo(args: argparse.Namespace) -> int:
    from attention_jax import demo

    cfg = demo.DemoConfig(batch=args.batch, seq_len=args.seq_len, repeats=args.repeats,
                          dtype=args.dtype or "float32")
    demo.run(cfg, out=args.out)
    return 0


def _help_experiment(parser: argparse.ArgumentParser, name: str) -> int:
    """The subcommand's help, then the script's own (which starts JAX: after the devices)."""
    parser.print_help()
    print(f"\noptions of experiments/{EXPERIMENTS[name].script} (forwarded):\n", flush=True)
    try:
        run_experiment(name, ["--help"])
    except CliError as err:
        print(f"(not available: {err})")
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the subcommand, returns the exit code."""
    parser = build_parser()
    argv = _with_default_command(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    sub = args.subparser
    if args.command == "demo" and extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    _request_devices(args.devices)
    if args.command == "demo":
        return run_demo(args)
    if args.help:
        return _help_experiment(sub, args.command)
    try:
        return run_experiment(args.command, forwarded_argv(args, extra))
    except CliError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
