"""Fast attention backends; importing this package registers them with :mod:`attention_jax.ops`.

``implementation=`` names: ``"xla"`` (einsum reference), ``"blockwise"``
(FlashAttention in pure JAX, memory linear in T), ``"cudnn"`` (GPU, bf16/fp16),
``"decode"`` (few queries against a long cache, read in place) and ``"auto"``
(the default; see :func:`choose_implementation`).
"""

from attention_jax.kernels.blockwise import blockwise_attention, default_block_sizes
from attention_jax.kernels.decode import decode_core
from attention_jax.kernels.dispatch import (
    AUTO_EINSUM_MAX_TS,
    auto_attention,
    choose_implementation,
    cudnn_attention,
    cudnn_unsupported_reason,
    register,
)

register()

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
