"""Checkpoints of sharded parameters and optimizer state that cannot lie, with orbax-checkpoint.

A checkpoint is one numbered step directory under ``path`` (an orbax
``CheckpointManager``) holding two items, written together under a temporary
name (``<step>.orbax-checkpoint-tmp``) and renamed into place once complete::

    <step>/default/             {"model": {param path: array},     # nnx.state(model, wrt)
                                 "optimizer": {"step": int32[],    # nnx.state(optimizer)
                                               "opt_state": ...}}  # e.g. SGD momentum
    <step>/integrity/metadata   JSON: per array its shape, dtype and the sha256 of its
                                value's bytes; the model's config (:func:`model_config`)
    <step>/integrity/files.json JSON: size and sha256 of every file under default/,
                                written (atomically) just after the rename

Each process writes the shards it holds. :func:`restore` reads every array
straight into the sharding the *given* model and optimizer have now (abstract
targets ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``), so a checkpoint
written on a ``(data, model) = (2, 4)`` mesh restores onto ``(1, 8)``: build the
new model, place it (e.g. :func:`attention_jax.sharding.head_parallel`), build
its optimizer, then restore into both.

What is checked, and when (every error names the step and the root ``path``):

================================  ==========================  ==================================
case                              when                        result
================================  ==========================  ==================================
``step`` not an int >= 0 (float,  save, before writing        ValueError naming the step and the
bool, str, None, negative)                                    latest step
``step`` already present          save, before writing        ValueError; ``overwrite=True``
                                                              replaces it (and deletes later
                                                              steps)
``step`` older than the latest    save, before writing        ValueError; ``overwrite=True``
                                                              rolls back: deletes every step
                                                              >= ``step``, newest first, then
                                                              writes it
save killed half-way              all_steps, latest_step,     the half step is a temporary
                                  restore, save               directory: never listed; earlier
                                                              steps intact; the step can be
                                                              saved again
model / optimizer of another      restore, before any file    ValueError naming every array,
shape (e.g. ``num_kv_heads``)     but integrity/metadata      saved and expected shapes, and the
                                  is read                     config fields that differ
integrity/metadata missing or     restore, first              CorruptCheckpointError naming the
not JSON                                                      file (``verify=False`` reads such
                                                              a step unchecked)
a file of default/ missing or     restore, before any array   CorruptCheckpointError naming the
of another size (truncated)       is read (a ``stat`` each)   file (needs files.json)
``_METADATA``, array metadata     restore, before any array   CorruptCheckpointError naming the
not JSON                          is read                     file
a file unreadable by orbax        restore, while reading      CorruptCheckpointError naming the
(damaged b-tree node, ...)                                    array, the file and the reason;
                                                              orbax's asyncio noise swallowed
bytes of an array changed (the    restore, after reading,     CorruptCheckpointError:
reader cannot tell: zstd chunks   before the model changes    ``model.o_kernel checksum mismatch``
carry no checksum)                                            (changed since saved: FILE)
================================  ==========================  ==================================

A failed :func:`restore` leaves ``model`` and ``optimizer`` untouched. A step
killed between the rename and ``files.json`` (a few ms) restores and verifies
its checksums; only the naming of a damaged file is lost.

Cost: :func:`save` brings each array's *global* value to the host once
(``np.asarray``; across processes ``multihost_utils.process_allgather``) and
hashes it with sha256 (~1 GB/s), then re-reads the written files once to hash
them; :func:`restore` hashes each restored global value again. So a
checkpoint saved on one mesh verifies on another, at the price of one host
copy of the largest array at a time and about two extra passes over the
bytes: negligible at these sizes; for multi-GB models, ``verify=False`` skips
the restore side.

Only the state selected by ``wrt`` (default: ``nnx.Param``) is saved from the
model; RNG state (dropout keys and counts) is not, so dropout after a resume
draws other masks than the uninterrupted run.

>>> import tempfile, jax, optax
>>> from flax import nnx
>>> from attention_jax import MultiHeadAttention
>>> model = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
>>> opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
>>> d = tempfile.mkdtemp()
>>> save(d, model, opt, step=3)
>>> latest_step(d), restore(d, model, opt)
(3, 3)
>>> save(d, model, opt, step=2)
Traceback (most recent call last):
  ...
ValueError: checkpoint step 2 is older than the latest step 3 under ...
>>> save(d, model, opt, step=2, overwrite=True)  # a rollback: step 3 is deleted
>>> all_steps(d)
[2]
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import operator
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

MODEL, OPTIMIZER = "model", "optimizer"
STATE_ITEM, INTEGRITY_ITEM = "default", "integrity"  # the step's two orbax items
INTEGRITY_FILE = os.path.join(INTEGRITY_ITEM, "metadata")  # JsonSave's file name
FILES_FILE = os.path.join(INTEGRITY_ITEM, "files.json")  # written after the step is complete
FORMAT = "attention_jax.checkpoint/1"
# When the model has no dataclass ``config``, these public attributes stand for it.
CONFIG_ATTRIBUTES = ("in_features", "in_k_features", "in_v_features", "out_features",
                     "num_heads", "num_kv_heads", "head_dim", "v_head_dim", "use_bias",
                     "dtype", "param_dtype")


class CorruptCheckpointError(ValueError):
    """A checkpoint step whose files are missing, unreadable or do not match their checksums."""


# ---------------------------------------------------------------------------
# Trees, names, checksums, config
# ---------------------------------------------------------------------------


def _manager(path: str | os.PathLike, *, create: bool) -> ocp.CheckpointManager:
    """A synchronous manager over ``path`` (keeps every step) with the two items."""
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(path)),
                                 item_names=(STATE_ITEM, INTEGRITY_ITEM), options=options)


def _pure(model: nnx.Module, optimizer: nnx.Optimizer | None, wrt: Any) -> dict[str, Any]:
    """The saved tree: ``{"model": ..., "optimizer": ...}`` as plain nested dicts of arrays."""
    tree = {MODEL: nnx.to_pure_dict(nnx.state(model, wrt))}
    if optimizer is not None:
        tree[OPTIMIZER] = nnx.to_pure_dict(nnx.state(optimizer))
    return tree


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> dict[str, Any]:
    """``{"model.o_kernel": leaf, "optimizer.opt_state.0.trace.o_kernel": leaf, ...}``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _host(x: Any) -> np.ndarray:
    """The global value of ``x`` on this host (gathered across processes when sharded there)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def checksum(x: Any) -> str:
    """The sha256 (hex) of the C-order bytes of ``x``'s global value, whatever its sharding.

    >>> import numpy as np
    >>> checksum(np.zeros(2, np.float32)) == checksum(jnp.zeros(2, jnp.float32))
    True
    >>> checksum(np.zeros(2, np.float32)) == checksum(np.zeros(2, np.int32))  # same bytes
    True
    """
    return hashlib.sha256(np.ascontiguousarray(_host(x)).tobytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it exactly (numbers, strings, lists, dicts), else its repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    return repr(value)


def model_config(model: Any) -> dict[str, Any]:
    """``model``'s configuration as JSON-able values (non-JSON values as their ``repr``).

    ``model.config`` when it is a dataclass instance; otherwise the public attributes
    of :data:`CONFIG_ATTRIBUTES` that ``model`` has.

    >>> from flax import nnx
    >>> from attention_jax import MultiHeadAttention
    >>> cfg = model_config(MultiHeadAttention(8, 4, num_kv_heads=2, rngs=nnx.Rngs(0)))
    >>> cfg["num_heads"], cfg["num_kv_heads"]
    (4, 2)
    """
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        fields = {name: getattr(model, name) for name in CONFIG_ATTRIBUTES
                  if hasattr(model, name)}
    return {name: _jsonable(value) for name, value in fields.items()}


def _config_diff(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    if not saved:
        return []
    names = list(saved) + [n for n in now if n not in saved]
    missing = object()
    return [f"{n}: saved {saved.get(n, '(absent)')!r}, model {now.get(n, '(absent)')!r}"
            for n in names if saved.get(n, missing) != now.get(n, missing)]


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def _step_number(step: Any, path: str | os.PathLike, latest: int | None) -> int:
    """``step`` as an int >= 0 (ints, numpy / JAX integer scalars); ValueError otherwise."""
    if isinstance(step, bool | np.bool_):
        number = None
    else:
        try:
            number = operator.index(step)
        except TypeError:
            number = None
    if number is None or number < 0:
        raise ValueError(f"checkpoint step must be an int >= 0; got {step!r} "
                         f"({type(step).__name__}); latest step under {path}: {latest}")
    return number


_STEP_NAME = re.compile(r"0|[1-9][0-9]*")


def _step_dir(path: str | os.PathLike, step: int) -> str:
    return os.path.join(os.path.abspath(os.fspath(path)), str(step))


def latest_step(path: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step under ``path``; None if there is none."""
    steps = all_steps(path)
    return steps[-1] if steps else None


