"""Continuous solvers (ga, rrwm, ipfp, sm) and solve(): optimality, parity, backends, errors."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import pytest
from array_api_compat import array_namespace, device
from helpers import brute_force_lawler

from qapfuse import ConvergenceWarning, Problem, ga, ipfp, rrwm, sm, solve
from qapfuse.backend import to_numpy
from qapfuse.solvers import METHODS

CONTINUOUS = ["ga", "ipfp", "rrwm", "sm"]


def _is_partial_permutation(X: np.ndarray, n1: int, n2: int) -> bool:
    return (
        X.shape == (n1, n2)
        and set(np.unique(X)) <= {0.0, 1.0}
        and (X.sum(axis=1) == 1).all()
        and (X.sum(axis=0) <= 1).all()
    )


def isomorphic_pair(n: int, seed: int, noise: float = 0.0):
    """Symmetric weighted graph, its node-permuted copy and the ground-truth matching."""
    rng = np.random.default_rng(seed)
    W = rng.random((n, n)) * (rng.random((n, n)) < 0.6)
    A1 = np.triu(W, 1) + np.triu(W, 1).T
    perm = rng.permutation(n)  # node a of graph 2 is node perm[a] of graph 1
    A2 = A1[np.ix_(perm, perm)]
    if noise:
        E = rng.normal(scale=noise, size=(n, n))
        A2 = A2 + (np.triu(E, 1) + np.triu(E, 1).T) * (A2 > 0)
    truth = np.zeros((n, n))
    truth[perm, np.arange(n)] = 1
    return A1, A2, truth


def pygm_affinity(A1: np.ndarray, A2: np.ndarray) -> np.ndarray:
    """pygmtools' K for two weighted graphs, Gaussian edge kernel (sigma=1)."""
    pygm = pytest.importorskip("pygmtools")
    import functools

    def edges(A):
        c = np.argwhere(A > 0)
        return c, A[c[:, 0], c[:, 1]][:, None]

    c1, e1 = edges(A1)
    c2, e2 = edges(A2)
    kern = functools.partial(pygm.utils.gaussian_aff_fn, sigma=0.1)
    return pygm.utils.build_aff_mat(
        None, e1, c1, None, e2, c2, n1=None, n2=None, edge_aff_fn=kern, backend="numpy"
    )


# ---------------------------------------------------------------------------------------------
# Optimality on tiny problems
# ---------------------------------------------------------------------------------------------


def _tiny_problem(seed: int):
    """Random tiny QAPs: dense symmetric K (even seeds) or Koopmans-Beckmann with a linear term."""
    rng = np.random.default_rng(seed)
    n1, n2 = (5, 5) if seed % 3 else (4, 6)
    if seed % 2 == 0:
        M = rng.random((n1 * n2, n1 * n2))
        return Problem.from_dense(M + M.T, n1, n2), n1, n2
    A, B, L = rng.random((n1, n1)), rng.random((n2, n2)), rng.random((n1, n2))
    return Problem.koopmans_beckmann(A, B, L, sense="min"), n1, n2


def _no_improving_swap(problem: Problem, X: np.ndarray) -> bool:
    """2-opt local optimality: no exchange of two rows' columns (or a row and a free column)."""
    base = problem.score(X[None])[0]
    n1, n2 = X.shape
    cols = list(np.argmax(X, axis=1))
    for i in range(n1):
        for a in range(n2):
            if a == cols[i]:
                continue
            q = cols.copy()
            if a in q:
                j = q.index(a)
                q[i], q[j] = q[j], q[i]
            else:
                q[i] = a
            Y = np.zeros_like(X)
            Y[np.arange(n1), q] = 1
            if problem.score(Y[None])[0] > base + 1e-9:
                return False
    return True


