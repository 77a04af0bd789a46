"""Problems and affinity operators: every operator form applies the K it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from array_api_compat import array_namespace, device

from qapfuse import ConstantAffinity, LinearAffinity, Problem
from qapfuse.backend import to_numpy
from qapfuse.problem import dense_nbytes


def _vec(X):
    return X.T.reshape(-1)  # column-major: pair (i, a) at i + a*n1


def _rand_x(rng, b, n1, n2):
    return rng.random((b, n1, n2))


def test_koopmans_beckmann_is_kron_b_a_in_column_major_layout():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(3, 3)), rng.normal(size=(4, 4))
    p = Problem.koopmans_beckmann(A, B)
    K = p.to_dense()[0]
    np.testing.assert_allclose(K, np.kron(B, A))
    X = rng.random((3, 4))
    np.testing.assert_allclose(p.matvec(X[None])[0], A @ X @ B.T)
    # vec(A X B^T) = kron(B, A) vec(X)
    np.testing.assert_allclose(_vec(A @ X @ B.T), np.kron(B, A) @ _vec(X))
    np.testing.assert_allclose(p.score(X[None])[0], _vec(X) @ K @ _vec(X))


def test_koopmans_beckmann_score_is_qaplib_cost_of_a_permutation():
    rng = np.random.default_rng(1)
    A, B = rng.integers(0, 9, (5, 5)), rng.integers(0, 9, (5, 5))
    perm = rng.permutation(5)
    X = np.zeros((5, 5))
    X[np.arange(5), perm] = 1
    cost = (A * B[np.ix_(perm, perm)]).sum()
    p = Problem.koopmans_beckmann(A, B, sense="min")
    assert p.objective_from_score(p.score(X[None]))[0] == pytest.approx(cost)


def test_dense_layout_matches_pygmtools_build_aff_mat():
    pygm = pytest.importorskip("pygmtools")
    rng = np.random.default_rng(2)
    n1, n2 = 4, 5
    A1, A2 = rng.random((n1, n1)), rng.random((n2, n2))
    c1 = np.array([(i, j) for i in range(n1) for j in range(n1)])
    c2 = np.array([(a, b) for a in range(n2) for b in range(n2)])
    e1 = A1[c1[:, 0], c1[:, 1]][:, None]
    e2 = A2[c2[:, 0], c2[:, 1]][:, None]
    K = pygm.utils.build_aff_mat(
        None, e1, c1, None, e2, c2, edge_aff_fn=pygm.utils.inner_prod_aff_fn, backend="numpy"
    )
    ours = Problem.koopmans_beckmann(A1, A2).to_dense()[0]
    np.testing.assert_allclose(ours, K)
    pd = Problem.from_dense(K, n1, n2)
    X = rng.random((1, n1, n2))
    np.testing.assert_allclose(pd.matvec(X), Problem.koopmans_beckmann(A1, A2).matvec(X))


@pytest.mark.parametrize("form", ["dense", "scipy_sparse", "torch_sparse", "kb+linear+const"])
def test_operator_forms_give_the_dense_matvec(form):
    rng = np.random.default_rng(3)
    n1, n2 = 3, 4
    A, B, L = rng.normal(size=(n1, n1)), rng.normal(size=(n2, n2)), rng.normal(size=(n1, n2))
    K = np.kron(B, A) + np.diag(_vec(L)) + 0.7
    X = _rand_x(rng, 1, n1, n2)
    want = (K @ _vec(X[0])).reshape(n2, n1).T
    want_t = (K.T @ _vec(X[0])).reshape(n2, n1).T
    if form == "dense":
        p = Problem.from_dense(K, n1, n2)
        Xin = X
    elif form == "scipy_sparse":
        p = Problem.from_sparse(sp.csr_matrix(K), n1, n2)
        Xin = X
    elif form == "torch_sparse":
        torch = pytest.importorskip("torch")
        p = Problem.from_sparse(torch.tensor(K).to_sparse(), n1, n2)
        Xin = torch.tensor(X)
    else:
        p = Problem.koopmans_beckmann(A, B, L)
        mask = np.ones((1, n1, n2), dtype=bool)
        p = p.with_affinity(p.affinity + ConstantAffinity(0.7, mask))
        Xin = X
    np.testing.assert_allclose(to_numpy(p.matvec(Xin))[0], want, atol=1e-12)
    np.testing.assert_allclose(to_numpy(p.affinity.rmatvec(Xin))[0], want_t, atol=1e-12)
    np.testing.assert_allclose(to_numpy(p.to_dense())[0], K, atol=1e-12)
    np.testing.assert_allclose(to_numpy(p.score(Xin))[0], _vec(X[0]) @ K @ _vec(X[0]), rtol=1e-12)
    lo, hi = p.affinity.entry_bounds()
    assert lo <= K.min() + 1e-12 and hi >= K.max() - 1e-12


def test_gradient_is_k_plus_k_transpose():
    rng = np.random.default_rng(4)
    K = rng.normal(size=(9, 9))
    p = Problem.from_dense(K)
    X = rng.random((1, 3, 3))
    want = ((K + K.T) @ _vec(X[0])).reshape(3, 3).T
    np.testing.assert_allclose(p.gradient(X)[0], want)
    assert not p.affinity.symmetric
    ps = Problem.from_dense(K + K.T)
    assert ps.affinity.symmetric
    np.testing.assert_allclose(ps.gradient(X)[0], 2 * ((K + K.T) @ _vec(X[0])).reshape(3, 3).T)


def test_batched_padding_and_sizes():
    rng = np.random.default_rng(5)
    A = np.zeros((2, 4, 4))
    B = np.zeros((2, 5, 5))
    A[0], B[0] = rng.random((4, 4)), rng.random((5, 5))
    A[1, :2, :2], B[1, :3, :3] = rng.random((2, 2)), rng.random((3, 3))
    p = Problem.koopmans_beckmann(A, B, n1=[4, 2], n2=[5, 3])
    assert p.batched and p.padded
    assert p.mask[1].sum() == 6 and p.mask[0].sum() == 20
    X = _rand_x(rng, 2, 4, 5) * p.mask
    single = Problem.koopmans_beckmann(A[1, :2, :2], B[1, :3, :3])
    assert p.score(X)[1] == pytest.approx(single.score(X[1:, :2, :3])[0])


def test_linear_term_is_the_diagonal():
    L = np.arange(6.0).reshape(2, 3)
    p = Problem(LinearAffinity(L[None]))
    np.testing.assert_allclose(p.to_dense()[0], np.diag(_vec(L)))


def test_torch_problem_keeps_dtype_and_device():
    torch = pytest.importorskip("torch")
    A = torch.rand(4, 4, dtype=torch.float32)
    p = Problem.koopmans_beckmann(A, A)
    assert p.dtype == torch.float32
    out = p.matvec(torch.rand(1, 4, 4))
    assert out.dtype == torch.float32 and device(out) == device(A)
    assert array_namespace(out) is array_namespace(A)


def test_integer_inputs_become_float64():
    p = Problem.koopmans_beckmann(np.eye(3, dtype=int), np.eye(3, dtype=int))
    assert p.dtype == np.float64


def test_dense_memory_limit_names_bytes_and_the_operator_form():
    A = np.ones((30, 30))
    p = Problem.koopmans_beckmann(A, A)
    need = dense_nbytes(1, 30, 30)
    with pytest.raises(MemoryError, match=rf"needs {need:,} bytes.*Problem.koopmans_beckmann"):
        p.to_dense(max_bytes=1000)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: Problem.from_dense(np.ones((4, 5))), ValueError, r"`K`.*must be square"),
        (lambda: Problem.from_dense(np.ones((6, 6))), ValueError, r"6 rows.*not n\*n"),
        (lambda: Problem.from_dense(np.ones((6, 6)), 2, 4), ValueError, r"\(8, 8\).*got \(6, 6\)"),
        (lambda: Problem.from_dense(np.ones((6, 6)), 3, 2), ValueError, r"n1 <= n2.*n1=3 > n2=2"),
        (lambda: Problem.from_dense(np.full((4, 4), np.nan)), ValueError, r"`K` contains NaN"),
        (lambda: Problem.from_dense(np.ones((4, 4)), -2), ValueError, r"'n1'.*non-negative"),
        (lambda: Problem.from_dense(sp.eye(4)), TypeError, r"sparse; use Problem.from_sparse"),
        (lambda: Problem.from_sparse(np.eye(4)), TypeError, r"scipy.sparse or torch sparse"),
        (
            lambda: Problem.koopmans_beckmann(np.ones((3, 3)), np.ones((2, 2))),
            ValueError,
            r"n1 <= n2.*Swap A and B",
        ),
        (
            lambda: Problem.koopmans_beckmann(np.ones((3, 2)), np.ones((3, 3))),
            ValueError,
            r"must be square",
        ),
        (
            lambda: Problem.koopmans_beckmann(np.ones((2, 2)), np.ones((3, 3)), np.ones((3, 2))),
            ValueError,
            r"`L`.*shape \(2, 3\) \(like A and B\); got \(3, 2\)",
        ),
        (
            lambda: Problem.koopmans_beckmann(np.ones((2, 2)), np.full((2, 2), np.inf)),
            ValueError,
            r"`B` contains NaN or Inf",
        ),
        (
            lambda: Problem.koopmans_beckmann(np.eye(2), np.eye(2), sense="minimise"),
            ValueError,
            r"'sense'.*'max', 'min'",
        ),
        (lambda: Problem("K"), TypeError, r"'affinity' parameter of Problem"),
    ],
)
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_mixed_libraries_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"arrays of one library"):
        Problem.koopmans_beckmann(np.eye(2), torch.eye(2))


def test_huge_finite_k_whose_sum_overflows_is_accepted():
    K = np.full((4, 4), 1e308)  # the sum overflows to inf, yet every entry is finite
    p = Problem.from_dense(K)
    assert p.n1max == 2
    K[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"`K` contains NaN or Inf"):
        Problem.from_dense(K)


@pytest.mark.parametrize(
    "call",
    [
        lambda: Problem.from_dense(np.zeros((0, 0)), 0, 0),
        lambda: Problem.from_dense(np.zeros((0, 0))),
        lambda: Problem.from_dense(np.zeros((1, 0, 0))),
        lambda: Problem.from_dense(np.zeros((0, 4, 4))),
        lambda: Problem.from_dense(np.ones((2, 4, 4)), [2, 0], [2, 2]),
        lambda: Problem.from_sparse(sp.csr_matrix((0, 0))),
        lambda: Problem.koopmans_beckmann(np.zeros((0, 0)), np.zeros((0, 0))),
        lambda: Problem.koopmans_beckmann(np.zeros((0, 0)), np.ones((3, 3))),
        lambda: Problem.koopmans_beckmann(np.ones((2, 3, 3)), np.ones((2, 3, 3)), None, [3, 0]),
    ],
)
def test_empty_problems_are_refused_at_construction(call):
    with pytest.raises(ValueError, match=r"needs at least one (node in each graph|instance)"):
        call()


def test_sizes_follow_the_arrays_in_every_constructor():
    A, B = np.ones((2, 3, 3)), np.ones((2, 4, 4))
    A[1, 2], A[1, :, 2] = 0, 0  # instance 1: a 2-node first graph, zero-padded
    by_position = Problem.koopmans_beckmann(A, B, None, [3, 2], [4, 4])
    by_name = Problem.koopmans_beckmann(A, B, n1=[3, 2], n2=[4, 4])
    assert by_position.n1.tolist() == by_name.n1.tolist() == [3, 2]
    K = np.ones((2, 12, 12))
    assert Problem.from_dense(K, [3, 2], [4, 4]).n1.tolist() == [3, 2]
    assert Problem.from_sparse([sp.eye(12)] * 2, [3, 2], [4, 4]).n1.tolist() == [3, 2]
    assert Problem.from_dense(np.ones((16, 16)), 4, 4).n1.tolist() == [4]  # the README's call


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: Problem.koopmans_beckmann(np.ones((3, 2)), np.ones((3, 3))),
            r"got shapes \(3, 2\) and \(3, 3\)\.",
        ),
        (
            lambda: Problem.koopmans_beckmann(np.ones((2, 2)), np.ones((1, 2, 2))),
            r"got shapes \(2, 2\) and \(1, 2, 2\)\.",
        ),
        (
            lambda: Problem.koopmans_beckmann(np.eye(2), np.eye(2), np.ones((5, 4))),
            r"got \(5, 4\)\.",
        ),
    ],
)
def test_messages_report_shapes_as_passed(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_arguments_left_at_none_stay_out_of_type_lists():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError) as info:
        Problem.koopmans_beckmann(np.eye(2), torch.eye(2))
    assert "NoneType" not in str(info.value)
    assert "`A, B`" in str(info.value)
