r"""Partial matching with outliers on both sides: slack (dustbin) rows and columns.

A node of either graph may stay unmatched. The assignment polytope is augmented with one
slack row and one slack column (Gold & Rangarajan's slack variables [1]_, SuperGlue's
dustbins [2]_): row ``i`` sends its unit of mass to a node of graph 2 or to the slack column,
column ``a`` receives one unit from a node of graph 1 or from the slack row; the slack row
and column have capacities ``n2`` and ``n1``. Every slack entry (the slack-slack corner
included) scores `slack`; since the corner carries exactly the matched mass, the objective
is ``<P, S - slack>`` plus a constant: a pair is worth matching only when its score exceeds
`slack`.

* :func:`sinkhorn_slack` -- entropic partial assignment with slack (log domain, batched);
* :func:`sinkhorn_slack_sparse` -- the same on a sparse support (the candidate pairs of
  ``graph_matching_problem(..., candidates=k)``), numpy, Numba;
* :func:`match_with_outliers` -- graduated assignment over the augmented polytope, rounded by
  a partial Hungarian step; the result's ``info`` says which nodes are matched. On a problem
  built with candidate pairs it runs on that support only.

References
----------
.. [1] S. Gold, A. Rangarajan, "A graduated assignment algorithm for graph matching",
       IEEE TPAMI 18(4), 1996. doi:10.1109/34.491619
.. [2] P.-E. Sarlin, D. DeTone, T. Malisiewicz, A. Rabinovich, "SuperGlue: learning feature
       matching with graph neural networks", CVPR 2020.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import backend
from .._validation import (
    Option,
    check_finite,
    check_options,
    check_scalar,
    validate_options,
    warn_not_converged,
)
from ..backend import Array
from ..problem import Problem
from ._anneal import AnnealResult, Schedule, anneal
from ._common import check_problem, finish, initial_soft
from ._lap import _valid_mask
from ._sinkhorn import Sinkhorn
from .result import MatchResult

__all__ = [
    "OPTIONS",
    "match_with_outliers",
    "partial_hungarian",
    "sinkhorn_slack",
    "sinkhorn_slack_sparse",
]

OPTIONS: dict[str, Option] = {
    "slack": Option("float"),
    "tau0": Option("float", low=0, low_inclusive=False),
    "tau_min": Option("float", low=0, low_inclusive=False),
    "decay": Option("float", low=0, high=1, low_inclusive=False),
    "max_inner": Option("int", low=1),
    "sk_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
    "x0": Option("array", allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
}


def sinkhorn_slack(
    S: Array,
    n1: Any = None,
    n2: Any = None,
    *,
    slack: float = 0.0,
    tau: float = 1.0,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> tuple[Array, Array, Array]:
    r"""Entropic partial assignment in which every node may stay unmatched.

    Sinkhorn scaling of ``exp(S / tau)`` augmented with a slack column and row (capacities
    ``n2`` and ``n1``) whose entries all score `slack`: the entropic version of
    ``max <P, S - slack>`` over ``P >= 0`` with row and column sums ``<= 1``.

    Parameters
    ----------
    S : array of shape (n1, n2) or (b, n1max, n2max)
        Scores, any array library; sizes need not be ordered (``n1 > n2`` is fine).
    n1, n2 : int or array of shape (b,), optional
        Valid sizes per instance.
    slack : float
        Score of leaving a node unmatched (same units as `S`).
    tau : float > 0
        Temperature.
    max_iter : int >= 1
    tol : float > 0
        Largest row-marginal error at which to stop (checked every 5 iterations).

    Returns
    -------
    P : array like `S`
        Soft matching (rows and columns sum to at most 1).
    unmatched1 : array of shape (n1,) or (b, n1max)
        Mass of each graph-1 node on the slack column (``1 - P.sum(1)``).
    unmatched2 : array of shape (n2,) or (b, n2max)
        Mass of each graph-2 node on the slack row.

    References
    ----------
    .. [1] P.-E. Sarlin et al., "SuperGlue", CVPR 2020 (dustbin rows and columns).

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse.solvers import sinkhorn_slack
    >>> S = np.array([[1.0, 0.0], [0.0, -1.0]])
    >>> P, u1, u2 = sinkhorn_slack(S, slack=0.0, tau=0.1, max_iter=1000)
    >>> np.round(P, 1), np.round(u1, 1)
    (array([[1., 0.],
           [0., 0.]]), array([0., 1.]))
    """
    caller = "sinkhorn_slack"
    from ._lap import _scores_and_sizes

    xp = backend.namespace_of(S, name="S")
    check_scalar(slack, "slack", caller, low=None)
    check_scalar(tau, "tau", caller)
    check_scalar(max_iter, "max_iter", caller, integer=True, low=1, low_inclusive=True)
    check_scalar(tol, "tol", caller)
    S, batched, a1, a2 = _scores_and_sizes(S, n1, n2, caller, xp=xp)
    check_finite(S, "S", xp=xp)
    project = Sinkhorn(
        _valid_mask(a1, a2, S.shape[1], S.shape[2]),
        slack=(a1, a2),
        max_iter=max_iter,
        tol=tol,
        check_every=5,
    )
    P = project(S, tau, slack=slack)
    u1, u2, err = project.unmatched1, project.unmatched2, project.err
    if err > tol:
        warn_not_converged(
            f"sinkhorn_slack stopped at max_iter={max_iter} with marginal error {err:.2e} > "
            f"tol={tol:g}; raise max_iter or tau."
        )
    if not batched:
        return P[0, ...], u1[0, ...], u2[0, ...]
    return P, u1, u2


def sinkhorn_slack_sparse(
    values: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    n1: int,
    n2: int,
    *,
    slack: float = 0.0,
    tau: float = 1.0,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Entropic partial assignment with slack on a sparse support (numpy).

    :func:`sinkhorn_slack` for scores given only at the pairs ``(rows[e], cols[e])``; every
    other pair of the ``n1 x n2`` block is excluded (score ``-inf``). Each half-step costs
    ``O(m + n1 + n2)`` for ``m`` support entries (Numba; the scaling form when the scores
    span less than 700, else the log domain) instead of ``O(n1 n2)``.

    Parameters
    ----------
    values : float array of shape (m,)
        Scores of the support pairs.
    rows, cols : int array of shape (m,)
        Node of graph 1 and of graph 2 of each pair (no duplicates), in ``[0, n1)`` and
        ``[0, n2)``.
    n1, n2 : int >= 0
        Node counts.
    slack, tau, max_iter, tol :
        As in :func:`sinkhorn_slack`.

    Returns
    -------
    p : float64 array of shape (m,)
        Soft matching on the support (rows and columns sum to at most 1).
    unmatched1 : float64 array of shape (n1,)
        Mass of each graph-1 node on the slack column.
    unmatched2 : float64 array of shape (n2,)
        Mass of each graph-2 node on the slack row.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse.solvers import sinkhorn_slack_sparse
    >>> p, u1, u2 = sinkhorn_slack_sparse(np.array([1.0, -1.0]), np.array([0, 1]),
    ...                                   np.array([0, 1]), 2, 2, tau=0.1, max_iter=5000)
    >>> np.round(p, 1), np.round(u1, 1)
    (array([1., 0.]), array([0., 1.]))
    """
    caller = "sinkhorn_slack_sparse"
    check_scalar(slack, "slack", caller, low=None)
    check_scalar(tau, "tau", caller)
    check_scalar(max_iter, "max_iter", caller, integer=True, low=1, low_inclusive=True)
    check_scalar(tol, "tol", caller)
    check_scalar(n1, "n1", caller, integer=True, low=0, low_inclusive=True)
    check_scalar(n2, "n2", caller, integer=True, low=0, low_inclusive=True)
    L, r, c = _support(values, rows, cols, n1, n2, caller)
    project = Sinkhorn.on_support(r, c, n1, n2, max_iter=max_iter, tol=tol)
    p = project(L, tau, slack=slack)
    if project.err > tol:
        warn_not_converged(
            f"{caller} stopped at max_iter={max_iter} with marginal error {project.err:.2e} > "
            f"tol={tol:g}; raise max_iter or tau."
        )
    return p, project.unmatched1, project.unmatched2


