"""The README's Python snippets run as written, in order, as a reader would paste them.

Snippet i runs after snippets 0 .. i-1 in one namespace (a later snippet may use
``x`` or ``model`` from an earlier one).
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippets():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index):
    snippets = _snippets()[: index + 1]
    if any("import torch" in code for code in snippets):
        pytest.importorskip("torch")
    namespace: dict = {}
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md snippet {i}", "exec"), namespace)
