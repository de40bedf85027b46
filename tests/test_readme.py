"""The README's Python snippets run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippets():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index):
    code = _snippets()[index]
    if "import torch" in code:
        pytest.importorskip("torch")
    exec(compile(code, f"README.md snippet {index}", "exec"), {})
