"""Attention benchmarks: attention_jax backends against PyTorch, jax.nn and Flax NNX.

Times, in one process and interleaved (every repetition runs each contender once,
in rotating order, so that load from other processes hits all of them alike):

* ``core``: the attention core at B=4, T=S=1024, N=8, H=64 (forward, forward +
  backward), causal and not: attention_jax "xla" (einsum), "blockwise", "auto",
  ``jax.nn.dot_product_attention`` and ``torch.nn.functional.scaled_dot_product_attention``;
* ``module``: D=512 self-attention layers: attention_jax.MultiHeadAttention,
  ``flax.nnx.MultiHeadAttention`` and ``torch.nn.MultiheadAttention``;
* ``crossover``: einsum vs blockwise for short sequences (the "auto" threshold);
* ``sweep``: T from 256 to 8192 at B=1, N=8, H=64 (causal and not);
* ``memory``: temporary bytes of jit(forward + backward) from XLA's
  ``memory_analysis()`` vs T (compile only, nothing runs), einsum vs blockwise;
* ``largest`` (opt-in): blockwise forward + backward at B=1, T=32768, N=8, H=64;
* ``dots`` (opt-in): the blockwise kernel's seven matrix products alone at its tile
  shapes, JAX against torch, beside both complete passes
  (:mod:`attention_jax.benchmarks.attention_dots`).

GFLOP/s count ``4 B N T S H`` for the forward, 3.5x that for forward + backward,
half of it when causal. ``--dtype bfloat16`` runs every contender (inputs,
parameters, the torch tensors and modules) in bfloat16. Writes
``bench_attention_<backend>.json`` and two plots (time vs T, memory vs T) under
``--out``.

Without ``--out`` it writes to a scratch folder (:func:`attention_jax.cli.default_out`:
``experiments/out`` in a source checkout, else ``./attention-jax-out``); the committed
``experiments/results`` change only with ``--out experiments/results``.

Usage::

  attention-jax bench                     # everything but "largest"
  attention-jax bench --quick             # fewer repetitions, T <= 2048
  attention-jax bench --sections core memory --reps 9
  attention-jax bench --sections largest
  attention-jax bench --tiny              # toy shapes: a smoke test
  attention-jax bench --quick --dtype bfloat16 --out DIR
  python experiments/bench_attention.py   # the same, from a source checkout

Runs on one device; do not set the fake-device XLA flag the tests use.

This module holds the sections (what each measures) and ``main``; the timing and
the contenders are in :mod:`attention_jax.benchmarks.attention_cases`, the tables
and plots in :mod:`attention_jax.benchmarks.attention_report`. Their names are
importable from here as before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from attention_jax import kernels, ops
from attention_jax.benchmarks.attention_cases import (  # noqa: F401 (names of this module)
    _ready,
    core_cases,
    gflops,
    interleaved,
    jax_core_cases,
    module_cases,
    random_qkv,
    to_torch,
    torch_core_cases,
)
from attention_jax.benchmarks.attention_dots import dots_steps, section_dots
from attention_jax.benchmarks.attention_masks import masks_steps, section_masks
from attention_jax.benchmarks.attention_report import plot, summary_tables
from attention_jax.cli import default_out, print_table, progress_bar

# Shapes per section; --tiny swaps in TINY_SHAPES (and short T lists, see main).
SHAPES = {
    "core": dict(B=4, T=1024, N=8, K=8, H=64),
    "module": dict(B=4, T=1024, D=512, N=8),
    "crossover": dict(B=4, N=8, K=8, H=64),
    "sweep": dict(B=1, N=8, K=8, H=64),
    "memory": dict(B=1, N=8, H=64),
    "largest": dict(B=1, T=32768, N=8, H=64),
    "remat": dict(B=1, T=2048, N=8, H=64, L=4),
}
TINY_SHAPES = {
    "core": dict(B=1, T=64, N=4, K=4, H=16),
    "module": dict(B=1, T=64, D=64, N=4),
    "crossover": dict(B=1, N=4, K=4, H=16),
    "sweep": dict(B=1, N=4, K=4, H=16),
    "memory": dict(B=1, N=4, H=16),
    "largest": dict(B=1, T=1024, N=4, H=16),
    "remat": dict(B=1, T=64, N=4, H=16, L=2),
}


def _shape(args, section, dims):
    """The section's dims, in the order of ``dims`` (e.g. ``"BTNKH"``)."""
    return tuple(args.shapes[section][d] for d in dims)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _ratios(res, base, stat="median_ms"):
    return {n: r[stat] / res[base][stat] for n, r in res.items()}


