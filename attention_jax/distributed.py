"""Multi-process start-up: a thin layer over ``jax.distributed.initialize``.

One process per host (per GPU node), each seeing its local devices; after
:func:`initialize`, ``jax.devices()`` lists every device of every process and a
mesh from :func:`attention_jax.sharding.make_mesh` spans them all.

* Under a launcher JAX detects (SLURM, Open MPI, Kubernetes / GKE, Cloud TPU),
  call ``initialize()`` with no arguments.
* Otherwise pass the coordinator's ``host:port`` (process 0's address, reachable
  by every process), the process count and this process's id.
* On CPU (tests, laptops) pass ``cpu_devices=n`` to give each process ``n`` CPU
  devices and let it pick CPU collectives (gloo), so the sharded program's
  all-reduces cross process boundaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_devices: int | None = None,
    cpu_collectives: str | None = None,
    coordinator_bind_address: str | None = None,
    initialization_timeout: int = 300,
) -> ProcessInfo:
    """Joins this process to the cluster; call once, before any other JAX work.

    Args:
      coordinator_address: ``"host:port"`` of process 0; ``None`` lets JAX detect
        the launcher's settings (SLURM and others).
      num_processes: how many processes take part; with an explicit address.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to some local accelerators.
      cpu_devices: give this process that many CPU devices (sets
        ``jax_num_cpu_devices``; must run before JAX starts its backend).
      cpu_collectives: CPU collectives implementation; default ``"gloo"`` when
        ``cpu_devices`` is given, otherwise JAX's default.
      coordinator_bind_address: the address process 0's coordinator service
        listens on (e.g. ``"127.0.0.1:port"`` to stay on loopback).
      initialization_timeout: seconds to wait for every process to join.

    Returns:
      :class:`ProcessInfo` for this process.

    Raises:
      ValueError: an explicit address without a valid process count and id.
    """
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError(
                "an explicit coordinator_address needs num_processes and process_id; got "
                f"num_processes={num_processes}, process_id={process_id}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id must be in [0, {num_processes}); got {process_id}"
            )
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise ValueError(f"cpu_devices must be >= 1; got {cpu_devices}")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
        cpu_collectives = "gloo" if cpu_collectives is None else cpu_collectives
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        coordinator_bind_address=coordinator_bind_address,
        initialization_timeout=initialization_timeout,
    )
    return process_info()


def process_info() -> ProcessInfo:
    """This process's index and the local and global device counts."""
    return ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
    )


def gather_to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, on every process.

    Uses ``multihost_utils.process_allgather``; in a single process this is
    ``np.asarray``.
    """
    if jax.process_count() == 1 or not isinstance(x, jax.Array):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shutdown() -> None:
    """Leaves the cluster (``jax.distributed.shutdown``)."""
    jax.distributed.shutdown()
