"""Checkpoints of sharded parameters and optimizer state, with orbax-checkpoint.

A checkpoint is one numbered step directory under ``path`` (an orbax
``CheckpointManager``) holding one pytree::

    {"model": {param path: array},           # nnx.state(model, wrt) as a pure dict
     "optimizer": {"step": int32[],          # nnx.state(optimizer) as a pure dict
                   "opt_state": {...}}}      # e.g. SGD momentum, one leaf per Param

Each process writes the shards it holds. :func:`restore` reads every array
straight into the sharding the *given* model and optimizer have now (abstract
targets ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``), so a checkpoint
written on a ``(data, model) = (2, 4)`` mesh restores onto ``(1, 8)``: build the
new model, place it (e.g. :func:`attention_jax.sharding.head_parallel`), build
its optimizer, then restore into both.

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
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

MODEL, OPTIMIZER = "model", "optimizer"


def _manager(path: str | os.PathLike, *, create: bool) -> ocp.CheckpointManager:
    """A synchronous manager over ``path`` (keeps every step)."""
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(path)), options=options)


def _pure(model: nnx.Module, optimizer: nnx.Optimizer | None, wrt: Any) -> dict[str, Any]:
    """The saved tree: ``{"model": ..., "optimizer": ...}`` as plain nested dicts of arrays."""
    tree = {MODEL: nnx.to_pure_dict(nnx.state(model, wrt))}
    if optimizer is not None:
        tree[OPTIMIZER] = nnx.to_pure_dict(nnx.state(optimizer))
    return tree


def _abstract(x: Any) -> Any:
    """``x`` as a ``ShapeDtypeStruct`` carrying its current sharding (the restore target)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _uncommit_single_device(x: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A single-device leaf (e.g. the optimizer's fresh step counter, never placed on a mesh)
    comes back uncommitted, as it was: committed to device 0, it could not meet arrays
    sharded over the whole mesh in one jitted step."""
    if isinstance(target.sharding, jax.sharding.SingleDeviceSharding):
        return jnp.asarray(np.asarray(x))
    return x


def save(
    path: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int,
    wrt: Any = nnx.Param,
) -> None:
    """Writes ``model``'s ``wrt`` state and ``optimizer``'s state as checkpoint ``step``.

    Blocks until the step directory is complete (orbax writes it under a
    temporary name and renames it, so a process killed mid-save leaves no
    partial step behind for :func:`latest_step`).

    Args:
      path: the checkpoint root directory (created if missing).
      model: the model; its arrays may be sharded over any mesh.
      optimizer: an ``nnx.Optimizer`` of ``model``, or None to save the model only.
      step: the step number (the name of the step directory).
      wrt: which model state to save (an ``nnx`` filter).

    Raises:
      ValueError: if checkpoint ``step`` already exists under ``path``.
    """
    with _manager(path, create=True) as manager:
        if step in manager.all_steps():
            raise ValueError(f"checkpoint step {step} already exists under {path}")
        manager.save(step, args=ocp.args.StandardSave(_pure(model, optimizer, wrt)))
        manager.wait_until_finished()


def latest_step(path: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step under ``path``; None if there is none."""
    if not os.path.isdir(path):
        return None
    with _manager(path, create=False) as manager:
        return manager.latest_step()


def all_steps(path: str | os.PathLike) -> list[int]:
    """Every complete checkpoint step under ``path``, ascending."""
    if not os.path.isdir(path):
        return []
    with _manager(path, create=False) as manager:
        return sorted(manager.all_steps())


def restore(
    path: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int | None = None,
    wrt: Any = nnx.Param,
) -> int:
    """Loads checkpoint ``step`` (default: the latest) into ``model`` and ``optimizer`` in place.

    Every array is read into the shape, dtype and sharding that the matching
    leaf of ``model`` / ``optimizer`` has now, whatever mesh wrote it.

    Args:
      path: the checkpoint root directory.
      model: a model of the same structure as the saved one, already placed
        on the target mesh (its values are overwritten).
      optimizer: its ``nnx.Optimizer`` (same transformation as when saved),
        or None to restore the model only.
      step: which checkpoint; None for :func:`latest_step`.
      wrt: which model state to restore (the filter used by :func:`save`).

    Returns:
      The restored step number.

    Raises:
      FileNotFoundError: naming ``path`` and the steps found, when there is no
        checkpoint or no checkpoint ``step``.
    """
    steps = all_steps(path)
    if step is None and steps:
        step = steps[-1]
    if step is None or step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} under {path}; steps found: {steps}")
    target = jax.tree.map(_abstract, _pure(model, optimizer, wrt))
    with _manager(path, create=False) as manager:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    restored = jax.tree.map(_uncommit_single_device, restored, target)
    model_state = nnx.state(model, wrt)
    nnx.replace_by_pure_dict(model_state, restored[MODEL])
    nnx.update(model, model_state)
    if optimizer is not None:
        opt_state = nnx.state(optimizer)
        nnx.replace_by_pure_dict(opt_state, restored[OPTIMIZER])
        nnx.update(optimizer, opt_state)
    return step
