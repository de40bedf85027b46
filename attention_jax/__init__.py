"""attention_jax: multi-head, multi-query and grouped-query attention for JAX / Flax NNX.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> mqa = aj.MultiQueryAttention(32, 4, rngs=nnx.Rngs(0))
>>> mqa.num_kv_heads, mqa(jnp.ones((1, 6, 32))).shape
(1, (1, 6, 32))
"""

from attention_jax import cache, convert, interop, kernels, linen, masks, ops, rope
from attention_jax.cache import KVCache
from attention_jax.masks import causal_mask, combine_masks, padding_mask, sliding_window_mask
from attention_jax.modules import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    attention_forward,
)
from attention_jax.ops import dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "GroupedQueryAttention",
    "KVCache",
    "MultiHeadAttention",
    "MultiQueryAttention",
    "attention_forward",
    "cache",
    "causal_mask",
    "combine_masks",
    "convert",
    "dot_product_attention",
    "interop",
    "kernels",
    "linen",
    "masks",
    "ops",
    "padding_mask",
    "rope",
    "sliding_window_mask",
]
