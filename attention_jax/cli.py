"""The ``attention-jax`` command line (also ``python -m attention_jax``).

Subcommands::

  attention-jax [demo] [--seq-len T] [--batch B] ...   the main job (the default)
  attention-jax bench  [--quick | --tiny] ...          attention_jax.benchmarks.attention
  attention-jax decode [--quick] ...                   attention_jax.benchmarks.decode
  attention-jax shard  [--quick] ...                   attention_jax.benchmarks.head_parallel
  attention-jax variants ...                           experiments/variants_study.py

Every subcommand takes ``--devices N`` (fake CPU devices, requested before JAX
starts; on a machine with an accelerator its devices stay the default),
``--dtype {float32,bfloat16}`` and ``--out DIR``. ``bench``, ``decode``, ``shard``
and ``variants`` are thin fronts to a ``main(argv)``: the benchmark in the package
(so they work from an installed wheel), else the script in the ``experiments/``
folder of a source checkout; they get the common options and every option the
front does not know. Without ``--out`` they write to a scratch folder
(:func:`default_out`), never to the committed ``experiments/results``.

The module also holds the terminal output the subcommands share: rich tables
(:func:`print_table`) and one progress bar (:func:`progress_bar`). It imports no
JAX at module level, so the device flag can still be set after importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
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
# Where runs write without --out: ignored by git in a source checkout, so a quick run
# never overwrites the committed experiments/results/ (only an explicit --out does).
OUT_IN_CHECKOUT = EXPERIMENTS_DIR / "out"
OUT_ELSEWHERE = "attention-jax-out"


def default_out() -> Path:
    """``experiments/out`` of the source checkout, else ``./attention-jax-out``.

    Both are scratch folders: committed results are written only by an explicit
    ``--out experiments/results``.
    """
    if EXPERIMENTS_DIR.is_dir() and (EXPERIMENTS_DIR.parent / "pyproject.toml").is_file():
        return OUT_IN_CHECKOUT
    return Path.cwd() / OUT_ELSEWHERE


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A subcommand that runs the ``main(argv)`` of a benchmark or experiment.

    Attributes:
      module: the module in the package that has it (``attention_jax.benchmarks...``),
        or None for a study that only a source checkout has.
      script: file name in ``experiments/``, the fallback when ``module`` is not
        installed (or the only place, when ``module`` is None).
      devices: default ``--devices``.
      dtype_default: what it does without ``--dtype``.
      summary: one line for ``attention-jax --help``.
      description: a few sentences for ``attention-jax <name> --help``.
    """

    module: str | None
    script: str | None
    devices: int
    dtype_default: str
    summary: str
    description: str

    @property
    def where(self) -> str:
        """Where its code lives, for help texts."""
        return self.module or f"experiments/{self.script}"


