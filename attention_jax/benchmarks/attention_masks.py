"""The ``masks`` section of the attention benchmark: structured masks against plain causal.

``attention-jax bench --sections masks`` (``--quick`` / ``--tiny`` for small T). At
B=1, T=S=16384, N=8, H=64, float32, ``jit(grad)`` of the blockwise kernel
(forward + backward), every mask against plain causal (``is_causal=True``) in the
same run, interleaved rounds, medians:

* ``SlidingWindow(511) & Causal()`` (a window of 512 keys, own included),
  ``Segments`` (8 documents of 2048) ``& Causal()``, ``Chunked(2048) & Causal()``,
  a BigBird pattern (:meth:`~attention_jax.masks.BlockSparse.bigbird`, blocks of
  T/32, band of 3, 1 global, 1 random per row and head) and ``Lengths`` (half the
  keys valid). ``Segments`` and ``Lengths`` are jit arguments, so their block map
  is computed from the (traced) data, as in training;
* per mask: the time and its ratio to causal; the compiled temporary bytes
  (``memory_analysis().temp_size_in_bytes``) and their ratio to causal; the tiles
  the kernel runs (:func:`attention_jax.masks.block_map`,
  :func:`attention_jax.kernels.blockwise.tile_counts`) against causal's; the
  issue's bars (window <= 0.2x causal's time, segments <= 0.25x, every mask's
  temporary memory <= 1.2x causal's) checked;
* ``largest``: ``SlidingWindow(4095) & Causal()`` compiled (not run) at T up to
  131072 for its temporary, argument and output bytes (linear in T: bytes per
  token reported), then one real run (two calls timed, the first may compile; peak
  RSS) at the largest T whose total fits in :data:`MEMORY_BUDGET` (about 4 GB).

Writes ``bench_masks_<backend>.json`` (with ``uptime`` and the load average) and
``bench_masks_<backend>.md`` under ``--out``; the section's dict also lands in
``bench_attention_<backend>.json``. Timings on a loaded machine mean little: the
JSON records the load next to them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks as M
from attention_jax import ops
from attention_jax.benchmarks.attention_cases import _ready, interleaved, random_qkv
from attention_jax.kernels import blockwise

# The section's shapes: full size, --quick and --tiny.
MASK_SHAPES = {
    "full": dict(B=1, T=16384, N=8, H=64, window=512, docs=8,
                 largest_T=(16384, 32768, 65536, 131072), largest_window=4096),
    "quick": dict(B=1, T=4096, N=8, H=64, window=512, docs=8,
                  largest_T=(4096, 8192, 16384, 32768), largest_window=1024),
    "tiny": dict(B=1, T=1024, N=2, H=16, window=64, docs=8,
                 largest_T=(512, 1024, 2048, 4096), largest_window=256),
}
#: The real run of ``largest`` takes the largest T whose temporary + argument + output
#: bytes (from the compiled program) stay under this.
MEMORY_BUDGET = 4 * 10**9
# The bars: time ratios to plain causal, and the memory ratio of every mask.
TIME_BARS = {"window": 0.2, "segments": 0.25}
MEMORY_BAR = 1.2


def _size(args) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def masks_steps(args) -> int:
    """Progress-bar steps of :func:`section_masks`."""
    return args.reps + len(MASK_SHAPES[_size(args)]["largest_T"]) + 1


def mask_cases(B: int, N: int, T: int, window: int, docs: int) -> dict:
    """name -> (mask object or None for plain causal, its label)."""
    ids = jnp.asarray(np.arange(T)[None].repeat(B, 0) // (T // docs), jnp.int32)
    block = T // 32
    bigbird = M.BlockSparse.bigbird(1, 1, 1, num_q_blocks=T // block, num_kv_blocks=T // block,
                                    block_q=block, num_heads=N, seed=0)
    return {
        "causal": (None, "is_causal=True"),
        "window": (M.SlidingWindow(window - 1) & M.Causal(),
                   f"SlidingWindow({window - 1}) & Causal()"),
        "segments": (M.Segments(ids) & M.Causal(), f"Segments({docs} x {T // docs}) & Causal()"),
        "chunked": (M.Chunked(T // docs) & M.Causal(), f"Chunked({T // docs}) & Causal()"),
        "bigbird": (bigbird, f"BlockSparse.bigbird(1, 1, 1), blocks of {block}"),
        "lengths": (M.Lengths(jnp.full((B,), T // 2, jnp.int32)), f"Lengths([{T // 2}])"),
    }


def _grad(mask_is_none: bool):
    """jit(grad) of the blockwise kernel's output sum, w.r.t. q, k, v; the mask is an argument."""
    def loss(q, k, v, mask):
        if mask_is_none:
            out = ops.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise")
        else:
            out = ops.dot_product_attention(q, k, v, mask, implementation="blockwise")
        return out.astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, (0, 1, 2)))


