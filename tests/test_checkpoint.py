"""Sharded training, checkpoints across meshes, and a killed-and-resumed run (8 fake CPU devices).

The model, data and SGD step are those of ``experiments/train_resume.py``
(loaded from its file). Expected values always come from a run that never went
through a checkpoint: the unsharded module, or the same mesh trained straight on.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from attention_jax import checkpoint
from attention_jax import sharding as sh
from tests.helpers import child_env

# float32 losses / params: a different mesh sums the heads' partial outputs and the
# batch's gradients in another order; a few SGD steps keep that at rounding level.
LOSS_ATOL, LOSS_RTOL = 1e-5, 1e-5
PARAM_ATOL, PARAM_RTOL = 2e-5, 1e-5

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "train_resume.py"
PARAMS = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "k_bias", "v_bias", "o_bias")
HEADS = [(8, 8), (8, 2), (8, 1)]  # (N, K): MHA, GQA, MQA


@functools.cache
def _script():
    spec = importlib.util.spec_from_file_location("train_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(model, optimizer, first: int, last: int, *, jit: bool = True) -> list[float]:
    """Losses of steps ``first..last`` (inclusive) of the script's data."""
    s = _script()
    step = s.train_step if jit else s.sgd_step
    return [float(step(model, optimizer, *s.batch(i))) for i in range(first, last + 1)]


def _params(model) -> dict[str, np.ndarray]:
    return {path[-1]: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_shardings(model, optimizer, mesh) -> None:
    """Every Param and every optimizer leaf of a Param (momentum) has the Param's sharding."""
    expected = {name.split(".")[-1]: s for name, s in sh.param_shardings(model, mesh).items()}
    assert set(expected) == set(PARAMS)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        got = var.get_value().sharding
        assert got == expected[path[-1]], (path, got, expected[path[-1]])
    opt_leaves = [(path, var.get_value()) for path, var in nnx.to_flat_state(nnx.state(optimizer))
                  if path[-1] in expected]
    assert sorted(p[-1] for p, _ in opt_leaves) == sorted(PARAMS)  # one momentum per Param
    for path, value in opt_leaves:
        assert value.sharding == expected[path[-1]], (path, value.sharding)


# ---------------------------------------------------------------------------
# 1. A sharded training step
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "jit"), [(h, True) for h in HEADS] + [((8, 2), False)],
                         ids=["mha-jit", "gqa-jit", "mqa-jit", "gqa-eager"])
