"""Start-up cost: ``import qapfuse`` and ``qapfuse --version`` load no solver, Numba or torch."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import qapfuse

ROOT = Path(qapfuse.__file__).resolve().parents[1]
HEAVY = ("torch", "numba", "scipy", "qapfuse.solvers", "qapfuse.affinity", "qapfuse.fusion")


def _modules_after(code: str) -> tuple[set[str], str]:
    """Run `code` in a fresh interpreter: the modules loaded, and the first line it printed."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return set(lines), lines[0]


def _loaded(modules: set[str], prefix: str) -> list[str]:
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def test_import_qapfuse_loads_nothing_heavy():
    modules, _ = _modules_after("import qapfuse")
    assert "qapfuse" in modules
    for heavy in HEAVY:
        assert _loaded(modules, heavy) == [], heavy


def test_version_loads_no_solver():
    modules, first = _modules_after("from qapfuse.cli import main\nassert main(['--version']) == 0")
    assert first == f"qapfuse {qapfuse.__version__}"
    for heavy in HEAVY:
        assert _loaded(modules, heavy) == [], heavy


def test_affinity_builders_load_numba_and_scipy_special_only_when_used():
    modules, _ = _modules_after(
        "from qapfuse.affinity import build_aff_mat, graph_matching_problem"
    )
    for heavy in ("torch", "numba", "scipy.special", "qapfuse.solvers"):
        assert _loaded(modules, heavy) == [], heavy


def test_every_public_name_resolves_to_its_module():
    for name in qapfuse.__all__:
        module = __import__(f"qapfuse.{qapfuse._EXPORTS[name]}", fromlist=[name])
        assert getattr(qapfuse, name) is getattr(module, name)
    assert set(qapfuse.__all__) <= set(dir(qapfuse))
    assert qapfuse.solvers.solve is qapfuse.solve  # subpackages as attributes
    with pytest.raises(AttributeError, match="has no attribute 'sovle'"):
        qapfuse.sovle  # noqa: B018


def test_lazy_table_agrees_with_type_checking_imports_and_subpackages():
    tree = ast.parse(Path(qapfuse.__file__).read_text())
    block = next(
        n
        for n in tree.body
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    declared = {a.name: imp.module for imp in block.body for a in imp.names}
    assert declared == qapfuse._EXPORTS
    public = {m.name for m in pkgutil.iter_modules(qapfuse.__path__) if m.name[0] != "_"}
    assert public == set(qapfuse._SUBMODULES)
