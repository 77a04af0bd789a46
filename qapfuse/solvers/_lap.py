"""Linear assignment: exact (Hungarian) and entropic (Sinkhorn, :mod:`._sinkhorn`), batched."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import backend
from .._validation import Option, check_finite, validate_options, warn_not_converged
from ..backend import Array
from ._sinkhorn import Sinkhorn

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


SINKHORN_OPTIONS: dict[str, Option] = {
    "tau": Option("float", low=0, low_inclusive=False),
    "max_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
}


@validate_options(SINKHORN_OPTIONS)
def sinkhorn(
    S: Array,
    n1: Any = None,
    n2: Any = None,
    *,
    tau: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> Array:
    r"""Entropic assignment: Sinkhorn scaling of ``exp(S / tau)``, batched, overflow-safe.

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
    project = Sinkhorn(
        _valid_mask(a1, a2, S.shape[1], S.shape[2]), square=a1 == a2, max_iter=max_iter, tol=tol
    )
    P = project(S, tau)
    err = project.err
    if err > tol:
        warn_not_converged(
            f"sinkhorn stopped at max_iter={max_iter} with marginal error {err:.2e} > "
            f"tol={tol:g}; raise max_iter or tau."
        )
    if transposed:
        P = xp.permute_dims(P, (0, 2, 1))
    return P if batched else P[0, ...]
