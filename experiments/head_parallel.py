"""Head parallelism on a device mesh vs the seed's per-head ``device_put`` loop.

A thin script: the code is :mod:`attention_jax.benchmarks.head_parallel` (also
``attention-jax shard``); its names are re-exported here for the notebooks.
Asks for 8 fake CPU devices before JAX starts (no effect on accelerators).

    python experiments/head_parallel.py [--quick] [--meshes 2x4 1x8] [--variants MQA]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention_jax import runtime  # does not start JAX's backend

runtime.use_fake_cpu_devices(8)  # only the CPU platform; before anything touches devices

from attention_jax.benchmarks.head_parallel import *  # noqa: E402, F403
from attention_jax.benchmarks.head_parallel import main  # noqa: E402

if __name__ == "__main__":
    main()
