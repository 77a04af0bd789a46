"""Reweighted random walks for graph matching (Cho, Lee, Lee 2010)."""

from __future__ import annotations

import time
from typing import Any

from .._validation import Option, validate_options, warn_not_converged
from ..problem import ConstantAffinity, DenseAffinity, Problem
from ._common import check_problem, finish, hard_projection, initial_soft, square_mask
from ._sinkhorn import Sinkhorn
from .result import MatchResult

__all__ = ["OPTIONS", "rrwm"]

OPTIONS: dict[str, Option] = {
    "max_iter": Option("int", low=1),
    "sk_iter": Option("int", low=1),
    "alpha": Option("float", low=0, high=1),
    "beta": Option("float", low=0, low_inclusive=False),
    "tol": Option("float", low=0, low_inclusive=False),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
}


@validate_options(OPTIONS)
def rrwm(
    problem: Problem,
    *,
    max_iter: int = 50,
    sk_iter: int = 10,
    alpha: float = 0.2,
    beta: float = 30.0,
    tol: float = 1e-5,
    time_limit: float | None = None,
    x0: Any = None,
) -> MatchResult:
    r"""Reweighted random walk matching.

    A random walk on the association graph (``K`` scaled by its largest row sum) is mixed,
    with weight `alpha`, with a Sinkhorn projection of its own inflated state
    (``exp(beta * v / max v)``): the "reweighted jump" that keeps the walk near assignments.
    A ``K`` with negative entries is shifted by a constant first (which leaves the optimum
    of full assignments unchanged).

    Parameters
    ----------
    problem : Problem
        Affinity operator.
    max_iter : int >= 1
        Walk steps.
    sk_iter : int >= 1
        Sinkhorn iterations (row + column update) of the reweighting jump.
    alpha : float in [0, 1]
        Weight of the reweighting jump.
    beta : float > 0
        Inflation of the walk state before the Sinkhorn projection.
    tol : float > 0
        Stop when the state moves less than `tol` (Frobenius norm of the change) in two
        consecutive steps that give the same discrete (Hungarian) answer: small steps alone
        can hide a slow drift to another matching.
    time_limit : float > 0, optional
        Wall-clock budget in seconds, checked after each step: past it, the current state is
        rounded and returned with
        ``info["stopped"] == "time_limit"`` (and no ``ConvergenceWarning``).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start. Default: uniform.

    Returns
    -------
    MatchResult
        ``soft`` is the final walk state (sums to 1 per instance). ``info["stopped"]`` is
        ``"converged"``, ``"max_iter"`` or ``"time_limit"``.

    Examples
    --------
    Graph 2 is graph 1 with its nodes permuted; the matching undoes the permutation:

    >>> import numpy as np
    >>> from qapfuse import Problem, rrwm
    >>> rng = np.random.default_rng(0)
    >>> A = rng.random((6, 6))
    >>> A = A + A.T
    >>> perm = rng.permutation(6)
    >>> res = rrwm(Problem.koopmans_beckmann(A, A[np.ix_(perm, perm)]))
    >>> bool((res.permutation == np.argsort(perm)).all()), res.info["stopped"]
    (True, 'converged')

    References
    ----------
    .. [1] M. Cho, J. Lee, K. M. Lee, "Reweighted random walks for graph matching",
           ECCV 2010. doi:10.1007/978-3-642-15555-0_36
    """
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    caller = "rrwm"
    check_problem(problem, caller)
    xp = problem.xp
    mask = problem.mask
    aff = problem.affinity
    # Only the smallest entry is needed (one pass over a dense K instead of two).
    lo = float(xp.min(aff.K)) if isinstance(aff, DenseAffinity) else aff.entry_bounds()[0]
    if lo < 0:
        aff = aff + ConstantAffinity(-lo, mask)
    # Scale K by its largest row sum (the walk's transition normaliser).
    ones = xp.astype(mask, problem.dtype)
    d = aff.matvec(ones)
    d_valid = xp.where(mask, d, xp.full_like(d, xp.inf))
    dmax = xp.max(d, axis=(1, 2), keepdims=True)
    dmin = xp.min(d_valid)
    scale = dmax + dmin * 1e-5
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))

    project = Sinkhorn(mask, square=square_mask(problem), max_iter=sk_iter, tol=0.0)
    v = initial_soft(problem, x0, caller)
    change, it, stopped = float("inf"), 0, "max_iter"
    prev_hard = None
    for it in range(1, max_iter + 1):
        w = aff.matvec(v) / scale
        w = w / _l1(w, xp=xp)
        top = xp.max(w, axis=(1, 2), keepdims=True)
        s = beta * w / xp.where(top > 0, top, xp.ones_like(top))
        w = alpha * project(s) + (1.0 - alpha) * w
        w = w / _l1(w, xp=xp)
        change = float(xp.max(xp.sqrt(xp.sum((w - v) ** 2, axis=(1, 2)))))
        v = w
        if change < tol:
            # settled: a second small step that leaves the discrete answer unchanged
            hard = hard_projection(problem, v)
            if prev_hard is not None and bool(xp.all(hard == prev_hard)):
                stopped = "converged"
                break
            prev_hard = hard
        else:
            prev_hard = None
        if deadline is not None and time.perf_counter() > deadline:
            stopped = "time_limit"
            break
    converged = change < tol
    if stopped == "max_iter" and converged:  # settled in the last step allowed
        stopped = "converged"
    if stopped == "max_iter":
        warn_not_converged(
            f"rrwm stopped at max_iter={max_iter} with change {change:.2e} > tol={tol:g}; "
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


def _l1(w: Any, *, xp: Any) -> Any:
    n = xp.sum(xp.abs(w), axis=(1, 2), keepdims=True)
    return xp.where(n > 0, n, xp.ones_like(n))
