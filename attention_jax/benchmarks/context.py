"""Context parallelism: per-device memory, collectives and causal balance against T.

For each sequence length T, context size P in {1, 2, 4, 8}, strategy (ring,
all-gather) and layout (contiguous, zigzag), causal GQA self-attention on local
``[B, T/P, N, H]`` blocks (:mod:`attention_jax.parallel.context`) is compiled, not
run, on a ``(context,)`` mesh of the first P devices:

* ``temp_mib``: the compiled training step's (``grad`` of ``sum(out * ct)`` w.r.t.
  q, k, v) temporary bytes per device, from ``memory_analysis()``;
* ``fwd`` / ``train``: the collectives XLA put in the forward and the training
  programs (:func:`attention_jax.hlo.collective_counts`);
* ``tiles``: for the ring, the kernel tiles each device computes in the forward
  pass (:func:`attention_jax.parallel.ring.ring_tile_counts`) and their spread
  ``(max - min) / max``.

Fake CPU devices share the host's cores: nothing here is timed, and no speed is
claimed. Writes ``context.json``, ``context.md`` and ``context.png`` under ``--out``
(default ``experiments/out/context``).

    attention-jax shard --context [--quick] [--lengths 1024 4096] [--out DIR]
    python -m attention_jax.benchmarks.context [--quick] [--lengths 1024 4096] [--out DIR]

(``attention-jax shard --context`` is :func:`attention_jax.benchmarks.head_parallel.main`
handing the rest of its arguments to :func:`main`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import hlo, masks
from attention_jax.parallel import context as cp
from attention_jax.parallel import ring

DEFAULT_OUT = Path("experiments/out/context")
STRATEGIES = {"ring": ring.ring_attention, "all_gather": cp.all_gather_attention}


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes and what to run.

    Attributes:
      lengths: the sequence lengths T.
      contexts: context sizes P (each <= the device count; T % (2P) == 0).
      strategies: names in :data:`STRATEGIES`.
      layouts: ``"contiguous"`` / ``"zigzag"``.
      batch, num_heads, num_kv_heads, head_dim: B, N, K, H.
      dtype: q, k, v and the cotangent.
    """

    lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
    contexts: tuple[int, ...] = (1, 2, 4, 8)
    strategies: tuple[str, ...] = ("ring", "all_gather")
    layouts: tuple[str, ...] = ("contiguous", "zigzag")
    batch: int = 1
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    dtype: str = "float32"


QUICK = Config(lengths=(256, 1024), contexts=(1, 2, 4, 8))


def _mesh(context: int) -> Mesh:
    devices = jax.devices()
    if context > len(devices):
        raise ValueError(f"context={context} needs {context} devices; JAX has {len(devices)}")
    return Mesh(np.array(devices[:context]), ("context",))


def programs(cfg: Config, T: int, context: int, strategy: str, layout: str):
    """``(forward, train, args)``: the jitted sharded programs and abstract inputs."""
    mesh = _mesh(context)
    seq = P(None, "context")
    fn = STRATEGIES[strategy]

    def body(q, k, v):
        return fn(q, k, v, axis_name="context", mask=masks.Causal(), layout=layout)

    f = jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq), out_specs=seq)
    dt = jnp.dtype(cfg.dtype)
    sh = NamedSharding(mesh, seq)
    B, N, K, H = cfg.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    args = (jax.ShapeDtypeStruct((B, T, N, H), dt, sharding=sh),
            jax.ShapeDtypeStruct((B, T, K, H), dt, sharding=sh),
            jax.ShapeDtypeStruct((B, T, K, H), dt, sharding=sh),
            jax.ShapeDtypeStruct((B, T, N, H), dt, sharding=sh))

    def train(q, k, v, ct):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(f), jax.jit(train), args


def tile_counts(T: int, context: int, layout: str, cfg: Config) -> list[int]:
    """Kernel tiles each device computes in the ring's causal forward pass."""
    mesh = _mesh(context)

    def body(q):
        return ring.ring_tile_counts(q, q, axis_name="context", mask=masks.Causal(),
                                     layout=layout)[None]

    f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "context"), out_specs=P("context"))
    return np.asarray(jax.jit(f)(jnp.zeros((1, T, 1, 1)))).tolist()


