"""Attention variants from the seed articles, on MultiHeadAttention's projections.

* :mod:`~attention_jax.variants.linformer`: keys/values projected along the
  sequence to a fixed length P (non-causal), cost ``T x P``.
* :mod:`~attention_jax.variants.linear`: a feature map instead of the softmax;
  causal form as an O(1)-state recurrence (``init_state`` / ``decode``).
* :mod:`~attention_jax.variants.gated`: a gate per batch row and head from the
  mean-pooled input, soft or hard (straight-through), inactive heads skipped
  when the gates are concrete.
* :mod:`~attention_jax.variants.convert`: ``from_mha`` / ``to_mha``.

Each module subclasses :class:`attention_jax.MultiHeadAttention`: same
parameters (``q_kernel [D, N, H]`` ... ``o_kernel [N, V, Do]``), same GQA / MQA
grouping (``num_kv_heads``), and adds only its own parameters.
"""

from attention_jax.variants.convert import KINDS, from_mha, to_mha
from attention_jax.variants.gated import (
    HeadGatedAttention,
    gated_attention_forward,
    hard_gates,
    head_gates,
    select_heads,
)
from attention_jax.variants.linear import (
    LinearAttention,
    LinearState,
    linear_attention,
    linear_attention_step,
)
from attention_jax.variants.linformer import LinformerAttention, linformer_attention

__all__ = [
    "KINDS",
    "HeadGatedAttention",
    "LinearAttention",
    "LinearState",
    "LinformerAttention",
    "from_mha",
    "gated_attention_forward",
    "hard_gates",
    "head_gates",
    "linear_attention",
    "linear_attention_step",
    "linformer_attention",
    "select_heads",
    "to_mha",
]
