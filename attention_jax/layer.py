"""The attention layer on plain arrays: parameters by name + config + inputs.

:func:`attention_layer` returns exactly what :class:`attention_jax.MultiHeadAttention`
returns (output bias included); :func:`decode_layer` what its ``decode`` returns.
Every path runs these two functions: the NNX module, the Linen adapter and the
head-parallel body, which passes its local parameter slices and a ``reduce``
hook (the psum over ``model``) so that the partial outputs of its heads are
summed before the bias is added, once.

Head counts come from the kernels' shapes, not from the config, so a caller
holding a slice of the heads (``q_kernel[:, heads_here]`` ...) passes it as is;
the config supplies the options (scale, rope, backend, dtype, dropout rate)::

    x_q [B, T, D] --q_kernel--> q [B, T, N, H] --rope--\\
    x_k [B, S, Dk] --k_kernel--> k [B, S, K, H] --rope---> attention [B, T, N, V]
    x_v [B, S, Dv] --v_kernel--> v [B, S, K, V] ------/        |
                                     y [B, T, Do] <--o_kernel--+ (--reduce--) + o_bias
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import cache as kv_cache
from attention_jax import masks, ops, scores
from attention_jax import rope as rope_lib
from attention_jax.config import ALL_PARAM_AXES, AttentionConfig

Array = jax.Array
Params = dict[str, Array | None]
Reduce = Callable[[Array], Array]


# ---------------------------------------------------------------------------
# Input checks (every path)
# ---------------------------------------------------------------------------


def _check_width(name: str, x: Array, expected: int) -> None:
    if jnp.ndim(x) != 3:
        raise ValueError(f"{name} must be [batch, length, features]; got shape {jnp.shape(x)}")
    if x.shape[-1] != expected:
        raise ValueError(f"{name} has {x.shape[-1]} features but the module expects {expected}")


def resolve_inputs(
    config: AttentionConfig, inputs_q: Array, inputs_k: Array | None = None,
    inputs_v: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Applies the input defaults (k = q, v = k) and checks widths and batch.

    Raises:
      ValueError: naming the width or shape that does not match ``config``.
    """
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    _check_width("inputs_q", inputs_q, config.in_features)
    _check_width("inputs_k", inputs_k, config.in_k_features)
    _check_width("inputs_v", inputs_v, config.in_v_features)
    if inputs_k.shape[:2] != inputs_v.shape[:2]:
        raise ValueError(
            f"inputs_k {inputs_k.shape} and inputs_v {inputs_v.shape} must share [batch, length]"
        )
    if inputs_q.shape[0] != inputs_k.shape[0]:
        raise ValueError(
            f"inputs_q has batch {inputs_q.shape[0]} but inputs_k has {inputs_k.shape[0]}"
        )
    return inputs_q, inputs_k, inputs_v


def check_decode_inputs(config: AttentionConfig, x: Array, cache: kv_cache.KVCache, *,
                        num_kv_heads: int | None = None) -> None:
    """Checks ``x [B, t, D]`` and ``cache`` against ``config`` (every decode path).

    Args:
      num_kv_heads: the kv heads the cache holds when it is not ``config``'s K
        (a head-parallel device's local slice); default K.

    Raises:
      ValueError: naming the width, batch or cache shape that does not match.
    """
    _check_width("x", x, config.in_features)
    if not config.is_self_attention_only:
        raise ValueError(
            "decode is self-attention: it needs in_k_features == in_v_features == in_features; "
            f"got {config.in_k_features}, {config.in_v_features}, {config.in_features}"
        )
    K = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    H, V = config.head_dim, config.v_head_dim
    if ((cache.k.shape[1], cache.k.shape[3:]) != (K, (H,))
            or (cache.v.shape[1], cache.v.shape[3:]) != (K, (V,))):
        raise ValueError(
            f"cache k {cache.k.shape} / v {cache.v.shape} do not fit the module: expected "
            f"[B, K={K}, L, H={H}] / [B, K={K}, L, V={V}] (use module.init_cache)"
        )
    if x.shape[0] != cache.batch_size:
        raise ValueError(f"x has batch {x.shape[0]} but the cache has {cache.batch_size}")


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


