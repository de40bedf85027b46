"""One attention configuration: every option of the layer, validated once.

:class:`AttentionConfig` is a frozen, hashable dataclass. The NNX module
(:class:`attention_jax.MultiHeadAttention`), the Linen adapter, the converters,
interop and the head-parallel wrapper all read it, so an option added here (a
field, and its use in :mod:`attention_jax.layer`) reaches every one of them
without editing them.

The config owns the derived sizes and the parameter table::

    D  in_features        N  num_heads        K  num_kv_heads (N % K == 0)
    Dk in_k_features      H  head_dim         G  = N // K (num_groups)
    Dv in_v_features      V  v_head_dim       Do out_features

==========  =====================  =============================================
parameter   shape                  logical axes
==========  =====================  =============================================
q_kernel    ``[D, N, H]``          ``('embed', 'heads', 'head_dim')``
k_kernel    ``[Dk, K, H]``         ``('embed', 'kv_heads', 'head_dim')``
v_kernel    ``[Dv, K, V]``         ``('embed', 'kv_heads', 'head_dim')``
o_kernel    ``[N, V, Do]``         ``('heads', 'head_dim', 'embed')``
q_bias      ``[N, H]``             ``('heads', 'head_dim')``
k_bias      ``[K, H]``             ``('kv_heads', 'head_dim')``
v_bias      ``[K, V]``             ``('kv_heads', 'head_dim')``
o_bias      ``[Do]``               ``('embed',)``
q_norm      ``[H]`` or ``[N, H]``  ``('head_dim',)`` / ``('heads', 'head_dim')``
k_norm      ``[H]`` or ``[K, H]``  ``('head_dim',)`` / ``('kv_heads', 'head_dim')``
sinks       ``[N]``                ``('heads',)``
==========  =====================  =============================================

(biases, norms and sinks only when the configuration has them).

>>> cfg = AttentionConfig(64, 8, num_kv_heads=2)
>>> cfg.head_dim, cfg.num_groups, cfg.out_features
(8, 4, 64)
>>> [(p.name, p.shape) for p in cfg.params()][:2]
[('q_kernel', (64, 8, 8)), ('k_kernel', (64, 2, 8))]
>>> AttentionConfig(64, 8, num_kv_heads=3)
Traceback (most recent call last):
...
ValueError: num_heads (8) must be a multiple of num_kv_heads (3)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax.numpy as jnp

from attention_jax import ops
from attention_jax import rope as rope_lib

EMBED, HEADS, KV_HEADS, HEAD_DIM = "embed", "heads", "kv_heads", "head_dim"


class ParamLayout(NamedTuple):
    """How a parameter is laid out: its logical axes and how many lead the fan-in."""

    axes: tuple[str, ...]
    fan_in_axes: int


# Every parameter the layer can have, by name (this order everywhere).
PARAM_AXES: dict[str, ParamLayout] = {
    "q_kernel": ParamLayout((EMBED, HEADS, HEAD_DIM), 1),
    "k_kernel": ParamLayout((EMBED, KV_HEADS, HEAD_DIM), 1),
    "v_kernel": ParamLayout((EMBED, KV_HEADS, HEAD_DIM), 1),
    "o_kernel": ParamLayout((HEADS, HEAD_DIM, EMBED), 2),
    "q_bias": ParamLayout((HEADS, HEAD_DIM), 0),
    "k_bias": ParamLayout((KV_HEADS, HEAD_DIM), 0),
    "v_bias": ParamLayout((KV_HEADS, HEAD_DIM), 0),
    "o_bias": ParamLayout((EMBED,), 0),
}
# The model-family parameters, present only when a configuration asks for them.
# qk_norm="head": one [H] scale shared by the heads; "full": [N, H] / [K, H]
# (config.params() gives each configuration's own axes).
FAMILY_PARAM_AXES: dict[str, ParamLayout] = {
    "q_norm": ParamLayout((HEAD_DIM,), 0),
    "k_norm": ParamLayout((HEAD_DIM,), 0),
    "sinks": ParamLayout((HEADS,), 0),
}
#: Every parameter name the layer can have: the projections, then the family ones.
ALL_PARAM_AXES: dict[str, ParamLayout] = {**PARAM_AXES, **FAMILY_PARAM_AXES}
QK_NORMS = ("head", "full")


class ParamSpec(NamedTuple):
    """One parameter of a configuration: name, shape and layout."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    fan_in_axes: int

    @property
    def is_kernel(self) -> bool:
        return self.name.endswith("_kernel")


