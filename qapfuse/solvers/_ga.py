"""Graduated assignment (Gold & Rangarajan 1996) for the Lawler QAP."""

from __future__ import annotations

import time
from typing import Any

from .._validation import Option, check_options, validate_options, warn_not_converged
from ..problem import Problem
from ._anneal import Schedule, anneal
from ._common import check_problem, finish, hard_projection, initial_soft, normalise
from ._sinkhorn import Sinkhorn, compiled
from .result import MatchResult

__all__ = ["OPTIONS", "ga"]

OPTIONS: dict[str, Option] = {
    "tau0": Option("float", low=0, low_inclusive=False),
    "tau_min": Option("float", low=0, low_inclusive=False),
    "decay": Option("float", low=0, high=1, low_inclusive=False),
    "step": Option("float", low=0, high=1, low_inclusive=False),
    "max_inner": Option("int", low=1),
    "sk_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
    "x0": Option("array", allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
}


@validate_options(OPTIONS)
def ga(
    problem: Problem,
    *,
    tau0: float = 0.5,
    tau_min: float = 5e-3,
    decay: float = 0.7,
    step: float = 0.5,
    max_inner: int = 30,
    sk_iter: int = 100,
    tol: float = 1e-3,
    x0: Any = None,
    time_limit: float | None = None,
) -> MatchResult:
    r"""Graduated assignment: maximise ``vec(X)^T K vec(X)`` by annealed Sinkhorn steps.

    At temperature ``tau`` the soft matching moves a fraction `step` of the way to
    ``sinkhorn(G / tau)``, with ``G = (K + K^T) vec(X)`` scaled to unit range
    (``max G - min G = 1`` over the valid pairs, so adding a constant to ``K`` changes
    nothing), until it changes by less than `tol` (at most `max_inner` times); then ``tau``
    is multiplied by `decay`, from `tau0` down to `tau_min`. The last soft matching is
    rounded by the Hungarian method.

    Parameters
    ----------
    problem : Problem
        Affinity operator for graphs with ``n1 <= n2`` nodes (batched: ``b`` pairs).
    tau0, tau_min : float > 0
        First and last temperature, relative to the range of the gradient.
    decay : float in (0, 1)
        Temperature factor between stages.
    step : float in (0, 1]
        Damping of the fixed-point update. ``1`` is the classic update, which oscillates
        between two assignments on indefinite ``K`` (e.g. QAPLIB costs); the default ``0.5``
        settles there and changes little on graph-matching affinities.
    max_inner : int >= 1
        Fixed-point iterations per temperature.
    sk_iter : int >= 1
        Sinkhorn iterations per fixed-point step (stops early at 1e-4 marginal error: the
        step is damped and rounded at the end, so finer marginals change nothing).
    tol : float > 0
        Largest entry change that ends a temperature stage (the final Hungarian rounding
        makes finer tolerances rarely worth their iterations).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Soft start, same library and device as `problem`. Default: uniform ``1 / n2``.
    time_limit : float > 0, optional
        Seconds for the whole call: checked between fixed-point iterations; when it runs out,
        the current soft matching is rounded (``info["stopped"] == "time_limit"``).

    Returns
    -------
    MatchResult
        ``X`` and ``soft`` of shape (n1, n2) or (b, n1max, n2max); ``converged`` is True when
        the coldest stage met `tol`. ``info["stages"]`` is the number of temperatures,
        ``info["stopped"]`` ``"done"`` or ``"time_limit"``.

    References
    ----------
    .. [1] S. Gold, A. Rangarajan, "A graduated assignment algorithm for graph matching",
           IEEE TPAMI 18(4), 1996. doi:10.1109/34.491619
    """
    start = time.perf_counter()
    caller = "ga"
    check_problem(problem, caller)
    opts = check_options(
        dict(
            tau0=tau0,
            tau_min=tau_min,
            decay=decay,
            step=step,
            max_inner=max_inner,
            sk_iter=sk_iter,
            tol=tol,
            time_limit=time_limit,
        ),
        OPTIONS,
        caller,
    )
    if opts["tau_min"] > opts["tau0"]:
        raise ValueError(
            f"The 'tau_min' parameter of ga must be <= tau0; got tau_min={tau_min}, tau0={tau0}."
        )
    deadline = None if time_limit is None else start + time_limit
    X = initial_soft(problem, x0, caller)
    schedule = Schedule(tau0, tau_min, decay, max_inner, tol, step)
    # numpy float64 runs a compiled Sinkhorn from cold potentials; elsewhere (torch, GPU)
    # every Sinkhorn step is a few kernel launches, so each call starts from the last one's.
    project = Sinkhorn(
        problem.mask,
        square=problem.n1 == problem.n2,
        warm=not compiled(X),
        max_iter=sk_iter,
        tol=1e-4,
    )
    xp, mask = problem.xp, problem.mask
    run = anneal(
        lambda X: normalise(problem.gradient(X), xp=xp, mask=mask),
        project,
        X,
        schedule,
        deadline=deadline,
    )
    if run.stopped == "done" and not run.converged:
        warn_not_converged(
            f"ga stopped at max_inner={max_inner} in its last stage with change "
            f"{run.change:.2e} > tol={tol:g}; raise max_inner or lower decay."
        )
    X_hard = hard_projection(problem, run.X)
    return finish(
        problem,
        X_hard,
        soft=run.X,
        n_iter=run.n_iter,
        converged=run.converged,
        start=start,
        info={"stages": schedule.stages, "stopped": run.stopped},
    )
