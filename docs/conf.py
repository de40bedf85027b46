"""Sphinx configuration: the API reference from the docstrings, the README's sections as
pages, the notebooks rendered (not executed).

Build (warnings are errors in CI)::

    pip install -e ".[docs]"
    python3 -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "attention_jax"
author = "attention_jax authors"
copyright = "attention_jax authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",  # Markdown pages (myst-parser) and notebooks
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" of dataclasses as fields of the class, not a second description of each
napoleon_use_ivar = True
# torch is optional; the interop module imports it inside its functions only
autodoc_mock_imports = ["torch", "transformers"]

# The notebooks are stored without outputs and take minutes to run: rendered as they are.
nb_execution_mode = "off"
myst_heading_anchors = 3
# README sections start at their own level (## / ###) under the page title
suppress_warnings = ["myst.header", "myst.xref_missing"]

html_theme = "alabaster"
html_title = "attention_jax"

# The notebooks live in notebooks/ (outside this folder): copied in (ignored by git).
_NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
_NOTEBOOKS.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copyfile(_nb, _NOTEBOOKS / _nb.name)


# The API pages: one per module of the package, found at build time (so a new module
# gets its page), written to api/ (ignored by git).
def _api_pages() -> None:
    import pkgutil

    import attention_jax

    api = Path(__file__).resolve().parent / "api"
    api.mkdir(exist_ok=True)
    found = pkgutil.walk_packages(attention_jax.__path__, "attention_jax.")
    names = ["attention_jax", *sorted(
        m.name for m in found if not any(part.startswith("_") for part in m.name.split(".")))]
    for name in names:
        title = f"``{name}``"
        (api / f"{name}.rst").write_text(
            f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n")
    entries = "\n".join(f"   {name}" for name in names)
    (api / "index.rst").write_text(
        "API reference\n=============\n\nEvery module of the package, from its docstrings "
        "(Google style, with shapes).\n\n.. toctree::\n   :maxdepth: 1\n\n" + entries + "\n")


_api_pages()
