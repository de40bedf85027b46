"""Checkpoints that cannot lie: checksums, step numbers, killed saves, shape and file errors.

Every case writes real files with :func:`checkpoint.save`, then damages them as a
disk, a user or a kill would (flip 16 bytes, truncate, delete, SIGKILL mid-save).
Expected values come from the model that was saved (or numpy), never from the
restore under test. Tiny modules; no jit. Restored values must equal the saved
ones exactly (a checkpoint is bytes, not arithmetic).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention, checkpoint
from attention_jax import sharding as sh
from tests.helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (N, K)
D, H = 32, 8  # width and head dim: q_kernel is 4 KB, stored in a data file (not inline)


def _build(K: int = 2, *, N: int = 4, seed: int = 0, **kwargs):
    model = MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(seed), **kwargs)
    return model, nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)


def _values(model, optimizer=None) -> dict[str, np.ndarray]:
    """Every saved array as numpy, by the name a checkpoint error uses for it:
    ``model.<param>``, ``optimizer.<path>`` (e.g. ``optimizer.opt_state.0.trace.q_kernel``)."""
    tree = {"model": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    if optimizer is not None:
        tree["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
    return {".".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The file holding the arrays' chunks (larger arrays are not inlined in b-tree nodes)."""
    chunks = [p for p in _files(step_dir / "default")
              if p.parent.name == "d" and p.parent.parent.name.startswith("ocdbt.process")]
    return max(chunks, key=lambda p: p.stat().st_size)


def _btree_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The merged b-tree node file of the step (``default/d/...``)."""
    (node,) = (p for p in _files(step_dir / "default") if p.parent == step_dir / "default" / "d")
    return node


def _flip(file: pathlib.Path, n: int = 16) -> None:
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


class _Unraisables:
    """Records unraisable exceptions (orbax's asyncio leftovers) that reach the default hook."""

    def __enter__(self):
        self.seen, self._previous = [], sys.unraisablehook
        sys.unraisablehook = self.seen.append
        return self

    def __exit__(self, *exc):
        time.sleep(0.1)
        gc.collect()
        sys.unraisablehook = self._previous


# ---------------------------------------------------------------------------
# 1. Checksums: recorded with the step, mesh independent, verified on restore
# ---------------------------------------------------------------------------


def test_checksum_is_sha256_of_the_global_value_on_any_mesh():
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    expected = hashlib.sha256(x.tobytes()).hexdigest()
    for shape in ((2, 4), (1, 8)):
        mesh = sh.make_mesh(*shape)
        spec = jax.sharding.PartitionSpec(*mesh.axis_names)
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        assert len(sharded.addressable_shards) == 8
        assert checkpoint.checksum(sharded) == expected
    transposed = np.ascontiguousarray(x.T).tobytes()  # C order of the value, not the memory
    assert checkpoint.checksum(x.T) == hashlib.sha256(transposed).hexdigest()


def test_integrity_item_records_every_array_and_the_config(tmp_path):
    model, optimizer = _build(2)
    checkpoint.save(tmp_path, model, optimizer, step=1)
    record = json.loads((tmp_path / "1" / "integrity" / "metadata").read_text())
    saved = _values(model, optimizer)
    assert set(record["arrays"]) == set(saved)
    for name, value in saved.items():
        entry = record["arrays"][name]
        assert entry["shape"] == list(value.shape) and entry["dtype"] == str(value.dtype)
        assert entry["sha256"] == hashlib.sha256(value.tobytes()).hexdigest()
    assert {"optimizer.step", "optimizer.opt_state.0.trace.o_kernel"} <= set(saved)
    assert record["config"]["num_heads"] == 4 and record["config"]["num_kv_heads"] == 2
    assert record["step"] == 1


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_flipped_bytes_in_a_data_file_are_a_checksum_mismatch(tmp_path, capfd, heads):
    N, K = heads
    model, optimizer = _build(K, N=N)
    checkpoint.save(tmp_path, model, optimizer, step=1)
    saved = _values(model, optimizer)
    data = _largest_data_file(tmp_path / "1")
    _flip(data)

    # Which arrays the flip damaged, seen without checksums (the reader itself cannot tell).
    blind_model, blind_opt = _build(K, N=N, seed=1)
    checkpoint.restore(tmp_path, blind_model, blind_opt, verify=False)
    blind = _values(blind_model, blind_opt)
    damaged = {k for k in saved if not np.array_equal(saved[k], blind[k])}
    assert damaged, "the flip changed no array: the test would prove nothing"

    new_model, new_opt = _build(K, N=N, seed=2)
    before = _values(new_model, new_opt)
    capfd.readouterr()
    with pytest.raises(checkpoint.CorruptCheckpointError) as info:
        checkpoint.restore(tmp_path, new_model, new_opt)
    message = str(info.value)
    prefix = f"checkpoint step 1 under {tmp_path} is corrupt: "
    suffix = f" checksum mismatch (changed since saved: {data.relative_to(tmp_path / '1')})"
    assert message.startswith(prefix) and message.endswith(suffix), message
    assert set(message[len(prefix):-len(suffix)].split(", ")) == damaged
    _assert_same(_values(new_model, new_opt), before)  # a failed restore changes nothing
    assert "Traceback" not in capfd.readouterr().err


def test_checksums_verify_after_a_restore_in_another_dtype(tmp_path):
    model, optimizer = _build(2)
    checkpoint.save(tmp_path, model, optimizer, step=1)
    bf16, bf16_opt = _build(2, seed=1, param_dtype=jnp.bfloat16)
    checkpoint.restore(tmp_path, bf16, bf16_opt)
    assert bf16.q_kernel.get_value().dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16.q_kernel.get_value()),
                                  np.asarray(model.q_kernel.get_value()).astype(jnp.bfloat16))


