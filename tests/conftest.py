"""Test setup: 8 fake CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backend, hence at import
time of this conftest (pytest imports it before collecting any test module).
"""

import os
import pathlib

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import io  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def visible_lines(text: str) -> list[str]:
    """What a terminal shows of ``text``: escape codes dropped, each line after its last CR."""
    return [line.rsplit("\r", 1)[-1] for line in _ANSI.sub("", text).split("\n")]


class Screen:
    """``attention_jax.cli``'s console made a terminal ``width`` columns wide, into a buffer."""

    def __init__(self, monkeypatch):
        self._monkeypatch = monkeypatch
        self._buffer = io.StringIO()

    def use(self, width: int) -> None:
        from rich.console import Console

        from attention_jax import cli

        self._buffer = io.StringIO()
        buffer = self._buffer
        self._monkeypatch.setattr(
            cli, "console", lambda: Console(width=width, force_terminal=True, file=buffer,
                                            color_system="standard"))

    def lines(self) -> list[str]:
        return visible_lines(self._buffer.getvalue())


@pytest.fixture
def screen(monkeypatch) -> Screen:
    """Redirects the command line's rich output to a fake terminal (``screen.use(80)``)."""
    return Screen(monkeypatch)
