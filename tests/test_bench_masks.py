"""The ``masks`` benchmark section at ``--tiny``: what it records, checked against itself
and against the dense masks.

Times mean nothing here (toy shapes, a shared machine); the tests check the tile
counts against the dense mask tile by tile, the ratios against the numbers they
come from, the bars against the ratios, the ``largest`` selection against the
budget, and that the JSON (with ``uptime``) and the markdown are written.
"""

import itertools
import json
import types

import numpy as np
import pytest

from attention_jax import masks as M
from attention_jax.benchmarks import attention, attention_masks
from attention_jax.kernels import blockwise


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("torch")  # main records torch's version
    out = tmp_path_factory.mktemp("bench_masks")
    attention.main(["--sections", "masks", "--tiny", "--no-plot", "--out", str(out)])
    saved = json.loads((out / "bench_masks_cpu.json").read_text())
    whole = json.loads((out / "bench_attention_cpu.json").read_text())
    return saved, whole, (out / "bench_masks_cpu.md").read_text()


def _dense_tiles(mask, T):
    """Tiles the kernel must run, from the dense mask: any visible pair, union over heads."""
    bq, bk = blockwise.default_block_sizes(T, T)
    d = np.asarray((M.Causal() if mask is None else mask).dense(1, 2, T, T)).any((0, 1))
    return int(d.reshape(T // bq, bq, T // bk, bk).any(axis=(1, 3)).sum())


def test_rows_tiles_and_ratios(result):
    saved, whole, _ = result
    sh = attention_masks.MASK_SHAPES["tiny"]
    T = sh["T"]
    assert saved["shape"]["T"] == T and whole["masks"]["rows"] == saved["rows"]
    rows = saved["rows"]
    cases = attention_masks.mask_cases(1, sh["N"], T, sh["window"], sh["docs"])
    assert list(rows) == ["causal", "window", "segments", "chunked", "bigbird", "lengths"]
    causal = rows["causal"]
    for name, row in rows.items():
        assert row["tiles"]["computed"] == _dense_tiles(cases[name][0], T), name
        assert row["time_ratio"] == pytest.approx(row["median_ms"] / causal["median_ms"])
        assert row["temp_ratio"] == pytest.approx(row["temp_bytes"] / causal["temp_bytes"])
        assert row["tiles_ratio"] == pytest.approx(row["tiles"]["computed"]
                                                   / causal["tiles"]["computed"])
        assert row["temp_bytes"] > 0 and len(row["all_ms"]) == saved["reps"] == 2
        assert row["meets_memory_bar"] == (row["temp_ratio"] <= attention_masks.MEMORY_BAR)
        if name in attention_masks.TIME_BARS:
            assert row["meets_time_bar"] == (row["time_ratio"]
                                             <= attention_masks.TIME_BARS[name])
    for name in ("window", "segments", "chunked", "lengths"):
        assert rows[name]["tiles"]["computed"] < causal["tiles"]["computed"], name


def test_largest_grows_linearly_and_runs_the_largest_that_fits(result):
    saved, _, _ = result
    lg = saved["largest"]
    Ts = [r["T"] for r in lg["rows"]]
    assert Ts == list(attention_masks.MASK_SHAPES["tiny"]["largest_T"])
    for r in lg["rows"]:
        assert r["total_bytes"] == r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
        assert r["fits"] == (r["total_bytes"] <= lg["memory_budget_bytes"])
    temps = [r["temp_bytes"] for r in lg["rows"]]
    assert temps == sorted(temps)
    # memory linear in T: doubling T at most doubles the temporary bytes (plus a margin)
    assert all(b <= 2.2 * a for a, b in itertools.pairwise(temps))
    assert lg["run"]["T"] == max(r["T"] for r in lg["rows"] if r["fits"])
    assert lg["run"]["finite"] and lg["run"]["second_call_s"] > 0


def test_load_and_files(result):
    saved, _, md = result
    for key in ("uptime_start", "uptime_end"):
        assert "load average" in saved[key]
    assert len(saved["load_avg_start"]) == 3
    for row in saved["rows"].values():
        assert f"| {row['mask']} |" in md
    assert saved["largest"]["mask"] in md and "real run at T=" in md


def test_nothing_runs_when_nothing_fits():
    sh = dict(attention_masks.MASK_SHAPES["tiny"], largest_T=(256,), largest_window=64)
    args = types.SimpleNamespace(dtype="float32")
    bar = types.SimpleNamespace(update=lambda n: None)
    lg = attention_masks._largest(args, bar, sh, budget=0)
    assert lg["run"] is None and not lg["rows"][0]["fits"]
    assert "nothing fits" in attention_masks.markdown({
        "shape": dict(B=1, T=256, N=2, H=16, dtype="float32", what="x"), "size": "tiny",
        "reps": 1, "uptime_start": "", "uptime_end": "", "cpu_count": 1, "device": "cpu",
        "rows": {}, "largest": lg})