def test_sharded_steps_keep_shardings_and_equal_unsharded(heads, jit):
    N, K = heads
    mesh = sh.make_mesh(2, 4)
    model, optimizer = _script().build(mesh, num_heads=N, num_kv_heads=K)
    ref_model, ref_optimizer = _script().build(None, num_heads=N, num_kv_heads=K)
    _assert_shardings(model, optimizer, mesh)
    # Eager grads on an Explicit mesh need it as the context mesh (a JAX rule).
    with jax.set_mesh(mesh):
        losses = _train(model, optimizer, 1, 3, jit=jit)
    _assert_shardings(model, optimizer, mesh)
    ref_losses = _train(ref_model, ref_optimizer, 1, 3, jit=jit)
    assert int(optimizer.step[...]) == 3
    chex.assert_trees_all_close(losses, ref_losses, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    chex.assert_trees_all_close(_params(model), _params(ref_model),
                                atol=PARAM_ATOL, rtol=PARAM_RTOL)


# ---------------------------------------------------------------------------
# 2. Save on (2, 4), restore onto (1, 8), continue
# ---------------------------------------------------------------------------


def test_restore_onto_another_mesh_continues_the_same_run(tmp_path):
    s = _script()
    mesh_24, mesh_18 = sh.make_mesh(2, 4), sh.make_mesh(1, 8)
    model, optimizer = s.build(mesh_24)
    straight = _train(model, optimizer, 1, 4)  # the uninterrupted run

    model, optimizer = s.build(mesh_24)
    first = _train(model, optimizer, 1, 2)
    checkpoint.save(tmp_path, model, optimizer, step=2)
    saved = _params(model)

    new_model, new_optimizer = s.build(mesh_18, seed=1)  # other initial values
    assert not np.array_equal(_params(new_model)["q_kernel"], saved["q_kernel"])
    assert checkpoint.restore(tmp_path, new_model, new_optimizer) == 2
    assert int(new_optimizer.step[...]) == 2
    chex.assert_trees_all_equal(_params(new_model), saved)
    _assert_shardings(new_model, new_optimizer, mesh_18)
    # The momentum came back too: without it step 3 would differ.
    rest = _train(new_model, new_optimizer, 3, 4)
    _assert_shardings(new_model, new_optimizer, mesh_18)
    chex.assert_trees_all_close(first + rest, straight, atol=LOSS_ATOL, rtol=LOSS_RTOL)


def test_restore_without_momentum_would_differ(tmp_path):
    """The resume check can fail: restoring the params only (fresh momentum) changes step 4."""
    s = _script()
    model, optimizer = s.build(sh.make_mesh(2, 4))
    straight = _train(model, optimizer, 1, 4)
    model, optimizer = s.build(sh.make_mesh(2, 4))
    _train(model, optimizer, 1, 2)
    checkpoint.save(tmp_path, model, step=2)  # model only
    new_model, new_optimizer = s.build(sh.make_mesh(1, 8))
    checkpoint.restore(tmp_path, new_model, step=2)
    rest = _train(new_model, new_optimizer, 3, 4)
    chex.assert_trees_all_close(rest[0], straight[2], atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert abs(rest[1] - straight[3]) > 100 * LOSS_ATOL


def test_steps_and_errors(tmp_path):
    s = _script()
    assert checkpoint.latest_step(tmp_path / "none") is None
    assert checkpoint.all_steps(tmp_path / "none") == []
    model, optimizer = s.build(None)
    with pytest.raises(FileNotFoundError, match="no checkpoint step None"):
        checkpoint.restore(tmp_path / "none", model, optimizer)
    checkpoint.save(tmp_path, model, optimizer, step=1)
    before = _params(model)
    _train(model, optimizer, 1, 1)
    checkpoint.save(tmp_path, model, optimizer, step=5)
    assert checkpoint.all_steps(tmp_path) == [1, 5]
    assert checkpoint.latest_step(tmp_path) == 5
    with pytest.raises(ValueError, match="step 5 already exists"):
        checkpoint.save(tmp_path, model, optimizer, step=5)
    with pytest.raises(FileNotFoundError, match=r"steps found: \[1, 5\]"):
        checkpoint.restore(tmp_path, model, optimizer, step=3)
    assert checkpoint.restore(tmp_path, model, optimizer, step=1) == 1
    chex.assert_trees_all_equal(_params(model), before)
    assert int(optimizer.step[...]) == 0


# ---------------------------------------------------------------------------
# 3. Kill a training run after a checkpoint, resume it on another mesh
# ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return child_env(keep_devices=True)  # the runs take 8 devices


def _records(lines) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_killed_run_resumes_on_another_mesh(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, str(SCRIPT), "--dir", str(ckpt), "--steps", "6", "--every", "2"]
    stderr = open(tmp_path / "first.err", "w")  # closed in finally
    first = subprocess.Popen([*args, "--mesh", "2,4", "--hang-after", "4"], env=_env(),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = []
    try:
        for line in first.stdout:  # until checkpoint 4 is on disk, or the run dies
            lines.append(line)
            if line.strip() == json.dumps({"checkpoint": 4}):
                break
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        stderr.close()
    before = _records(lines)
    assert before[-1] == {"checkpoint": 4}, (tmp_path / "first.err").read_text()[-3000:]
    assert checkpoint.latest_step(ckpt) == 4

    second = subprocess.run([*args, "--mesh", "1,8"], env=_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _records(second.stdout.splitlines())
    assert after[0] == {"resumed": 4, "mesh": [1, 8]}
    assert [r for r in after if "checkpoint" in r] == [{"checkpoint": 6}]

    losses = {r["step"]: r["loss"] for r in before + after if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    model, optimizer = _script().build(sh.make_mesh(2, 4))  # the uninterrupted run
    straight = _train(model, optimizer, 1, 6)
    chex.assert_trees_all_close([losses[i] for i in range(1, 7)], straight,
                                atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert jax.device_count() == 8
