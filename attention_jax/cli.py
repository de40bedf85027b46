"""The ``attention-jax`` command line (also ``python -m attention_jax``).

Subcommands::

  attention-jax [demo] [--seq-len T] [--batch B] ...   the main job (the default)
  attention-jax bench  [--quick | --tiny] ...          attention_jax.benchmarks.attention
  attention-jax decode [--quick] ...                   attention_jax.benchmarks.decode
  attention-jax shard  [--quick] [--context] ...       attention_jax.benchmarks.head_parallel
  attention-jax variants ...                           experiments/variants_study.py
  attention-jax generate --model PATH [--check] ...    experiments/hf_generate.py

Every subcommand takes ``--devices N`` (fake CPU devices, requested before JAX
starts; on a machine with an accelerator its devices stay the default),
``--dtype {float32,bfloat16}`` and ``--out DIR``. ``bench``, ``decode``, ``shard``
and ``variants`` are thin fronts to a ``main(argv)``: the benchmark in the package
(so they work from an installed wheel), else the script in the ``experiments/``
folder of a source checkout; they get the common options and every option the
front does not know. Without ``--out`` they write to a scratch folder
(:func:`default_out`), never to the committed ``experiments/results``.

This module runs the subcommands (:func:`main`) and holds the terminal output
they share: the console, rich tables (:func:`print_table`) and one progress bar
(:func:`progress_bar`). The subcommand table (:data:`EXPERIMENTS`) and the parser
are in :mod:`attention_jax.cli_commands`, cell formatting and table layout in
:mod:`attention_jax.cli_tables`; every name of both is importable from here. No
JAX is imported at module level, so the device flag can still be set after
importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import attention_jax
from attention_jax.cli_commands import (
    DEMO_DESCRIPTION,
    DEMO_SUMMARY,
    DTYPES,
    EXPERIMENTS,
    OUT_ELSEWHERE,
    PROG,
    Experiment,
    _with_default_command,
    build_parser,
)
from attention_jax.cli_tables import (
    AXIS_ORDER,
    COLLECTIVE_ORDER,
    SMALL,
    format_collectives,
    format_column,
    format_value,
    rich_table,
    rich_tables,
)

# Every public name of the command line, wherever it is defined (as before the split).
__all__ = [
    "AXIS_ORDER", "COLLECTIVE_ORDER", "DEMO_DESCRIPTION", "DEMO_SUMMARY", "DTYPES",
    "EXPERIMENTS", "EXPERIMENTS_DIR", "LOG_WIDTH", "OUT_ELSEWHERE", "OUT_IN_CHECKOUT", "PROG",
    "SMALL", "CliError", "Experiment", "ProgressBar", "build_parser", "console",
    "default_out", "format_collectives", "format_column", "format_value", "forwarded_argv",
    "load_experiment", "main", "print_table", "print_text", "progress_bar", "rich_table",
    "rich_tables", "run_demo", "run_experiment",
]

# The experiments live next to the package in a source checkout, not in the wheel.
EXPERIMENTS_DIR = Path(attention_jax.__file__).resolve().parent.parent / "experiments"
# Width of tables written to a file or pipe (rich would wrap them at 80 columns).
LOG_WIDTH = 200
# Where runs write without --out: ignored by git in a source checkout, so a quick run
# never overwrites the committed experiments/results/ (only an explicit --out does).
OUT_IN_CHECKOUT = EXPERIMENTS_DIR / "out"


def default_out() -> Path:
    """``experiments/out`` of the source checkout, else ``./attention-jax-out``.

    Both are scratch folders: committed results are written only by an explicit
    ``--out experiments/results``.
    """
    if EXPERIMENTS_DIR.is_dir() and (EXPERIMENTS_DIR.parent / "pyproject.toml").is_file():
        return OUT_IN_CHECKOUT
    return Path.cwd() / OUT_ELSEWHERE



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



def print_table(rows: Sequence[dict], *, title: str | None = None,
                caption: str | None = None, key_columns: int = 1) -> None:
    """Prints :func:`rich_tables` on stdout, split to fit the terminal's width.

    Written to a file or pipe, the tables are ``LOG_WIDTH`` wide at most and
    their lines carry no trailing spaces.
    """
    out = console()
    tables = rich_tables(rows, title=title, caption=caption, width=out.width,
                         key_columns=key_columns)
    note = None
    if caption and len(tables) > 1:  # stacked: the caption under them, at the full width
        tables = rich_tables(rows, title=title, caption=None, width=out.width,
                             key_columns=key_columns)
        note = caption

    def emit():
        for table in tables:
            out.print(table)
        if note:
            out.print(note, markup=False, highlight=False)

    if out.is_terminal:
        emit()
        return
    with out.capture() as captured:
        emit()
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
