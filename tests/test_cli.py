"""The ``attention-jax`` command line: parsing, forwarding, errors, and each subcommand run.

Parsing and error paths run in-process (they stop before JAX picks devices). Every
subcommand also runs once, end to end, in a fresh interpreter: the device flag only
works before JAX starts, and this test session already started it with 8 devices.
``shard --quick`` runs in a pseudo-terminal 80 columns wide, without ``--out``: its
tables must fit, and it must write to the ignored scratch folder only.
"""

import dataclasses
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from attention_jax import cli
from attention_jax.benchmarks import attention as bench_attention
from tests.conftest import visible_lines
from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # per subprocess, generous: the machine is shared
ATOL_BF16 = 0.1  # max |difference| of bfloat16 results (sharded vs one device, jax vs torch)


# ---------------------------------------------------------------------------
# In-process: parsing, forwarding, errors
# ---------------------------------------------------------------------------


def _exit_code(argv, capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``cli.main(argv)`` that exits via SystemExit."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_help_names_every_subcommand(capsys):
    code, out, _ = _exit_code(["--help"], capsys)
    assert code == 0
    for name in ("demo", "bench", "decode", "shard", "variants"):
        assert f"    {name} " in out, out
    assert "Without a subcommand, runs demo" in out


def test_demo_help_lists_common_and_demo_options(capsys):
    code, out, _ = _exit_code(["demo", "--help"], capsys)
    assert code == 0
    for option in ("--devices N", "--dtype {float32,bfloat16}", "--out DIR", "--seq-len T",
                   "--batch B", "decode-step"):
        assert option in out, option


def test_bench_help_shows_common_and_experiment_options(capsys):
    code = cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--devices N" in out and "(default 1)" in out  # ours
    assert "options of attention_jax.benchmarks.attention" in out
    assert "--sections" in out and "--tiny" in out  # the script's own


@pytest.mark.parametrize(("argv", "expected"), [
    ([], ["demo"]),
    (["--seq-len", "16"], ["demo", "--seq-len", "16"]),
    (["--help"], ["--help"]),
    (["shard", "--quick"], ["shard", "--quick"]),
])
def test_demo_is_the_default_subcommand(argv, expected):
    assert cli._with_default_command(argv) == expected


@pytest.fixture
def fake_experiments(tmp_path, monkeypatch):
    """An experiments/ folder whose bench script writes its argv and sys.argv as JSON; the
    bench entry without a package module, so the script is what runs."""
    (tmp_path / "bench_attention.py").write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "def main(argv):\n"
        f"    Path({str(tmp_path / 'seen.json')!r}).write_text(\n"
        "        json.dumps({'argv': argv, 'sys_argv': sys.argv}))\n"
    )
    monkeypatch.setattr(cli, "EXPERIMENTS_DIR", tmp_path)
    monkeypatch.setitem(cli.EXPERIMENTS, "bench",
                        dataclasses.replace(cli.EXPERIMENTS["bench"], module=None))
    monkeypatch.delitem(sys.modules, "attention_jax_experiments.bench_attention", raising=False)
    yield tmp_path
    sys.modules.pop("attention_jax_experiments.bench_attention", None)


def test_unknown_options_and_common_ones_are_forwarded(fake_experiments, capsys):
    code = cli.main(["bench", "--quick", "--sections", "core", "memory", "--dtype", "bfloat16",
                     "--out", "some/dir", "--devices", "1"])
    seen = json.loads((fake_experiments / "seen.json").read_text())
    assert code == 0
    assert seen["argv"] == ["--quick", "--sections", "core", "memory",
                            "--dtype", "bfloat16", "--out", "some/dir"]
    assert seen["sys_argv"][0] == "attention-jax bench"
    assert sys.argv[0] != "attention-jax bench"  # put back


def test_without_out_the_scratch_folder_is_forwarded(fake_experiments):
    assert cli.main(["bench", "--tiny"]) == 0
    seen = json.loads((fake_experiments / "seen.json").read_text())
    assert seen["argv"] == ["--tiny", "--out", str(cli.default_out())]


def test_default_out_is_ignored_scratch_not_the_results():
    out = cli.default_out()
    assert out == ROOT / "experiments" / "out"  # a source checkout
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "x.json")], cwd=ROOT)
    assert ignored.returncode == 0, f"{out} is not ignored by git"


