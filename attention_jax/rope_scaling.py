"""Inverse frequencies of the rope scalings of ``transformers.modeling_rope_utils``.

Each function returns the ``[R/2]`` angular frequencies of a rotary size R (``rotary_dim``,
even), following the ``ROPE_INIT_FUNCTIONS`` of Hugging Face transformers formula for
formula; the static ones are computed in float64 NumPy (then rounded once to float32 by
the caller), the length-dependent ones (``dynamic``, ``longrope``) take the current
sequence length as a possibly traced scalar.

================  ==============================================================
scaling           ``inv_freq[i]`` with ``f_i = theta ** (-2i / R)``
================  ==============================================================
``none``          ``f_i``
``linear``        ``f_i / factor``
``dynamic``       ``f_i`` with theta replaced by ``theta * (factor * L / L0 - factor + 1)
                  ** (R / (R - 2))``, ``L = max(seq_len, L0)``, ``L0`` the original length
``llama3``        ``f_i / factor`` for long wavelengths, ``f_i`` for short ones, a smooth
                  blend between (``low_freq_factor``, ``high_freq_factor``)
``yarn``          a ramp from ``f_i`` (fast dims) to ``f_i / factor`` (slow dims) between
                  the correction dims of ``beta_fast`` and ``beta_slow``
``longrope``      ``f_i / short_factor[i]`` while ``seq_len <= L0``, else ``/ long_factor[i]``
================  ==============================================================

>>> import numpy as np
>>> np.round(linear_inv_freq(4, 100.0, factor=2.0), 4).tolist()
[0.5, 0.05]
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def default_inv_freq(dim: int, theta: float) -> np.ndarray:
    """``theta ** (-arange(0, R, 2) / R)``: ``[R/2]`` float64."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def linear_inv_freq(dim: int, theta: float, *, factor: float) -> np.ndarray:
    """Position interpolation: every frequency divided by ``factor``; ``[R/2]`` float64."""
    return default_inv_freq(dim, theta) / factor


def llama3_inv_freq(dim: int, theta: float, *, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (``_compute_llama3_parameters``); float64."""
    inv_freq = default_inv_freq(dim, theta)
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def yarn_attention_factor(factor: float, mscale: float | None,
                          mscale_all_dim: float | None) -> float:
    """YaRN's default cos/sin scale: ``0.1 * mscale * ln(factor) + 1`` (ratio form when
    both ``mscale`` and ``mscale_all_dim`` are set, as DeepSeek's configs do)."""

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def yarn_inv_freq(dim: int, theta: float, *, factor: float, original_max_position: int,
                  beta_fast: float, beta_slow: float, truncate: bool) -> np.ndarray:
    """YaRN's blend of interpolated and extrapolated frequencies
    (``_compute_yarn_parameters``); float64."""

    def correction_dim(num_rotations):
        return (dim * math.log(original_max_position / (num_rotations * 2 * math.pi))
                ) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def longrope_attention_factor(factor: float, original_max_position: int) -> float:
    """LongRoPE's default cos/sin scale ``sqrt(1 + ln(factor) / ln(L0))`` (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position))


def longrope_inv_freq(dim: int, theta: float, *, short_factor, long_factor,
                      original_max_position: int, seq_len=None):
    """``f_i / ext_i`` with the long factors once ``seq_len > L0``, else the short ones.

    ``seq_len`` may be a traced scalar (then a ``jnp`` float32 array is returned) or
    ``None`` (the short factors, as transformers at initialisation).
    """
    base = default_inv_freq(dim, theta)
    short = base / np.asarray(short_factor, np.float64)
    if seq_len is None:
        return short
    long = base / np.asarray(long_factor, np.float64)
    return jnp.where(jnp.asarray(seq_len) > original_max_position,
                     jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))


def dynamic_inv_freq(dim: int, theta: float, *, factor: float, original_max_position: int,
                     seq_len=None):
    """Dynamic NTK: the base grows with the current length ``L = max(seq_len, L0)``.

    ``theta' = theta * a ** (R / (R - 2))`` with ``a = factor * L / L0 - (factor - 1)``, so
    ``inv_freq_i = f_i * a ** (-2i / (R - 2))``: the float64 ``f_i`` times one float32 power
    of the (possibly traced) ``a``, which keeps float32 rounding away from ``theta'``.
    ``seq_len=None`` means ``L0`` (no scaling). Returns ``[R/2]`` (float64 NumPy when
    ``seq_len`` is None, else ``jnp`` float32).
    """
    base = default_inv_freq(dim, theta)
    if seq_len is None:
        return base
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(original_max_position))
    a = factor * length / original_max_position - (factor - 1)
    exponents = jnp.asarray(-np.arange(0, dim, 2, dtype=np.float64) / (dim - 2), jnp.float32)
    return jnp.asarray(base, jnp.float32) * a ** exponents
