"""Partial matching with outliers on both sides: slack Sinkhorn, rounding, GA with slack."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from qapfuse import Problem, solve
from qapfuse.affinity import gaussian_kernel, graph_matching_problem
from qapfuse.graphs import matching_metrics, noisy_pair, point_pair
from qapfuse.solvers._partial import (
    match_with_outliers,
    partial_hungarian,
    sinkhorn_slack,
    sinkhorn_slack_sparse,
)

torch = pytest.importorskip("torch")


def test_sinkhorn_slack_marginals_and_outliers():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(4, 6))
    P, u1, u2 = sinkhorn_slack(S, slack=0.3, tau=0.5, max_iter=2000, tol=1e-9)
    np.testing.assert_allclose(P.sum(1) + u1, 1.0, atol=1e-8)
    np.testing.assert_allclose(P.sum(0) + u2, 1.0, atol=1e-8)
    assert np.all(P >= 0)
    # a very attractive slack leaves everything unmatched; a repulsive one matches all rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-unmatched corner converges slowly
        P_hi, u1_hi, _ = sinkhorn_slack(S, slack=50.0, tau=0.5, max_iter=500)
    assert P_hi.max() < 1e-6 and u1_hi.min() > 0.99
    _P_lo, u1_lo, _ = sinkhorn_slack(S, slack=-50.0, tau=0.5, max_iter=2000)
    assert u1_lo.max() < 1e-6


def test_sinkhorn_slack_batched_padding_and_torch():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(2, 3, 4))
    kw = dict(slack=0.1, tau=0.5, max_iter=5000, tol=1e-13)
    P, _u1, _u2 = sinkhorn_slack(S, [3, 2], [4, 3], **kw)
    assert P[1, 2].max() == 0 and P[1, :, 3].max() == 0
    P1, _, _ = sinkhorn_slack(S[1, :2, :3], **kw)
    np.testing.assert_allclose(P[1, :2, :3], P1, atol=1e-10)
    Pt, _, _ = sinkhorn_slack(torch.as_tensor(S), [3, 2], [4, 3], **kw)
    assert isinstance(Pt, torch.Tensor)
    np.testing.assert_allclose(Pt.numpy(), P, atol=1e-10)
    with pytest.raises(ValueError, match="'tau' parameter of sinkhorn_slack"):
        sinkhorn_slack(S, tau=0.0)
    with pytest.raises(ValueError, match="`S` contains NaN"):
        sinkhorn_slack(np.full((2, 2), np.nan))


def test_partial_hungarian_is_the_best_partial_matching():
    rng = np.random.default_rng(2)
    for _ in range(5):
        W = rng.normal(size=(3, 4))
        X = partial_hungarian(W)
        best = 0.0
        for k in range(4):  # brute force over every partial matching
            for rows in itertools.combinations(range(3), k):
                for cols in itertools.permutations(range(4), k):
                    best = max(best, sum(W[r, c] for r, c in zip(rows, cols)))
        assert (X * W).sum() == pytest.approx(best)
        assert X.sum(0).max() <= 1 and X.sum(1).max() <= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_match_with_outliers_recovers_inliers_and_leaves_outliers(seed):
    pair = noisy_pair(25, noise=0.02, outliers1=4, outliers2=6, rng=seed)
    p = graph_matching_problem(*pair.aff_args(), edge_aff=gaussian_kernel(0.05), dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = match_with_outliers(p, slack=0.5)  # random outlier edges: a high threshold
        full = solve(p, "ga")
    m = matching_metrics(res.X, pair.X_gt)
    assert m["f1"] >= 0.9 and m["precision"] >= 0.9
    # the full matcher must match every graph-1 node, outliers included
    assert matching_metrics(full.X, pair.X_gt)["precision"] <= 25 / 29 + 1e-9
    matched1, matched2 = res.info["matched1"], res.info["matched2"]
    np.testing.assert_array_equal(matched1, res.X.sum(1) > 0)
    np.testing.assert_array_equal(matched2, res.X.sum(0) > 0)
    outliers1 = pair.X_gt.sum(1) == 0
    assert matched1[outliers1].mean() <= 0.25
    assert res.score == pytest.approx(float(p.score(res.X[None])[0]))


def test_match_with_outliers_batched_and_torch():
    pairs = [noisy_pair(10, outliers1=1, outliers2=2, rng=s) for s in (3, 4)]
    ne = max(len(q.conn1) for q in pairs), max(len(q.conn2) for q in pairs)

    def pad(a, n):
        return np.concatenate([a, np.zeros((n - len(a), a.shape[1]), a.dtype)])

    args = (
        None,
        np.stack([pad(q.edge_feat1, ne[0]) for q in pairs]),
        np.stack([pad(q.conn1, ne[0]) for q in pairs]),
        None,
        np.stack([pad(q.edge_feat2, ne[1]) for q in pairs]),
        np.stack([pad(q.conn2, ne[1]) for q in pairs]),
        [11, 11],
        [len(q.conn1) for q in pairs],
        [12, 12],
        [len(q.conn2) for q in pairs],
    )
    kw = dict(edge_aff=gaussian_kernel(0.05), dtype="float64")
    p = graph_matching_problem(*args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = match_with_outliers(p)
        tens = [torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in args]
        res_t = match_with_outliers(graph_matching_problem(*tens, **kw))
    assert res.X.shape == (2, 11, 12) and res.info["matched1"].shape == (2, 11)
    assert isinstance(res_t.X, torch.Tensor)
    np.testing.assert_array_equal(res_t.X.numpy(), res.X)
    for k, q in enumerate(pairs):
        assert matching_metrics(res.X[k], q.X_gt)["f1"] >= 0.8


def test_match_with_outliers_options_are_checked():
    p = Problem.from_dense(np.eye(4))
    with pytest.raises(TypeError, match=r"must be a qapfuse\.Problem"):
        match_with_outliers(np.eye(4))
    with pytest.raises(ValueError, match="'decay' parameter of match_with_outliers"):
        match_with_outliers(p, decay=1.5)
    with pytest.raises(ValueError, match="tau_min"):
        match_with_outliers(p, tau0=0.1, tau_min=0.5)


def _dense_on_support(S, C, slack, tau, iters):
    """Reference: the dense slack Sinkhorn with pairs outside `C` left out of the mask."""
    from qapfuse.solvers._sinkhorn import Sinkhorn

    n1, n2 = S.shape
    project = Sinkhorn(C[None], slack=([n1], [n2]), max_iter=iters, tol=1e-12, check_every=5)
    P = project(S[None], tau, slack=slack)[0]
    assert project.err < 1e-9
    ref = np.zeros((n1 + 1, n2 + 1))
    ref[:n1, :n2], ref[:n1, n2], ref[n1, :n2] = P, project.unmatched1[0], project.unmatched2[0]
    return ref


@pytest.mark.parametrize("slack", [-0.2, 0.3])
def test_sinkhorn_slack_sparse_equals_dense_on_the_same_support(slack):
    rng = np.random.default_rng(5)
    S = rng.normal(size=(6, 8))
    C = rng.random((6, 8)) < 0.4
    C[5] = False  # a row without candidates: all its mass goes to the slack column
    rows, cols = np.nonzero(C)
    p, u1, u2 = sinkhorn_slack_sparse(
        S[rows, cols], rows, cols, 6, 8, slack=slack, tau=0.5, max_iter=5000, tol=1e-12
    )
    ref = _dense_on_support(S, C, slack, 0.5, 5000)
    np.testing.assert_allclose(p, ref[rows, cols], atol=1e-9)
    np.testing.assert_allclose(u1, ref[:6, 8], atol=1e-9)
    np.testing.assert_allclose(u2, ref[6, :8], atol=1e-9)
    P = np.zeros((6, 8))
    P[rows, cols] = p
    np.testing.assert_allclose(P.sum(1) + u1, 1.0, atol=1e-9)
    np.testing.assert_allclose(P.sum(0) + u2, 1.0, atol=1e-9)
    assert u1[5] == pytest.approx(1.0)
    # the full support gives sinkhorn_slack
    r2, c2 = np.nonzero(np.ones((6, 8), bool))
    pf, _, _ = sinkhorn_slack_sparse(
        S.ravel(), r2, c2, 6, 8, slack=slack, tau=0.5, max_iter=5000, tol=1e-12
    )
    Pd, _, _ = sinkhorn_slack(S, slack=slack, tau=0.5, max_iter=5000, tol=1e-12)
    np.testing.assert_allclose(pf.reshape(6, 8), Pd, atol=1e-9)


def test_sinkhorn_slack_sparse_checks_its_input():
    r = np.array([0, 1])
    with pytest.raises(ValueError, match=r"`rows` in sinkhorn_slack_sparse must lie in \[0, 1\)"):
        sinkhorn_slack_sparse(np.ones(2), r, r, 1, 2)
    with pytest.raises(ValueError, match="1-D of one length"):
        sinkhorn_slack_sparse(np.ones(3), r, r, 2, 2)
    with pytest.raises(TypeError, match="'values' parameter of sinkhorn_slack_sparse"):
        sinkhorn_slack_sparse([1.0, 2.0], r, r, 2, 2)
    with pytest.raises(ValueError, match="`values` in sinkhorn_slack_sparse contains NaN"):
        sinkhorn_slack_sparse(np.array([1.0, np.nan]), r, r, 2, 2)
    with pytest.raises(ValueError, match="'tau' parameter of sinkhorn_slack_sparse"):
        sinkhorn_slack_sparse(np.ones(2), r, r, 2, 2, tau=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_match_with_outliers_on_candidates_recovers_the_inliers(seed):
    pair = point_pair(
        150, noise=0.002, outliers1=15, outliers2=15, node_feat_dim=16, node_noise=1.0, rng=seed
    )
    kw = dict(
        edge_aff=gaussian_kernel(2e-5 * 1000 / 150),
        node_aff=gaussian_kernel(16.0),
        threshold=1e-2,
        dtype="float64",
    )
    skw = dict(slack=0.05, tau0=0.5, tau_min=0.02, decay=0.5, max_inner=3, sk_iter=10)
    p = graph_matching_problem(*pair.aff_args(), candidates=20, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = match_with_outliers(p, **skw)
    m = matching_metrics(res.X, pair.X_gt)
    assert m["f1"] >= 0.9 and m["precision"] >= 0.95
    C = p.affinity.candidates[0]
    assert not res.X[~C].any()  # only candidate pairs are matched
    assert res.info["support"] == int(C.sum())
    np.testing.assert_array_equal(res.info["matched1"], res.X.sum(1) > 0)
    np.testing.assert_array_equal(res.info["matched2"], res.X.sum(0) > 0)
    assert res.score == pytest.approx(float(p.score(res.X[None])[0]))
    assert res.soft.shape == (165, 165) and not res.soft[~C].any()


def test_match_with_outliers_on_all_candidates_equals_the_dense_path():
    pair = point_pair(20, noise=0.002, outliers1=2, outliers2=3, node_feat_dim=4, rng=2)
    kw = dict(edge_aff=gaussian_kernel(0.01), node_aff=gaussian_kernel(4.0), dtype="float64")
    skw = dict(slack=0.05, tau0=0.5, tau_min=0.05, decay=0.5, max_inner=5, sk_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = match_with_outliers(graph_matching_problem(*pair.aff_args(), **kw), **skw)
        cand = match_with_outliers(
            graph_matching_problem(*pair.aff_args(), candidates=23, **kw), **skw
        )
    np.testing.assert_allclose(cand.soft, full.soft, atol=1e-5)
    np.testing.assert_array_equal(cand.X, full.X)


def test_sinkhorn_slack_sparse_log_domain_fallback_matches_dense():
    # scores spanning more than 700 after / tau: both take the log domain, same iterations
    rng = np.random.default_rng(6)
    S = rng.normal(size=(5, 7))
    r, c = np.nonzero(np.ones((5, 7), bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, u1, _ = sinkhorn_slack_sparse(S.ravel(), r, c, 5, 7, slack=0.1, tau=2e-3, max_iter=50)
        P, v1, _ = sinkhorn_slack(S, slack=0.1, tau=2e-3, max_iter=50)
    assert np.ptp(S) / 2e-3 > 700
    np.testing.assert_allclose(p.reshape(5, 7), P, atol=1e-10)
    np.testing.assert_allclose(u1, v1, atol=1e-10)


@pytest.mark.parametrize("candidates", [None, 20])
def test_match_with_outliers_time_limit_stops_between_iterations(candidates):
    pair = point_pair(
        40, noise=0.002, outliers1=4, outliers2=4, node_feat_dim=16, node_noise=1.0, rng=0
    )
    kw = dict(edge_aff=gaussian_kernel(0.05), node_aff=gaussian_kernel(16.0), dtype="float64")
    p = graph_matching_problem(*pair.aff_args(), candidates=candidates, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = match_with_outliers(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a time stop is not a failure
        res = match_with_outliers(p, time_limit=1e-9)
    assert full.info["stopped"] == "done" and full.n_iter > 1
    assert res.info["stopped"] == "time_limit" and res.n_iter == 1 and not res.converged
    X = res.X
    assert set(np.unique(X)) <= {0.0, 1.0}
    assert X.sum(axis=0).max() <= 1 and X.sum(axis=1).max() <= 1
    np.testing.assert_array_equal(res.info["matched1"], X.sum(axis=1) > 0)
