"""Tables and plot of :mod:`attention_jax.benchmarks.decode` results.

Three tables, the same in the terminal (:func:`attention_jax.cli.print_table`)
and in the markdown file (:func:`summarize`):

* KV-cache bytes per token of each variant and cache dtype;
* the decode step, one line per variant and S, with for each cache dtype ours,
  torch, ours' GB/s and % of the floor, and int8 over the widest cache;
* the partial fill: a long cache holding few tokens against a tight one;
* with ``--sections dtypes``, ours' step per cache dtype in the same rounds;
* with ``--sections layout``, the token-major against the head-major cache.

A fourth, every measured field of every row, is in the markdown only.
"""

from __future__ import annotations

import pathlib

from attention_jax.cli import format_column, print_table


def md_table(rows: list[dict]) -> str:
    """Rows of dicts (the first row's keys are the columns) as a markdown table.

    >>> print(md_table([{"a": 1, "b": 0.5}, {"a": 2, "b": None}]))
    | a | b |
    |---|---|
    | 1 | 0.50 |
    | 2 | n/a |
    """
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = {c: format_column([r.get(c) for r in rows]) for c in columns}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells[c][i] for c in columns) + " |" for i in range(len(rows))]
    return "\n".join(lines)


def bytes_rows(result: dict) -> list[dict]:
    """One line per variant: K and the bytes per token of each cache dtype."""
    out: dict[str, dict] = {}
    for r in result["rows"] + result.get("partial", []):
        line = out.setdefault(r["variant"], {"variant": r["variant"], "K": r["K"]})
        if "bytes_per_token" in r:
            line[f"{r['cache_dtype']} bytes/token"] = r["bytes_per_token"]
    return list(out.values())


def wide_rows(result: dict) -> list[dict]:
    """One line per (variant, S): each cache dtype's ours / torch ms, GB/s and % of floor."""
    dtypes = result.get("cache_dtypes") or sorted({r["cache_dtype"] for r in result["rows"]})
    lines: dict[tuple, dict] = {}
    for r in result["rows"]:
        key = (r["variant"], r["S"])
        line = lines.setdefault(key, {"variant": r["variant"], "K": r["K"], "S": r["S"],
                                      "floor GB/s": r["floor_gbs"]})
        d = r["cache_dtype"]
        line.update({f"{d} ms": r["jax_ms"], f"{d} torch ms": r.get("torch_ms"),
                     f"{d} GB/s": r["effective_gbs"], f"{d} % floor": r["pct_of_floor"]})
        if "pct_of_hbm" in r:
            line[f"{d} % HBM"] = r["pct_of_hbm"]
    for line in lines.values():
        if "int8 ms" in line and dtypes[0] != "int8" and f"{dtypes[0]} ms" in line:
            line[f"int8 / {dtypes[0]}"] = line["int8 ms"] / line[f"{dtypes[0]} ms"]
    return list(lines.values())


def long_rows(result: dict) -> list[dict]:
    """Every row with its measured fields (ours, torch, both floors, errors)."""
    out = []
    for r in result["rows"]:
        line = {"variant": r["variant"], "cache": r["cache_dtype"], "S": r["S"],
                "KV MB": r["kv_bytes"] / 1e6, "ours ms": r["jax_ms"],
                "torch ms": r.get("torch_ms"), "ours/torch": r.get("jax_over_torch"),
                "ours GB/s": r["effective_gbs"], "torch GB/s": r.get("torch_gbs"),
                "floor GB/s": r["floor_gbs"], "torch floor GB/s": r.get("torch_floor_gbs"),
                "ours % floor": r["pct_of_floor"], "torch % floor": r.get("torch_pct_of_floor"),
                "max diff vs torch": r.get("max_abs_diff_vs_torch")}
        if "pct_of_hbm" in r:
            line["ours % HBM"] = r["pct_of_hbm"]
        out.append(line)
    return out


def partial_rows(result: dict) -> list[dict]:
    """The partial-fill lines: long cache, tight cache, their ratio, torch on the long one."""
    return [{"variant": r["variant"], "cache": r["cache_dtype"], "filled": r["filled"],
             f"{r['slots']} slots ms": r["partial_ms"],
             f"{r['tight_slots']} slots ms": r["tight_ms"], "ratio": r["partial_over_tight"],
             "torch ms (long cache)": r.get("torch_partial_ms")}
            for r in result.get("partial", [])]


def dtype_rows(result: dict) -> list[dict]:
    """The cache-dtype lines: ours' ms per dtype and each over the first dtype's."""
    out = []
    for r in result.get("dtypes", []):
        line = {"variant": r["variant"], "K": r["K"], "S": r["S"]}
        line.update({k.replace("_over_", " / ").replace("_ms", " ms"): v
                     for k, v in r.items() if k.endswith("_ms") or "_over_" in k})
        out.append(line)
    return out


