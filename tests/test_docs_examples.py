"""Every ```python block of the README and the guides runs (one namespace per file, in order).

Blocks fenced ```python3 are not run here: scripts that reproduce a benchmark (they read
command-line arguments and run for minutes), and snippets that need files outside the package
(MNIST from a data folder) or a deployment around them (a Flower strategy inside a ServerApp).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


GUIDES = [p for p in ALL_GUIDES if python_blocks(p)]


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_guide_examples_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": f"guide_{path.stem}"}
    for k, code in enumerate(blocks):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a guide's example must not warn
            exec(compile(code, f"{path.name}[block {k}]", "exec"), namespace)


def test_every_guide_with_examples_is_found():
    names = {p.name for p in GUIDES}
    assert {"README.md", "solvers.md", "affinity.md", "fusion.md", "multi.md"} <= names