def test_default_out_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "EXPERIMENTS_DIR", tmp_path / "site-packages" / "experiments")
    monkeypatch.chdir(tmp_path)
    assert cli.default_out() == tmp_path / "attention-jax-out"


def test_benchmarks_load_from_the_package_first():
    assert cli.load_experiment("bench") is bench_attention
    assert cli.load_experiment("shard").__name__ == "attention_jax.benchmarks.head_parallel"
    # decode: the package module once it exists, else experiments/decode_bench.py
    assert cli.load_experiment("decode").__name__ in (
        "attention_jax.benchmarks.decode", "attention_jax_experiments.decode_bench")


def test_a_missing_package_module_falls_back_to_the_script(fake_experiments, monkeypatch):
    monkeypatch.setitem(cli.EXPERIMENTS, "bench", dataclasses.replace(
        cli.EXPERIMENTS["bench"], module="attention_jax.benchmarks.not_there"))
    assert cli.main(["bench"]) == 0
    assert (fake_experiments / "seen.json").is_file()


def test_missing_experiments_dir_says_source_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "EXPERIMENTS_DIR", tmp_path / "nowhere")
    for name in ("variants", "decode"):
        if name == "decode" and cli._module_exists(cli.EXPERIMENTS[name].module):
            continue  # the package has it: no checkout needed
        code = cli.main([name, "--quick"])
        err = capsys.readouterr().err
        assert code == 2
        assert "source checkout" in err and cli.EXPERIMENTS[name].script in err, err
        assert f"usage: attention-jax {name}" in err, err


