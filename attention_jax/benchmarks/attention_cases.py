"""Timing and contenders of :mod:`attention_jax.benchmarks.attention`.

:func:`interleaved` times zero-argument callables in rotating order (so load from
other processes hits every contender alike); :func:`gflops` counts the attention
flops. The contenders are pairs of zero-argument callables (forward, forward +
backward): :func:`core_cases` (attention_jax implementations, ``jax.nn`` and torch
SDPA on random ``[B, T, N, H]`` / ``[B, S, K, H]`` inputs) and
:func:`module_cases` (attention_jax, Flax NNX and torch layers on ``[B, T, D]``).
The sections that use them and ``main`` are in
:mod:`attention_jax.benchmarks.attention`, the tables and plots in
:mod:`attention_jax.benchmarks.attention_report`; every name here is importable
from :mod:`attention_jax.benchmarks.attention` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attention_jax
from attention_jax import ops


def to_torch(x):
    """A JAX array as a torch tensor of the same dtype (float32 or bfloat16)."""
    import torch

    # a writable copy: numpy views of JAX arrays are read-only, which torch warns about
    x32 = np.array(x, np.float32)
    return torch.from_numpy(x32).to(getattr(torch, jnp.dtype(x.dtype).name))


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def interleaved(cases: dict[str, Callable[[], object]], reps: int, bar=None) -> dict:
    """Runs each zero-argument case once to warm up, then ``reps`` rounds of all of
    them in rotating order. Returns ``{name: {"median_ms", "min_ms", "all_ms"}}``."""
    names = list(cases)
    for n in names:
        cases[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            cases[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
        if bar is not None:
            bar.update(1)
    return {
        n: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)), "all_ms": t}
        for n, t in times.items()
    }


def gflops(B, N, T, S, H, *, causal, backward):
    f = 4.0 * B * N * T * S * H * (3.5 if backward else 1.0)
    return f / (2.0 if causal else 1.0) / 1e9


def _ready(x):
    return jax.block_until_ready(x)


# ---------------------------------------------------------------------------
# Contenders: core
# ---------------------------------------------------------------------------


def jax_core_cases(impl, q, k, v, causal):
    """``(forward, forward + backward)`` zero-argument callables for a JAX function."""
    if impl == "jax.nn":
        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    else:
        def fn(q, k, v):
            return ops.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    fwd = jax.jit(fn)
    bwd = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2)))
    return (lambda: _ready(fwd(q, k, v))), (lambda: _ready(bwd(q, k, v)))


def torch_core_cases(q, k, v, causal):
    import torch
    import torch.nn.functional as F

    tq, tk, tv = (to_torch(x).transpose(1, 2).contiguous() for x in (q, k, v))
    gq, gk, gv = (x.clone().requires_grad_() for x in (tq, tk, tv))
    gqa = tq.shape[1] != tk.shape[1]

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=gqa)

    def bwd():
        out = F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal, enable_gqa=gqa)
        out.sum().backward()
        for x in (gq, gk, gv):
            x.grad = None

    return fwd, bwd


def random_qkv(B, T, S, N, K, H, dtype=jnp.float32, seed=0):
    dtype = jnp.dtype(dtype)
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, H))
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def core_cases(B, T, N, K, H, causal, impls, with_torch=True, dtype=jnp.float32):
    q, k, v = random_qkv(B, T, T, N, K, H, dtype)
    fwd, bwd = {}, {}
    for impl in impls:
        fwd[impl], bwd[impl] = jax_core_cases(impl, q, k, v, causal)
    if with_torch:
        fwd["torch"], bwd["torch"] = torch_core_cases(q, k, v, causal)
    return fwd, bwd


# ---------------------------------------------------------------------------
# Contenders: modules
# ---------------------------------------------------------------------------


def module_cases(B, T, D, N, causal, dtype=jnp.float32):
    from flax import nnx

    dtype = jnp.dtype(dtype)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), dtype)

    def jax_pair(module, call):
        graphdef, state = nnx.split(module)

        def apply(state, x):
            return call(nnx.merge(graphdef, state), x)

        fwd = jax.jit(apply)
        bwd = jax.jit(jax.grad(lambda s, x: apply(s, x).sum(), (0, 1)))
        return (lambda: _ready(fwd(state, x))), (lambda: _ready(bwd(state, x)))

    fwd, bwd = {}, {}
    ours = attention_jax.MultiHeadAttention(D, N, param_dtype=dtype, rngs=nnx.Rngs(0))
    fwd["attention_jax"], bwd["attention_jax"] = jax_pair(
        ours, lambda m, x: m(x, is_causal=causal))
    flax_mha = nnx.MultiHeadAttention(N, D, decode=False, deterministic=True, param_dtype=dtype,
                                      rngs=nnx.Rngs(0))
    fwd["flax.nnx"], bwd["flax.nnx"] = jax_pair(
        flax_mha, lambda m, x: m(x, is_causal=causal))

    import torch

    tx = to_torch(x)
    tmha = torch.nn.MultiheadAttention(D, N, batch_first=True, dtype=tx.dtype)
    gx = tx.clone().requires_grad_()
    mask = (torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=tx.dtype)
            if causal else None)

    def t_fwd():
        with torch.no_grad():
            return tmha(tx, tx, tx, need_weights=False, attn_mask=mask, is_causal=causal)

    def t_bwd():
        out, _ = tmha(gx, gx, gx, need_weights=False, attn_mask=mask, is_causal=causal)
        out.sum().backward()
        tmha.zero_grad()
        gx.grad = None

    fwd["torch"], bwd["torch"] = t_fwd, t_bwd
    return fwd, bwd
