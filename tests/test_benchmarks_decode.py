"""attention_jax.benchmarks.decode at toy shapes: every field, the partial fill, where it writes.

Times here mean nothing (toy shapes, a shared machine): the tests check that each
row has ours / torch / floor / % of floor for every cache dtype, that the numbers
agree with each other and with torch's outputs, and that a run without ``--out``
leaves the committed ``experiments/results`` alone.
"""

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import cli
from attention_jax.benchmarks import decode, decode_report

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (16, 32)
TINY = ["--heads", "4", "--head-dim", "8", "--repeats", "1", "--no-plot"]
# max |ours - torch| of the step's output by cache dtype (values O(1), D = 32)
DIFF_TOL = {"float32": 1e-5, "bfloat16": 3e-2, "int8": 1e-2}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("decode")
    decode.main(["--lengths", *map(str, LENGTHS), *TINY, "--out", str(out)])
    saved = json.loads((out / "decode_bench_cpu.json").read_text())
    return saved, out


def test_every_row_has_ours_torch_floor_and_percent_for_each_cache_dtype(result):
    saved, _ = result
    assert saved["cache_dtypes"] == ["float32", "bfloat16", "int8"]
    rows = {(r["variant"], r["cache_dtype"], r["S"]): r for r in saved["rows"]}
    assert set(rows) == {(v, d, S) for v in ("MHA", "GQA", "MQA")
                         for d in saved["cache_dtypes"] for S in LENGTHS}
    for (_, dtype, S), r in rows.items():
        assert r["filled"] == S - 1 and r["kv_bytes"] == S * r["bytes_per_token"]  # B = 1
        for field in ("jax_ms", "torch_ms", "floor_ms", "floor_gbs", "effective_gbs",
                      "pct_of_floor", "torch_gbs", "torch_pct_of_floor", "torch_floor_gbs"):
            assert r[field] > 0, (field, r)
        assert r["floor_gbs"] == pytest.approx(r["kv_bytes"] / r["floor_ms"] / 1e6)
        assert r["effective_gbs"] == pytest.approx(r["kv_bytes"] / r["jax_ms"] / 1e6)
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["jax_ms"])
        assert r["jax_over_torch"] == pytest.approx(r["jax_ms"] / r["torch_ms"])
        assert r["max_abs_diff_vs_torch"] < DIFF_TOL[dtype], r
    bpt = {(v, d): rows[v, d, LENGTHS[0]]["bytes_per_token"] for v, d, _ in rows}
    assert bpt["MHA", "float32"] == 4 * 2 * 4 * 8  # K * (H + V) * 4
    assert bpt["MHA", "int8"] == 4 * 2 * 8 + 2 * 4 * 4  # int8 values, float32 scales
    assert "pct_of_hbm" not in rows["MHA", "float32", 16]  # CPU: no nominal bandwidth


def test_partial_fill_rows(result):
    saved, _ = result
    partial = saved["partial"]
    assert [(r["variant"], r["cache_dtype"]) for r in partial] == [
        (v, d) for v in ("MHA", "GQA", "MQA") for d in saved["cache_dtypes"]]
    for r in partial:
        # the longest length holding shortest - 1 tokens vs a cache of the shortest length
        assert (r["slots"], r["tight_slots"], r["filled"]) == (32, 16, 15)
        assert r["partial_ms"] > 0 and r["tight_ms"] > 0 and r["torch_partial_ms"] > 0
        assert r["partial_over_tight"] == pytest.approx(r["partial_ms"] / r["tight_ms"])


def test_run_records_threads_load_and_tables(result):
    saved, out = result
    assert saved["threads"]["torch"] == saved["threads"]["xla_intra_op"] >= 1
    assert len(saved["load_avg_start"]) == 3 and saved["jax_version"] == jax.__version__
    md = (out / "decode_bench_cpu.md").read_text()
    for text in ("float32 % floor", "bfloat16 torch ms", "int8 / float32", "Partial fill",
                 "32 slots ms", "torch % floor"):
        assert text in md, text
    wide = decode_report.wide_rows(saved)
    assert len(wide) == 3 * len(LENGTHS)
    first = wide[0]
    assert first["int8 / float32"] == pytest.approx(first["int8 ms"] / first["float32 ms"])
    decode_report.plot(saved, out / "plot.png")
    assert (out / "plot.png").stat().st_size > 0


