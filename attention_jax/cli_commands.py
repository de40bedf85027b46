"""The subcommands of ``attention-jax`` and its parser.

:data:`EXPERIMENTS` holds one :class:`Experiment` per subcommand that fronts a
benchmark, study or example (``bench``, ``decode``, ``shard``, ``variants``,
``generate``): a new one is a new entry there, and :func:`build_parser` gives it a
subparser with the common options. ``demo`` (the main job, the default) has its own options here.
Running them (devices, loading the benchmark, ``main``) and the terminal output
are in :mod:`attention_jax.cli`, which re-exports every name here. No JAX is
imported.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import attention_jax

PROG = "attention-jax"
DTYPES = ("float32", "bfloat16")
OUT_ELSEWHERE = "attention-jax-out"  # the default --out outside a source checkout


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
            "Times one jit-compiled decode step (cache donated) of MHA, GQA and MQA with "
            "float32 / bf16 / int8 caches, interleaved with the same step in PyTorch (same "
            "threads) and a reduction over the same bytes (the floor): ms, GB/s and % of floor "
            "per row, and a long cache holding few tokens against a tight one. Writes "
            "decode_bench_<backend>.json, .md and .png. --quick: S in {256, 1024}; "
            "--sections layout."),
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
    "generate": Experiment(
        module=None, script="hf_generate.py", devices=1, dtype_default="float32",
        summary="greedy generation of a transformers causal LM through our attention",
        description=(
            "Runs the example decoder of experiments/hf_generate.py (a source checkout): "
            "--model PATH (a local checkpoint folder, nothing downloaded) or tiny:<family> "
            "(random weights), --prompt TEXT or --ids 1,2,3 (repeatable: a left-padded "
            "batch), --max-new-tokens N; --check compares the tokens with transformers' "
            "generate(do_sample=False) and exits 1 when they differ. Prints a JSON report "
            "and writes it to DIR/hf_generate.json."),
    ),
}

DEMO_SUMMARY = "MHA, GQA and MQA side by side (the main job; the default subcommand)"
DEMO_DESCRIPTION = (
    "Builds MHA, GQA and MQA of one width, checks each forward against PyTorch (when "
    "installed), runs it head-parallel on all devices and prints one row per variant: "
    "parameters, KV-cache bytes per token, errors, collectives, and forward, "
    "forward+backward and single-token decode-step times (median). --out DIR also writes "
    "DIR/demo.json.")


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
