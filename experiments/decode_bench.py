"""Decode-step time and KV-cache bytes per token for MHA / GQA / MQA (and an int8 cache).

One decoding step of :meth:`attention_jax.MultiHeadAttention.decode` (project the new
token, write its key/value into the cache, attend to the S cached tokens, project
out) is timed under ``jax.jit`` with the cache donated, for cache lengths S (1k to
32k by default), against the same step in PyTorch (``F.linear``, an in-place cache
write, ``scaled_dot_product_attention(..., enable_gqa=True)`` over the cached
tensors, holding the same values and weights) in the same run. Decoding reads the
whole cache every step, so time should follow the KV bytes: K / N of MHA's.

On a GPU the step time is also set against the floor ``KV bytes / HBM bandwidth``
(the nominal bandwidth of the device, or ``--hbm-gbs``).

Writes ``decode_bench_<backend>.json``, ``.md`` (tables) and ``.png`` under ``--out``.

    python experiments/decode_bench.py [--lengths 1024 4096 32768] [--batch 1] [--quick]
    attention-jax decode [--quick] [--dtype bfloat16] [--out DIR] [--lengths ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_jax as aj
from attention_jax import cache as kv_cache
from attention_jax.cache import KVCache
from attention_jax.cli import print_table, progress_bar
from attention_jax.modules import PARAM_AXES

# Nominal HBM bandwidth (GB/s) by device kind substring.
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0}


def variants(num_heads: int) -> dict[str, int]:
    return {"MHA": num_heads, "GQA": max(1, num_heads // 4), "MQA": 1}


def filled_cache(module, batch: int, length: int, dtype, key) -> KVCache:
    """A cache of ``length`` slots holding ``length - 1`` random tokens (room for one step)."""
    empty = module.init_cache(batch, length, dtype)
    kk, kv = jax.random.split(key)
    k = jax.random.normal(kk, (batch, length - 1, *empty.k.shape[2:]), jnp.float32)
    v = jax.random.normal(kv, (batch, length - 1, *empty.v.shape[2:]), jnp.float32)
    return kv_cache.update(empty, k, v)  # quantizes for int8


def time_fn(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (which must block) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def jax_step_time(module, cache: KVCache, x, repeats: int) -> tuple[float, np.ndarray]:
    graphdef, params = nnx.split(module)

    # jax.jit on the split module: nnx.jit's per-call graph bookkeeping stays out of the timing.
    @functools.partial(jax.jit, donate_argnums=2)
    def step(params, x, c):
        return nnx.merge(graphdef, params).decode(x, c)

    lengths0 = np.asarray(cache.lengths)  # host copy: the device array gets donated
    state = {"cache": cache}

    def run():
        c = state["cache"].replace(lengths=jnp.asarray(lengths0))  # back to S - 1 tokens
        y, state["cache"] = step(params, x, c)
        y.block_until_ready()
        state["y"] = y

    t = time_fn(run, repeats)
    return t, np.asarray(state["y"], np.float32)


def torch_step(module, cache: KVCache, x, repeats: int, torch_dtype, device):
    """The same step in PyTorch on the same (dequantized) cache values and weights."""
    import torch
    import torch.nn.functional as F

    p = {n: None if getattr(module, n) is None else
         torch.tensor(np.asarray(getattr(module, n)[...], np.float32), dtype=torch_dtype,
                      device=device) for n in PARAM_AXES}
    D, N, H = p["q_kernel"].shape
    K, V = p["v_kernel"].shape[1:]
    w = {n: p[n].reshape(p[n].shape[0], -1).T.contiguous() for n in
         ("q_kernel", "k_kernel", "v_kernel")}
    w_o = p["o_kernel"].reshape(N * V, -1).T.contiguous()
    b = {n: p[n].reshape(-1) for n in ("q_bias", "k_bias", "v_bias")}
    k_np, v_np = (np.asarray(a, np.float32) for a in kv_cache.read(cache, jnp.float32))
    # SDPA's layout [B, K, S, H]
    k_cache = torch.tensor(k_np, dtype=torch_dtype, device=device).transpose(1, 2).contiguous()
    v_cache = torch.tensor(v_np, dtype=torch_dtype, device=device).transpose(1, 2).contiguous()
    xt = torch.tensor(np.asarray(x, np.float32), dtype=torch_dtype, device=device)
    pos = int(cache.lengths[0])
    B = xt.shape[0]
    out = {}

    @torch.inference_mode()
    def run():
        q = F.linear(xt, w["q_kernel"], b["q_bias"]).view(B, 1, N, H).transpose(1, 2)
        k = F.linear(xt, w["k_kernel"], b["k_bias"]).view(B, 1, K, H).transpose(1, 2)
        v = F.linear(xt, w["v_kernel"], b["v_bias"]).view(B, 1, K, V).transpose(1, 2)
        k_cache[:, :, pos:pos + 1] = k
        v_cache[:, :, pos:pos + 1] = v
        o = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1],
                                           enable_gqa=K != N)
        y = F.linear(o.transpose(1, 2).reshape(B, 1, N * V), w_o, p["o_bias"])
        if device != "cpu":
            torch.cuda.synchronize()
        out["y"] = y

    t = time_fn(run, repeats)
    return t, out["y"].float().cpu().numpy()


def run(args) -> dict:
    backend = jax.default_backend()
    device_kind = jax.devices()[0].device_kind
    dtype = jnp.dtype(args.dtype or ("bfloat16" if backend == "gpu" else "float32"))
    try:
        import torch

        torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
        torch_ok = backend == "cpu" or torch_device == "cuda"
        torch_dtype = getattr(torch, dtype.name)
    except ImportError:
        torch_ok = False
    hbm = args.hbm_gbs or next((v for k, v in HBM_GBS.items() if k in device_kind), None)
    D = args.heads * args.head_dim
    rows = []
    steps = len(variants(args.heads)) * 2 * len(args.lengths)  # 2 cache dtypes
    with progress_bar(steps, "decode") as bar:
        for name, K in variants(args.heads).items():
            m = aj.MultiHeadAttention(D, args.heads, num_kv_heads=K, param_dtype=dtype,
                                      rngs=nnx.Rngs(0))
            x = jax.random.normal(jax.random.key(1), (args.batch, 1, D), dtype)
            for cache_dtype in (dtype, jnp.dtype(jnp.int8)):
                for S in args.lengths:
                    bar.set_postfix_str(f"{name} {cache_dtype.name} cache, S={S}")
                    cache = filled_cache(m, args.batch, S, cache_dtype, jax.random.key(S))
                    row = dict(variant=name, K=K, cache_dtype=cache_dtype.name, S=S,
                               bytes_per_token=cache.bytes_per_token)
                    row["kv_bytes"] = args.batch * S * cache.bytes_per_token
                    if torch_ok and cache_dtype != jnp.int8:
                        t_torch, y_torch = torch_step(m, cache, x, args.repeats, torch_dtype,
                                                      torch_device)
                        row["torch_ms"] = 1e3 * t_torch
                    t_jax, y_jax = jax_step_time(m, cache, x, args.repeats)
                    row["jax_ms"] = 1e3 * t_jax
                    if "torch_ms" in row:
                        row["jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
                        row["max_abs_diff_vs_torch"] = float(np.abs(y_jax - y_torch).max())
                    row["effective_gbs"] = row["kv_bytes"] / t_jax / 1e9
                    if hbm:
                        row["floor_ms"] = 1e3 * row["kv_bytes"] / (hbm * 1e9)
                        row["jax_over_floor"] = row["jax_ms"] / row["floor_ms"]
                    rows.append(row)
                    del cache
                    bar.update(1)
    return dict(backend=backend, device_kind=device_kind, dtype=dtype.name, hbm_gbs=hbm,
                config={k: v if not isinstance(v, pathlib.Path) else str(v)
                        for k, v in vars(args).items()}, rows=rows)


def summarize(result: dict) -> str:
    rows = result["rows"]
    cfg = result["config"]
    lines = [
        f"Backend {result['backend']} ({result['device_kind']}), params {result['dtype']}, "
        f"B={cfg['batch']}, N={cfg['heads']}, H=V={cfg['head_dim']}; one decode step (t=1) "
        f"attending to S cached tokens; median of {cfg['repeats']}.",
        "",
        "KV-cache bytes per token (one row, one layer):",
        "",
        "| variant | K | " + " | ".join(sorted({r["cache_dtype"] for r in rows})) + " |",
        "|---|---|" + "---|" * len({r["cache_dtype"] for r in rows}),
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        sel = {r["cache_dtype"]: r for r in rows if r["variant"] == name}
        lines.append(f"| {name} | {next(iter(sel.values()))['K']} | "
                     + " | ".join(str(sel[d]["bytes_per_token"]) for d in sorted(sel)) + " |")
    head = ["variant", "cache", "S", "KV MB", "jax ms", "torch ms", "jax/torch", "GB/s"]
    if result["hbm_gbs"]:
        head += ["floor ms", "jax/floor"]
    lines += ["", "Decode-step time:", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], r["cache_dtype"], str(r["S"]), f"{r['kv_bytes'] / 1e6:.1f}",
                 f"{r['jax_ms']:.3f}", f"{r['torch_ms']:.3f}" if "torch_ms" in r else "-",
                 f"{r['jax_over_torch']:.2f}" if "jax_over_torch" in r else "-",
                 f"{r['effective_gbs']:.1f}"]
        if result["hbm_gbs"]:
            cells += [f"{r['floor_ms']:.4f}", f"{r['jax_over_floor']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        color = f"C{i}"
        for cache_dtype, ls in ((result["dtype"], "-"), ("int8", ":")):
            sel = [r for r in rows if r["variant"] == name and r["cache_dtype"] == cache_dtype]
            ax.plot([r["S"] for r in sel], [r["jax_ms"] for r in sel], ls, marker="o",
                    color=color, label=f"{name} jax ({cache_dtype})")
            if any("torch_ms" in r for r in sel):
                ax.plot([r["S"] for r in sel], [r["torch_ms"] for r in sel], "--", marker="x",
                        color=color, label=f"{name} torch SDPA")
            if any("floor_ms" in r for r in sel) and cache_dtype == result["dtype"]:
                ax.plot([r["S"] for r in sel], [r["floor_ms"] for r in sel], "-.", color=color,
                        alpha=0.5, label=f"{name} KV bytes / HBM")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cache length S")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"decode step, {result['backend']} ({result['device_kind']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(result: dict) -> None:
    """The KV-bytes and decode-step tables of :func:`summarize`, as rich tables."""
    rows = result["rows"]
    cfg = result["config"]
    dtypes = sorted({r["cache_dtype"] for r in rows})
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {"variant": r["variant"], "K": r["K"]})
        by_variant[r["variant"]][f"{r['cache_dtype']} bytes/token"] = r["bytes_per_token"]
    print_table(list(by_variant.values()),
                title=f"KV-cache bytes per token (one row, one layer; H=V={cfg['head_dim']})")
    step_rows = []
    for r in rows:
        row = {"variant": r["variant"], "cache": r["cache_dtype"], "S": r["S"],
               "KV MB": r["kv_bytes"] / 1e6, "jax ms": r["jax_ms"],
               "torch ms": r.get("torch_ms"), "jax/torch": r.get("jax_over_torch"),
               "max diff vs torch": r.get("max_abs_diff_vs_torch"),
               "GB/s": r["effective_gbs"]}
        if result["hbm_gbs"]:
            row["floor ms"] = r["floor_ms"]
            row["jax/floor"] = r["jax_over_floor"]
        step_rows.append(row)
    print_table(step_rows, title=(
        f"Decode step on {result['backend']} ({result['device_kind']}), params "
        f"{result['dtype']}, B={cfg['batch']}, N={cfg['heads']}: one token attending to S "
        f"cached tokens, median of {cfg['repeats']}"),
        caption=f"cache dtypes: {', '.join(dtypes)}; n/a: no torch run (int8, or no torch)")


QUICK_LENGTHS = [256, 1024]
QUICK_REPEATS = 5


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="cache lengths S (default 1024 2048 ... 32768; --quick: 256 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default 20 (--quick: 5)")
    p.add_argument("--hbm-gbs", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="S in {256, 1024}, 5 repeats")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--out", type=pathlib.Path,
                   default=pathlib.Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = QUICK_LENGTHS if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 20
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode_bench_{result['backend']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(summarize(result))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.no_plot:
        plot(result, stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png"))
    print_tables(result)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
