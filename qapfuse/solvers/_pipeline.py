"""The default pipeline ("auto"): continuous starts (IPFP) refined by robust tabu search."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Any

import numpy as np

from .. import backend
from .._validation import Option, validate_options
from ..errors import ConvergenceWarning
from ..problem import Problem
from ._common import check_problem, hard_score, initial_soft, random_soft
from ._ga import ga
from ._ipfp import ipfp
from ._local_runner import LocalSearch, deadline_in, local_search_form, share_deadline, warm_up
from .result import MatchResult, make_result

__all__ = ["OPTIONS", "auto"]

_log = logging.getLogger(__name__)

OPTIONS: dict[str, Option] = {
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}

#: Default wall-clock budget of :func:`auto`, in seconds.
DEFAULT_TIME_LIMIT = 2.0

# IPFP gets at most this share of a round, estimated from n^3 per step before it runs.
_IPFP_SHARE = 0.15
_IPFP_SECONDS_PER_N3 = 5e-9  # conservative (measured 1-3e-9 s * n^3 + ~1 ms per step)
# Rounds after the first start at random when fewer IPFP steps fit.
_IPFP_MIN_STEPS = 3


def _rounds(time_limit: float) -> int:
    """Tabu rounds for a budget: 1 under 0.5 s, 2 up to 2 s, then ~one per second, at most 8."""
    if time_limit < 0.5:
        return 1
    return max(2, min(8, round(time_limit)))


def _ipfp_steps(n: int, batch: int, seconds: float) -> int:
    """IPFP steps that fit in `seconds` (0: skip IPFP, start at random)."""
    per_step = batch * (_IPFP_SECONDS_PER_N3 * float(n) ** 3 + 1e-3)
    return int(min(50, math.floor(seconds / per_step)))


@validate_options(OPTIONS)
def auto(
    problem: Problem,
    *,
    time_limit: float | None = None,
    x0: Any = None,
    rng: Any = None,
) -> MatchResult:
    r"""The default QAP pipeline: continuous starts refined by robust tabu search, with restarts.

    The budget is split into ``R`` rounds (``R = 1`` under 0.5 s, 2 up to 2 s, then about one
    per second, at most 8). Each round takes a start, runs robust tabu search
    (:func:`~qapfuse.solvers.tabu`) from it until the round's deadline, and the best
    matching over all rounds is kept (per instance):

    * round 1 starts from `x0` if given, else from IPFP [2]_ (Frank--Wolfe with Hungarian
      steps) from the uniform matrix: at least one step, however short the budget, so the
      result is never worse than this rounded continuous start (tabu search keeps the best
      matching it has seen, its start included);
    * later rounds start from IPFP run from a random soft start (a random permutation mixed
      with the uniform matrix), which gives diverse, reasonable starts.

    IPFP gets the steps that fit in 15% of a round (about ``1 ms + 5e-9 n^3`` s per step, at
    most 50). In rounds after the first it is skipped (random permutation instead) when fewer
    than 3 steps fit, e.g. ``n > 170`` at ``time_limit=1``.
    On QAPLIB, IPFP starts helped tabu search on the structured ``tai*b`` instances and did
    not hurt elsewhere, while GA starts cost seconds at ``n >= 25`` for no better tabu
    results, so GA is not used when tabu search applies.

    Problems that local search cannot take (neither Koopmans--Beckmann nor small enough for a
    dense ``K``; see :func:`~qapfuse.solvers.tabu`) get graduated assignment
    (:func:`~qapfuse.solvers.ga`) alone, which does not follow `time_limit`.

    Parameters
    ----------
    problem : Problem
        Any problem; batched problems run IPFP on the whole batch and tabu search per
        instance (the time split evenly).
    time_limit : float > 0, optional
        Wall-clock budget in seconds. Default 2.0. Numba compilation on the first call of a
        process is not counted. Rounds stop at their share of the budget; tabu search checks
        the clock about every 10 ms. IPFP steps (at least one in round 1) and the O(n^3)
        set-up of each tabu round are not interrupted, so very short limits can be exceeded
        by a few milliseconds (n = 256: ~10-50 ms).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start of the first round (hard or soft), in the problem's library.
    rng : None, int, numpy.random.Generator or torch.Generator, optional
        Random starts and tabu tenures. Results depend on the time budget too.

    Returns
    -------
    MatchResult
        Best ``X`` of shape (n1, n2) or (b, n1max, n2max) in the problem's library, dtype and
        device; ``soft`` is None; ``n_iter`` sums the tabu iterations; ``converged`` is True
        when each returned matching is verified to be a swap-local optimum.
        ``info``: ``"rounds"`` (rounds run), ``"starts"`` (kind of each round's start),
        ``"form"`` (``"kb"``, ``"dense"`` or ``"ga"``).

    References
    ----------
    .. [1] É. D. Taillard, "Robust taboo search for the quadratic assignment problem",
           Parallel Computing 17(4-5), 443-455, 1991. doi:10.1016/S0167-8191(05)80147-4
    .. [2] M. Leordeanu, M. Hebert, R. Sukthankar, "An integer projected fixed point method
           for graph matching and MAP inference", NeurIPS 2009.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import Problem, solve
    >>> rng = np.random.default_rng(0)
    >>> A, B = rng.integers(0, 9, (12, 12)), rng.integers(0, 9, (12, 12))
    >>> res = solve(Problem.koopmans_beckmann(A, B, sense="min"), "auto", time_limit=0.2)
    >>> res.X.shape, res.info["rounds"], res.info["starts"]
    ((12, 12), 1, ['ipfp'])
    """
    start = time.perf_counter()
    caller = "auto"
    check_problem(problem, caller)
    T = DEFAULT_TIME_LIMIT if time_limit is None else float(time_limit)
    gen = backend.rng_from(rng, caller=caller)
    if x0 is not None:
        initial_soft(problem, x0, caller)  # validate before any work

    form = local_search_form(problem)
    if form is None:
        res = ga(problem, x0=x0)
        info = {**res.info, "form": "ga", "rounds": 1, "starts": ["ga"]}
        return dataclasses.replace(res, info=info, time=time.perf_counter() - start)

    runner = LocalSearch(problem, caller)
    warm_up()  # compile outside the budget
    deadline = deadline_in(T)
    R = _rounds(T)
    nmax = max(int(problem.n2.max()), 1) if problem.batch else 1
    best: list[Any] = [None] * problem.batch  # the best tabu run per instance so far
    starts: list[str] = []
    n_iter = 0
    for rnd in range(R):
        if rnd > 0 and time.perf_counter() >= deadline:
            break
        round_end = share_deadline(deadline, rnd, R)
        steps = _ipfp_steps(nmax, problem.batch, _IPFP_SHARE * (round_end - time.perf_counter()))
        perms, kind = _round_start(runner, rnd, steps, x0, gen)
        starts.append(kind)
        for k, run in enumerate(runner.tabu(perms, max_iter=None, deadline=round_end, gen=gen)):
            n_iter += run.n_iter
            if best[k] is None or run.best < best[k].best:
                best[k] = run
        if _log.isEnabledFor(logging.INFO):  # progress for `qapfuse -v solve` (one rescoring)
            X = runner.to_X([run.best_p for run in best])
            obj = np.atleast_1d(problem.objective_from_score(hard_score(problem, X)))
            _log.info(
                "auto: round %d/%d (%s start) done at %.2f of %.2f s: best objective %s",
                rnd + 1,
                R,
                kind,
                time.perf_counter() - start,
                T,
                ", ".join(f"{v:.10g}" for v in obj),
            )
    return make_result(
        problem,
        runner.to_X([run.best_p for run in best]),
        soft=None,
        n_iter=n_iter,
        converged=all(run.best_is_local for run in best),
        start=start,
        info={"form": form, "rounds": len(starts), "starts": starts},
    )


def _round_start(
    runner: LocalSearch, rnd: int, steps: int, x0: Any, gen: np.random.Generator
) -> tuple[list[np.ndarray], str]:
    """Start permutations of round `rnd` and their kind (``info["starts"]``).

    Round 0 always has a continuous start (`x0`, or at least one IPFP step from the uniform
    matrix, rounded), however short the budget: tabu search only improves on its start, so
    the result is never worse than it. Later rounds use IPFP from a random soft start when
    `steps` >= ``_IPFP_MIN_STEPS`` fit in their share, else a random permutation.
    """
    problem = runner.problem
    if rnd == 0 and x0 is not None:
        return runner.start_perms(x0, gen), "x0"
    if rnd > 0 and steps < _IPFP_MIN_STEPS:
        return runner.start_perms(None, gen), "random"
    init = None if rnd == 0 else random_soft(problem, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a start, not an answer
        res = ipfp(problem, x0=init, max_iter=max(steps, 1), tol=1e-3)
    H = backend.to_numpy(res.X)
    kind = "ipfp" if rnd == 0 else "ipfp-random"
    return runner.perms_from_hard(H if problem.batched else H[None]), kind
