"""The Flax NNX attention module: MHA, MQA and GQA in one class.

The module holds an :class:`~attention_jax.config.AttentionConfig` (``module.config``)
and its parameters; its forward pass and decode step are
:func:`attention_jax.layer.attention_layer` and :func:`~attention_jax.layer.decode_layer`.
Parameters are einsum kernels named by their dims, each carrying its logical
axis names in the ``out_sharding`` metadata of its ``nnx.Param`` (no mesh is
needed to create one; :mod:`attention_jax.sharding` maps the names to mesh axes);
the table is in :mod:`attention_jax.config`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from attention_jax import cache as kv_cache
from attention_jax import layer
from attention_jax.config import (  # noqa: F401 (re-exported: modules' public names)
    ALL_PARAM_AXES,
    CONFIG_FIELDS,
    EMBED,
    FAMILY_PARAM_AXES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    PARAM_AXES,
    AttentionConfig,
    ParamLayout,
    ParamSpec,
)
from attention_jax.layer import (  # noqa: F401 (re-exported: modules' public names)
    add_output_bias,
    attention_forward,
    attention_layer,
    decode_forward,
    decode_layer,
)

Array = jax.Array
Initializer = Callable[[Array, Sequence[int], Any], Array]

ZEROS: Initializer = nnx.initializers.zeros_init()
_ZEROS = ZEROS


def default_kernel_init() -> Initializer:
    """LeCun normal over the flattened ``[fan_in, fan_out]`` matrix (as Flax's Dense)."""
    return nnx.initializers.lecun_normal()


def init_param_value(name: str, init: Initializer, rng: Array, shape: tuple[int, ...],
                     dtype) -> Array:
    """Parameter ``name``'s initial value: ``init`` on its 2-D ``[fan_in, fan_out]`` view.

    Kernels are initialised as the matrix they multiply by (so fan-in based
    initialisers see ``D``, not ``D`` and ``N`` apart); biases as they are.
    Shared by the NNX module and :mod:`attention_jax.linen`.
    """
    n_in = ALL_PARAM_AXES[name].fan_in_axes
    if n_in:
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        return init(rng, flat, dtype).reshape(shape)
    return init(rng, shape, dtype)


ONES: Initializer = nnx.initializers.ones_init()


def param_initializer(spec: ParamSpec, kernel_init: Initializer | None,
                      bias_init: Initializer, norm_offset: float = 0.0) -> Initializer:
    """The initialiser of parameter ``spec``: kernels ``kernel_init`` (default
    :func:`default_kernel_init`), biases ``bias_init``, q/k norm scales ones (the
    effective scale ``norm_offset + w`` starts at 1: ``w = 1 - norm_offset``), sinks
    zeros. Shared by the NNX module and :mod:`attention_jax.linen`."""
    if spec.is_kernel:
        return default_kernel_init() if kernel_init is None else kernel_init
    if spec.name.endswith("_bias"):
        return bias_init
    if spec.name.endswith("_norm"):
        return ONES if not norm_offset else nnx.initializers.constant(1.0 - norm_offset)
    return ZEROS


def _param(spec: ParamSpec, init: Initializer, rng: Array, dtype) -> nnx.Param:
    """:func:`init_param_value` as an ``nnx.Param`` with its logical axis names."""
    value = init_param_value(spec.name, init, rng, spec.shape, dtype)
    return nnx.Param(value, out_sharding=spec.axes, eager_sharding=False)


def make_config(in_features: int, num_heads: int, owner: str = "MultiHeadAttention",
                **options: Any) -> AttentionConfig:
    """``AttentionConfig(in_features, num_heads, **options)``; an unknown option is a
    TypeError that names it and lists the valid ones."""
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {unknown}; the options are the fields of "
            f"AttentionConfig: {list(CONFIG_FIELDS[2:])}"
        )
    return AttentionConfig(in_features, num_heads, **options)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with ``num_kv_heads`` key/value heads (MHA, GQA, MQA).

    ``y = merge_heads(attn(x_q W_q + b_q, x_k W_k + b_k, x_v W_v + b_v), W_o) + b_o``
    with ``attn`` from :func:`attention_jax.ops.dot_product_attention`.

    Args:
      in_features: D, the width of ``inputs_q``.
      num_heads: N query heads.
      **options: every other field of :class:`~attention_jax.config.AttentionConfig`
        (``num_kv_heads``, ``head_dim``, ``v_head_dim``, ``in_k_features``,
        ``in_v_features``, ``out_features``, ``use_bias`` and the per-projection
        ``q_bias`` ... ``o_bias``, ``dropout_rate``, ``dtype``, ``param_dtype``,
        ``implementation``, ``scale``, ``deterministic``, ``rope``), documented there.
      kernel_init, bias_init: initialisers; kernels see their flattened
        ``[fan_in, fan_out]`` shape (default LeCun normal; biases zeros).
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when dropout is used).

    The config is ``module.config``; its fields read as attributes too
    (``module.num_kv_heads``). :meth:`from_config` builds a module from one.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2, rngs=nnx.Rngs(0))   # GQA
    >>> mha(jnp.ones((2, 10, 64)), is_causal=True).shape
    (2, 10, 64)

    Decoding with an explicit cache (:mod:`attention_jax.cache`):

    >>> cache = mha.init_cache(batch_size=2, max_length=16)
    >>> y, cache = mha.decode(jnp.ones((2, 5, 64)), cache)       # prefill 5 tokens
    >>> y, cache = mha.decode(jnp.ones((2, 1, 64)), cache)       # one step
    >>> cache.k.shape, cache.lengths.tolist()                    # [B, K = 2, L, H]
    ((2, 2, 16, 8), [6, 6])
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = ZEROS,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        config = make_config(in_features, num_heads, type(self).__name__, **options)
        self._build(config, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)

    @classmethod
    def from_config(cls, config: AttentionConfig, *, rngs: nnx.Rngs,
                    kernel_init: Initializer | None = None,
                    bias_init: Initializer = ZEROS) -> MultiHeadAttention:
        """The module of ``config`` with freshly initialised parameters.

        >>> from flax import nnx
        >>> cfg = AttentionConfig(32, 4, num_kv_heads=1)
        >>> MultiHeadAttention.from_config(cfg, rngs=nnx.Rngs(0)).config == cfg
        True
        """
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"config must be an AttentionConfig; got {type(config).__name__}")
        return cls(**config.to_dict(), kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)

    def _build(self, config: AttentionConfig, *, kernel_init, bias_init, rngs) -> None:
        self.config = config
        self.deterministic = config.deterministic
        present = {p.name: p for p in config.params()}
        for name in ALL_PARAM_AXES:
            spec = present.get(name)
            if spec is None:
                setattr(self, name, None)
                continue
            init = param_initializer(spec, kernel_init, bias_init, config.qk_norm_offset)
            setattr(self, name, _param(spec, init, rngs.params(), config.param_dtype))
        self.rngs = rngs.dropout.fork() if config.dropout_rate > 0.0 else None

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the config's fields as attributes.
        if name in CONFIG_FIELDS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- helpers -----------------------------------------------------------

    @property
    def num_groups(self) -> int:
        """G = N // K, query heads per key/value head."""
        return self.config.num_groups

    def kv_bytes_per_token(self, dtype: Any = None) -> int:
        """Bytes of key and value cache one token costs: ``K * (H + V) * itemsize``."""
        return self.config.kv_bytes_per_token(dtype)

    def resolve_inputs(
        self, inputs_q: Array, inputs_k: Array | None = None, inputs_v: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """Applies the input defaults (k = q, v = k) and checks widths and batch.

        Raises:
          ValueError: naming the width or shape that does not match the module.
        """
        return layer.resolve_inputs(self.config, inputs_q, inputs_k, inputs_v)

    def check_decode_inputs(self, x: Array, cache: kv_cache.KVCache) -> None:
        """Checks ``x [B, t, D]`` and ``cache`` against this module (every decode path)."""
        layer.check_decode_inputs(self.config, x, cache)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view`` / ``module.eval()`` / ``module.train()``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def param_values(self) -> dict[str, Array | None]:
        """Parameter values by name (``PARAM_AXES`` order), None for absent ones."""
        params = {name: getattr(self, name) for name in ALL_PARAM_AXES}
        return {name: None if p is None else p[...] for name, p in params.items()}

    def dropout_key(self, deterministic: bool | None = None) -> Array | None:
        """A fresh dropout key, or None when dropout is off for this call.

        Off when ``dropout_rate == 0`` or when deterministic (the argument, else
        the module's ``deterministic``). Every path that runs this module's math
        (single device, head parallel) draws its key here.
        """
        if self.config.dropout_rate == 0.0:
            return None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            return None
        return self.rngs()

    # -- forward -----------------------------------------------------------

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        is_causal: bool = False,
        deterministic: bool | None = None,
        return_weights: bool = False,
        positions: Array | None = None,
        kv_positions: Array | None = None,
        score_mod: Callable[..., Array] | None = None,
        segment_ids: Array | tuple[Array, Array] | None = None,
    ) -> Array | tuple[Array, Array]:
        """Attends ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

        Args:
          inputs_q: ``[B, T, D]``.
          inputs_k: ``[B, S, Dk]``; default ``inputs_q`` (self-attention).
          inputs_v: ``[B, S, Dv]``; default ``inputs_k``.
          mask: boolean, broadcastable to ``[B, N, T, S]``, True = attend; or a
            mask object of :mod:`attention_jax.masks` (``Causal() & SlidingWindow(512)``,
            ``Segments(ids)``), evaluated at ``positions``.
          is_causal: add the causal mask (at ``positions``: top-left by default).
          deterministic: disable dropout (default: the module's setting;
            dropout is on when ``dropout_rate > 0`` and nothing says otherwise).
          return_weights: also return the ``[B, N, T, S]`` attention weights.
          score_mod: ``fn(score, b, n, t, s) -> score`` on the scaled logits
            (:mod:`attention_jax.scores`: ``softcap``, ``alibi``).
          positions: ``[T]`` or ``[B, T]`` absolute query positions for rope
            (left padding, offsets); default ``arange(T)``.
          kv_positions: ``[S]`` or ``[B, S]`` key positions; default ``positions``
            for self-attention, else ``arange(S)``.
          segment_ids: ``[B, T]`` ids of packed sequences (negative = padding), or
            ``(q_ids, kv_ids)``: a query sees only its segment's keys
            (:class:`attention_jax.masks.Segments`, combined with ``mask``).

        Returns:
          ``[B, T, Do]``, and the weights when ``return_weights``.
        """
        return layer.attention_layer(
            self.config, self.param_values(), inputs_q, inputs_k, inputs_v, mask=mask,
            is_causal=is_causal, dropout_rng=self.dropout_key(deterministic),
            return_weights=return_weights, positions=positions, kv_positions=kv_positions,
            score_mod=score_mod, segment_ids=segment_ids,
        )

    # -- decoding ----------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> kv_cache.KVCache:
        """An empty :class:`~attention_jax.cache.KVCache` for this module's K, H and V.

        Args:
          batch_size: B.
          max_length: L, the most tokens (prompt and generated) a row can hold.
          dtype: cache dtype; default the module's ``dtype``, else ``param_dtype``.
            ``jnp.int8`` stores keys and values quantized per token and head.
        """
        cfg = self.config
        if dtype is None:
            dtype = cfg.param_dtype if cfg.dtype is None else cfg.dtype
        return kv_cache.init_cache(
            batch_size, max_length, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim, dtype
        )

    def decode(
        self,
        x: Array,
        cache: kv_cache.KVCache,
        *,
        mask: Array | None = None,
        valid_lengths: Array | None = None,
    ) -> tuple[Array, kv_cache.KVCache]:
        """Causal self-attention of new tokens to the cache and to themselves.

        A prefill (t > 1) and a single-token step (t = 1) are the same call.
        Rows sit at their own positions ``cache.lengths``; rope (when set) uses
        them. No dropout is applied. Wrap in ``nnx.jit(..., donate_argnums=...)``
        to update the cache in place. See :mod:`attention_jax.cache` for ragged
        prompts, overflow and int8.

        Args:
          x: ``[B, t, D]`` new tokens, t >= 1.
          cache: from :meth:`init_cache` or a previous call.
          mask: optional extra boolean mask broadcastable to ``[B, N, t, L]``.
          valid_lengths: ``[B]`` real tokens per row among the t (right-padded
            prompts of different lengths); default t. Padded tokens are not
            stored and their outputs are to be ignored.

        Returns:
          ``(y [B, t, Do], updated cache)``.

        Raises:
          ValueError: when eager and a row would pass the cache's ``max_length``.
        """
        return layer.decode_layer(self.config, self.param_values(), x, cache, mask=mask,
                                  valid_lengths=valid_lengths)