def kernel_tiles(mask, B: int, N: int, T: int, S: int) -> dict:
    """The tiles the kernel runs for ``mask`` (None: causal) at its default block sizes:
    the block map's union over batch and heads, as the kernel takes it."""
    bq, bk = blockwise.default_block_sizes(T, S)
    cls = np.asarray(M.block_map(M.Causal() if mask is None else mask, B, N, T, S, bq, bk))
    any_ = (cls > M.EMPTY).any(axis=(0, 1))
    full = (cls == M.FULL).all(axis=(0, 1))
    union = np.where(full, M.FULL, np.where(any_, M.PARTIAL, M.EMPTY))
    return {**blockwise.tile_counts(union), "block_q": bq, "block_kv": bk}


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    return {"temp_bytes": int(ma.temp_size_in_bytes),
            "argument_bytes": int(ma.argument_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes)}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"uptime failed: {e}"


def _compare(args, bar, sh) -> dict:
    """Every mask against causal: time, temporary bytes, tiles."""
    B, T, N, H = sh["B"], sh["T"], sh["N"], sh["H"]
    q, k, v = random_qkv(B, T, T, N, N, H, args.dtype)
    cases, rows = {}, {}
    for name, (mask, label) in mask_cases(B, N, T, sh["window"], sh["docs"]).items():
        compiled = _grad(mask is None).lower(q, k, v, mask).compile()
        cases[name] = (lambda c=compiled, m=mask: _ready(c(q, k, v, m)))
        rows[name] = {"mask": label, **_memory(compiled), "tiles": kernel_tiles(mask, B, N, T, T)}
    timed = interleaved(cases, args.reps, bar)
    base = rows["causal"]
    for name, row in rows.items():
        row.update(median_ms=timed[name]["median_ms"], min_ms=timed[name]["min_ms"],
                   all_ms=timed[name]["all_ms"])
        row["time_ratio"] = row["median_ms"] / timed["causal"]["median_ms"]
        row["temp_ratio"] = row["temp_bytes"] / max(1, base["temp_bytes"])
        row["tiles_ratio"] = row["tiles"]["computed"] / base["tiles"]["computed"]
        row["time_bar"] = TIME_BARS.get(name)
        row["meets_time_bar"] = None if name not in TIME_BARS else bool(
            row["time_ratio"] <= TIME_BARS[name])
        row["meets_memory_bar"] = bool(row["temp_ratio"] <= MEMORY_BAR)
    return rows


def _largest(args, bar, sh, budget: int) -> dict:
    """The 4k window compiled at growing T (bytes only), then run at the largest that fits."""
    B, N, H, W = sh["B"], sh["N"], sh["H"], sh["largest_window"]
    mask = M.SlidingWindow(W - 1) & M.Causal()
    grad = _grad(False)
    dtype = jnp.dtype(args.dtype)
    rows = []
    for T in sh["largest_T"]:
        x = jax.ShapeDtypeStruct((B, T, N, H), dtype)
        mem = _memory(grad.lower(x, x, x, mask).compile())
        total = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
        rows.append({"T": T, **mem, "total_bytes": total, "temp_bytes_per_token": mem[
            "temp_bytes"] / T, "fits": bool(total <= budget),
            "tiles": kernel_tiles(mask, B, N, T, T)})
        bar.update(1)
    fitting = [r["T"] for r in rows if r["fits"]]
    run = None
    if fitting:
        T = max(fitting)
        q, k, v = random_qkv(B, T, T, N, N, H, args.dtype)
        seconds = []
        for _ in range(2):  # the first call may compile (the jit cache may hold it already)
            t0 = time.perf_counter()
            grads = _ready(grad(q, k, v, mask))
            seconds.append(time.perf_counter() - t0)
        run = {"T": T, "first_call_s": seconds[0], "second_call_s": seconds[1],
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "finite": bool(all(np.isfinite(np.asarray(g)).all() for g in grads))}
        del q, k, v, grads
    bar.update(1)
    per_token = [r["temp_bytes_per_token"] for r in rows]
    return {"mask": f"SlidingWindow({W - 1}) & Causal()", "memory_budget_bytes": budget,
            "rows": rows, "run": run,
            "temp_per_token_spread": max(per_token) / max(1e-9, min(per_token))}


