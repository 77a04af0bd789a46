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

import math
import time
from typing import Any

import numba as nb
import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import backend
from .._validation import Option, check_finite, check_options, check_scalar, warn_not_converged
from ..backend import Array
from ..problem import Problem
from ._common import check_problem, finish, initial_soft
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
    "rng": Option("any", allow_none=True),
}


def _augmented_log(
    L: Array, slack_L: float, n1: np.ndarray, n2: np.ndarray, *, xp: Any
) -> tuple[Array, Array, Array]:
    """``L`` (b, r, c) -> augmented (b, r+1, c+1) scores and log-marginals (b, r+1, 1), (b, 1, c+1).

    Slack entries score `slack_L`; padding is ``-inf`` (and has marginal 0, log -> 0 weight).
    """
    b, r, c = L.shape
    dev = backend.device(L)
    rows = np.zeros((b, r + 1, c + 1), dtype=bool)
    log_a = np.zeros((b, r + 1, 1))
    log_b = np.zeros((b, 1, c + 1))
    for k in range(b):
        m1, m2 = int(n1[k]), int(n2[k])
        rows[k, :m1, :m2] = True
        rows[k, :m1, c] = True
        rows[k, r, :m2] = True
        rows[k, r, c] = True
        log_a[k, r, 0] = math.log(max(m2, 1))
        log_b[k, 0, c] = math.log(max(m1, 1))
    mask = backend.asarray_on(rows, xp=xp, device=dev)
    S = xp.full((b, r + 1, c + 1), slack_L, dtype=L.dtype, device=dev)
    S = xp.concat([xp.concat([L, S[:, :r, c:]], axis=2), S[:, r:, :]], axis=1)
    S = xp.where(mask, S, xp.asarray(-xp.inf, dtype=L.dtype, device=dev))
    return (
        S,
        xp.astype(backend.asarray_on(log_a, xp=xp, device=dev), L.dtype),
        xp.astype(backend.asarray_on(log_b, xp=xp, device=dev), L.dtype),
    )


def _sinkhorn_slack_log(
    S: Array, log_a: Array, log_b: Array, *, max_iter: int, tol: float, xp: Any
) -> tuple[Array, int, float]:
    """Log-domain Sinkhorn on augmented scores with marginals; returns (log P, n_iter, err)."""
    g = xp.zeros_like(log_b)
    err, it = float("inf"), 0
    a = xp.exp(log_a)
    for it in range(1, max_iter + 1):
        f = log_a - backend.logsumexp(S + g, axis=2, xp=xp)
        g = log_b - backend.logsumexp(S + f, axis=1, xp=xp)
        if it % 5 == 0 or it == max_iter:
            rows = xp.sum(xp.exp(S + f + g), axis=2, keepdims=True)
            valid = xp.isfinite(xp.max(S, axis=2, keepdims=True))
            err = float(xp.max(xp.where(valid, xp.abs(rows - a), xp.zeros_like(rows))))
            if err <= tol:
                break
    return S + f + g, it, err


def _slack_plan(
    S: Array, log_a: Array, log_b: Array, *, max_iter: int, tol: float, xp: Any
) -> tuple[Array, float]:
    """Transport plan ``P`` (not its log) of the augmented problem, and the marginal error.

    numpy input takes the scaling form (``exp`` once, then matrix-vector products, BLAS) when
    the scores span less than 700 (no underflow in float64); anything else, and torch, takes
    the log domain.
    """
    if backend.is_numpy_array(S):
        out = np.empty(S.shape, dtype=S.dtype)
        err = 0.0
        for k in range(S.shape[0]):
            plan = _scaling_plan(S[k], log_a[k, :, 0], log_b[k, 0, :], max_iter, tol)
            if plan is None:
                lp, _, e = _sinkhorn_slack_log(
                    S[k : k + 1],
                    log_a[k : k + 1],
                    log_b[k : k + 1],
                    max_iter=max_iter,
                    tol=tol,
                    xp=xp,
                )
                plan = (np.exp(lp[0]), e)
            out[k], err = plan[0], max(err, plan[1])
        return out, err
    log_P, _, err = _sinkhorn_slack_log(S, log_a, log_b, max_iter=max_iter, tol=tol, xp=xp)
    return xp.exp(log_P), err