def _support(
    values: Any, rows: Any, cols: Any, n1: int, n2: int, caller: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 scores and int64 indices of a sparse support."""
    arrs = []
    for x, name in ((values, "values"), (rows, "rows"), (cols, "cols")):
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"The {name!r} parameter of {caller} must be a numpy array; got {type(x).__name__}."
            )
        if x.ndim != 1 or x.shape[0] != values.shape[0]:
            raise ValueError(
                f"`values`, `rows` and `cols` in {caller} must be 1-D of one length; got "
                f"shapes {values.shape}, {rows.shape}, {cols.shape}."
            )
        arrs.append(x)
    L = arrs[0].astype(np.float64)
    if not np.all(np.isfinite(L)):
        raise ValueError(f"`values` in {caller} contains NaN or Inf.")
    r, c = arrs[1].astype(np.int64), arrs[2].astype(np.int64)
    for x, name, n in ((r, "rows", n1), (c, "cols", n2)):
        if x.size and (x.min() < 0 or x.max() >= n):
            raise ValueError(
                f"`{name}` in {caller} must lie in [0, {n}); got {x.min()}..{x.max()}."
            )
    return L, r, c


def partial_hungarian(W: np.ndarray) -> np.ndarray:
    """Best partial matching of a weight matrix ``W`` (n1, n2): only positive pairs are kept.

    A maximum-weight matching that may leave nodes unmatched equals the assignment of
    ``max(W, 0)`` with its zero-weight pairs dropped.

    Returns
    -------
    X : float64 array of shape (n1, n2), 0/1
    """
    X = np.zeros(W.shape, dtype=np.float64)
    if W.size == 0:
        return X
    Wp = np.maximum(W, 0.0)
    rows, cols = linear_sum_assignment(Wp, maximize=True)
    keep = W[rows, cols] > 0
    X[rows[keep], cols[keep]] = 1.0
    return X


def _normalise_rows(G: Array, n1: np.ndarray, *, xp: Any) -> Array:
    """Scale each instance of `G` (b, r, c) so that its median row maximum is 1.

    The typical node's best score is then 1 whatever the problem size, so `slack` is a
    fraction of it (a global maximum would be set by one extreme row). The row maxima
    (``b x r`` numbers) are read on the host.
    """
    top = backend.to_numpy(xp.max(G, axis=2)).astype(np.float64)
    scale = np.ones((G.shape[0], 1, 1))
    for k in range(G.shape[0]):
        m = float(np.median(top[k, : int(n1[k])])) if n1[k] else 0.0
        if not m > 0:
            m = float(np.max(np.abs(top[k]))) if top[k].size else 0.0
        scale[k] = m if m > 0 else 1.0
    return G / xp.astype(backend.asarray_on(scale, xp=xp, device=backend.device(G)), G.dtype)


@validate_options(OPTIONS)
def match_with_outliers(
    problem: Problem,
    *,
    slack: float = 0.2,
    tau0: float = 0.5,
    tau_min: float = 0.01,
    decay: float = 0.6,
    max_inner: int = 10,
    sk_iter: int = 50,
    tol: float = 1e-3,
    x0: Any = None,
    time_limit: float | None = None,
) -> MatchResult:
    r"""Graduated assignment with slack: a partial matching where outliers stay unmatched.

    Like :func:`~qapfuse.ga` (the soft matching becomes ``sinkhorn(G / tau)`` with ``G`` the
    score gradient, annealing ``tau``), but over the polytope with a slack row and column
    (:func:`sinkhorn_slack`), so a pair must score more than `slack` to be matched. ``G`` is
    scaled so that the median over nodes of their best score is 1: `slack` and the
    temperatures are fractions of a typical node's best score at any problem size.
    The last soft matching ``P`` is rounded by a partial Hungarian step that keeps pair
    ``(i, a)`` only if ``P[i, a]`` beats the slack masses of ``i`` and ``a``
    (``P[i, a] > P[i, slack] + P[slack, a]`` in the assignment's total).

    Parameters
    ----------
    problem : Problem
        Affinity for graphs with ``n1 <= n2`` nodes (batched: ``b`` pairs).
    slack : float
        Threshold a pair's gradient must beat, relative to a typical node's best score (0 to
        1 is sensible: higher leaves more nodes unmatched).
    tau0, tau_min : float > 0
        First and last temperature.
    decay : float in (0, 1)
        Temperature factor between stages.
    max_inner : int >= 1
        Fixed-point steps per temperature.
    sk_iter : int >= 1
        Sinkhorn iterations per step (early stop at 1e-4 marginal error).
    tol : float > 0
        Largest entry change that ends a temperature stage.
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Soft start (default uniform ``1 / n2``).
    time_limit : float > 0, optional
        Seconds for the whole call: checked between fixed-point iterations; when it runs out,
        the current soft matching is rounded (``info["stopped"] == "time_limit"``).

    Returns
    -------
    MatchResult
        ``X`` 0/1 with at most one 1 per row and column; ``soft``; ``info["matched1"]`` and
        ``info["matched2"]``: boolean arrays (n1,) / (n2,) (batched: (b, n1max) / (b, n2max))
        of the nodes that are matched; ``info["stages"]``; ``info["stopped"]`` (``"done"`` or
        ``"time_limit"``).

    References
    ----------
    .. [1] S. Gold, A. Rangarajan, "A graduated assignment algorithm for graph matching",
           IEEE TPAMI 18(4), 1996 (slack variables for outliers).

    Notes
    -----
    On a problem from ``graph_matching_problem(..., candidates=k)`` (a
    :class:`~qapfuse.affinity.CSRAffinity` with ``candidates``) the soft matching lives on
    the candidate pairs only: ``K`` is compressed to those rows and columns once, and every
    step is a sparse product and :func:`sinkhorn_slack_sparse`, ``O(nnz + |candidates|)``
    instead of ``O(nnz + n1 n2)``. Pairs outside the candidates are never matched.

    Examples
    --------
    >>> from qapfuse.affinity import graph_matching_problem
    >>> from qapfuse.graphs import noisy_pair, matching_metrics
    >>> pair = noisy_pair(12, outliers1=2, outliers2=3, rng=0)
    >>> p = graph_matching_problem(*pair.aff_args(), dtype="float64")
    >>> res = match_with_outliers(p)
    >>> res.info["matched1"].shape
    (14,)
    """
    start = time.perf_counter()
    caller = "match_with_outliers"
    check_problem(problem, caller)
    opts = dict(
        slack=slack,
        tau0=tau0,
        tau_min=tau_min,
        decay=decay,
        max_inner=max_inner,
        sk_iter=sk_iter,
        tol=tol,
        time_limit=time_limit,
    )
    check_options(opts, OPTIONS, caller)
    if tau_min > tau0:
        raise ValueError(
            f"The 'tau_min' parameter of {caller} must be <= tau0; got tau_min={tau_min}, "
            f"tau0={tau0}."
        )
    X = initial_soft(problem, x0, caller)
    schedule = Schedule(tau0, tau_min, decay, max_inner, tol)
    deadline = None if time_limit is None else start + time_limit
    cand = getattr(problem.affinity, "candidates", None)
    if cand is not None:
        X_soft, Xh, run = _anneal_on_support(problem, cand, X, schedule, slack, sk_iter, deadline)
    else:
        X_soft, Xh, run = _anneal_dense(problem, X, schedule, slack, sk_iter, deadline)
    if run.stopped == "done" and not run.converged:
        warn_not_converged(
            f"{caller} stopped at max_inner={max_inner} in its last stage with change "
            f"{run.change:.2e} > tol={tol:g}; raise max_inner or lower decay."
        )
    m1 = Xh.sum(axis=2) > 0
    m2 = Xh.sum(axis=1) > 0
    if not problem.batched:
        m1, m2 = m1[0], m2[0]
    info = {"stages": schedule.stages, "matched1": m1, "matched2": m2, "slack": slack}
    if cand is not None:
        info["support"] = int(cand.sum())
    info["stopped"] = run.stopped
    return finish(
        problem,
        backend.from_numpy(Xh, like=X_soft),
        soft=X_soft,
        n_iter=run.n_iter,
        converged=run.converged,
        start=start,
        info=info,
    )


def _anneal_dense(
    problem: Problem,
    X: Array,
    schedule: Schedule,
    slack: float,
    sk_iter: int,
    deadline: float | None,
) -> tuple[Array, np.ndarray, AnnealResult]:
    """Graduated assignment with slack on the dense block; soft and rounded (numpy) result."""
    xp = problem.xp
    r, c = problem.n1max, problem.n2max
    project = Sinkhorn(
        _valid_mask(problem.n1, problem.n2, r, c),
        slack=(problem.n1, problem.n2),
        max_iter=sk_iter,
        tol=1e-4,
        check_every=5,
    )
    run = anneal(
        lambda X: _normalise_rows(problem.gradient(X), problem.n1, xp=xp),
        lambda G, tau: project(G, tau, slack=slack),
        X,
        schedule,
        deadline=deadline,
    )
    P = backend.to_numpy(run.X).astype(np.float64)
    u1 = backend.to_numpy(project.unmatched1).astype(np.float64)
    u2 = backend.to_numpy(project.unmatched2).astype(np.float64)
    Xh = np.zeros((problem.batch, r, c))
    for k in range(problem.batch):
        m1, m2 = int(problem.n1[k]), int(problem.n2[k])
        W = P[k, :m1, :m2] - u1[k, :m1][:, None] - u2[k, :m2][None, :]
        Xh[k, :m1, :m2] = partial_hungarian(W)
    return run.X, Xh, run


def _anneal_on_support(
    problem: Problem,
    cand: np.ndarray,
    X0: Array,
    schedule: Schedule,
    slack: float,
    sk_iter: int,
    deadline: float | None,
) -> tuple[Array, np.ndarray, AnnealResult]:
    """:func:`_anneal_dense` on the candidate pairs `cand` (b, n1max, n2max) (numpy CSR).

    Each instance anneals on its own (past the deadline, each later one does one iteration);
    the returned run has the most iterations and the largest change over the batch.
    """
    aff = problem.affinity
    if not backend.is_numpy_array(X0):
        raise TypeError(
            "match_with_outliers: a problem with candidate pairs must hold numpy arrays."
        )
    r, c = problem.n1max, problem.n2max
    X0 = np.asarray(X0, dtype=np.float64)
    soft = np.zeros((problem.batch, r, c))
    Xh = np.zeros((problem.batch, r, c))
    runs = []
    for k in range(problem.batch):
        m1, m2 = int(problem.n1[k]), int(problem.n2[k])
        ii, aa = np.nonzero(cand[k, :m1, :m2])
        pos = ii + aa * r
        Kc = aff.Ks[k][pos][:, pos].astype(np.float64)
        Kg = 2.0 * Kc if aff.symmetric else (Kc + Kc.T).tocsr()
        project = Sinkhorn.on_support(ii, aa, m1, m2, max_iter=sk_iter, tol=1e-4)

        def gradient(x: np.ndarray, Kg: Any = Kg, ii: np.ndarray = ii, m1: int = m1) -> Any:
            # scaled so that the median over nodes of their best score is 1
            G = Kg @ x
            top = np.zeros(m1)
            np.maximum.at(top, ii, G)
            med = float(np.median(top)) if m1 else 0.0
            scale = med if med > 0 else (float(np.max(np.abs(top))) if m1 else 0.0)
            return G / (scale if scale > 0 else 1.0)

        run = anneal(
            gradient,
            lambda G, tau, project=project: project(G, tau, slack=slack),
            X0[k, ii, aa],
            schedule,
            deadline=deadline,
        )
        runs.append(run)
        soft[k, ii, aa] = run.X
        u1 = project.unmatched1 if project.unmatched1 is not None else np.ones(m1)
        u2 = project.unmatched2 if project.unmatched2 is not None else np.ones(m2)
        W = np.zeros((m1, m2))
        W[ii, aa] = run.X - u1[ii] - u2[aa]
        Xh[k, :m1, :m2] = partial_hungarian(W)
    stopped = [r.stopped for r in runs if r.stopped != "done"]
    run = AnnealResult(
        X=None,
        n_iter=max(r.n_iter for r in runs),
        change=max(r.change for r in runs),
        converged=all(r.converged for r in runs),
        stopped=stopped[0] if stopped else "done",
    )
    dt = problem.dtype if problem.dtype is not None else np.float64
    return backend.from_numpy(soft, like=X0, dtype=dt), Xh, run
