"""Tables and plots of :mod:`attention_jax.benchmarks.attention` results.

:func:`summary_tables` turns the results (the JSON that ``main`` writes) into
``[(title, rows)]`` for :func:`attention_jax.cli.print_table`; :func:`plot` draws
time vs T (the ``sweep`` section) and temporary memory vs T (``memory``). The
measuring is in :mod:`attention_jax.benchmarks.attention` (sections, ``main``) and
:mod:`attention_jax.benchmarks.attention_cases` (timing, contenders); both names
here are importable from :mod:`attention_jax.benchmarks.attention` too.
"""

from __future__ import annotations


def _shape_label(shape):
    return " ".join(f"{d}={shape[d]}" for d in "BNH" if d in shape) + f" {shape['dtype']}"


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
               title=f"attention core, {_shape_label(results['sweep']['shape'])}")
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
               title="jit(grad) temporary memory, "
                     f"{_shape_label(results['memory']['shape'])} causal")
        t_axis(ax, [r["T"] for r in rows])
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{path_prefix}_memory_vs_T.png", dpi=120)


def _shape_text(section):
    return ", ".join(f"{k}={v}" for k, v in section["shape"].items() if k != "what")


def summary_tables(results):
    """``[(title, rows)]``: the results as tables (one row dict per line)."""
    tables = []
    for sec in ("core", "module"):
        if sec not in results:
            continue
        rows = []
        for key, val in results[sec].items():
            if key == "shape":
                continue
            for name, x in val["results"].items():
                row = {"case": key, "contender": name, "median ms": x["median_ms"],
                       "min ms": x["min_ms"]}
                for label in ("vs_torch", "vs_flax"):
                    if f"ratio_{label}" in val:
                        row[f"{label.replace('_', ' ')} (median)"] = val[f"ratio_{label}"][name]
                        row[f"{label.replace('_', ' ')} (min)"] = (
                            val[f"ratio_{label}_of_min"][name])
                if "gflop_s" in x:
                    row["GFLOP/s"] = x["gflop_s"]
                rows.append(row)
        tables.append((f"{sec}: {_shape_text(results[sec])}", rows))
    if "crossover" in results:
        title = f"crossover: blockwise / xla, fwd+bwd; {_shape_text(results['crossover'])}"
        tables.append((title, [
            {"T": T, "median ratio": val["blockwise_over_xla"],
             "ratio of min": val["blockwise_over_xla_of_min"]}
            for T, val in results["crossover"]["T"].items()]))
    if "sweep" in results:
        tables.append((f"sweep: fwd+bwd; {_shape_text(results['sweep'])}", [
            {"T": run["T"], "causal": str(run["causal"]), "contender": name,
             "median ms": x["median_ms"], "GFLOP/s": x["gflop_s"]}
            for run in results["sweep"]["runs"] for name, x in run["fwd+bwd"].items()]))
    if "memory" in results:
        tables.append((f"memory: jit(grad) temporary MiB; {_shape_text(results['memory'])}", [
            {"T": row["T"], "xla MiB": row["xla"] / 2**20,
             "blockwise MiB": row["blockwise"] / 2**20}
            for row in results["memory"]["rows"]]))
    for sec, title in (("remat", "remat: jit(grad) of a residual attention stack"),
                       ("precision", "precision: core fwd+bwd, causal")):
        if sec in results:
            tables.append((f"{title}; {_shape_text(results[sec])}", [
                {("temp MiB" if k == "temp_bytes" else k): (v / 2**20 if k == "temp_bytes" else v)
                 for k, v in row.items()}
                for row in results[sec]["rows"]]))
    if "dots" in results:
        from attention_jax.benchmarks.attention_dots import dots_table
        tables.append((f"dots: the blockwise kernel's products alone, one per tile; "
                       f"{_shape_text(results['dots'])}", dots_table(results["dots"])))
    if "largest" in results:
        lg = results["largest"]
        tables.append(("largest: blockwise fwd+bwd", [
            {"T": lg["shape"]["T"], "seconds incl. compile": lg["seconds_incl_compile"],
             "peak RSS GiB": lg["peak_rss_bytes"] / 2**30,
             "temp MiB": lg["temp_bytes"] / 2**20}]))
    return tables
