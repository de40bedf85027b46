"""score_mod closures under context parallelism: the arrays a score_mod closes over
made explicit operands, so that gradients flow to them through the ring's
``custom_vjp`` and through the all-gather (see :func:`convert_score_mod`).

:func:`convert_score_mod` and :func:`bind_score_mod` are importable from
:mod:`attention_jax.parallel.context` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from attention_jax.kernels import block_step, tiles

Array = jax.Array


def convert_score_mod(score_mod, q: Array, k: Array, v: Array, *, q_positions=None,
                      kv_positions=None, head_offset=0, block_q: int | None = None,
                      block_kv: int | None = None):
    """``(fn, consts)``: ``score_mod`` traced at the blockwise kernel's tile shapes for
    the block pair (q, k), the arrays it closes over made explicit:
    ``fn(score, b, n, t, s, *consts)``.

    The closed-over arrays (e.g. learned ALiBi slopes) become ``consts``, so a
    ``custom_vjp`` can take them as operands and return their cotangents. Inside
    ``jax.shard_map`` they are marked varying over the axes q, k, v vary over
    (``lax.pcast``): every device's kernel keeps its own cotangent (no collective per
    tile) and autodiff sums them once, in the transpose of that mark. ``fn`` replays
    the traced function with each operation's operands cast to their common varying
    axes (what ``jax.numpy`` does while tracing), so it runs on the marked arrays.

    Args:
      score_mod: ``fn(score, b, n, t, s)`` (as in
        :func:`attention_jax.parallel.context.all_gather_attention`).
      q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, V]``: the kernel call's operands.
      q_positions, kv_positions, head_offset, block_q, block_kv: the kernel call's.

    Returns:
      ``(fn, consts)``; :func:`bind_score_mod` gives back a ``score_mod``.
    """
    built = block_step._build(q, k, v, None, is_causal=False, scale=None, block_q=block_q,
                              block_kv=block_kv, score_mod=None, q_positions=q_positions,
                              kv_positions=kv_positions, head_offset=head_offset)
    cfg, q_pos, kv_pos = built[0], built[5], built[6]
    idx = tiles.tile_index(0, 0, cfg, q.shape[0],
                           tiles.padded_positions(q_pos, cfg.T, cfg.nq * cfg.block_q),
                           tiles.padded_positions(kv_pos, cfg.S, cfg.nk * cfg.block_kv), 0)
    tile = (q.shape[0], cfg.K, cfg.block_q, cfg.G, cfg.block_kv)
    examples = [jnp.zeros(tile, jnp.float32)] + [  # shapes only: nothing varying
        jnp.zeros(jnp.shape(x), jnp.int32) for x in (idx.b, idx.n, idx.q_pos, idx.kv_pos)]
    closed = jax.make_jaxpr(score_mod)(*examples)
    consts = tuple(tiles.varying_like(jnp.asarray(c), q, k, v, *closed.consts)
                   for c in closed.consts)

    def fn(score, b, n, t, s, *cs):
        return _replay(closed.jaxpr, cs, score, b, n, t, s)[0]

    return fn, consts


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


def bind_score_mod(fn, consts):
    """``score_mod(score, b, n, t, s)`` = ``fn(score, b, n, t, s, *consts)`` (None for None)."""
    if fn is None:
        return None
    return lambda score, b, n, t, s: fn(score, b, n, t, s, *consts)


__all__ = ["bind_score_mod", "convert_score_mod"]
