"""Attention benchmarks: attention_jax backends against PyTorch, jax.nn and Flax NNX.

A thin script: the code is :mod:`attention_jax.benchmarks.attention` (also
``attention-jax bench``). Runs on one device.

    python experiments/bench_attention.py [--quick | --tiny] [--sections core memory]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention_jax.benchmarks.attention import *  # noqa: F403
from attention_jax.benchmarks.attention import main

if __name__ == "__main__":
    main()
