"""Stacks of attention layers: one module with a leading layer axis, run by one scan.

An L-layer decoder built as L modules and L calls traces, and under ``jax.jit``
compiles, L copies of the layer. Built instead as ONE module whose every Param has
a leading ``[L_layers]`` axis (``nnx.vmap`` over the creation, :func:`stacked`) and
run by ``nnx.scan`` over that axis (:func:`stack_forward`, :func:`stack_decode`),
the program holds one layer body inside one loop, whatever L: compile time stays
flat in L, and a decode step is one jitted call.

The KV cache stays the per-layer :class:`~attention_jax.cache.KVCache` pytree; a
stacked cache is that pytree with a leading ``L_layers`` axis on every leaf (a
tree-map, :func:`init_stacked_cache`, :func:`stack_caches`), so ``k`` is
``[L_layers, B, K, L, H]`` and ``lengths`` ``[L_layers, B]``; the scan hands layer
``l`` its slice ``[B, K, L, H]``. Its ``batch_size`` / ``max_length`` properties
read the per-layer shapes and do not apply to the stacked pytree: use
:func:`layer_cache` for one layer.

The pattern, a 3-layer GQA stack: forward, then a prefill and one step::

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attention_jax.config import AttentionConfig
    >>> from attention_jax import stack
    >>> cfg = AttentionConfig(16, 4, num_kv_heads=2)              # D=16, N=4, K=2
    >>> layers = stack.stacked(cfg, 3, rngs=nnx.Rngs(0))
    >>> layers.q_kernel.shape                                      # [L_layers, D, N, H]
    (3, 16, 4, 4)
    >>> x = jnp.ones((2, 5, 16))                                    # [B, T, D]
    >>> stack.stack_forward(layers, x, is_causal=True).shape        # x + attn(x), 3 times
    (2, 5, 16)
    >>> cache = stack.init_stacked_cache(layers, 3, batch_size=2, max_length=8)
    >>> cache.k.shape                                               # [L_layers, B, K, L, H]
    (3, 2, 2, 8, 4)
    >>> step = nnx.jit(stack.stack_decode)                          # one compiled step
    >>> y, cache = step(layers, x, cache)                           # prefill 5 tokens
    >>> y, cache = step(layers, x[:, :1], cache)                    # one token
    >>> y.shape, cache.lengths.tolist()
    ((2, 1, 16), [[6, 6], [6, 6], [6, 6]])

A model with more in its layer than attention passes its own ``body``
(``body(layer, x, **kwargs) -> x``, for decoding ``body(layer, x, cache, **kwargs)
-> (x, cache)``) and a ``factory`` (``factory(rngs) -> module``) that builds one
layer of any NNX module; per-layer modules built apart (e.g. by
:func:`attention_jax.interop.from_hf`) are stacked by :func:`stack_modules`.
Params carry the logical axis ``"layers"`` (:data:`LAYERS`) first in their
``out_sharding`` metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import cache as kv_cache
from attention_jax.config import AttentionConfig
from attention_jax.modules import MultiHeadAttention

Array = jax.Array
#: The logical axis name of the leading layer axis (in each Param's ``out_sharding``).
LAYERS = "layers"
_METADATA = {nnx.PARTITION_NAME: LAYERS}

Factory = Callable[[nnx.Rngs], nnx.Module]


def _check_num_layers(num_layers: int) -> None:
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1; got {num_layers!r}")


def _factory(config_or_factory: AttentionConfig | Factory) -> Factory:
    """``rngs -> module``: the factory itself, or the config's MultiHeadAttention."""
    if isinstance(config_or_factory, AttentionConfig):
        return lambda rngs: MultiHeadAttention.from_config(config_or_factory, rngs=rngs)
    if callable(config_or_factory):
        return config_or_factory
    raise TypeError("config_or_factory must be an AttentionConfig or a callable "
                    f"rngs -> module; got {type(config_or_factory).__name__}")


