"""Integer projected fixed point (Leordeanu, Hebert, Sukthankar 2009)."""

from __future__ import annotations

import time
from typing import Any

from .._validation import Option, validate_options, warn_not_converged
from ..problem import Problem
from ._common import check_problem, finish, hard_projection, initial_soft
from .result import MatchResult

__all__ = ["OPTIONS", "ipfp"]

OPTIONS: dict[str, Option] = {
    "max_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
}


@validate_options(OPTIONS)
def ipfp(
    problem: Problem,
    *,
    max_iter: int = 50,
    tol: float = 1e-3,
    time_limit: float | None = None,
    x0: Any = None,
) -> MatchResult:
    r"""Integer projected fixed point: Frank--Wolfe steps with exact line search.

    Each step solves the linear assignment ``b = argmax <K x, b>`` (Hungarian), then moves
    from ``x`` towards ``b`` by the step that maximises the quadratic score along the segment.
    The best discrete ``b`` seen is returned.

    Parameters
    ----------
    problem : Problem
        Affinity operator.
    max_iter : int >= 1
        Steps.
    tol : float > 0
        Stop when the relative score difference between the continuous iterate and the
        discrete solution falls below `tol` in every instance and the discrete solution is
        the one of the previous step, or the iterate itself (the relative difference alone
        is not invariant to a constant added to ``K``, which would stop the iteration after
        one step).
    time_limit : float > 0, optional
        Wall-clock budget in seconds, checked after each step: past it, the best discrete
        solution so far is returned with
        ``info["stopped"] == "time_limit"`` (and no ``ConvergenceWarning``).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start. Default: uniform.

    Returns
    -------
    MatchResult
        ``soft`` is the last continuous iterate. ``info["stopped"]`` is ``"converged"``,
        ``"max_iter"`` or ``"time_limit"``.

    Examples
    --------
    Graph 2 is graph 1 with its nodes permuted; the matching undoes the permutation:

    >>> import numpy as np
    >>> from qapfuse import Problem, ipfp
    >>> rng = np.random.default_rng(0)
    >>> A = rng.random((6, 6))
    >>> A = A + A.T
    >>> perm = rng.permutation(6)
    >>> res = ipfp(Problem.koopmans_beckmann(A, A[np.ix_(perm, perm)]))
    >>> bool((res.permutation == np.argsort(perm)).all()), res.info["stopped"]
    (True, 'converged')

    References
    ----------
    .. [1] M. Leordeanu, M. Hebert, R. Sukthankar, "An integer projected fixed point method
           for graph matching and MAP inference", NeurIPS 2009.
    """
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    caller = "ipfp"
    check_problem(problem, caller)
    xp = problem.xp
    v = initial_soft(problem, x0, caller)
    Kv = problem.matvec(v)
    best_x, best_score = None, None
    prev_b, prev_Kb = None, None
    gap, it, stopped = float("inf"), 0, "max_iter"
    for it in range(1, max_iter + 1):
        b = hard_projection(problem, Kv)
        # The same discrete point as last step: its product with K is already known.
        if prev_b is not None and bool(xp.all(b == prev_b)):
            settled, Kb = True, prev_Kb
        elif bool(xp.all(b == v)):  # the iterate is already this discrete point
            settled, Kb = True, Kv
        else:
            settled, Kb = False, problem.matvec(b)
        prev_b, prev_Kb = b, Kb
        d, Kd = b - v, Kb - Kv
        a = xp.sum(v * Kd, axis=(1, 2), keepdims=True)
        c = xp.sum(d * Kd, axis=(1, 2), keepdims=True)
        safe_c = xp.where(c == 0, xp.ones_like(c), c)
        t = -a / safe_c
        full = (c >= 0) | (t >= 1)
        t = xp.where(full, xp.ones_like(t), t)
        score_v = xp.sum(v * Kv, axis=(1, 2))
        score_b = xp.sum(b * Kb, axis=(1, 2))
        if best_x is None:
            best_x, best_score = b, score_b
        else:
            better = score_b > best_score
            best_x = xp.where(better[:, None, None], b, best_x)
            best_score = xp.where(better, score_b, best_score)
        denom = xp.where(score_v != 0, xp.abs(score_v), xp.ones_like(score_v))
        gap = float(xp.max(xp.abs(score_v - score_b) / denom))
        v, Kv = v + t * d, Kv + t * Kd
        if gap < tol and settled:
            stopped = "converged"
            break
        if deadline is not None and time.perf_counter() > deadline:
            stopped = "time_limit"
            break
    converged = gap < tol
    if stopped == "max_iter" and converged:  # settled in the last step allowed
        stopped = "converged"
    if stopped == "max_iter":
        warn_not_converged(
            f"ipfp stopped at max_iter={max_iter} with relative gap {gap:.2e} > tol={tol:g}; "
            "raise max_iter."
        )
    return finish(
        problem,
        best_x,
        soft=v,
        n_iter=it,
        converged=converged,
        start=start,
        score=best_score,
        info={"stopped": stopped},
    )
