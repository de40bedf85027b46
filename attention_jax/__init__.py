"""attention_jax: multi-head, multi-query and grouped-query attention for JAX / Flax NNX.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> mqa = aj.MultiQueryAttention(32, 4, rngs=nnx.Rngs(0))
>>> mqa.num_kv_heads, mqa(jnp.ones((1, 6, 32))).shape
(1, (1, 6, 32))
"""

from attention_jax import (
    cache,
    config,
    convert,
    hf,
    interop,
    kernels,
    layer,
    linen,
    masks,
    ops,
    parallel,
    rope,
    scores,
    stack,
    variants,
)
from attention_jax.cache import KVCache
from attention_jax.config import AttentionConfig
from attention_jax.masks import causal_mask, combine_masks, padding_mask, sliding_window_mask
from attention_jax.modules import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    attention_forward,
    attention_layer,
    decode_layer,
)
from attention_jax.ops import dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "GroupedQueryAttention",
    "KVCache",
    "MultiHeadAttention",
    "MultiQueryAttention",
    "attention_forward",
    "attention_layer",
    "cache",
    "causal_mask",
    "combine_masks",
    "config",
    "convert",
    "decode_layer",
    "dot_product_attention",
    "hf",
    "interop",
    "kernels",
    "layer",
    "linen",
    "masks",
    "ops",
    "padding_mask",
    "parallel",
    "rope",
    "scores",
    "sliding_window_mask",
    "stack",
    "variants",
]
