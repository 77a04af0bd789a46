"""Affinity builders: pygmtools parity, sparse == dense == operator, Numba == torch, errors."""

from __future__ import annotations

import functools

import numba
import numpy as np
import pytest

from qapfuse import Problem, solve
from qapfuse.affinity import (
    CSRAffinity,
    EdgeFactorAffinity,
    build_aff_mat,
    custom_kernel,
    gaussian_kernel,
    gaussian_terms,
    graph_matching_problem,
    inner_product_kernel,
)
from qapfuse.graphs import isomorphic_pair, point_pair

pygm = pytest.importorskip("pygmtools")
pygm.set_backend("numpy")
torch = pytest.importorskip("torch")


@numba.njit(cache=True)
def _l1_sim(x, y):
    return 1.0 / (1.0 + np.abs(x - y).sum())


def _batch(seed=0, b=3, n1max=5, n2max=6, dn=3, selfloops=False):
    """Padded batch in pygmtools' format (dense_to_sparse of masked random adjacency)."""
    rng = np.random.default_rng(seed)
    n1 = np.array([5, 4, 3][:b])
    n2 = np.array([6, 6, 5][:b])
    A1 = rng.random((b, n1max, n1max)) * (rng.random((b, n1max, n1max)) < 0.6)
    A2 = rng.random((b, n2max, n2max)) * (rng.random((b, n2max, n2max)) < 0.6)
    for k in range(b):
        A1[k, n1[k] :, :] = A1[k, :, n1[k] :] = 0
        A2[k, n2[k] :, :] = A2[k, :, n2[k] :] = 0
        if not selfloops:
            np.fill_diagonal(A1[k], 0)
            np.fill_diagonal(A2[k], 0)
    c1, e1, ne1 = pygm.utils.dense_to_sparse(A1)
    c2, e2, ne2 = pygm.utils.dense_to_sparse(A2)
    F1 = rng.random((b, n1max, dn))
    F2 = rng.random((b, n2max, dn))
    return dict(
        F1=F1,
        e1=e1,
        c1=c1,
        F2=F2,
        e2=e2,
        c2=c2,
        n1=n1,
        ne1=np.asarray(ne1),
        n2=n2,
        ne2=np.asarray(ne2),
    )


def _args(d, nodes=True):
    return (
        d["F1"] if nodes else None,
        d["e1"],
        d["c1"],
        d["F2"] if nodes else None,
        d["e2"],
        d["c2"],
        d["n1"],
        d["ne1"],
        d["n2"],
        d["ne2"],
    )


def _valid(n1, n2, n1max, n2max):
    m = np.zeros((n2max, n1max), bool)
    m[:n2, :n1] = True
    return m.reshape(-1)


def _matvec_dense(K, X):
    b, n1, n2 = X.shape
    v = X.transpose(0, 2, 1).reshape(b, -1)
    return np.einsum("bij,bj->bi", K, v).reshape(b, n2, n1).transpose(0, 2, 1)


KERNELS = {
    "inner": ("inner_product", None),
    "gauss": (gaussian_kernel(0.7), functools.partial(pygm.utils.gaussian_aff_fn, sigma=0.7)),
}


@pytest.mark.parametrize("edge", ["inner", "gauss"])
@pytest.mark.parametrize("node", ["inner", "gauss", None])
@pytest.mark.parametrize("selfloops", [False, True])
def test_dense_matches_pygmtools_on_padded_batch(edge, node, selfloops):
    d = _batch(selfloops=selfloops)
    ke, fe = KERNELS[edge]
    kn, fn = KERNELS[node] if node else ("inner_product", None)
    Kp = pygm.utils.build_aff_mat(*_args(d, node is not None), node_aff_fn=fn, edge_aff_fn=fe)
    K = build_aff_mat(*_args(d, node is not None), node_aff=kn, edge_aff=ke, dtype="float64")
    assert K.shape == Kp.shape and K.dtype == np.float64
    for k in range(3):
        m = _valid(d["n1"][k], d["n2"][k], 5, 6)
        np.testing.assert_allclose(K[k][np.ix_(m, m)], Kp[k][np.ix_(m, m)], atol=1e-12)
        assert not K[k][~m].any() and not K[k][:, ~m].any()  # padding stays zero


