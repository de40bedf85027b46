"""The notebooks in ``notebooks/``: paired, stored without outputs, and executed.

Each notebook is a jupytext pair: the percent script ``NN_name.py`` (what is
reviewed and edited) and ``NN_name.ipynb`` (what Jupyter opens), both with the
``formats: ipynb,py:percent`` header. For each notebook:

* the two files hold the same cells (a stale ``.ipynb`` fails: run
  ``jupytext --sync notebooks/*.py``);
* the ``.ipynb`` is stored without outputs and execution counts;
* the ``.ipynb`` runs top to bottom in a fresh kernel (nbclient) without an error.
  The notebooks assert their own results (equivalence errors, collectives,
  memory growth), so a broken library fails them; here we also check that the
  key lines were printed and the figures drawn.

How the kernel is started:

* the interpreter running pytest (``sys.executable``), through a kernelspec
  written to a temporary folder, whatever ``python3`` kernelspec is installed;
* working directory ``notebooks/``, as when the notebook is opened in Jupyter
  (the notebooks find the repository root by looking upwards for
  ``experiments/``); the repository root is put first on ``PYTHONPATH``;
* the environment of the tests, minus conftest's fake-device ``XLA_FLAGS``
  (notebook 02 asks for 8 fake devices itself, the others run on the default
  device count), with conftest's persistent compilation cache, and
  ``MPLBACKEND`` set to matplotlib-inline: non-interactive (no window, no
  display needed), and unlike ``Agg`` it puts every figure into the outputs,
  which the tests count.

Run with ``-s`` to see each notebook's execution time.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from traitlets import default  # noqa: E402

from tests.helpers import child_env  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
FORMATS = "ipynb,py:percent"
KERNEL_NAME = "python3"
MPL_INLINE = "module://matplotlib_inline.backend_inline"
CELL_TIMEOUT_S = 300  # one cell; the slowest takes ~20 s on 2 busy cores
NOTEBOOK_BUDGET_S = 300  # a whole notebook (target < 60 s); catches runaway cells
HAVE_TORCH = importlib.util.find_spec("torch") is not None

# name -> (lines the run must print, figures it must draw)
EXPECTED: dict[str, tuple[tuple[str, ...], int]] = {
    "01_attention_family": (
        (
            "GQA -> MHA with K=4: max |difference|",
            "cache GiB",
            *(("MHA vs torch.nn.MultiheadAttention: max |dy|",
               "MQA (K=1) vs torch SDPA(enable_gqa=True)") if HAVE_TORCH
              else ("PyTorch is not installed",)),
        ),
        2,
    ),
    "02_heads_on_devices": (
        (
            "8 CPU devices",
            "forward:            {'all-reduce@model': 1}",
            "device_put loop",
            "max forward error",
        ),
        1,
    ),
    "03_fast_attention": (("blockwise vs xla: max |dy|", "blockwise needs"), 1),
    "04_decoding_and_uptraining": (
        (
            "prefill + 4 steps vs full causal forward",
            "outputs: max |int8 - float32|",
            "gqa_to_mha(mha_to_gqa(mha))",
            "K=2 by random: converted loss",
        ),
        2,
    ),
    "05_attention_variants": (
        (
            "linear attention: chunked parallel vs token-by-token recurrence",
            "Linformer, identity projections vs dense attention",
            "gated, all gates on vs MultiHeadAttention",
            "study run:",  # the committed experiments/results/variants_study_cpu.json
        ),
        2,  # the patterns, and the committed study's time / accuracy against T
    ),
}
NOTEBOOKS = tuple(EXPECTED)


def _paths(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    return NOTEBOOK_DIR / f"{name}.py", NOTEBOOK_DIR / f"{name}.ipynb"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def test_every_notebook_is_listed():
    on_disk = {p.stem for p in NOTEBOOK_DIR.glob("*.py")} | {
        p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}
    assert on_disk == set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_in_sync(name):
    py_path, ipynb_path = _paths(name)
    py_nb, ipynb_nb = jupytext.read(py_path), jupytext.read(ipynb_path)
    for nb, path in ((py_nb, py_path), (ipynb_nb, ipynb_path)):
        assert nb.metadata.get("jupytext", {}).get("formats") == FORMATS, path
        assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL_NAME, path
    assert _cells(py_nb) == _cells(ipynb_nb), (
        f"{ipynb_path.name} differs from {py_path.name}: run `jupytext --sync notebooks/*.py`")
    assert sum(c.cell_type == "code" for c in py_nb.cells) >= 5


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_stored_without_outputs(name):
    _, ipynb_path = _paths(name)
    nb = nbformat.read(ipynb_path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{ipynb_path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{ipynb_path.name} cell {i} has a count"


@pytest.fixture(scope="module")
def kernel_manager_class(tmp_path_factory) -> type[AsyncKernelManager]:
    """A kernel manager that finds only a ``python3`` kernelspec running this interpreter."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root / KERNEL_NAME)
    argv = json.loads((root / KERNEL_NAME / "kernel.json").read_text())["argv"]
    assert argv[0] == sys.executable, argv

    class ThisInterpreter(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=[str(root)])

    return ThisInterpreter


def _kernel_env() -> dict[str, str]:
    return {**child_env(), "MPLBACKEND": MPL_INLINE}


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_manager_class, record_property):
    _, ipynb_path = _paths(name)
    nb = nbformat.read(ipynb_path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL_NAME, kernel_manager_class=kernel_manager_class,
        timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"\n{name}: executed in {seconds:.1f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = _text(outputs)
    lines, figures = EXPECTED[name]
    for line in lines:
        assert line in text, f"{name} did not print {line!r}"
    drawn = sum("image/png" in out.get("data", {}) for out in outputs)
    assert drawn == figures, f"{name} drew {drawn} figures, expected {figures}"
    assert seconds < NOTEBOOK_BUDGET_S, f"{name} took {seconds:.0f} s"