# ---------------------------------------------------------------------------
# 2. Step numbers: nothing written silently, nothing written where it cannot be found
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None, np.float32(2.0)],
                         ids=["negative", "float", "bool", "str", "none", "np-float"])
def test_a_step_that_is_not_an_int_ge_0_is_refused(tmp_path, bad):
    model, _ = _build(2)
    checkpoint.save(tmp_path, model, step=2)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint step must be an int >= 0; got {bad!r}")) as info:
        checkpoint.save(tmp_path, model, step=bad)
    assert f"latest step under {tmp_path}: 2" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == listing  # nothing written
    if bad is not None:  # None is restore's "latest"
        with pytest.raises(ValueError, match="checkpoint step must be an int >= 0"):
            checkpoint.restore(tmp_path, model, step=bad)  # True is not step 1


def test_older_or_existing_steps_are_refused_unless_overwrite(tmp_path):
    model, _ = _build(2)
    checkpoint.save(tmp_path, model, step=np.int64(2))  # numpy integers are steps
    checkpoint.save(tmp_path, model, step=4)
    with pytest.raises(ValueError, match=r"step 3 is older than the latest step 4 .*"
                                         r"overwrite=True .*deletes steps \[4\]"):
        checkpoint.save(tmp_path, model, step=3)
    with pytest.raises(ValueError, match=r"step 4 already exists .*latest step 4"):
        checkpoint.save(tmp_path, model, step=4)
    assert checkpoint.all_steps(tmp_path) == [2, 4]

    newer, _ = _build(2, seed=5)
    checkpoint.save(tmp_path, newer, step=4, overwrite=True)  # replace the latest
    assert checkpoint.all_steps(tmp_path) == [2, 4]
    out, _ = _build(2, seed=9)
    checkpoint.restore(tmp_path, out, step=4)
    _assert_same(_values(out), _values(newer))

    checkpoint.save(tmp_path, model, step=3, overwrite=True)  # a rollback drops step 4
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    assert checkpoint.latest_step(tmp_path) == 3
    checkpoint.restore(tmp_path, out)
    _assert_same(_values(out), _values(model))


