"""``attention-jax generate``: the thin front to ``experiments/hf_generate.py`` main(argv).

In-process through :func:`attention_jax.cli.main` (the default ``--devices 1`` only
prints a note in this 8-device session). The report is the script's JSON; ``--check``
compares our greedy tokens with transformers' ``generate(do_sample=False)``, and a
difference is exit status 1 (shown with our tokens shifted on purpose).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from attention_jax import cli

pytest.importorskip("torch")
pytest.importorskip("transformers")

ARGV = ["generate", "--model", "tiny:llama", "--ids", "1,2,3", "--max-new-tokens", "3",
        "--check"]


def _report(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def test_help_lists_generate(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "    generate " in capsys.readouterr().out


def test_generate_tiny_llama_reports_equal(tmp_path, capsys):
    assert cli.main([*ARGV, "--out", str(tmp_path)]) == 0
    report = _report(capsys.readouterr().out)
    assert report["family"] == "llama" and report["equal"] is True
    assert report["tokens"] == report["transformers"]
    assert np.asarray(report["tokens"]).shape == (1, 3)
    assert json.loads((tmp_path / "hf_generate.json").read_text()) == report


def test_generate_left_padded_batch(tmp_path, capsys):
    argv = ["generate", "--model", "tiny:qwen2", "--ids", "5,9,2,7", "--ids", "3,8",
            "--max-new-tokens", "3", "--check", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = _report(capsys.readouterr().out)
    assert report["equal"] is True and np.asarray(report["tokens"]).shape == (2, 3)


def test_generate_mismatch_exits_1(tmp_path, capsys, monkeypatch):
    script = cli.load_experiment("generate")
    real = script.generate_padded
    monkeypatch.setattr(script, "generate_padded", lambda *a, **k: real(*a, **k) + 1)
    assert cli.main([*ARGV, "--out", str(tmp_path)]) == 1
    report = _report(capsys.readouterr().out)
    assert report["equal"] is False and report["tokens"] != report["transformers"]
