"""Dynamic head gating: a gate per batch row and head from the mean-pooled input.

.. math::

   g_{b,n} = \\sigma\\big((\\tfrac{1}{T}\\textstyle\\sum_t x_{b,t})\\, W_g + b_g\\big)_n,
   \\qquad y = \\mathrm{merge}(g \\odot \\mathrm{heads}(x)) + b_o

*Soft* gating scales each head's output by ``g`` before the output projection.
*Hard* gating uses ``1[g > threshold]`` in the forward pass and the gradient of
``g`` in the backward pass (straight-through estimator), so the gate still learns.
Gates of exactly 1 give :class:`~attention_jax.MultiHeadAttention`'s output exactly.

The gate pools the whole sequence (seed 002's design), so under ``is_causal`` a
row's gates depend on its future tokens; there is no decode step.

**Skipping inactive heads.** XLA does not skip work multiplied by zero: under
``jit`` or ``grad`` the gates are traced, every head is computed and the inactive
ones are zeroed. When ``hard`` and the gates are concrete (an eager call), only
the heads active in some row of the batch are projected and attended
(:func:`select_heads` keeps the GQA grouping: inactive kv groups are dropped and
every kept group is cut to the largest number of active heads in a group).
:func:`gated_attention_forward` with a fixed ``selection`` is the same
computation as a static-shape program to ``jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import ops
from attention_jax.modules import MultiHeadAttention
from attention_jax.variants import common

Array = jax.Array
Selection = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]


def head_gates(x: Array, kernel: Array, bias: Array | None = None) -> Array:
    """``sigmoid(mean_t(x) W + b)``: ``[B, T, D] x [D, N] (+ [N]) -> [B, N]`` float32."""
    pooled = x.astype(jnp.float32).mean(axis=1)  # [B, D]
    logits = jnp.einsum("BD,DN->BN", pooled, kernel.astype(jnp.float32))
    return jax.nn.sigmoid(logits if bias is None else logits + bias.astype(jnp.float32))


def hard_gates(gates: Array, threshold: float) -> Array:
    """``1[gates > threshold]`` forward, the gradient of ``gates`` backward (STE)."""
    hard = (gates > threshold).astype(gates.dtype)
    return hard + (gates - jax.lax.stop_gradient(gates))


def select_heads(active: np.ndarray, num_kv_heads: int) -> Selection:
    """Which heads to compute for a ``[N]`` (or ``[B, N]``: any row) activity pattern.

    Returns:
      ``(kv_heads, query_heads)``: the K' kv heads with an active query head, and
      for each a run of G' query head indices (G' = the most active heads in one
      group; a group with fewer is filled with its inactive heads, which the
      gates then zero). ``((), ())`` when no head is active.

    >>> select_heads(np.array([0, 1, 0, 0, 1, 1, 0, 0], bool), num_kv_heads=4)  # G = 2
    ((0, 2), ((1, 0), (4, 5)))
    """
    active = np.asarray(active, bool)
    active = active.any(axis=0) if active.ndim == 2 else active
    N = active.shape[0]
    groups = active.reshape(num_kv_heads, N // num_kv_heads)  # [K, G]
    kv = np.flatnonzero(groups.any(axis=1))
    if kv.size == 0:
        return (), ()
    width = int(groups[kv].sum(axis=1).max())
    G = N // num_kv_heads
    rows = tuple(
        tuple(int(j * G + h) for h in np.concatenate(
            [np.flatnonzero(groups[j]), np.flatnonzero(~groups[j])])[:width])
        for j in kv)
    return tuple(int(j) for j in kv), rows


def gated_attention_forward(
    params: dict[str, Array | None], inputs_q: Array, inputs_k: Array, inputs_v: Array,
    gates: Array, *, selection: Selection | None = None, mask: Array | None = None,
    is_causal: bool = False, scale: float | None = None, implementation: str | None = None,
    rope: float | None = None, dtype: Any = None,
) -> Array:
    """Gated multi-head attention on plain arrays (output bias included).

    Args:
      params: the module's parameters by name (``PARAM_AXES``; biases may be None).
      inputs_q: ``[B, T, D]``; inputs_k ``[B, S, Dk]``; inputs_v ``[B, S, Dv]``.
      gates: ``[B, N]`` multipliers of the heads' outputs.
      selection: from :func:`select_heads`: compute only these heads (the others
        must have gate 0 in every row, or the result differs); None = all.
      mask: boolean, broadcastable to ``[B, N, T, S]``.

    Returns:
      ``[B, T, Do]``.
    """
    p, _ = common.cast_params(params, inputs_q, inputs_k, inputs_v, dtype=dtype)
    N = p["q_kernel"].shape[1]
    if selection is not None:
        kv, rows = selection
        if not kv:  # no head active anywhere: only the output bias is left
            y = jnp.zeros((*inputs_q.shape[:2], p["o_kernel"].shape[-1]), p["o_kernel"].dtype)
            return y if p["o_bias"] is None else y + p["o_bias"]
        heads = np.asarray(rows).reshape(-1)  # [K' * G']
        kv = np.asarray(kv)
        p = {**p, "q_kernel": p["q_kernel"][:, heads], "k_kernel": p["k_kernel"][:, kv],
             "v_kernel": p["v_kernel"][:, kv], "o_kernel": p["o_kernel"][heads]}
        for name, idx in (("q_bias", heads), ("k_bias", kv), ("v_bias", kv)):
            if p[name] is not None:
                p[name] = p[name][idx]
        gates = gates[:, heads]
        if mask is not None and mask.ndim >= 3 and mask.shape[-3] == N > 1:
            mask = jnp.take(mask, heads, axis=-3)
    q, k, v = common.project_qkv(p, inputs_q, inputs_k, inputs_v, rope=rope)
    out = ops.dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale,
                                    implementation=implementation)  # [B, T, n, V]
    out = out * gates.astype(out.dtype)[:, None, :, None]
    return common.output(p, out)


class HeadGatedAttention(MultiHeadAttention):
    """:class:`~attention_jax.MultiHeadAttention` whose heads are gated per input.

    Adds ``gate_kernel [D, N]`` (zeros) and ``gate_bias [N]`` (``gate_bias_init``,
    so all gates start at ``sigmoid(gate_bias_init)`` and every head is active).

    Args:
      in_features, num_heads: as :class:`~attention_jax.MultiHeadAttention`.
      threshold: a hard gate is on when ``g > threshold``.
      hard: 0/1 gates with a straight-through gradient (else soft scaling).
      gate_bias_init: initial gate logit.
      **kwargs: the parent's (``num_kv_heads``, ``rope``, ``implementation``,
        ``rngs`` ...); dropout is not supported.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> m = HeadGatedAttention(32, 4, num_kv_heads=2, hard=True, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 6, 32))
    >>> m(x).shape, m.head_gates(x).shape
    ((2, 6, 32), (2, 4))
    """

    def __init__(self, in_features: int, num_heads: int, *, threshold: float = 0.5,
                 hard: bool = False, gate_bias_init: float = 2.0, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, num_heads, rngs=rngs, **kwargs)
        common.check_no_dropout("HeadGatedAttention", self.dropout_rate)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) (gates are sigmoids); got {threshold}")
        self.threshold = threshold
        self.hard = hard
        self.gate_kernel = nnx.Param(jnp.zeros((in_features, num_heads), self.param_dtype))
        self.gate_bias = nnx.Param(jnp.full((num_heads,), gate_bias_init, self.param_dtype))

    def head_gates(self, inputs_q: Array) -> Array:
        """Soft gates ``[B, N]`` (before thresholding) for ``inputs_q [B, T, D]``."""
        return head_gates(inputs_q, self.gate_kernel[...], self.gate_bias[...])

    def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
                 inputs_v: Array | None = None, *, mask: Array | None = None,
                 is_causal: bool = False, deterministic: bool | None = None,
                 return_weights: bool = False, gates: Array | None = None) -> Array:
        """``[B, T, D]`` -> ``[B, T, Do]``.

        Args:
          gates: ``[B, N]`` gates to use instead of :meth:`head_gates` (before
            thresholding when ``hard``).
        """
        del deterministic  # no dropout: accepted for MultiHeadAttention's signature
        if return_weights:
            raise ValueError("HeadGatedAttention returns no weights")
        inputs_q, inputs_k, inputs_v = self.resolve_inputs(inputs_q, inputs_k, inputs_v)
        g = self.head_gates(inputs_q) if gates is None else gates
        if g.shape != (inputs_q.shape[0], self.num_heads):
            raise ValueError(f"gates must be [B, N] = [{inputs_q.shape[0]}, {self.num_heads}]; "
                             f"got {tuple(g.shape)}")
        selection = None
        if self.hard:
            g = hard_gates(g, self.threshold)
            try:  # concrete gates (eager call): compute the active heads only
                selection = select_heads(np.asarray(g) > 0, self.num_kv_heads)
            except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
                selection = None
        return gated_attention_forward(
            self.param_values(), inputs_q, inputs_k, inputs_v, g, selection=selection,
            mask=mask, is_causal=is_causal, scale=self.scale,
            implementation=self.implementation, rope=self.rope, dtype=self.dtype)

    def init_cache(self, *args, **kwargs):
        raise NotImplementedError("HeadGatedAttention pools the whole input: no decode step")

    def decode(self, *args, **kwargs):
        raise NotImplementedError("HeadGatedAttention pools the whole input: no decode step")