def all_steps(path: str | os.PathLike) -> list[int]:
    """Every complete checkpoint step under ``path``, ascending.

    A step is a directory named by an int >= 0 (``"12"``, not ``"012"``, ``"-1"`` or
    ``"1.5"``) that holds the arrays' item (``default/``). A save killed half-way
    leaves an orbax temporary directory (``<step>.orbax-checkpoint-tmp...``), never
    listed; nor is an empty or foreign directory. A complete step whose files were
    damaged afterwards is listed: :func:`restore` names what is wrong with it.
    """
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path)
                  if _STEP_NAME.fullmatch(name) and os.path.isdir(os.path.join(path, name,
                                                                               STATE_ITEM)))


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------


def save(
    path: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int,
    wrt: Any = nnx.Param,
    overwrite: bool = False,
) -> None:
    """Writes ``model``'s ``wrt`` state and ``optimizer``'s state as checkpoint ``step``.

    Blocks until the step directory is complete. Orbax writes it under a
    temporary name and renames it, so a process killed mid-save leaves no
    partial step behind for :func:`all_steps`, :func:`latest_step` or
    :func:`restore`, and earlier steps intact. With the arrays go their shapes,
    dtypes and sha256 checksums (of each global value: see the module docstring
    for the cost) and the model's config (:func:`model_config`).

    Args:
      path: the checkpoint root directory (created if missing).
      model: the model; its arrays may be sharded over any mesh.
      optimizer: an ``nnx.Optimizer`` of ``model``, or None to save the model only.
      step: the step number, an int >= 0 (the name of the step directory); newer
        than every step under ``path`` unless ``overwrite``.
      wrt: which model state to save (an ``nnx`` filter).
      overwrite: allow ``step`` to be present or older than the latest step: a
        rollback. Every step >= ``step`` (those of the abandoned run) is deleted,
        newest first, then ``step`` is written; if that write is killed, the
        latest step is the newest one older than ``step``.

    Raises:
      ValueError: naming ``step`` and the latest step, if ``step`` is not an int
        >= 0 (a float, bool, string or negative), or (without ``overwrite``) if
        it already exists or is older than the latest step.
    """
    with _manager(path, create=True) as manager:
        steps = all_steps(path)
        latest = steps[-1] if steps else None
        step = _step_number(step, path, latest)
        later = [s for s in steps if s >= step]
        if later and not overwrite:
            if step in steps:
                raise ValueError(
                    f"checkpoint step {step} already exists under {path} (latest step "
                    f"{latest}); pass overwrite=True to replace it and delete steps {later}")
            raise ValueError(
                f"checkpoint step {step} is older than the latest step {latest} under {path}; "
                f"pass overwrite=True to roll back (deletes steps {later}, then writes "
                f"step {step})")
        for s in reversed(later):  # newest first: a kill leaves a consistent prefix
            manager.delete(s)
        manager.reload()
        if os.path.exists(_step_dir(path, step)):  # a foreign directory with the step's name
            raise ValueError(f"cannot write checkpoint step {step} under {path}: "
                             f"{_step_dir(path, step)} exists and is not a checkpoint step")
        tree = _pure(model, optimizer, wrt)
        integrity = {
            "format": FORMAT,
            "step": step,
            "checksum": "sha256",
            "arrays": {name: {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype)),
                              "sha256": checksum(x)}
                       for name, x in _flat(tree).items()},
            "config": model_config(model),
        }
        written = manager.save(step, force=True, args=ocp.args.Composite(**{  # checked above
            STATE_ITEM: ocp.args.StandardSave(tree),
            INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}))
        manager.wait_until_finished()
    if not written:  # never silently
        raise RuntimeError(f"orbax did not write checkpoint step {step} under {path}")
    if jax.process_index() == 0:
        _write_files_manifest(path, step)