def _check_size(name: str, value: Any, *, optional: bool = False) -> int | None:
    """An int >= 1 (or None when ``optional``); the one wording of this check."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = type(value).__name__
        raise TypeError(f"{name} must be an int >= 1; got {value!r} ({kind})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


def check_num_heads(num_heads: int, num_kv_heads: int) -> None:
    """N % K == 0, with the package's one wording of the message.

    Raises:
      ValueError: ``num_heads (8) must be a multiple of num_kv_heads (3)``.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Every option of the attention layer; sizes are resolved at construction.

    Attributes:
      in_features: D, the width of ``inputs_q``.
      num_heads: N query heads.
      num_kv_heads: K key/value heads; ``None`` means N (MHA), 1 is MQA.
        N must be a multiple of K.
      head_dim: H, query/key size per head; default ``in_features // num_heads``.
      v_head_dim: V, value size per head; default H.
      in_k_features: width of ``inputs_k`` (torch's ``kdim``); default D.
      in_v_features: width of ``inputs_v`` (torch's ``vdim``); default the key width.
      out_features: output width; default D.
      use_bias: biases on the four projections (the default of each
        per-projection flag below).
      q_bias, k_bias, v_bias, o_bias: a bias on that projection; ``None``
        (default) means ``use_bias``. E.g. Qwen 2: q, k, v but not o.
      dropout_rate: dropout on the attention weights, in ``[0, 1)``.
      dtype: computation dtype; default: promoted from inputs and parameters.
      param_dtype: parameter dtype.
      implementation: attention backend (``ops.available_implementations()``);
        ``None`` is ``"auto"``.
      scale: logit scale, a finite number; default ``1/sqrt(H)``.
      deterministic: the module's initial default for ``deterministic``
        (``None``: dropout on when ``dropout_rate > 0``); ``module.eval()`` /
        ``.train()`` change the module's, not the config's.
      rope: rotary position embeddings applied to q and k at their absolute
        positions: a base theta (e.g. ``10_000.0``) or an
        :class:`attention_jax.rope.Rope` (scaling, partial rotary, layout);
        ``None`` means no rope.
      qk_norm: RMSNorm of q and k before rope, with a learned scale
        (``x / rms(x) * w``): ``"head"`` over each head's H features, one ``[H]``
        scale shared by the heads (Qwen 3, Gemma 3); ``"full"`` over all N * H
        (K * H) features with an ``[N, H]`` (``[K, H]``) scale (OLMo 2); None, off.
      qk_norm_eps: the RMSNorm epsilon.
      softcap: logit soft-capping ``cap * tanh(score / cap)`` (Gemma 2), applied
        to the scaled logits after any ``score_mod`` of the call; None, off.
      sliding_window: W: query t sees keys ``t - W < s <= t`` (transformers'
        sliding window, causal), combined with the call's mask; None, off.
      sinks: a learned ``[N]`` sink logit per query head in the softmax
        denominator (gpt-oss; parameter ``sinks``, initialised to 0).
      qk_norm_offset: the q/k RMSNorm multiplies by ``qk_norm_offset + w``: 0 (the
        plain ``w``, initialised to 1) or 1.0 for Gemma 3's ``1 + w`` (``w``
        initialised to 0), so its checkpoints load and save bit for bit.

    Raises:
      TypeError: a size that is not an int (e.g. ``d_model / 8``).
      ValueError: naming the option and the numbers for every other invalid value.
    """

    in_features: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    v_head_dim: int | None = None
    in_k_features: int | None = None
    in_v_features: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    q_bias: bool | None = None
    k_bias: bool | None = None
    v_bias: bool | None = None
    o_bias: bool | None = None
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    scale: float | None = None
    deterministic: bool | None = None
    rope: float | rope_lib.Rope | None = None
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-6
    softcap: float | None = None
    sliding_window: int | None = None
    sinks: bool = False
    qk_norm_offset: float = 0.0

    def __post_init__(self):
        def resolve(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        D = _check_size("in_features", self.in_features)
        N = _check_size("num_heads", self.num_heads)
        K = _check_size("num_kv_heads", N if self.num_kv_heads is None else self.num_kv_heads)
        check_num_heads(N, K)
        H = _check_size("head_dim", self.head_dim, optional=True)
        if H is None:
            if D % N:
                raise ValueError(
                    f"in_features ({D}) is not divisible by num_heads ({N}); "
                    "pass head_dim explicitly"
                )
            H = D // N
        V = _check_size("v_head_dim", H if self.v_head_dim is None else self.v_head_dim)
        Dk = _check_size("in_k_features", D if self.in_k_features is None else self.in_k_features)
        Dv = _check_size("in_v_features",
                         Dk if self.in_v_features is None else self.in_v_features)
        Do = _check_size("out_features", D if self.out_features is None else self.out_features)
        for name, value in (("in_features", D), ("num_heads", N), ("num_kv_heads", K),
                            ("head_dim", H), ("v_head_dim", V), ("in_k_features", Dk),
                            ("in_v_features", Dv), ("out_features", Do)):
            resolve(name, value)
        for name in ("use_bias", "q_bias", "k_bias", "v_bias", "o_bias"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool; got {value!r}")
        rate = self.dropout_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {rate!r}")
        resolve("dropout_rate", float(rate))
        if self.implementation is not None:
            ops.check_implementation(self.implementation)
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or (
                    not math.isfinite(self.scale)):
                raise ValueError(f"scale must be a finite number or None; got {self.scale!r}")
            resolve("scale", float(self.scale))
        if isinstance(self.rope, numbers.Real) and not isinstance(self.rope, bool):
            resolve("rope", float(self.rope))
        elif self.rope is not None and not isinstance(self.rope, rope_lib.Rope):
            raise TypeError(
                f"rope must be a theta (float), an attention_jax.rope.Rope or None; "
                f"got {self.rope!r}"
            )
        rope_lib.check_rope(self.rope, H)
        if self.qk_norm not in (None, *QK_NORMS):
            raise ValueError(f"qk_norm must be one of {QK_NORMS} or None; got {self.qk_norm!r}")
        for name in ("qk_norm_eps", "softcap"):
            value = getattr(self, name)
            if value is None and name == "softcap":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
            resolve(name, float(value))
        resolve("sliding_window", _check_size("sliding_window", self.sliding_window,
                                              optional=True))
        if not isinstance(self.sinks, bool):
            raise TypeError(f"sinks must be a bool; got {self.sinks!r}")
        offset = self.qk_norm_offset
        if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not (
                math.isfinite(offset)):
            raise ValueError(f"qk_norm_offset must be a finite number; got {offset!r}")
        resolve("qk_norm_offset", float(offset))
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    jnp.dtype(value)
                except TypeError as e:
                    raise TypeError(f"{name} must be a dtype; got {value!r}") from e

    # -- derived sizes -----------------------------------------------------

    @property
    def num_groups(self) -> int:
        """G = N // K, query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def has_bias(self, projection: str) -> bool:
        """Whether projection ``"q" | "k" | "v" | "o"`` has a bias."""
        flag = getattr(self, f"{projection}_bias")
        return self.use_bias if flag is None else flag

    @property
    def is_self_attention_only(self) -> bool:
        """True when q, k and v read inputs of one width (decode needs that)."""
        return self.in_k_features == self.in_v_features == self.in_features

    def kv_bytes_per_token(self, dtype: Any = None) -> int:
        """Bytes of key and value cache one token costs: ``K * (H + V) * itemsize``."""
        dtype = self.param_dtype if dtype is None else dtype
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * jnp.dtype(dtype).itemsize

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter the layer can have (present or not), by name."""
        D, N, K, H, V = (self.in_features, self.num_heads, self.num_kv_heads, self.head_dim,
                         self.v_head_dim)
        full = self.qk_norm == "full"
        return {
            "q_kernel": (D, N, H), "k_kernel": (self.in_k_features, K, H),
            "v_kernel": (self.in_v_features, K, V), "o_kernel": (N, V, self.out_features),
            "q_bias": (N, H), "k_bias": (K, H), "v_bias": (K, V), "o_bias": (self.out_features,),
            "q_norm": (N, H) if full else (H,), "k_norm": (K, H) if full else (H,),
            "sinks": (N,),
        }

    def has_param(self, name: str) -> bool:
        """Whether this configuration has parameter ``name``."""
        if name.endswith("_bias"):
            return self.has_bias(name[0])
        if name.endswith("_norm"):
            return self.qk_norm is not None
        if name == "sinks":
            return self.sinks
        return name in ALL_PARAM_AXES

    def params(self) -> tuple[ParamSpec, ...]:
        """The parameters this configuration has, in :data:`ALL_PARAM_AXES` order."""
        shapes = self.param_shapes()
        specs = []
        for name in ALL_PARAM_AXES:
            if not self.has_param(name):
                continue
            axes, fan_in = ALL_PARAM_AXES[name]
            if name.endswith("_norm") and self.qk_norm == "full":
                axes = (HEADS if name == "q_norm" else KV_HEADS, HEAD_DIM)
            specs.append(ParamSpec(name, shapes[name], axes, fan_in))
        return tuple(specs)

    def replace(self, **changes: Any) -> AttentionConfig:
        """A copy with ``changes``; derived sizes left at their defaults are re-derived.

        ``head_dim`` and the other sizes are resolved at construction, so a plain
        ``dataclasses.replace(cfg, in_features=...)`` would keep the old H; this
        re-derives every size that equalled its default unless it is changed too.

        >>> AttentionConfig(64, 8).replace(in_features=128).head_dim
        16
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, default in self._size_defaults().items():
            if fields[name] == default:
                fields[name] = None
        fields.update(changes)
        return AttentionConfig(**fields)

    def _size_defaults(self) -> dict[str, int]:
        return {
            "num_kv_heads": self.num_heads,
            "head_dim": self.in_features // self.num_heads,
            "v_head_dim": self.head_dim,
            "in_k_features": self.in_features,
            "in_v_features": self.in_k_features,
            "out_features": self.in_features,
        }

    def to_dict(self) -> dict[str, Any]:
        """The fields by name (values as stored; for logs and checkpoints' metadata)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AttentionConfig))
