"""The ``"auto"`` backend: which kernel runs a call.

The backends themselves are listed in one table, ``ops._BUILTIN_IMPLEMENTATIONS``
(``"xla"`` einsum reference, ``"blockwise"`` FlashAttention in pure JAX,
``"cudnn"`` in :mod:`attention_jax.kernels.cudnn`, ``"decode"`` in
:mod:`attention_jax.kernels.decode`, and ``"auto"`` here). Dropout and returned
weights always use the einsum path (ops does that before dispatching).
"""

from __future__ import annotations

import jax

from attention_jax import ops
from attention_jax.kernels.cudnn import (  # noqa: F401 (re-exported: kernels.dispatch names)
    cudnn_attention,
    cudnn_unsupported_reason,
    jax_nn_attention,
    platform_name,
)

Array = jax.Array

# The rule's thresholds; the measurements behind them are in
# experiments/results/auto_rule_cpu.md. "auto" uses the einsum path while T * S
# (per batch row and head) is at most this, the blockwise kernel above it.
AUTO_EINSUM_MAX_TS = {"cpu": 256 * 256, "gpu": 1024 * 1024}
# On CPU, "decode" for few query rows (T * N per batch row) against a long cache:
AUTO_DECODE_ALWAYS_ROWS = 16  # T * N at most this: any S
AUTO_DECODE_MAX_ROWS, AUTO_DECODE_MIN_S = 64, 2048  # else T * N <= 64 and S >= 2048
AUTO_DECODE_MAX_SCORES = 1 << 24  # T * N * S (float32 scores per batch row)


def choose_implementation(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    platform: str | None = None,
    **extras,
) -> str:
    """The backend ``"auto"`` runs for these operands.

    Rules, in order:

    1. GPU, and cuDNN supports the call (:func:`cudnn_unsupported_reason`, mask
       objects and extras included): ``"cudnn"``.
    2. CPU, few query rows against a long cache (decoding): ``T * N <= 16``, or
       ``T * N <= 64`` and ``S >= 2048``; and ``T * N * S <= 2**24``; and no
       score_mod or sinks: ``"decode"`` (mask objects evaluated densely there).
    3. ``T * S <= AUTO_EINSUM_MAX_TS[platform]``: ``"xla"``.
    4. Otherwise ``"blockwise"`` (memory linear in T).

    The thresholds are measured: ``experiments/results/auto_rule_cpu.md``.

    >>> import jax.numpy as jnp
    >>> q, kv = jnp.ones((1, 2048, 8, 64)), jnp.ones((1, 2048, 2, 64))
    >>> choose_implementation(q, kv, kv, platform="cpu"), choose_implementation(
    ...     q[:, :1], kv, kv, platform="cpu")                     # a decode step
    ('blockwise', 'decode')
    """
    platform = platform_name(platform)
    if platform == "gpu" and not cudnn_unsupported_reason(q, k, v, mask, bias, platform="gpu",
                                                          **extras):
        return "cudnn"
    plain = extras.get("score_mod") is None and extras.get("sinks") is None
    T, N, S = q.shape[1], q.shape[2], k.shape[1]
    rows = T * N
    if plain and platform == "cpu" and rows * S <= AUTO_DECODE_MAX_SCORES and (
        rows <= AUTO_DECODE_ALWAYS_ROWS
        or (rows <= AUTO_DECODE_MAX_ROWS and S >= AUTO_DECODE_MIN_S)
    ):
        return "decode"
    if T * S <= AUTO_EINSUM_MAX_TS.get(platform, AUTO_EINSUM_MAX_TS["cpu"]):
        return "xla"
    return "blockwise"


def auto_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    **extras,
) -> Array:
    """Runs the backend :func:`choose_implementation` picks (signature of ``attention_core``;
    ``extras``: score_mod, sinks, q_positions, kv_positions, head_offset)."""
    impl = choose_implementation(q, k, v, mask, bias, **extras)
    return ops.dot_product_attention(q, k, v, mask, bias, is_causal=is_causal, scale=scale,
                                     implementation=impl, **extras)
