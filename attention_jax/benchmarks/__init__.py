"""Benchmarks and experiments that ship with the package (``attention-jax bench | decode | shard``).

* :mod:`attention_jax.benchmarks.attention`: attention backends and layers against
  PyTorch, ``jax.nn`` and Flax NNX (``attention-jax bench``; cases in
  ``attention_cases``, tables in ``attention_report``, the masks section in
  ``attention_masks``);
* :mod:`attention_jax.benchmarks.decode`: one KV-cache decode step against PyTorch and
  the bandwidth floor (``attention-jax decode``; tables in ``decode_report``,
  ``--sections layout`` in ``decode_layout``);
* :mod:`attention_jax.benchmarks.head_parallel`: head parallelism on device meshes
  against a per-head ``device_put`` loop (``attention-jax shard``; rows in
  ``head_parallel_measure``, tables in ``head_parallel_report``);
* :mod:`attention_jax.benchmarks.context`: context parallelism, memory and collectives
  against T (``attention-jax shard --context``).

Each has a ``main(argv=None)``; importing them starts no JAX backend and sets no
device flag. Without ``--out`` they write to a scratch folder
(:func:`attention_jax.cli.default_out`), never to the committed results.
"""
