"""Spectral matching (Leordeanu & Hebert 2005)."""

from __future__ import annotations

import time
from typing import Any

from .._validation import Option, validate_options, warn_not_converged
from ..problem import Problem
from ._common import check_problem, finish, hard_projection, initial_soft
from .result import MatchResult

__all__ = ["OPTIONS", "sm"]

OPTIONS: dict[str, Option] = {
    "max_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
}


@validate_options(OPTIONS)
def sm(
    problem: Problem,
    *,
    max_iter: int = 50,
    tol: float = 1e-5,
    time_limit: float | None = None,
    x0: Any = None,
) -> MatchResult:
    r"""Spectral matching: leading eigenvector of ``K`` by power iteration, then Hungarian.

    Parameters
    ----------
    problem : Problem
        Affinity with non-negative entries (the Perron vector is then non-negative).
    max_iter : int >= 1
        Power iterations.
    tol : float > 0
        Stop when the normalised iterate moves less than `tol` (Frobenius norm).
    time_limit : float > 0, optional
        Wall-clock budget in seconds, checked after each step: past it, the current vector is
        rounded and returned with
        ``info["stopped"] == "time_limit"`` (and no ``ConvergenceWarning``).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start vector. Default: uniform.

    Returns
    -------
    MatchResult
        ``soft`` is the eigenvector (unit norm per instance) as an ``(n1, n2)`` matrix.
        ``info["stopped"]`` is ``"converged"``, ``"max_iter"`` or ``"time_limit"``.

    Examples
    --------
    Graph 2 is graph 1 with its nodes permuted; the matching undoes the permutation:

    >>> import numpy as np
    >>> from qapfuse import Problem, sm
    >>> rng = np.random.default_rng(0)
    >>> A = rng.random((6, 6))
    >>> A = A + A.T
    >>> perm = rng.permutation(6)
    >>> res = sm(Problem.koopmans_beckmann(A, A[np.ix_(perm, perm)]))
    >>> bool((res.permutation == np.argsort(perm)).all()), res.info["stopped"]
    (True, 'converged')

    References
    ----------
    .. [1] M. Leordeanu, M. Hebert, "A spectral technique for correspondence problems using
           pairwise constraints", ICCV 2005. doi:10.1109/ICCV.2005.20
    """
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    caller = "sm"
    check_problem(problem, caller)
    xp = problem.xp
    v = initial_soft(problem, x0, caller)
    change, it, stopped = float("inf"), 0, "max_iter"
    for it in range(1, max_iter + 1):
        w = problem.matvec(v)
        norm = xp.sqrt(xp.sum(w * w, axis=(1, 2), keepdims=True))
        w = w / xp.where(norm > 0, norm, xp.ones_like(norm))
        change = float(xp.max(xp.sqrt(xp.sum((w - v) ** 2, axis=(1, 2)))))
        v = w
        if change < tol:
            stopped = "converged"
            break
        if deadline is not None and time.perf_counter() > deadline:
            stopped = "time_limit"
            break
    converged = change < tol
    if stopped == "max_iter":
        warn_not_converged(
            f"sm stopped at max_iter={max_iter} with change {change:.2e} > tol={tol:g}; "
            "raise max_iter."
        )
    return finish(
        problem,
        hard_projection(problem, v),
        soft=v,
        n_iter=it,
        converged=converged,
        start=start,
        info={"stopped": stopped},
    )
