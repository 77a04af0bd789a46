"""Quality of multi-graph matchings: cycle consistency and accuracy against a ground truth."""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import backend
from ._inputs import _parse_pairs


def consistency(result_or_pairs: Any, *, ns: Any = None) -> float:
    """Fraction of cycle-consistent triples of graphs.

    A triple ``{i, j, k}`` is consistent when composing two of its matchings never contradicts
    the third: ``X_ij X_jk <= X_ik`` entrywise, for every order of the three graphs (for full
    permutations: ``X_ij X_jk = X_ik``).

    Parameters
    ----------
    result_or_pairs : MultiMatchResult, array of shape (m, m, n, n), or mapping {(i, j): X_ij}
        0/1 pairwise matchings (see :func:`synchronize` for the forms).
    ns : array-like of int, shape (m,), optional
        Graph sizes for an array input.

    Returns
    -------
    float
        In ``[0, 1]``; 1.0 for a :class:`MultiMatchResult` (and for fewer than three graphs).

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse.solvers.multi import consistency
    >>> pi, S = np.eye(2), np.eye(2)[::-1]
    >>> consistency({(0, 1): pi, (1, 2): pi, (0, 2): S})
    0.0
    """
    caller = "consistency"
    Xb, _, xp = _parse_pairs(result_or_pairs, ns, caller, soft_ok=False)
    m = Xb.shape[0]
    if m < 3:
        return 1.0
    ok = np.ones((m, m, m), dtype=bool)
    for i in range(m):
        Xi = Xb[i, ...]  # (m, n, n): X_ij for all j
        comp = xp.matmul(Xi[:, None, :, :], Xb)  # [j, k] = X_ij X_jk
        bad = xp.any(comp > Xi[None, :, :, :] + 0.5, axis=(2, 3))  # vs X_ik
        ok[i] = ~backend.to_numpy(bad).astype(bool)
    for perm in ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        ok = ok & np.transpose(ok, perm)
    idx = np.array([(a, b, c) for a in range(m) for b in range(a + 1, m) for c in range(b + 1, m)])
    return float(np.mean(ok[idx[:, 0], idx[:, 1], idx[:, 2]]))


def accuracy(result_or_pairs: Any, truth: Any, *, ns: Any = None) -> float:
    """Pairwise matching accuracy against a ground truth.

    ``sum_{i != j} <X_ij, T_ij> / sum_{i != j} <T_ij, T_ij>``: the fraction of true node
    correspondences (over all ordered pairs of distinct graphs) that the matchings contain.
    Nodes without a true partner (outliers: zero rows of ``T_ij``) do not count.

    Parameters
    ----------
    result_or_pairs : MultiMatchResult, array of shape (m, m, n, n), or mapping {(i, j): X_ij}
        0/1 pairwise matchings (see :func:`synchronize` for the forms).
    truth : same forms
        The true matchings ``T_ij``.
    ns : array-like of int, shape (m,), optional
        Graph sizes for array inputs.

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    caller = "accuracy"
    Xb, ns_x, _ = _parse_pairs(result_or_pairs, ns, caller, soft_ok=False)
    Tb, ns_t, _ = _parse_pairs(truth, ns, caller, soft_ok=False, name="truth")
    if not np.array_equal(ns_x, ns_t):
        raise ValueError(
            f"`truth` in {caller} must describe the same graphs as the matchings; got sizes "
            f"{ns_t.tolist()} and {ns_x.tolist()}."
        )
    Xn = backend.to_numpy(Xb).astype(np.float64)
    Tn = backend.to_numpy(Tb).astype(np.float64)
    off = ~np.eye(Xn.shape[0], dtype=bool)
    total = float(Tn[off].sum())
    if total == 0:
        raise ValueError(f"`truth` in {caller} holds no correspondences.")
    return float((Xn[off] * Tn[off]).sum() / total)
