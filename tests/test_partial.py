"""Partial matching with outliers on both sides: slack Sinkhorn, rounding, GA with slack."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from qapfuse import Problem, solve
from qapfuse.affinity import gaussian_kernel, graph_matching_problem
from qapfuse.graphs import matching_metrics, noisy_pair
from qapfuse.solvers.partial import match_with_outliers, partial_hungarian, sinkhorn_slack

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
