"""Rotary position embeddings (RoPE), Hugging Face ``rotate_half`` convention.

A head vector ``x [H]`` at position p is split into halves ``x1 = x[:H/2]`` and
``x2 = x[H/2:]``; pair ``(x1_i, x2_i)`` is rotated by the angle ``p * f_i`` with
``f_i = theta ** (-2i / H)``:

.. math::

   \\mathrm{rope}(x, p) = x \\odot \\cos(p f) + \\mathrm{rotate\\_half}(x) \\odot \\sin(p f),
   \\qquad \\mathrm{rotate\\_half}([x_1, x_2]) = [-x_2, x_1]

where ``cos`` / ``sin`` repeat the ``H/2`` angles twice (``cat(freqs, freqs)``), as
``transformers``' Llama does. Rotating q and k by their absolute positions makes
``q_p . k_s`` depend on ``p - s`` only. The angles are computed in float32 and
the result is cast back to the input's dtype.

>>> import jax.numpy as jnp
>>> x = jnp.ones((1, 3, 2, 4))                      # [B, T, N, H]
>>> apply_rope(x, jnp.arange(3), theta=10_000.0).shape
(1, 3, 2, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_THETA = 10_000.0


def check_rope(theta: float | None, head_dim: int) -> None:
    """Validates a rope setting.

    Raises:
      ValueError: when ``theta <= 0`` or when ``head_dim`` is odd (the pairs
        ``(x_i, x_{i + H/2})`` need an even H).
    """
    if theta is None:
        return
    if not theta > 0:
        raise ValueError(f"rope theta must be > 0; got {theta}")
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim; got {head_dim}")


def inv_frequencies(head_dim: int, theta: float = DEFAULT_THETA) -> Array:
    """``theta ** (-arange(0, H, 2) / H)``: ``[H/2]`` float32 angular frequencies."""
    check_rope(theta, head_dim)
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def rope_cos_sin(positions: Array, head_dim: int, theta: float = DEFAULT_THETA
                 ) -> tuple[Array, Array]:
    """Cosines and sines of ``positions * inv_freq``, each half repeated.

    Args:
      positions: integer or float positions of any shape ``P`` (e.g. ``[T]`` or
        ``[B, T]``).
      head_dim: H (even).
      theta: the base.

    Returns:
      ``(cos, sin)``, each ``P + [H]`` float32.
    """
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_frequencies(head_dim, theta)
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # P + [H]
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, positions: Array, theta: float = DEFAULT_THETA) -> Array:
    """Rotates every head of ``x`` by its token's position.

    Args:
      x: ``[B, T, N, H]`` queries or keys (any number of heads).
      positions: ``[T]`` (shared by the batch) or ``[B, T]`` absolute positions.
      theta: the base.

    Returns:
      ``[B, T, N, H]`` in ``x``'s dtype.
    """
    B, T, N, H = x.shape
    positions = jnp.asarray(positions)
    if positions.shape not in ((T,), (1, T), (B, T)):
        raise ValueError(
            f"positions must be [T] or [B, T] = [{B}, {T}]; got shape {positions.shape}"
        )
    cos, sin = rope_cos_sin(positions, H, theta)  # [T | B, T, H] f32
    cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) T, 1, H]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