def test_unbatched_and_float32_default():
    pair = isomorphic_pair(6, rng=1)
    A = np.zeros((6, 6))
    A[pair.conn1[:, 0], pair.conn1[:, 1]] = pair.edge_feat1[:, 0]
    B = np.zeros((6, 6))
    B[pair.conn2[:, 0], pair.conn2[:, 1]] = pair.edge_feat2[:, 0]
    Kp = pygm.utils.build_aff_mat(
        None, pair.edge_feat1, pair.conn1, None, pair.edge_feat2, pair.conn2
    )
    K = build_aff_mat(None, pair.edge_feat1, pair.conn1, None, pair.edge_feat2, pair.conn2)
    assert K.dtype == np.float32 and K.shape == (36, 36)
    np.testing.assert_allclose(K, Kp, rtol=1e-6)
    # inner product on scalar weights is Koopmans-Beckmann kron(B, A)
    np.testing.assert_allclose(K, np.kron(B, A), rtol=1e-6)
    # a 1-D edge feature means one feature per edge
    K1 = build_aff_mat(
        None, pair.edge_feat1[:, 0], pair.conn1, None, pair.edge_feat2[:, 0], pair.conn2
    )
    np.testing.assert_array_equal(K1, K)


def test_duplicate_edges_keep_the_last_like_pygmtools():
    c1 = np.array([[0, 1], [1, 2], [0, 1]])
    e1 = np.array([[1.0], [2.0], [3.0]])
    c2 = np.array([[0, 1], [1, 0]])
    e2 = np.array([[0.5], [4.0]])
    Kp = pygm.utils.build_aff_mat(None, e1, c1, None, e2, c2)
    K = build_aff_mat(None, e1, c1, None, e2, c2, dtype="float64")
    np.testing.assert_allclose(K, Kp)
    Ks = build_aff_mat(None, e1, c1, None, e2, c2, dtype="float64", format="sparse")
    np.testing.assert_allclose(Ks.toarray(), Kp)


@pytest.mark.parametrize("edge", ["inner", "gauss"])
@pytest.mark.parametrize("selfloops", [False, True])
def test_sparse_equals_dense(edge, selfloops):
    d = _batch(seed=2, selfloops=selfloops)
    ke = KERNELS[edge][0]
    kn = gaussian_kernel(2.0)
    K = build_aff_mat(*_args(d), node_aff=kn, edge_aff=ke, dtype="float64")
    Ks = build_aff_mat(*_args(d), node_aff=kn, edge_aff=ke, dtype="float64", format="sparse")
    assert isinstance(Ks, list) and len(Ks) == 3
    for k in range(3):
        assert Ks[k].has_sorted_indices
        np.testing.assert_array_equal(Ks[k].toarray(), K[k])
        Ks[k].sum_duplicates()
        np.testing.assert_array_equal(Ks[k].toarray(), K[k])


@pytest.mark.parametrize("selfloops", [False, True])
def test_operator_inner_product_is_exact(selfloops):
    d = _batch(seed=3, selfloops=selfloops)
    d["e1"] = np.random.default_rng(0).normal(size=(*d["e1"].shape[:2], 2))
    d["e2"] = np.random.default_rng(1).normal(size=(*d["e2"].shape[:2], 2))
    K = build_aff_mat(*_args(d), dtype="float64")
    op = build_aff_mat(*_args(d), dtype="float64", format="operator")
    assert isinstance(op, EdgeFactorAffinity) and op.error_bound == 0.0
    X = np.random.default_rng(4).random((3, 5, 6))
    np.testing.assert_allclose(op.matvec(X), _matvec_dense(K, X), atol=1e-10)
    Kt = K.transpose(0, 2, 1)
    np.testing.assert_allclose(op.rmatvec(X), _matvec_dense(Kt, X), atol=1e-10)
    np.testing.assert_allclose(op.to_dense(), K, atol=1e-10)
    lo, hi = op.entry_bounds()
    assert lo <= K.min() + 1e-12 and hi >= K.max() - 1e-12


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_operator_gaussian_within_its_bound(tol):
    d = _batch(seed=5, selfloops=True)
    kn, ke = gaussian_kernel(1.5), gaussian_kernel(0.3)
    K = build_aff_mat(*_args(d), node_aff=kn, edge_aff=ke, dtype="float64")
    op = build_aff_mat(
        *_args(d), node_aff=kn, edge_aff=ke, dtype="float64", format="operator", tol=tol
    )
    assert 0 < op.error_bound <= tol
    err = np.abs(op.to_dense() - K).max()
    assert err <= op.error_bound * (1 + 1e-6) + 1e-14
    X = np.random.default_rng(6).random((3, 5, 6))
    deg = 6 * 6  # max out-degree product bounds the row support of K
    assert np.abs(op.matvec(X) - _matvec_dense(K, X)).max() <= op.error_bound * deg + 1e-12
    # the order grows as the tolerance shrinks
    assert gaussian_terms(2.0, 1, 1e-8)[0] > gaussian_terms(2.0, 1, 1e-3)[0]


