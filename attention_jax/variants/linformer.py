"""Linformer: keys and values projected along the sequence (Wang et al., 2020).

Softmax attention costs ``T x S`` because every query meets every key. Linformer
multiplies the S keys and values by learned ``[P, S]`` matrices ``E`` and ``F``
first, so each query meets P "summary" keys:

.. math::

   \\mathrm{linformer}(q, k, v) = \\mathrm{softmax}\\big(\\mathrm{scale}\\;
       q\\,(E k)^\\top\\big)\\,(F v), \\qquad E, F \\in \\mathbb{R}^{P \\times S}

Cost and memory are ``T x P`` instead of ``T x S``. ``E`` and ``F`` are stored
at ``[P, max_length]`` and sliced to the first S columns, so shorter inputs work.

**Non-causal only.** Each projected key ``(E k)_p = sum_s E[p, s] k_s`` mixes
every position, the future included, so no mask over the P summaries can stop a
query at t from seeing keys after t. A causal Linformer needs a projection per
prefix (cumulative sums), which gives up the fixed ``P`` memory; use
:mod:`attention_jax.variants.linear` for causal linear-cost attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import ops
from attention_jax.modules import MultiHeadAttention
from attention_jax.variants import common

Array = jax.Array


def linformer_attention(q: Array, k: Array, v: Array, e: Array, f: Array | None = None, *,
                        scale: float | None = None, implementation: str | None = "xla"
                        ) -> Array:
    """Softmax attention of q to the sequence projections ``E k`` and ``F v``.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys (N % K == 0: GQA and MQA group as everywhere).
      v: ``[B, S, K, V]`` values.
      e: ``[P, L]`` key projection, L >= S; its first S columns are used.
      f: ``[P, L]`` value projection; None shares ``e`` (``share_kv``).
      scale: logit scale; default ``1/sqrt(H)``.
      implementation: passed to :func:`attention_jax.ops.dot_product_attention`
        for the ``T x P`` attention.

    Returns:
      ``[B, T, N, V]`` in q's dtype.

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((2, 6, 4, 8)); kv = jnp.ones((2, 6, 2, 8))     # GQA, S = 6
    >>> linformer_attention(q, kv, kv, jnp.ones((3, 16)) / 6).shape  # P = 3, L = 16
    (2, 6, 4, 8)
    """
    ops.check_qkv(q, k, v)
    f = e if f is None else f
    S = k.shape[1]
    for name, m in (("e", e), ("f", f)):
        if m.ndim != 2 or m.shape[1] < S:
            raise ValueError(f"{name} must be [projected_length, max_length] with max_length >= "
                             f"S = {S}; got shape {tuple(m.shape)}")
    if e.shape[0] != f.shape[0]:
        raise ValueError(f"e and f project to different lengths: {e.shape[0]} != {f.shape[0]}")
    kp = jnp.einsum("PS,BSKH->BPKH", e[:, :S].astype(k.dtype), k)  # [B, P, K, H]
    vp = jnp.einsum("PS,BSKV->BPKV", f[:, :S].astype(v.dtype), v)  # [B, P, K, V]
    return ops.dot_product_attention(q, kp, vp, scale=scale, implementation=implementation)


class LinformerAttention(MultiHeadAttention):
    """:class:`~attention_jax.MultiHeadAttention` with Linformer's sequence projections.

    Same projections (``q_kernel`` ... ``o_bias``) as the parent, plus
    ``e_proj [P, L]`` and, unless ``share_kv``, ``f_proj [P, L]``, initialised
    ``N(0, 1/P)`` as in the paper. GQA / MQA through ``num_kv_heads``.

    Args:
      in_features, num_heads: as :class:`~attention_jax.MultiHeadAttention`.
      max_length: L, the longest key sequence.
      projected_length: P.
      share_kv: one projection for keys and values (``f_proj`` is None).
      **kwargs: the parent's (``num_kv_heads``, ``head_dim``, ``use_bias``,
        ``rope``, ``rngs`` ...); dropout is not supported.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> m = LinformerAttention(32, 4, max_length=64, projected_length=8, num_kv_heads=2,
    ...                        rngs=nnx.Rngs(0))
    >>> m(jnp.ones((2, 40, 32))).shape, m.e_proj.shape
    ((2, 40, 32), (8, 64))
    """

    def __init__(self, in_features: int, num_heads: int, *, max_length: int,
                 projected_length: int, share_kv: bool = False, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, num_heads, rngs=rngs, **kwargs)
        common.check_no_dropout("LinformerAttention", self.dropout_rate)
        if not 1 <= projected_length <= max_length:
            raise ValueError(f"need 1 <= projected_length <= max_length; got projected_length="
                             f"{projected_length}, max_length={max_length}")
        self.max_length = max_length
        self.projected_length = projected_length
        self.share_kv = share_kv
        init = nnx.initializers.normal(stddev=projected_length ** -0.5)
        shape = (projected_length, max_length)
        self.e_proj = nnx.Param(init(rngs.params(), shape, self.param_dtype))
        self.f_proj = None if share_kv else nnx.Param(
            init(rngs.params(), shape, self.param_dtype))

    def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
                 inputs_v: Array | None = None, *, mask: Array | None = None,
                 is_causal: bool = False, deterministic: bool | None = None,
                 return_weights: bool = False) -> Array:
        """``[B, T, D]`` (keys/values ``[B, S, Dk|Dv]``, S <= max_length) -> ``[B, T, Do]``.

        Raises:
          ValueError: for ``is_causal=True`` (see the module doc), a mask, or S > max_length.
        """
        if is_causal:
            raise ValueError("LinformerAttention is non-causal: every projected key mixes all "
                             "positions, the future included (see attention_jax.variants."
                             "linformer); use LinearAttention for causal linear-cost attention")
        del deterministic  # no dropout: accepted for MultiHeadAttention's signature
        if mask is not None or return_weights:
            raise ValueError("LinformerAttention takes no mask and returns no [T, S] weights")
        inputs_q, inputs_k, inputs_v = self.resolve_inputs(inputs_q, inputs_k, inputs_v)
        S = inputs_k.shape[1]
        if S > self.max_length:
            raise ValueError(f"key length {S} > max_length {self.max_length}")
        p, _ = common.cast_params(self.param_values(), inputs_q, inputs_k, inputs_v,
                                  dtype=self.dtype)
        q, k, v = common.project_qkv(p, inputs_q, inputs_k, inputs_v, rope=self.rope)
        e = self.e_proj[...]
        f = None if self.f_proj is None else self.f_proj[...]
        impl = "xla" if self.implementation is None else self.implementation
        heads = linformer_attention(q, k, v, e, f, scale=self.scale, implementation=impl)
        return common.output(p, heads)

    def init_cache(self, *args, **kwargs):
        raise NotImplementedError("LinformerAttention is non-causal: there is no decode step")

    def decode(self, *args, **kwargs):
        raise NotImplementedError("LinformerAttention is non-causal: there is no decode step")
