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

What is checked, and when, is the table of :mod:`attention_jax.checkpoint_integrity`
(every error names the step and the root ``path``). A failed :func:`restore`
leaves ``model`` and ``optimizer`` untouched. A step killed between the rename
and ``files.json`` (a few ms) restores and verifies its checksums; only the
naming of a damaged file is lost.

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

This module saves, lists and restores steps; the integrity side (step layout,
checksums, files manifest, verification, naming of damaged files) is in
:mod:`attention_jax.checkpoint_integrity`, its public names re-exported here.

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

import gc
import operator
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from attention_jax import checkpoint_integrity as _integrity
from attention_jax.checkpoint_integrity import (
    FORMAT,
    INTEGRITY_FILE,
    INTEGRITY_ITEM,
    MODEL,
    OPTIMIZER,
    STATE_ITEM,
    CorruptCheckpointError,
    _changed_files,
    _check_files,
    _check_fits,
    _check_orbax_metadata,
    _corrupt,
    _flat,
    _is_read_error,
    _key_name,
    _quiet_orbax_noise,
    _read_error,
    _read_json,
    _saved_specs,
    _step_dir,
    _write_files_manifest,
    checksum,
    model_config,
)

# Public here as before the split (the rest of checkpoint_integrity is private).
CONFIG_ATTRIBUTES, FILES_FILE = _integrity.CONFIG_ATTRIBUTES, _integrity.FILES_FILE
__all__ = ["CorruptCheckpointError", "all_steps", "checksum", "latest_step", "model_config",
           "restore", "save"]


# ---------------------------------------------------------------------------
# Trees
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


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


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
