"""A Flax Linen adapter: the NNX attention for existing ``flax.linen`` codebases.

:class:`MultiHeadAttention` here is an ``nn.Module`` with the options of
:class:`attention_jax.modules.MultiHeadAttention` (MHA, GQA and MQA through
``num_kv_heads``) and the Linen habits: the input widths ``D``, ``Dk``, ``Dv``
come from the inputs at ``init``, parameters live in the ``'params'``
collection and dropout draws from the ``'dropout'`` rng collection.

Nothing is re-derived: the module's attributes are the fields of
:class:`attention_jax.config.AttentionConfig` less the input widths (generated
from the config, so a new option of the config is a Linen attribute without
editing this file); at each call the config is built from them and the input
widths, which validates it and gives the parameter shapes, and the forward
pass is :func:`attention_jax.layer.attention_layer`, as in the NNX module.
The parameters have the NNX names, shapes and default initialisers
(``q_kernel [D, N, H]``, ``k_kernel [Dk, K, H]``, ``v_kernel [Dv, K, V]``,
``o_kernel [N, V, Do]``, biases ``[N, H]``, ``[K, H]``, ``[K, V]``, ``[Do]``),
each boxed in ``nn.LogicallyPartitioned`` with the logical axes of
:data:`attention_jax.config.PARAM_AXES`, so ``nn.get_partition_spec`` and
``nn.logical_to_mesh_sharding`` work on the variables ``init`` returns.

:func:`to_nnx` and :func:`from_nnx` move trained parameters between the two
APIs, unchanged (the same arrays, no cast). To use an NNX model from Linen
code or the reverse, convert with them rather than wrap: ``nnx.bridge.ToNNX``
turns logical axis names into eager shardings, which needs a mesh (or
``nnx.use_eager_sharding(False)``), as for any logically partitioned Linen module.

Inside a Linen model (GQA: 4 query heads share 2 key/value heads):

>>> import jax, jax.numpy as jnp
>>> import flax.linen as nn
>>> from attention_jax import linen as ajl
>>> class Block(nn.Module):
...     @nn.compact
...     def __call__(self, x):
...         h = nn.Dense(16, name="proj")(x)
...         return h + ajl.GroupedQueryAttention(4, 2, name="attn")(h, is_causal=True)
>>> x = jnp.ones((2, 5, 8))
>>> variables = Block().init(jax.random.key(0), x)
>>> Block().apply(variables, x).shape
(2, 5, 16)
>>> tuple(nn.get_partition_spec(variables)["params"]["attn"]["k_kernel"])
('embed', 'kv_heads', 'head_dim')

To and from the NNX module:

>>> gqa = ajl.to_nnx(ajl.GroupedQueryAttention(4, 2), variables["params"]["attn"])
>>> gqa.num_kv_heads, gqa.in_features
(2, 16)
>>> attn = ajl.MultiHeadAttention(4, num_kv_heads=1)                 # MQA
>>> v = attn.init(jax.random.key(1), x)
>>> nnx_mqa = ajl.to_nnx(attn, v)
>>> nnx_mqa.num_kv_heads, nnx_mqa.k_kernel.shape
(1, (8, 1, 2))
>>> bool(jnp.allclose(nnx_mqa(x), attn.apply(v, x), atol=1e-6))
True
>>> attn2, v2 = ajl.from_nnx(nnx_mqa)          # unboxed {'params': {...}}
>>> attn2.num_kv_heads, v2["params"]["k_kernel"].shape
(1, (8, 1, 2))
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import layer, modules
from attention_jax.config import ALL_PARAM_AXES, CONFIG_FIELDS, AttentionConfig
from attention_jax.modules import Initializer

Array = jax.Array

_KERNELS = ("q_kernel", "k_kernel", "v_kernel")  # their first axis is the input width
_INPUTS = ("inputs_q", "inputs_k", "inputs_v")
_WIDTHS = ("in_features", "in_k_features", "in_v_features")  # read from the inputs
#: The Linen module's attributes from the config (``num_heads`` first), then the initialisers.
CONFIG_ATTRIBUTES: tuple[str, ...] = tuple(f for f in CONFIG_FIELDS if f not in _WIDTHS)


def config_of(module: Any, in_features: int, in_k_features: int,
              in_v_features: int) -> AttentionConfig:
    """The :class:`AttentionConfig` of the Linen ``module`` on inputs of these widths."""
    return AttentionConfig(in_features=in_features, in_k_features=in_k_features,
                           in_v_features=in_v_features,
                           **{n: getattr(module, n) for n in CONFIG_ATTRIBUTES})


def nnx_kwargs(module: Any, in_features: int, in_k_features: int,
               in_v_features: int) -> dict[str, Any]:
    """Arguments of :class:`attention_jax.modules.MultiHeadAttention` (less ``rngs`` and
    the initialisers) equivalent to the Linen ``module`` on inputs of these widths."""
    return config_of(module, in_features, in_k_features, in_v_features).to_dict()


class _Methods:
    """The Linen module's methods (copied into the generated class below)."""

    @nn.compact
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
          mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend.
          is_causal: add the top-left aligned causal mask.
          deterministic: disable dropout (default: the module's setting;
            dropout is on when ``dropout_rate > 0`` and nothing says otherwise).
          return_weights: also return the ``[B, N, T, S]`` attention weights.
          positions, kv_positions, score_mod, segment_ids: as in the NNX module.

        Returns:
          ``[B, T, Do]``, and the weights when ``return_weights``.

        Raises:
          ValueError: from the config's and the layer's checks, naming the numbers.
        """
        config = config_of(self, *self._widths(inputs_q, inputs_k, inputs_v))
        return layer.attention_layer(
            config, self._params(config), inputs_q, inputs_k, inputs_v, mask=mask,
            is_causal=is_causal, dropout_rng=self._dropout_rng(deterministic),
            return_weights=return_weights, positions=positions, kv_positions=kv_positions,
            score_mod=score_mod, segment_ids=segment_ids,
        )

    def _widths(self, inputs_q, inputs_k, inputs_v) -> tuple[int, int, int]:
        """``(D, Dk, Dv)``: from the stored kernels when there are any, else the inputs."""
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        widths = []
        for kernel, name, x in zip(_KERNELS, _INPUTS, (inputs_q, inputs_k, inputs_v),
                                   strict=True):
            if self.has_variable("params", kernel):  # apply: the parameters fix the width
                widths.append(jnp.shape(nn.meta.unbox(self.get_variable("params", kernel)))[0])
                continue
            if jnp.ndim(x) != 3:
                raise ValueError(
                    f"{name} must be [batch, length, features]; got shape {jnp.shape(x)}"
                )
            widths.append(jnp.shape(x)[-1])
        return tuple(widths)

    def _params(self, config: AttentionConfig) -> dict[str, Array | None]:
        """The parameters by name (``PARAM_AXES`` order), shaped by ``config``; None if absent."""
        params: dict[str, Array | None] = dict.fromkeys(ALL_PARAM_AXES)
        for spec in config.params():
            init = modules.param_initializer(spec, self.kernel_init, self.bias_init,
                                             config.qk_norm_offset)
            params[spec.name] = self.param(
                spec.name, nn.with_logical_partitioning(_nnx_init(spec.name, init), spec.axes),
                spec.shape, config.param_dtype,
            )
        return params

    def _dropout_rng(self, deterministic: bool | None) -> Array | None:
        if self.dropout_rate == 0.0:
            return None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or (self.is_initializing() and not self.has_rng("dropout")):
            return None  # init needs no 'dropout' rng: its output is not the point
        return self.make_rng("dropout")


_DOC = """Multi-head attention with ``num_kv_heads`` key/value heads, as a Linen module.

    The options, their defaults and ``__call__`` are those of
    :class:`attention_jax.modules.MultiHeadAttention`: its attributes are the
    fields of :class:`attention_jax.config.AttentionConfig` (documented there)
    except the input widths (``in_features``, ``in_k_features``,
    ``in_v_features``), which are read from the inputs at ``init``; plus
    ``kernel_init`` (default :func:`attention_jax.modules.default_kernel_init`,
    applied to the flattened ``[fan_in, fan_out]`` shape) and ``bias_init``
    (zeros). For MQA and GQA pass ``num_kv_heads`` (1, or a divisor of
    ``num_heads``) or use :func:`MultiQueryAttention` / :func:`GroupedQueryAttention`.
    Configuration errors are raised, by the config's checks, when the module
    first sees its inputs. Dropout draws from the ``'dropout'`` rng collection
    (``apply(..., rngs={'dropout': key})``); ``init`` without one runs without dropout.
    """


def _linen_body(namespace: dict[str, Any]) -> None:
    """Fills the Linen class: one attribute per config field, then the initialisers."""
    fields = {f.name: f for f in dataclasses.fields(AttentionConfig)}
    annotations: dict[str, Any] = {}
    for name in CONFIG_ATTRIBUTES:
        annotations[name] = fields[name].type
        if fields[name].default is not dataclasses.MISSING:
            namespace[name] = fields[name].default
    annotations["kernel_init"] = "Initializer | None"
    namespace["kernel_init"] = None
    annotations["bias_init"] = "Initializer"
    namespace["bias_init"] = nn.initializers.zeros_init()
    namespace["__annotations__"] = annotations
    namespace["__module__"] = __name__
    namespace["__qualname__"] = "MultiHeadAttention"
    namespace["__doc__"] = _DOC
    for name, fn in vars(_Methods).items():
        if callable(fn):
            namespace[name] = fn


MultiHeadAttention = types.new_class("MultiHeadAttention", (nn.Module,), exec_body=_linen_body)


def MultiQueryAttention(num_heads: int, **kwargs) -> MultiHeadAttention:
    """MQA: a Linen :class:`MultiHeadAttention` with one key/value head."""
    return MultiHeadAttention(num_heads, num_kv_heads=1, **kwargs)


def GroupedQueryAttention(num_heads: int, num_kv_heads: int, **kwargs) -> MultiHeadAttention:
    """GQA: a Linen :class:`MultiHeadAttention` whose N query heads share K kv heads."""
    return MultiHeadAttention(num_heads, num_kv_heads=num_kv_heads, **kwargs)


def _nnx_init(name: str, init: Initializer):
    """``init`` applied exactly as the NNX module applies it to parameter ``name``."""

    def fn(rng: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        return modules.init_param_value(name, init, rng, shape, dtype)

    return fn


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def _as_linen(module_or_config: MultiHeadAttention | Mapping[str, Any]) -> MultiHeadAttention:
    if isinstance(module_or_config, MultiHeadAttention):
        return module_or_config
    if isinstance(module_or_config, Mapping):
        return MultiHeadAttention(**module_or_config)
    raise TypeError(
        "expected an attention_jax.linen.MultiHeadAttention or a mapping of its fields; "
        f"got {type(module_or_config).__name__}"
    )


def _param_dict(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The attention parameters from ``{'params': {...}}`` or the inner dict, unboxed."""
    variables = nn.meta.unbox(variables)
    params = variables["params"] if "params" in variables else variables
    return dict(params)


