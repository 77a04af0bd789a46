"""Graduated assignment: a time limit bounds one run."""

from __future__ import annotations

import time
import warnings

import numpy as np

from qapfuse import ConvergenceWarning, Problem, ga


def _kb(n, seed):
    rng = np.random.default_rng(seed)
    return Problem.koopmans_beckmann(rng.random((n, n)), rng.random((n, n)), sense="min")


def _is_permutation(X):
    return set(np.unique(X)) <= {0.0, 1.0} and np.all(X.sum(0) == 1) and np.all(X.sum(1) == 1)


def test_ga_time_limit_stops_between_iterations_and_rounds_the_iterate():
    p = _kb(12, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full = ga(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a time stop is not a failure
        res = ga(p, time_limit=1e-9)
    assert full.info["stopped"] == "done" and full.n_iter > 1
    assert res.info["stopped"] == "time_limit" and not res.converged
    assert res.n_iter == 1
    assert _is_permutation(res.X)
    assert res.score == float(p.score(res.X[None])[0])


def test_ga_time_limit_bounds_a_long_run():
    p = _kb(100, 1)  # thousands of iterations without a limit
    t = time.perf_counter()
    res = ga(p, tau_min=1e-6, decay=0.95, max_inner=200, tol=1e-12, time_limit=0.05)
    assert time.perf_counter() - t < 10 * 0.05 + 1.0  # generous: the machine is shared
    assert res.info["stopped"] == "time_limit"
    assert res.n_iter < res.info["stages"]
    assert _is_permutation(res.X)
