"""Shared fixtures: array namespaces, tiny brute-force helpers, data locations."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import array_namespace

SHARED = Path(__file__).resolve().parents[2] / "shared"
QAPLIB_DIR = SHARED / "qaplib"


@pytest.fixture(params=["numpy", "torch", "array_api_strict"])
def xp(request):
    """Every array library the core must serve (torch missing means a skip, not a failure)."""
    lib = pytest.importorskip(request.param)
    return array_namespace(lib.empty(0))


@pytest.fixture(params=["numpy", "torch"])
def xp_np_torch(request):
    lib = pytest.importorskip(request.param)
    return array_namespace(lib.empty(0))


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
