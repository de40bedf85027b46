"""Closure conversion of ``score_mod`` that is correct inside ``jax.shard_map``.

A ``score_mod`` may close over arrays (learned ALiBi slopes, a bias table). The
kernels' ``custom_vjp`` needs them as explicit operands to return their cotangents;
``jax.closure_convert`` hoists them, but an array that every device holds whole
(``in_specs=P()``) stays *invariant*. Its per-tile ``jax.vjp`` against varying tiles
then transposes the implicit ``pvary`` into a ``psum``: every tile's cotangent is
summed over the devices, and the gradient comes out multiplied by the axis size.

:func:`convert_varying` hoists them and marks them varying over the axes the
kernel's operands vary over (``lax.pcast``, before the ``custom_vjp``): every
device's kernel keeps its own cotangent (no collective per tile) and autodiff sums
them once, in the transpose of that mark. The returned function replays the traced
one with each operation's operands cast to their common varying axes (what
``jax.numpy`` does while tracing), so it runs on the marked arrays. Outside
shard_map every mark is a no-op and the replay is the traced function itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from attention_jax.kernels import tiles

Array = jax.Array


def convert_varying(fn: Callable, examples: Sequence[Array], refs) -> tuple[Callable, tuple]:
    """``(converted, consts)`` with ``converted(*args, *consts) == fn(*args)``.

    Args:
      fn: a function of arrays shaped like ``examples``.
      examples: arrays (or ``jax.ShapeDtypeStruct``) giving the argument shapes and
        dtypes; only shapes and dtypes are used.
      refs: arrays (a pytree) whose varying mesh axes the constants take on (the
        kernel's q, k, v); ignored outside ``jax.shard_map``.

    Returns:
      ``converted`` and the tuple of arrays ``fn`` closes over, each varying over
      at least the axes ``refs`` vary over.
    """
    shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in examples]
    closed = jax.make_jaxpr(fn)(*shapes)
    consts = tuple(tiles.varying_like(jnp.asarray(c), refs, *closed.consts)
                   for c in closed.consts)

    def converted(*args):
        n = len(shapes)
        return _replay(closed.jaxpr, args[n:], *args[:n])[0]

    return converted, consts


_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr"}


def _replay(jaxpr, consts, *args):
    """Evaluates ``jaxpr``, casting each operation's operands to their common varying
    mesh axes (``pvary`` adds only the axes its operand lacks); calls are inlined."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    for var, x in zip(jaxpr.constvars, consts, strict=True):
        env[var] = x
    for var, x in zip(jaxpr.invars, args, strict=True):
        env[var] = x
    for eqn in jaxpr.eqns:
        ins = [read(var) for var in eqn.invars]
        name = eqn.primitive.name
        if name == "pvary":
            outs = [_vary(x, eqn.params["axes"]) for x in ins]
        elif name in _CALLS and _CALLS[name] in eqn.params:
            inner = eqn.params[_CALLS[name]]
            sub, sub_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (
                inner, ())
            outs = _replay(sub, sub_consts, *ins)
        else:
            ins = [tiles.varying_like(jnp.asarray(x), *ins) for x in ins]
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, x in zip(eqn.outvars, outs, strict=True):
            env[var] = x
    return [read(var) for var in jaxpr.outvars]


def _vary(x, axes):
    """``x`` varying over ``axes`` too (a no-op for the axes it already varies over)."""
    missing = tuple(a for a in axes if a not in tiles.varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


__all__ = ["convert_varying"]