def _file_sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_files_manifest(path: str | os.PathLike, step: int) -> None:
    """``integrity/files.json``: size and sha256 of every file of the arrays' item.

    Written after orbax has renamed the step into place (it cannot be inside the
    atomic write: the files do not exist yet), through a temporary file and a
    rename. It only names the damaged file in restore's errors; a step killed
    before it was written restores (and verifies its checksums) without it.
    """
    step_dir = _step_dir(path, step)
    files = {}
    for folder, _, names in os.walk(os.path.join(step_dir, STATE_ITEM)):
        for name in sorted(names):
            file = os.path.join(folder, name)
            files[os.path.relpath(file, step_dir)] = {"size": os.path.getsize(file),
                                                      "sha256": _file_sha256(file)}
    tmp = os.path.join(step_dir, FILES_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "files": dict(sorted(files.items()))}, f, indent=1)
    os.replace(tmp, os.path.join(step_dir, FILES_FILE))


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


def _corrupt(path: str | os.PathLike, step: int, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"checkpoint step {step} under {path} is corrupt: {what}")


def _read_json(path: str | os.PathLike, step: int, relative: str) -> Any:
    """A JSON file of step ``step``; CorruptCheckpointError naming it if missing or not JSON."""
    file = os.path.join(_step_dir(path, step), relative)
    try:
        with open(file, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise _corrupt(path, step, f"{relative} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, step, f"{relative} is not valid JSON "
                                   f"({type(e).__name__}: {e})") from None


def _check_files(path: str | os.PathLike, step: int) -> dict[str, dict] | None:
    """Every file of the step's files manifest is there with its size (a ``stat`` each);
    returns the manifest (None if the step has none)."""
    if not os.path.exists(os.path.join(_step_dir(path, step), FILES_FILE)):
        return None
    files = _read_json(path, step, FILES_FILE).get("files", {})
    for relative, entry in files.items():
        file = os.path.join(_step_dir(path, step), relative)
        if not os.path.exists(file):
            raise _corrupt(path, step, f"{relative} is missing")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise _corrupt(path, step, f"{relative} is truncated or changed: {size} bytes, "
                                       f"{entry['size']} written")
    return files


def _changed_files(path: str | os.PathLike, step: int, files: dict[str, dict] | None) -> str:
    """`` (changed since saved: FILE, ...)`` from the files manifest; '' without one."""
    if not files:
        return ""
    changed = [relative for relative, entry in files.items()
               if _file_sha256(os.path.join(_step_dir(path, step), relative)) != entry["sha256"]]
    return f" (changed since saved: {', '.join(changed)})" if changed else ""


def _check_orbax_metadata(path: str | os.PathLike, step: int) -> None:
    """Parses the JSON files orbax reads before any array (``_METADATA``, array metadata)."""
    _read_json(path, step, os.path.join(STATE_ITEM, "_METADATA"))
    metadatas = os.path.join(_step_dir(path, step), STATE_ITEM, "array_metadatas")
    if os.path.isdir(metadatas):
        for name in sorted(os.listdir(metadatas)):
            _read_json(path, step, os.path.join(STATE_ITEM, "array_metadatas", name))


def _saved_specs(path: str | os.PathLike, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from orbax's own metadata (a step without integrity data)."""
    from etils import epath  # orbax's path library

    directory = epath.Path(_step_dir(path, step)) / STATE_ITEM
    try:
        meta = ocp.StandardCheckpointHandler().metadata(directory)
        return {name: (tuple(m.shape), str(np.dtype(m.dtype)))
                for name, m in _flat(dict(meta)).items()}
    except Exception as e:  # any unreadable metadata: a corrupt step
        raise _corrupt(path, step, f"{STATE_ITEM}/_METADATA cannot be read "
                                   f"({type(e).__name__}: {e})") from None


def _check_fits(path: str | os.PathLike, step: int, specs: dict[str, tuple[tuple, str | None]],
                target: dict[str, jax.ShapeDtypeStruct], config: dict | None,
                model: Any) -> None:
    """ValueError naming every array whose saved and expected shapes differ (no data read)."""
    problems = []
    for name, leaf in target.items():
        if name not in specs:
            problems.append(f"{name}: expected {tuple(leaf.shape)}, not in the checkpoint")
        elif tuple(specs[name][0]) != tuple(leaf.shape):
            problems.append(f"{name}: saved {tuple(specs[name][0])}, expected {tuple(leaf.shape)}")
    has_optimizer = any(n.startswith(OPTIMIZER + ".") for n in target)
    extra = [n for n in specs if n not in target]
    if not has_optimizer and any(n.startswith(OPTIMIZER + ".") for n in extra):
        problems.append("the checkpoint holds optimizer state: pass the optimizer to restore")
        extra = [n for n in extra if not n.startswith(OPTIMIZER + ".")]
    for name in extra:
        problems.append(f"{name}: saved {tuple(specs[name][0])}, not in the "
                        f"{'optimizer' if name.startswith(OPTIMIZER) else 'model'}")
    if problems:
        diff = _config_diff(config, model_config(model))
        raise ValueError(
            f"checkpoint step {step} under {path} does not fit this model / optimizer:\n  "
            + "\n  ".join(problems)
            + ("\nconfig fields that differ:\n  " + "\n  ".join(diff) if diff else ""))


def _is_orbax_noise(unraisable: Any) -> bool:
    """An exception orbax / tensorstore leave behind after a failed read: the event loop
    closed under pending reads, or a read coroutine collected with its error."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return True
    obj = getattr(unraisable, "object", None)
    code = getattr(obj, "cr_code", None)
    return code is not None and ("orbax" in code.co_filename or "tensorstore" in code.co_filename)


@contextlib.contextmanager
def _quiet_orbax_noise() -> Iterator[None]:
    """Swallows orbax's stray asyncio tracebacks (they go to ``sys.unraisablehook``) while
    the block runs; other unraisable exceptions pass to the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_orbax_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
_ARRAY_KEY = re.compile(r'Error reading "([^"/]+)/')
_VALUE_SIZE = re.compile(r"is not valid for value of size (\d+)")


_READ_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION",
                "local file", "Encountered error while reading", "checksum", "Zstd")


def _is_read_error(error: BaseException) -> bool:
    """Whether a failed orbax restore failed on the step's files (not, e.g., out of memory)."""
    e: BaseException | None = error
    for _ in range(5):
        if e is None:
            return False
        if isinstance(e, json.JSONDecodeError | UnicodeDecodeError | OSError) or any(
                marker in str(e) for marker in _READ_ERRORS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _read_error(path: str | os.PathLike, step: int, error: BaseException) -> str:
    """What a failed orbax read says: the array, the file under the step, the reason."""
    messages = []
    e: BaseException | None = error
    while e is not None and len(messages) < 5:
        messages.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(messages)
    root = _step_dir(path, step)
    files = [f for f in _LOCAL_FILE.findall(text) if os.path.isfile(f) or not os.path.exists(f)]
    keys = _ARRAY_KEY.findall(text)
    reason = messages[-1] if len(messages) > 1 else messages[0]
    for tail in (f'local file "{files[-1]}": ' if files else None, "database at local file "):
        if tail and tail in reason:
            reason = reason.split(tail, 1)[-1]
    reason = re.sub(r'^"[^"]*": ', "", reason)
    reason = reason.split(" [tensorstore_spec", 1)[0].split(" See full TensorStore", 1)[0]
    reason = " ".join(reason.split())[:300]
    if files:
        where = os.path.relpath(files[-1], root)
    else:  # tensorstore names the file of a b-tree node, not of a chunk: find it by its size
        size = _VALUE_SIZE.search(text)
        sized = [] if size is None else [
            os.path.relpath(os.path.join(folder, n), root)
            for folder, _, names in os.walk(os.path.join(root, STATE_ITEM)) for n in names
            if os.path.getsize(os.path.join(folder, n)) == int(size.group(1))]
        where = sized[0] if len(sized) == 1 else f"a file under {STATE_ITEM}/"
    array = f"cannot read {keys[0]} from " if keys else "cannot read "
    return f"{array}{where} ({type(error).__name__}: {reason})"


def restore(
    path: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int | None = None,
    wrt: Any = nnx.Param,
    verify: bool = True,
) -> int:
    """Loads checkpoint ``step`` (default: the latest) into ``model`` and ``optimizer`` in place.

    Every array is read into the shape and sharding that the matching leaf of
    ``model`` / ``optimizer`` has now, whatever mesh wrote it, in the saved
    dtype (so its checksum can be checked), then cast to the leaf's dtype.
    Shapes are checked against the step's integrity data before any array is
    read; the arrays' checksums after they are read, before ``model`` and
    ``optimizer`` change. A checkpoint saved with an optimizer needs one to
    restore into (orbax reads whole items).

    Args:
      path: the checkpoint root directory.
      model: a model of the same structure as the saved one, already placed
        on the target mesh (its values are overwritten).
      optimizer: its ``nnx.Optimizer`` (same transformation as when saved),
        or None to restore the model only.
      step: which checkpoint, an int >= 0; None for :func:`latest_step`.
      wrt: which model state to restore (the filter used by :func:`save`).
      verify: check the step's integrity data and checksums. False reads a
        step without integrity data (written before it existed), unchecked.

    Returns:
      The restored step number.

    Raises:
      FileNotFoundError: naming ``path`` and the steps found, when there is no
        checkpoint or no checkpoint ``step``.
      ValueError: naming ``step``, when it is not an int >= 0 (e.g. True); naming
        every array whose saved and expected shapes differ (and the config
        fields that differ), when ``model`` / ``optimizer`` do not fit the
        checkpoint.
      CorruptCheckpointError: (a ValueError) naming the step and the file or
        array, when a file is missing, unreadable, or an array's checksum does
        not match.
    """
    steps = all_steps(path)
    if step is not None:
        step = _step_number(step, path, steps[-1] if steps else None)
    elif steps:
        step = steps[-1]
    if step is None or step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} under {path}; steps found: {steps}")
    try:
        integrity = _read_json(path, step, INTEGRITY_FILE)
        if not isinstance(integrity, dict) or not isinstance(integrity.get("arrays"), dict):
            raise _corrupt(path, step, f"{INTEGRITY_FILE} has no 'arrays' table")
    except CorruptCheckpointError:
        if verify:
            raise
        integrity = None  # unchecked: shapes from orbax's metadata

    tree = _pure(model, optimizer, wrt)
    target = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
              for name, x in _flat(tree).items()}
    if integrity is not None:
        specs = {n: (tuple(a["shape"]), a["dtype"]) for n, a in integrity["arrays"].items()}
        config = integrity.get("config")
    else:
        specs, config = _saved_specs(path, step), None
    _check_fits(path, step, specs, target, config, model)
    files = _check_files(path, step) if verify else None
    _check_orbax_metadata(path, step)

    def read_as(x: Any, name: str) -> jax.ShapeDtypeStruct:  # saved dtype, target sharding
        dtype = specs[name][1] or x.dtype
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=target[name].sharding)

    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [".".join(_key_name(k) for k in p) for p, _ in paths]
    read_target = jax.tree_util.tree_unflatten(
        treedef, [read_as(x, n) for (_, x), n in zip(paths, names, strict=True)])

    failure = None
    with _quiet_orbax_noise():
        try:
            with _manager(path, create=False) as manager:
                restored = manager.restore(step, args=ocp.args.Composite(**{
                    STATE_ITEM: ocp.args.StandardRestore(read_target)}))[STATE_ITEM]
        except Exception as e:  # reported below, without orbax's chain
            failure, from_files = _read_error(path, step, e), _is_read_error(e)
        if failure is not None:  # the error is dropped: collect the reads it held, quietly
            time.sleep(0.05)  # callbacks of reads still in flight on tensorstore's threads
            gc.collect()
    if failure is not None:
        failure += _changed_files(path, step, files)
        if from_files:
            raise _corrupt(path, step, failure) from None
        raise RuntimeError(f"checkpoint step {step} under {path} could not be restored: "
                           f"{failure}") from None

    flat = _flat({k: v for k, v in restored.items() if k in tree})
    if verify:
        bad = [n for n in names if checksum(flat[n]) != integrity["arrays"][n]["sha256"]]
        if bad:
            raise _corrupt(path, step, f"{', '.join(bad)} checksum mismatch"
                                       + _changed_files(path, step, files))
    values = [_to_target(flat[n], target[n]) for n in names]
    restored = jax.tree_util.tree_unflatten(treedef, values)
    model_state = nnx.state(model, wrt)
    nnx.replace_by_pure_dict(model_state, restored[MODEL])
    nnx.update(model, model_state)
    if optimizer is not None:
        opt_state = nnx.state(optimizer)
        nnx.replace_by_pure_dict(opt_state, restored[OPTIMIZER])
        nnx.update(optimizer, opt_state)
    return step


def _to_target(x: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A restored leaf in the target's dtype. A single-device leaf (e.g. the optimizer's
    fresh step counter, never placed on a mesh) comes back uncommitted, as it was:
    committed to device 0, it could not meet arrays sharded over the whole mesh in one
    jitted step."""
    if x.dtype != target.dtype:
        x = x.astype(target.dtype)
    if isinstance(target.sharding, jax.sharding.SingleDeviceSharding):
        return jnp.asarray(np.asarray(x))
    return x
