"""The ``"cudnn"`` backend: cuDNN's fused flash attention through ``jax.nn``.

``jax.nn.dot_product_attention(implementation="cudnn")`` with this package's
semantics: NVIDIA GPU, bf16/fp16, head size a multiple of 8 and at most 128
(256 from compute capability 9.0), value head size = query head size.
Anything else raises a ValueError that names what is wrong
(:func:`cudnn_unsupported_reason`); ``"auto"`` then takes another backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import ops

Array = jax.Array

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def platform_name(platform: str | None = None) -> str:
    """``platform``, or JAX's default backend (``\"cpu\"``, ``\"gpu\"``, ...)."""
    return platform or jax.default_backend()


def _max_cudnn_head_dim() -> int:
    try:
        cc = jax.devices("gpu")[0].compute_capability
        major = int(str(cc).split(".")[0])
    except (RuntimeError, AttributeError, ValueError, IndexError):
        return 128
    return 256 if major >= 9 else 128


def cudnn_unsupported_reason(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    platform: str | None = None,
) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None when it can.

    Checks the platform, the dtypes, the head sizes and, with a mask or bias,
    even T and S (cuDNN's backward pass with a bias needs them).
    """
    platform = platform_name(platform)
    if platform != "gpu":
        return f"cudnn attention needs an NVIDIA GPU; the JAX platform is {platform!r}"
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or jnp.dtype(q.dtype) not in tuple(map(jnp.dtype, _CUDNN_DTYPES)):
        return (
            "cudnn attention needs q, k, v all bfloat16 or all float16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    H, V = q.shape[-1], v.shape[-1]
    h_max = _max_cudnn_head_dim()
    if H % 8 or H > h_max:
        return f"cudnn attention needs a head size that is a multiple of 8 and <= {h_max}; got {H}"
    if V != H:
        return f"cudnn attention (through jax.nn) needs value head size {V} == query head size {H}"
    T, S = q.shape[1], k.shape[1]
    if (mask is not None or bias is not None) and (T % 2 or S % 2):
        return f"cudnn attention with a mask or bias needs even lengths; got T={T}, S={S}"
    return None


def _full_4d(x: Array, T: int, S: int) -> Array:
    """A mask/bias broadcastable to ``[B, N, T, S]`` -> ``[B|1, N|1, T, S]``."""
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    return jnp.broadcast_to(x, (*x.shape[:2], T, S))


def jax_nn_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = "cudnn",
) -> Array:
    """``jax.nn.dot_product_attention`` with this package's semantics.

    The mask and bias are broadcast to full ``T, S`` (cuDNN requires it), the
    bias is cast to q's dtype, ``is_causal`` maps to jax's (top-left aligned,
    like ours), and rows that see no key are zeroed (jax returns the mean of the
    values there). GQA is native in jax.nn (query head n uses kv head n // G).
    """
    T, S = q.shape[1], k.shape[1]
    mask4 = None if mask is None else _full_4d(mask.astype(bool), T, S)
    bias4 = None if bias is None else _full_4d(bias, T, S).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias4, mask4, scale=scale, is_causal=is_causal, implementation=implementation
    )
    if mask4 is None:
        return out  # with is_causal alone, every query sees key 0
    visible = mask4 & ops.causal_block(T, S) if is_causal else mask4
    seen = visible.any(axis=-1)  # [B|1, N|1, T]
    seen = seen.transpose(0, 2, 1)[..., None]  # [B|1, T, N|1, 1]
    return jnp.where(seen, out, jnp.zeros((), out.dtype))


def cudnn_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> Array:
    """cuDNN flash attention (signature of ``ops.attention_core``).

    Raises:
      ValueError: off GPU, for dtypes other than bf16/fp16, unsupported head
        sizes, or odd lengths with a mask/bias (see :func:`cudnn_unsupported_reason`).
    """
    reason = cudnn_unsupported_reason(q, k, v, mask, bias)
    if reason is not None:
        raise ValueError(reason + "; use implementation='blockwise' or 'xla' (or 'auto')")
    return jax_nn_attention(q, k, v, mask, bias, is_causal=is_causal, scale=scale)
