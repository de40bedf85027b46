"""The integrity side of :mod:`attention_jax.checkpoint` (use that module: it re-exports
:class:`CorruptCheckpointError`, :func:`checksum` and :func:`model_config`).

What a checkpoint step holds besides its arrays, and how it is checked: the
step's layout (item and file names), :class:`CorruptCheckpointError`, the
arrays' checksums (:func:`checksum`), the model config saved with the arrays
(:func:`model_config`) and its comparison, the files manifest
(``integrity/files.json``: size and sha256 of every file) and its verification,
the checks of orbax's own metadata before any array is read, and the naming of
the damaged file or array when orbax fails to read one. Saving, listing and
restoring steps stay in :mod:`attention_jax.checkpoint`.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
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

    __module__ = "attention_jax.checkpoint"  # where it is public


# ---------------------------------------------------------------------------
# Trees, names, config
# ---------------------------------------------------------------------------


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> dict[str, Any]:
    """``{"model.o_kernel": leaf, "optimizer.opt_state.0.trace.o_kernel": leaf, ...}``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


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


def _step_dir(path: str | os.PathLike, step: int) -> str:
    return os.path.join(os.path.abspath(os.fspath(path)), str(step))


# ---------------------------------------------------------------------------
# Checksums of arrays
# ---------------------------------------------------------------------------


def _host(x: Any) -> np.ndarray:
    """The global value of ``x`` on this host (gathered across processes when sharded there)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def checksum(x: Any) -> str:
    """The sha256 (hex) of the C-order bytes of ``x``'s global value, whatever its sharding.

    >>> import jax.numpy as jnp, numpy as np
    >>> checksum(np.zeros(2, np.float32)) == checksum(jnp.zeros(2, jnp.float32))
    True
    >>> checksum(np.zeros(2, np.float32)) == checksum(np.zeros(2, np.int32))  # same bytes
    True
    """
    return hashlib.sha256(np.ascontiguousarray(_host(x)).tobytes()).hexdigest()


# ---------------------------------------------------------------------------
# Integrity metadata: the files manifest
# ---------------------------------------------------------------------------


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
# Verification: before, while and after orbax reads the arrays
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