def section_core(args, bar):
    B, T, N, K, H = _shape(args, "core", "BTNKH")
    out = {"shape": dict(B=B, T=T, S=T, N=N, K=K, H=H, dtype=args.dtype)}
    for causal in (False, True):
        fwd, bwd = core_cases(B, T, N, K, H, causal, ["xla", "blockwise", "auto", "jax.nn"],
                              dtype=args.dtype)
        for kind, cases in (("fwd", fwd), ("fwd+bwd", bwd)):
            res = interleaved(cases, args.reps, bar)
            g = gflops(B, N, T, T, H, causal=causal, backward=kind != "fwd")
            for r in res.values():
                r["gflop_s"] = g / (r["median_ms"] / 1e3)
            out[f"{kind}{'-causal' if causal else ''}"] = {
                "results": res, "ratio_vs_torch": _ratios(res, "torch"),
                "ratio_vs_torch_of_min": _ratios(res, "torch", "min_ms")}
    return out


def section_module(args, bar):
    B, T, D, N = _shape(args, "module", "BTDN")
    out = {"shape": dict(B=B, T=T, D=D, N=N, dtype=args.dtype)}
    for causal in (False, True):
        fwd, bwd = module_cases(B, T, D, N, causal, args.dtype)
        for kind, cases in (("fwd", fwd), ("fwd+bwd", bwd)):
            res = interleaved(cases, args.reps, bar)
            out[f"{kind}{'-causal' if causal else ''}"] = {
                "results": res, "ratio_vs_torch": _ratios(res, "torch"),
                "ratio_vs_flax": _ratios(res, "flax.nnx"),
                "ratio_vs_torch_of_min": _ratios(res, "torch", "min_ms"),
                "ratio_vs_flax_of_min": _ratios(res, "flax.nnx", "min_ms")}
    return out


def section_crossover(args, bar):
    B, N, K, H = _shape(args, "crossover", "BNKH")
    out = {"shape": dict(B=B, N=N, K=K, H=H, dtype=args.dtype, causal=False), "T": {}}
    for T in args.crossover_T:
        fwd, bwd = core_cases(B, T, N, K, H, False, ["xla", "blockwise"], with_torch=False,
                              dtype=args.dtype)
        res = interleaved(bwd, args.reps, bar)
        out["T"][T] = {"results": res,
                       "blockwise_over_xla": res["blockwise"]["median_ms"]
                       / res["xla"]["median_ms"],
                       "blockwise_over_xla_of_min": res["blockwise"]["min_ms"]
                       / res["xla"]["min_ms"]}
    return out


def section_sweep(args, bar):
    B, N, K, H = _shape(args, "sweep", "BNKH")
    out = {"shape": dict(B=B, N=N, K=K, H=H, dtype=args.dtype), "runs": []}
    for causal in (False, True):
        for T in args.sweep_T:
            impls = ["blockwise"] + (["xla"] if T <= args.einsum_max_T else [])
            fwd, bwd = core_cases(B, T, N, K, H, causal, impls, dtype=args.dtype)
            res = interleaved(bwd, args.sweep_reps, bar)
            g = gflops(B, N, T, T, H, causal=causal, backward=True)
            for r in res.values():
                r["gflop_s"] = g / (r["median_ms"] / 1e3)
            out["runs"].append({"T": T, "causal": causal, "fwd+bwd": res})
    return out