def layout_rows(result: dict) -> list[dict]:
    """The layout lines: each contender's ms and % of the floor, and their max difference."""
    names = ("token_major", "token_major_einsum", "head_major")
    return [{"variant": r["variant"], "S": r["S"],
             **{f"{n.replace('_', ' ')} ms": r[f"{n}_ms"] for n in names},
             **{f"{n.replace('_', ' ')} % floor": r[f"{n}_pct_of_floor"] for n in names},
             "max diff": r["max_abs_diff"]} for r in result.get("layout", [])]


def header(result: dict) -> str:
    """The run in one paragraph: device, shapes, threads, load, repetitions."""
    cfg, th = result["config"], result["threads"]
    load = ", ".join(f"{a:.1f}" for a in result["load_avg_start"])
    return (f"Backend {result['backend']} ({result['device_kind']}), params {result['dtype']}, "
            f"B={cfg['batch']}, N={cfg['heads']}, H=V={cfg['head_dim']}; one decode step "
            f"(t=1), median of {cfg['repeats']} interleaved rounds ({cfg['inner']} steps per "
            f"timed call); threads: XLA {th['xla_intra_op']}, torch {th.get('torch', 'n/a')} "
            f"(OMP_WAIT_POLICY {th.get('omp_wait_policy', 'n/a')}); "
            f"load average at start {load}; jax {result['jax_version']}, torch "
            f"{result['torch_version']}. Floor: jnp.sum over as many bytes as the step reads.")


def summarize(result: dict) -> str:
    """The markdown file: the header, the three tables and every measured field."""
    parts = [f"`{result['command']}`", header(result),
             "KV-cache bytes per token (one row, one layer):", md_table(bytes_rows(result)),
             "Decode step (ms; GB/s and % of the floor are ours):", md_table(wide_rows(result))]
    if result.get("partial"):
        parts += ["Partial fill (ms):", md_table(partial_rows(result))]
    if result.get("dtypes"):
        parts += ["Cache dtypes, ours only, interleaved in the same rounds (ms):",
                  md_table(dtype_rows(result))]
    if result.get("layout"):
        parts += ["Cache layout, attention only ([B, S, K, H] token-major vs [B, K, S, H]):",
                  md_table(layout_rows(result))]
    if result["rows"]:
        parts += ["Every field:", md_table(long_rows(result))]
    return "\n\n".join(parts) + "\n"


def print_tables(result: dict) -> None:
    """The three tables of the module doc, as rich tables."""
    print_table(bytes_rows(result), title="KV-cache bytes per token (one row, one layer)")
    if result["rows"]:
        print_table(wide_rows(result), key_columns=3, title=(
            f"Decode step on {result['backend']} ({result['device_kind']}), params "
            f"{result['dtype']}: ms per step; GB/s and % of the floor (a reduction over the "
            "same bytes) are ours"), caption=header(result))
    if result.get("partial"):
        print_table(partial_rows(result), key_columns=2,
                    title="Partial fill: a long cache holding few tokens vs a tight one")
    if result.get("dtypes"):
        print_table(dtype_rows(result), key_columns=3,
                    title="Cache dtypes: ours only, interleaved in the same rounds (ms)")
    if result.get("layout"):
        print_table(layout_rows(result), key_columns=2,
                    title="Cache layout, attention only: token-major vs head-major")


def plot(result: dict, path: pathlib.Path) -> None:
    """Step time against S: ours per cache dtype, torch and the floor (float cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = dict(zip(result["cache_dtypes"], ("-", "--", ":", "-."), strict=False))
    for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        for d, ls in styles.items():
            sel = [r for r in rows if r["variant"] == name and r["cache_dtype"] == d]
            ax.plot([r["S"] for r in sel], [r["jax_ms"] for r in sel], ls, marker="o",
                    color=f"C{i}", label=f"{name} ours ({d})")
        sel = [r for r in rows if r["variant"] == name and r["cache_dtype"] == result["dtype"]]
        if any("torch_ms" in r for r in sel):
            ax.plot([r["S"] for r in sel], [r.get("torch_ms") for r in sel], "-", marker="x",
                    color=f"C{i}", alpha=0.5, label=f"{name} torch ({result['dtype']})")
        ax.plot([r["S"] for r in sel], [r["floor_ms"] for r in sel], color=f"C{i}", lw=0.8,
                alpha=0.4, label=f"{name} floor ({result['dtype']})")
    ax.set(xscale="log", yscale="log", xlabel="cache length S", ylabel="decode step (ms)",
           title=f"decode step, {result['backend']} ({result['device_kind']})")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
