"""Decode-step benchmark: a thin front to :mod:`attention_jax.benchmarks.decode`.

The measuring code lives in the package (``attention-jax decode`` runs it from an
installed wheel too); this script keeps the old entry point and names::

    python experiments/decode_bench.py [--quick] [--lengths 1024 8192 32768] [--out DIR]

Without ``--out`` it writes to the scratch folder ``experiments/out``; the committed
``experiments/results`` change only with ``--out experiments/results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

from attention_jax.benchmarks.attention import interleaved
from attention_jax.benchmarks.decode import (  # noqa: F401 (the script's old names)
    HBM_GBS,
    QUICK_LENGTHS,
    QUICK_REPEATS,
    batched,
    filled_cache,
    jax_step,
    main,
    plot,
    print_tables,
    run,
    summarize,
    torch_step_fns,
    torch_sync,
    variants,
)


def time_fn(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (which must block) after one warm-up call."""
    return interleaved({"fn": fn}, repeats)["fn"]["median_ms"] / 1e3


def jax_step_time(module, cache, x, repeats: int):
    """``(median seconds, output)`` of one jitted step (cache donated); output float32 NumPy."""
    step, last = jax_step(module, cache, x)
    return time_fn(batched(step, jax.block_until_ready, 1), repeats), last()


def torch_step(module, cache, x, repeats: int, torch_dtype, device):
    """``(median seconds, output)`` of the torch step (in the dtype of ``x``)."""
    step, last = torch_step_fns(module, cache, x, device)
    return time_fn(batched(step, torch_sync(device), 1), repeats), last()


if __name__ == "__main__":
    main()
