"""Graph helpers for matching: seeded pair generators, connectivity from points, metrics.

* Generators return a :class:`GraphPair` with edge lists in the format of
  :func:`qapfuse.affinity.build_aff_mat` and the ground truth ``X_gt``:
  :func:`isomorphic_pair` (a weighted graph and a node-permuted copy), :func:`noisy_pair`
  (weight noise, dropped edges, outlier nodes on either side) and :func:`point_pair`
  (2-D point sets with full, kNN or Delaunay connectivity, edge length features).
* Connectivity: :func:`full_connectivity`, :func:`knn_connectivity`,
  :func:`delaunay_connectivity` (``scipy.spatial.Delaunay``), :func:`dense_to_edges`.
* Metrics: :func:`matching_metrics` (accuracy, precision, recall, F1; partial matchings).

Every edge list holds both directions of an undirected edge, so the built ``K`` is symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backend
from ._validation import check_choice, check_scalar
from .backend import Array

__all__ = [
    "GraphPair",
    "delaunay_connectivity",
    "dense_to_edges",
    "full_connectivity",
    "isomorphic_pair",
    "knn_connectivity",
    "matching_metrics",
    "noisy_pair",
    "point_pair",
]


@dataclass(frozen=True, kw_only=True)
class GraphPair:
    """Two graphs and the true correspondence between them.

    Attributes
    ----------
    conn1, conn2 : int64 array of shape (ne1, 2) / (ne2, 2)
        Directed edges (start, end); undirected edges appear in both directions.
    edge_feat1, edge_feat2 : float64 array of shape (ne1, 1) / (ne2, 1)
        Edge weights (or lengths for :func:`point_pair`).
    node_feat1, node_feat2 : float64 array of shape (n1, dn) / (n2, dn), or None
        Node features (descriptors), when asked for.
    n1, n2 : int
        Node counts (inliers plus outliers).
    X_gt : float64 array of shape (n1, n2)
        ``X_gt[i, a] = 1`` if node ``i`` of graph 1 is node ``a`` of graph 2; outlier rows and
        columns are all zero.
    points1, points2 : float64 array of shape (n1, 2) / (n2, 2), or None
        Node positions (:func:`point_pair`).
    """

    conn1: np.ndarray
    edge_feat1: np.ndarray
    conn2: np.ndarray
    edge_feat2: np.ndarray
    n1: int
    n2: int
    X_gt: np.ndarray
    node_feat1: np.ndarray | None = None
    node_feat2: np.ndarray | None = None
    points1: np.ndarray | None = None
    points2: np.ndarray | None = None

    @property
    def perm(self) -> np.ndarray:
        """``perm[i]`` = the node of graph 2 matched to node ``i`` of graph 1, or -1."""
        out = np.full(self.n1, -1, dtype=np.int64)
        rows, cols = np.nonzero(self.X_gt)
        out[rows] = cols
        return out

    def aff_args(self) -> tuple[Any, ...]:
        """Positional arguments for :func:`~qapfuse.affinity.build_aff_mat`.

        ``(node_feat1, edge_feat1, conn1, node_feat2, edge_feat2, conn2, n1, ne1, n2, ne2)``.
        """
        return (
            self.node_feat1,
            self.edge_feat1,
            self.conn1,
            self.node_feat2,
            self.edge_feat2,
            self.conn2,
            self.n1,
            None,
            self.n2,
            None,
        )


# ----------------------------------------------------------------------------------------------
# Connectivity
# ----------------------------------------------------------------------------------------------


def full_connectivity(n: int, *, self_loops: bool = False) -> np.ndarray:
    """All ordered pairs ``(i, j)`` of ``n`` nodes, ``i != j`` unless `self_loops`: (ne, 2)."""
    check_scalar(n, "n", "full_connectivity", integer=True, low=0, low_inclusive=True)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    keep = np.ones((n, n), bool) if self_loops else ~np.eye(n, dtype=bool)
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)


def _points(points: Any, caller: str) -> np.ndarray:
    P = np.asarray(backend.to_numpy(points), dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"`points` in {caller} must have shape (n, dim); got {P.shape}.")
    if not np.all(np.isfinite(P)):
        raise ValueError(f"`points` in {caller} contains NaN or Inf.")
    return P


def _both_ways(pairs: np.ndarray) -> np.ndarray:
    """Undirected pairs (m, 2) -> unique directed edges in both directions, sorted."""
    if pairs.size == 0:
        return np.zeros((0, 2), np.int64)
    e = np.concatenate([pairs, pairs[:, ::-1]]).astype(np.int64)
    e = e[e[:, 0] != e[:, 1]]
    return np.unique(e, axis=0)


def knn_connectivity(points: Array, k: int) -> np.ndarray:
    """Edges to each point's `k` nearest neighbours, made symmetric: int64 (ne, 2).

    Parameters
    ----------
    points : array of shape (n, dim)
    k : int >= 1
        Neighbours per point (fewer if ``n <= k``).
    """
    from scipy.spatial import cKDTree

    P = _points(points, "knn_connectivity")
    check_scalar(k, "k", "knn_connectivity", integer=True, low=1, low_inclusive=True)
    n = P.shape[0]
    if n < 2:
        return np.zeros((0, 2), np.int64)
    kk = min(k, n - 1)
    _, idx = cKDTree(P).query(P, k=kk + 1)
    pairs = np.stack([np.repeat(np.arange(n), kk), idx[:, 1:].reshape(-1)], axis=1)
    return _both_ways(pairs)


def delaunay_connectivity(points: Array) -> np.ndarray:
    """Edges of the Delaunay triangulation of 2-D `points` (both directions): int64 (ne, 2).

    About ``6n`` directed edges for ``n`` points in general position.

    References
    ----------
    .. [1] B. Delaunay, "Sur la sphère vide", Bull. Acad. Sci. URSS 6, 1934;
           computed with ``scipy.spatial.Delaunay`` (Qhull).
    """
    from scipy.spatial import Delaunay

    P = _points(points, "delaunay_connectivity")
    n = P.shape[0]
    if n < 3:
        return full_connectivity(n)
    tri = Delaunay(P).simplices
    pairs = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    return _both_ways(pairs)


def dense_to_edges(A: Array) -> tuple[np.ndarray, np.ndarray]:
    """Non-zeros of an adjacency matrix ``A`` (n, n) as ``(conn (ne, 2), feat (ne, 1))``."""
    An = np.asarray(backend.to_numpy(A), dtype=np.float64)
    if An.ndim != 2 or An.shape[0] != An.shape[1]:
        raise ValueError(f"`A` in dense_to_edges must be square (n, n); got {An.shape}.")
    i, j = np.nonzero(An)
    return np.stack([i, j], axis=1).astype(np.int64), An[i, j][:, None]


# ----------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------


def _check_counts(caller: str, **counts: Any) -> None:
    for name, v in counts.items():
        check_scalar(v, name, caller, integer=True, low=0, low_inclusive=True)


def _check_fraction(value: float, name: str, caller: str, high: float | None = 1.0) -> None:
    check_scalar(value, name, caller, low=0, low_inclusive=True, high=high)


def _random_graph(n: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric weighted adjacency (n, n), weights in (0, 1], zero diagonal."""
    W = rng.uniform(0.05, 1.0, size=(n, n)) * (rng.random((n, n)) < density)
    W = np.triu(W, 1)
    return W + W.T


