"""qapfuse: quadratic assignment, graph matching and neural-network fusion on numpy and torch.

The solver core (this namespace) works on numpy, torch and other array-API arrays; the
fusion layer lives in :mod:`qapfuse.fusion` (it needs torch).
"""

from .affinity import build_aff_mat, graph_matching_problem
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

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConstantAffinity",
    "ConvergenceWarning",
    "DenseAffinity",
    "KoopmansBeckmannAffinity",
    "LinearAffinity",
    "MatchResult",
    "MultiMatchResult",
    "Problem",
    "SparseAffinity",
    "SumAffinity",
    "auto",
    "build_aff_mat",
    "consistency",
    "ga",
    "gamgm",
    "gamgm_affinity",
    "graph_matching_problem",
    "hungarian",
    "ipfp",
    "match_with_outliers",
    "partial_hungarian",
    "rrwm",
    "sinkhorn",
    "sinkhorn_slack",
    "sm",
    "solve",
    "synchronize",
    "tabu",
    "two_opt",
]
