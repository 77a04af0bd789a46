"""Graph helpers: seeded generators with a correct ground truth, connectivity, metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qapfuse.affinity import build_aff_mat, gaussian_kernel
from qapfuse.graphs import (
    delaunay_connectivity,
    dense_to_edges,
    full_connectivity,
    isomorphic_pair,
    knn_connectivity,
    matching_metrics,
    noisy_pair,
    point_pair,
)


def _score(K, X):
    v = X.T.reshape(-1)
    return float(v @ K @ v)


def _adj(conn, feat, n):
    A = np.zeros((n, n))
    A[conn[:, 0], conn[:, 1]] = feat[:, 0]
    return A


@pytest.mark.parametrize("gen", [isomorphic_pair, noisy_pair, point_pair])
def test_generators_are_seeded(gen):
    a, b, c = gen(9, rng=3), gen(9, rng=3), gen(9, rng=4)
    for f in ("conn1", "edge_feat1", "conn2", "edge_feat2", "X_gt"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.X_gt, c.X_gt) or not np.array_equal(a.conn1, c.conn1)


def test_isomorphic_pair_ground_truth_is_an_isomorphism():
    pair = isomorphic_pair(12, density=0.4, node_feat_dim=3, rng=0)
    P = pair.X_gt
    assert np.all(P.sum(0) == 1) and np.all(P.sum(1) == 1)
    A = _adj(pair.conn1, pair.edge_feat1, 12)
    B = _adj(pair.conn2, pair.edge_feat2, 12)
    np.testing.assert_allclose(P.T @ A @ P, B)
    np.testing.assert_allclose(P.T @ pair.node_feat1, pair.node_feat2)
    np.testing.assert_allclose(A, A.T)  # undirected: both directions present


@pytest.mark.parametrize("kernel", ["inner_product", gaussian_kernel(0.5)])
def test_ground_truth_maximises_the_score_on_a_noiseless_pair(kernel):
    pair = isomorphic_pair(6, density=0.6, rng=1)
    K = build_aff_mat(*pair.aff_args(), edge_aff=kernel, dtype="float64")
    best = max(
        _score(K, np.eye(6)[list(p)]) for p in itertools.permutations(range(6))
    )  # every permutation matrix X[i, p(i)] = 1
    assert _score(K, pair.X_gt) == pytest.approx(best, rel=1e-12)


def test_noisy_pair_with_outliers_on_both_sides():
    pair = noisy_pair(20, noise=0.05, drop=0.1, outliers1=3, outliers2=5, node_feat_dim=2, rng=2)
    assert (pair.n1, pair.n2) == (23, 25) and pair.X_gt.shape == (23, 25)
    assert pair.X_gt.sum() == 20
    assert (pair.perm >= 0).sum() == 20 and pair.perm.shape == (23,)
    assert pair.node_feat1.shape == (23, 2) and pair.node_feat2.shape == (25, 2)
    A = _adj(pair.conn1, pair.edge_feat1, 23)
    B = _adj(pair.conn2, pair.edge_feat2, 25)
    rows, cols = np.nonzero(pair.X_gt)
    Ai, Bi = A[np.ix_(rows, rows)], B[np.ix_(cols, cols)]
    both = (Ai != 0) & (Bi != 0)
    assert 0 < np.abs(Ai - Bi)[both].max() < 0.5  # weight noise on kept edges
    assert ((Ai != 0) & (Bi == 0)).sum() > 0  # dropped edges
    assert ((Ai == 0) & (Bi != 0)).sum() == 0  # noise adds none


@pytest.mark.parametrize("connectivity", ["delaunay", "knn", "full"])
def test_point_pair_edges_are_lengths(connectivity):
    pair = point_pair(15, connectivity=connectivity, k=3, outliers1=2, outliers2=4, rng=5)
    for c, f, P in (
        (pair.conn1, pair.edge_feat1, pair.points1),
        (pair.conn2, pair.edge_feat2, pair.points2),
    ):
        np.testing.assert_allclose(f[:, 0], np.linalg.norm(P[c[:, 0]] - P[c[:, 1]], axis=1))
    # noiseless rotation: matched edges have the same length
    rows, cols = np.nonzero(pair.X_gt)
    d1 = np.linalg.norm(pair.points1[rows][:, None] - pair.points1[rows][None], axis=-1)
    d2 = np.linalg.norm(pair.points2[cols][:, None] - pair.points2[cols][None], axis=-1)
    np.testing.assert_allclose(d1, d2, atol=1e-12)


def test_connectivity_helpers():
    assert full_connectivity(3).tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]]
    assert full_connectivity(2, self_loops=True).shape == (4, 2)
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.1, 1.1]])
    e = delaunay_connectivity(square)
    assert len(e) == 10  # 4 sides + 1 diagonal, both directions
    assert {tuple(x) for x in e} == {tuple(x[::-1]) for x in e}
    P = np.random.default_rng(0).random((50, 2))
    assert 5.0 <= len(delaunay_connectivity(P)) / 50 <= 6.0
    e = knn_connectivity(P, 3)
    out_deg = np.bincount(e[:, 0], minlength=50)
    assert out_deg.min() >= 3
    c, f = dense_to_edges(np.array([[0.0, 2.0], [3.0, 0.0]]))
    assert c.tolist() == [[0, 1], [1, 0]] and f[:, 0].tolist() == [2.0, 3.0]


def test_matching_metrics_partial():
    gt = np.zeros((4, 5))
    gt[0, 1] = gt[1, 0] = gt[2, 3] = 1  # node 3 of graph 1 is an outlier
    X = np.zeros((4, 5))
    X[0, 1] = X[1, 2] = X[3, 4] = 1  # one right, one wrong, outlier matched; node 2 left out
    m = matching_metrics(X, gt)
    assert m["tp"] == 1
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(1 / 4)
    X2 = gt.copy()
    m2 = matching_metrics(X2, gt)
    assert m2["accuracy"] == m2["precision"] == m2["recall"] == m2["f1"] == 1.0
    mb = matching_metrics(np.stack([X, X2]), np.stack([gt, gt]))
    np.testing.assert_allclose(mb["f1"], [1 / 3, 1.0])
    none = matching_metrics(np.zeros((2, 2)), np.zeros((2, 2)))
    assert none["f1"] == 1.0 and none["accuracy"] == 1.0


def test_metrics_and_generators_reject_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        matching_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"`X` .* 0/1"):
        matching_metrics(np.full((2, 2), 0.5), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="'drop' parameter of noisy_pair"):
        noisy_pair(5, drop=1.5)
    with pytest.raises(ValueError, match="'outliers1' parameter of point_pair"):
        point_pair(5, outliers1=-1)
    with pytest.raises(ValueError, match="'connectivity' parameter"):
        point_pair(5, connectivity="delauney")
    with pytest.raises(ValueError, match="`points`"):
        delaunay_connectivity(np.zeros(4))
