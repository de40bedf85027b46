"""What every variant shares with :class:`attention_jax.MultiHeadAttention`.

The variants subclass the module, so their projections are its parameters
(``q_kernel [D, N, H]``, ``k_kernel [Dk, K, H]``, ``v_kernel [Dv, K, V]``,
``o_kernel [N, V, Do]`` and the biases, same names, shapes and logical axes);
only the step between the projections and the output projection changes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import ops
from attention_jax import rope as rope_lib
from attention_jax.modules import MultiHeadAttention

Array = jax.Array

# Constructor arguments of MultiHeadAttention (besides in_features, num_heads, rngs)
# that a conversion carries over.
CONFIG_NAMES = ("num_kv_heads", "head_dim", "v_head_dim", "in_k_features", "in_v_features",
                "out_features", "use_bias", "dropout_rate", "dtype", "param_dtype",
                "implementation", "scale", "deterministic", "rope")


def mha_config(module: MultiHeadAttention) -> dict[str, Any]:
    """Keyword arguments that rebuild ``module``'s layout (without ``in_features``,
    ``num_heads``, ``rngs``): its ``config`` fields when it has one."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = config.to_dict()
        return {k: v for k, v in fields.items() if k not in ("in_features", "num_heads")}
    return {name: getattr(module, name) for name in CONFIG_NAMES}


def check_width(name: str, x: Array, expected: int) -> None:
    """``x`` is ``[batch, length, expected]``, else a ValueError naming both."""
    if x.ndim != 3 or x.shape[-1] != expected:
        raise ValueError(f"{name} must be [batch, length, {expected}]; got shape {tuple(x.shape)}")


def cast_params(params: dict[str, Array | None], *inputs: Array, dtype: Any = None
                ) -> tuple[dict[str, Array | None], Any]:
    """Parameters in the computation dtype (default: promoted from inputs and params)."""
    arrays = [*inputs, *(p for p in params.values() if p is not None)]
    dtype = jnp.result_type(*arrays) if dtype is None else dtype
    return {n: None if a is None else jnp.asarray(a, dtype) for n, a in params.items()}, dtype


def project_qkv(params: dict[str, Array | None], xq: Array, xk: Array, xv: Array, *,
                rope: float | None = None) -> tuple[Array, Array, Array]:
    """``[B, T, D], [B, S, Dk], [B, S, Dv] -> q [B, T, N, H], k [B, S, K, H], v [B, S, K, V]``.

    ``params`` are already in the computation dtype (:func:`cast_params`); rope
    (when set) rotates q and k at positions ``arange(T)`` / ``arange(S)``.
    """
    dtype = params["q_kernel"].dtype
    xq, xk, xv = (jnp.asarray(x, dtype) for x in (xq, xk, xv))
    q = ops.project_heads(xq, params["q_kernel"], params["q_bias"])  # [B, T, N, H]
    k = ops.project_heads(xk, params["k_kernel"], params["k_bias"])  # [B, S, K, H]
    v = ops.project_heads(xv, params["v_kernel"], params["v_bias"])  # [B, S, K, V]
    if rope is not None:
        q = rope_lib.apply_rope(q, jnp.arange(q.shape[1]), rope)
        k = rope_lib.apply_rope(k, jnp.arange(k.shape[1]), rope)
    return q, k, v


def output(params: dict[str, Array | None], heads: Array) -> Array:
    """``[B, T, N, V] -> [B, T, Do]``: the output projection and its bias."""
    y = ops.merge_heads(heads, params["o_kernel"])  # [B, T, Do]
    return y if params["o_bias"] is None else y + params["o_bias"].astype(y.dtype)


def check_no_dropout(name: str, dropout_rate: float) -> None:
    """The linear and Linformer cores have no attention weights to drop."""
    if dropout_rate:
        raise ValueError(f"{name} has no attention weights to drop out; got "
                         f"dropout_rate={dropout_rate} (use 0.0)")