def test_operator_gaussian_refuses_too_many_terms():
    pair = point_pair(30, rng=0)
    with pytest.raises(ValueError, match=r"needs \d+ terms .* format='sparse'"):
        build_aff_mat(
            *pair.aff_args(), edge_aff=gaussian_kernel(1e-4), format="operator", max_terms=16
        )


def test_problem_formats_give_one_score_and_solution():
    pair = point_pair(12, connectivity="knn", k=4, rng=1)
    kw = dict(edge_aff=gaussian_kernel(0.05), dtype="float64")
    probs = {
        f: graph_matching_problem(*pair.aff_args(), format=f, **kw)
        for f in ("dense", "sparse", "operator")
    }
    assert isinstance(probs["sparse"].affinity, CSRAffinity)
    assert probs["sparse"].affinity.symmetric and probs["operator"].affinity.symmetric
    X = pair.X_gt[None]
    s = [float(p.score(X)[0]) for p in probs.values()]
    np.testing.assert_allclose(s, s[0], rtol=1e-6)
    res = {f: solve(p, "rrwm") for f, p in probs.items()}
    np.testing.assert_array_equal(res["sparse"].X, res["dense"].X)


def test_custom_numba_kernel_and_torch_function():
    # A user kernel compiles the dense and sparse builders (serially here: faster to compile).
    d = _batch(seed=7)
    kern = custom_kernel(
        _l1_sim, torch_fn=lambda A, B: 1.0 / (1.0 + torch.cdist(A, B, p=1)), parallel=False
    )
    fn = lambda a, b: 1.0 / (1.0 + np.abs(a[:, :, None, :] - b[:, None, :, :]).sum(-1))  # noqa: E731
    gauss = functools.partial(pygm.utils.gaussian_aff_fn, sigma=1.0)
    Kp = pygm.utils.build_aff_mat(*_args(d), node_aff_fn=gauss, edge_aff_fn=fn)
    K = build_aff_mat(*_args(d), node_aff="gaussian", edge_aff=kern, dtype="float64")
    for k in range(3):
        m = _valid(d["n1"][k], d["n2"][k], 5, 6)
        np.testing.assert_allclose(K[k][np.ix_(m, m)], Kp[k][np.ix_(m, m)], atol=1e-12)
    Ks = build_aff_mat(
        *_args(d), node_aff="gaussian", edge_aff=kern, dtype="float64", format="sparse"
    )
    np.testing.assert_allclose(Ks[1].toarray(), K[1], atol=1e-12)
    Kt = build_aff_mat(
        *[None if v is None else torch.as_tensor(v) for v in _args(d)[:6]],
        *_args(d)[6:],
        node_aff="gaussian",
        edge_aff=kern,
        dtype="float64",
    )
    np.testing.assert_allclose(Kt.numpy(), K, atol=1e-12)


@pytest.mark.parametrize("fmt", ["dense", "sparse", "operator"])
@pytest.mark.parametrize("edge", ["inner", "gauss"])
def test_torch_matches_numba(fmt, edge):
    d = _batch(seed=8, selfloops=True)
    kw = dict(node_aff=gaussian_kernel(1.0), edge_aff=KERNELS[edge][0], dtype="float64", format=fmt)
    K = build_aff_mat(*_args(d), **kw)
    targs = [torch.as_tensor(v) for v in _args(d)[:6]]
    Kt = build_aff_mat(*targs, *_args(d)[6:], **kw)
    if fmt == "dense":
        assert isinstance(Kt, torch.Tensor) and Kt.dtype == torch.float64
        np.testing.assert_allclose(Kt.numpy(), K, atol=1e-10)
    elif fmt == "sparse":
        for k in range(3):
            np.testing.assert_allclose(Kt[k].to_dense().numpy(), K[k].toarray(), atol=1e-10)
    else:
        X = np.random.default_rng(0).random((3, 5, 6))
        out = Kt.matvec(torch.as_tensor(X))
        assert isinstance(out, torch.Tensor)
        np.testing.assert_allclose(out.numpy(), K.matvec(X), atol=1e-10)


