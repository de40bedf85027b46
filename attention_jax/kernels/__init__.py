"""Fast attention backends.

``implementation=`` names (one table: ``attention_jax.ops.available_implementations``):
``"xla"`` (einsum reference), ``"blockwise"`` (FlashAttention in pure JAX, memory
linear in T), ``"cudnn"`` (GPU, bf16/fp16), ``"decode"`` (few queries against a
long cache, read in place) and ``"auto"`` (the default; see
:func:`choose_implementation`). Importing this package registers nothing: the
backends are resolved by name when first used.
"""

from attention_jax.kernels.blockwise import blockwise_attention, default_block_sizes
from attention_jax.kernels.cudnn import cudnn_attention, cudnn_unsupported_reason
from attention_jax.kernels.decode import decode_core
from attention_jax.kernels.dispatch import (
    AUTO_EINSUM_MAX_TS,
    auto_attention,
    choose_implementation,
)

__all__ = [
    "AUTO_EINSUM_MAX_TS",
    "auto_attention",
    "blockwise_attention",
    "choose_implementation",
    "cudnn_attention",
    "cudnn_unsupported_reason",
    "decode_core",
    "default_block_sizes",
]