@pytest.mark.parametrize("method", CONTINUOUS)
def test_continuous_plus_two_opt_reaches_brute_force_optimum(method):
    hits, trials = 0, 12
    for seed in range(trials):
        p, n1, n2 = _tiny_problem(seed)
        best, _ = brute_force_lawler(backend_dense(p), n1, n2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            one = solve(p, method, refine="two_opt", rng=seed)
            res = solve(p, method, refine="two_opt", restarts=3, rng=seed)
        for r in (one, res):
            assert _is_partial_permutation(r.X, n1, n2)
            assert r.score <= best + 1e-9
            assert _no_improving_swap(p, r.X)
        assert res.score >= one.score - 1e-12
        hits += bool(np.isclose(res.score, best))
    assert hits >= 8, f"{method}+two_opt hit the optimum on {hits}/{trials}"


def backend_dense(p: Problem) -> np.ndarray:
    return p.to_dense()[0]


@pytest.mark.parametrize("method", CONTINUOUS)
def test_exact_on_isomorphic_pairs(method):
    for seed in range(3):
        A1, A2, truth = isomorphic_pair(7, seed)
        p = Problem.koopmans_beckmann(A1, A2)
        res = solve(p, method)
        best, _ = brute_force_lawler(p.to_dense()[0], 7, 7)
        assert np.isclose(res.score, best)
        assert np.isclose(p.score(truth[None])[0], best)


# ---------------------------------------------------------------------------------------------
# Parity with pygmtools on the same K
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("method", ["rrwm", "ipfp", "sm"])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_same_matching_as_pygmtools_on_the_same_dense_k(method, noise):
    pygm = pytest.importorskip("pygmtools")
    agree = 0
    for seed in range(4):
        A1, A2, truth = isomorphic_pair(10, seed, noise)
        K = pygm_affinity(A1, A2)
        soft = getattr(pygm, method)(K, 10, 10, backend="numpy")
        X_ref = pygm.hungarian(soft, backend="numpy")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = solve(Problem.from_dense(K, 10, 10), method)
        agree += bool(np.array_equal(res.X, X_ref))
        if noise == 0.0:
            np.testing.assert_array_equal(res.X, truth)
    assert agree >= 3


def test_sm_eigenvector_matches_pygmtools():
    pygm = pytest.importorskip("pygmtools")
    A1, A2, _ = isomorphic_pair(8, 11, 0.05)
    K = pygm_affinity(A1, A2)
    ref = pygm.sm(K, 8, 8, backend="numpy")
    res = sm(Problem.from_dense(K, 8, 8))
    np.testing.assert_allclose(
        res.soft / np.linalg.norm(res.soft), ref / np.linalg.norm(ref), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Backends and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CONTINUOUS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_and_torch_give_the_same_matching(method, dtype):
    torch = pytest.importorskip("torch")
    A1, A2, truth = isomorphic_pair(12, 3, 0.01)
    p_np = Problem.koopmans_beckmann(A1.astype(dtype), A2.astype(dtype))
    p_t = Problem.koopmans_beckmann(torch.tensor(A1.astype(dtype)), torch.tensor(A2.astype(dtype)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        r_np, r_t = solve(p_np, method), solve(p_t, method)
    assert isinstance(r_t.X, torch.Tensor) and str(r_t.X.dtype) == f"torch.{dtype}"
    assert r_np.X.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(to_numpy(r_t.X), r_np.X)
    if method != "sm":  # SM's eigenvector is not sharp enough to recover the truth under noise
        np.testing.assert_array_equal(r_np.X, truth)


def test_ga_runs_on_every_array_library(xp):
    A1, A2, truth = isomorphic_pair(6, 4)
    p = Problem.koopmans_beckmann(xp.asarray(A1), xp.asarray(A2))
    res = ga(p)
    assert array_namespace(res.X) is xp and device(res.X) == device(p.affinity.A)
    np.testing.assert_array_equal(to_numpy(res.X), truth)


def test_batched_problems_with_padding_solve_each_instance():
    A = np.zeros((2, 7, 7))
    B = np.zeros((2, 7, 7))
    truths = []
    for k, n in enumerate((7, 5)):
        A1, A2, t = isomorphic_pair(n, 20 + k)
        A[k, :n, :n], B[k, :n, :n] = A1, A2
        truths.append(t)
    p = Problem.koopmans_beckmann(A, B, n1=[7, 5], n2=[7, 5])
    for method in CONTINUOUS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # sm: slow power iteration
            res = solve(p, method)
        assert res.X.shape == (2, 7, 7) and np.shape(res.score) == (2,)
        np.testing.assert_array_equal(res.X[0], truths[0])
        np.testing.assert_array_equal(res.X[1, :5, :5], truths[1])
        assert res.X[1, 5:].sum() == 0 and res.X[1, :, 5:].sum() == 0


def test_partial_matching_maps_the_small_graph_into_the_large_one():
    A1, _, _ = isomorphic_pair(8, 5)
    keep = np.array([0, 2, 3, 5, 6])
    p = Problem.koopmans_beckmann(A1[np.ix_(keep, keep)], A1)
    res = ga(p)
    assert _is_partial_permutation(res.X, 5, 8)
    np.testing.assert_array_equal(res.permutation, keep)


# ---------------------------------------------------------------------------------------------
# solve(): dispatch, restarts, options, warnings
# ---------------------------------------------------------------------------------------------


def test_restarts_never_worse_and_counted():
    rng = np.random.default_rng(6)
    A, B = rng.random((9, 9)), rng.random((9, 9))
    p = Problem.koopmans_beckmann(A, B, sense="min")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one = solve(p, "ipfp", rng=1)
        many = solve(p, "ipfp", restarts=6, rng=1)
        again = solve(p, "ipfp", restarts=6, rng=1)
    assert many.info["restarts"] == 6
    assert many.objective <= one.objective + 1e-12
    assert again.objective == many.objective  # same rng, same answer


def test_warm_start_is_used():
    A1, A2, truth = isomorphic_pair(9, 7)
    p = Problem.koopmans_beckmann(A1, A2)
    res = ipfp(p, x0=truth)
    np.testing.assert_array_equal(res.X, truth)
    assert res.n_iter <= 2  # the LAP answer at the start repeats at once


def test_min_sense_reports_cost():
    rng = np.random.default_rng(8)
    A, B = rng.integers(0, 5, (6, 6)), rng.integers(0, 5, (6, 6))
    p = Problem.koopmans_beckmann(A, B, sense="min")
    res = ga(p)
    perm = res.permutation
    assert res.objective == pytest.approx((A * B[np.ix_(perm, perm)]).sum())
    assert res.score == pytest.approx(-res.objective)


def test_convergence_warning_points_at_the_caller():
    A1, A2, _ = isomorphic_pair(8, 9, 0.1)
    p = Problem.koopmans_beckmann(A1, A2)
    with pytest.warns(ConvergenceWarning, match=r"rrwm stopped at max_iter=1") as rec:
        rrwm(p, max_iter=1)
    assert rec[0].filename == __file__
    with pytest.warns(ConvergenceWarning, match=r"ga stopped at max_inner=1") as rec:
        solve(p, "ga", max_inner=1)
    assert rec[0].filename == __file__


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(method="rwm"), ValueError, r"'method'.*Did you mean 'rrwm'"),
        (dict(method="ga", tua0=1.0), TypeError, r"unknown option.*'tua0'.*did you mean 'tau0'"),
        (dict(method="ga", tau0=-1.0), ValueError, r"'tau0' parameter of solve\(method='ga'\)"),
        (dict(method="sm", max_iter=10.0), TypeError, r"'max_iter'.*must be an int"),
        (dict(method="ga", restarts=0), ValueError, r"'restarts' parameter of solve"),
        (dict(method="ga", refine="three_opt"), ValueError, r"'refine'.*'two_opt', 'tabu'"),
        (dict(method="ga", rng="seed"), TypeError, r"'rng' parameter"),
        (dict(method="ga", x0=np.ones((3, 3))), ValueError, r"'x0'.*shape \(4, 4\)\. Got \(3, 3\)"),
    ],
)
def test_bad_options_are_named(kwargs, exc, match):
    p = Problem.koopmans_beckmann(np.eye(4), np.eye(4))
    with pytest.raises(exc, match=match):
        solve(p, **kwargs)


def test_solve_refuses_non_problem():
    with pytest.raises(TypeError, match=r"'problem' parameter of solve must be a qapfuse.Problem"):
        solve(np.eye(4))


def test_ga_ignores_a_constant_added_to_k_and_its_scale():
    rng = np.random.default_rng(12)
    A, B = rng.random((8, 8)), rng.random((8, 8))
    p = Problem.koopmans_beckmann(A, B, sense="min")
    K = p.to_dense()[0]
    shifted = Problem.from_dense(3.0 * (K - K.min()) + 5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.testing.assert_array_equal(ga(shifted).X, ga(p).X)


# ---------------------------------------------------------------------------------------------
# time_limit: a deadline checked between iterations

TIMED = ["ga", "ipfp", "rrwm", "sm"]


def _slow_problem():
    """A problem none of the timed methods settles on in one iteration."""
    A1, A2, _ = isomorphic_pair(12, 4, noise=0.3)
    return Problem.koopmans_beckmann(A1, A2)


@pytest.mark.parametrize("method", TIMED)
def test_time_limit_stops_a_single_run_between_iterations(method):
    p = _slow_problem()
    func = {"ga": ga, "ipfp": ipfp, "rrwm": rrwm, "sm": sm}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full = func(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a time stop is not a failure
        res = func(p, time_limit=1e-9)
    assert full.n_iter > 1
    assert res.n_iter == 1 < full.n_iter
    assert res.info["stopped"] == "time_limit"
    assert full.info["stopped"] != "time_limit"
    assert _is_partial_permutation(to_numpy(res.X), 12, 12)
    assert res.score == pytest.approx(float(p.score(res.X[None])[0]))


@pytest.mark.parametrize("method", TIMED)
def test_solve_hands_each_run_a_share_of_its_time_limit(method, monkeypatch):
    p = _slow_problem()
    real, deadlines = METHODS[method], []

    def spy(problem, **options):
        if problem is p:  # not the warm-up on a tiny problem
            deadlines.append(time.perf_counter() + options["time_limit"])
        return real.func(problem, **options)

    monkeypatch.setitem(METHODS, method, dataclasses.replace(real, func=spy))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solve(p, method, time_limit=5.0, restarts=3, rng=0)
    assert len(deadlines) == res.info["restarts"] == 3
    # No run may end past the call's limit (up to solve's own bookkeeping).
    assert all(d <= start + 5.0 + 0.1 for d in deadlines)
    assert deadlines[0] <= start + 5.0 / 3 + 0.5  # the first run gets about a third


@pytest.mark.parametrize("method", TIMED)
def test_solve_starts_no_restart_past_its_time_limit(method):
    p = _slow_problem()
    for refine in (None, "two_opt"):
        res = solve(p, method, refine=refine, time_limit=1e-9, restarts=5, rng=0)
        assert res.info["restarts"] == 1
        assert _is_partial_permutation(to_numpy(res.X), 12, 12)


def test_a_refined_start_needs_no_convergence_warning():
    rng = np.random.default_rng(0)
    A, B = rng.random((8, 8)), rng.random((8, 8))
    p = Problem.koopmans_beckmann(A, B, sense="min")
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        solve(p, "rrwm", max_iter=2)
    assert any(issubclass(w.category, ConvergenceWarning) for w in plain)
    with warnings.catch_warnings(record=True) as refined:
        warnings.simplefilter("always")
        res = solve(p, "rrwm", refine="two_opt", max_iter=2, rng=0)
    assert not refined
    assert res.info["start_converged"] is False


def test_solve_logs_one_progress_line_per_restart(caplog):
    import logging

    from qapfuse.io import qaplib

    problem = Problem.from_qaplib(qaplib.example_path("nug12"))
    with caplog.at_level(logging.INFO, logger="qapfuse"):
        res = solve(problem, "ga", refine="two_opt", restarts=3, rng=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("solve(ga")]
    assert len(lines) == res.info["restarts"] == 3
    assert lines[-1].endswith(f"best so far {res.objective:.10g}")