def measure(cfg: Config, T: int, context: int, strategy: str, layout: str) -> dict:
    """One row: memory per device, collectives of both programs, ring tile counts."""
    fwd, train, args = programs(cfg, T, context, strategy, layout)
    fwd_c = fwd.lower(*args[:3]).compile()
    train_c = train.lower(*args).compile()
    mem = train_c.memory_analysis()
    row = dict(T=T, context=context, strategy=strategy, layout=layout,
               temp_mib=mem.temp_size_in_bytes / 2**20,
               argument_mib=mem.argument_size_in_bytes / 2**20,
               fwd=_nonzero(hlo.collective_counts(fwd_c)),
               train=_nonzero(hlo.collective_counts(train_c)))
    if strategy == "ring":
        tiles = tile_counts(T, context, layout, cfg)
        row["tiles"] = tiles
        row["tile_spread"] = (max(tiles) - min(tiles)) / max(tiles)
    return row


def run(cfg: Config = Config(), progress=print) -> dict:
    rows = []
    for T in cfg.lengths:
        for c in cfg.contexts:
            for strategy in cfg.strategies:
                for layout in cfg.layouts:
                    rows.append(measure(cfg, T, c, strategy, layout))
                    if progress:
                        r = rows[-1]
                        progress(f"T={T} context={c} {strategy} {layout}: "
                                 f"temp {r['temp_mib']:.1f} MiB, fwd {r['fwd']}")
    return {"config": dataclasses.asdict(cfg), "platform": jax.default_backend(),
            "devices": jax.device_count(), "rows": rows,
            "note": "compiled, not run; fake CPU devices: no speed claims"}


def _nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def markdown(result: dict) -> str:
    """The table: one row per (T, context, strategy, layout)."""
    lines = ["| T | context | strategy | layout | temp MiB / device | forward collectives "
             "| train collectives | ring tiles per device (spread) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        tiles = "" if "tiles" not in r else (
            f"{min(r['tiles'])}..{max(r['tiles'])} ({100 * r['tile_spread']:.0f}%)")
        lines.append(f"| {r['T']} | {r['context']} | {r['strategy']} | {r['layout']} | "
                     f"{r['temp_mib']:.2f} | {_fmt(r['fwd'])} | {_fmt(r['train'])} | {tiles} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Temporary MiB per device against T, one line per (context, strategy); zigzag rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in result["rows"] if r["layout"] == "zigzag"] or result["rows"]
    for strategy, style in (("ring", "-"), ("all_gather", "--")):
        for c in sorted({r["context"] for r in rows}):
            pts = sorted((r["T"], r["temp_mib"]) for r in rows
                         if r["strategy"] == strategy and r["context"] == c)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{strategy} P={c}")
    ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="temporary MiB per device",
           title="Causal GQA training step, compiled (fake CPU devices)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "context.json").write_text(json.dumps(result, indent=1))
    (out / "context.md").write_text(markdown(result))
    plot(result, out / "context.png")


def main(argv=None) -> dict:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs, writes JSON, table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in {256, 1024}")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES))
    parser.add_argument("--layouts", nargs="+", choices=list(cp.LAYOUTS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="q, k, v and the cotangent (default float32)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.dtype:
        cfg = dataclasses.replace(cfg, dtype=args.dtype)
    if args.lengths:
        cfg = dataclasses.replace(cfg, lengths=tuple(args.lengths))
    for name in ("contexts", "strategies", "layouts"):
        if getattr(args, name):
            cfg = dataclasses.replace(cfg, **{name: tuple(getattr(args, name))})
    result = run(cfg)
    write(result, Path(args.out))
    print(markdown(result))
    return result


if __name__ == "__main__":
    from attention_jax import runtime

    runtime.use_fake_cpu_devices(8)
    main()
