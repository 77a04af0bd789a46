"""qapfuse: quadratic assignment, graph matching and neural-network fusion on numpy and torch."""

from .errors import ConvergenceWarning
from .problem import (
    ConstantAffinity,
    DenseAffinity,
    KoopmansBeckmannAffinity,
    LinearAffinity,
    Problem,
    SparseAffinity,
    SumAffinity,
)
from .solvers import (
    METHODS,
    MatchResult,
    auto,
    ga,
    hungarian,
    ipfp,
    rrwm,
    sinkhorn,
    sm,
    solve,
    tabu,
    two_opt,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConstantAffinity",
    "ConvergenceWarning",
    "DenseAffinity",
    "KoopmansBeckmannAffinity",
    "LinearAffinity",
    "MatchResult",
    "Problem",
    "SparseAffinity",
    "SumAffinity",
    "auto",
    "ga",
    "hungarian",
    "ipfp",
    "rrwm",
    "sinkhorn",
    "sm",
    "solve",
    "tabu",
    "two_opt",
]
