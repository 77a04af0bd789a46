"""qapfuse: quadratic assignment, graph matching and neural-network fusion on numpy and torch.

The solver core (this namespace) works on numpy, torch and other array-API arrays; the
fusion layer lives in :mod:`qapfuse.fusion` (it needs torch).

The names below are imported on first use (PEP 562): ``import qapfuse`` and ``qapfuse
--version`` load neither Numba, scipy nor torch, and ``from qapfuse import solve`` loads
only what ``solve`` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the submodule that defines it. The ``if TYPE_CHECKING`` block at the
# end says the same for type checkers and IDEs; tests/test_import.py checks that they agree.
_EXPORTS: dict[str, str] = {
    "build_aff_mat": "affinity",
    "graph_matching_problem": "affinity",
    "ConvergenceWarning": "errors",
    "ConstantAffinity": "problem",
    "DenseAffinity": "problem",
    "KoopmansBeckmannAffinity": "problem",
    "LinearAffinity": "problem",
    "Problem": "problem",
    "SparseAffinity": "problem",
    "SumAffinity": "problem",
    "METHODS": "solvers",
    "MatchResult": "solvers",
    "MultiMatchResult": "solvers",
    "auto": "solvers",
    "consistency": "solvers",
    "ga": "solvers",
    "gamgm": "solvers",
    "gamgm_affinity": "solvers",
    "hungarian": "solvers",
    "ipfp": "solvers",
    "match_with_outliers": "solvers",
    "partial_hungarian": "solvers",
    "rrwm": "solvers",
    "sinkhorn": "solvers",
    "sinkhorn_slack": "solvers",
    "sm": "solvers",
    "solve": "solvers",
    "synchronize": "solvers",
    "tabu": "solvers",
    "two_opt": "solvers",
}

# Subpackages reachable as attributes (``qapfuse.solvers``) without importing them first.
_SUBMODULES = (
    "affinity",
    "backend",
    "bench",
    "cli",
    "data",
    "errors",
    "fusion",
    "graphs",
    "io",
    "problem",
    "solvers",
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


if TYPE_CHECKING:
    from .affinity import build_aff_mat, graph_matching_problem  # noqa: F401
    from .errors import ConvergenceWarning  # noqa: F401
    from .problem import (  # noqa: F401
        ConstantAffinity,
        DenseAffinity,
        KoopmansBeckmannAffinity,
        LinearAffinity,
        Problem,
        SparseAffinity,
        SumAffinity,
    )
    from .solvers import (  # noqa: F401
        METHODS,
        MatchResult,
        MultiMatchResult,
        auto,
        consistency,
        ga,
        gamgm,
        gamgm_affinity,
        hungarian,
        ipfp,
        match_with_outliers,
        partial_hungarian,
        rrwm,
        sinkhorn,
        sinkhorn_slack,
        sm,
        solve,
        synchronize,
        tabu,
        two_opt,
    )
