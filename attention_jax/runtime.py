"""Process-level setup that must happen before JAX starts its backend."""

from __future__ import annotations

import os
import warnings

_FLAG = "--xla_force_host_platform_device_count"


def backend_started() -> bool:
    """Whether JAX has already initialised a backend (flags set now are ignored)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not started
        return False


def use_fake_cpu_devices(count: int = 8) -> None:
    """Expose ``count`` CPU devices, so meshes can be tried without accelerators.

    Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=count`` unless the
    variable already sets a count. It only changes the CPU platform: on a GPU
    machine the GPUs stay the default devices. Call it before anything touches
    ``jax.devices()``; afterwards it can only warn.
    """
    if count < 1:
        raise ValueError(f"device count must be >= 1; got {count}")
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG in flags:
        return
    if backend_started():
        warnings.warn(
            f"JAX already started; cannot add {_FLAG}={count} any more", stacklevel=2
        )
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={count}".strip()


def without_device_count(flags: str) -> str:
    """``XLA_FLAGS`` minus its CPU device count, the other flags kept: for a child
    process that chooses its own count.

    >>> without_device_count("--xla_force_host_platform_device_count=8 --xla_cpu_ftz=true")
    '--xla_cpu_ftz=true'
    """
    return " ".join(f for f in flags.split() if f.split("=")[0] != _FLAG)
