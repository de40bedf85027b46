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

from attention_jax.benchmarks.decode import (  # noqa: F401 (the script's old names)
    HBM_GBS,
    QUICK_LENGTHS,
    QUICK_REPEATS,
    filled_cache,
    jax_step_time,
    main,
    plot,
    print_tables,
    run,
    summarize,
    time_fn,
    torch_step,
    variants,
)

if __name__ == "__main__":
    main()