def _embed(A_in: np.ndarray, n_out: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """Add `n_out` outlier nodes with random edges (to anyone) to the inlier graph `A_in`."""
    n = A_in.shape[0]
    if n_out == 0:
        return A_in
    A = _random_graph(n + n_out, density, rng)
    A[:n, :n] = A_in
    return A


def _node_features(
    n_in: int, o1: int, o2: int, dim: int, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    U = rng.normal(size=(n_in, dim))
    F1 = np.concatenate([U, rng.normal(size=(o1, dim))])
    F2 = np.concatenate([U + noise * rng.normal(size=U.shape), rng.normal(size=(o2, dim))])
    return F1, F2


def _finish(
    A1: np.ndarray,
    A2: np.ndarray,
    n_in: int,
    rng: np.random.Generator,
    node1: np.ndarray | None = None,
    node2: np.ndarray | None = None,
    pts1: np.ndarray | None = None,
    pts2: np.ndarray | None = None,
    conn: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> GraphPair:
    """Shuffle both graphs' nodes and record where the inliers went."""
    n1 = A1.shape[0] if A1 is not None else pts1.shape[0]
    n2 = A2.shape[0] if A2 is not None else pts2.shape[0]
    p1, p2 = rng.permutation(n1), rng.permutation(n2)  # new index of old node
    X = np.zeros((n1, n2))
    X[p1[:n_in], p2[:n_in]] = 1.0
    out = {}
    for s, (A, p, nf, pt) in enumerate(((A1, p1, node1, pts1), (A2, p2, node2, pts2)), start=1):
        if conn is None:
            c, f = dense_to_edges(A)
        else:
            c, f = conn[2 * s - 2], conn[2 * s - 1]
        c = p[c]
        order = np.lexsort((c[:, 1], c[:, 0]))
        inv = np.argsort(p)
        out[f"conn{s}"] = c[order]
        out[f"edge_feat{s}"] = f[order]
        out[f"node_feat{s}"] = None if nf is None else nf[inv]
        out[f"points{s}"] = None if pt is None else pt[inv]
    return GraphPair(n1=n1, n2=n2, X_gt=X, **out)


def isomorphic_pair(
    n: int, *, density: float = 0.5, node_feat_dim: int = 0, rng: Any = None
) -> GraphPair:
    """A random weighted undirected graph and a copy with its nodes permuted.

    Parameters
    ----------
    n : int >= 0
        Nodes.
    density : float in [0, 1]
        Edge probability (weights uniform in [0.05, 1]).
    node_feat_dim : int >= 0
        Length of random node features (equal in both graphs); 0 for none.
    rng : None, int or Generator
        Seed; the same seed gives the same pair.

    Returns
    -------
    GraphPair
        With ``X_gt`` a permutation matrix; the ground truth maximises the score of the
        inner-product (or Gaussian) ``K`` built from the pair.

    Examples
    --------
    >>> from qapfuse.graphs import isomorphic_pair
    >>> pair = isomorphic_pair(5, rng=0)
    >>> pair.X_gt.sum(), pair.n1, pair.n2
    (np.float64(5.0), 5, 5)
    """
    return noisy_pair(n, density=density, node_feat_dim=node_feat_dim, rng=rng)


def noisy_pair(
    n: int,
    *,
    density: float = 0.5,
    noise: float = 0.0,
    drop: float = 0.0,
    outliers1: int = 0,
    outliers2: int = 0,
    node_feat_dim: int = 0,
    node_noise: float = 0.0,
    rng: Any = None,
) -> GraphPair:
    """A random weighted graph and a perturbed, permuted copy, with optional outliers.

    Parameters
    ----------
    n : int >= 0
        Inlier nodes (in both graphs).
    density : float in [0, 1]
        Edge probability.
    noise : float >= 0
        Standard deviation of Gaussian noise added to the edge weights of graph 2.
    drop : float in [0, 1]
        Fraction of graph 2's inlier edges removed (each undirected edge independently).
    outliers1, outliers2 : int >= 0
        Extra nodes, with random edges, in graph 1 / graph 2 (their ``X_gt`` rows/columns are
        zero).
    node_feat_dim : int >= 0
        Length of random node features; graph 2's inliers get `node_noise` added.
    node_noise : float >= 0
        Noise of graph 2's node features.
    rng : None, int or Generator

    Returns
    -------
    GraphPair
    """
    caller = "noisy_pair"
    _check_counts(
        caller, n=n, outliers1=outliers1, outliers2=outliers2, node_feat_dim=node_feat_dim
    )
    _check_fraction(density, "density", caller)
    _check_fraction(drop, "drop", caller)
    _check_fraction(noise, "noise", caller, high=None)
    _check_fraction(node_noise, "node_noise", caller, high=None)
    gen = backend.rng_from(rng, caller=caller)
    A = _random_graph(n, density, gen)
    B = A.copy()
    if noise > 0:
        E = np.triu(gen.normal(scale=noise, size=(n, n)), 1)
        B = np.where(B != 0, B + E + E.T, 0.0)
        B = np.where((B == 0) & (A != 0), 1e-6, B)  # noise never deletes an edge by itself
    if drop > 0:
        keep = np.triu(gen.random((n, n)) >= drop, 1)
        B = B * (keep | keep.T)
    A1 = _embed(A, outliers1, density, gen)
    A2 = _embed(B, outliers2, density, gen)
    nf1 = nf2 = None
    if node_feat_dim:
        nf1, nf2 = _node_features(n, outliers1, outliers2, node_feat_dim, node_noise, gen)
    return _finish(A1, A2, n, gen, nf1, nf2)


def point_pair(
    n: int,
    *,
    connectivity: str = "delaunay",
    k: int = 8,
    noise: float = 0.0,
    outliers1: int = 0,
    outliers2: int = 0,
    node_feat_dim: int = 0,
    node_noise: float = 0.0,
    rng: Any = None,
) -> GraphPair:
    """Two 2-D point sets (one a noisy, rotated copy of the other) as graphs.

    The inliers are ``n`` uniform points in the unit square; graph 2 holds them rotated by a
    random angle (about the centre) with Gaussian jitter `noise`, and each side adds uniform
    outliers. Each graph's edges come from its own points (so noise and outliers change the
    structure, as in real keypoint matching); an edge's feature is its length (invariant to
    the rotation).

    Parameters
    ----------
    n : int >= 0
        Inlier points.
    connectivity : {"delaunay", "knn", "full"}
        How edges are made from the points.
    k : int >= 1
        Neighbours for ``"knn"``.
    noise : float >= 0
        Position jitter of graph 2's inliers.
    outliers1, outliers2 : int >= 0
        Uniform outlier points in graph 1 / graph 2.
    node_feat_dim : int >= 0
        Length of random node descriptors (graph 2's inliers get `node_noise`); 0 for none.
    node_noise : float >= 0
    rng : None, int or Generator

    Returns
    -------
    GraphPair
        With ``points1``, ``points2``.
    """
    caller = "point_pair"
    _check_counts(
        caller, n=n, outliers1=outliers1, outliers2=outliers2, node_feat_dim=node_feat_dim
    )
    check_choice(connectivity, "connectivity", caller, ("delaunay", "knn", "full"))
    _check_fraction(noise, "noise", caller, high=None)
    _check_fraction(node_noise, "node_noise", caller, high=None)
    gen = backend.rng_from(rng, caller=caller)
    P = gen.random((n, 2))
    th = gen.uniform(0, 2 * np.pi)
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    Q = (P - 0.5) @ R.T + 0.5 + noise * gen.normal(size=P.shape)
    pts1 = np.concatenate([P, gen.random((outliers1, 2))])
    pts2 = np.concatenate([Q, gen.random((outliers2, 2))])
    conns = []
    for pts in (pts1, pts2):
        if connectivity == "delaunay":
            c = delaunay_connectivity(pts)
        elif connectivity == "knn":
            c = knn_connectivity(pts, k)
        else:
            c = full_connectivity(pts.shape[0])
        f = np.linalg.norm(pts[c[:, 0]] - pts[c[:, 1]], axis=1)[:, None]
        conns += [c, f]
    nf1 = nf2 = None
    if node_feat_dim:
        nf1, nf2 = _node_features(n, outliers1, outliers2, node_feat_dim, node_noise, gen)
    return _finish(None, None, n, gen, nf1, nf2, pts1, pts2, conn=tuple(conns))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def matching_metrics(X: Array, X_gt: Array) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 of a (partial) matching against the ground truth.

    Parameters
    ----------
    X : array of shape (n1, n2) or (b, n1, n2)
        Predicted 0/1 matching (a row without a 1 leaves that node unmatched).
    X_gt : array of the same shape
        True matching (outliers: all-zero rows / columns).

    Returns
    -------
    dict
        ``tp`` (correct pairs), ``precision = tp / #predicted pairs``, ``recall = tp /
        #true pairs``, ``f1`` (their harmonic mean), and ``accuracy``: the fraction of
        graph-1 nodes handled correctly (matched to the right node, or left unmatched when
        they are outliers). For full matchings without outliers accuracy = recall. Floats
        (2-D input) or arrays of shape (b,). Empty denominators count as 1 (nothing to find
        and nothing claimed is perfect).
    """
    caller = "matching_metrics"
    Xn = np.asarray(backend.to_numpy(X), dtype=np.float64)
    Gn = np.asarray(backend.to_numpy(X_gt), dtype=np.float64)
    if Xn.shape != Gn.shape or Xn.ndim not in (2, 3):
        raise ValueError(
            f"`X` and `X_gt` in {caller} must have one shape (n1, n2) or (b, n1, n2); got "
            f"{Xn.shape} and {Gn.shape}."
        )
    for arr, nm in ((Xn, "X"), (Gn, "X_gt")):
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"`{nm}` in {caller} must be a 0/1 matching matrix.")
    single = Xn.ndim == 2
    if single:
        Xn, Gn = Xn[None], Gn[None]
    tp = (Xn * Gn).sum(axis=(1, 2))
    npred, ntrue = Xn.sum(axis=(1, 2)), Gn.sum(axis=(1, 2))
    precision = np.where(npred > 0, tp / np.maximum(npred, 1), 1.0)
    recall = np.where(ntrue > 0, tp / np.maximum(ntrue, 1), 1.0)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    rows_ok = np.all(Xn == Gn, axis=2)
    accuracy = rows_ok.mean(axis=1) if Xn.shape[1] else np.ones(Xn.shape[0])
    out = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "tp": tp}
    if single:
        return {k: float(v[0]) if k != "tp" else int(v[0]) for k, v in out.items()}
    return out