def test_torch_problem_solves_like_numpy():
    pair = isomorphic_pair(7, rng=3)
    p_np = graph_matching_problem(*pair.aff_args(), dtype="float64")
    targs = [
        None if v is None or isinstance(v, int) else torch.as_tensor(v) for v in pair.aff_args()[:6]
    ]
    p_t = graph_matching_problem(*targs, dtype="float64")
    r_np, r_t = solve(p_np, "rrwm"), solve(p_t, "rrwm")
    assert isinstance(r_t.X, torch.Tensor)
    np.testing.assert_array_equal(r_t.X.numpy(), r_np.X)
    np.testing.assert_array_equal(r_np.X, pair.X_gt)


def test_dense_refuses_over_the_memory_limit():
    pair = isomorphic_pair(10, rng=0)
    with pytest.raises(MemoryError, match=r"needs 40,000 bytes.*format='sparse'.*'operator'"):
        build_aff_mat(*pair.aff_args(), max_bytes=1000)
    with pytest.raises(MemoryError, match="80,000 bytes"):
        graph_matching_problem(*pair.aff_args(), format="dense", dtype="float64", max_bytes=1000)
    # sparse and operator are not limited by the dense budget
    Problem  # noqa: B018 - imported for the API check below
    graph_matching_problem(*pair.aff_args(), format="sparse", max_bytes=1000)


def _simple():
    c = np.array([[0, 1], [1, 2], [2, 0]])
    e = np.ones((3, 1))
    F = np.zeros((3, 2))
    return F, e, c


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(node_feat2=np.zeros((3, 3))), ValueError, "`node_feat1` has 2 features .* has 3"),
        (dict(edge_feat2=np.ones((3, 2))), ValueError, "`edge_feat1` has 1 features .* has 2"),
        (
            dict(connectivity1=np.array([[0, 1], [1, 3], [2, 0]])),
            ValueError,
            r"`connectivity1` in build_aff_mat holds node index 3, outside \[0, 3\)",
        ),
        (
            dict(connectivity2=np.array([[0, 1], [-1, 2], [2, 0]])),
            ValueError,
            "`connectivity2` .* holds node index -1",
        ),
        (
            dict(connectivity1=np.array([[0, 1, 2], [1, 2, 0]])),
            ValueError,
            r"`connectivity1` .* shape \(ne, 2\).*got shape \(2, 3\).*transposed",
        ),
        (
            dict(connectivity1=np.array([[0.0, 1.0], [1, 2], [2, 0]])),
            TypeError,
            "`connectivity1` .* integer",
        ),
        (dict(edge_feat1=np.ones((4, 1))), ValueError, "`edge_feat1` has 4 edges but"),
        (dict(node_feat1=np.full((3, 2), np.nan)), ValueError, "`node_feat1` .* NaN"),
        (dict(edge_feat2=np.array([[1.0], [np.inf], [0.0]])), ValueError, "`edge_feat2` .* NaN"),
        (dict(node_feat2=None), ValueError, "`node_feat2` is None"),
        (dict(connectivity2=None), ValueError, "`connectivity2` is None"),
        (dict(edge_aff="gausian"), ValueError, "'edge_aff' parameter .* 'gausian'"),
        (dict(edge_aff=lambda a, b: 0.0), TypeError, "Numba-compiled"),
        (dict(format="csr"), ValueError, "'format' parameter"),
        (dict(dtype="float16"), ValueError, "'dtype' parameter"),
        (dict(node_feat1=np.zeros((1, 3, 2))), ValueError, "batch axis"),
    ],
)
def test_bad_input_names_the_argument(change, exc, match):
    F, e, c = _simple()
    kw = dict(
        node_feat1=F, edge_feat1=e, connectivity1=c, node_feat2=F, edge_feat2=e, connectivity2=c
    )
    kw.update(change)
    with pytest.raises(exc, match=match):
        build_aff_mat(**kw)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_sigma_must_be_positive(sigma):
    with pytest.raises(
        ValueError, match="'sigma' parameter of gaussian_kernel must be a float > 0"
    ):
        gaussian_kernel(sigma)


def test_kernel_objects():
    assert inner_product_kernel().kind == 0 and gaussian_kernel(2.0).kind == 1
    with pytest.raises(TypeError, match="numba_fn"):
        custom_kernel()
    d = _batch(seed=9)
    kern = custom_kernel(torch_fn=lambda A, B: A @ B.T)
    with pytest.raises(TypeError, match="no Numba function"):
        build_aff_mat(*_args(d), edge_aff=kern)
    with pytest.raises(ValueError, match="custom kernel has no known factorisation"):
        build_aff_mat(*_args(d), edge_aff=_l1_sim, format="operator")


