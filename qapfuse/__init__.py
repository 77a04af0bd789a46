"""qapfuse: quadratic assignment, graph matching and neural-network fusion on numpy and torch.

This namespace holds the QAP core: :func:`solve` and the problems (:class:`Problem` and its
affinity operators), the solvers it dispatches to (:func:`auto`, :func:`ga`, :func:`rrwm`,
:func:`ipfp`, :func:`sm`, :func:`two_opt`, :func:`tabu`), the linear assignment tools
(:func:`hungarian`, :func:`sinkhorn`), :func:`match_with_outliers` and the result type. They
work on numpy, torch and other array-API arrays. The rest lives in its own namespace:

* :mod:`qapfuse.affinity` -- building ``K`` from graphs (``build_aff_mat``,
  ``graph_matching_problem``, matrix-free edge affinities);
* :mod:`qapfuse.solvers` -- everything above plus the lower-level pieces (``sinkhorn_slack``,
  ``partial_hungarian``, the method registry);
* :mod:`qapfuse.solvers.multi` -- multi-graph matching (``gamgm``, ``synchronize``, ...);
* :mod:`qapfuse.io.qaplib` -- QAPLIB files; :mod:`qapfuse.graphs` -- graph generators;
* :mod:`qapfuse.fusion` -- networks as graphs, alignment and fusion (needs torch).

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
    "ConvergenceWarning": "errors",
    "ConstantAffinity": "problem",
    "DenseAffinity": "problem",
    "KoopmansBeckmannAffinity": "problem",
    "LinearAffinity": "problem",
    "Problem": "problem",
    "SparseAffinity": "problem",
    "SumAffinity": "problem",
    "MatchResult": "solvers",
    "auto": "solvers",
    "ga": "solvers",
    "hungarian": "solvers",
    "ipfp": "solvers",
    "match_with_outliers": "solvers",
    "rrwm": "solvers",
    "sinkhorn": "solvers",
    "sm": "solvers",
    "solve": "solvers",
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
        MatchResult,
        auto,
        ga,
        hungarian,
        ipfp,
        match_with_outliers,
        rrwm,
        sinkhorn,
        sm,
        solve,
        tabu,
        two_opt,
    )