def attention_layer(
    config: AttentionConfig,
    params: Params,
    inputs_q: Array,
    inputs_k: Array | None = None,
    inputs_v: Array | None = None,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    positions: Array | None = None,
    kv_positions: Array | None = None,
    reduce: Reduce | None = None,
    score_mod: Callable[..., Array] | None = None,
    head_offset: int | Array = 0,
    attention_fn: Callable[..., Array] | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
) -> Array | tuple[Array, Array]:
    """The module's forward pass on plain arrays, output bias included.

    Args:
      config: the layer's options.
      params: parameters by name (:data:`~attention_jax.config.PARAM_AXES`);
        absent biases may be None or missing. Head counts come from their shapes.
      inputs_q: ``[B, T, D]``; inputs_k ``[B, S, Dk]`` (default inputs_q);
        inputs_v ``[B, S, Dv]`` (default inputs_k).
      mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend.
      is_causal: add the top-left aligned causal mask.
      dropout_rng: a key turns dropout on (at ``config.dropout_rate``); None, off.
      return_weights: also return the ``[B, N, T, S]`` weights.
      positions: ``[T]`` or ``[B, T]`` query positions for rope; default ``arange(T)``.
      kv_positions: ``[S]`` or ``[B, S]`` key positions for rope; default
        ``positions`` for self-attention (inputs_k None), else ``arange(S)``.
      reduce: applied to the output before the bias is added, e.g.
        ``lambda y: lax.psum(y, "model")`` when ``params`` hold a slice of the heads.
      score_mod: ``fn(score, b, n, t, s) -> score`` on the scaled logits
        (:mod:`attention_jax.scores`), passed to the attention op.
      head_offset: the global index of the first head in ``params`` (a
        head-parallel caller's first head), for per-head masks and score mods.
      attention_fn: the attention op, with the signature of
        :func:`attention_jax.ops.dot_product_attention` (default); a context-parallel
        caller swaps in its ring / all-gather attention here.
      segment_ids: ``[B, T]`` integer ids of packed sequences (a query sees the keys
        of its own segment; negative ids are padding), or ``(q_ids [B, T], kv_ids
        [B, S])`` for cross-attention: :class:`attention_jax.masks.Segments`, combined
        with ``mask``. Give ``positions`` that restart per segment for rope.

    Returns:
      ``[B, T, Do]``, and the weights when ``return_weights``.

    >>> import jax.numpy as jnp
    >>> cfg = AttentionConfig(8, 2)
    >>> shapes = {p.name: p.shape for p in cfg.params()}
    >>> params = {n: jnp.full(s, 0.1) for n, s in shapes.items()}
    >>> attention_layer(cfg, params, jnp.ones((1, 3, 8)), is_causal=True).shape
    (1, 3, 8)
    """
    if kv_positions is None and inputs_k is None:
        kv_positions = positions
    inputs_q, inputs_k, inputs_v = resolve_inputs(config, inputs_q, inputs_k, inputs_v)
    if segment_ids is not None:
        mask = with_segments(mask, segment_ids, inputs_q.shape[:2], inputs_k.shape[1])
    y, weights = _forward(
        config, params, inputs_q, inputs_k, inputs_v, mask=mask, is_causal=is_causal,
        scale=config.scale, dropout_rng=dropout_rng, return_weights=return_weights,
        positions=positions, kv_positions=kv_positions, score_mod=score_mod,
        head_offset=head_offset, attention_fn=attention_fn,
    )
    y = add_output_bias(y if reduce is None else reduce(y), params)
    return (y, weights) if return_weights else y


def decode_layer(
    config: AttentionConfig,
    params: Params,
    x: Array,
    cache: kv_cache.KVCache,
    *,
    mask: Array | None = None,
    valid_lengths: Array | None = None,
    kv_heads: tuple[Array | int, int] | None = None,
    reduce: Reduce | None = None,
) -> tuple[Array, kv_cache.KVCache]:
    """:meth:`MultiHeadAttention.decode` on plain arrays, output bias included.

    Args:
      config, params, reduce: as in :func:`attention_layer`; the cache's heads
        must match the kernels' (a head-parallel caller passes local slices of both).
      x: ``[B, t, D]`` new tokens, written to slots ``cache.lengths + arange(t)``
        at positions ``slot - cache.starts`` (left padding, see
        :func:`attention_jax.cache.left_padded`).
      cache: the :class:`~attention_jax.cache.KVCache` before the step.
      mask: optional boolean mask broadcastable to ``[B, N, t, L]``.
      valid_lengths: ``[B]`` real tokens per row among the t (ragged prompts).
      kv_heads: ``(first, count)`` of the kv heads the queries attend to; the
        projections and the cache update cover all kv heads of ``params``
        (see :func:`attention_jax.cache.cached_attention`). Default all.

    Returns:
      ``(y [B, t, Do], updated cache)``.
    """
    check_decode_inputs(config, x, cache, num_kv_heads=params["k_kernel"].shape[1])
    y, cache = _decode(config, params, x, cache, mask=mask, valid_lengths=valid_lengths,
                       kv_heads=kv_heads, scale=config.scale)
    return add_output_bias(y if reduce is None else reduce(y), params), cache