EXPERIMENTS = {
    "bench": Experiment(
        module="attention_jax.benchmarks.attention", script="bench_attention.py", devices=1,
        dtype_default="float32",
        summary="time attention backends against PyTorch, jax.nn and Flax NNX",
        description=(
            "Times the attention core (xla, blockwise, auto, jax.nn, torch SDPA) and whole "
            "layers (attention_jax, flax.nnx, torch) forward and forward+backward, sweeps T, "
            "and reads XLA's temporary memory. Needs torch. Writes bench_attention_<backend>"
            ".json and plots. --quick: fewer repetitions, T <= 2048; --tiny: toy shapes "
            "(seconds, for smoke tests)."),
    ),
    "decode": Experiment(
        module="attention_jax.benchmarks.decode", script="decode_bench.py", devices=1,
        dtype_default="bfloat16 on GPU, float32 on CPU",
        summary="time one KV-cache decode step of MHA / GQA / MQA vs cache length",
        description=(
            "Times one jit-compiled decode step (cache donated) of MHA, GQA and MQA, float and "
            "int8 caches, for cache lengths S, against the same step in PyTorch; on a GPU also "
            "against the KV-bytes / HBM-bandwidth floor. Writes decode_bench_<backend>.json, "
            ".md and .png. --quick: S in {256, 1024}."),
    ),
    "shard": Experiment(
        module="attention_jax.benchmarks.head_parallel", script="head_parallel.py", devices=8,
        dtype_default="float32",
        summary="head parallelism on device meshes vs a per-head device_put loop",
        description=(
            "Splits MHA, GQA and MQA over every (data x model) mesh of the devices with "
            "sharding.head_parallel, checks forward and gradients against one device and "
            "counts collectives, host transfers and parameter bytes per device. Writes "
            "head_parallel.json and .png. With fake CPU devices only errors and counts mean "
            "something, not times. --quick: tiny shapes."),
    ),
    "variants": Experiment(
        module=None, script="variants_study.py", devices=1, dtype_default="float32",
        summary="what each cheaper attention variant buys, side by side (a source checkout)",
        description=(
            "Runs the study of attention variants in experiments/variants_study.py (study "
            "code, not part of the installed package: it needs a source checkout)."),
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


# Collectives in a fixed order: by op, then by the mesh axes they span.
COLLECTIVE_ORDER = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all",
                    "collective-permute")
AXIS_ORDER = ("model", "data")


def _collective_key(name: str) -> tuple:
    op, _, axes = name.partition("@")
    op_rank = COLLECTIVE_ORDER.index(op) if op in COLLECTIVE_ORDER else len(COLLECTIVE_ORDER)
    axis_ranks = tuple(AXIS_ORDER.index(a) if a in AXIS_ORDER else len(AXIS_ORDER)
                       for a in axes.split(","))
    return op_rank, op, len(axis_ranks), axis_ranks, axes


def format_collectives(summary: Mapping[str, int]) -> str:
    """Collective counts as one cell, in a fixed order; ``"none"`` when there are none.

    Every subcommand writes collectives this way (``op@axes:count``, comma separated,
    ordered by op as in ``COLLECTIVE_ORDER``, then by axes, ``model`` before ``data``).

    >>> format_collectives({"all-reduce@data": 1, "all-gather@model": 2,
    ...                     "all-reduce@model": 1})
    'all-reduce@model:1, all-reduce@data:1, all-gather@model:2'
    >>> format_collectives({})
    'none'
    """
    return ", ".join(f"{k}:{summary[k]}" for k in sorted(summary, key=_collective_key)) or "none"


def format_value(value: object) -> str:
    """One cell on its own: ``None`` -> ``n/a``, floats as :func:`format_column` would.

    >>> [format_value(v) for v in (None, 3, 0.5, 123.456, 6.48e-07)]
    ['n/a', '3', '0.50', '123', '6.48e-07']
    """
    return format_column([value])[0]


SMALL = 1e-3  # a column holding a nonzero |value| below this is written in e-notation


def format_column(values: Sequence[object]) -> list[str]:
    """The cells of one column, floats in one format so that they line up and compare.

    ``None`` -> ``n/a``; other non-floats -> ``str``. Floats: when some nonzero
    one is below ``SMALL`` in magnitude (errors), all in e-notation with 3
    significant digits; otherwise all with the same number of decimals, enough
    for 2 significant digits of the smallest nonzero magnitude (0 to 3 decimals).

    >>> format_column([0.07, 0.00648, 1.5])
    ['0.070', '0.006', '1.500']
    >>> format_column([120.3, 3.42, None])
    ['120.3', '3.4', 'n/a']
    >>> format_column([0.0, 1.19e-07, 0.03])
    ['0.00e+00', '1.19e-07', '3.00e-02']
    >>> format_column([2048.0, 512.0])
    ['2048', '512']
    """
    floats = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    nonzero = [v for v in floats if v > 0]
    scientific = any(v < SMALL for v in nonzero)
    if nonzero and not scientific:
        decimals = min(3, max(0, 1 - math.floor(math.log10(min(nonzero)))))
    else:
        decimals = 2
    cells = []
    for v in values:
        if v is None:
            cells.append("n/a")
        elif isinstance(v, float):
            cells.append(f"{v:.2e}" if scientific else f"{v:.{decimals}f}")
        else:
            cells.append(str(v))
    return cells


def _is_numeric(values: Sequence[object]) -> bool:
    return all((isinstance(v, int | float) and not isinstance(v, bool)) or v is None
               for v in values)


def _table(rows: Sequence[dict], columns: Sequence[str], cells: dict[str, list[str]],
           numeric: dict[str, bool], *, title: str | None, caption: str | None) -> Table:
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left",
                  caption_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if numeric[col] else "left",
                         no_wrap=numeric[col], overflow="fold")
    for i in range(len(rows)):
        table.add_row(*(cells[col][i] for col in columns))
    return table


def rich_tables(rows: Sequence[dict], *, title: str | None = None, caption: str | None = None,
                width: int | None = None, key_columns: int = 1) -> list[Table]:
    """Rows of dicts (the first row's keys are the columns) as tables no wider than ``width``.

    No column is ever dropped or cut: when the whole table is wider than
    ``width``, the columns are split into stacked tables, each repeating the first
    ``key_columns`` columns (what names a row, e.g. the variant) so every row stays
    readable; the title goes on the first table, the caption under the last. One
    table when ``width`` is None or the table fits.
    """
    columns = list(rows[0]) if rows else []
    cells = {col: format_column([r.get(col) for r in rows]) for col in columns}
    numeric = {col: _is_numeric([r.get(col) for r in rows]) for col in columns}
    whole = _table(rows, columns, cells, numeric, title=title, caption=caption)
    if width is None or not columns:
        return [whole]
    measuring = Console(width=10_000)

    def table_width(cols) -> int:
        return measuring.measure(_table(rows, cols, cells, numeric, title=None,
                                        caption=None)).maximum

    if table_width(columns) <= width:
        return [whole]
    keys = columns[:key_columns]
    groups: list[list[str]] = [list(keys)]
    for col in columns[key_columns:]:
        if len(groups[-1]) > len(keys) and table_width([*groups[-1], col]) > width:
            groups.append(list(keys))
        groups[-1].append(col)
    return [_table(rows, group, cells, numeric, title=title if i == 0 else None,
                   caption=caption if i == len(groups) - 1 else None)
            for i, group in enumerate(groups)]


