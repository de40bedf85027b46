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
* ``largest`` (opt-in): blockwise forward + backward at B=1, T=32768, N=8, H=64.

GFLOP/s count ``4 B N T S H`` for the forward, 3.5x that for forward + backward,
half of it when causal. Writes JSON and two plots (time vs T, memory vs T).

Usage::

  python experiments/bench_attention.py                 # everything but "largest"
  python experiments/bench_attention.py --quick         # fewer repetitions, T <= 2048
  python experiments/bench_attention.py --sections core memory --reps 9
  python experiments/bench_attention.py --sections largest

Runs on one device; do not set the fake-device XLA flag the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attention_jax
from attention_jax import kernels, ops

RESULTS = Path(__file__).resolve().parent / "results"


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

    tq, tk, tv = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous() for x in (q, k, v))
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
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, H))
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def core_cases(B, T, N, K, H, causal, impls, with_torch=True):
    q, k, v = random_qkv(B, T, T, N, K, H)
    fwd, bwd = {}, {}
    for impl in impls:
        fwd[impl], bwd[impl] = jax_core_cases(impl, q, k, v, causal)
    if with_torch:
        fwd["torch"], bwd["torch"] = torch_core_cases(q, k, v, causal)
    return fwd, bwd


# ---------------------------------------------------------------------------
# Contenders: modules
# ---------------------------------------------------------------------------


def module_cases(B, T, D, N, causal):
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), jnp.float32)

    def jax_pair(module, call):
        graphdef, state = nnx.split(module)

        def apply(state, x):
            return call(nnx.merge(graphdef, state), x)

        fwd = jax.jit(apply)
        bwd = jax.jit(jax.grad(lambda s, x: apply(s, x).sum(), (0, 1)))
        return (lambda: _ready(fwd(state, x))), (lambda: _ready(bwd(state, x)))

    fwd, bwd = {}, {}
    ours = attention_jax.MultiHeadAttention(D, N, rngs=nnx.Rngs(0))
    fwd["attention_jax"], bwd["attention_jax"] = jax_pair(
        ours, lambda m, x: m(x, is_causal=causal))
    flax_mha = nnx.MultiHeadAttention(N, D, decode=False, deterministic=True, rngs=nnx.Rngs(0))
    fwd["flax.nnx"], bwd["flax.nnx"] = jax_pair(
        flax_mha, lambda m, x: m(x, is_causal=causal))

    import torch

    tmha = torch.nn.MultiheadAttention(D, N, batch_first=True)
    tx = torch.from_numpy(np.array(x))
    gx = tx.clone().requires_grad_()
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T) if causal else None

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


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _ratios(res, base, stat="median_ms"):
    return {n: r[stat] / res[base][stat] for n, r in res.items()}


def section_core(args, bar):
    B, T, N, K, H = 4, 1024, 8, 8, 64
    out = {"shape": dict(B=B, T=T, S=T, N=N, K=K, H=H, dtype="float32")}
    for causal in (False, True):
        fwd, bwd = core_cases(B, T, N, K, H, causal, ["xla", "blockwise", "auto", "jax.nn"])
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
    B, T, D, N = 4, 1024, 512, 8
    out = {"shape": dict(B=B, T=T, D=D, N=N, dtype="float32")}
    for causal in (False, True):
        fwd, bwd = module_cases(B, T, D, N, causal)
        for kind, cases in (("fwd", fwd), ("fwd+bwd", bwd)):
            res = interleaved(cases, args.reps, bar)
            out[f"{kind}{'-causal' if causal else ''}"] = {
                "results": res, "ratio_vs_torch": _ratios(res, "torch"),
                "ratio_vs_flax": _ratios(res, "flax.nnx"),
                "ratio_vs_torch_of_min": _ratios(res, "torch", "min_ms"),
                "ratio_vs_flax_of_min": _ratios(res, "flax.nnx", "min_ms")}
    return out


def section_crossover(args, bar):
    B, N, K, H = 4, 8, 8, 64
    out = {"shape": dict(B=B, N=N, K=K, H=H, dtype="float32", causal=False), "T": {}}
    for T in args.crossover_T:
        fwd, bwd = core_cases(B, T, N, K, H, False, ["xla", "blockwise"], with_torch=False)
        res = interleaved(bwd, args.reps, bar)
        out["T"][T] = {"results": res,
                       "blockwise_over_xla": res["blockwise"]["median_ms"]
                       / res["xla"]["median_ms"],
                       "blockwise_over_xla_of_min": res["blockwise"]["min_ms"]
                       / res["xla"]["min_ms"]}
    return out


def section_sweep(args, bar):
    B, N, K, H = 1, 8, 8, 64
    out = {"shape": dict(B=B, N=N, K=K, H=H, dtype="float32"), "runs": []}
    for causal in (False, True):
        for T in args.sweep_T:
            impls = ["blockwise"] + (["xla"] if T <= args.einsum_max_T else [])
            fwd, bwd = core_cases(B, T, N, K, H, causal, impls)
            res = interleaved(bwd, args.sweep_reps, bar)
            g = gflops(B, N, T, T, H, causal=causal, backward=True)
            for r in res.values():
                r["gflop_s"] = g / (r["median_ms"] / 1e3)
            out["runs"].append({"T": T, "causal": causal, "fwd+bwd": res})
    return out


def temp_bytes(impl, B, T, N, H, causal=True):
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)

    def loss(q, k, v):
        return ops.dot_product_attention(q, k, v, is_causal=causal, implementation=impl).sum()

    c = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
    return int(c.memory_analysis().temp_size_in_bytes)