def _scaling_plan(
    L: np.ndarray, log_a: np.ndarray, log_b: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, float] | None:
    """Sinkhorn-Knopp scaling ``P = diag(u) exp(L - max L) diag(v)``; None if it would underflow.

    Everything (range check, ``exp``, scaling, the plan) runs in one compiled kernel: a few
    passes over ``L`` instead of a dozen numpy temporaries.
    """
    L = np.ascontiguousarray(L)
    a = np.exp(log_a.astype(np.float64))
    b = np.exp(log_b.astype(np.float64))
    P = np.empty_like(L)
    err, ok = _scaling_full(L, a, b, max_iter, tol, P)
    return (P, err) if ok else None


@nb.njit(cache=True)
def _scaling_full(L, a, b, max_iter, tol, P):  # pragma: no cover - jitted
    """Range check, kernel ``E = exp(L - max L)`` (float64), scaling, and ``P`` written out.

    Rows/columns without a finite entry get marginal 0. Returns ``(err, ok)``; ``ok`` is
    False when the scores span more than 700 (float64 underflow) or the scaling overflows.
    """
    r, c = L.shape
    top, low = -np.inf, np.inf
    for i in range(r):
        for j in range(c):
            x = L[i, j]
            if np.isfinite(x):
                top = max(top, x)
                low = min(low, x)
    if top == -np.inf:
        P[:, :] = 0.0
        return 0.0, True
    if top - low > 700.0:
        return np.inf, False
    E = np.empty((r, c))
    row_ok = np.zeros(r, dtype=np.bool_)
    col_ok = np.zeros(c, dtype=np.bool_)
    for i in range(r):
        for j in range(c):
            x = L[i, j]
            if np.isfinite(x):
                E[i, j] = np.exp(x - top)
                row_ok[i] = True
                col_ok[j] = True
            else:
                E[i, j] = 0.0
    aa = np.where(row_ok, a, 0.0)
    bb = np.where(col_ok, b, 0.0)
    u, v, err = _scaling_kernel(E, aa, bb, max_iter, tol)
    for i in range(r):
        if not np.isfinite(u[i]):
            return err, False
    for j in range(c):
        if not np.isfinite(v[j]):
            return err, False
    for i in range(r):
        for j in range(c):
            P[i, j] = u[i] * E[i, j] * v[j]
    return err, True