def test_only_complete_steps_are_listed(tmp_path, capfd):
    model, _ = _build(2)
    checkpoint.save(tmp_path, model, step=1)
    for stray in ("7", "-1", "1.5", "True", "012", "9.orbax-checkpoint-tmp-123", "notes"):
        (tmp_path / stray).mkdir()  # what the old save wrote for bad steps, and foreign dirs
    assert checkpoint.all_steps(tmp_path) == [1]
    assert checkpoint.latest_step(tmp_path) == 1
    checkpoint.save(tmp_path, model, step=3)  # orbax counts "7"; the check is ours
    assert checkpoint.all_steps(tmp_path) == [1, 3]
    with pytest.raises(ValueError, match=r"cannot write checkpoint step 7 .*not a checkpoint"):
        checkpoint.save(tmp_path, model, step=7)
    assert "Traceback" not in capfd.readouterr().err


# ---------------------------------------------------------------------------
# 3. A save killed half-way (SIGKILL while orbax writes the step)
# ---------------------------------------------------------------------------

_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from flax import nnx
    from attention_jax import checkpoint

    class Big(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.random.default_rng(0).standard_normal((4, 1 << 20),
                                                                        dtype=np.float32))

    model = Big()  # 16 MiB: a save takes long enough to be caught half-way
    for step in range(1, 100):
        model.w.set_value(model.w.get_value() + 1)  # step s saves w0 + s
        print("saving", step, flush=True)
        checkpoint.save(sys.argv[1], model, step=step)
