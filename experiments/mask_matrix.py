"""The mask x backend matrix: forward and gradient errors of every mask object on every backend.

For every mask object of :mod:`attention_jax.masks` (and combinations, with the
score_mods :func:`attention_jax.scores.softcap` / :func:`~attention_jax.scores.alibi`
and sinks) and every backend (``xla``, ``blockwise``, ``decode``, ``cudnn``,
``auto``), one jitted call gives the output and, through ``jax.vjp`` with a fixed
random cotangent, the gradients with respect to q, k, v, the sinks and the ALiBi
slopes the score_mod closes over. Both are compared with the dense einsum
reference: the same call with ``mask=m.dense(B, N, T, S)`` and
``implementation="xla"``. GQA (N=4 query heads, K=2 kv heads), float32, two
shapes: T = S and T != S (``--tiny``: T != S only). Gradient errors are relative to
max(1, the largest reference value) (the slopes' gradient is a sum of B*N*T*S terms).

A cell is ``ok`` (the two max abs errors), or ``refused: <message>`` where the
backend raises a ValueError for the call (cuDNN off GPU or with what it does not
take, ``decode`` with a score_mod or sinks); any other exception is an ``error``
cell. The ``blockwise`` column runs the kernel with small explicit tiles
(``--block``, default 64) so that tile skipping is exercised (the default tiles
would make T = 256 one tile); it records the tiles run / all tiles. ``auto``
records the backend it picked.

Writes ``mask_matrix.json`` and ``mask_matrix.md`` under ``--out`` (default
``experiments/out``, ignored by git) and prints the table.

    python experiments/mask_matrix.py [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks as M
from attention_jax import ops, scores
from attention_jax.kernels import blockwise, dispatch

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"
BACKENDS = ("xla", "blockwise", "decode", "cudnn", "auto")
# Error bound of a supported cell (float32): max abs error of the output (values O(1)),
# and of each gradient relative to max(1, max abs of the reference gradient) (the
# ALiBi slopes' gradient sums B*N*T*S terms: tens, not O(1)).
FWD_TOL, GRAD_TOL = 2e-5, 2e-5
SIZES = {  # name -> (B, N, K, H, shapes [(T, S)], blockwise tile, layout block)
    "default": (2, 4, 2, 32, [(256, 256), (192, 384)], 64, 32),  # auto: xla, then blockwise
    "tiny": (2, 4, 2, 8, [(24, 40)], 8, 8),  # T != S only: the test stays short
}


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def _segment_ids(B, L, docs, pad):
    """``[B, L]`` ids: ``docs`` equal documents, row 0 also ending in ``pad`` padding (-1)."""
    ids = np.minimum(np.arange(L) * docs // L, docs - 1)[None].repeat(B, 0)
    ids[1] = np.minimum((np.arange(L) + L // (2 * docs)) * docs // L, docs - 1)  # shifted
    ids[0, L - pad:] = -1
    return jnp.asarray(ids, jnp.int32)


def cases(B, N, T, S, layout_block):
    """name -> (mask object or None, score_mod kind (None / "softcap" / "alibi"), sinks?)."""
    w = max(2, min(T, S) // 8)
    nq, nk = -(-T // layout_block), -(-S // layout_block)
    lb = layout_block
    seg = M.Segments(_segment_ids(B, T, 3, T // 8), _segment_ids(B, S, 3, S // 8))
    bigbird = M.BlockSparse.bigbird(1, 1, 1, num_q_blocks=nq, num_kv_blocks=nk, block_q=lb,
                                    num_heads=N, seed=0)
    chunk = max(2, min(T, S) // 4)
    return {
        "Causal()": (M.Causal(), None, False),
        "Causal(S - T)": (M.Causal(S - T), None, False),
        f"SlidingWindow({w - 1}) & Causal()": (M.SlidingWindow(w - 1) & M.Causal(), None, False),
        f"SlidingWindow({w // 2}, {w // 4})": (M.SlidingWindow(w // 2, w // 4), None, False),
        f"Chunked({chunk}) & Causal()": (M.Chunked(chunk) & M.Causal(), None, False),
        "Segments (3 docs, padding)": (seg, None, False),
        "Segments & Causal()": (seg & M.Causal(), None, False),
        "Lengths(kv, q)": (M.Lengths(jnp.asarray([S // 2 + 3, S]), jnp.asarray([T, T // 3])),
                           None, False),
        "BlockSparse.random (per head)": (M.BlockSparse.random(
            nq, nk, lb, num_random=2, num_heads=N, seed=1), None, False),
        "BlockSparse.local_global": (M.BlockSparse.local_global(
            nq, nk, lb, window=2, num_global=1), None, False),
        "BlockSparse.strided (causal)": (M.BlockSparse.strided(nq, nk, lb, stride=3), None,
                                         False),
        "BlockSparse.bigbird": (bigbird, None, False),
        "FromFunction((t + 2s + n) % 3 != 0)": (M.FromFunction(
            lambda b, n, t, s: (t + 2 * s + n) % 3 != 0), None, False),
        "FromFunction(s <= t) & SlidingWindow": (M.FromFunction(lambda b, n, t, s: s <= t)
                                                 & M.SlidingWindow(w - 1), None, False),
        "Chunked | (Causal() & SlidingWindow(1))": (
            M.Chunked(chunk) | (M.Causal() & M.SlidingWindow(1)), None, False),
        "Causal() + softcap": (M.Causal(), "softcap", False),
        "SlidingWindow & Causal() + alibi": (M.SlidingWindow(w - 1) & M.Causal(), "alibi",
                                             False),
        "Segments & Causal() + sinks": (seg & M.Causal(), None, True),
        "BlockSparse.bigbird + softcap + sinks": (bigbird, "softcap", True),
        "Chunked & Causal() + alibi + sinks": (M.Chunked(chunk) & M.Causal(), "alibi", True),
        "no mask + alibi + sinks": (None, "alibi", True),
    }


def _score_mod(kind, slopes):
    return {None: None, "softcap": scores.softcap(2.0), "alibi": scores.alibi(slopes)}[kind]


# ---------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------


def _inputs(B, N, K, H, T, S, seed=0):
    rng = np.random.default_rng(seed)
    f = jnp.float32
    q, k, v = (jnp.asarray(rng.standard_normal(s), f)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    sinks = jnp.asarray(rng.standard_normal(N), f)
    slopes = jnp.asarray(scores.alibi_slopes(N))
    cot = jnp.asarray(rng.standard_normal((B, T, N, H)), f)  # the output's cotangent
    return (q, k, v, sinks, slopes), cot


def _attention_fn(backend, mask, kind, use_sinks, block):
    """``fn(q, k, v, sinks, slopes) -> out`` for one backend (``"reference"``: dense, xla)."""
    def fn(q, k, v, sinks, slopes):
        kw = dict(score_mod=_score_mod(kind, slopes), sinks=sinks if use_sinks else None)
        if backend == "reference":
            B, T, N, _ = q.shape
            dense = None if mask is None else mask.dense(B, N, T, k.shape[1])
            return ops.dot_product_attention(q, k, v, dense, implementation="xla", **kw)
        if backend == "blockwise":
            return blockwise.blockwise_attention(q, k, v, mask, block_q=block, block_kv=block,
                                                 **kw)
        return ops.dot_product_attention(q, k, v, mask, implementation=backend, **kw)
    return fn


def _wrt(kind, use_sinks):
    """Names of the arguments the gradient is taken for."""
    return ("q", "k", "v") + (("sinks",) if use_sinks else ()) + (
        ("slopes",) if kind == "alibi" else ())


def evaluate(backend, mask, kind, use_sinks, args, cot, block):
    """``(out, {name: gradient})`` from one jitted call (output and vjp)."""
    fn = _attention_fn(backend, mask, kind, use_sinks, block)
    names = ("q", "k", "v", "sinks", "slopes")
    wrt = _wrt(kind, use_sinks)

    @jax.jit
    def run(args, cot):
        out, vjp = jax.vjp(fn, *args)
        return out, dict(zip(names, vjp(cot), strict=True))

    out, grads = run(args, cot)
    return out, {n: grads[n] for n in wrt}


def cell(backend, mask, kind, use_sinks, args, cot, block, reference):
    """One matrix cell as a dict: ``status`` ok / refused / error and the errors."""
    ref_out, ref_grads = reference
    try:
        out, grads = evaluate(backend, mask, kind, use_sinks, args, cot, block)
    except ValueError as e:
        return {"status": "refused", "message": str(e)}
    except Exception as e:  # recorded as a failed cell: the test fails on it
        return {"status": "error", "message": f"{type(e).__name__}: {e}"}
    errs = {n: float(jnp.max(jnp.abs(grads[n] - ref_grads[n]))) for n in grads}
    scale = {n: max(1.0, float(jnp.max(jnp.abs(ref_grads[n])))) for n in grads}
    res = {"status": "ok", "fwd_err": float(jnp.max(jnp.abs(out - ref_out))),
           "grad_err": max(errs[n] / scale[n] for n in grads), "grad_abs_errs": errs,
           "grad_scales": scale,
           "finite": bool(np.isfinite(np.asarray(out)).all()
                          and all(np.isfinite(np.asarray(g)).all() for g in grads.values()))}
    B, T, N, _ = args[0].shape
    S = args[1].shape[1]
    if backend == "blockwise":
        cls = M.block_map(mask, B, N, T, S, block, block)
        res["tiles"] = blockwise.tile_counts(np.asarray(cls).max((0, 1)))
    if backend == "auto":
        extras = {k: v for k, v in (("score_mod", _score_mod(kind, args[4])),
                                    ("sinks", args[3] if use_sinks else None)) if v is not None}
        res["picked"] = dispatch.choose_implementation(args[0], args[1], args[2], mask,
                                                       **extras)
    return res


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------


def matrix(size="default", backends=BACKENDS):
    """``{"meta", "rows"}``: one row per (shape, case) with a cell per backend."""
    B, N, K, H, shapes, block, layout_block = SIZES[size]
    t0 = time.perf_counter()
    rows = []
    for T, S in shapes:
        args, cot = _inputs(B, N, K, H, T, S)
        for name, (mask, kind, use_sinks) in cases(B, N, T, S, layout_block).items():
            reference = evaluate("reference", mask, kind, use_sinks, args, cot, block)
            row = {"T": T, "S": S, "case": name, "cells": {}}
            for backend in backends:
                row["cells"][backend] = cell(backend, mask, kind, use_sinks, args, cot, block,
                                             reference)
            rows.append(row)
    meta = dict(size=size, B=B, N=N, K=K, H=H, V=H, dtype="float32", blockwise_tile=block,
                layout_block=layout_block, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL,
                platform=jax.default_backend(), jax=jax.__version__,
                seconds=time.perf_counter() - t0,
                what="max abs error vs the dense einsum reference (mask=m.dense(...), xla); "
                     "gradients w.r.t. q, k, v, sinks, ALiBi slopes")
    return {"meta": meta, "rows": rows}


def _cell_text(c):
    if c["status"] == "refused":
        return "refused: " + c["message"].split(";")[0]
    if c["status"] == "error":
        return "**error**: " + c["message"][:80]
    text = f"{c['fwd_err']:.1e} / {c['grad_err']:.1e}"
    if "tiles" in c:
        t = c["tiles"]
        text += f" ({t['computed']}/{t['computed'] + t['skipped']} tiles)"
    if "picked" in c:
        text += f" ({c['picked']})"
    return text


def markdown(result) -> str:
    m = result["meta"]
    backends = list(result["rows"][0]["cells"])
    lines = [
        f"# Mask x backend matrix ({m['platform']}, {m['size']})", "",
        f"B={m['B']}, N={m['N']}, K={m['K']} (GQA), H=V={m['H']}, {m['dtype']}; cell: max abs "
        "error of the forward / of the gradients (q, k, v, sinks, ALiBi slopes; each relative "
        "to max(1, its largest reference value)) against the dense einsum reference "
        "(`mask=m.dense(...)`, `implementation=\"xla\"`); blockwise "
        f"with {m['blockwise_tile']} x {m['blockwise_tile']} tiles (tiles run / all); auto: "
        f"the backend it picked. Tolerance {m['fwd_tol']:g} / {m['grad_tol']:g}. "
        f"{m['seconds']:.0f} s.", "",
        "| T | S | mask | " + " | ".join(backends) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in backends) + " |",
    ]
    for r in result["rows"]:
        case = r["case"].replace("|", "\\|")
        lines.append(f"| {r['T']} | {r['S']} | {case} | "
                     + " | ".join(_cell_text(r["cells"][b]) for b in backends) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy shapes (T <= 40): a smoke test")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help="folder for mask_matrix.json / .md (default experiments/out)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS))
    args = p.parse_args(argv)
    result = matrix("tiny" if args.tiny else "default", tuple(args.backends))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask_matrix.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "mask_matrix.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'mask_matrix.json'} and mask_matrix.md")
    return result


if __name__ == "__main__":
    main()
