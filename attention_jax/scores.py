"""Built-in score modifiers for ``score_mod=`` (``fn(score, b, n, t, s) -> score``).

A score_mod receives the scaled float32 logits and broadcasting int32 index arrays:
``b`` batch row, ``n`` global head (``head_offset`` + local head), ``t`` / ``s``
absolute query / key positions; it runs before masking and softmax, in every
backend, and is differentiable, also with respect to the arrays it closes over.

>>> import jax.numpy as jnp
>>> float(softcap(2.0)(jnp.float32(100.0), 0, 0, 0, 0))
2.0
>>> alibi(jnp.array([0.5]))(jnp.zeros((1, 3)), 0, 0, jnp.array([[2]]), jnp.arange(3)).tolist()
[[-1.0, -0.5, 0.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def softcap(cap: float):
    """``cap * tanh(score / cap)`` (Gemma 2's logit soft-capping); ``cap > 0``."""
    if not cap > 0:
        raise ValueError(f"softcap cap must be > 0; got {cap}")

    def mod(score, b, n, t, s):
        return cap * jnp.tanh(score / cap)

    return mod


def alibi(slopes: Array):
    """ALiBi: ``score + slopes[n] * (s - t)`` (a linear penalty on distance, per head).

    Args:
      slopes: ``[N]`` float slopes indexed by the global head (learnable: the
        gradient flows to them); :func:`alibi_slopes` gives the paper's.
    """
    slopes = jnp.asarray(slopes)
    if slopes.ndim != 1:
        raise ValueError(f"alibi slopes must be [num_heads]; got shape {slopes.shape}")

    def mod(score, b, n, t, s):
        n = jnp.clip(jnp.asarray(n), 0, slopes.shape[0] - 1)
        return score + slopes[n].astype(jnp.float32) * (s - t).astype(jnp.float32)

    return mod


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The geometric slopes of Press et al. (2022): ``2 ** (-8 (i + 1) / N)`` for N a power of 2.

    >>> alibi_slopes(2).tolist()
    [0.0625, 0.00390625]
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    p = 2 ** int(np.floor(np.log2(num_heads)))
    base = 2.0 ** (-8.0 / p)
    slopes = base ** np.arange(1, p + 1)
    if p < num_heads:  # the paper's interleaving for other head counts
        extra = (2.0 ** (-4.0 / p)) ** np.arange(1, 2 * (num_heads - p) + 1, 2)
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)
