"""Benchmarks and experiments that ship with the package (``attention-jax bench | shard``).

* :mod:`attention_jax.benchmarks.attention`: attention backends and layers against
  PyTorch, ``jax.nn`` and Flax NNX (``attention-jax bench``);
* :mod:`attention_jax.benchmarks.head_parallel`: head parallelism on device meshes
  against a per-head ``device_put`` loop (``attention-jax shard``);
* ``attention_jax.benchmarks.decode`` when present: one KV-cache decode step
  (``attention-jax decode``; until then the command runs ``experiments/decode_bench.py``).

Each has a ``main(argv=None)``; importing them starts no JAX backend and sets no
device flag. Without ``--out`` they write to a scratch folder
(:func:`attention_jax.cli.default_out`), never to the committed results.
"""