@pytest.mark.parametrize(("argv", "message"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--devices", "0"], "--devices: must be >= 1; got 0"),
    (["shard", "--devices", "two"], "--devices: must be an integer >= 1; got 'two'"),
    (["demo", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["demo", "--quick"], "unrecognized arguments: --quick"),
    (["demo", "--batch", "0"], "--batch: must be >= 1; got 0"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, capsys):
    code, out, err = _exit_code(argv, capsys)
    assert code == 2
    assert message in err, err
    assert out == ""


# ---------------------------------------------------------------------------
# Subprocess: each subcommand end to end on tiny shapes
# ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """This session's environment without its device flag, with its compilation cache."""
    return child_env()


def _run(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    """``python -m attention_jax ARGS`` in ROOT, output piped, without the device flag."""
    proc = subprocess.run([sys.executable, "-m", "attention_jax", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _run_in_terminal(columns: int, *args: str) -> list[str]:
    """``python -m attention_jax ARGS`` on a pseudo-terminal ``columns`` wide: its screen lines."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**_env(), "COLUMNS": str(columns), "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-m", "attention_jax", *args], cwd=ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    assert proc.wait(timeout=TIMEOUT_S) == 0, text[-3000:]
    return visible_lines(text)


def test_devices_that_do_not_split_the_batch_are_a_usage_error():
    proc = _run("--devices", "3", code=2)  # batch 4 over data=3
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("usage: attention-jax demo"), proc.stderr
    assert "error: --batch 4 does not split over 3 devices" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_demo_default_subcommand_bfloat16_two_devices(tmp_path):
    proc = _run("--seq-len", "16", "--batch", "1", "--repeats", "1", "--devices", "2",
                "--dtype", "bfloat16", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["num_devices"] == 2 and saved["mesh"] == {"data": 1, "model": 2}
    assert saved["config"]["dtype"] == "bfloat16" and saved["config"]["seq_len"] == 16
    rows = saved["rows"]
    assert [(r["variant"], r["K"]) for r in rows] == [("MHA", 8), ("GQA", 2), ("MQA", 1)]
    for row in rows:
        # K * (H + V) bfloat16 values per token; H = V = 512 / 8
        assert row["kv_bytes_per_token"] == row["K"] * 128 * 2, row
        assert row["decode_step_ms"] > 0 and row["fwd_ms"] > 0, row
        assert row["sharded_err"] < ATOL_BF16, row
        assert row["fwd_collectives"] == "all-reduce@model:1", row
    for column in rows[0]:  # a pipe gets one table with every column
        assert column in proc.stdout
    assert "2 x cpu" in proc.stdout and "bfloat16" in proc.stdout
    trailing = [line for line in proc.stdout.splitlines() if line != line.rstrip()]
    assert not trailing, trailing


def test_bench_tiny_bfloat16(tmp_path):
    pytest.importorskip("torch")
    proc = _run("bench", "--tiny", "--sections", "core", "memory", "remat", "precision",
                "--reps", "1", "--no-plot", "--dtype", "bfloat16", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "bench_attention_cpu.json").read_text())
    assert saved["meta"]["dtype"] == "bfloat16" and saved["meta"]["tiny"]
    core = saved["core"]
    assert core["shape"]["dtype"] == "bfloat16" and core["shape"]["T"] == 64
    for case in ("fwd", "fwd+bwd", "fwd-causal", "fwd+bwd-causal"):
        results = core[case]["results"]
        assert set(results) == {"xla", "blockwise", "auto", "jax.nn", "torch"}
        assert all(len(r["all_ms"]) == 1 for r in results.values())  # --reps 1 forwarded
    rows = saved["memory"]["rows"]
    assert [r["T"] for r in rows] == [64, 128]
    assert all(r["xla"] > 0 and r["blockwise"] > 0 for r in rows)
    assert "contender" in proc.stdout and "blockwise MiB" in proc.stdout
    remat = {r["contender"]: r for r in saved["remat"]["rows"]}
    assert set(remat) == {"xla", "xla remat", "blockwise", "blockwise remat"}
    assert all(r["temp_bytes"] > 0 and r["median_ms"] > 0 for r in remat.values())
    precision = {r["contender"]: r for r in saved["precision"]["rows"]}
    assert precision["xla float32"]["max_err_vs_f32_xla"] == 0.0
    assert 0 < precision["auto bfloat16"]["max_err_vs_f32_xla"] < 0.1  # bf16 rounding, no more


def test_decode_tiny_bfloat16(tmp_path):
    proc = _run("decode", "--lengths", "16", "--heads", "8", "--head-dim", "8", "--repeats", "2",
                "--no-plot", "--dtype", "bfloat16", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "decode_bench_cpu.json").read_text())
    assert saved["dtype"] == "bfloat16"
    rows = [r for r in saved["rows"] if r["cache_dtype"] == "bfloat16"]
    # K * (H + V) * 2 bytes: MHA K=8, GQA K=8//4, MQA K=1; H = V = 8
    assert [(r["variant"], r["bytes_per_token"]) for r in rows] == [
        ("MHA", 256), ("GQA", 64), ("MQA", 32)]
    for r in rows:
        assert r["S"] == 16 and r["jax_ms"] > 0
        if "max_abs_diff_vs_torch" in r:
            assert r["max_abs_diff_vs_torch"] < ATOL_BF16, r
    assert len(saved["rows"]) == 6  # and the three int8 caches
    assert "Decode step" in proc.stdout and "bytes/token" in proc.stdout


def test_shard_quick_in_an_80_column_terminal_writes_scratch_only():
    """Tables fit 80 columns, no column lost; the run touches only the ignored scratch folder."""
    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                               "experiments/results", "experiments/out"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    before = status()
    lines = _run_in_terminal(80, "shard", "--quick", "--devices", "2", "--meshes", "1x2",
                             "--variants", "GQA", "--no-plot", "--dtype", "bfloat16")
    assert status() == before  # nothing committed or committable changed
    text = "\n".join(lines)
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    for column in ("err_fwd", "err_grad", "compile_s", "fwd_ms", "step_ms", "fwd collectives",
                   "fwd+bwd collectives", "host puts/call", "param KiB/dev"):
        assert column in text, column
    tables = sum(line.split()[:3] == ["layout", "mesh", "attn"] for line in lines)
    assert tables > 1  # stacked, each naming its rows
    assert sum("GQA 8/2" in line for line in lines) == 2 * tables
    assert "all-reduce@model:1" in text

    path = cli.default_out() / "head_parallel.json"
    assert f"wrote {path}" in text.replace("\n", "")
    saved = json.loads(path.read_text())
    assert saved["num_devices"] == 2 and saved["config"]["dtype"] == "bfloat16"
    sharded, baseline = saved["rows"]
    assert (sharded["layout"], sharded["mesh"], sharded["variant"]) == ("shard_map", "1x2", "GQA")
    D, N, H = 32, 8, 8  # --quick shapes
    assert sharded["q_kernel_bytes_total"] == D * N * H * 2  # bfloat16
    assert sharded["q_kernel_bytes_per_device"] == D * N * H * 2 // 2
    assert sharded["fwd_collectives"] == {"all-reduce@model": 1}
    assert sharded["err_fwd"] < ATOL_BF16
    assert baseline["layout"] == "device_put loop"
