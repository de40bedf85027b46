"""Test setup: 8 fake CPU devices, a persistent compilation cache, cheap compiles.

These must be configured before JAX initialises its backend, hence at import
time of this conftest (pytest imports it before collecting any test module).

The suite is bound by XLA compile time (thousands of small programs whose run
time is negligible), so tests compile with LLVM's expensive passes off and
backend optimisation level 0 (about a fifth less wall time), and with XLA:CPU's
older loop emitters instead of its fusion emitters where the installed XLA has the
switch (about a third less), and each program's code generated in one piece, not
in parallel parts (about an eighth less). Numerics are the same IEEE float32 / bfloat16
operations; only code generation is cheaper.
Subprocesses started by tests (CLI, notebooks, README snippets) inherit the flags.
Benchmarks are never timed here; run them outside pytest.

Most of the suite's compiles are small: eagerly, each operation is its own XLA
program (about 18,000 in a run, 20 ms each with lowering). So every program goes
into the persistent cache, however quick its compile (the default keeps only those
over a second): the other worker and the child processes (CLI, notebooks, README
snippets) load what one process compiled, and a second run loads nearly everything.
In memory, compiled programs are kept across test modules (the same small operations
recur in many of them) until a worker's resident memory passes ``RSS_LIMIT_MB``; then
they are dropped (``jax.clear_caches``): unbounded, one worker grew to 5.7 GB.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"

_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
# XLA:CPU's fusion emitters (its MLIR code generator) cost about half of every small
# compile (37 -> 18 ms for one elementwise op; a module of layer tests 159 -> 97 s);
# the older loop emitters run the same float32 / bfloat16 operations. XLA aborts the
# process on a flag it does not know, so this one is added only where a child
# process accepted it (the answer kept per jaxlib version in the cache folder).
# XLA:CPU also cuts each program's LLVM module into parts compiled on separate threads;
# with two workers on two cores those threads only contend: one part per program took
# the cache, layer-options and context-module tests from 90 / 81 s to 79 / 68 s (two
# pairs of cold runs, -n 2).
_OPTIONAL_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                   "--xla_cpu_parallel_codegen_split_count=1")


def _xla_accepts(flag: str) -> bool:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    stamp = _CACHE / f"xla-flag-{flag.strip('-').replace('=', '-')}-jaxlib-{version}"
    if stamp.exists():
        return stamp.read_text() == "ok"
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    code = "import jax; jax.numpy.zeros(1).block_until_ready()"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           timeout=120)
    ok = probe.returncode == 0
    try:
        _CACHE.mkdir(exist_ok=True)
        stamp.write_text("ok" if ok else "unknown flag")
    except OSError:  # a read-only checkout: probe again next time
        pass
    return ok


for _flag in _FLAGS + tuple(f for f in _OPTIONAL_FLAGS if _xla_accepts(f)):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


import ctypes  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

# A worker's resident memory above this after a test: its compiled programs dropped.
# Dropping them after every module instead recompiled the same small operations: about a
# tenth of the suite's time (853 against 771 worker-seconds, one pair of cold runs, -n 2).
RSS_LIMIT_MB = 1200


def _drop_programs() -> None:
    """JAX's in-memory caches emptied and the freed memory given back to the system."""
    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # no procfs
        pass
    return 0.0


# Python's cyclic garbage collector: tracing and lowering make objects by the million, and
# at the default thresholds (700, 10, 10) the collector kept walking them, the collected
# test modules included: a tenth of the time of the layer-options, cache and equivalence
# tests (55 -> 49 s, -n 2, two runs each; over the whole suite the gain was within
# run-to-run noise). Collections are rarer, and what collection built is frozen out of
# them (it lives until the session ends anyway).
gc.set_threshold(50_000, 20, 20)


def pytest_collection_finish(session):
    gc.freeze()


@pytest.fixture(autouse=True)
def _bound_worker_memory():
    """After a test that leaves the worker above ``RSS_LIMIT_MB``: programs dropped."""
    yield
    if _rss_mb() > RSS_LIMIT_MB:
        _drop_programs()


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