@pytest.mark.parametrize("edge", ["inner", "gauss"])
def test_sparse_threshold_drops_only_small_edge_entries(edge):
    d = _batch(seed=11, selfloops=True)
    kw = dict(node_aff=gaussian_kernel(1.0), edge_aff=KERNELS[edge][0], dtype="float64")
    K = build_aff_mat(*_args(d), **kw)
    thr = 0.6
    Ks = build_aff_mat(*_args(d), format="sparse", threshold=thr, **kw)
    targs = [torch.as_tensor(v) for v in _args(d)[:6]]
    Kt = build_aff_mat(*targs, *_args(d)[6:], format="sparse", threshold=thr, **kw)
    for k in range(3):
        want = K[k].copy()
        off = ~np.eye(want.shape[0], dtype=bool)
        want[off & (np.abs(want) < thr)] = 0.0  # the diagonal (node affinities) is kept
        got = Ks[k].toarray()
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert np.abs(got - K[k]).max() < thr
        np.testing.assert_allclose(Kt[k].to_dense().numpy(), want, atol=1e-12)
    full = build_aff_mat(*_args(d), format="sparse", **kw)
    assert sum(M.nnz for M in Ks) < sum(M.nnz for M in full)
    with pytest.raises(ValueError, match=r"'threshold' parameter .* format='sparse' only"):
        build_aff_mat(*_args(d), threshold=0.1)
    with pytest.raises(ValueError, match="'threshold' parameter of build_aff_mat"):
        build_aff_mat(*_args(d), format="sparse", threshold=-1.0)


def test_float32_gaussian_uses_single_precision_exp_within_1e6():
    d = _batch(seed=12)
    kw = dict(node_aff=gaussian_kernel(1.0), edge_aff=gaussian_kernel(0.5))
    K64 = build_aff_mat(*_args(d), dtype="float64", **kw)
    K32 = build_aff_mat(*_args(d), **kw)
    Ks32 = build_aff_mat(*_args(d), format="sparse", **kw)
    assert K32.dtype == np.float32 and Ks32[0].dtype == np.float32
    np.testing.assert_allclose(K32, K64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(Ks32[2].toarray(), K64[2], rtol=1e-6, atol=1e-7)


def _expected_candidates(F1, F2, m1, m2, k, sigma):
    L = np.exp(-((F1[:m1, None, :] - F2[None, :m2, :]) ** 2).sum(-1) / sigma)
    rows = np.argsort(-L, axis=1)[:, :k]
    cols = np.argsort(-L, axis=0)[:k, :]
    C = np.zeros((m1, m2), bool)
    C[np.repeat(np.arange(m1), rows.shape[1]), rows.ravel()] = True
    C[cols.ravel(), np.tile(np.arange(m2), cols.shape[0])] = True
    return C


@pytest.mark.parametrize("edge", ["inner", "gauss", "custom"])
@pytest.mark.parametrize("thr", [0.0, 0.3])
def test_candidates_give_the_full_k_restricted_to_candidate_pairs(edge, thr):
    d = _batch(seed=13, selfloops=True)
    ek = _l1_sim if edge == "custom" else KERNELS[edge][0]
    kw = dict(node_aff=gaussian_kernel(1.0), edge_aff=ek, dtype="float64", format="sparse")
    full = build_aff_mat(*_args(d), threshold=thr, **kw)
    Ks = build_aff_mat(*_args(d), threshold=thr, candidates=2, **kw)
    p = graph_matching_problem(*_args(d), threshold=thr, candidates=2, **kw)
    assert isinstance(p.affinity, CSRAffinity) and p.affinity.candidates.shape == (3, 5, 6)
    for k in range(3):
        m1, m2 = int(d["n1"][k]), int(d["n2"][k])
        C = _expected_candidates(d["F1"][k], d["F2"][k], m1, m2, 2, 1.0)
        got = p.affinity.candidates[k]
        np.testing.assert_array_equal(got[:m1, :m2], C)
        assert not got[m1:].any() and not got[:, m2:].any()
        keep = got.T.reshape(-1)  # column-major vec: pair (i, a) at i + a * n1max
        want = full[k].toarray() * keep[:, None] * keep[None, :]
        np.testing.assert_allclose(Ks[k].toarray(), want, atol=0)
        np.testing.assert_allclose(p.affinity.Ks[k].toarray(), want, atol=0)
        assert Ks[k].nnz <= full[k].nnz
        assert Ks[k].has_sorted_indices
        S = Ks[k].copy()
        S.sort_indices()
        np.testing.assert_array_equal(S.indices, Ks[k].indices)
    # enough candidates keep every pair: the full K
    Kall = build_aff_mat(*_args(d), threshold=thr, candidates=6, **kw)
    for k in range(3):
        np.testing.assert_array_equal(Kall[k].toarray(), full[k].toarray())


def test_candidates_are_checked():
    d = _batch(seed=14)
    with pytest.raises(ValueError, match=r"'candidates' parameter .* format='sparse' only"):
        build_aff_mat(*_args(d), candidates=2)
    with pytest.raises(ValueError, match="'candidates' parameter of graph_matching_problem"):
        graph_matching_problem(*_args(d), candidates=0)
    with pytest.raises(TypeError, match="'candidates' parameter of build_aff_mat"):
        build_aff_mat(*_args(d), format="sparse", candidates=2.0)
    with pytest.raises(ValueError, match="needs node_feat1 and node_feat2"):
        build_aff_mat(*_args(d, nodes=False), format="sparse", candidates=2)
    targs = [torch.as_tensor(v) for v in _args(d)[:6]]
    with pytest.raises(TypeError, match="needs numpy inputs"):
        build_aff_mat(*targs, *_args(d)[6:], format="sparse", candidates=2)


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(threshold=0.1), r"'threshold' parameter of build_aff_mat applies to format='sparse'"),
        (dict(candidates=2), r"'candidates' parameter of build_aff_mat applies to format='sparse'"),
    ],
)
def test_operator_refuses_sparse_only_options(option, match):
    # both builders run one implementation: an option the operator cannot honour is refused,
    # never dropped silently
    d = _batch(seed=15)
    with pytest.raises(ValueError, match=match):
        build_aff_mat(*_args(d), format="operator", **option)


