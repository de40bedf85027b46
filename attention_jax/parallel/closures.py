"""score_mod closures under context parallelism: the arrays a score_mod closes over
made explicit operands, so that gradients flow to them through the ring's
``custom_vjp`` and through the all-gather (see :func:`convert_score_mod`).

:func:`convert_score_mod` and :func:`bind_score_mod` are importable from
:mod:`attention_jax.parallel.context` too.
"""

from __future__ import annotations

import jax

from attention_jax.kernels import block_step

Array = jax.Array


def convert_score_mod(score_mod, q: Array, k: Array, v: Array, *, q_positions=None,
                      kv_positions=None, head_offset=0, block_q: int | None = None,
                      block_kv: int | None = None):
    """``(fn, consts)``: ``score_mod`` traced at the blockwise kernel's tile shapes for
    the block pair (q, k), the arrays it closes over made explicit:
    ``fn(score, b, n, t, s, *consts)``.

    The closed-over arrays (e.g. learned ALiBi slopes) become ``consts``, so a
    ``custom_vjp`` can take them as operands and return their cotangents. Inside
    ``jax.shard_map`` they are marked varying over the axes q, k, v vary over, so
    autodiff sums their per-device cotangents once
    (:func:`attention_jax.kernels.closures.convert_varying`, which the blockwise
    kernel uses too).

    Args:
      score_mod: ``fn(score, b, n, t, s)`` (as in
        :func:`attention_jax.parallel.context.all_gather_attention`).
      q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, V]``: the kernel call's operands.
      q_positions, kv_positions, head_offset, block_q, block_kv: the kernel call's.

    Returns:
      ``(fn, consts)``; :func:`bind_score_mod` gives back a ``score_mod``.
    """
    built = block_step._build(q, k, v, None, is_causal=False, scale=None, block_q=block_q,
                              block_kv=block_kv, score_mod=score_mod, q_positions=q_positions,
                              kv_positions=kv_positions, head_offset=head_offset)
    return built[1], built[9]  # the blockwise kernel's own conversion


def bind_score_mod(fn, consts):
    """``score_mod(score, b, n, t, s)`` = ``fn(score, b, n, t, s, *consts)`` (None for None)."""
    if fn is None:
        return None
    return lambda score, b, n, t, s: fn(score, b, n, t, s, *consts)


__all__ = ["bind_score_mod", "convert_score_mod"]