def _decode(config, params, x, cache, *, mask, valid_lengths, kv_heads, scale
            ) -> tuple[Array, kv_cache.KVCache]:
    """Projections, cached attention, output projection: ``([B, t, Do] without o_bias, cache)``."""
    p, dtype = _cast_params(params, x, dtype=config.dtype)
    t = x.shape[1]
    pos = kv_cache.token_positions(cache, t)  # [B, t]: slot minus the row's left padding
    q, k, v = _project_qkv(p, x, x, x, dtype=dtype, rope=config.rope, positions=pos,
                           kv_positions=pos, config=config)
    if config.sliding_window is not None:  # dense [B, 1, t, L]: the kernel skips the blocks
        window = masks.sliding_window_mask(t, cache.max_length, window=config.sliding_window,
                                           offset=cache.lengths)
        mask = window if mask is None else masks.combine_masks(mask, window)
    extra = {name: value for name, value in (
        ("score_mod", _with_softcap(config, None)), ("sinks", p.get("sinks"))) if value is not None}
    out, cache = kv_cache.cached_attention(
        q, k, v, cache, valid_lengths=valid_lengths, mask=mask, scale=scale,
        implementation=config.implementation, kv_heads=kv_heads, **extra,
    )  # [B, t, N, V]
    return ops.merge_heads(out, p["o_kernel"]), cache  # [B, t, Do]


def add_output_bias(y: Array, params: Params) -> Array:
    """``y + o_bias`` (in y's dtype), or ``y`` for a layer without an output bias."""
    bias = params.get("o_bias")
    return y if bias is None else y + bias.astype(y.dtype)


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------


def _forward(config, params, inputs_q, inputs_k, inputs_v, *, mask, is_causal, scale,
             dropout_rng, return_weights, positions, kv_positions, score_mod=None,
             head_offset=0, attention_fn=None) -> tuple[Array, Array | None]:
    """Projections, attention, output projection: ``([B, T, Do] without o_bias, weights)``."""
    p, dtype = _cast_params(params, inputs_q, inputs_k, inputs_v, dtype=config.dtype)
    q, k, v = _project_qkv(p, inputs_q, inputs_k, inputs_v, dtype=dtype, rope=config.rope,
                           positions=positions, kv_positions=kv_positions, config=config)
    mask = _with_window(config, mask, q.shape[1], k.shape[1], positions, kv_positions)
    # The structured-mask options only when used, so the plain call stays the plain call.
    extra = {name: value for name, value in (
        ("score_mod", _with_softcap(config, score_mod)), ("sinks", p.get("sinks")),
        ("q_positions", positions), ("kv_positions", kv_positions),
    ) if value is not None}
    if not (isinstance(head_offset, int) and head_offset == 0):
        extra["head_offset"] = head_offset
    out = (attention_fn or ops.dot_product_attention)(
        q, k, v, mask, is_causal=is_causal, scale=scale,
        dropout_rate=0.0 if dropout_rng is None else config.dropout_rate,
        dropout_rng=dropout_rng, return_weights=return_weights,
        implementation=config.implementation, **extra,
    )
    out, weights = out if return_weights else (out, None)
    return ops.merge_heads(out, p["o_kernel"]), weights  # [B, T, Do]


def _with_softcap(config: AttentionConfig, score_mod):
    """The call's score_mod followed by the config's soft-capping (None when neither)."""
    if config.softcap is None:
        return score_mod
    cap = scores.softcap(config.softcap)
    if score_mod is None:
        return cap
    return lambda s, b, n, t, k: cap(score_mod(s, b, n, t, k), b, n, t, k)