def temp_bytes(impl, B, T, N, H, causal=True, dtype=jnp.float32):
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.dtype(dtype))

    def loss(q, k, v):
        return ops.dot_product_attention(q, k, v, is_causal=causal, implementation=impl).sum()

    c = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
    return int(c.memory_analysis().temp_size_in_bytes)


def section_memory(args, bar):
    B, N, H = _shape(args, "memory", "BNH")
    rows = []
    for T in args.memory_T:
        rows.append({"T": T, **{i: temp_bytes(i, B, T, N, H, dtype=args.dtype)
                                for i in ("xla", "blockwise")}})
        bar.update(1)
    return {"shape": dict(B=B, N=N, H=H, dtype=args.dtype, causal=True,
                          what="jit(grad) temp_size_in_bytes"), "rows": rows}


def section_largest(args, bar):
    B, T, N, H = _shape(args, "largest", "BTNH")
    q, k, v = random_qkv(B, T, T, N, N, H, args.dtype)
    grad = jax.jit(jax.grad(lambda q, k, v: ops.dot_product_attention(
        q, k, v, is_causal=True, implementation="blockwise").sum(), (0, 1, 2)))
    t0 = time.perf_counter()
    _ready(grad(q, k, v))
    secs = time.perf_counter() - t0
    bar.update(1)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"shape": dict(B=B, T=T, N=N, H=H, causal=True, dtype=args.dtype),
            "seconds_incl_compile": secs, "peak_rss_bytes": peak_rss,
            "temp_bytes": temp_bytes("blockwise", B, T, N, H, dtype=args.dtype)}


def _stack_loss(impl, remat, layers):
    """Sum over ``layers`` residual attention layers ``x = x + attn(x, x, x)`` ([B, T, N, H])."""
    def loss(x):
        for _ in range(layers):
            x = x + ops.dot_product_attention(x, x, x, is_causal=True, implementation=impl,
                                              remat=remat)
        return x.astype(jnp.float32).sum()

    return loss


def section_remat(args, bar):
    """``remat=True`` (jax.checkpoint of the attention) on a stack of layers: memory and time."""
    B, T, N, H, layers = _shape(args, "remat", "BTNHL")
    x = random_qkv(B, T, T, N, N, H, args.dtype)[0]
    rows, cases = [], {}
    for impl in ("xla", "blockwise"):
        for remat in (False, True):
            grad = jax.jit(jax.grad(_stack_loss(impl, remat, layers)))
            temp = int(grad.lower(x).compile().memory_analysis().temp_size_in_bytes)
            name = f"{impl}{' remat' if remat else ''}"
            cases[name] = (lambda g=grad: _ready(g(x)))
            rows.append({"contender": name, "temp_bytes": temp})
    res = interleaved(cases, args.reps, bar)
    for row in rows:
        row.update(median_ms=res[row["contender"]]["median_ms"],
                   min_ms=res[row["contender"]]["min_ms"])
    return {"shape": dict(B=B, T=T, N=N, H=H, layers=layers, dtype=args.dtype, causal=True,
                          what="jit(grad) of a residual stack"), "rows": rows}


def section_precision(args, bar):
    """The core forward+backward in float32 and bfloat16 (softmax in float32 either way)."""
    B, T, N, K, H = _shape(args, "core", "BTNKH")
    q, k, v = random_qkv(B, T, T, N, K, H, jnp.float32)
    want = ops.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    rows, cases = [], {}
    for impl in ("xla", "blockwise", "auto"):
        for dtype in ("float32", "bfloat16"):
            qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
            got = ops.dot_product_attention(qd, kd, vd, is_causal=True, implementation=impl)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
            _, bwd = jax_core_cases(impl, qd, kd, vd, True)
            cases[f"{impl} {dtype}"] = bwd
            rows.append({"contender": f"{impl} {dtype}", "max_err_vs_f32_xla": err})
    res = interleaved(cases, args.reps, bar)
    for row in rows:
        row.update(median_ms=res[row["contender"]]["median_ms"],
                   min_ms=res[row["contender"]]["min_ms"])
    return {"shape": dict(B=B, T=T, N=N, K=K, H=H, causal=True, what="fwd+bwd"),
            "rows": rows}