def test_graph_matching_problem_takes_build_aff_mat_arguments():
    import inspect

    want = inspect.signature(build_aff_mat)
    got = inspect.signature(graph_matching_problem)
    assert list(got.parameters) == list(want.parameters)
    for name, p in want.parameters.items():
        q = got.parameters[name]
        assert q.kind == p.kind
        assert q.default == ("sparse" if name == "format" else p.default)
    d = _batch(seed=16)
    # positional node counts and keyword options bind as in build_aff_mat
    p = graph_matching_problem(*_args(d), edge_aff=gaussian_kernel(0.7), dtype="float64")
    K = build_aff_mat(*_args(d), edge_aff=gaussian_kernel(0.7), dtype="float64", format="sparse")
    np.testing.assert_array_equal(p.n1, d["n1"])
    for k in range(3):
        np.testing.assert_array_equal(p.affinity.Ks[k].toarray(), K[k].toarray())
    with pytest.raises(TypeError, match=r"graph_matching_problem\(\) .*'fromat'"):
        graph_matching_problem(*_args(d), fromat="dense")
    with pytest.raises(TypeError, match=r"graph_matching_problem\(\) .*positional"):
        graph_matching_problem(*_args(d), "extra")


def test_csr_affinity_takes_symmetry_and_candidates_at_construction():
    d = _batch(seed=17)
    Ks = build_aff_mat(*_args(d), format="sparse", dtype="float64")
    cand = np.ones((3, 5, 6), dtype=bool)
    aff = CSRAffinity(Ks, 5, 6, candidates=cand)
    assert aff.candidates is cand
    assert aff.symmetric == all((K != K.T).nnz == 0 for K in Ks)  # None: tested on use
    X = np.random.default_rng(0).random((3, 5, 6))
    sym = CSRAffinity([K + K.T for K in Ks], 5, 6, symmetric=True)
    np.testing.assert_allclose(sym.rmatvec(X), sym.matvec(X), atol=1e-12)
    assert CSRAffinity(Ks, 5, 6).candidates is None
    with pytest.raises(ValueError, match=r"'candidates' parameter of CSRAffinity .* \(3, 5, 6\)"):
        CSRAffinity(Ks, 5, 6, candidates=cand[:, :4])


def test_affinity_modules_import_without_a_cycle():
    import ast
    from pathlib import Path

    import qapfuse.affinity as pkg

    root = Path(pkg.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # `from .x import`, anywhere
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps - {"__init__"}
    assert "_builders" in graph and "_operator" in graph
    done, stack = set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join([*stack, m])}"
        if m in done or m not in graph:
            return
        stack.append(m)
        for dep in graph[m]:
            visit(dep)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)
