"""The README's Python snippets run as written, each on its own, as a reader would paste it.

Every ```python block runs alone in a fresh interpreter (one test each, so xdist runs
them in parallel), with no fake devices preset (conftest's device flag is removed) and
the working directory a temporary folder. A block that needs more than one device says
so in its first line (``# needs 8 devices: ...``) and asks for them itself, before JAX
starts. A ``print(...)  # value`` line states what it prints: the block's output lines
must be those values, in order.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from tests.helpers import child_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 300  # one block, generous: the machine is shared
PRINT_WITH_VALUE = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<value>.+?)\s*$")


def snippets() -> list[tuple[str, str]]:
    """``[(section heading, code)]`` of the README's ```python blocks, in order."""
    out, heading = [], ""
    for block in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```", README.read_text(),
                             flags=re.S | re.M):
        if block.group(1):
            heading = block.group(1).lstrip("# ").strip()
        else:
            out.append((heading, block.group(2)))
    return out


def expected_output(code: str) -> list[str]:
    """The values stated after ``print(...)  #`` lines.

    >>> expected_output("x = 1\\nprint(x)  # 1\\nprint(x, 2)       # 1 2\\n")
    ['1', '1 2']
    """
    return [m["value"] for line in code.splitlines() if (m := PRINT_WITH_VALUE.match(line))]


def _env() -> dict[str, str]:
    return child_env()  # no fake devices preset: a snippet that needs them says so


SNIPPETS = snippets()


def test_readme_has_snippets_and_stated_values():
    assert len(SNIPPETS) >= 6
    assert any(expected_output(code) for _, code in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)),
                         ids=[f"{i}-{h.split()[0].lower() if h else 'top'}"
                              for i, (h, _) in enumerate(SNIPPETS)])
def test_readme_snippet_runs_alone(index, tmp_path):
    heading, code = SNIPPETS[index]
    if re.search(r"^\s*(import torch|from attention_jax.interop)", code, flags=re.M):
        pytest.importorskip("torch")
    if "use_fake_cpu_devices" in code or "make_mesh" in code:
        first = code.splitlines()[0]
        assert first.startswith("# needs") and "devices" in first, (heading, first)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"README block {index} ({heading}):\n{proc.stderr[-3000:]}"
    printed = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    assert printed == expected_output(code), (heading, proc.stdout)
