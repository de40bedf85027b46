"""The ``"cudnn"`` backend: cuDNN's fused flash attention through ``jax.nn``.

``jax.nn.dot_product_attention(implementation="cudnn")`` with this package's
semantics: NVIDIA GPU, bf16/fp16, head size a multiple of 8 and at most 128
(256 from compute capability 9.0), value head size = query head size.
Mask objects: ``Causal()`` (offset 0), ``SlidingWindow(left, right)`` (jax.nn's
``local_window_size``), ``Lengths`` (``key_value_seq_lengths`` /
``query_seq_lengths``) and their ``&``, at the default positions; no score_mod,
no sinks. Anything else raises a ValueError that names what is wrong
(:func:`cudnn_unsupported_reason`); ``"auto"`` then takes another backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import masks, ops

Array = jax.Array


def _is_zero(x) -> bool:
    return isinstance(x, int) and x == 0


def _conjuncts(mask: masks.Mask) -> list[masks.Mask]:
    if isinstance(mask, masks.And):
        return _conjuncts(mask.a) + _conjuncts(mask.b)
    return [mask]


def cudnn_mask_args(mask: masks.Mask | None) -> tuple[dict, str | None]:
    """``jax.nn.dot_product_attention`` keywords for a mask object, and why not (or None).

    >>> cudnn_mask_args(masks.Causal() & masks.SlidingWindow(4))
    ({'is_causal': True, 'local_window_size': (4, 0)}, None)
    """
    kw: dict = {}
    if mask is None:
        return kw, None
    for m in _conjuncts(mask):
        if isinstance(m, masks.Causal) and m.offset == 0 and "is_causal" not in kw:
            kw["is_causal"] = True
        elif isinstance(m, masks.SlidingWindow) and "local_window_size" not in kw:
            kw["local_window_size"] = (m.left, m.right)
        elif isinstance(m, masks.Lengths) and "key_value_seq_lengths" not in kw:
            kw["key_value_seq_lengths"] = jnp.asarray(m.kv_lengths, jnp.int32)
            if m.q_lengths is not None:
                kw["query_seq_lengths"] = jnp.asarray(m.q_lengths, jnp.int32)
        else:
            return {}, (
                "cudnn attention takes Causal() (offset 0), one SlidingWindow, one Lengths and "
                f"their '&'; got {type(m).__name__}" + (
                    f"(offset={m.offset})" if isinstance(m, masks.Causal) else ""))
    return kw, None


def _rows_seen(kw: dict, B: int, T: int, S: int) -> Array | None:
    """``[B|1, T]``: whether each query row sees any key under the jax.nn keywords."""
    if not kw:
        return None
    t = jnp.arange(T)[None, :]
    lo = jnp.zeros((1, T), jnp.int32)
    hi = jnp.full((1, T), S - 1)
    if "key_value_seq_lengths" in kw:
        hi = jnp.minimum(hi, kw["key_value_seq_lengths"][:, None] - 1)
    if kw.get("is_causal"):
        hi = jnp.minimum(hi, t)
    if "local_window_size" in kw:
        left, right = kw["local_window_size"]
        lo, hi = jnp.maximum(lo, t - left), jnp.minimum(hi, t + right)
    seen = lo <= hi
    if "query_seq_lengths" in kw:
        seen = seen & (t < kw["query_seq_lengths"][:, None])
    return seen

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
    **extras,
) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None when it can.

    Checks the platform, the dtypes, the head sizes, the mask object and the
    extras (score_mod, sinks, positions) and, with a dense mask or bias, even T
    and S (cuDNN's backward pass with a bias needs them).
    """
    platform = platform_name(platform)
    if isinstance(mask, masks.Mask):
        reason = cudnn_mask_args(mask)[1]
        if reason:
            return reason
        mask = None
    given = sorted(name for name, val in extras.items()
                   if val is not None and not (name == "head_offset" and _is_zero(val)))
    given = [g for g in given if g != "head_offset"]  # no mask cuDNN takes reads heads
    if given:
        return f"cudnn attention does not take {', '.join(given)}"
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
    mask: Array | masks.Mask | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = "cudnn",
) -> Array:
    """``jax.nn.dot_product_attention`` with this package's semantics.

    The mask and bias are broadcast to full ``T, S`` (cuDNN requires it), the
    bias is cast to q's dtype, ``is_causal`` maps to jax's (top-left aligned,
    like ours), a mask object to jax's keywords (:func:`cudnn_mask_args`), and
    rows that see no key are zeroed (jax returns the mean of the values there).
    GQA is native in jax.nn (query head n uses kv head n // G).
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    kw: dict = {}
    if isinstance(mask, masks.Mask):
        kw, reason = cudnn_mask_args(mask)
        if reason:
            raise ValueError(reason)
        mask = None
    if is_causal:
        kw["is_causal"] = True
    mask4 = None if mask is None else _full_4d(mask.astype(bool), T, S)
    bias4 = None if bias is None else _full_4d(bias, T, S).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias4, mask4, scale=scale, implementation=implementation, **kw
    )
    seen = _rows_seen(kw, B, T, S)  # [B|1, T]
    if mask4 is not None:
        visible = mask4 & ops.causal_block(T, S) if kw.get("is_causal") else mask4
        if "local_window_size" in kw:
            left, right = kw["local_window_size"]
            visible = visible & masks.SlidingWindow(left, right).dense(1, 1, T, S)
        if "key_value_seq_lengths" in kw:
            visible = visible & (jnp.arange(S) < kw["key_value_seq_lengths"][:, None, None,
                                                                               None])
        dense_seen = visible.any(axis=-1).transpose(0, 2, 1)  # [B|1, T, N|1]
        if seen is not None:
            dense_seen = dense_seen & seen[:, :, None]
        return jnp.where(dense_seen[..., None], out, jnp.zeros((), out.dtype))
    if seen is None:
        return out  # with is_causal alone, every query sees key 0
    return jnp.where(seen[:, :, None, None], out, jnp.zeros((), out.dtype))


def cudnn_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | masks.Mask | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    **extras,
) -> Array:
    """cuDNN flash attention (signature of ``ops.attention_core``).

    Raises:
      ValueError: off GPU, for dtypes other than bf16/fp16, unsupported head
        sizes, mask objects or extras (score_mod, sinks, positions), or odd
        lengths with a mask/bias (see :func:`cudnn_unsupported_reason`).
    """
    reason = cudnn_unsupported_reason(q, k, v, mask, bias, **extras)
    if reason is not None:
        raise ValueError(reason + "; use implementation='blockwise' or 'xla' (or 'auto')")
    return jax_nn_attention(q, k, v, mask, bias, is_causal=is_causal, scale=scale)