""")


class _Big(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(np.zeros((4, 1 << 20), np.float32))


def _kill_a_save(ckpt):
    """Runs the saver and SIGKILLs it while orbax writes a step: ``(seen tmp files, the
    half-written step directories left)``."""
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(ckpt)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # steps 1 and 2 are complete once step 3 starts
            if line.strip() == "saving 3":
                break
        deadline = time.monotonic() + 60
        tmp = []  # kill as soon as orbax writes a step's files (a 16 MiB save lasts ~0.1-1 s)
        while not tmp and time.monotonic() < deadline and proc.poll() is None:
            tmp = list(ckpt.glob("*.orbax-checkpoint-tmp*/default/*"))
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert tmp, f"no save in progress was seen under {ckpt}: {os.listdir(ckpt)}"
    return tmp, [n for n in os.listdir(ckpt) if ".orbax-checkpoint-tmp" in n]


def test_a_save_killed_half_way_leaves_no_half_step_and_earlier_steps_intact(tmp_path):
    # The kill races the rename that completes a step: a step seen half-written may be
    # complete when the signal lands. Try again (a new run) a few times.
    for attempt in range(5):
        ckpt = tmp_path / f"ckpt{attempt}"
        tmp, half = _kill_a_save(ckpt)
        if half:
            break
    assert half, "the save finished before the kill in 5 runs: nothing half-written to test"
    killed = int(half[0].split(".")[0])
    assert killed >= 3

    done = list(range(1, killed))
    assert checkpoint.all_steps(ckpt) == done
    assert checkpoint.latest_step(ckpt) == killed - 1
    with pytest.raises(FileNotFoundError, match=f"no checkpoint step {killed} "):
        checkpoint.restore(ckpt, _Big(), step=killed)
    w = [np.random.default_rng(0).standard_normal((4, 1 << 20), dtype=np.float32)]
    for _ in range(killed):
        w.append(w[-1] + np.float32(1))  # as the saver did: w[s] is saved as step s
    for step in (1, killed - 1):  # earlier steps restore and verify
        model = _Big()
        assert checkpoint.restore(ckpt, model, step=step) == step
        np.testing.assert_array_equal(np.asarray(model.w.get_value()), w[step])
    # the killed step can be written again, over the leftover temporary directory
    model.w.set_value(model.w.get_value() + 100)
    checkpoint.save(ckpt, model, step=killed)
    assert checkpoint.all_steps(ckpt) == [*done, killed]
    again = _Big()
    checkpoint.restore(ckpt, again)
    np.testing.assert_array_equal(np.asarray(again.w.get_value()), np.asarray(model.w.get_value()))


# ---------------------------------------------------------------------------
# 4. A model of another shape: every array named, config diff, before reading data
# ---------------------------------------------------------------------------

_SHAPE_CASES = {"mha->gqa": (4, 2), "gqa->mqa": (2, 1), "mqa->mha": (1, 4)}


@pytest.mark.parametrize("kv", _SHAPE_CASES.values(), ids=_SHAPE_CASES.keys())
def test_restore_into_another_shape_names_each_array_before_reading_data(tmp_path, capfd, kv):
    saved_k, new_k = kv
    model, optimizer = _build(saved_k)
    checkpoint.save(tmp_path, model, optimizer, step=1)
    for data in (tmp_path / "1" / "default").glob("**/d"):  # any array read would now fail
        shutil.rmtree(data)
    other, other_opt = _build(new_k, seed=1)
    before = _values(other, other_opt)
    capfd.readouterr()
    with pytest.raises(ValueError) as info:
        checkpoint.restore(tmp_path, other, other_opt)
    message = str(info.value)
    assert not isinstance(info.value, checkpoint.CorruptCheckpointError), message
    assert message.startswith(f"checkpoint step 1 under {tmp_path} does not fit")
    for name in ("k_kernel", "v_kernel"):
        saved, expected = (D, saved_k, H), (D, new_k, H)
        assert f"model.{name}: saved {saved}, expected {expected}" in message
        assert f"optimizer.opt_state.0.trace.{name}: saved {saved}, expected {expected}" in message
    for name in ("k_bias", "v_bias"):
        assert f"model.{name}: saved {(saved_k, H)}, expected {(new_k, H)}" in message
    assert "q_kernel" not in message and "o_kernel" not in message
    differ = message.split("\nconfig fields that differ:\n", 1)[1].split("\n")
    assert f"  num_kv_heads: saved {saved_k}, model {new_k}" in differ
    assert not any(line.startswith(("  num_heads:", "  head_dim:")) for line in differ)
    _assert_same(_values(other, other_opt), before)
    assert "Traceback" not in capfd.readouterr().err


@dataclasses.dataclass(frozen=True)
class _TinyConfig:
    width: int
    heads: int
    dtype: object = jnp.float32  # not JSON: stored as its repr


class _Tiny(nnx.Module):
    def __init__(self, config: _TinyConfig):
        self.config = config
        self.w = nnx.Param(jnp.ones((config.width, config.heads), config.dtype))


def test_a_dataclass_config_is_stored_and_diffed(tmp_path):
    checkpoint.save(tmp_path, _Tiny(_TinyConfig(4, 2)), step=1)
    record = json.loads((tmp_path / "1" / "integrity" / "metadata").read_text())
    assert record["config"] == {"width": 4, "heads": 2, "dtype": repr(jnp.float32)}
    with pytest.raises(ValueError, match=r"model\.w: saved \(4, 2\), expected \(4, 3\)\n"
                                         r"config fields that differ:\n  heads: saved 2, model 3$"):
        checkpoint.restore(tmp_path, _Tiny(_TinyConfig(4, 3)))


def test_a_checkpoint_with_optimizer_state_needs_the_optimizer(tmp_path):
    model, optimizer = _build(2)
    checkpoint.save(tmp_path, model, optimizer, step=1)
    with pytest.raises(ValueError, match="holds optimizer state: pass the optimizer"):
        checkpoint.restore(tmp_path, _build(2)[0])
    checkpoint.save(tmp_path, model, step=2)  # the model alone
    with pytest.raises(ValueError, match=r"optimizer\.step: expected \(\), not in the checkpoint"):
        checkpoint.restore(tmp_path, *_build(2))


# ---------------------------------------------------------------------------
# 5. Corrupt or truncated files: one clear error naming step and file, no stray tracebacks
# ---------------------------------------------------------------------------


def _truncate(file: pathlib.Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def _same_size_garbage(file: pathlib.Path) -> None:
    """Not JSON, and the same size (the files manifest sees no change of size)."""
    size = file.stat().st_size
    file.write_bytes((bytes(range(128, 256)) * (size // 128 + 1))[:size])


def _without_manifest(damage):
    def f(file: pathlib.Path) -> None:
        damage(file)
        (_step_of(file) / "integrity" / "files.json").unlink()
    return f


def _step_of(file: pathlib.Path) -> pathlib.Path:
    while not file.name.isdigit():
        file = file.parent
    return file


_METADATA = lambda d: d / "default" / "_METADATA"  # noqa: E731
_DAMAGE = {
    # name: (file to damage (from the step dir), damage, message after "corrupt: ")
    "data-truncated": (_largest_data_file, _truncate,
                       r"^{file} is truncated or changed: \d+ bytes, \d+ written$"),
    "data-deleted": (_largest_data_file, os.remove, r"^{file} is missing$"),
    "data-truncated-no-manifest": (_largest_data_file, _without_manifest(_truncate),
                                   r"^cannot read model\.\w+ from {file} \(Exception: "
                                   r".*not valid for value of size"),
    # (the node's bytes vary with orbax's uuid: a CRC-32C failure or another decoding error)
    "btree-flipped": (_btree_file, _flip, r"^cannot read \S+ from {file} \(ValueError: "
                                          r"Error decoding b-tree node: .+\) "
                                          r"\(changed since saved: {file}\)$"),
    "metadata-truncated": (_METADATA, _truncate, r"^{file} is truncated or changed"),
    "metadata-garbage": (_METADATA, _same_size_garbage,
                         r"^{file} is not valid JSON \(UnicodeDecodeError"),
    "metadata-truncated-no-manifest": (_METADATA, _without_manifest(_truncate),
                                       r"^{file} is not valid JSON \(JSONDecodeError"),
    "array-metadata-garbage": (lambda d: d / "default" / "array_metadatas" / "process_0",
                               _same_size_garbage, r"^{file} is not valid JSON"),
    "sidecar-missing": (lambda d: d / "integrity" / "metadata", os.remove, r"^{file} is missing$"),
    "sidecar-truncated": (lambda d: d / "integrity" / "metadata", _truncate,
                          r"^{file} is not valid JSON \(JSONDecodeError"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One saved checkpoint (steps 1 and 2) and the values saved at step 2."""
    root = tmp_path_factory.mktemp("pristine")
    model, optimizer = _build(2)
    checkpoint.save(root, model, optimizer, step=1)
    model, optimizer = _build(2, seed=3)
    checkpoint.save(root, model, optimizer, step=2)
    return root, _values(model, optimizer)


