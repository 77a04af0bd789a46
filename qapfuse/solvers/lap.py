"""Linear assignment: exact (Hungarian) and entropic (log-domain Sinkhorn), batched."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment

from .. import backend
from .._validation import check_finite, check_scalar, warn_not_converged
from ..backend import Array

__all__ = ["hungarian", "sinkhorn"]


def _scores_and_sizes(
    S: Array, n1: Any, n2: Any, caller: str, *, xp: Any
) -> tuple[Array, bool, np.ndarray, np.ndarray]:
    """Batch `S` to (b, n1max, n2max); sizes as numpy int arrays of shape (b,)."""
    from ..problem import _batched, _float_array, _sizes

    S, batched = _batched(xp.asarray(S), 2, "S", caller)
    S = _float_array(S, "S", xp=xp)
    b, r, c = S.shape
    a1 = _sizes(n1, "n1", b, r, caller)
    a2 = _sizes(n2, "n2", b, c, caller)
    a1 = np.full(b, r, np.int64) if a1 is None else a1
    a2 = np.full(b, c, np.int64) if a2 is None else a2
    return S, batched, a1, a2


def _valid_mask(n1: np.ndarray, n2: np.ndarray, r: int, c: int) -> np.ndarray:
    m = np.zeros((n1.shape[0], r, c), dtype=bool)
    for k in range(n1.shape[0]):
        m[k, : n1[k], : n2[k]] = True
    return m


def hungarian(S: Array, n1: Any = None, n2: Any = None) -> Array:
    """Exact linear assignment maximising ``sum(S * X)`` (scipy's LAPJV), batched.

    Parameters
    ----------
    S : array of shape (n1, n2) or (b, n1max, n2max)
        Scores; any array library (computed on the CPU, returned on `S`'s device).
    n1, n2 : int or array of shape (b,), optional
        Valid sizes per instance; rows/columns beyond them are ignored and stay 0.

    Returns
    -------
    X : array like `S`
        0/1 matrix with ``min(n1, n2)`` ones, one per row (``n1 <= n2``) or per column.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import hungarian
    >>> hungarian(np.array([[1.0, 3.0], [2.0, 0.0]]))
    array([[0., 1.],
           [1., 0.]])
    """
    xp = backend.namespace_of(S, name="S")
    S, batched, a1, a2 = _scores_and_sizes(S, n1, n2, "hungarian", xp=xp)
    check_finite(S, "S", xp=xp)
    X = _hungarian_np(backend.to_numpy(S), a1, a2)
    out = backend.from_numpy(X, like=S)
    return out if batched else out[0, ...]


def _hungarian_np(S: np.ndarray, n1: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Validated numpy kernel: (b, r, c) scores -> (b, r, c) 0/1 float64."""
    X = np.zeros(S.shape, dtype=np.float64)
    for k in range(S.shape[0]):
        rows, cols = linear_sum_assignment(S[k, : n1[k], : n2[k]], maximize=True)
        X[k, rows, cols] = 1.0
    return X


def sinkhorn(
    S: Array,
    n1: Any = None,
    n2: Any = None,
    *,
    tau: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> Array:
    r"""Entropic assignment: Sinkhorn scaling of ``exp(S / tau)`` in the log domain, batched.

    Returns ``P = diag(u) exp(S / tau) diag(v)`` with rows summing to 1 and columns summing to
    1 (square instances) or at most 1 (``n1 < n2``: partial matching). Instances with
    ``n1 > n2`` are solved transposed (columns sum to 1, rows at most 1).

    Parameters
    ----------
    S : array of shape (n1, n2) or (b, n1max, n2max)
        Scores (higher is better), any array library.
    n1, n2 : int or array of shape (b,), optional
        Valid sizes per instance; padding gets probability 0.
    tau : float > 0
        Temperature: smaller is closer to a hard assignment (and needs more iterations).
    max_iter : int >= 1
        Iterations, each a row and a column update.
    tol : float > 0
        Stop when every row sum (the constraint the column update may break) is within
        `tol` of 1. Checked every 10 iterations.

    Returns
    -------
    P : array like `S`
        Same library, dtype and device as `S`.

    Warns
    -----
    ConvergenceWarning
        If `max_iter` is reached with the marginal error above `tol`.

    References
    ----------
    .. [1] R. Sinkhorn, P. Knopp, "Concerning nonnegative matrices and doubly stochastic
           matrices", Pacific J. Math. 21(2), 1967.
    .. [2] M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport",
           NeurIPS 2013.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import sinkhorn
    >>> P = sinkhorn(np.array([[2.0, 0.0], [0.0, 2.0]]), tau=0.5)
    >>> np.round(P.sum(axis=0), 6), np.round(P.sum(axis=1), 6)
    (array([1., 1.]), array([1., 1.]))
    """
    caller = "sinkhorn"
    xp = backend.namespace_of(S, name="S")
    check_scalar(tau, "tau", caller)
    check_scalar(max_iter, "max_iter", caller, integer=True, low=1, low_inclusive=True)
    check_scalar(tol, "tol", caller)
    S, batched, a1, a2 = _scores_and_sizes(S, n1, n2, caller, xp=xp)
    check_finite(S, "S", xp=xp)
    flip = a1 > a2
    if np.any(flip) and not np.all(flip):
        raise ValueError(
            f"{caller}: mixed orientations in one batch (some n1 > n2, some n1 < n2); "
            "transpose those instances first."
        )
    transposed = bool(np.all(flip)) and flip.size > 0
    if transposed:
        S, a1, a2 = xp.permute_dims(S, (0, 2, 1)), a2, a1
    mask = backend.asarray_on(
        _valid_mask(a1, a2, S.shape[1], S.shape[2]), xp=xp, device=backend.device(S)
    )
    square = backend.asarray_on((a1 == a2)[:, None, None], xp=xp, device=backend.device(S))
    log_P, _, err = sinkhorn_log(
        S / tau, mask=mask, square=square, max_iter=max_iter, tol=tol, xp=xp
    )
    if err > tol:
        warn_not_converged(
            f"sinkhorn stopped at max_iter={max_iter} with marginal error {err:.2e} > "
            f"tol={tol:g}; raise max_iter or tau."
        )
    P = xp.exp(log_P)
    if transposed:
        P = xp.permute_dims(P, (0, 2, 1))
    return P if batched else P[0, ...]


def sinkhorn_log(
    L: Array,
    *,
    mask: Array,
    square: Array,
    max_iter: int,
    tol: float,
    xp: Any,
    check_every: int = 10,
) -> tuple[Array, int, float]:
    """Validated kernel: log-domain Sinkhorn on ``L = S / tau`` of shape (b, r, c), ``r <= c``.

    `mask` (bool, same shape) marks valid entries; `square` (bool, (b, 1, 1)) marks instances
    whose columns must sum to exactly 1 (the others: at most 1). Returns ``(log P, n_iter,
    err)`` with ``err`` the largest row-sum error at the last check. numpy float64 input runs
    compiled kernels with the same iteration: on the scaling factors ``exp(f)``, ``exp(g)`` when
    the spread of `L` is at most 300 (no underflow possible), else on the log potentials.
    """
    if backend.is_numpy_array(L) and L.dtype == np.float64 and L.ndim == 3:
        # numpy float64: the same iteration as below, compiled (no per-step array overheads)
        out = np.where(mask, L, -np.inf)
        args = (
            np.ascontiguousarray(mask, dtype=np.bool_),
            np.ascontiguousarray(np.broadcast_to(square, (L.shape[0], 1, 1))[:, 0, 0]),
            int(max_iter),
            float(tol),
            int(check_every),
        )
        valid = L[mask]
        if valid.size and float(valid.max() - valid.min()) <= _SCALING_RANGE:
            # exp(L) cannot underflow here: iterate on the scaling factors exp(f), exp(g)
            # (no exp/log per entry and step); the result equals the log-domain one up to
            # rounding
            it, err = _sinkhorn_scaling_nb(out, *args)
        else:
            it, err = _sinkhorn_log_nb(out, *args)
        return out, it, err
    log_P, _, it, err = sinkhorn_log_warm(
        L,
        None,
        mask=mask,
        square=square,
        max_iter=max_iter,
        tol=tol,
        xp=xp,
        check_every=check_every,
    )
    return log_P, it, err


def sinkhorn_log_warm(
    L: Array,
    g0: Array | None,
    *,
    mask: Array,
    square: Array,
    max_iter: int,
    tol: float,
    xp: Any,
    check_every: int = 10,
) -> tuple[Array, Array, int, float]:
    """:func:`sinkhorn_log` in the array namespace, from column potentials `g0` (b, 1, c).

    Returns ``(log P, g, n_iter, err)``; passing the returned ``g`` to the next call on a
    nearby ``L`` (as graduated assignment does) saves most of its iterations, which matters
    where every step is a kernel launch (torch, GPU). ``g0=None`` starts from 0.
    """
    neg_inf = xp.asarray(-xp.inf, dtype=L.dtype, device=backend.device(L))
    L = xp.where(mask, L, neg_inf)
    if g0 is None:
        g = xp.zeros((L.shape[0], 1, L.shape[2]), dtype=L.dtype, device=backend.device(L))
    else:
        g = g0
    row_valid = xp.any(mask, axis=2, keepdims=True)
    err = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        f = -backend.logsumexp(L + g, axis=2, xp=xp)
        g_eq = -backend.logsumexp(L + f, axis=1, xp=xp)
        g = xp.where(square, g_eq, xp.minimum(g_eq, xp.zeros_like(g_eq)))
        if it % check_every == 0 or it == max_iter:
            rows = xp.sum(xp.exp(L + f + g), axis=2, keepdims=True)
            err = float(xp.max(xp.where(row_valid, xp.abs(rows - 1.0), xp.zeros_like(rows))))
            if err <= tol:
                break
    return L + f + g, g, it, err


@njit(cache=True)
def _row_error(mask: np.ndarray, rows: np.ndarray) -> float:  # pragma: no cover - compiled
    """Largest ``|row sum - 1|`` over rows with at least one valid entry (the stopping test)."""
    b, r, c = mask.shape
    err = 0.0
    for k in range(b):
        for i in range(r):
            valid = False
            for j in range(c):
                if mask[k, i, j]:
                    valid = True
                    break
            if valid and abs(rows[k, i] - 1.0) > err:
                err = abs(rows[k, i] - 1.0)
    return err


#: Largest spread of ``L`` (over valid entries) for which the numpy kernel iterates on scaling
#: factors instead of log potentials: ``exp(-300)`` and its reciprocal are far from float64's
#: limits.
_SCALING_RANGE = 300.0


@njit(cache=True)
def _sinkhorn_scaling_nb(
    L: np.ndarray,
    mask: np.ndarray,
    square: np.ndarray,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[int, float]:  # pragma: no cover - compiled
    """:func:`_sinkhorn_log_nb` with ``exp(f)``, ``exp(g)`` as the unknowns (small spread of L).

    Row update ``r_i = 1 / sum_j E_ij c_j``, column update ``c_j = 1 / sum_i r_i E_ij`` (capped
    at 1 unless square), ``E = exp(L - max L)``; an empty row or column keeps factor 1, as a
    log potential of 0 in the log domain. Overwrites `L` with ``log P``.
    """
    b, nr, nc = L.shape
    E = np.zeros((b, nr, nc))
    for k in range(b):
        top = -np.inf
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j] and L[k, i, j] > top:
                    top = L[k, i, j]
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j]:
                    L[k, i, j] -= top
                    E[k, i, j] = math.exp(L[k, i, j])
    rf = np.ones((b, nr))
    cf = np.ones((b, nc))
    colsum = np.empty(nc)
    rows = np.empty((b, nr))
    err = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        for k in range(b):
            for i in range(nr):
                tot = 0.0
                for j in range(nc):
                    tot += E[k, i, j] * cf[k, j]
                rf[k, i] = 1.0 / tot if tot > 0.0 else 1.0
            colsum[:] = 0.0
            for i in range(nr):
                for j in range(nc):
                    colsum[j] += E[k, i, j] * rf[k, i]
            for j in range(nc):
                ce = 1.0 / colsum[j] if colsum[j] > 0.0 else 1.0
                cf[k, j] = ce if square[k] or ce < 1.0 else 1.0
        if it % check_every == 0 or it == max_iter:
            for k in range(b):
                for i in range(nr):
                    tot = 0.0
                    for j in range(nc):
                        tot += rf[k, i] * E[k, i, j] * cf[k, j]
                    rows[k, i] = tot
            err = _row_error(mask, rows)
            if err <= tol:
                break
    for k in range(b):
        for i in range(nr):
            for j in range(nc):
                L[k, i, j] = L[k, i, j] + math.log(rf[k, i]) + math.log(cf[k, j])
    return it, err


@njit(cache=True)
def _lse_0(v: np.ndarray) -> float:  # pragma: no cover - compiled
    """``log(sum(exp(v)))``, and 0 when every entry is ``-inf`` (as :func:`backend.logsumexp`)."""
    m = -np.inf
    for x in v:
        if x > m:
            m = x
    if not math.isfinite(m):
        return 0.0
    s = 0.0
    for x in v:
        s += math.exp(x - m)
    return m + math.log(s)


@njit(cache=True)
def _sinkhorn_log_nb(
    L: np.ndarray,
    mask: np.ndarray,
    square: np.ndarray,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[int, float]:  # pragma: no cover - compiled
    """:func:`sinkhorn_log` for numpy float64 (b, r, c), ``L`` already masked with ``-inf``.

    Overwrites `L` with ``L + f + g`` (log P) and returns ``(n_iter, err)``.
    """
    b, r, c = L.shape
    f = np.zeros((b, r))
    g = np.zeros((b, c))
    buf_r = np.empty(c)
    buf_c = np.empty(r)
    rows = np.empty((b, r))
    err = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        for k in range(b):
            for i in range(r):
                for j in range(c):
                    buf_r[j] = L[k, i, j] + g[k, j]
                f[k, i] = -_lse_0(buf_r)
            for j in range(c):
                for i in range(r):
                    buf_c[i] = L[k, i, j] + f[k, i]
                ge = -_lse_0(buf_c)
                g[k, j] = ge if square[k] or ge < 0.0 else 0.0
        if it % check_every == 0 or it == max_iter:
            for k in range(b):
                for i in range(r):
                    tot = 0.0
                    for j in range(c):
                        tot += math.exp(L[k, i, j] + f[k, i] + g[k, j])
                    rows[k, i] = tot
            err = _row_error(mask, rows)
            if err <= tol:
                break
    for k in range(b):
        for i in range(r):
            for j in range(c):
                L[k, i, j] = L[k, i, j] + f[k, i] + g[k, j]
    return it, err