def section_masks(args, bar) -> dict:
    """The ``masks`` section (see the module doc); also writes its JSON and markdown."""
    size = _size(args)
    sh = MASK_SHAPES[size]
    out = {"shape": dict(B=sh["B"], T=sh["T"], S=sh["T"], N=sh["N"], H=sh["H"],
                         dtype=args.dtype, what="jit(grad) blockwise, fwd+bwd"),
           "size": size, "reps": args.reps, "uptime_start": _uptime(),
           "load_avg_start": os.getloadavg(), "cpu_count": os.cpu_count(),
           "device": str(jax.devices()[0])}
    out["rows"] = _compare(args, bar, sh)
    out["largest"] = _largest(args, bar, sh, MEMORY_BUDGET)
    out["uptime_end"] = _uptime()
    out["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"bench_masks_{jax.default_backend()}"
    Path(f"{stem}.json").write_text(json.dumps(out, indent=1))
    Path(f"{stem}.md").write_text(markdown(out))
    out["written"] = [f"{stem}.json", f"{stem}.md"]
    return out


def _mib(x) -> str:
    return f"{x / 2**20:.1f}"


def _bar_text(ok) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


def markdown(res: dict) -> str:
    """The section's result as markdown tables (masks vs causal; the largest T)."""
    s = res["shape"]
    lines = [
        f"# masks: B={s['B']}, T=S={s['T']}, N={s['N']}, H={s['H']}, {s['dtype']}, "
        f"{s['what']} ({res['size']}, {res['reps']} interleaved rounds, medians)", "",
        f"load: `{res['uptime_start']}` (start), `{res['uptime_end']}` (end); "
        f"{res['cpu_count']} CPUs, {res['device']}", "",
        "| mask | tiles run (of all) | tiles vs causal | median ms | vs causal | time bar "
        "| temp MiB | temp vs causal | memory bar (<= 1.2x) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in res["rows"].values():
        t = row["tiles"]
        bar = "" if row["time_bar"] is None else (
            f"<= {row['time_bar']}x: {_bar_text(row['meets_time_bar'])}")
        lines.append(
            f"| {row['mask']} | {t['computed']} ({t['computed'] + t['skipped']}) "
            f"| {row['tiles_ratio']:.3f} | {row['median_ms']:.1f} | {row['time_ratio']:.3f} "
            f"| {bar} | {_mib(row['temp_bytes'])} | {row['temp_ratio']:.3f} "
            f"| {_bar_text(row['meets_memory_bar'])} |")
    lg = res["largest"]
    lines += [
        "", f"## largest T with {lg['mask']} (compiled only; budget "
        f"{lg['memory_budget_bytes'] / 1e9:.1f} GB of temp + arguments + outputs)", "",
        "| T | tiles run | temp MiB | temp bytes / token | args + outputs MiB | total MiB | fits |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in lg["rows"]:
        lines.append(f"| {r['T']} | {r['tiles']['computed']} | {_mib(r['temp_bytes'])} "
                     f"| {r['temp_bytes_per_token']:.0f} "
                     f"| {_mib(r['argument_bytes'] + r['output_bytes'])} "
                     f"| {_mib(r['total_bytes'])} | {_bar_text(r['fits'])} |")
    run = lg["run"]
    lines += ["", "nothing fits the budget" if run is None else (
        f"real run at T={run['T']}: {run['second_call_s']:.2f} s (first call, which may "
        f"compile: {run['first_call_s']:.2f} s), "
        f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, gradients finite: {run['finite']}")]
    return "\n".join(lines) + "\n"