@pytest.mark.parametrize("case", _DAMAGE.keys())
def test_a_damaged_file_is_one_clear_error_naming_step_and_file(tmp_path, capfd, pristine, case):
    root, saved = pristine
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    choose, damage, expected = _DAMAGE[case]
    step_dir = tmp_path / "2"
    file = choose(step_dir)
    damage(file)
    model, optimizer = _build(2, seed=1)
    before = _values(model, optimizer)
    capfd.readouterr()
    with _Unraisables() as leftovers, pytest.raises(checkpoint.CorruptCheckpointError) as info:
        checkpoint.restore(tmp_path, model, optimizer)
    prefix = f"checkpoint step 2 under {tmp_path} is corrupt: "
    assert str(info.value).startswith(prefix), str(info.value)
    pattern = expected.replace("{file}", re.escape(str(file.relative_to(step_dir))))
    assert re.search(pattern, str(info.value)[len(prefix):]), str(info.value)
    assert "\n" not in str(info.value) and info.value.__cause__ is None
    assert leftovers.seen == []
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]
    _assert_same(_values(model, optimizer), before)
    # the undamaged step still restores and verifies
    assert checkpoint.restore(tmp_path, model, optimizer, step=1) == 1


def test_a_step_without_integrity_data_restores_with_verify_false(tmp_path, pristine):
    """A step written before checksums existed (one orbax item, no sidecar)."""
    model, optimizer = _build(2, seed=4)
    tree = {"model": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        manager.save(7, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    out, out_opt = _build(2, seed=1)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="integrity/metadata is missing"):
        checkpoint.restore(tmp_path, out, out_opt)
    assert checkpoint.restore(tmp_path, out, out_opt, verify=False) == 7
    _assert_same(_values(out, out_opt), _values(model, optimizer))
    small, small_opt = _build(1)
    with pytest.raises(ValueError, match=r"model\.k_kernel: saved \(32, 2, 8\), expected \(32, 1"):
        checkpoint.restore(tmp_path, small, small_opt, verify=False)
