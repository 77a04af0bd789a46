r"""Local search for QAPs over permutations: 2-opt and robust tabu search (Numba).

This module holds the public solvers (:func:`two_opt`, :func:`tabu`) and their options. Both
are written on :class:`~qapfuse.solvers._local_runner.LocalSearch`, the small internal runner
that the default pipeline (:func:`qapfuse.solvers.auto`) uses too. The minimisation form, the
O(n) swap delta and its O(1) update (the "module notes" cited below) are derived in
:mod:`qapfuse.solvers._local_kernels`, with the Numba kernels.

References
----------
.. [1] É. D. Taillard, "Robust taboo search for the quadratic assignment problem",
       Parallel Computing 17(4-5), 443-455, 1991. doi:10.1016/S0167-8191(05)80147-4
.. [2] R. E. Burkard, E. Çela, P. M. Pardalos, L. S. Pitsoulis, "The quadratic assignment
       problem", Handbook of Combinatorial Optimization, 1998 (2-opt / pairwise exchange).
"""

from __future__ import annotations

import time
from typing import Any

from .. import backend
from .._validation import Option, check_options, validate_options, warn_not_converged
from ..problem import Problem
from ._common import check_problem
from ._local_runner import LocalSearch, deadline_in, warm_up
from .result import MatchResult, make_result

__all__ = ["OPTIONS_TABU", "OPTIONS_TWO_OPT", "tabu", "two_opt"]

