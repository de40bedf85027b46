"""Pure attention math: no Flax, no mesh.

Dimension letters, the same in every einsum of the package:

  B batch, T query length, S key/value length, D model width,
  N query heads, K key/value heads (N % K == 0), G = N // K query heads per
  key/value head, H query/key head size, V value head size (``Hv`` in prose).

MHA is K = N, MQA is K = 1, GQA anything between: there is one code path and
the grouping ``[B, T, K, G, H]`` never materialises repeated keys or values.

.. math::

   \\mathrm{attn}(q, k, v)_{t,n} = \\sum_s \\mathrm{softmax}_s\\big(
       \\mathrm{scale}\\; q_{t,n} \\cdot k_{s,\\lfloor n/G \\rfloor} + \\mathrm{bias}
   \\big)\\, v_{s,\\lfloor n/G \\rfloor}

The backend table (``register_implementation``, ``get_implementation``,
``default_implementation``, ...) is in :mod:`attention_jax.backends`, the operand
checks (``check_qkv``, ...) in :mod:`attention_jax.checks`; both are re-exported here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks
from attention_jax.backends import _BUILTIN_IMPLEMENTATIONS as _BUILTIN_IMPLEMENTATIONS
from attention_jax.backends import _USER_IMPLEMENTATIONS as _USER_IMPLEMENTATIONS
from attention_jax.backends import _load_builtin as _load_builtin
from attention_jax.backends import available_implementations as available_implementations
from attention_jax.backends import check_implementation, get_implementation
from attention_jax.backends import default_implementation as default_implementation
from attention_jax.backends import register_implementation as register_implementation
from attention_jax.checks import _check_broadcast, _check_extras, _promote, check_qkv

Array = jax.Array

# Logits of masked-out keys. The float32 minimum (not -inf) keeps a fully
# masked row finite; such rows are zeroed after the softmax.
_MASKED = float(np.finfo(np.float32).min)


def group_heads(x: Array, shape: tuple[int, int, int, int], K: int) -> Array:
    """Broadcasts ``x`` (to ``[B, N, T, S]``) and splits N into ``[K, G]``.

    A head dimension of 1 stays 1 (no copy per head): ``[B|1, K|1, G|1, T|1, S|1]``.
    """
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    b, n, t, s = x.shape
    if n == 1:
        return x.reshape(b, 1, 1, t, s)
    return x.reshape(b, K, shape[1] // K, t, s)


# ---------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------


def default_scale(head_dim: int) -> float:
    """``1 / sqrt(head_dim)``, the scale of "Attention Is All You Need"."""
    return 1.0 / math.sqrt(head_dim)


def causal_block(T: int, S: int) -> Array:
    """Top-left aligned causal mask ``[T, S]``: query t sees keys s <= t.

    This is the convention of ``torch.nn.functional.scaled_dot_product_attention``
    and ``jax.nn.dot_product_attention`` for ``is_causal=True``; it is
    :func:`attention_jax.masks.causal_mask` (the one implementation) without
    the broadcast dims. Decoding, whose queries sit at the end of the keys, uses
    ``causal_mask`` with an offset instead.

    >>> causal_block(2, 3).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0]]
    """
    return masks.causal_mask(T, S)[0, 0]


def attention_logits(q: Array, k: Array, *, scale: float | None = None) -> Array:
    """Scaled scores in float32.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys, N % K == 0.
      scale: multiplies the scores; default ``1/sqrt(H)``.

    Returns:
      ``[B, K, G, T, S]`` float32 logits (G = N // K).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = default_scale(H) if scale is None else scale
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    return logits * jnp.float32(scale)


def attention_weights(
    logits: Array,
    mask: Array | None = None,
    sinks: Array | None = None,
) -> Array:
    """Softmax over keys in float32; rows with no visible key become zeros.

    Args:
      logits: ``[..., T, S]`` float32 scores (bias already added).
      mask: boolean, broadcastable to ``logits``; True = attend.
      sinks: logits broadcastable to ``logits[..., :1]`` that join each row's
        denominator and carry no value (attention sinks).

    Returns:
      float32 weights of the shape of ``logits`` (with sinks they sum to less than 1).
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32), (*logits.shape[:-1], 1))
        weights = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    else:
        weights = jax.nn.softmax(logits, axis=-1)
    if mask is None:
        return weights
    # A fully masked row has a uniform softmax over _MASKED logits; zero it (and
    # every masked entry, which is already 0 in a row that sees any key).
    return jnp.where(mask, weights, 0.0)


def combine_values(weights: Array, v: Array, out_dtype) -> Array:
    """``[B, K, G, T, S] x [B, S, K, V] -> [B, T, N, V]``."""
    B, K, G, T, S = weights.shape
    out = jnp.einsum(
        "BKGTS,BSKV->BTKGV", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(B, T, K * G, v.shape[-1]).astype(out_dtype)


def attention_core(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | masks.Mask | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    logits_fn: Callable[..., Array] | None = None,
    combine_fn: Callable[..., Array] | None = None,
    score_mod: Callable[..., Array] | None = None,
    sinks: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    head_offset=0,
) -> Array:
    """The einsum ("xla") implementation without dropout or returned weights.

    Operands are already validated by :func:`dot_product_attention`; this
    signature up to ``scale`` is the one a registered implementation must have.

    Args:
      logits_fn, combine_fn: replacements for :func:`attention_logits` and
        :func:`combine_values` (same signatures and results) that contract in
        another way; masks, bias and the softmax stay these. Used by
        :mod:`attention_jax.kernels.decode`.
      score_mod, sinks, q_positions, kv_positions, head_offset: as in
        :func:`dot_product_attention` (mask objects become ``mask.dense`` here).
    """
    out, _ = _einsum_attention(q, k, v, mask, bias, is_causal=is_causal, scale=scale,
                               logits_fn=logits_fn, combine_fn=combine_fn, score_mod=score_mod,
                               sinks=sinks, q_positions=q_positions, kv_positions=kv_positions,
                               head_offset=head_offset)
    return out


def score_index(B: int, N: int, T: int, S: int, K: int, *, q_positions=None, kv_positions=None,
                head_offset=0) -> masks.Index:
    """The :class:`attention_jax.masks.Index` of ``[B, K, G, T, S]`` grouped scores."""
    idx = masks.dense_index(B, N, T, S, q_positions=q_positions, kv_positions=kv_positions,
                            head_offset=head_offset)
    G = N // K

    def g(x):  # [b, n|1, t, s] -> [b, K|1, G|1, t, s]
        b, n, t, s_ = x.shape
        return x.reshape(b, 1, 1, t, s_) if n == 1 else x.reshape(b, K, G, t, s_)

    return masks.Index(*(g(x) for x in (idx.b, idx.n, idx.q_pos, idx.kv_pos, idx.q_idx,
                                         idx.kv_idx)))


def _einsum_attention(
    q, k, v, mask, bias, *, is_causal, scale, dropout_rate=0.0, dropout_rng=None,
    logits_fn=None, combine_fn=None, score_mod=None, sinks=None, q_positions=None,
    kv_positions=None, head_offset=0,
) -> tuple[Array, Array]:
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    shape = (B, N, T, S)
    logits = (logits_fn or attention_logits)(q, k, scale=scale)  # [B, K, G, T, S]
    if bias is not None:
        logits = logits + group_heads(bias.astype(jnp.float32), shape, K)
    positioned = q_positions is not None or kv_positions is not None
    idx = None
    if score_mod is not None or isinstance(mask, masks.Mask) or (is_causal and positioned):
        idx = score_index(B, N, T, S, K, q_positions=q_positions, kv_positions=kv_positions,
                          head_offset=head_offset)
    if score_mod is not None:
        logits = jnp.broadcast_to(
            score_mod(logits, idx.b, idx.n, idx.q_pos, idx.kv_pos), logits.shape
        ).astype(jnp.float32)
    if isinstance(mask, masks.Mask):
        full_mask = mask.evaluate(idx)  # [B|1, K|1, G|1, T|1, S|1]
    else:
        full_mask = None if mask is None else group_heads(mask.astype(bool), shape, K)
    if is_causal:
        causal = masks.Causal().evaluate(idx) if positioned else causal_block(T, S)
        full_mask = causal if full_mask is None else full_mask & causal
    sinks_g = None if sinks is None else sinks.reshape(1, K, N // K, 1, 1)
    weights = attention_weights(logits, full_mask, sinks_g)  # [B, K, G, T, S] f32
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = (combine_fn or combine_values)(weights, v, q.dtype)  # [B, T, N, V]
    return out, weights


_STRUCTURED_BACKENDS = ("xla", "blockwise", "cudnn", "auto")


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | masks.Mask | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
    remat: bool = False,
    score_mod: Callable[..., Array] | None = None,
    sinks: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    head_offset: int | Array = 0,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention for MHA, MQA and GQA.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys; N must be a multiple of K.
      v: ``[B, S, K, V]`` values (V may differ from H). Integer or boolean q, k, v
        are promoted to float32 (and so is the output).
      mask: boolean, broadcastable to ``[B, N, T, S]``, True = attend; or a mask
        object of :mod:`attention_jax.masks` (``Causal() & SlidingWindow(512)``,
        ``Segments(ids)``, ...), which the blockwise kernel evaluates per tile,
        skipping the tiles it hides.
      bias: float, broadcastable to ``[B, N, T, S]``; added to the scaled logits.
      is_causal: also apply ``Causal()`` at the positions (top-left aligned by
        default: query t sees keys s <= t), as ``torch`` and ``jax.nn`` do.
      scale: logit scale; default ``1/sqrt(H)``. A Python number or a traced
        scalar; any value (zero and negative included).
      dropout_rate: dropout on the attention weights (needs ``dropout_rng``).
      dropout_rng: PRNG key for dropout.
      return_weights: also return the weights actually applied to the values
        (after mask and dropout), ``[B, N, T, S]`` in float32.
      implementation: ``"xla"`` (the einsum path), or a name added by
        :func:`register_implementation` (``"blockwise"``, ``"cudnn"``, ``"auto"``,
        see :mod:`attention_jax.kernels`); ``None`` is :func:`default_implementation`.
        Dropout and returned weights always use the einsum path.
      remat: wrap the attention in ``jax.checkpoint``: the backward pass
        recomputes it instead of keeping its intermediates (for the einsum path,
        the ``[B, N, T, S]`` weights).
      score_mod: ``fn(score, b, n, t, s) -> score`` applied to the scaled (and
        biased) float32 logits before masking and softmax; ``b`` batch row, ``n``
        global head, ``t`` / ``s`` absolute positions (broadcasting int32 arrays).
        Differentiable, also with respect to the arrays it closes over
        (:mod:`attention_jax.scores`: ``softcap``, ``alibi``).
      sinks: ``[N]`` float logits, one per query head, that join every row's
        softmax denominator and carry no value (attention sinks); differentiable.
      q_positions: ``[T]`` or ``[B, T]`` absolute positions of the queries
        (default ``arange(T)``), what mask objects, ``is_causal`` and score_mod see:
        a decode step passes its cache positions, a context-parallel shard its own.
      kv_positions: ``[S]`` or ``[B, S]`` absolute positions of the keys.
      head_offset: added to the local head index before masks and score_mod see
        it (an int or a traced scalar): a head-parallel shard holding heads
        ``[h0, h0 + N)`` passes ``h0``.

    Returns:
      ``[B, T, N, V]`` in q's dtype, and the weights when ``return_weights``.

    Softmax runs in float32 whatever the input dtype. A query row that sees no
    key (every key masked) returns zeros, not NaN.

    >>> import jax, jax.numpy as jnp
    >>> q = jnp.ones((2, 5, 8, 16)); kv = jnp.ones((2, 7, 2, 16))   # GQA: N=8, K=2
    >>> dot_product_attention(q, kv, kv).shape
    (2, 5, 8, 16)
    >>> from attention_jax import masks
    >>> dot_product_attention(q, kv, kv, mask=masks.Causal() & masks.SlidingWindow(3)).shape
    (2, 5, 8, 16)
    """
    q, k, v = _promote(q), _promote(k), _promote(v)
    B, T, S, N, K, H, V = check_qkv(q, k, v)
    structured = isinstance(mask, masks.Mask)
    if not structured:
        _check_broadcast("mask", mask, (B, N, T, S))
    _check_broadcast("bias", bias, (B, N, T, S))
    if mask is not None and not structured and mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = attend); got dtype {mask.dtype}")
    _check_extras(q, k, mask, sinks, scale, N)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng")
    impl = check_implementation(implementation)
    extras = {name: val for name, val, default in (
        ("score_mod", score_mod, None), ("sinks", sinks, None),
        ("q_positions", q_positions, None), ("kv_positions", kv_positions, None),
        ("head_offset", head_offset, 0)) if val is not default}
    if isinstance(head_offset, int) and head_offset == 0:
        extras.pop("head_offset", None)
    if return_weights or dropout_rate > 0.0 or impl == "xla":
        def fn(q, k, v, mask, bias, dropout_rng):
            return _einsum_attention(
                q, k, v, mask, bias, is_causal=is_causal, scale=scale,
                dropout_rate=dropout_rate, dropout_rng=dropout_rng, **extras,
            )

        out, weights = (jax.checkpoint(fn) if remat else fn)(q, k, v, mask, bias, dropout_rng)
        if return_weights:
            return out, weights.reshape(B, N, T, S)
        return out
    if impl not in _STRUCTURED_BACKENDS and (structured or extras):
        mask, is_causal_, extras = _densify(impl, q, k, mask, is_causal, extras)
    else:
        is_causal_ = is_causal
    fn = functools.partial(get_implementation(impl), is_causal=is_causal_, scale=scale, **extras)
    return (jax.checkpoint(fn) if remat else fn)(q, k, v, mask, bias)