def _results_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                           "experiments/results"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_quick_run_without_out_writes_the_scratch_folder_only(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(cli, "OUT_IN_CHECKOUT", tmp_path / "scratch")  # default_out() here
    before = _results_status()
    decode.main(["--quick", "--lengths", "8", *TINY, "--cache-dtypes", "float32"])
    assert _results_status() == before
    saved = json.loads((tmp_path / "scratch" / "decode_bench_cpu.json").read_text())
    assert [r["S"] for r in saved["rows"]] == [8, 8, 8]
    assert saved["partial"] == []  # one length: nothing to compare


def test_quick_defaults_and_out():
    args = decode.parse_args(["--quick"])
    assert args.lengths == decode.QUICK_LENGTHS and args.repeats == decode.QUICK_REPEATS
    assert args.partial == [1024, 255] and args.inner == 1 and args.out == cli.default_out()
    assert decode.parse_args([]).partial == [32768, 1023]


def test_bad_partial_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        decode.parse_args(["--lengths", "16", "--partial", "64", "63"])
    assert exit_.value.code == 2
    assert "1 <= FILLED < SLOTS - 1; got 64 63" in capsys.readouterr().err


def test_cache_dtypes_and_filled_cache():
    assert [d.name for d in decode.cache_dtypes("float16")] == ["float16", "int8"]
    m = aj.MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
    c = decode.filled_cache(m, 2, 8, jnp.int8, jax.random.key(0), filled=3)
    assert c.lengths.tolist() == [3, 3] and c.quantized
    with pytest.raises(ValueError, match=r"\[1, 7\].*filled=8"):
        decode.filled_cache(m, 1, 8, jnp.float32, jax.random.key(0), filled=8)


def test_layout_section_times_both_layouts_of_the_same_attention(tmp_path):
    result = decode.main(["--lengths", "16", *TINY, "--sections", "layout", "--out",
                          str(tmp_path)])
    assert result["rows"] == [] and result["partial"] == []
    assert [(r["variant"], r["S"]) for r in result["layout"]] == [
        ("MHA", 16), ("GQA", 16), ("MQA", 16)]
    for r in result["layout"]:
        assert r["max_abs_diff"] < 1e-5, r
        for name in ("token_major", "token_major_einsum", "head_major"):
            assert r[f"{name}_ms"] > 0
            assert r[f"{name}_pct_of_floor"] == pytest.approx(
                100 * r["floor_ms"] / r[f"{name}_ms"])
    assert "head major ms" in (tmp_path / "decode_bench_cpu.md").read_text()


def test_dtypes_section_times_every_cache_dtype_in_the_same_rounds(tmp_path):
    result = decode.main(["--lengths", "16", *TINY, "--sections", "dtypes", "--out",
                          str(tmp_path)])
    assert result["rows"] == [] and result["partial"] == [] and result["layout"] == []
    assert [(r["variant"], r["S"]) for r in result["dtypes"]] == [
        ("MHA", 16), ("GQA", 16), ("MQA", 16)]
    for r in result["dtypes"]:
        for d in ("float32", "bfloat16", "int8"):
            assert r[f"{d}_ms"] > 0
        for d in ("bfloat16", "int8"):
            assert r[f"{d}_over_float32"] == pytest.approx(r[f"{d}_ms"] / r["float32_ms"])
    lines = decode_report.dtype_rows(result)
    assert list(lines[0]) == ["variant", "K", "S", "float32 ms", "bfloat16 ms", "int8 ms",
                              "bfloat16 / float32", "int8 / float32"]
    assert "int8 / float32" in (tmp_path / "decode_bench_cpu.md").read_text()


def test_head_major_attention_is_the_attention_of_the_transposed_cache():
    from attention_jax import ops
    from attention_jax.benchmarks.decode_layout import head_major_attention

    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (2, 3, 8, 16))
    k, v = (jax.random.normal(key, (2, 20, 2, 16)) for key in (kk, kv))
    got = head_major_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    want = ops.dot_product_attention(q, k, v, implementation="xla")
    assert jnp.allclose(got, want, atol=1e-5)