@nb.njit(cache=True)
def _scaling_kernel(E, a, b, max_iter, tol):  # pragma: no cover - jitted
    """Serial Sinkhorn-Knopp on a dense kernel ``E`` (r, c): one pass over E per half-step.

    Serial on purpose: the products are memory-bound, and threaded BLAS slows down by an order
    of magnitude when the cores are shared.
    """
    r, c = E.shape
    u = np.zeros(r)
    v = np.zeros(c)
    for j in range(c):
        v[j] = 1.0 if b[j] > 0 else 0.0
    err = np.inf
    Eu = np.zeros(c)
    for it in range(1, max_iter + 1):
        for j in range(c):
            Eu[j] = 0.0
        for i in range(r):
            s = 0.0
            for j in range(c):
                s += E[i, j] * v[j]
            u[i] = a[i] / s if s > 0 else 0.0
            ui = u[i]
            for j in range(c):
                Eu[j] += E[i, j] * ui
        for j in range(c):
            v[j] = b[j] / Eu[j] if Eu[j] > 0 else 0.0
        if it % 5 == 0 or it == max_iter:
            err = 0.0
            for i in range(r):
                s = 0.0
                for j in range(c):
                    s += E[i, j] * v[j]
                d = abs(u[i] * s - a[i])
                if d > err:
                    err = d
            if err <= tol:
                break
    return u, v, err


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
    >>> from qapfuse.solvers.partial import sinkhorn_slack
    >>> S = np.array([[1.0, 0.0], [0.0, -1.0]])
    >>> P, u1, u2 = sinkhorn_slack(S, slack=0.0, tau=0.1, max_iter=1000)
    >>> np.round(P, 1), np.round(u1, 1)
    (array([[1., 0.],
           [0., 0.]]), array([0., 1.]))
    """
    caller = "sinkhorn_slack"
    from .lap import _scores_and_sizes

    xp = backend.namespace_of(S, name="S")
    check_scalar(slack, "slack", caller, low=None)
    check_scalar(tau, "tau", caller)
    check_scalar(max_iter, "max_iter", caller, integer=True, low=1, low_inclusive=True)
    check_scalar(tol, "tol", caller)
    S, batched, a1, a2 = _scores_and_sizes(S, n1, n2, caller, xp=xp)
    check_finite(S, "S", xp=xp)
    Sa, log_a, log_b = _augmented_log(S / tau, slack / tau, a1, a2, xp=xp)
    P_all, err = _slack_plan(Sa, log_a, log_b, max_iter=max_iter, tol=tol, xp=xp)
    if err > tol:
        warn_not_converged(
            f"sinkhorn_slack stopped at max_iter={max_iter} with marginal error {err:.2e} > "
            f"tol={tol:g}; raise max_iter or tau."
        )
    r, c = S.shape[1], S.shape[2]
    P, u1, u2 = P_all[:, :r, :c], P_all[:, :r, c], P_all[:, r, :c]
    if not batched:
        return P[0, ...], u1[0, ...], u2[0, ...]
    return P, u1, u2


@nb.njit(cache=True)
def _lse_rows(L, rows, h, n, extra):  # pragma: no cover - jitted
    """``out[i] = log(sum_{e: rows[e] = i} exp(L[e] + h[e]) + exp(extra[i]))`` for i < n."""
    mx = extra.copy()
    for e in range(L.shape[0]):
        v = L[e] + h[e]
        if v > mx[rows[e]]:
            mx[rows[e]] = v
    sm = np.zeros(n)
    for i in range(n):
        sm[i] = np.exp(extra[i] - mx[i])
    for e in range(L.shape[0]):
        sm[rows[e]] += np.exp(L[e] + h[e] - mx[rows[e]])
    return mx + np.log(sm)


@nb.njit(cache=True)
def _lse(x, extra):  # pragma: no cover - jitted
    """``log(sum(exp(x)) + exp(extra))``."""
    mx = extra
    for v in x:
        mx = max(mx, v)
    s = np.exp(extra - mx)
    for v in x:
        s += np.exp(v - mx)
    return mx + np.log(s)


@nb.njit(cache=True)
def _sparse_slack_kernel(L, rows, cols, n1, n2, sL, max_iter, tol):  # pragma: no cover
    """Log-domain Sinkhorn on support entries ``L`` (m,) plus a slack row and column.

    Rows ``i < n1`` have mass 1, the slack row ``n2``; columns ``a < n2`` mass 1, the slack
    column ``n1``; every slack entry (corner included) scores ``sL``. Returns the log-plan
    of the support, the log-masses on the slack column (n1,) and row (n2,), ``n_iter`` and
    the largest row-marginal error (checked every 5 iterations).
    """
    f = np.zeros(n1)
    g = np.zeros(n2)
    fs, gs = 0.0, 0.0
    la, lb = np.log(max(n2, 1)), np.log(max(n1, 1))
    err, it = np.inf, 0
    for it in range(1, max_iter + 1):
        f = -_lse_rows(L, rows, g[cols], n1, np.full(n1, sL + gs))
        fs = la - _lse(sL + g, sL + gs)
        g = -_lse_rows(L, cols, f[rows], n2, np.full(n2, sL + fs))
        gs = lb - _lse(sL + f, sL + fs)
        if it % 5 == 0 or it == max_iter:
            r = _lse_rows(L, rows, g[cols], n1, np.full(n1, sL + gs)) + f
            err = 0.0
            for i in range(n1):
                err = max(err, abs(np.exp(r[i]) - 1.0))
            err = max(err, abs(np.exp(_lse(sL + g, sL + gs) + fs) - n2))
            if err <= tol:
                break
    return L + f[rows] + g[cols], sL + f + gs, sL + fs + g, it, err


@nb.njit(cache=True)
def _sparse_slack_scaling(L, rows, cols, n1, n2, sL, max_iter, tol):  # pragma: no cover
    """Scaling form of :func:`_sparse_slack_kernel`: one ``exp`` per entry, then products.

    Returns ``(p, unmatched1, unmatched2, err, ok)``; ``ok`` is False when the scores span
    more than 700 (float64 underflow) or the scalings overflow: use the log domain then.
    """
    m = L.shape[0]
    top, low = sL, sL
    for e in range(m):
        top = max(top, L[e])
        low = min(low, L[e])
    p = np.zeros(m)
    if top - low > 700.0:
        return p, np.zeros(n1), np.zeros(n2), np.inf, False
    E = np.exp(L - top)
    Es = np.exp(sL - top)
    u = np.zeros(n1)
    v = np.ones(n2)
    us, vs = 0.0, 1.0
    err = np.inf
    acc1 = np.zeros(n1)
    acc2 = np.zeros(n2)
    for it in range(1, max_iter + 1):
        acc1[:] = Es * vs
        for e in range(m):
            acc1[rows[e]] += E[e] * v[cols[e]]
        u = 1.0 / acc1
        us = n2 / (Es * (v.sum() + vs))
        acc2[:] = Es * us
        for e in range(m):
            acc2[cols[e]] += E[e] * u[rows[e]]
        v = 1.0 / acc2
        vs = n1 / (Es * (u.sum() + us))
        if it % 5 == 0 or it == max_iter:
            acc1[:] = Es * vs
            for e in range(m):
                acc1[rows[e]] += E[e] * v[cols[e]]
            err = np.max(np.abs(u * acc1 - 1.0)) if n1 else 0.0
            err = max(err, abs(us * Es * (v.sum() + vs) - n2))
            if err <= tol:
                break
    for e in range(m):
        p[e] = u[rows[e]] * E[e] * v[cols[e]]
    u1 = u * Es * vs
    u2 = us * Es * v
    ok = np.all(np.isfinite(p)) and np.all(np.isfinite(u1)) and np.all(np.isfinite(u2))
    return p, u1, u2, err, ok


def _sparse_slack_plan(
    L: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    n1: int,
    n2: int,
    sL: float,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Plan on the support, slack masses and marginal error: scaling form, else log domain."""
    p, u1, u2, err, ok = _sparse_slack_scaling(L, rows, cols, n1, n2, sL, max_iter, tol)
    if ok:
        return p, u1, u2, err
    lp, l1, l2, _, err = _sparse_slack_kernel(L, rows, cols, n1, n2, sL, max_iter, tol)
    return np.exp(lp), np.exp(l1), np.exp(l2), err


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
    >>> from qapfuse.solvers.partial import sinkhorn_slack_sparse
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
    p, u1, u2, err = _sparse_slack_plan(L / tau, r, c, n1, n2, slack / tau, max_iter, tol)
    if err > tol:
        warn_not_converged(
            f"{caller} stopped at max_iter={max_iter} with marginal error {err:.2e} > "
            f"tol={tol:g}; raise max_iter or tau."
        )
    return p, u1, u2


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
    rng: Any = None,
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
    rng : optional
        Accepted for a uniform interface; the method is deterministic.

    Returns
    -------
    MatchResult
        ``X`` 0/1 with at most one 1 per row and column; ``soft``; ``info["matched1"]`` and
        ``info["matched2"]``: boolean arrays (n1,) / (n2,) (batched: (b, n1max) / (b, n2max))
        of the nodes that are matched; ``info["stages"]``.

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
    )
    check_options(opts, OPTIONS, caller)
    if tau_min > tau0:
        raise ValueError(
            f"The 'tau_min' parameter of {caller} must be <= tau0; got tau_min={tau_min}, "
            f"tau0={tau0}."
        )
    xp = problem.xp
    X = initial_soft(problem, x0, caller)
    r, c = problem.n1max, problem.n2max
    stages = max(1, math.floor(math.log(tau_min / tau0) / math.log(decay) + 1e-9) + 1)
    cand = getattr(problem.affinity, "candidates", None)
    if cand is not None:
        return _match_on_support(
            problem, cand, X, stages, slack, tau0, decay, max_inner, sk_iter, tol, start
        )
    n_iter, change = 0, float("inf")
    P_aug = None
    for stage in range(stages):
        tau = tau0 * decay**stage
        for _ in range(max_inner):
            G = _normalise_rows(problem.gradient(X), problem.n1, xp=xp)
            Sa, log_a, log_b = _augmented_log(G / tau, slack / tau, problem.n1, problem.n2, xp=xp)
            P_aug, _ = _slack_plan(Sa, log_a, log_b, max_iter=sk_iter, tol=1e-4, xp=xp)
            X_new = P_aug[:, :r, :c]
            change = float(xp.max(xp.abs(X_new - X)))
            X = X_new
            n_iter += 1
            if change < tol:
                break
    converged = change < tol
    if not converged:
        warn_not_converged(
            f"{caller} stopped at max_inner={max_inner} in its last stage with change "
            f"{change:.2e} > tol={tol:g}; raise max_inner or lower decay."
        )
    P = backend.to_numpy(P_aug).astype(np.float64)
    Xh = np.zeros((problem.batch, r, c))
    for k in range(problem.batch):
        m1, m2 = int(problem.n1[k]), int(problem.n2[k])
        W = P[k, :m1, :m2] - P[k, :m1, c][:, None] - P[k, r, :m2][None, :]
        Xh[k, :m1, :m2] = partial_hungarian(W)
    X_hard = backend.from_numpy(Xh, like=X)
    m1 = Xh.sum(axis=2) > 0
    m2 = Xh.sum(axis=1) > 0
    if not problem.batched:
        m1, m2 = m1[0], m2[0]
    return finish(
        problem,
        X_hard,
        soft=X,
        n_iter=n_iter,
        converged=converged,
        start=start,
        info={"stages": stages, "matched1": m1, "matched2": m2, "slack": slack},
    )


