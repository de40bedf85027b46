"""``attention-jax shard --context``: the context-parallel benchmark behind the shard subcommand.

Runs in a fresh interpreter (the device flag only works before JAX starts) at toy
lengths, and reads back the JSON it wrote under a temporary ``--out``.
"""

import json
import subprocess
import sys
from pathlib import Path

from attention_jax.benchmarks import head_parallel
from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # the machine is shared


def test_shard_context_writes_its_json_table_and_counts(tmp_path):
    out = tmp_path / "out"
    # contexts 1 (the baseline row) and 4; two context devices are checked against one
    # device in test_context_module (the 2x2x2 meshes), so here they would only add compiles
    cmd = [sys.executable, "-m", "attention_jax", "shard", "--context", "--quick",
           "--devices", "4", "--lengths", "64", "--contexts", "1", "4",
           "--dtype", "float32", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=child_env())  # --devices decides
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "context.json").read_text())
    assert (out / "context.md").read_text().startswith("| T | context | strategy")
    assert not (out / "head_parallel.json").exists()  # the context benchmark, not heads
    assert saved["devices"] == 4 and saved["config"]["dtype"] == "float32"
    rows = {(r["context"], r["strategy"], r["layout"]): r for r in saved["rows"]}
    assert len(rows) == len(saved["rows"]) == 2 * 2 * 2
    assert all(r["T"] == 64 for r in saved["rows"])
    for (c, strategy, layout), r in rows.items():
        if c == 1:
            assert r["fwd"] == {} and r["train"] == {}, r
        elif strategy == "ring":
            assert r["fwd"].get("collective-permute", 0) >= 1 and "all-gather" not in r["fwd"], r
            assert len(r["tiles"]) == c
            if layout == "zigzag":  # causal balance
                assert r["tile_spread"] <= 0.1, r
        else:
            assert r["fwd"] == {"all-gather": 1}, r
            assert r["train"].get("reduce-scatter", 0) == 1, r
        assert r["temp_mib"] > 0
    assert "context=4 ring zigzag" in proc.stdout


def test_context_flag_hands_the_rest_to_the_context_benchmark(monkeypatch):
    seen = {}
    from attention_jax.benchmarks import context

    monkeypatch.setattr(context, "main", lambda argv: seen.setdefault("argv", argv))
    head_parallel.main(["--quick", "--context", "--lengths", "64", "--out", "x"])
    assert seen["argv"] == ["--quick", "--lengths", "64", "--out", "x"]