def rich_table(rows: Sequence[dict], *, title: str | None = None,
               caption: str | None = None) -> Table:
    """Rows of dicts (the first row's keys are the columns) as one rich table."""
    return rich_tables(rows, title=title, caption=caption)[0]


def print_table(rows: Sequence[dict], *, title: str | None = None,
                caption: str | None = None, key_columns: int = 1) -> None:
    """Prints :func:`rich_tables` on stdout, split to fit the terminal's width.

    Written to a file or pipe, the tables are ``LOG_WIDTH`` wide at most and
    their lines carry no trailing spaces.
    """
    out = console()
    tables = rich_tables(rows, title=title, caption=caption, width=out.width,
                         key_columns=key_columns)
    if out.is_terminal:
        for table in tables:
            out.print(table)
        return
    with out.capture() as captured:
        for table in tables:
            out.print(table)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_text(text: str) -> None:
    """Prints ``text`` on stdout, wrapped at the terminal's width (as is in a pipe)."""
    out = console()
    if out.is_terminal:
        out.print(text, markup=False, highlight=False, soft_wrap=False)
    else:
        print(text, flush=True)


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
        # the running section's name next to the description: no empty last column, so
        # a piped final line ends without spaces
        TextColumn("[bold]{task.description}[/] {task.fields[postfix]}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console(),
    )
    with progress:
        task = progress.add_task(description, total=total, postfix="")
        try:
            yield ProgressBar(progress, task)
        finally:
            progress.update(task, postfix="")  # the last section's name is no longer news


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
               f"--seq-len 64`). `{PROG} SUBCOMMAND --help` lists its options; the other "
               "subcommands forward the options they do not know to their benchmark "
               "(attention_jax.benchmarks; variants: experiments/, a source checkout).",
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
            description=f"{exp.description} Runs {exp.where}.",
            epilog=f"Any other option goes to {exp.where} (its options are listed below when "
                   "it is found).",
        )
        p.set_defaults(subparser=p)
        _add_common(p, devices=exp.devices, dtype_default=exp.dtype_default,
                    out_help="folder for the JSON and plots (default: experiments/out in a "
                             f"source checkout, else ./{OUT_ELSEWHERE}; both scratch: the "
                             "committed experiments/results change only with an explicit "
                             "--out)")
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


def _load_script(path: Path) -> ModuleType:
    """``path`` imported as module ``attention_jax_experiments.<stem>`` (once)."""
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


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def load_experiment(name: str) -> ModuleType:
    """The code of subcommand ``name``: its package module, else its ``experiments/`` script.

    Raises:
      CliError: when neither is there (an installed package has no ``experiments/``).
    """
    exp = EXPERIMENTS[name]
    if exp.module is not None and _module_exists(exp.module):
        return importlib.import_module(exp.module)
    path = EXPERIMENTS_DIR / exp.script
    if not path.is_file():
        raise CliError(
            f"'{name}' runs experiments/{exp.script}, which is not at {path}. "
            "The experiments/ scripts are not part of the installed package: they need a "
            "source checkout (git clone the repository, then pip install -e . inside it).")
    return _load_script(path)


def forwarded_argv(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The experiment's argv: the options it did not parse, then ``--dtype`` / ``--out``.

    ``--out`` is always passed (:func:`default_out` without one), so no benchmark
    writes into the committed results by default.
    """
    argv = list(extra)
    if args.dtype is not None:
        argv += ["--dtype", args.dtype]
    argv += ["--out", str(default_out() if args.out is None else args.out)]
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
    """The main job; a configuration the devices cannot run is a usage error (exit 2)."""
    import jax

    from attention_jax import demo

    cfg = demo.DemoConfig(batch=args.batch, seq_len=args.seq_len, repeats=args.repeats,
                          dtype=args.dtype or "float32")
    try:
        demo.check_config(cfg, len(jax.devices()))
    except ValueError as err:
        args.subparser.error(str(err))
    demo.run(cfg, out=args.out)
    return 0


def _help_experiment(parser: argparse.ArgumentParser, name: str) -> int:
    """The subcommand's help, then the benchmark's own (which starts JAX: after the devices)."""
    parser.print_help()
    print(f"\noptions of {EXPERIMENTS[name].where} (forwarded):\n", flush=True)
    try:
        run_experiment(name, ["--help"])
    except CliError as err:
        print(f"(not available: {err})")
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the subcommand, returns the exit code.

    Usage errors (bad options, a configuration the devices cannot run) print the
    usage and a message naming the numbers, and exit with status 2.
    """
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
        sub.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
