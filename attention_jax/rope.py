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

A float ``theta`` is plain rope over the whole head. A :class:`Rope` describes the
rotary embeddings of the real model families: the scalings of transformers'
``modeling_rope_utils`` (``linear``, ``dynamic``, ``llama3``, ``yarn``, ``longrope``,
:mod:`attention_jax.rope_scaling`), partial rotary (only the first ``rotary_dim``
features of each head rotate, NeoX / Phi) and the ``interleaved`` layout (pairs
``(x_0, x_1), (x_2, x_3), ...``, GPT-J and the original Meta checkpoints).

>>> import jax.numpy as jnp
>>> x = jnp.ones((1, 3, 2, 4))                      # [B, T, N, H]
>>> apply_rope(x, jnp.arange(3), theta=10_000.0).shape
(1, 3, 2, 4)
>>> llama31 = Rope(500_000.0, scaling="llama3", factor=8.0, original_max_position=8192)
>>> apply_rope(jnp.ones((1, 3, 2, 8)), jnp.arange(3), llama31).shape
(1, 3, 2, 8)
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from attention_jax import rope_scaling

Array = jax.Array

DEFAULT_THETA = 10_000.0

SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn", "longrope")
LAYOUTS = ("halves", "interleaved")
# The parameters each scaling reads (besides theta, rotary_dim, layout); the others must
# keep their defaults, so a parameter is never silently ignored.
_SCALING_FIELDS = {
    "none": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position"),
    "llama3": ("factor", "original_max_position", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "truncate",
             "mscale", "mscale_all_dim", "attention_factor"),
    "longrope": ("factor", "original_max_position", "short_factor", "long_factor",
                 "attention_factor"),
}


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embeddings of one attention layer: a frozen, hashable description.

    Attributes:
      theta: the base (``rope_theta``).
      scaling: ``"none"``, ``"linear"``, ``"dynamic"``, ``"llama3"``, ``"yarn"`` or
        ``"longrope"`` (transformers' ``rope_type``; ``"default"`` there is ``"none"``).
      factor: the scaling factor (linear, dynamic, llama3, yarn; longrope uses it only
        for its default ``attention_factor``).
      original_max_position: the pre-training length ``L0``
        (``original_max_position_embeddings``; for ``dynamic`` transformers uses
        ``max_position_embeddings``). Required by dynamic, llama3, yarn, longrope.
      low_freq_factor, high_freq_factor: llama3's wavelength band.
      beta_fast, beta_slow, truncate, mscale, mscale_all_dim: YaRN's ramp and its
        default attention factor.
      attention_factor: yarn / longrope: the factor cos and sin are multiplied by;
        ``None`` means the scaling's default (:attr:`attention_scaling`).
      short_factor, long_factor: longrope's per-frequency divisors, ``R/2`` each
        (tuples; lists are converted).
      rotary_dim: R, the number of leading features of each head that rotate (partial
        rotary, NeoX / Phi); ``None`` means the head size.
      layout: ``"halves"`` (pairs ``(i, i + R/2)``, Llama / NeoX) or ``"interleaved"``
        (pairs ``(2i, 2i + 1)``, GPT-J / original Meta).

    ``dynamic`` and ``longrope`` depend on the current sequence length, which here is
    ``max(positions) + 1`` over the whole ``positions`` array of the call (batch
    included), as transformers' ``dynamic_rope_update`` computes it from
    ``position_ids``; it is traced, so it works under ``jit``. transformers keeps the
    grown frequencies between calls (until the length drops below ``L0``); this is
    stateless, which is the same for a growing decode.

    >>> Rope(10_000.0, scaling="linear", factor=0.0)
    Traceback (most recent call last):
    ...
    ValueError: Rope.factor must be > 0; got 0.0
    """

    theta: float = DEFAULT_THETA
    scaling: str = "none"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    rotary_dim: int | None = None
    layout: str = "halves"

    def __post_init__(self):
        def set_(name, value):  # normalise a field of the frozen instance
            object.__setattr__(self, name, value)

        if self.scaling not in SCALINGS:
            raise ValueError(f"Rope.scaling must be one of {SCALINGS}; got {self.scaling!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"Rope.layout must be one of {LAYOUTS}; got {self.layout!r}")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                set_(name, tuple(float(v) for v in value))
                if not all(v > 0 for v in getattr(self, name)):
                    raise ValueError(f"Rope.{name} must be > 0 everywhere; got {value}")
        used = _SCALING_FIELDS[self.scaling]
        for f in dataclasses.fields(self):
            if f.name in ("theta", "scaling", "rotary_dim", "layout") or f.name in used:
                continue
            if getattr(self, f.name) != f.default:
                raise ValueError(
                    f"Rope.{f.name}={getattr(self, f.name)!r} is not used by "
                    f"scaling={self.scaling!r} (it reads {used or 'no parameters'})"
                )
        for name in ("theta", "factor", "low_freq_factor", "high_freq_factor",
                     "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Rope.{name} must be a number; got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Rope.{name} must be > 0; got {value}")
            set_(name, float(value))
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            value = getattr(self, name)
            if value is not None:
                if not value > 0:
                    raise ValueError(f"Rope.{name} must be > 0 or None; got {value}")
                set_(name, float(value))
        if not isinstance(self.truncate, bool):
            raise TypeError(f"Rope.truncate must be a bool; got {self.truncate!r}")
        for name in ("original_max_position", "rotary_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise ValueError(f"Rope.{name} must be an integer >= 1 or None; got {value}")
            if value is not None:
                set_(name, int(value))
        if "original_max_position" in used and self.original_max_position is None:
            raise ValueError(f"Rope.original_max_position is required by "
                             f"scaling={self.scaling!r}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"Rope.high_freq_factor ({self.high_freq_factor}) must be > low_freq_factor "
                f"({self.low_freq_factor})"
            )
        if self.scaling == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError(f"Rope.beta_fast ({self.beta_fast}) must be >= beta_slow "
                             f"({self.beta_slow})")
        if self.scaling == "longrope":
            if self.short_factor is None or self.long_factor is None:
                raise ValueError("Rope.short_factor and Rope.long_factor are required by "
                                 "scaling='longrope'")
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError(
                    f"Rope.short_factor ({len(self.short_factor)} values) and long_factor "
                    f"({len(self.long_factor)}) must have the same length"
                )

    def dim(self, head_dim: int) -> int:
        """R: the rotary size for heads of ``head_dim`` features."""
        return head_dim if self.rotary_dim is None else self.rotary_dim

    def check(self, head_dim: int) -> None:
        """Validates this rope for heads of ``head_dim`` features.

        Raises:
          ValueError: when ``head_dim`` is odd (without ``rotary_dim``), when
            ``rotary_dim`` is odd or larger than ``head_dim``, or when longrope's
            factors are not ``R/2`` long.
        """
        if self.rotary_dim is None:
            if head_dim % 2:
                raise ValueError(f"rope needs an even head_dim; got {head_dim}")
        elif self.rotary_dim % 2:
            raise ValueError(f"Rope.rotary_dim must be even; got {self.rotary_dim}")
        elif self.rotary_dim > head_dim:
            raise ValueError(
                f"Rope.rotary_dim ({self.rotary_dim}) must be <= head_dim ({head_dim})"
            )
        R = self.dim(head_dim)
        if self.scaling == "dynamic" and R < 4:
            raise ValueError(f"scaling='dynamic' needs a rotary size >= 4; got {R}")
        if self.scaling == "longrope" and len(self.short_factor) != R // 2:
            raise ValueError(
                f"Rope.short_factor / long_factor must have rotary_dim / 2 = {R // 2} values; "
                f"got {len(self.short_factor)}"
            )

    @property
    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (transformers' ``attention_scaling``):
        ``attention_factor`` when set, YaRN's / LongRoPE's default otherwise, else 1."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.scaling == "yarn":
            return rope_scaling.yarn_attention_factor(self.factor, self.mscale,
                                                      self.mscale_all_dim)
        if self.scaling == "longrope":
            return rope_scaling.longrope_attention_factor(self.factor,
                                                          self.original_max_position)
        return 1.0

    @property
    def depends_on_length(self) -> bool:
        """Whether the frequencies change with the current length (dynamic, longrope)."""
        return self.scaling in ("dynamic", "longrope")

    def inv_freq(self, head_dim: int, seq_len=None) -> Array:
        """The ``[R/2]`` float32 angular frequencies.

        Args:
          head_dim: H (R defaults to it).
          seq_len: the current sequence length, for dynamic and longrope (may be
            traced); ``None`` means transformers' initial frequencies (no dynamic
            growth, longrope's short factors).

        >>> Rope(100.0).inv_freq(4).tolist()
        [1.0, 0.10000000149011612]
        """
        self.check(head_dim)
        R, s = self.dim(head_dim), self.scaling
        if s == "none":
            out = rope_scaling.default_inv_freq(R, self.theta)
        elif s == "linear":
            out = rope_scaling.linear_inv_freq(R, self.theta, factor=self.factor)
        elif s == "llama3":
            out = rope_scaling.llama3_inv_freq(
                R, self.theta, factor=self.factor, low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position=self.original_max_position)
        elif s == "yarn":
            out = rope_scaling.yarn_inv_freq(
                R, self.theta, factor=self.factor,
                original_max_position=self.original_max_position, beta_fast=self.beta_fast,
                beta_slow=self.beta_slow, truncate=self.truncate)
        elif s == "dynamic":
            out = rope_scaling.dynamic_inv_freq(
                R, self.theta, factor=self.factor,
                original_max_position=self.original_max_position, seq_len=seq_len)
        else:
            out = rope_scaling.longrope_inv_freq(
                R, self.theta, short_factor=self.short_factor, long_factor=self.long_factor,
                original_max_position=self.original_max_position, seq_len=seq_len)
        return jnp.asarray(out, jnp.float32)


RopeLike = float | Rope


def check_rope(theta: RopeLike | None, head_dim: int) -> None:
    """Validates a rope setting: a float theta, a :class:`Rope` or ``None``.

    Raises:
      ValueError: when ``theta <= 0`` or when ``head_dim`` is odd (the pairs
        ``(x_i, x_{i + H/2})`` need an even H); for a :class:`Rope`, :meth:`Rope.check`.
    """
    if theta is None:
        return
    if isinstance(theta, Rope):
        theta.check(head_dim)
        return
    if not theta > 0:
        raise ValueError(f"rope theta must be > 0; got {theta}")
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim; got {head_dim}")


def inv_frequencies(head_dim: int, theta: float = DEFAULT_THETA) -> Array:
    """``theta ** (-arange(0, H, 2) / H)``: ``[H/2]`` float32 angular frequencies."""
    check_rope(theta, head_dim)
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def current_length(positions: Array) -> Array:
    """``max(positions) + 1``: the sequence length dynamic / longrope scale for (traced)."""
    return jnp.max(jnp.asarray(positions)) + 1


def rope_cos_sin(positions: Array, head_dim: int, theta: RopeLike = DEFAULT_THETA
                 ) -> tuple[Array, Array]:
    """Cosines and sines of ``positions * inv_freq``, laid out for :func:`apply_rope`.

    Args:
      positions: integer or float positions of any shape ``P`` (e.g. ``[T]`` or
        ``[B, T]``).
      head_dim: H (even).
      theta: the base, or a :class:`Rope`.

    Returns:
      ``(cos, sin)``, each ``P + [R]`` float32 (R = H for a float theta): the ``R/2``
      angles repeated as halves (``cat(freqs, freqs)``) or pairwise (interleaved), times
      the Rope's :attr:`~Rope.attention_scaling`, as transformers' rotary classes return
      them (GPT-J's returns the ``R/2`` angles unrepeated).
    """
    if isinstance(theta, Rope):
        seq_len = current_length(positions) if theta.depends_on_length else None
        inv = theta.inv_freq(head_dim, seq_len)
        freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv
        if theta.layout == "halves":
            angles = jnp.concatenate([freqs, freqs], axis=-1)
        else:
            angles = jnp.repeat(freqs, 2, axis=-1)
        scale = theta.attention_scaling
        return jnp.cos(angles) * scale, jnp.sin(angles) * scale
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_frequencies(head_dim, theta)
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # P + [H]
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_pairs(x: Array) -> Array:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: GPT-J's ``rotate_every_two``."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: Array, positions: Array, rope: RopeLike = DEFAULT_THETA, *,
               theta: float | None = None) -> Array:
    """Rotates every head of ``x`` by its token's position.

    Args:
      x: ``[B, T, N, H]`` queries or keys (any number of heads).
      positions: ``[T]`` (shared by the batch) or ``[B, T]`` absolute positions
        (offsets, left padding and packed sequences are just other numbers here).
      rope: the base theta (plain rope, the numbers of earlier versions), or a
        :class:`Rope` (scaling, partial rotary, layout).
      theta: the former name of ``rope`` (a float), kept for callers that name it.

    Returns:
      ``[B, T, N, H]`` in ``x``'s dtype; with a partial rotary size R only
      ``x[..., :R]`` changes.
    """
    if theta is not None:
        rope = theta
    B, T, N, H = x.shape
    positions = jnp.asarray(positions)
    if positions.shape not in ((T,), (1, T), (B, T)):
        raise ValueError(
            f"positions must be [T] or [B, T] = [{B}, {T}]; got shape {positions.shape}"
        )
    if isinstance(rope, Rope):
        rope.check(H)
        R = rope.dim(H)
        cos, sin = rope_cos_sin(positions, H, rope)  # [T | B, T, R] f32
        cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) T, 1, R]
        xr = x[..., :R].astype(jnp.float32)
        turn = rotate_half if rope.layout == "halves" else rotate_pairs
        out = (xr * cos + turn(xr) * sin).astype(x.dtype)
        return out if R == H else jnp.concatenate([out, x[..., R:]], axis=-1)
    cos, sin = rope_cos_sin(positions, H, rope)  # [T | B, T, H] f32
    cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) T, 1, H]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)

