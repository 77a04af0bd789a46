"""Solvers and the one entry point :func:`solve`."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backend
from .._validation import Option, check_choice, check_options, check_scalar, options_of
from ..errors import ConvergenceWarning
from ..problem import Problem
from . import _local
from ._common import check_problem, kicked, random_soft
from ._ga import ga
from ._ipfp import ipfp
from ._lap import hungarian, sinkhorn
from ._local import tabu, two_opt
from ._partial import match_with_outliers, partial_hungarian, sinkhorn_slack, sinkhorn_slack_sparse
from ._pipeline import auto
from ._rrwm import rrwm
from ._sm import sm
from .multi import MultiMatchResult, consistency, gamgm, gamgm_affinity, synchronize
from .result import MatchResult

_log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "MatchResult",
    "MultiMatchResult",
    "auto",
    "consistency",
    "ga",
    "gamgm",
    "gamgm_affinity",
    "hungarian",
    "ipfp",
    "match_with_outliers",
    "partial_hungarian",
    "rrwm",
    "sinkhorn",
    "sinkhorn_slack",
    "sinkhorn_slack_sparse",
    "sm",
    "solve",
    "synchronize",
    "tabu",
    "two_opt",
]


@dataclass(frozen=True)
class _Method:
    func: Callable[..., MatchResult]
    options: Mapping[str, Option]  # the keyword-only parameters of func
    continuous: bool = False  # a continuous solver: warmed up on a tiny problem when timed

    @property
    def timed(self) -> bool:
        return "time_limit" in self.options

    @property
    def random(self) -> bool:
        return "rng" in self.options


METHODS: dict[str, _Method] = {
    "auto": _Method(auto, options_of(auto)),
    "ga": _Method(ga, options_of(ga), continuous=True),
    "rrwm": _Method(rrwm, options_of(rrwm), continuous=True),
    "ipfp": _Method(ipfp, options_of(ipfp), continuous=True),
    "sm": _Method(sm, options_of(sm), continuous=True),
    "two_opt": _Method(two_opt, options_of(two_opt)),
    "tabu": _Method(tabu, options_of(tabu)),
}
REFINERS = ("two_opt", "tabu")


def solve(
    problem: Problem,
    method: str = "ga",
    *,
    refine: str | None = None,
    restarts: int = 1,
    time_limit: float | None = None,
    rng: Any = None,
    **options: Any,
) -> MatchResult:
    r"""Solve a (batch of) Lawler QAP(s) ``max vec(X)^T K vec(X)`` with the named method.

    Parameters
    ----------
    problem : Problem
        See :class:`qapfuse.Problem`.
    method : str
        One of ``"auto"`` (the default QAP pipeline: a continuous start refined by tabu
        search), ``"ga"``, ``"rrwm"``, ``"ipfp"``, ``"sm"``, ``"two_opt"``, ``"tabu"``.
    refine : {"two_opt", "tabu"}, optional
        Local search applied to each result of `method`.
    restarts : int >= 1
        Runs of `method` (+ `refine`): the first from `x0` (or the method's default start),
        the others from random starts drawn from `rng`; with `refine`, each later local search
        starts from the best matching so far after a few random moves (iterated local
        search). The best per instance is kept.
    time_limit : float > 0, optional
        Wall-clock budget in seconds for the whole call: no new restart begins after it, and
        every method that takes a ``time_limit`` (see its docstring) gets an equal share of
        what is left per remaining run (half of it when `refine` follows), checked between its
        iterations. The call returns shortly after the limit: the last iteration, the
        final rounding and scoring are not cut short.
    rng : None, int, numpy.random.Generator or torch.Generator
        Source of the random starts, and of the method's own randomness for the methods that
        draw (``auto``, ``two_opt``, ``tabu``); the deterministic ones do not take it.
    **options
        Options of `method` (see its docstring). Unknown names raise ``TypeError``.

    Returns
    -------
    MatchResult
        Best result; ``info["restarts"]`` counts the runs, ``n_iter`` sums their iterations.
        With `refine`, the method's result is only a start for the local search, so its
        ``ConvergenceWarning`` is not raised; ``info["start_converged"]`` records whether every
        start met its tolerance.

    Examples
    --------
    Brute force confirms the optimum that GA refined by tabu search finds on a tiny problem
    (2-opt alone stops at a local optimum here):

    >>> import itertools, numpy as np
    >>> from qapfuse import Problem, solve
    >>> rng = np.random.default_rng(0)
    >>> A, B = rng.random((5, 5)), rng.random((5, 5))
    >>> p = Problem.koopmans_beckmann(A, B, sense="min")
    >>> res = solve(p, "ga", refine="tabu", rng=0)
    >>> best = min((A * B[np.ix_(q, q)]).sum() for q in map(list, itertools.permutations(range(5))))
    >>> bool(np.isclose(res.objective, best))
    True
    """
    check_problem(problem, "solve")
    check_choice(method, "method", "solve", METHODS)
    if refine is not None:
        check_choice(refine, "refine", "solve", REFINERS)
    check_scalar(restarts, "restarts", "solve", integer=True, low=1, low_inclusive=True)
    if time_limit is not None:
        check_scalar(time_limit, "time_limit", "solve")
    spec = METHODS[method]
    caller = f"solve(method={method!r})"
    if "time_limit" in options:
        raise TypeError(f"{caller}: pass time_limit to solve itself, not as a method option.")
    opts = check_options(options, spec.options, caller)
    gen = backend.rng_from(rng, caller="solve")
    # Compile / load the Numba kernels before the clock starts (a first call in a process can
    # take longer than a short time limit).
    if method in ("auto", *REFINERS) or refine is not None:
        _local.warm_up()
    if spec.continuous and time_limit is not None:
        _warm_up(spec.func, problem)
    start = time.perf_counter()

    best = None
    n_iter, runs, starts_converged = 0, 0, True
    for run in range(restarts):
        elapsed = time.perf_counter() - start
        if run > 0 and time_limit is not None and elapsed >= time_limit:
            break
        remaining = None if time_limit is None else max(time_limit - elapsed, 1e-3)
        run_opts = dict(opts)
        if run > 0:
            run_opts["x0"] = random_soft(problem, gen)
        if spec.random:
            run_opts["rng"] = gen
        if spec.timed and remaining is not None:
            # Equal shares for the runs left; with a refiner, half of a share each.
            share = remaining / (restarts - run) / (1 if refine is None else 2)
            run_opts["time_limit"] = max(share, 1e-3)
        # Solver warnings are re-raised below so that they point at the caller of solve.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = spec.func(problem, **run_opts)
            if refine is not None:
                # The result is only a start: the local search decides the answer.
                starts_converged &= res.converged
                caught[:] = [w for w in caught if not issubclass(w.category, ConvergenceWarning)]
                used = time.perf_counter() - start
                left = None if time_limit is None else (time_limit - used) / (restarts - run)
                # Later runs start the local search from a kicked copy (iterated local search):
                # deterministic methods (ga, sm) return the same point from any start.
                x_ref = res.X if run == 0 else kicked(problem, best.X, gen)
                res = METHODS[refine].func(
                    problem, x0=x_ref, time_limit=None if left is None else max(left, 1e-3), rng=gen
                )
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=2)
        n_iter += res.n_iter
        runs += 1
        best = res if best is None else _better(best, res, problem)
        if restarts > 1 and _log.isEnabledFor(logging.INFO):  # progress for `qapfuse -v solve`
            _log.info(
                "solve(%s%s): run %d/%d done at %.2f s: objective %s, best so far %s",
                method,
                "" if refine is None else f" + {refine}",
                run + 1,
                restarts,
                time.perf_counter() - start,
                _fmt(res.objective),
                _fmt(best.objective),
            )
    assert best is not None  # restarts >= 1 guarantees one run
    info = dict(best.info)
    info["restarts"] = runs
    if refine is not None:
        info["start_converged"] = starts_converged
    return MatchResult(
        X=best.X,
        soft=best.soft,
        score=best.score,
        objective=best.objective,
        n_iter=n_iter,
        converged=best.converged,
        time=time.perf_counter() - start,
        info=info,
    )


def _warm_up(func: Callable[..., MatchResult], problem: Problem) -> None:
    """Run `func` once on a 2 x 2 problem in `problem`'s library, dtype and device."""
    xp = problem.xp
    eye = xp.eye(2, dtype=problem.dtype, device=problem.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        func(Problem.koopmans_beckmann(eye, eye))


def _fmt(objective: Any) -> str:
    """An objective (one value or one per instance) for a log line."""
    return ", ".join(f"{v:.10g}" for v in np.atleast_1d(backend.to_numpy(objective)))


def _better(a: MatchResult, b: MatchResult, problem: Problem) -> MatchResult:
    """Per-instance best of two results (by score)."""
    if not problem.batched:
        return b if b.score > a.score else a
    take_b = np.asarray(b.score) > np.asarray(a.score)
    if not take_b.any():
        return a
    xp = problem.xp
    sel = backend.asarray_on(take_b[:, None, None], xp=xp, device=problem.device)
    X = xp.where(sel, b.X, a.X)
    soft = None if a.soft is None or b.soft is None else xp.where(sel, b.soft, a.soft)
    return MatchResult(
        X=X,
        soft=soft,
        score=np.where(take_b, b.score, a.score),
        objective=np.where(take_b, b.objective, a.objective),
        n_iter=a.n_iter,
        converged=a.converged and b.converged,
        time=a.time,
        info=a.info,
    )
