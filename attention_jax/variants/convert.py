"""Moving trained projections between :class:`~attention_jax.MultiHeadAttention` and the variants.

Every variant has the module's projection parameters (same names and shapes),
so a conversion copies ``q_kernel`` ... ``o_bias`` and initialises only what the
variant adds: Linformer's ``e_proj`` / ``f_proj`` (``N(0, 1/P)``) and the
gates' ``gate_kernel`` (zeros) / ``gate_bias`` (``gate_bias_init``).

What is preserved:

* ``"gated"``: with ``hard=True`` the gates start above ``threshold`` (the
  default bias 2.0 gives 0.88 > 0.5), so the converted module equals the MHA
  exactly until training turns heads off; :func:`to_mha` drops the gates (exact
  while every gate is on).
* ``"linear"`` and ``"linformer"``: the attention itself changes (no softmax /
  projected keys), so outputs differ; the projections are a starting point for
  fine-tuning. :func:`to_mha` returns their projections in a plain MHA.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> from attention_jax import MultiHeadAttention
>>> mha = MultiHeadAttention(32, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
>>> gated = from_mha(mha, "gated", hard=True)
>>> x = jnp.ones((1, 5, 32))
>>> bool((gated(x) == mha(x)).all()), type(to_mha(gated)).__name__
(True, 'MultiHeadAttention')
"""

from __future__ import annotations

from flax import nnx

from attention_jax.modules import PARAM_AXES, MultiHeadAttention
from attention_jax.variants import common
from attention_jax.variants.gated import HeadGatedAttention
from attention_jax.variants.linear import LinearAttention
from attention_jax.variants.linformer import LinformerAttention

KINDS: dict[str, type[MultiHeadAttention]] = {
    "linear": LinearAttention,
    "gated": HeadGatedAttention,
    "linformer": LinformerAttention,
}


def _copy_projections(src: MultiHeadAttention, dst: MultiHeadAttention) -> None:
    for name in PARAM_AXES:
        old = getattr(src, name)
        if old is not None:
            getattr(dst, name)[...] = old[...]


def from_mha(module: MultiHeadAttention, kind: str, *, rngs: nnx.Rngs | None = None, **kwargs
             ) -> MultiHeadAttention:
    """A variant with ``module``'s projections (``module`` is left as is).

    Args:
      module: a :class:`~attention_jax.MultiHeadAttention` (MHA, GQA or MQA).
      kind: ``"linear"``, ``"gated"`` or ``"linformer"``.
      rngs: for the variant's new parameters (Linformer's projections); default
        ``nnx.Rngs(0)``.
      **kwargs: the variant's own arguments (``max_length`` and
        ``projected_length`` for Linformer, ``hard`` / ``threshold`` for gated,
        ``feature_map`` for linear); they may also override the copied layout
        (e.g. ``rope=None`` for linear attention).

    Raises:
      ValueError: for an unknown ``kind``, or when the layout does not suit the
        variant (dropout, or rope / a custom scale for linear attention).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}; got {kind!r}")
    config = {**common.mha_config(module), **kwargs}
    new = KINDS[kind](module.in_features, module.num_heads, rngs=rngs or nnx.Rngs(0), **config)
    _copy_projections(module, new)
    return new


def to_mha(module: MultiHeadAttention) -> MultiHeadAttention:
    """A plain :class:`~attention_jax.MultiHeadAttention` with a variant's projections.

    Exact for a gated module whose gates are all on (hard) or all 1 (soft); for
    the linear and Linformer variants it keeps the projections, not the outputs.
    """
    new = MultiHeadAttention(module.in_features, module.num_heads, rngs=nnx.Rngs(0),
                             **common.mha_config(module))
    _copy_projections(module, new)
    return new
