"""Changing the number of key/value heads of a trained module: MHA <-> GQA <-> MQA.

Query head n reads key/value head ``n // G`` (G = N // K), so kv head j serves
the G consecutive query heads ``j*G .. j*G + G - 1``. Going from K to a smaller
K' (K' | K) merges each run of ``r = K / K'`` consecutive kv heads into one,
which then serves the union of their query heads:

* ``method="mean"``: the mean of the run's K/V kernels and biases (the GQA
  paper's initialisation before uptraining; Ainslie et al., 2023);
* ``method="first"``: the run's first head;
* ``method="random"``: fresh K/V parameters (the default LeCun-normal kernels,
  zero biases), the baseline of the uptraining experiment.

Going to a larger K' (K | K' | N) repeats each kv head ``K' / K`` times, which
changes nothing in the outputs (:func:`gqa_to_mha` is exact). Every other
option (the module's :class:`~attention_jax.config.AttentionConfig` with only
``num_kv_heads`` changed) and the q/o parameters are copied.

>>> from flax import nnx
>>> from attention_jax.modules import MultiHeadAttention
>>> mha = MultiHeadAttention(32, 8, rngs=nnx.Rngs(0))
>>> gqa = mha_to_gqa(mha, 2)
>>> gqa.num_kv_heads, gqa.k_kernel.shape
(2, (32, 2, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax.config import KV_HEADS
from attention_jax.modules import PARAM_AXES, MultiHeadAttention

Array = jax.Array
Method = Literal["mean", "first", "random"]

_KV_PARAMS = ("k_kernel", "v_kernel", "k_bias", "v_bias")
_METHODS = ("mean", "first", "random")


def _kv_axis(name: str) -> int:
    """Position of the ``kv_heads`` axis in a parameter."""
    return PARAM_AXES[name].axes.index("kv_heads")


def pool_kv_heads(x: Array, axis: int, num_kv_heads: int, method: Method = "mean") -> Array:
    """Merges runs of consecutive heads on ``axis``: K -> K' = ``num_kv_heads``.

    Args:
      x: a parameter with K heads on ``axis`` (e.g. ``k_kernel [Dk, K, H]``).
      axis: the head axis.
      num_kv_heads: K', a divisor of K.
      method: ``"mean"`` (average of each run, in float32) or ``"first"``.

    Returns:
      ``x`` with K' heads on ``axis``, in ``x``'s dtype.
    """
    K = x.shape[axis]
    if K % num_kv_heads:
        raise ValueError(f"cannot pool {K} kv heads into {num_kv_heads}: {num_kv_heads} ∤ {K}")
    r = K // num_kv_heads
    runs = x.reshape((*x.shape[:axis], num_kv_heads, r, *x.shape[axis + 1:]))  # [.., K', r, ..]
    if method == "mean":
        return jnp.mean(runs.astype(jnp.float32), axis=axis + 1).astype(x.dtype)
    if method == "first":
        return jnp.take(runs, 0, axis=axis + 1)
    raise ValueError(f"pool method must be 'mean' or 'first'; got {method!r}")


def convert_kv_heads(
    module: MultiHeadAttention,
    num_kv_heads: int,
    method: Method = "mean",
    *,
    rngs: nnx.Rngs | None = None,
) -> MultiHeadAttention:
    """A new module with ``num_kv_heads`` key/value heads (the input is left as is).

    Args:
      module: the source, with N query heads and K kv heads.
      num_kv_heads: K'. Fewer heads (K' | K) are made by ``method``; more heads
        (K | K' | N) by exact repetition (``method`` is then ignored);
        K' = K copies the module.
      method: ``"mean"``, ``"first"`` or ``"random"`` (see the module doc).
      rngs: ``nnx.Rngs`` with ``params``, needed by ``method="random"``.

    Returns:
      A :class:`MultiHeadAttention` with the same configuration and q/o
      parameters, and K' kv heads.

    Raises:
      ValueError: naming N, K and K' when K' does not divide N, or when K and
        K' do not divide one another.
    """
    N, K, Kn = module.num_heads, module.num_kv_heads, num_kv_heads
    if Kn < 1 or N % Kn:
        raise ValueError(
            f"num_kv_heads ({Kn}) must divide num_heads ({N}); the module has N={N}, K={K}"
        )
    if K % Kn and Kn % K:
        raise ValueError(
            f"cannot convert K={K} kv heads to K'={Kn} (N={N}): one must divide the other"
        )
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    if method == "random" and Kn < K and rngs is None:
        raise ValueError("method='random' needs rngs (an nnx.Rngs with a params stream)")

    # The constructor's own random draw is overwritten below, except for
    # method="random", where these are the fresh K/V parameters.
    build_rngs = rngs if (method == "random" and Kn < K) else nnx.Rngs(0)
    config = dataclasses.replace(module.config, num_kv_heads=Kn)
    new = MultiHeadAttention.from_config(config, rngs=build_rngs)
    new.deterministic = module.deterministic
    if module.rngs is not None:
        new.rngs = nnx.clone(module.rngs)
    for spec in module.config.params():
        value = getattr(module, spec.name)[...]
        if KV_HEADS in spec.axes:  # k/v kernels and biases (and a "full" k_norm)
            axis = spec.axes.index(KV_HEADS)
            if Kn > K:
                value = jnp.repeat(value, Kn // K, axis=axis)
            elif Kn < K:
                if method == "random" and spec.name in _KV_PARAMS:
                    continue
                value = pool_kv_heads(value, axis, Kn, "mean" if method == "random" else method)
        getattr(new, spec.name)[...] = value
    return new


def mha_to_gqa(
    module: MultiHeadAttention,
    num_kv_heads: int,
    method: Method = "mean",
    *,
    rngs: nnx.Rngs | None = None,
) -> MultiHeadAttention:
    """MHA (or GQA with K' | K) to GQA with ``num_kv_heads`` kv heads.

    Pools each run of ``K / K'`` consecutive kv heads (see :func:`convert_kv_heads`).

    Raises:
      ValueError: when ``num_kv_heads`` does not divide N and K, or exceeds K.
    """
    K = module.num_kv_heads
    if num_kv_heads > K:
        raise ValueError(
            f"mha_to_gqa reduces kv heads: num_kv_heads ({num_kv_heads}) > K={K} "
            f"(N={module.num_heads}); use gqa_to_mha / convert_kv_heads to add heads"
        )
    return convert_kv_heads(module, num_kv_heads, method, rngs=rngs)


def mha_to_mqa(
    module: MultiHeadAttention, method: Method = "mean", *, rngs: nnx.Rngs | None = None
) -> MultiHeadAttention:
    """MHA or GQA to MQA: one kv head (see :func:`mha_to_gqa`)."""
    return mha_to_gqa(module, 1, method, rngs=rngs)


def gqa_to_mha(module: MultiHeadAttention) -> MultiHeadAttention:
    """GQA or MQA to MHA by repeating each kv head G times: the outputs are unchanged."""
    return convert_kv_heads(module, module.num_heads)