def _signature(**options: inspect.Parameter) -> inspect.Signature:
    """``MultiHeadAttention``'s signature with the config's fields spelt out (for help())."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("in_features", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("num_heads", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    defaults = {f: AttentionConfig.__dataclass_fields__[f].default for f in CONFIG_FIELDS[2:]}
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
               for n, d in defaults.items()]
    params += list(options.values())
    return inspect.Signature(params)


MultiHeadAttention.__init__.__signature__ = _signature(
    kernel_init=inspect.Parameter("kernel_init", inspect.Parameter.KEYWORD_ONLY, default=None),
    bias_init=inspect.Parameter("bias_init", inspect.Parameter.KEYWORD_ONLY, default=ZEROS),
    rngs=inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY),
)
MultiHeadAttention.__signature__ = MultiHeadAttention.__init__.__signature__.replace(
    parameters=list(MultiHeadAttention.__init__.__signature__.parameters.values())[1:])


def MultiQueryAttention(in_features: int, num_heads: int, **kwargs) -> MultiHeadAttention:
    """MQA: a :class:`MultiHeadAttention` with one key/value head."""
    return MultiHeadAttention(in_features, num_heads, num_kv_heads=1, **kwargs)


def GroupedQueryAttention(
    in_features: int, num_heads: int, num_kv_heads: int, **kwargs
) -> MultiHeadAttention:
    """GQA: a :class:`MultiHeadAttention` whose N query heads share K key/value heads."""
    return MultiHeadAttention(in_features, num_heads, num_kv_heads=num_kv_heads, **kwargs)