def stacked(config_or_factory: AttentionConfig | Factory, num_layers: int, *,
            rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` layers of one structure as one module with a leading layer axis.

    Every layer draws its own parameters (the ``rngs`` streams are split
    ``num_layers`` ways), so layer ``l`` is the module ``factory`` would build from
    the ``l``-th split key. Each Param is ``[L_layers, ...]`` its per-layer shape,
    with :data:`LAYERS` first in its ``out_sharding`` metadata.

    Args:
      config_or_factory: an :class:`~attention_jax.config.AttentionConfig` (the layer
        is its :class:`~attention_jax.modules.MultiHeadAttention`) or a callable
        ``factory(rngs) -> nnx.Module`` building one layer.
      num_layers: L_layers >= 1.
      rngs: the ``nnx.Rngs`` of the layers (``params``, and ``dropout`` if used).

    Returns:
      The stacked module (run it with :func:`stack_forward` / :func:`stack_decode`).
    """
    _check_num_layers(num_layers)
    factory = _factory(config_or_factory)

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_METADATA)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return factory(rngs)

    return create(rngs)


def _check_same_config(i: int, config_i: Any, config_0: Any) -> None:
    """Raises ValueError naming the fields in which module ``i``'s config differs."""
    if config_i == config_0:
        return
    if isinstance(config_i, AttentionConfig) and isinstance(config_0, AttentionConfig):
        a, b = config_i.to_dict(), config_0.to_dict()
        diff = ", ".join(f"{k}={a[k]!r} vs {b[k]!r}" for k in a if a[k] != b.get(k))
    else:
        diff = f"{config_i!r} vs {config_0!r}"
    raise ValueError(f"stack_modules: module {i}'s config differs from module 0's: {diff}")


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """Separately built layers of one structure (configs, shapes) as one stacked module.

    The inverse of :func:`layer`: ``stack_modules([layer(s, i) for i in range(L)])``
    holds the parameters of ``s``. Values are copied (the inputs stay usable).

    Raises:
      ValueError: when there are no modules, or module ``i``'s structure (its
        config, or its graph / parameter shapes) differs from module 0's.
    """
    if not modules:
        raise ValueError("stack_modules needs at least one module; got none")
    graphdef, first = nnx.split(modules[0])
    states = [first]
    shapes = jax.tree.map(jnp.shape, first)
    for i, module in enumerate(modules[1:], start=1):
        _check_same_config(i, getattr(module, "config", None), getattr(modules[0], "config", None))
        g, state = nnx.split(module)
        if g != graphdef or jax.tree.map(jnp.shape, state) != shapes:
            raise ValueError(f"stack_modules: module {i}'s structure or parameter shapes "
                             "differ from module 0's")
        states.append(state)
    values = jax.tree.map(lambda *a: jnp.stack(a), *states)
    return nnx.merge(graphdef, nnx.spmd.add_axis(values, 0, _METADATA))


def num_stacked(stack: nnx.Module) -> int:
    """L_layers: the leading axis of the stack's parameters."""
    leaves = jax.tree.leaves(nnx.state(stack, nnx.Param))
    if not leaves:
        raise ValueError("the stack has no parameters to read its layer count from")
    return int(leaves[0].shape[0])


def layer(stack: nnx.Module, index: int) -> nnx.Module:
    """Layer ``index`` of a stack as a module of its own (a copy of its parameters)."""
    n = num_stacked(stack)
    if not -n <= index < n:
        raise IndexError(f"layer index {index} out of range for a stack of {n} layers")
    graphdef, state = nnx.split(stack)
    one = jax.tree.map(lambda a: a[index], state)
    return nnx.merge(graphdef, nnx.spmd.remove_axis(one, 0, _METADATA))


# ---------------------------------------------------------------------------
# Stacked caches: a KVCache with a leading layer axis (tree-maps)
# ---------------------------------------------------------------------------


def _layer_config(module_or_config: Any) -> AttentionConfig:
    if isinstance(module_or_config, AttentionConfig):
        return module_or_config
    config = getattr(module_or_config, "config", None)
    if not isinstance(config, AttentionConfig):
        raise TypeError("module_or_config must be an AttentionConfig or a module with one "
                        f"(.config); got {type(module_or_config).__name__}")
    return config


def init_stacked_cache(module_or_config: Any, num_layers: int, batch_size: int,
                       max_length: int, dtype: Any = None, *,
                       padding: Array | None = None) -> kv_cache.KVCache:
    """An empty cache for every layer: a :class:`~attention_jax.cache.KVCache` whose
    leaves have a leading ``[L_layers]`` axis (``k [L_layers, B, K, L, H]``).

    Args:
      module_or_config: a module (a stack of them too) or its ``AttentionConfig``.
      num_layers: L_layers >= 1.
      batch_size, max_length: B and L of each layer's cache.
      dtype: as :meth:`MultiHeadAttention.init_cache` (default the config's
        ``dtype``, else ``param_dtype``; ``jnp.int8`` for a quantized cache).
      padding: ``[B]`` left-padding slots per row, for left-padded prompts: every
        layer's cache is :func:`attention_jax.cache.left_padded` with it.
    """
    _check_num_layers(num_layers)
    cfg = _layer_config(module_or_config)
    if dtype is None:
        dtype = cfg.param_dtype if cfg.dtype is None else cfg.dtype
    one = kv_cache.init_cache(batch_size, max_length, cfg.num_kv_heads, cfg.head_dim,
                              cfg.v_head_dim, dtype)
    if padding is not None:
        one = kv_cache.left_padded(one, padding)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_layers, *a.shape)).copy(), one)


def stack_caches(caches: Sequence[kv_cache.KVCache]) -> kv_cache.KVCache:
    """Per-layer caches (same shapes) as one stacked cache (leading layer axis)."""
    if not caches:
        raise ValueError("stack_caches needs at least one cache; got none")
    return jax.tree.map(lambda *a: jnp.stack(a), *caches)


def layer_cache(stacked_cache: kv_cache.KVCache, index: int) -> kv_cache.KVCache:
    """Layer ``index``'s :class:`~attention_jax.cache.KVCache` of a stacked cache."""
    return jax.tree.map(lambda a: a[index], stacked_cache)


# ---------------------------------------------------------------------------
# Running a stack: one nnx.scan over the layer axis
# ---------------------------------------------------------------------------


def residual_attention(layer: nnx.Module, x: Array, **kwargs: Any) -> Array:
    """The default forward body: ``x + layer(x, **kwargs)`` (``[B, T, D] -> [B, T, D]``)."""
    return x + layer(x, **kwargs)


def residual_decode(layer: nnx.Module, x: Array, cache: kv_cache.KVCache,
                    **kwargs: Any) -> tuple[Array, kv_cache.KVCache]:
    """The default decode body: ``y, cache = layer.decode(x, cache, **kwargs)``, then
    ``(x + y, cache)``."""
    y, cache = layer.decode(x, cache, **kwargs)
    return x + y, cache


def stack_forward(stack: nnx.Module, x: Array, *, body: Callable[..., Array] | None = None,
                  **kwargs: Any) -> Array:
    """``x`` through every layer in order, as one ``nnx.scan`` over the layer axis.

    Args:
      stack: from :func:`stacked` or :func:`stack_modules`.
      x: ``[B, T, D]`` (the carry: ``body`` must return the same shape and dtype).
      body: ``body(layer, x, **kwargs) -> x``, one layer's step; default
        :func:`residual_attention` (``x + layer(x, **kwargs)``, so D = Do).
      **kwargs: passed to every layer's ``body`` (``is_causal``, ``mask``,
        ``positions``, ...): the same values for each layer.

    Returns:
      ``[B, T, D]``, the last layer's output.
    """
    body = residual_attention if body is None else body

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=_METADATA)
    def scan(layer: nnx.Module, x: Array) -> Array:
        return body(layer, x, **kwargs)

    return scan(stack, x)


def stack_decode(stack: nnx.Module, x: Array, stacked_cache: kv_cache.KVCache, *,
                 body: Callable[..., tuple[Array, kv_cache.KVCache]] | None = None,
                 **kwargs: Any) -> tuple[Array, kv_cache.KVCache]:
    """One decode call (a prefill, t > 1, or a step, t = 1) through every layer, as
    one ``nnx.scan`` over the layer axis of the stack and of its cache.

    Wrap it in ``nnx.jit`` (optionally ``donate_argnums=2``): one compiled step
    for all the layers.

    Args:
      stack: from :func:`stacked` or :func:`stack_modules`.
      x: ``[B, t, D]`` the new tokens' inputs to layer 0.
      stacked_cache: from :func:`init_stacked_cache` (or a previous call), leaves
        ``[L_layers, ...]``.
      body: ``body(layer, x, cache, **kwargs) -> (x, cache)`` on layer ``l`` and its
        cache slice; default :func:`residual_decode`.
      **kwargs: passed to every layer's ``body`` (``mask``, ``valid_lengths``).

    Returns:
      ``(x [B, t, D] after the last layer, the updated stacked cache)``.

    Raises:
      ValueError: naming both numbers, when the cache's layer axis is not the
        stack's layer count.
    """
    n, n_cache = num_stacked(stack), stacked_cache.lengths.shape[0]
    if stacked_cache.lengths.ndim != 2 or n_cache != n:
        raise ValueError(
            f"stacked_cache must have a leading layer axis of {n} (the stack's layers): "
            f"its lengths are {tuple(stacked_cache.lengths.shape)}, expected ({n}, B)")
    body = residual_decode if body is None else body

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata=_METADATA)
    def scan(layer: nnx.Module, x: Array, cache: kv_cache.KVCache):
        return body(layer, x, cache, **kwargs)

    return scan(stack, x, stacked_cache)