def _densify(impl, q, k, mask, is_causal, extras):
    """For backends that take only dense masks: the mask object (and ``is_causal``)
    evaluated at the positions; score_mod and sinks are refused."""
    unsupported = sorted(set(extras) & {"score_mod", "sinks"})
    if unsupported:
        raise ValueError(
            f"implementation {impl!r} does not take {', '.join(unsupported)}; "
            f"use one of {_STRUCTURED_BACKENDS}")
    B, T, N = q.shape[:3]
    S = k.shape[1]
    where = dict(q_positions=extras.get("q_positions"), kv_positions=extras.get("kv_positions"),
                 head_offset=extras.get("head_offset", 0))
    structure = mask if isinstance(mask, masks.Mask) else None
    dense = None if structure is not None else mask
    if is_causal:
        structure = masks.Causal() if structure is None else structure & masks.Causal()
    if structure is not None:
        m = structure.dense(B, N, T, S, **where)
        dense = m if dense is None else dense & m
    return dense, False, {}


# ---------------------------------------------------------------------------
# Projections (used by the module and, with local slices, by the sharded path)
# ---------------------------------------------------------------------------


def project_heads(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """``[B, T, D] x [D, N, H] (+ [N, H]) -> [B, T, N, H]``."""
    y = jnp.einsum("BTD,DNH->BTNH", x, kernel)
    return y if bias is None else y + bias


def merge_heads(x: Array, kernel: Array) -> Array:
    """``[B, T, N, V] x [N, V, D] -> [B, T, D]`` (output projection, no bias).

    The bias is left out so that a head-parallel caller can sum the partial
    products of its heads first and add the bias once.
    """
    return jnp.einsum("BTNV,NVD->BTD", x, kernel)
