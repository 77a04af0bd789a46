"""Small helpers shared by test modules."""

from __future__ import annotations

import itertools

import numpy as np


def brute_force_lawler(K: np.ndarray, n1: int, n2: int) -> tuple[float, list[tuple[int, ...]]]:
    """Best score of vec(X)^T K vec(X) over partial permutations (column-major vec) and argmaxes."""
    best, arg = -np.inf, []
    for cols in itertools.permutations(range(n2), n1):
        idx = np.arange(n1) + np.asarray(cols) * n1
        s = K[np.ix_(idx, idx)].sum()
        if s > best + 1e-9:
            best, arg = s, [cols]
        elif abs(s - best) <= 1e-9:
            arg.append(cols)
    return float(best), arg
