"""The main job runs, agrees with PyTorch, and reports what the README promises."""

import pytest

from attention_jax import demo


def test_demo_rows(capsys):
    pytest.importorskip("torch")
    cfg = demo.DemoConfig(batch=2, seq_len=16, embed=32, num_heads=4,
                          variants=(("MHA", 4), ("GQA", 2), ("MQA", 1)), repeats=1)
    rows = demo.run(cfg)
    out = capsys.readouterr().out
    assert [r["variant"] for r in rows] == ["MHA", "GQA", "MQA"]
    for row in rows:
        assert row["max_err_vs_torch"] < 1e-5, row
        # K * (H + V) float32 values per token; H = V = 32 / 4
        assert row["kv_bytes_per_token"] == row["K"] * 16 * 4
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["decode_step_ms"] > 0
        assert f"  {row['variant']}  " in out
        # head-parallel on all 8 fake devices (N=4: mesh data=2, model=4)
        assert row["sharded_err"] < 1e-5, row
        assert row["fwd_collectives"] == "all-reduce@model:1", row
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert "decode_step_ms" in out and "sharded_err" in out