def with_segments(mask, segment_ids, batch_and_T: tuple[int, int], S: int):
    """The call's ``mask`` and :class:`~attention_jax.masks.Segments` of ``segment_ids``
    (``[B, T]``, or ``(q_ids [B, T], kv_ids [B, S])``): a mask object when ``mask`` is
    None or one, else the dense ``[B, ...]`` combination. Raises ValueError naming the
    shapes when the ids do not fit."""
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, None)
    segments = masks.Segments(jnp.asarray(q_ids), None if kv_ids is None else jnp.asarray(kv_ids))
    B, T = batch_and_T
    segments.check(B, 1, T, S)
    if mask is None:
        return segments
    if isinstance(mask, masks.Mask):
        return mask & segments
    return masks.combine_masks(mask, segments.dense(B, 1, T, S))


def _with_window(config: AttentionConfig, mask, T: int, S: int, positions, kv_positions):
    """The call's mask and the config's sliding window (keys ``t - W < s <= t``)."""
    if config.sliding_window is None:
        return mask
    window = masks.SlidingWindow(config.sliding_window - 1)
    if mask is None or isinstance(mask, masks.Mask):
        return window if mask is None else mask & window
    rows = [jnp.shape(p)[0] for p in (positions, kv_positions) if p is not None
            and jnp.ndim(p) == 2]  # [B, T] positions: one window per row
    dense = window.dense(max(rows, default=1), 1, T, S, q_positions=positions,
                         kv_positions=kv_positions)
    return masks.combine_masks(mask, dense)


def _cast_params(params: Params, *inputs: Array, dtype: Any) -> tuple[Params, Any]:
    """Parameters in the computation dtype (default: promoted from inputs and params)."""
    params = {n: params.get(n) for n in ALL_PARAM_AXES}
    arrays = [*inputs, *(p for p in params.values() if p is not None)]
    dtype = jnp.result_type(*arrays) if dtype is None else dtype
    return {n: None if a is None else jnp.asarray(a, dtype) for n, a in params.items()}, dtype


def rms_norm(x: Array, scale: Array, eps: float, *, axes: tuple[int, ...] = (-1,)) -> Array:
    """``x / sqrt(mean(x^2) + eps) * scale`` over ``axes``, the mean in float32.

    ``x [B, T, N, H]`` with ``scale [H]`` (per head, ``axes=(-1,)``) or ``[N, H]``
    (over the whole width, ``axes=(-2, -1)``).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def _qk_norm(x: Array, scale: Array | None, config: AttentionConfig) -> Array:
    if scale is None:
        return x
    axes = (-2, -1) if config.qk_norm == "full" else (-1,)
    if config.qk_norm_offset:  # Gemma 3: x / rms(x) * (1 + w)
        scale = scale + jnp.asarray(config.qk_norm_offset, scale.dtype)
    return rms_norm(x, scale, config.qk_norm_eps, axes=axes)


def _project_qkv(
    p: Params, inputs_q: Array, inputs_k: Array, inputs_v: Array, *, dtype: Any,
    rope: float | rope_lib.Rope | None, positions: Array | None, kv_positions: Array | None,
    config: AttentionConfig | None = None,
) -> tuple[Array, Array, Array]:
    """Projections to heads, qk-norm, rope on q and k: ``[B, T, N, H], [B, S, K, H],
    [B, S, K, V]``."""
    xq, xk, xv = (jnp.asarray(x, dtype) for x in (inputs_q, inputs_k, inputs_v))
    q = ops.project_heads(xq, p["q_kernel"], p["q_bias"])  # [B, T, N, H]
    k = ops.project_heads(xk, p["k_kernel"], p["k_bias"])  # [B, S, K, H]
    v = ops.project_heads(xv, p["v_kernel"], p["v_bias"])  # [B, S, K, V]
    if config is not None and config.qk_norm is not None:
        q, k = _qk_norm(q, p["q_norm"], config), _qk_norm(k, p["k_norm"], config)
    if rope is not None:
        T, S = q.shape[1], k.shape[1]
        positions = jnp.arange(T) if positions is None else positions
        kv_positions = jnp.arange(S) if kv_positions is None else kv_positions
        q = rope_lib.apply_rope(q, positions, rope)
        k = rope_lib.apply_rope(k, kv_positions, rope)
    return q, k, v


# The earlier public functions (attention_forward, decode_forward: without the output
# bias) live in attention_jax.layer_legacy; importable from here as before.
_LEGACY = ("attention_forward", "decode_forward", "_config_from_params")


def __getattr__(name: str):
    if name in _LEGACY:
        from attention_jax import layer_legacy

        return getattr(layer_legacy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
