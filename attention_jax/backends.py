"""The backend table: the names ``implementation=`` accepts and the functions behind them.

Built-in backends (``"xla"``, ``"blockwise"``, ``"cudnn"``, ``"decode"``, ``"auto"``)
are one table of ``"module:function"`` paths resolved on first use; users add their
own with :func:`register_implementation`. :mod:`attention_jax.ops` re-exports every
name here (``ops.get_implementation``, ``ops.default_implementation``, ...); the
attention math itself is in :mod:`attention_jax.ops`, the operand checks in
:mod:`attention_jax.checks`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax

Array = jax.Array

# The backends ``implementation=`` accepts: one table, filled here and nowhere
# else. Entries are ``"module:function"`` paths resolved on first use, so that
# what is available never depends on which module was imported first (the
# kernels import attention_jax.ops, which imports this module, so it cannot
# import them at load time).
_BUILTIN_IMPLEMENTATIONS: dict[str, str] = {
    "xla": "attention_jax.ops:attention_core",
    "blockwise": "attention_jax.kernels.blockwise:blockwise_core",
    "cudnn": "attention_jax.kernels.cudnn:cudnn_attention",
    "decode": "attention_jax.kernels.decode:decode_core",
    "auto": "attention_jax.kernels.dispatch:auto_attention",
}
# Backends added by users through :func:`register_implementation`.
_USER_IMPLEMENTATIONS: dict[str, Callable[..., Array]] = {}


def register_implementation(name: str, fn: Callable[..., Array]) -> None:
    """Make ``fn`` selectable as ``implementation=name``.

    ``fn`` has the signature of :func:`~attention_jax.ops.attention_core` (no
    dropout, no returned weights) and must equal it;
    :func:`~attention_jax.ops.dot_product_attention` falls back to the einsum path
    whenever dropout or weights are asked for. A built-in name cannot be replaced.

    Raises:
      ValueError: when ``name`` is a built-in backend.
    """
    if name in _BUILTIN_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation {name!r} is built in and cannot be replaced; pick another name"
        )
    _USER_IMPLEMENTATIONS[name] = fn


def available_implementations() -> tuple[str, ...]:
    """Names accepted by ``implementation=``: the built-in backends, then registered ones."""
    return (*_BUILTIN_IMPLEMENTATIONS, *_USER_IMPLEMENTATIONS)


def default_implementation() -> str:
    """What ``implementation=None`` resolves to: always ``"auto"``."""
    return "auto"


def check_implementation(implementation: str | None, *, name: str = "implementation") -> str:
    """``implementation`` resolved (None -> :func:`default_implementation`) and checked.

    Raises:
      ValueError: for a name that is neither built in nor registered (the one
        wording of this check in the package).
    """
    impl = default_implementation() if implementation is None else implementation
    if impl not in _BUILTIN_IMPLEMENTATIONS and impl not in _USER_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown {name} {implementation!r}; available: {available_implementations()}"
        )
    return impl


@functools.cache
def _load_builtin(path: str) -> Callable[..., Array]:
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


def get_implementation(implementation: str | None) -> Callable[..., Array]:
    """The function behind ``implementation``: the signature of
    :func:`~attention_jax.ops.attention_core`.

    >>> from attention_jax.ops import attention_core
    >>> get_implementation("xla") is attention_core
    True
    """
    impl = check_implementation(implementation)
    if impl in _USER_IMPLEMENTATIONS:
        return _USER_IMPLEMENTATIONS[impl]
    return _load_builtin(_BUILTIN_IMPLEMENTATIONS[impl])

