"""experiments/gpu_suite.py starts: its CPU dry run runs every part at toy shapes.

The real run needs a GPU (see the script's doc); here a subprocess runs
``--dry-run`` and the JSON must hold every part, each with what it measured.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "gpu_suite.py"
TIMEOUT_S = 600  # generous: the machine is shared; the dry run takes about a minute


def _load_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), out, proc.stdout


def test_every_part_ran(dry_run):
    result, out, stdout = dry_run
    suite = _load_suite()
    assert result["dry_run"] and "--dry-run" in result["command"]
    assert list(result["parts"]) == list(suite.PARTS)
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert 0 < part["seconds"] <= part["budget_s"] + 30, (name, part)
    assert sum(suite.BUDGETS.values()) <= suite.TOTAL_S <= 480  # 8 minutes
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert files == ["decode_partial/decode.log", "decode_partial/decode_bench_cpu.json",
                     "decode_step/decode.log", "decode_step/decode_bench_cpu.json",
                     "gpu_suite.json", "gpu_suite.md", "tests.log"]  # the device sends 8 back
    assert "## Attention core" in stdout and "## Decode step" in stdout


def test_tests_part_collects_every_selected_file(dry_run):
    tests = dry_run[0]["parts"]["tests"]
    assert tests["files"] == sorted(_load_suite().TESTS)
    assert tests["collected"] > 50


def test_decode_part_has_ours_torch_floor_and_partial(dry_run):
    part = dry_run[0]["parts"]["decode"]
    assert {k: r["status"] for k, r in part["runs"].items()} == {"step": "ok", "partial": "ok"}
    dec = part["result"]
    assert dec["rows"] and dec["partial"] and dec["config"]["lengths"] == [8, 16]
    # a fresh process: OpenMP's threads wait passively unless the environment says otherwise
    assert not dec["threads"]["torch_imported_before"]
    assert dec["threads"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    for row in dec["rows"]:
        for field in ("jax_ms", "torch_ms", "floor_gbs", "pct_of_floor"):
            assert row[field] > 0, (field, row)


def test_env_records_device_versions_and_ceilings(dry_run):
    env = dry_run[0]["parts"]["env"]
    for field in ("device_kind", "jax", "flax", "torch", "python"):
        assert env[field], field
    assert env["copy_gbs"] > 0 and env["matmul_bf16_tflops"] > 0


def test_core_part_has_each_head_size_kind_and_contender(dry_run):
    core = dry_run[0]["parts"]["core"]
    cfg = core["config"]
    rows = core["rows"]
    assert {(r["H"], r["kind"]) for r in rows} == {(H, k) for H in cfg["H"]
                                                   for k in ("fwd", "fwd+bwd")}
    for r in rows:
        assert set(r["contenders"]) == {"xla", "blockwise", "torch flash"}, r
        assert "GPU" in r["skipped"]["cudnn"]  # the CPU has no cuDNN: said, not hidden
        for c in r["contenders"].values():
            assert c["ms"] > 0 and c["tflops"] == pytest.approx(r["tflop"] / (c["ms"] / 1e3))


def test_peak_table_and_core_rows():
    suite = _load_suite()
    assert suite.peak_for("NVIDIA H100 PCIe")["hbm_gbs"] == 2000.0
    assert suite.peak_for("NVIDIA H100 80GB HBM3")["hbm_gbs"] == 3350.0
    assert suite.peak_for("NVIDIA H200")["bf16_tflops"] == 989.0
    assert suite.peak_for("cpu") is None
    line = suite.core_table([{"H": 64, "causal": True, "T": 1024, "B": 16, "kind": "fwd",
                              "contenders": {"cudnn": {"ms": 1.0, "tflops": 2.0}}}])[0]
    assert line["cudnn TFLOP/s"] == 2.0 and line["xla ms"] is None
