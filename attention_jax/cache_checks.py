"""The cache's checks: shapes and values of ``valid_lengths``, capacity, and
:func:`checked` (the data-dependent checks of jitted steps through ``checkify``).

Split from :mod:`attention_jax.cache` (which re-exports every name here); the
data structure, its update and int8 storage stay there.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

if TYPE_CHECKING:
    from attention_jax import cache as kv_cache

Array = jax.Array


def _is_concrete(*xs: Array | int) -> bool:
    """True when every value can be read on the host (eager), False under tracing."""
    try:
        for x in xs:
            np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


# Set while a function runs under :func:`checked`: steps then emit checkify checks.
_CHECKIFY = contextvars.ContextVar("attention_jax_cache_checkify", default=False)


def resolve_valid_lengths(valid_lengths: Array | None, batch: int, t: int) -> Array:
    """``[B]`` int32 real tokens per row among t new ones: the given ones checked, or all t.

    Under ``jit`` the values cannot be checked: :func:`update` clips them to
    ``[0, t]`` and counts the step in ``cache.clipped``.

    Raises:
      TypeError: for a float or boolean ``valid_lengths``.
      ValueError: for a shape other than ``[batch]``, or (eagerly) a value outside ``[0, t]``.
    """
    if valid_lengths is None:
        return jnp.full((batch,), t, jnp.int32)
    dtype = jnp.result_type(valid_lengths)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"valid_lengths must be integers (tokens per row); got dtype {dtype}"
        )
    valid_lengths = jnp.asarray(valid_lengths, jnp.int32)
    if valid_lengths.shape != (batch,):
        raise ValueError(
            f"valid_lengths must be [batch] = [{batch}]; got shape {valid_lengths.shape}"
        )
    if _is_concrete(valid_lengths):
        bad = np.flatnonzero((np.asarray(valid_lengths) < 0) | (np.asarray(valid_lengths) > t))
        if bad.size:
            b = int(bad[0])
            raise ValueError(
                f"valid_lengths[{b}] = {int(valid_lengths[b])} is outside [0, {t}] "
                f"for {t} new tokens"
            )
    elif _CHECKIFY.get():
        checkify.check(jnp.all((valid_lengths >= 0) & (valid_lengths <= t)),
                       f"valid_lengths outside [0, {t}]: {{}}", valid_lengths)
    return valid_lengths


def check_capacity(cache: kv_cache.KVCache, new_tokens: Array | int) -> None:
    """Raises if storing ``new_tokens`` (scalar or ``[B]``) would pass ``max_length``.

    When the lengths are traced (inside ``jit``) nothing can be raised here:
    the step drops the tokens and counts them in ``cache.dropped`` (call
    :meth:`~attention_jax.cache.KVCache.check` on the result), or, under :func:`checked`, raises
    through ``checkify``.

    Raises:
      ValueError: naming the row, its length, the new tokens and ``max_length``.
    """
    if not _is_concrete(cache.lengths, new_tokens):
        if _CHECKIFY.get():
            room = jnp.asarray(cache.lengths) + jnp.asarray(new_tokens) <= cache.max_length
            checkify.check(jnp.all(room), f"KV cache overflow: lengths {{}} plus new tokens "
                           f"{{}} pass max_length {cache.max_length}",
                           cache.lengths, jnp.broadcast_to(new_tokens, cache.lengths.shape))
        return
    lengths = np.asarray(cache.lengths)
    new = np.broadcast_to(np.asarray(new_tokens), lengths.shape)
    over = np.flatnonzero(lengths + new > cache.max_length)
    if over.size:
        b = int(over[0])
        raise ValueError(
            f"KV cache overflow: row {b} holds {int(lengths[b])} tokens and {int(new[b])} more "
            f"would need {int(lengths[b] + new[b])} positions, but max_length is "
            f"{cache.max_length}; create the cache with a larger max_length"
        )


def checked(fn: Callable, **jit_kwargs) -> Callable:
    """``fn`` jitted with the cache's data-dependent checks raising (``jax.experimental.checkify``).

    Inside the returned function, every decode step checks that no row
    overflows ``max_length`` and that ``valid_lengths`` lies in ``[0, t]``; a
    failure raises ``checkify.JaxRuntimeError`` after the step with the values.
    The checks cost a reduction and a host sync per call; without
    :func:`checked`, a jitted step records the same facts in the cache
    (``dropped``, ``clipped``) for :meth:`~attention_jax.cache.KVCache.check`.

    Args:
      fn: a function of arrays and pytrees (e.g. ``nnx.split`` state) that runs decode steps.
      **jit_kwargs: passed to ``jax.jit`` (``donate_argnums=...``).

    >>> import jax.numpy as jnp
    >>> from attention_jax.cache import init_cache, update
    >>> step = checked(lambda c, k: update(c, k, k), donate_argnums=0)
    >>> c = step(init_cache(1, 2, 1, 4), jnp.ones((1, 2, 1, 4)))
    >>> step(c, jnp.ones((1, 1, 1, 4)))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    JaxRuntimeError: KV cache overflow: ...
    """
    def traced(*args, **kwargs):
        token = _CHECKIFY.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _CHECKIFY.reset(token)

    run = jax.jit(checkify.checkify(traced), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        err, out = run(*args, **kwargs)
        err.throw()
        return out

    return call