def to_nnx(
    module_or_config: MultiHeadAttention | Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    rngs: nnx.Rngs | None = None,
) -> modules.MultiHeadAttention:
    """The NNX module computing what the Linen module computes with ``variables``.

    Args:
      module_or_config: the Linen :class:`MultiHeadAttention`, or a mapping of
        its fields (``{"num_heads": 8, "num_kv_heads": 2, ...}``).
      variables: ``{'params': {name: array}}`` as ``init`` returns it (boxed or
        unboxed), or the inner parameter dict, e.g. ``variables['params']['attn']``
        of a larger model. The input widths are read from the kernels.
      rngs: the NNX module's ``nnx.Rngs`` (its dropout stream); default
        ``nnx.Rngs(0)``. Its ``params`` stream is not used for the values.

    Returns:
      An :class:`attention_jax.modules.MultiHeadAttention` holding the given
      arrays themselves (no cast, no copy): the same numbers as Linen's ``apply``.

    Raises:
      ValueError: for missing or unexpected parameters, or shapes that do not
        match the configuration (naming both shapes).
    """
    module = _as_linen(module_or_config)
    params = _param_dict(variables)
    missing_kernels = [n for n in _KERNELS if n not in params]
    if missing_kernels:
        raise ValueError(f"parameters lack the kernels {missing_kernels}")
    widths = [jnp.shape(params[n])[0] if jnp.ndim(params[n]) else 0 for n in _KERNELS]
    config = config_of(module, *widths)
    expected = [p.name for p in config.params()]
    missing = [n for n in expected if n not in params]
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(
            f"parameters do not match use_bias={config.use_bias}: missing {missing}, "
            f"unexpected {extra}"
        )
    zeros = nnx.initializers.zeros_init()  # cheap placeholders, replaced below
    nnx_module = modules.MultiHeadAttention.from_config(
        config, kernel_init=zeros, bias_init=zeros, rngs=nnx.Rngs(0) if rngs is None else rngs,
    )
    for spec in config.params():
        param, value = getattr(nnx_module, spec.name), params[spec.name]
        if tuple(jnp.shape(value)) != spec.shape:
            raise ValueError(
                f"{spec.name} has shape {tuple(jnp.shape(value))} but num_heads="
                f"{config.num_heads}, num_kv_heads={config.num_kv_heads}, head_dim="
                f"{config.head_dim}, v_head_dim={config.v_head_dim} give {spec.shape}"
            )
        param.set_value(jnp.asarray(value))
    return nnx_module