SECTIONS = {
    "core": (section_core, lambda a: 4 * a.reps),
    "module": (section_module, lambda a: 4 * a.reps),
    "crossover": (section_crossover, lambda a: len(a.crossover_T) * a.reps),
    "sweep": (section_sweep, lambda a: 2 * len(a.sweep_T) * a.sweep_reps),
    "memory": (section_memory, lambda a: len(a.memory_T)),
    "largest": (section_largest, lambda a: 1),
    "remat": (section_remat, lambda a: a.reps),
    "precision": (section_precision, lambda a: a.reps),
    "masks": (section_masks, masks_steps),
    "dots": (section_dots, dots_steps),
}


def main(argv=None):
    """``attention-jax bench``: parses ``argv`` (default ``sys.argv[1:]``) and runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS),
                   default=["core", "module", "crossover", "sweep", "memory"])
    p.add_argument("--reps", type=int, default=None,
                   help="rounds per measurement (default 7; --quick 3; --tiny 2)")
    p.add_argument("--sweep-reps", type=int, default=None,
                   help="rounds per sweep point (default 3; --quick 2; --tiny 1)")
    p.add_argument("--quick", action="store_true", help="3 repetitions, T <= 2048")
    p.add_argument("--tiny", action="store_true",
                   help="toy shapes and T lists, 2 repetitions: a smoke test, times mean nothing")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="inputs, parameters and torch tensors (default float32)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the plots from the JSON in --out")
    p.add_argument("--no-plot", action="store_true", help="write no plots")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for bench_attention_<backend>.json and its plots (default: "
                        "experiments/out in a source checkout, else ./attention-jax-out)")
    args = p.parse_args(argv)
    # torch with XLA's thread count and OpenMP's passive wait (see benchmarks.decode)
    from attention_jax.benchmarks.decode import match_threads
    args.threads = match_threads()
    args.out = default_out() if args.out is None else args.out
    args.shapes = TINY_SHAPES if args.tiny else SHAPES
    args.crossover_T = [128, 256, 384, 512, 768, 1024]
    args.sweep_T = [256, 512, 1024, 2048, 4096, 8192]
    args.memory_T = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    args.einsum_max_T = 4096
    reps, sweep_reps = 7, 3
    if args.quick:
        reps, sweep_reps = 3, 2
        args.sweep_T = [t for t in args.sweep_T if t <= 2048]
        args.crossover_T = [128, 256, 512, 1024]
    if args.tiny:
        reps, sweep_reps = 2, 1
        args.crossover_T, args.sweep_T, args.memory_T = [32, 64], [64, 128], [64, 128]
    args.reps = reps if args.reps is None else args.reps
    args.sweep_reps = sweep_reps if args.sweep_reps is None else args.sweep_reps
    stem = args.out / f"bench_attention_{jax.default_backend()}"

    if args.replot:
        plot(json.loads(Path(f"{stem}.json").read_text()), str(stem))
        return

    import torch

    results = {"meta": {
        "jax": jax.__version__, "torch": torch.__version__, "device": str(jax.devices()[0]),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "threads": args.threads,
        "load_avg_start": os.getloadavg(),
        "command": " ".join(sys.argv), "auto_einsum_max_ts": kernels.AUTO_EINSUM_MAX_TS,
        "dtype": args.dtype, "tiny": args.tiny,
    }}
    total = sum(SECTIONS[s][1](args) for s in args.sections)
    with progress_bar(total, "bench") as bar:
        for s in args.sections:
            bar.set_postfix_str(s)
            results[s] = SECTIONS[s][0](args, bar)
    results["meta"]["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
    if not args.no_plot:
        plot(results, str(stem))
    for title, rows in summary_tables(results):
        print_table(rows, title=title)
    print(f"wrote {stem}.json" + ("" if args.no_plot else f" and {stem}_*.png"))