def section_memory(args, bar):
    B, N, H = 1, 8, 64
    rows = []
    for T in args.memory_T:
        rows.append({"T": T, **{i: temp_bytes(i, B, T, N, H) for i in ("xla", "blockwise")}})
        bar.update(1)
    return {"shape": dict(B=B, N=N, H=H, dtype="float32", causal=True,
                          what="jit(grad) temp_size_in_bytes"), "rows": rows}


def section_largest(args, bar):
    B, T, N, H = 1, 32768, 8, 64
    q, k, v = random_qkv(B, T, T, N, N, H)
    grad = jax.jit(jax.grad(lambda q, k, v: ops.dot_product_attention(
        q, k, v, is_causal=True, implementation="blockwise").sum(), (0, 1, 2)))
    t0 = time.perf_counter()
    _ready(grad(q, k, v))
    secs = time.perf_counter() - t0
    bar.update(1)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"shape": dict(B=B, T=T, N=N, H=H, causal=True), "seconds_incl_compile": secs,
            "peak_rss_bytes": peak_rss,
            "temp_bytes": temp_bytes("blockwise", B, T, N, H)}


SECTIONS = {
    "core": (section_core, lambda a: 8 * a.reps),
    "module": (section_module, lambda a: 4 * a.reps),
    "crossover": (section_crossover, lambda a: len(a.crossover_T) * a.reps),
    "sweep": (section_sweep, lambda a: 2 * len(a.sweep_T) * a.sweep_reps),
    "memory": (section_memory, lambda a: len(a.memory_T)),
    "largest": (section_largest, lambda a: 1),
}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def plot(results, path_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    def t_axis(ax, ts):
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.xaxis.set_minor_formatter(NullFormatter())

    if "sweep" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for causal in (False, True):
            runs = [r for r in results["sweep"]["runs"] if r["causal"] == causal]
            for impl in ("xla", "blockwise", "torch"):
                pts = [(r["T"], r["fwd+bwd"][impl]["median_ms"]) for r in runs
                       if impl in r["fwd+bwd"]]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ls="--" if causal else "-",
                            label=f"{impl}{' causal' if causal else ''}")
        ax.set(xscale="log", yscale="log", xlabel="T = S", ylabel="fwd+bwd ms (median)",
               title="attention core, B=1 N=8 H=64 f32")
        t_axis(ax, sorted({r["T"] for r in results["sweep"]["runs"]}))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{path_prefix}_time_vs_T.png", dpi=120)
    if "memory" in results:
        rows = results["memory"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in ("xla", "blockwise"):
            ax.plot([r["T"] for r in rows], [r[impl] / 2**20 for r in rows], marker="o",
                    label=impl)
        ax.set(xscale="log", yscale="log", xlabel="T = S", ylabel="temp MiB",
               title="jit(grad) temporary memory, B=1 N=8 H=64 f32 causal")
        t_axis(ax, [r["T"] for r in rows])
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{path_prefix}_memory_vs_T.png", dpi=120)


def summary(results):
    lines = []
    for sec in ("core", "module"):
        for key, val in results.get(sec, {}).items():
            if key == "shape":
                continue
            r = val["results"]
            cells = ", ".join(f"{n} {x['median_ms']:.0f} ms" for n, x in r.items())
            lines.append(f"{sec:6s} {key:15s} {cells}")
            for label in ("vs_torch", "vs_flax", "vs_torch_of_min", "vs_flax_of_min"):
                if f"ratio_{label}" in val:
                    lines.append(" " * 23 + f"{label}: " + ", ".join(
                        f"{n} {x:.2f}x" for n, x in val[f"ratio_{label}"].items()))
    for T, val in results.get("crossover", {}).get("T", {}).items():
        lines.append(f"crossover T={T}: blockwise/xla fwd+bwd = {val['blockwise_over_xla']:.2f} "
                     f"(of min {val['blockwise_over_xla_of_min']:.2f})")
    for row in results.get("memory", {}).get("rows", []):
        lines.append(f"memory T={row['T']:6d}: xla {row['xla'] / 2**20:10.1f} MiB, "
                     f"blockwise {row['blockwise'] / 2**20:8.1f} MiB")
    if "largest" in results:
        lg = results["largest"]
        lines.append(f"largest: T=32768 fwd+bwd {lg['seconds_incl_compile']:.0f} s, "
                     f"peak RSS {lg['peak_rss_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS),
                   default=["core", "module", "crossover", "sweep", "memory"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sweep-reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3 repetitions, T <= 2048")
    p.add_argument("--replot", action="store_true", help="only redraw the plots from --out.json")
    p.add_argument("--out", type=Path, default=RESULTS / f"bench_attention_{jax.default_backend()}")
    args = p.parse_args(argv)
    args.crossover_T = [128, 256, 384, 512, 768, 1024]
    args.sweep_T = [256, 512, 1024, 2048, 4096, 8192]
    args.memory_T = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    args.einsum_max_T = 4096
    if args.quick:
        args.reps, args.sweep_reps = 3, 2
        args.sweep_T = [t for t in args.sweep_T if t <= 2048]
        args.crossover_T = [128, 256, 512, 1024]

    if args.replot:
        plot(json.loads(Path(f"{args.out}.json").read_text()), str(args.out))
        return

    import torch

    results = {"meta": {
        "jax": jax.__version__, "torch": torch.__version__, "device": str(jax.devices()[0]),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
        "command": " ".join(sys.argv), "auto_einsum_max_ts": kernels.AUTO_EINSUM_MAX_TS,
    }}
    total = sum(SECTIONS[s][1](args) for s in args.sections)
    with tqdm(total=total, desc="bench", unit="round") as bar:
        for s in args.sections:
            bar.set_postfix_str(s)
            results[s] = SECTIONS[s][0](args, bar)
    results["meta"]["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    plot(results, str(args.out))
    print(summary(results))
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
