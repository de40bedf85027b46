"""Operand checks shared by :func:`attention_jax.ops.dot_product_attention` and the kernels.

:func:`check_qkv` validates q, k, v and returns their dims ``(B, T, S, N, K, H, V)``;
``_check_broadcast`` (masks and biases against ``[B, N, T, S]``), ``_check_extras``
(mask objects, sinks, scale) and ``_promote`` (integer operands to float32) are the
rest of what ``dot_product_attention`` checks before dispatching. Re-exported by
:mod:`attention_jax.ops`, where they lived.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import masks

Array = jax.Array


def check_qkv(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int, int, int]:
    """Validates attention operands and returns ``(B, T, S, N, K, H, V)``.

    Raises:
      ValueError: naming the offending shapes when ranks, batch, lengths or
        head sizes disagree, or when N is not a multiple of K.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 ([batch, length, heads, head_dim]); "
                f"got shape {tuple(x.shape)}"
            )
    B, T, N, H = q.shape
    Bk, S, K, Hk = k.shape
    Bv, Sv, Kv, V = v.shape
    if not B == Bk == Bv:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if S != Sv:
        raise ValueError(f"key length {S} != value length {Sv}")
    if H != Hk:
        raise ValueError(f"query head size {H} != key head size {Hk}")
    if K != Kv:
        raise ValueError(f"key heads {K} != value heads {Kv}")
    if K == 0 or N % K:
        raise ValueError(
            f"query heads ({N}) must be a multiple of key/value heads ({K})"
        )
    return B, T, S, N, K, H, V


def _check_broadcast(name: str, x: Array | None, shape: tuple[int, ...]) -> None:
    if x is None:
        return
    ok = x.ndim <= len(shape) and all(
        a in (1, b) for a, b in zip(x.shape[::-1], shape[::-1], strict=False)
    )
    if not ok:
        B, N, T, S = shape
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} does not broadcast to "
            f"[batch, heads, q_len, kv_len] = [{B}, {N}, {T}, {S}]"
        )


def _check_extras(q, k, mask, sinks, scale, N: int) -> None:
    if isinstance(mask, masks.Mask):
        mask.check(q.shape[0], N, q.shape[1], k.shape[1])
    elif mask is not None and not hasattr(mask, "dtype"):
        raise TypeError(
            f"mask must be a boolean array or an attention_jax.masks object; got {type(mask)}")
    if sinks is not None and tuple(jnp.shape(sinks)) != (N,):
        raise ValueError(f"sinks must be [num_heads] = [{N}]; got shape {tuple(jnp.shape(sinks))}")
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar; got shape {jnp.shape(scale)}")


def _promote(x: Array) -> Array:
    """Integer and boolean operands become float32 (the softmax weights are not integers)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return x.astype(jnp.float32)
