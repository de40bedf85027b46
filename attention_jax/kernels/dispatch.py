"""The ``"cudnn"`` and ``"auto"`` backends, and their registration.

Backends (``implementation=`` of :func:`attention_jax.ops.dot_product_attention`):

* ``"xla"``: the einsum reference (:func:`attention_jax.ops.attention_core`); it
  materialises the ``[B, N, T, S]`` scores.
* ``"blockwise"``: :func:`attention_jax.kernels.blockwise.blockwise_attention`,
  FlashAttention in pure JAX; any platform, any dtype, masks, bias, GQA.
* ``"cudnn"``: cuDNN's fused flash attention through
  ``jax.nn.dot_product_attention(implementation="cudnn")``: NVIDIA GPU, bf16/fp16,
  head size a multiple of 8 and at most 128 (256 from compute capability 9.0),
  value head size = query head size. Anything else raises a ValueError that names
  what is wrong.
* ``"decode"``: :func:`attention_jax.kernels.decode.decode_core`, the einsum path
  reading the key/value cache in place (few queries, long caches; CPU).
* ``"auto"`` (the default, ``implementation=None``): :func:`choose_implementation`.

Dropout and returned weights always use the einsum path (ops does that before
dispatching here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import ops
from attention_jax.kernels.blockwise import blockwise_core
from attention_jax.kernels.decode import decode_core

Array = jax.Array

# "auto" uses the einsum path while T * S (per batch row and head) is at most this,
# and the blockwise kernel above it. CPU, measured with experiments/bench_attention.py
# (crossover section: B=4, N=8, H=64, f32, jit, forward + backward, 7 interleaved
# rounds, 2 cores, quiet machine), blockwise time / einsum time (ratio of best
# rounds) by T = S: 128: 1.29, 256: 1.09, 384: 0.76, 512: 0.74, 768: 0.53,
# 1024: 0.46. GPU: not measured (no device lent); cuDNN takes the supported cases
# first, and 1024^2 keeps the einsum path's [B, N, T, S] scores modest for the rest.
AUTO_EINSUM_MAX_TS = {"cpu": 256 * 256, "gpu": 1024 * 1024}
# "auto" on CPU takes the "decode" backend for few query rows (T * N per batch row)
# against a long cache. Measured (B=1, H=64, f32, jit, forward; einsum time / decode
# time): T*N = 16 (N=16, T=1; K = 16, 4, 1): 1.1-1.8x at S = 128-1024, 1.8-6.6x at
# S = 4096-16384; T*N = 32 or 64: 0.5-0.6x at S = 1024 but 1.6-3.3x at S = 8192;
# T*N = 128: 1.1-1.2x at S = 8192; T*N = 256: 0.7x. It materialises the [N, T, S]
# scores like the einsum path, so it also stops where those grow large.
AUTO_DECODE_ALWAYS_ROWS = 16  # T * N at most this: any S
AUTO_DECODE_MAX_ROWS, AUTO_DECODE_MIN_S = 64, 2048  # else T * N <= 64 and S >= 2048
AUTO_DECODE_MAX_SCORES = 1 << 24  # T * N * S (float32 scores per batch row)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _platform(platform: str | None) -> str:
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
    platform = _platform(platform)
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


def choose_implementation(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    platform: str | None = None,
) -> str:
    """The backend ``"auto"`` runs for these operands.

    Rules, in order:

    1. GPU, and cuDNN supports the call (:func:`cudnn_unsupported_reason`): ``"cudnn"``.
    2. CPU, few query rows against a long cache (decoding): ``T * N <= 16``, or
       ``T * N <= 64`` and ``S >= 2048``; and ``T * N * S <= 2**24``: ``"decode"``
       (1.1-6.6x faster than the einsum path there; see ``AUTO_DECODE_*``).
    3. ``T * S <= AUTO_EINSUM_MAX_TS[platform]``: ``"xla"`` (on CPU 10-30 % faster
       than the kernel up to T = S = 256, where the kernel is a single block).
    4. Otherwise ``"blockwise"`` (on CPU 1.3x faster at T = S = 384, 2.2x at
       1024, 2.6x at 2048 with B=1; memory linear in T).

    >>> import jax.numpy as jnp
    >>> q, kv = jnp.ones((1, 2048, 8, 64)), jnp.ones((1, 2048, 2, 64))
    >>> choose_implementation(q, kv, kv, platform="cpu"), choose_implementation(
    ...     q[:, :1], kv, kv, platform="cpu")                     # a decode step
    ('blockwise', 'decode')
    """
    platform = _platform(platform)
    if platform == "gpu" and not cudnn_unsupported_reason(q, k, v, mask, bias, platform="gpu"):
        return "cudnn"
    T, N, S = q.shape[1], q.shape[2], k.shape[1]
    rows = T * N
    if platform == "cpu" and rows * S <= AUTO_DECODE_MAX_SCORES and (
        rows <= AUTO_DECODE_ALWAYS_ROWS
        or (rows <= AUTO_DECODE_MAX_ROWS and S >= AUTO_DECODE_MIN_S)
    ):
        return "decode"
    if T * S <= AUTO_EINSUM_MAX_TS.get(platform, AUTO_EINSUM_MAX_TS["cpu"]):
        return "xla"
    return "blockwise"


_BACKENDS = {
    "xla": ops.attention_core,
    "blockwise": blockwise_core,
    "cudnn": cudnn_attention,
    "decode": decode_core,
}


def auto_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> Array:
    """Runs the backend :func:`choose_implementation` picks (signature of ``attention_core``)."""
    fn = _BACKENDS[choose_implementation(q, k, v, mask, bias)]
    return fn(q, k, v, mask, bias, is_causal=is_causal, scale=scale)


def register() -> None:
    """Registers ``"blockwise"``, ``"cudnn"``, ``"decode"`` and ``"auto"`` with :mod:`ops`."""
    ops.register_implementation("blockwise", blockwise_core)
    ops.register_implementation("decode", decode_core)
    ops.register_implementation("cudnn", cudnn_attention)
    ops.register_implementation("auto", auto_attention)