def _match_on_support(
    problem: Problem,
    cand: np.ndarray,
    X0: Array,
    stages: int,
    slack: float,
    tau0: float,
    decay: float,
    max_inner: int,
    sk_iter: int,
    tol: float,
    start: float,
) -> MatchResult:
    """:func:`match_with_outliers` on the candidate pairs `cand` (b, n1max, n2max) (numpy CSR)."""
    caller = "match_with_outliers"
    aff = problem.affinity
    if not backend.is_numpy_array(X0):
        raise TypeError(f"{caller}: a problem with candidate pairs must hold numpy arrays.")
    r, c = problem.n1max, problem.n2max
    X0 = np.asarray(X0, dtype=np.float64)
    soft = np.zeros((problem.batch, r, c))
    Xh = np.zeros((problem.batch, r, c))
    n_iter, converged = 0, True
    for k in range(problem.batch):
        m1, m2 = int(problem.n1[k]), int(problem.n2[k])
        ii, aa = np.nonzero(cand[k, :m1, :m2])
        pos = ii + aa * r
        Kc = aff.Ks[k][pos][:, pos].astype(np.float64)
        Kg = 2.0 * Kc if aff.symmetric else (Kc + Kc.T).tocsr()
        x = X0[k, ii, aa]
        change, it_k = float("inf"), 0
        u1 = np.ones(m1)
        u2 = np.ones(m2)
        for stage in range(stages):
            tau = tau0 * decay**stage
            for _ in range(max_inner):
                G = Kg @ x
                top = np.zeros(m1)
                np.maximum.at(top, ii, G)
                med = float(np.median(top)) if m1 else 0.0
                scale = med if med > 0 else (float(np.max(np.abs(top))) if m1 else 0.0)
                scale = scale if scale > 0 else 1.0
                x_new, u1, u2, _ = _sparse_slack_plan(
                    G / (scale * tau), ii, aa, m1, m2, slack / tau, sk_iter, 1e-4
                )
                change = float(np.max(np.abs(x_new - x))) if x.size else 0.0
                x = x_new
                it_k += 1
                if change < tol:
                    break
        n_iter = max(n_iter, it_k)
        converged = converged and change < tol
        soft[k, ii, aa] = x
        W = np.zeros((m1, m2))
        W[ii, aa] = x - u1[ii] - u2[aa]
        Xh[k, :m1, :m2] = partial_hungarian(W)
    if not converged:
        warn_not_converged(
            f"{caller} stopped at max_inner={max_inner} in its last stage with change "
            f"{change:.2e} > tol={tol:g}; raise max_inner or lower decay."
        )
    m1_ = Xh.sum(axis=2) > 0
    m2_ = Xh.sum(axis=1) > 0
    if not problem.batched:
        m1_, m2_ = m1_[0], m2_[0]
    dt = problem.dtype if problem.dtype is not None else np.float64
    return finish(
        problem,
        Xh.astype(dt),
        soft=soft.astype(dt),
        n_iter=n_iter,
        converged=converged,
        start=start,
        info={
            "stages": stages,
            "matched1": m1_,
            "matched2": m2_,
            "slack": slack,
            "support": int(cand.sum()),
        },
    )
