"""Compile time and step time of an L-layer attention stack against L separate layers.

One decode step (one new token per row, a cache half full) of L residual GQA layers,
three ways:

* ``stacked``: :func:`attention_jax.stack.stack_decode`, one ``nnx.scan`` over a
  module with a leading layer axis; one jitted program whose body is one layer.
* ``unrolled``: one jitted program over a Python loop of the L layers: L copies of
  the layer in the program (compile time grows with L).
* ``per_layer``: one jitted layer step, called L times per token (compiled once,
  L dispatches per token: the L-jitted-calls decoder).

Per (way, L): the seconds to trace, lower and compile the program (``compile_s``;
the persistent compilation cache is off) and the median seconds of one decode step
of all L layers (``step_s``, caches donated, ``block_until_ready``); the outputs of
the three are checked equal. On a loaded or shared machine the timings are
indicative only.

    python experiments/stack_compile.py [--layers 4,16] [--out DIR]
    python experiments/stack_compile.py --tiny      # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import stack as st
from attention_jax.config import AttentionConfig

WAYS = ("stacked", "unrolled", "per_layer")


def _config(args: argparse.Namespace) -> AttentionConfig:
    return AttentionConfig(args.width, args.heads, num_kv_heads=args.kv_heads,
                           rope=10_000.0, param_dtype=jnp.dtype(args.dtype))


def _programs(stack: nnx.Module, L: int):
    """``{way: (compile_fn, step_fn)}`` on pure states; each step maps ``(x, caches)`` to
    ``(y, caches)`` and owns its caches' layout (stacked or a list)."""
    graphdef, state = nnx.split(stack)
    layers = [nnx.split(st.layer(stack, i)) for i in range(L)]
    layer_def = layers[0][0]

    def stacked(state, x, cache):
        return st.stack_decode(nnx.merge(graphdef, state), x, cache)

    def one_layer(state, x, cache):
        y, cache = nnx.merge(layer_def, state).decode(x, cache)
        return x + y, cache

    def unrolled(states, x, caches):
        out = []
        for s, c in zip(states, caches, strict=True):
            x, c = one_layer(s, x, c)
            out.append(c)
        return x, out

    return {
        "stacked": (jax.jit(stacked, donate_argnums=2), state),
        "unrolled": (jax.jit(unrolled, donate_argnums=2), [s for _, s in layers]),
        "per_layer": (jax.jit(one_layer, donate_argnums=2), [s for _, s in layers]),
    }


def _caches(way: str, stack: nnx.Module, L: int, args: argparse.Namespace):
    """A half-full cache for ``way``: stacked, or one per layer."""
    cache = st.init_stacked_cache(stack, L, args.batch, args.cache_len)
    cache = cache.replace(lengths=jnp.full_like(cache.lengths, args.cache_len // 2))
    if way == "stacked":
        return cache
    return [st.layer_cache(cache, i) for i in range(L)]


def _run_step(way: str, fn, params, x, caches):
    if way == "per_layer":  # L calls of the one compiled layer
        out = []
        for s, c in zip(params, caches, strict=True):
            x, c = fn(s, x, c)
            out.append(c)
        return x, out
    return fn(params, x, caches)


def measure(way: str, L: int, args: argparse.Namespace) -> dict:
    """One row: compile seconds, median step seconds, and the output (for the check)."""
    stack = st.stacked(_config(args), L, rngs=nnx.Rngs(0))
    fn, params = _programs(stack, L)[way]
    x = jax.random.normal(jax.random.key(1), (args.batch, 1, args.width), args.dtype)
    probe = _caches(way, stack, L, args)  # the program's argument shapes
    lower_args = (params[0], x, probe[0]) if way == "per_layer" else (params, x, probe)
    t0 = time.perf_counter()
    fn.lower(*lower_args).compile()
    compile_s = time.perf_counter() - t0
    caches = _caches(way, stack, L, args)
    y, caches = _run_step(way, fn, params, x, caches)  # warm-up (and the checked output)
    jax.block_until_ready(y)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        _, caches = _run_step(way, fn, params, x, caches)
        jax.block_until_ready(caches)
        times.append(time.perf_counter() - t0)
    return {"way": way, "layers": L, "compile_s": compile_s,
            "step_s": statistics.median(times), "y": np.asarray(y, np.float32)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=None,
                   help="comma-separated layer counts L (default 4,16; --tiny: 2,3)")
    p.add_argument("--tiny", action="store_true", help="toy shapes, L in {2, 3}: a smoke run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=512, help="D")
    p.add_argument("--heads", type=int, default=8, help="N")
    p.add_argument("--kv-heads", type=int, default=2, help="K")
    p.add_argument("--cache-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="also write DIR/stack_compile.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.width, args.heads, args.cache_len, args.repeats = 2, 32, 4, 16, 2
    if args.layers is None:
        args.layers = "2,3" if args.tiny else "4,16"
    saved = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # compile times, not cache hits
    try:
        return _run(args)
    finally:
        jax.config.update("jax_enable_compilation_cache", saved)


def _run(args: argparse.Namespace) -> int:
    layer_counts = [int(n) for n in args.layers.split(",")]
    rows, ok = [], True
    print(f"{'way':>10} {'L':>4} {'compile_s':>10} {'step_ms':>9}")
    for L in layer_counts:
        outputs = {}
        for way in WAYS:
            row = measure(way, L, args)
            outputs[way] = row.pop("y")
            rows.append(row)
            print(f"{way:>10} {L:>4} {row['compile_s']:>10.3f} {row['step_s'] * 1e3:>9.3f}",
                  flush=True)
        atol = 1e-4 if args.dtype == "float32" else 5e-2
        for way in WAYS[1:]:
            err = float(np.max(np.abs(outputs[way] - outputs["stacked"])))
            ok &= err <= atol
            print(f"  L={L}: max |{way} - stacked| = {err:.2e}")
    report = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "devices": str(jax.devices()), "rows": rows, "outputs_equal": bool(ok)}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stack_compile.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
