"""The table and plot of :mod:`attention_jax.benchmarks.head_parallel` results.

:func:`table_rows` picks and formats the printed columns of the result rows
(collectives as :func:`attention_jax.cli.format_collectives` writes them);
:func:`plot` draws forward times and parameter bytes per device, per mesh and
variant. The measuring is in :mod:`attention_jax.benchmarks.head_parallel_measure`,
the driver in :mod:`attention_jax.benchmarks.head_parallel`, which re-exports
both names here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attention_jax.cli import format_collectives


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed columns of the result rows."""
    out = []
    for r in rows:
        moved = (f"{r['transfers_per_call']} ({r['transfer_bytes_per_call'] / 1024:.0f} KiB)"
                 if r["transfers_per_call"] else "0")
        out.append({
            "layout": r["layout"], "mesh": r["mesh"], "attn": f"{r['variant']} {r['N']}/{r['K']}",
            "err_fwd": r["err_fwd"], "err_grad": r["err_grad"],
            "compile_s": r["compile_s"], "fwd_ms": r["fwd_ms"], "step_ms": r["step_ms"],
            "fwd collectives": format_collectives(r["fwd_collectives"]),
            "fwd+bwd collectives": format_collectives(r["bwd_collectives"]),
            "host puts/call": moved,
            "param KiB/dev": r["param_bytes_per_device"] / 1024,
        })
    return out


def plot(result: dict, path: Path) -> bool:
    """Step/forward times per mesh and variant, baseline forward as a dashed line."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    meshes = list(dict.fromkeys(r["mesh"] for r in rows if r["layout"] == "shard_map"))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(variants))
    for vi, var in enumerate(variants):
        fwd = [next(r["fwd_ms"] for r in rows if r["mesh"] == m and r["variant"] == var
                    and r["layout"] == "shard_map") for m in meshes]
        pos = np.arange(len(meshes)) + vi * width
        bars = ax_t.bar(pos, fwd, width, label=f"{var} shard_map fwd")
        base = [r for r in rows if r["layout"] != "shard_map" and r["variant"] == var]
        if base:
            ax_t.axhline(base[0]["fwd_ms"], ls="--", color=bars[0].get_facecolor(),
                         label=f"{var} device_put loop fwd")
        kib = [next(r["param_bytes_per_device"] for r in rows if r["mesh"] == m
                    and r["variant"] == var and r["layout"] == "shard_map") / 1024
               for m in meshes]
        ax_b.bar(pos, kib, width, label=var)
    for ax in (ax_t, ax_b):
        ax.set_xticks(np.arange(len(meshes)) + width * (len(variants) - 1) / 2, meshes)
        ax.set_xlabel("mesh (data x model)")
    ax_t.set_ylabel("forward ms (median)")
    ax_t.set_title(f"forward time on {result['device']}")
    ax_t.legend(fontsize=7)
    ax_b.set_ylabel("parameter KiB per device")
    ax_b.set_title("parameter bytes per device")
    ax_b.legend(fontsize=7)
    if result["fake_devices"]:
        fig.text(0.5, 0.005, "fake CPU devices sharing the host's cores: times prove nothing "
                 "about speed", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
