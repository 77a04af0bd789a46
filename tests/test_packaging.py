"""Packaging: the QAP core runs without torch, fusion says how to get it, metadata agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter in which `import torch` fails, as in an install without it.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # import torch -> ModuleNotFoundError
import numpy as np
import qapfuse
from qapfuse.cli import main
p = qapfuse.Problem.koopmans_beckmann(np.eye(4), np.ones((4, 4)), sense="min")
assert sorted(qapfuse.solve(p, "ga", rng=0).permutation.tolist()) == [0, 1, 2, 3]
assert main(["solve", "--example", "nug12", "--method", "ga", "--json", "-q"]) == 0
assert sys.modules["torch"] is None  # nothing above needed torch
try:
    import qapfuse.fusion
except ImportError as exc:
    print("FUSION:", exc)
"""


def test_core_runs_without_torch_and_fusion_says_what_to_install():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("FUSION: qapfuse.fusion needs torch")
    assert "pip install 'qapfuse[fusion]'" in line


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_torch_is_an_extra_and_the_bench_extra_declares_its_baseline():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert "torch" not in _names(project["dependencies"])
    assert "torch" in _names(extras["fusion"])
    assert {"pygmtools", "matplotlib"} <= _names(extras["bench"])
    assert {"pytest", "hypothesis"} <= _names(extras["test"])
    assert any(r.startswith("qapfuse[") and "fusion" in r for r in extras["test"])
    dev = " ".join(extras["dev"])
    assert all(extra in dev for extra in ("fusion", "bench", "test", "docs"))


def test_license_file_matches_the_declared_licence():
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "qapfuse developers" in text