OPTIONS_TWO_OPT: dict[str, Option] = {
    "strategy": Option("choice", choices=("first", "best")),
    "max_iter": Option("int", low=1, allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}

OPTIONS_TABU: dict[str, Option] = {
    "max_iter": Option("int", low=1, allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "tenure": Option("float", low=0, low_inclusive=False, allow_none=True),
    "aspiration": Option("int", low=1, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}


def _check_common(
    problem: Problem, caller: str, options: dict[str, Any], spec: dict[str, Option]
) -> dict[str, Any]:
    check_problem(problem, caller)
    return check_options(options, spec, caller)


# ----------------------------------------------------------------------------------------------
# Public solvers
# ----------------------------------------------------------------------------------------------


@validate_options(OPTIONS_TWO_OPT)
def two_opt(
    problem: Problem,
    *,
    x0: Any = None,
    strategy: str = "first",
    max_iter: int | None = None,
    time_limit: float | None = None,
    rng: Any = None,
) -> MatchResult:
    r"""Pairwise-exchange (2-opt) local search: maximise ``vec(X)^T K vec(X)`` over matchings.

    From a start permutation, repeatedly swap the columns of two rows while that improves the
    score, until no swap improves (a local optimum). The delta of a swap costs O(n) for
    Koopmans--Beckmann problems (``score = w <X, A X B^T> + <L, X>``) and for dense Lawler
    ``K``; see the module notes. Kernels are compiled by Numba on first use (cached on disk);
    compilation is not counted against `time_limit`.

    Parameters
    ----------
    problem : Problem
        Koopmans--Beckmann problem (optionally with linear/constant terms), or any problem whose
        dense ``K`` of shape (b, n1max*n2max, n1max*n2max) fits in ``DENSE_MAX_BYTES``.
        Batched problems are searched one instance at a time; ``n1 < n2`` adds dummy rows.
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start, hard or soft (rounded by the Hungarian method), in the problem's library.
        Default: a random permutation drawn from `rng`.
    strategy : {"first", "best"}
        ``"first"``: take the first improving swap of a cyclic scan (O(n) per evaluated swap).
        ``"best"``: take the best swap of all, keeping a matrix of all swap deltas updated in
        O(n^2) per move.
    max_iter : int >= 1, optional
        Most swaps (moves) per instance. Default: no limit.
    time_limit : float > 0, optional
        Wall-clock seconds for the whole call (split evenly over the instances left).
    rng : None, int, numpy.random.Generator or torch.Generator, optional
        Source of the random start.

    Returns
    -------
    MatchResult
        ``X`` of shape (n1, n2) or (b, n1max, n2max) in the problem's library, dtype and
        device; ``soft`` is None; ``n_iter`` counts swaps; ``converged`` is True when every
        instance reached a local optimum. ``info["form"]`` is ``"kb"`` or ``"dense"``.

    Raises
    ------
    TypeError
        If the problem is neither Koopmans--Beckmann nor small enough for a dense ``K``.

    References
    ----------
    .. [1] R. E. Burkard, E. Çela, P. M. Pardalos, L. S. Pitsoulis, "The quadratic assignment
           problem", Handbook of Combinatorial Optimization, 1998.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import Problem, two_opt
    >>> rng = np.random.default_rng(0)
    >>> p = Problem.koopmans_beckmann(rng.random((6, 6)), rng.random((6, 6)), sense="min")
    >>> res = two_opt(p, rng=0)
    >>> res.converged, res.X.shape
    (True, (6, 6))
    """
    start = time.perf_counter()
    caller = "two_opt"
    _check_common(
        problem,
        caller,
        dict(strategy=strategy, max_iter=max_iter, time_limit=time_limit),
        OPTIONS_TWO_OPT,
    )
    gen = backend.rng_from(rng, caller=caller)
    runner = LocalSearch(problem, caller)
    perms0 = runner.start_perms(x0, gen)
    warm_up()
    runs = runner.two_opt(
        perms0, strategy=strategy, max_iter=max_iter, deadline=deadline_in(time_limit)
    )
    moves = sum(run.moves for run in runs)
    local = all(run.local for run in runs)
    if not local:
        knob = "max_iter" if time_limit is None else "time_limit (or max_iter)"
        warn_not_converged(
            f"two_opt stopped after {moves} swaps before reaching a local optimum; raise {knob}."
        )
    return make_result(
        problem,
        runner.to_X([run.p for run in runs]),
        soft=None,
        n_iter=moves,
        converged=local,
        start=start,
        info={"form": runner.form, "strategy": strategy},
    )


@validate_options(OPTIONS_TABU)
def tabu(
    problem: Problem,
    *,
    x0: Any = None,
    max_iter: int | None = None,
    time_limit: float | None = None,
    tenure: float | None = None,
    aspiration: int | None = None,
    rng: Any = None,
) -> MatchResult:
    r"""Robust tabu search (Taillard 1991): maximise ``vec(X)^T K vec(X)`` over matchings.

    Every iteration takes the best swap of two rows that is not tabu, even when it makes the
    score worse, and the best matching seen is returned. The deltas of all ``n(n-1)/2`` swaps
    are kept in a matrix; after a move the deltas of swaps disjoint from it are updated in
    O(1) each and the others recomputed in O(n), so an iteration costs O(n^2) (module notes).

    * **Tabu rule.** When rows ``r, s`` swap, each row's old column is recorded. A swap is tabu
      if it would put *both* rows back into columns they left within the last ``t``
      iterations; ``t`` is drawn uniformly from ``[0.9 tenure, 1.1 tenure]`` and re-drawn
      every ``2 * 1.1 * tenure`` iterations.
    * **Aspiration.** A tabu swap that gives a new best score is allowed. A swap that puts
      both rows into columns they have not left for `aspiration` iterations is forced
      (diversification).

    Parameters
    ----------
    problem : Problem
        Koopmans--Beckmann problem (optionally with linear/constant terms), or any problem whose
        dense ``K`` fits in ``DENSE_MAX_BYTES``. Batched problems are searched one instance at
        a time; ``n1 < n2`` adds dummy rows (``n = n2``).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start, hard or soft (rounded by the Hungarian method). Default: random permutation.
    max_iter : int >= 1, optional
        Iterations per instance. Default, when `time_limit` is not given either,
        ``min(1000 n, 10^9 / n^2)`` (``_local_runner.default_tabu_iterations``: 1000 n up to
        n = 100, about 1-10 s per instance); with only `time_limit`, no iteration limit.
    time_limit : float > 0, optional
        Wall-clock seconds for the whole call, split evenly over the instances left; checked
        every ~10 ms. Numba compilation (first call) is not counted.
    tenure : float > 0, optional
        Mean tabu tenure in iterations. Default ``n``.
    aspiration : int >= 1, optional
        Long-term aspiration horizon. Default ``5 * n * n``.
    rng : None, int, numpy.random.Generator or torch.Generator, optional
        Start and tenure draws. With `max_iter` (and no `time_limit`) the same seed gives the
        same answer.

    Returns
    -------
    MatchResult
        ``X`` (best matching seen) of shape (n1, n2) or (b, n1max, n2max) in the problem's
        library, dtype and device; ``n_iter`` sums the iterations; ``converged`` is True when
        every returned matching is verified to be a local optimum of the swap neighbourhood
        (tabu search has no other stopping criterion than its budget).

    Raises
    ------
    TypeError
        If the problem is neither Koopmans--Beckmann nor small enough for a dense ``K``.

    References
    ----------
    .. [1] É. D. Taillard, "Robust taboo search for the quadratic assignment problem",
           Parallel Computing 17(4-5), 443-455, 1991. doi:10.1016/S0167-8191(05)80147-4

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import Problem, solve
    >>> rng = np.random.default_rng(1)
    >>> A, B = rng.integers(0, 9, (7, 7)), rng.integers(0, 9, (7, 7))
    >>> p = Problem.koopmans_beckmann(A, B, sense="min")
    >>> res = solve(p, "tabu", rng=0)
    >>> import itertools
    >>> best = min((A * B[np.ix_(q, q)]).sum() for q in map(list, itertools.permutations(range(7))))
    >>> bool(res.objective == best)
    True
    """
    start = time.perf_counter()
    caller = "tabu"
    _check_common(
        problem,
        caller,
        dict(max_iter=max_iter, time_limit=time_limit, tenure=tenure, aspiration=aspiration),
        OPTIONS_TABU,
    )
    gen = backend.rng_from(rng, caller=caller)
    runner = LocalSearch(problem, caller)
    perms0 = runner.start_perms(x0, gen)
    warm_up()
    runs = runner.tabu(
        perms0,
        max_iter=max_iter,
        deadline=deadline_in(time_limit),
        gen=gen,
        tenure=tenure,
        aspiration=aspiration,
    )
    return make_result(
        problem,
        runner.to_X([run.best_p for run in runs]),
        soft=None,
        n_iter=sum(run.n_iter for run in runs),
        converged=all(run.best_is_local for run in runs),
        start=start,
        info={"form": runner.form},
    )
