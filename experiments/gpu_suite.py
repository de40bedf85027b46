"""One prepared GPU run: the GPU-relevant tests and benchmarks in at most 8 minutes.

GPU time is short and comes rarely, so this is ready to go: on an H100 / H200
(jax with CUDA and torch installed), from the repository root::

    PYTHONPATH=. python experiments/gpu_suite.py --out DIR
    python experiments/gpu_suite.py --dry-run --out DIR     # CPU, toy shapes: it starts

Parts, in this order, each under its own time budget (``BUDGETS``, seconds; a part
past its budget is stopped and recorded as ``timeout`` / ``partial``):

1. ``tests``: pytest of ``TESTS`` (cuDNN and blockwise equivalence, every decode
   path) in a subprocess on the GPU (``JAX_PLATFORMS=cuda``, float32 matmuls at
   ``highest`` precision, as the tests' tolerances assume); outcome of every test
   id from the ``-v`` log. ``--dry-run``: collection only.
2. ``decode``: :mod:`attention_jax.benchmarks.decode` in two subprocesses
   (``DECODE``, ``DECODE_RUNS``: bf16, B=8, bf16 and int8 caches; the steps at
   S = 8192 and 32768, then the 32768-slot cache holding 1023 tokens against a
   1024-slot one): ours, torch, the ``jnp.sum`` floor and % of the nominal HBM
   bandwidth per row. Chained steps re-read one cache: a row whose ``kv_bytes``
   fit in L2 (about 50 MB on Hopper; MQA at S=8192 is 17 MB) measures the cache,
   not HBM; its % of the floor (same bytes, same effect) still compares.
3. ``env``: device kind, versions, ``nvidia-smi``, and two measured ceilings
   (torch: a device-to-device copy, bytes read plus written, and a bf16 matmul of
   random 8192-square matrices; CUDA events, median of 10 after 3 warm-ups).
4. ``core``: attention core in bf16, forward and forward+backward, H in {64, 128},
   T from 1k to 16k at 16k tokens per batch (B = 16384 / T) and width 2048
   (N = 2048 / H), causal and not: ours (``ops.dot_product_attention``,
   implementation ``xla`` up to T=4096, ``blockwise``, ``cudnn``) against torch's
   flash SDPA on the same card, interleaved rounds (each timed call chains enough
   calls to last about 2 ms, then syncs once), medians; TFLOP/s counting
   ``4 B N T S H`` per forward (3.5x with the backward, half when causal), % of the
   device kind's peak (``PEAKS``) and of the measured matmul.

The subprocess parts run before this process starts JAX on the GPU, and
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` keeps JAX from holding most of the card.
Writes ``gpu_suite.json`` (after every part), ``gpu_suite.md`` and ``tests.log`` to
``--out``, and ``decode.log`` and ``decode_bench_<backend>.json`` to its folders
``decode_step`` and ``decode_partial`` (7 files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX; children too
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOTAL_S = 470  # the whole run, under 8 minutes with the interpreter's start
BUDGETS = {"tests": 150, "decode": 110, "env": 30, "core": 170}
TESTS = ["tests/test_gpu.py", "tests/test_decode_kernel.py", "tests/test_cache.py",
         "tests/test_blockwise.py"]
DECODE = ["--batch", "8", "--dtype", "bfloat16", "--cache-dtypes", "bfloat16", "int8",
          "--repeats", "10", "--inner", "20"]
DECODE_RUNS = {"step": ["--lengths", "8192", "32768", "--sections", "step"],
               "partial": ["--lengths", "1024", "32768", "--sections", "partial"]}
PARTIAL_S = 35  # the decode part's last seconds, for the partial-fill run
# A dry run: DECODE_RUNS' options, then these (the last --lengths wins).
DECODE_DRY = ["--batch", "2", "--heads", "2", "--head-dim", "8", "--cache-dtypes", "float32",
              "--repeats", "1", "--lengths", "8", "16"]
CORE = dict(H=(64, 128), T=(1024, 2048, 4096, 8192, 16384), causal=(False, True),
            tokens=16384, width=2048, xla_max_T=4096, reps=10, target_ms=2.0)
CORE_DRY = dict(H=(16, 32), T=(64,), causal=(True,), tokens=128, width=64, xla_max_T=64,
                reps=1, target_ms=0.0)
# Dense bf16 TFLOP/s and HBM GB/s by device kind substring (vendor datasheets; first match).
PEAKS = {"H200": (989.0, 4800.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.0, 3350.0),
         "A100": (312.0, 2039.0), "L40S": (362.0, 864.0), "L4": (121.0, 300.0)}
OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)


def peak_for(device_kind: str) -> dict | None:
    """``{"bf16_tflops", "hbm_gbs"}`` of the first ``PEAKS`` key in ``device_kind``."""
    for key, (tflops, gbs) in PEAKS.items():
        if key in device_kind:
            return {"kind": key, "bf16_tflops": tflops, "hbm_gbs": gbs}
    return None


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[str, int | None]:
    """Runs ``cmd`` in ROOT, output to ``log``; ``(status, returncode)``, "timeout" if killed."""
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            return "timeout", None
    return ("ok" if proc.returncode == 0 else "failed"), proc.returncode


def child_env(args, **extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def part_tests(args, deadline: float) -> dict:
    """pytest of ``TESTS`` on the GPU (``--dry-run``: collected only); every id's outcome."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:randomly", *TESTS]
    cmd += ["--collect-only", "-q"] if args.dry_run else ["-v", "-rfE"]
    extra = {} if args.dry_run else {"JAX_PLATFORMS": "cuda",
                                     "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    log = args.out / "tests.log"
    status, rc = run_logged(cmd, log, child_env(args, **extra), deadline - time.perf_counter())
    text = log.read_text()
    if args.dry_run:
        ids = re.findall(r"^(tests/\S+::\S+)$", text, re.M)
        return {"status": status if ids else "failed", "returncode": rc, "collected": len(ids),
                "files": sorted({i.split("::")[0] for i in ids}), "command": cmd}
    outcomes = dict(OUTCOME.findall(text))
    counts = {o: sum(v == o for v in outcomes.values()) for o in set(outcomes.values())}
    failed = [i for i, o in outcomes.items() if o in ("FAILED", "ERROR")]
    return {"status": status, "returncode": rc, "counts": counts, "failed": failed,
            "outcomes": outcomes, "command": cmd}


def part_decode(args, deadline: float) -> dict:
    """The decode benchmark in two subprocesses (``DECODE_RUNS``: the steps, then the
    partial fill, which gets the last ``PARTIAL_S`` seconds of the budget), so a slow
    first run still leaves a result; the two JSON results merged."""
    runs, results = {}, {}
    for label, argv in DECODE_RUNS.items():
        out = args.out / f"decode_{label}"
        out.mkdir(exist_ok=True)
        for old in out.glob("decode_bench_*"):
            old.unlink()
        cmd = [sys.executable, str(ROOT / "experiments" / "decode_bench.py"),
               *([*argv, *DECODE_DRY] if args.dry_run else [*DECODE, *argv]), "--no-plot",
               "--out", str(out)]
        until = deadline - (PARTIAL_S if label == "step" else 0)
        status, rc = run_logged(cmd, out / "decode.log", child_env(args),
                                until - time.perf_counter())
        found = sorted(out.glob("decode_bench_*.json"))
        if found:
            results[label] = json.loads(found[0].read_text())
        for md in out.glob("decode_bench_*.md"):  # the suite's markdown has the tables
            md.unlink()
        runs[label] = {"status": status if found else "failed", "returncode": rc,
                       "command": cmd}
    merged = results.get("step") or results.get("partial")
    if merged is not None:
        merged = {**merged, "partial": results.get("partial", {}).get("partial", []),
                  "commands": {k: " ".join(r["command"]) for k, r in runs.items()}}
    ok = all(r["status"] == "ok" for r in runs.values())
    return {"status": "ok" if ok else "partial" if merged else "failed", "runs": runs,
            "result": merged}


def torch_median_ms(fn, reps: int, cuda: bool, warmup: int = 3) -> float:
    """Median ms of ``fn()``: CUDA events on a GPU, else a host clock."""
    import numpy as np
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def distributions() -> dict:
    """Installed versions of the packages the suite depends on (None: not installed)."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "torch",
                 "numpy", "ml-dtypes", "pytest"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def part_env(args, deadline: float) -> dict:
    """Device, versions, nvidia-smi and the measured copy / matmul ceilings."""
    import flax
    import jax
    import torch

    cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
    dev = "cuda" if cuda else "cpu"
    kind = jax.devices()[0].device_kind
    info = {"status": "ok", "backend": jax.default_backend(), "device_kind": kind,
            "devices": len(jax.devices()), "jax": jax.__version__,
            "flax": flax.__version__, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "distributions": distributions(),
            "python": platform.python_version(), "peak": peak_for(kind),
            "load_avg": os.getloadavg()}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
             "clocks.max.sm,power.limit", "--format=csv"], capture_output=True, text=True,
            timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"not available: {err}"
    n = (1 << 30) if cuda else (1 << 20)  # bytes copied
    src = torch.rand(n // 2, device=dev).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = torch_median_ms(lambda: dst.copy_(src), 10, cuda)
    info["copy_gbs"] = 2 * n / (ms / 1e3) / 1e9
    m = 8192 if cuda else 256
    a, b = (torch.randn(m, m, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = torch_median_ms(lambda: a @ b, 10, cuda)
    info["matmul_bf16_tflops"] = 2 * m**3 / (ms / 1e3) / 1e12
    return info


def jax_case(impl: str, q, k, v, causal: bool, backward: bool):
    """A zero-argument launcher of ours (no sync) and the sync for its result."""
    import jax
    import jax.numpy as jnp

    from attention_jax import ops

    def fwd(q, k, v):
        return ops.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    fn = jax.jit(jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
                 if backward else fwd)
    return (lambda: fn(q, k, v)), jax.block_until_ready


def torch_flash_case(q, k, v, causal: bool, backward: bool, device: str):
    """torch's flash SDPA on the same values (layout ``[B, N, T, H]``)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def to_torch(x):  # [B, T, N, H] -> [B, N, T, H]; DLPack, else through the host
        try:
            t = torch.from_dlpack(x)
        except Exception:  # any failure: the host copy
            t = torch.tensor(np.asarray(x, np.float32))
        return t.to(device, torch.bfloat16).transpose(1, 2).contiguous()

    tq, tk, tv = (to_torch(x).requires_grad_(backward) for x in (q, k, v))
    ct = torch.ones_like(tq)

    def launch():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            if backward:
                out.backward(ct)
                for x in (tq, tk, tv):
                    x.grad = None
            return out

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    return launch, sync


def core_config(cfg: dict, H: int, causal: bool, T: int, ctx: dict) -> list[dict]:
    """Forward and forward+backward rows of one (H, causal, T): every contender."""
    import jax
    import jax.numpy as jnp

    from attention_jax import kernels
    from attention_jax.benchmarks.attention import gflops, interleaved
    from attention_jax.benchmarks.decode import batched

    B, N = max(1, cfg["tokens"] // T), cfg["width"] // H
    keys = jax.random.split(jax.random.key(T + H), 3)  # random on the device: no host copy
    q, k, v = (jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in keys)
    reason = kernels.cudnn_unsupported_reason(q, k, v, platform=jax.default_backend())
    rows = []
    for backward in (False, True):
        tflop = gflops(B, N, T, T, H, causal=causal, backward=backward) / 1e3
        inner = 1
        if cfg["target_ms"] and ctx["peak"]:  # calls per timed call: about target_ms
            est_ms = 1e3 * tflop / (0.5 * ctx["peak"]["bf16_tflops"])
            inner = max(1, min(100, math.ceil(cfg["target_ms"] / est_ms)))
        row = {"H": H, "causal": causal, "T": T, "B": B, "N": N,
               "kind": "fwd+bwd" if backward else "fwd", "tflop": tflop, "inner": inner,
               "contenders": {}, "skipped": {}}
        makers = {"xla": None, "blockwise": None, "cudnn": None, "torch flash": None}
        if T > cfg["xla_max_T"]:
            row["skipped"]["xla"] = f"T={T} > {cfg['xla_max_T']}: materialized scores"
        if reason:
            row["skipped"]["cudnn"] = reason
        if ctx["torch_device"] is None:
            row["skipped"]["torch flash"] = "no torch on this device"
        cases = {}
        for name in [m for m in makers if m not in row["skipped"]]:
            try:
                launch, sync = (torch_flash_case(q, k, v, causal, backward, ctx["torch_device"])
                                if name == "torch flash" else
                                jax_case(name, q, k, v, causal, backward))
                case = batched(launch, sync, inner)
                case()  # compile / first call, errors surface here
                cases[name] = case
            except Exception as err:  # recorded: one contender fails, not the run
                row["skipped"][name] = f"{type(err).__name__}: {str(err)[:300]}"
        for name, res in interleaved(cases, cfg["reps"]).items():
            ms = res["median_ms"] / inner
            c = {"ms": ms, "tflops": tflop / (ms / 1e3)}
            if ctx["peak"]:
                c["pct_of_peak"] = 100 * c["tflops"] / ctx["peak"]["bf16_tflops"]
            if ctx.get("matmul_tflops"):
                c["pct_of_matmul"] = 100 * c["tflops"] / ctx["matmul_tflops"]
            row["contenders"][name] = c
        rows.append(row)
    return rows


def part_core(args, deadline: float, env: dict | None) -> dict:
    import jax

    from attention_jax.benchmarks.decode import torch_device_for

    cfg = CORE_DRY if args.dry_run else CORE
    ctx = {"peak": peak_for(jax.devices()[0].device_kind),
           "matmul_tflops": (env or {}).get("matmul_bf16_tflops") if not args.dry_run else None,
           "torch_device": torch_device_for(jax.default_backend())}
    # Coverage first: T = 1k, 4k, 16k at both H and causal settings, then the other T.
    configs = sorted(((H, c, T) for H in cfg["H"] for c in cfg["causal"] for T in cfg["T"]),
                     key=lambda x: (x[2] not in (1024, 4096, 16384), x[1], x[2], x[0]))
    rows, skipped, errors, last_s = [], [], [], 0.0
    for H, causal, T in configs:
        if time.perf_counter() + last_s > deadline:
            skipped.append({"H": H, "causal": causal, "T": T})
            continue
        t0 = time.perf_counter()
        try:
            rows += core_config(cfg, H, causal, T, ctx)
        except Exception as err:  # recorded (an out-of-memory, say); the other configs run
            errors.append({"H": H, "causal": causal, "T": T,
                           "error": f"{type(err).__name__}: {str(err)[:500]}"})
        last_s = time.perf_counter() - t0
        if ctx["torch_device"] == "cuda":
            sys.modules["torch"].cuda.empty_cache()
    rows.sort(key=lambda r: (r["H"], r["causal"], r["T"], r["kind"]))
    return {"status": "partial" if skipped or errors else "ok", "config": cfg, "rows": rows,
            "not_run_for_time": skipped, "errors": errors}


def core_table(rows: list[dict]) -> list[dict]:
    """One line per (H, causal, T, kind): each contender's ms, TFLOP/s and % of peak."""
    out = []
    for r in rows:
        line = {"H": r["H"], "causal": str(r["causal"]), "T": r["T"], "B": r["B"],
                "kind": r["kind"]}
        for name in ("xla", "blockwise", "cudnn", "torch flash"):
            c = r["contenders"].get(name, {})
            line.update({f"{name} ms": c.get("ms"), f"{name} TFLOP/s": c.get("tflops"),
                         f"{name} % peak": c.get("pct_of_peak")})
        out.append(line)
    return out


def markdown(result: dict) -> str:
    from attention_jax.benchmarks import decode_report

    env, parts = result.get("env", {}), result["parts"]
    lines = [f"# GPU suite{' (dry run)' if result['dry_run'] else ''}", "",
             f"`{result['command']}` at {result['started']}", "",
             f"Device {env.get('device_kind')} ({env.get('backend')}); jax {env.get('jax')}, "
             f"flax {env.get('flax')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
             f"peak {env.get('peak')}; measured copy {env.get('copy_gbs', 0):.0f} GB/s, bf16 "
             f"matmul {env.get('matmul_bf16_tflops', 0):.1f} TFLOP/s.", "",
             decode_report.md_table([{"part": p, "status": r.get("status"),
                                      "seconds": r.get("seconds"), "budget s": r.get("budget_s")}
                                     for p, r in parts.items()])]
    tests = parts.get("tests", {})
    if "counts" in tests:
        lines += ["", "## Tests", "", f"counts {tests['counts']}; failed:"]
        lines += [f"- {i}" for i in tests["failed"]] or ["- none"]
    dec = (parts.get("decode") or {}).get("result")
    if dec:
        lines += ["", "## Decode step", "", decode_report.header(dec), "",
                  decode_report.md_table(decode_report.wide_rows(dec))]
        if dec.get("partial"):
            lines += ["", decode_report.md_table(decode_report.partial_rows(dec))]
    core = parts.get("core", {})
    if core.get("rows"):
        lines += ["", "## Attention core, bf16 (TFLOP/s; % of the device kind's peak)", "",
                  decode_report.md_table(core_table(core["rows"]))]
    return "\n".join(lines) + "\n"


PARTS = ("tests", "decode", "env", "core")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and tables")
    p.add_argument("--dry-run", action="store_true",
                   help="every part at toy shapes, on the CPU: proves the suite starts")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # the subprocesses run in ROOT
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run":
              args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
    for name in [q for q in PARTS if q in args.parts]:
        budget = max(1.0, min(BUDGETS[name], TOTAL_S - (time.perf_counter() - start)))
        t0 = time.perf_counter()
        print(f"gpu_suite: {name} (budget {budget:.0f} s)", flush=True)
        try:
            if name == "core":
                res = part_core(args, t0 + budget, result.get("env"))
            else:
                res = {"tests": part_tests, "decode": part_decode, "env": part_env}[name](
                    args, t0 + budget)
        except Exception as err:  # recorded; the next parts still run
            res = {"status": "error", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-4000:]}
        res.update(seconds=time.perf_counter() - t0, budget_s=budget)
        result["parts"][name] = res
        if name == "env":
            result["env"] = res
        (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"gpu_suite: {name} {res['status']} in {res['seconds']:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - start
    (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_suite.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