def from_nnx(
    nnx_module: modules.MultiHeadAttention,
) -> tuple[MultiHeadAttention, dict[str, dict[str, Array]]]:
    """The Linen module and unboxed variables computing what ``nnx_module`` computes.

    Every option of the config is carried over (resolved: ``head_dim``,
    ``v_head_dim`` and ``out_features`` are explicit) except the initialisers, which the NNX module
    does not keep; the dropout rng comes from Linen's ``'dropout'`` collection.

    Returns:
      ``(module, {'params': {name: array}})``, the arrays those of ``nnx_module``
      (no bias entries when ``use_bias=False``). ``nn.get_partition_spec``
      needs boxed variables: take them from ``jax.eval_shape(module.init, ...)``.
    """
    if not isinstance(nnx_module, modules.MultiHeadAttention):
        raise TypeError(
            "expected an attention_jax.MultiHeadAttention (NNX); "
            f"got {type(nnx_module).__name__}"
        )
    m = nnx_module
    options = {n: getattr(m.config, n) for n in CONFIG_ATTRIBUTES}
    options["deterministic"] = m.deterministic  # the module's current setting
    linen_module = MultiHeadAttention(**options)
    params = {n: getattr(m, n)[...] for n in ALL_PARAM_AXES if getattr(m, n) is not None}
    return linen_module, {"params": params}
