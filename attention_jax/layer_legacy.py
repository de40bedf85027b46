"""The earlier public layer functions, kept because callers were written against them.

:func:`attention_forward` and :func:`decode_forward` return the layer's output
**without the output bias** (options as keywords); new code calls
:func:`attention_jax.layer.attention_layer` / :func:`~attention_jax.layer.decode_layer`,
which return what the module returns. Both names stay importable from
:mod:`attention_jax.layer` and the top-level package.
"""

from __future__ import annotations

from typing import Any

import jax

from attention_jax import cache as kv_cache
from attention_jax import rope as rope_lib
from attention_jax.config import AttentionConfig
from attention_jax.layer import Params, _decode, _forward, check_decode_inputs

Array = jax.Array


def attention_forward(
    params: Params,
    inputs_q: Array,
    inputs_k: Array,
    inputs_v: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
    dtype: Any = None,
    rope: float | rope_lib.Rope | None = None,
    positions: Array | None = None,
    kv_positions: Array | None = None,
) -> tuple[Array, Array | None]:
    """The layer's math **without the output bias**, options as keywords.

    Kept for existing callers; it always returns ``(y, weights or None)`` and
    never adds ``o_bias``: the result is ``attention_layer(...) - o_bias``.
    New code should call :func:`attention_layer`, which returns what the module
    returns. ``dropout_rate`` applies only with a ``dropout_rng``.

    Returns:
      ``([B, T, Do] without o_bias, weights [B, N, T, S] or None)``.
    """
    rate = dropout_rate if dropout_rng is not None else 0.0
    config = _config_from_params(params, dropout_rate=rate, dtype=dtype,
                                 implementation=implementation, rope=rope)
    return _forward(config, params, inputs_q, inputs_k, inputs_v, mask=mask,
                    is_causal=is_causal, scale=scale, dropout_rng=dropout_rng if rate else None,
                    return_weights=return_weights, positions=positions,
                    kv_positions=kv_positions)


def decode_forward(
    params: Params,
    x: Array,
    cache: kv_cache.KVCache,
    *,
    mask: Array | None = None,
    valid_lengths: Array | None = None,
    scale: float | None = None,
    rope: float | rope_lib.Rope | None = None,
    implementation: str | None = None,
    dtype: Any = None,
    kv_heads: tuple[Array | int, int] | None = None,
) -> tuple[Array, kv_cache.KVCache]:
    """:func:`decode_layer` **without the output bias**, options as keywords (kept API)."""
    config = _config_from_params(params, dtype=dtype, implementation=implementation, rope=rope)
    check_decode_inputs(config, x, cache)
    return _decode(config, params, x, cache, mask=mask, valid_lengths=valid_lengths,
                   kv_heads=kv_heads, scale=scale)


def _config_from_params(params: Params, **options: Any) -> AttentionConfig:
    """The :class:`AttentionConfig` of parameters ``params`` with ``options``.

    Only the options the math reads matter here; which biases exist is read from
    ``params`` itself (a None bias is skipped).
    """
    D, N, H = params["q_kernel"].shape
    Dk, K, _ = params["k_kernel"].shape
    Dv, _, V = params["v_kernel"].shape
    Do = params["o_kernel"].shape[-1]
    return AttentionConfig(D, N, num_kv_heads=K, head_dim=H, v_head_dim=V, in_k_features=Dk,
                           in_v_features=Dv, out_features=Do, **options)
