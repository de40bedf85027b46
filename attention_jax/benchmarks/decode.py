"""One KV-cache decode step of MHA / GQA / MQA against PyTorch and the bandwidth floor.

One step of :meth:`attention_jax.MultiHeadAttention.decode` (project the new token,
write its key/value into the cache, attend to the cached tokens, project out) runs
under ``jax.jit`` with the cache donated, for cache lengths S (1k to 32k by
default), against the same step in PyTorch (``F.linear``, an in-place write into a
``[B, K, S, H]`` cache, ``scaled_dot_product_attention(..., enable_gqa=True)`` over
the filled part; for an int8 cache torch quantizes the new token as we do and
dequantizes the filled part before SDPA: it has no int8 SDPA) on the same values
and weights. A step is bound by reading the cache, so the **floor** is a reduction
(``jnp.sum``; ``torch.sum`` too) over as many bytes as the step must read
(``kv_bytes``: the filled tokens and the new one, scales included), in the same run.

**Measurement.** Each repetition runs ours, torch and the two floors once, in
rotating order (:func:`attention_jax.benchmarks.attention.interleaved`), so load
from other processes hits them alike; medians are reported. torch gets as many
intra-op threads as XLA:CPU, which sizes its (Eigen) pool by the CPUs the process
may run on when the backend starts: :func:`match_threads` calls
``torch.set_num_threads(len(os.sched_getaffinity(0)))`` (``taskset`` changes both),
and, when torch is not imported yet, ``OMP_WAIT_POLICY=PASSIVE`` unless set: with
OpenMP's default spinning, torch's threads wait at every barrier for a thread that
XLA's pool or another process holds off its core (a tiny step, measured on a loaded
2-core machine: 7.5 ms spinning, 0.05 ms passive or with one thread).
On a GPU a timed call chains ``--inner`` steps and syncs once; times are per step.

**Rows.** Cache dtypes: the parameters' dtype and every narrower one
(:func:`cache_dtypes`). Each row has ``jax_ms`` (ours), ``torch_ms``, ``floor_ms`` /
``floor_gbs``, ``effective_gbs`` (``kv_bytes`` over the step time) and
``pct_of_floor`` (torch's as ``torch_gbs`` / ``torch_pct_of_floor``); on a GPU of
known nominal bandwidth, ``pct_of_hbm``. **Partial fill** (``partial``): a cache of
the longest length holding ``shortest - 1`` tokens against a tight cache of the
shortest length (32768 vs 1024 slots holding 1023 tokens by default;
``--partial SLOTS FILLED``). ``--sections layout`` adds the token-major against the
head-major cache (:mod:`attention_jax.benchmarks.decode_layout`).

Writes ``decode_bench_<backend>.json``, ``.md`` and ``.png`` under ``--out``
(default :func:`attention_jax.cli.default_out`, a scratch folder: the committed
``experiments/results`` change only with ``--out experiments/results``)::

    attention-jax decode [--quick] [--lengths 1024 8192 32768] [--batch 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_jax as aj
from attention_jax import cache as kv_cache
from attention_jax.benchmarks import decode_report as report
from attention_jax.benchmarks.attention import interleaved
from attention_jax.cache import KVCache
from attention_jax.cli import default_out, progress_bar
from attention_jax.modules import PARAM_AXES

# Nominal HBM bandwidth (GB/s) by device kind substring (first match wins).
HBM_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0,
           "L4": 300.0}
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
QUICK_LENGTHS = [256, 1024]
QUICK_REPEATS = 5
CACHE_ORDER = ("float32", "bfloat16", "int8")

# The report's functions, importable from here as before the split.
summarize, plot, print_tables = report.summarize, report.plot, report.print_tables


def variants(num_heads: int) -> dict[str, int]:
    """``{name: K}``: MHA (K = N), GQA (K = N / 4) and MQA (K = 1)."""
    return {"MHA": num_heads, "GQA": max(1, num_heads // 4), "MQA": 1}


def cache_dtypes(dtype) -> list[jnp.dtype]:
    """The parameters' dtype and every narrower cache dtype of ``CACHE_ORDER``.

    >>> [d.name for d in cache_dtypes("float32")], [d.name for d in cache_dtypes("bfloat16")]
    (['float32', 'bfloat16', 'int8'], ['bfloat16', 'int8'])
    """
    dtype = jnp.dtype(dtype)
    order = [jnp.dtype(d) for d in CACHE_ORDER]
    return order[order.index(dtype):] if dtype in order else [dtype, jnp.dtype(jnp.int8)]


def filled_cache(module, batch, length, dtype, key, filled: int | None = None) -> KVCache:
    """A cache of ``length`` slots holding ``filled`` random tokens (default ``length - 1``).

    Raises:
      ValueError: unless ``1 <= filled <= length - 1`` (room for the step's token).
    """
    filled = length - 1 if filled is None else filled
    if not 1 <= filled <= length - 1:
        raise ValueError(f"filled must be in [1, length - 1] = [1, {length - 1}] (room for "
                         f"one step); got filled={filled}")
    empty, (kk, kv) = module.init_cache(batch, length, dtype), jax.random.split(key)
    K = empty.num_kv_heads
    k = jax.random.normal(kk, (batch, filled, K, *empty.k.shape[3:]), jnp.float32)
    v = jax.random.normal(kv, (batch, filled, K, *empty.v.shape[3:]), jnp.float32)
    return kv_cache.update(empty, k, v)  # quantizes for int8


def batched(step, sync, inner: int):
    """A zero-argument case: ``inner`` calls of ``step()``, then ``sync`` on the last result."""
    def run():
        for _ in range(inner - 1):
            step()
        sync(step())
    return run


def jax_step(module, cache: KVCache, x):
    """``(step, last)``: one jitted decode step from the same state each call.

    The cache is donated (updated in place); its lengths are reset inside the
    program from a kept device array, so nothing crosses the host in a step.
    ``step()`` dispatches and returns ``y [B, 1, D]`` without blocking; ``last()``
    is the latest output as float32 NumPy. ``cache`` is donated by the first call.
    """
    graphdef, params = nnx.split(module)

    # jax.jit on the split module: nnx.jit's per-call graph bookkeeping stays out of the timing.
    @functools.partial(jax.jit, donate_argnums=2)
    def step_fn(params, x, c, lengths):
        return nnx.merge(graphdef, params).decode(x, c.replace(lengths=lengths))

    lengths = jnp.array(cache.lengths)  # its own buffer: never donated
    state = {"cache": cache}

    def step():
        state["y"], state["cache"] = step_fn(params, x, state["cache"], lengths)
        return state["y"]

    return step, lambda: np.asarray(state["y"], np.float32)


def torch_step_fns(module, cache: KVCache, x, device: str):
    """``(step, last)``: the same step in PyTorch on the same cache values and weights."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, jnp.dtype(x.dtype).name)

    def tensor(a, dt=dtype):
        return torch.tensor(np.asarray(a, np.float32), dtype=dt, device=device)

    p = {n: None if getattr(module, n) is None else tensor(getattr(module, n)[...])
         for n in PARAM_AXES}
    D, N, H = p["q_kernel"].shape
    K, V = p["v_kernel"].shape[1:]
    w = {n: p[n].reshape(p[n].shape[0], -1).T.contiguous()
         for n in ("q_kernel", "k_kernel", "v_kernel")}
    w_o = p["o_kernel"].reshape(N * V, -1).T.contiguous()
    b = {n: None if p[n] is None else p[n].reshape(-1) for n in ("q_bias", "k_bias", "v_bias")}
    if cache.quantized:  # int8 [B, K, L, H] and float32 scales [B, K, L]
        kc, vc = (torch.tensor(np.asarray(a), device=device) for a in (cache.k, cache.v))
        ks, vs = (tensor(a, torch.float32) for a in (cache.k_scale, cache.v_scale))
    else:  # SDPA's layout [B, K, L, H], the cache's own
        cdt = getattr(torch, jnp.dtype(cache.k.dtype).name)
        kc, vc = (tensor(a, cdt) for a in (cache.k, cache.v))
    xt, pos, out = tensor(x), int(cache.lengths[0]), {}
    B = xt.shape[0]

    def put_int8(buf, scales, new):  # kv_cache.quantize_int8, in torch
        s = new.float().abs().amax(-1) / kv_cache.INT8_MAX  # [B, K, 1]
        q = torch.round(new.float() / torch.where(s == 0, 1.0, s)[..., None])
        buf[:, :, pos:pos + 1] = q.clamp(-kv_cache.INT8_MAX, kv_cache.INT8_MAX).to(torch.int8)
        scales[:, :, pos:pos + 1] = s

    @torch.inference_mode()
    def step():
        q = F.linear(xt, w["q_kernel"], b["q_bias"]).view(B, 1, N, H).transpose(1, 2)
        k = F.linear(xt, w["k_kernel"], b["k_bias"]).view(B, 1, K, H).transpose(1, 2)
        v = F.linear(xt, w["v_kernel"], b["v_bias"]).view(B, 1, K, V).transpose(1, 2)
        if cache.quantized:  # the old cache dequantized, plus the new token as computed
            put_int8(kc, ks, k)
            put_int8(vc, vs, v)
            kk = torch.cat([(kc[:, :, :pos].float() * ks[:, :, :pos, None]).to(dtype), k], 2)
            vv = torch.cat([(vc[:, :, :pos].float() * vs[:, :, :pos, None]).to(dtype), v], 2)
        else:
            kc[:, :, pos:pos + 1] = k
            vc[:, :, pos:pos + 1] = v
            kk, vv = kc[:, :, :pos + 1], vc[:, :, :pos + 1]
        o = F.scaled_dot_product_attention(q.to(kk.dtype), kk, vv, enable_gqa=K != N)
        out["y"] = F.linear(o.transpose(1, 2).reshape(B, 1, N * V).to(dtype), w_o, p["o_bias"])
        return out["y"]

    return step, lambda: out["y"].float().cpu().numpy()


def torch_sync(device: str):
    """Blocks until torch's work on ``device`` is done (a no-op on the CPU)."""
    import torch

    return (lambda _: torch.cuda.synchronize()) if device != "cpu" else (lambda _: None)


def floor_cases(nbytes: int, torch_device: str | None, inner: int) -> dict:
    """``{"floor": jnp.sum, "torch floor": torch.sum}`` over ``nbytes`` of float32."""
    a = jax.random.uniform(jax.random.key(7), (max(1, nbytes // 4),), jnp.float32)
    total = jax.jit(jnp.sum)
    cases = {"floor": batched(lambda: total(a), jax.block_until_ready, inner)}
    if torch_device is not None:
        import torch

        t = torch.rand(max(1, nbytes // 4), device=torch_device)
        cases["torch floor"] = batched(t.sum, torch_sync(torch_device), inner)
    return cases


def timed(cases: dict, reps: int, inner: int) -> dict:
    """Median ms per step of each case, interleaved (``inner`` steps per timed call)."""
    res = interleaved(cases, reps)
    return {n: r["median_ms"] / inner for n, r in res.items()}


def match_threads() -> dict:
    """torch's intra-op threads set to XLA:CPU's (see the module doc); both counts."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"xla_intra_op": n, "how": "torch.set_num_threads(len(os.sched_getaffinity(0)))",
            "torch_imported_before": "torch" in sys.modules}
    if not info["torch_imported_before"]:  # OpenMP reads it when torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    try:
        import torch
    except ImportError:
        return info
    torch.set_num_threads(n)
    return {**info, "torch": torch.get_num_threads()}


def torch_device_for(backend: str) -> str | None:
    """``"cpu"`` for the CPU backend, ``"cuda"`` on a GPU with CUDA torch, else None."""
    try:
        import torch
    except ImportError:
        return None
    return "cpu" if backend == "cpu" else "cuda" if torch.cuda.is_available() else None


def step_row(args, name, K, module, x, cache_dtype, S, filled, ctx) -> dict:
    """One row of the step table: ours, torch and the floors at one cache dtype and S."""
    cache = filled_cache(module, args.batch, S, cache_dtype, jax.random.key(S), filled)
    row = dict(variant=name, K=K, cache_dtype=cache_dtype.name, S=S, filled=filled,
               bytes_per_token=cache.bytes_per_token)
    row["kv_bytes"] = args.batch * (filled + 1) * cache.bytes_per_token
    cases, last = {}, {}
    if ctx["torch_device"] is not None:
        step, last["torch"] = torch_step_fns(module, cache, x, ctx["torch_device"])
        cases["torch"] = batched(step, torch_sync(ctx["torch_device"]), args.inner)
    step, last["ours"] = jax_step(module, cache, x)  # donates cache: after torch's copy
    cases["ours"] = batched(step, jax.block_until_ready, args.inner)
    cases.update(floor_cases(row["kv_bytes"], ctx["torch_device"], args.inner))
    ms = timed(cases, args.repeats, args.inner)
    gbs = {n: row["kv_bytes"] / (t / 1e3) / 1e9 for n, t in ms.items()}
    row.update(jax_ms=ms["ours"], floor_ms=ms["floor"], floor_gbs=gbs["floor"],
               effective_gbs=gbs["ours"], pct_of_floor=100 * gbs["ours"] / gbs["floor"])
    if "torch" in ms:
        diff = float(np.abs(last["ours"]() - last["torch"]()).max())
        row.update(torch_ms=ms["torch"], jax_over_torch=ms["ours"] / ms["torch"],
                   max_abs_diff_vs_torch=diff, torch_gbs=gbs["torch"],
                   torch_pct_of_floor=100 * gbs["torch"] / gbs["floor"],
                   torch_floor_gbs=gbs["torch floor"])
    if ctx["hbm_gbs"]:
        row["pct_of_hbm"] = 100 * gbs["ours"] / ctx["hbm_gbs"]
    return row


def partial_row(args, name, K, module, x, cache_dtype, ctx) -> dict:
    """A ``slots`` cache holding ``filled`` tokens against a ``filled + 1`` one (ours, torch)."""
    slots, filled = args.partial
    big = filled_cache(module, args.batch, slots, cache_dtype, jax.random.key(3), filled)
    tight = filled_cache(module, args.batch, filled + 1, cache_dtype, jax.random.key(3), filled)
    cases = {}
    if ctx["torch_device"] is not None:
        step, _ = torch_step_fns(module, big, x, ctx["torch_device"])
        cases["torch partial"] = batched(step, torch_sync(ctx["torch_device"]), args.inner)
    for label, c in (("partial", big), ("tight", tight)):
        cases[label] = batched(jax_step(module, c, x)[0], jax.block_until_ready, args.inner)
    ms = timed(cases, args.repeats, args.inner)
    row = dict(variant=name, K=K, cache_dtype=cache_dtype.name, slots=slots,
               tight_slots=filled + 1, filled=filled, partial_ms=ms["partial"],
               tight_ms=ms["tight"], partial_over_tight=ms["partial"] / ms["tight"])
    if "torch partial" in ms:
        row["torch_partial_ms"] = ms["torch partial"]
    return row


def dtype_row(args, name, K, module, x, dtypes, S, ctx) -> dict:
    """Ours only, one step per cache dtype at one S, all interleaved in the same rounds.

    The step table measures each cache dtype in its own rounds (beside torch's step
    of that dtype, whose int8 dequantization is slow and disturbs what runs after
    it); here the ratios of the dtypes come from one set of rounds.
    """
    cases = {}
    for d in dtypes:
        cache = filled_cache(module, args.batch, S, d, jax.random.key(S), S - 1)
        cases[d.name] = batched(jax_step(module, cache, x)[0], jax.block_until_ready,
                                args.inner)
    ms = timed(cases, args.repeats, args.inner)
    row = dict(variant=name, K=K, S=S, **{f"{d}_ms": t for d, t in ms.items()})
    base = dtypes[0].name
    row.update({f"{d}_over_{base}": t / ms[base] for d, t in ms.items() if d != base})
    return row


def run(args) -> dict:
    """Measures every section of ``args.sections``; the JSON-ready result."""
    backend = jax.default_backend()
    device_kind = jax.devices()[0].device_kind
    dtype = jnp.dtype(args.dtype or ("bfloat16" if backend == "gpu" else "float32"))
    nominal = next((v for k, v in HBM_GBS.items() if k in device_kind), None)
    hbm = args.hbm_gbs or (nominal if backend == "gpu" else None)
    threads = match_threads()  # before torch_device_for imports torch
    ctx = {"torch_device": torch_device_for(backend), "hbm_gbs": hbm}
    dtypes = [jnp.dtype(d) for d in args.cache_dtypes or cache_dtypes(dtype)]
    D = args.heads * args.head_dim
    steps = len(variants(args.heads)) * (len(dtypes) * (
        len(args.lengths) * ("step" in args.sections) + ("partial" in args.sections))
        + len(args.lengths) * ("layout" in args.sections)
        + len(args.lengths) * ("dtypes" in args.sections))
    rows, partial, layout, by_dtype = [], [], [], []
    load_start = os.getloadavg()
    with progress_bar(steps, "decode") as bar:
        for name, K in variants(args.heads).items():
            m = aj.MultiHeadAttention(D, args.heads, num_kv_heads=K, param_dtype=dtype,
                                      rngs=nnx.Rngs(0))
            x = jax.random.normal(jax.random.key(1), (args.batch, 1, D), dtype)
            for cache_dtype in dtypes:
                for S in args.lengths if "step" in args.sections else ():
                    bar.set_postfix_str(f"{name} {cache_dtype.name} cache, S={S}")
                    rows.append(step_row(args, name, K, m, x, cache_dtype, S, S - 1, ctx))
                    bar.update(1)
                if "partial" in args.sections:
                    bar.set_postfix_str(f"{name} {cache_dtype.name} cache, partial fill")
                    partial.append(partial_row(args, name, K, m, x, cache_dtype, ctx))
                    bar.update(1)
            for S in args.lengths if "dtypes" in args.sections else ():
                bar.set_postfix_str(f"{name} cache dtypes, S={S}")
                by_dtype.append(dtype_row(args, name, K, m, x, dtypes, S, ctx))
                bar.update(1)
            for S in args.lengths if "layout" in args.sections else ():
                from attention_jax.benchmarks.decode_layout import layout_row

                bar.set_postfix_str(f"{name} layouts, S={S}")
                layout.append(layout_row(name, K, S, args, dtype, timed, batched))
                bar.update(1)
    torch_version = sys.modules["torch"].__version__ if ctx["torch_device"] else None
    config = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}
    return dict(backend=backend, device_kind=device_kind, dtype=dtype.name, hbm_gbs=ctx["hbm_gbs"],
                cache_dtypes=[d.name for d in dtypes], threads=threads,
                torch_device=ctx["torch_device"], jax_version=jax.__version__,
                torch_version=torch_version, load_avg_start=load_start,
                load_avg_end=os.getloadavg(), command=" ".join(sys.argv), config=config,
                rows=rows, partial=partial, layout=layout, dtypes=by_dtype,
                time=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def parse_args(argv=None) -> argparse.Namespace:
    """The options of :func:`main`, with the ``--quick`` and backend defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="cache lengths S (default 1024 2048 ... 32768; --quick: 256 1024)")
    for flag, default in (("--batch", 1), ("--heads", 16), ("--head-dim", 64)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cache-dtypes", nargs="+", default=None,
                   help="default: the dtype and the narrower of float32, bfloat16, int8")
    p.add_argument("--sections", nargs="+", choices=("step", "partial", "dtypes", "layout"),
                   default=["step", "partial"], help="dtypes: ours only, the cache dtypes "
                   "interleaved in the same rounds; layout: token- vs head-major cache "
                   "(attention_jax.benchmarks.decode_layout); default step partial")
    p.add_argument("--partial", type=int, nargs=2, default=None, metavar=("SLOTS", "FILLED"),
                   help="partial fill: SLOTS holding FILLED tokens vs FILLED + 1 slots "
                        "(default: the longest length holding shortest - 1)")
    p.add_argument("--repeats", type=int, default=None, help="default 20 (--quick: 5)")
    p.add_argument("--inner", type=int, default=None,
                   help="steps per timed call (default 1 on CPU, 20 on GPU)")
    p.add_argument("--hbm-gbs", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="S in {256, 1024}, 5 repeats")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="folder for the JSON, table and plot (default: the scratch folder)")
    args = p.parse_args(argv)
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else 20)
    args.inner = args.inner or (20 if jax.default_backend() == "gpu" else 1)
    args.partial = args.partial or [max(args.lengths), min(args.lengths) - 1]
    slots, filled = args.partial
    if "partial" in args.sections and not 1 <= filled < slots - 1:
        if args.partial == [max(args.lengths), min(args.lengths) - 1]:
            args.sections = [s for s in args.sections if s != "partial"]  # one length
        else:
            p.error(f"--partial SLOTS FILLED needs 1 <= FILLED < SLOTS - 1; got {slots} {filled}")
    args.out = default_out() if args.out is None else args.out
    return args


def main(argv=None) -> dict:
    """``attention-jax decode``: parses ``argv``, measures, writes JSON / markdown / plot."""
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode_bench_{result['backend']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(report.summarize(result))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.no_plot and result["rows"]:
        report.plot(result, stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png"))
    report.print_tables(result)
    print("wrote " + ", ".join(map(str, written)))
    return result
