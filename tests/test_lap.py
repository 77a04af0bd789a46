"""Hungarian and Sinkhorn: exactness, marginals, backends, pygmtools parity, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from array_api_compat import array_namespace, device

from qapfuse import ConvergenceWarning, hungarian, sinkhorn
from qapfuse.backend import to_numpy


def _brute_lap(S: np.ndarray) -> float:
    if S.shape[0] > S.shape[1]:
        S = S.T
    n1, n2 = S.shape
    return max(S[np.arange(n1), list(c)].sum() for c in itertools.permutations(range(n2), n1))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (1, 5)])
def test_hungarian_reaches_brute_force_optimum(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        S = rng.normal(size=shape)
        X = hungarian(S)
        assert set(np.unique(X)) <= {0.0, 1.0}
        assert X.sum() == min(shape)
        assert (X.sum(axis=0) <= 1).all() and (X.sum(axis=1) <= 1).all()
        assert np.isclose((S * X).sum(), _brute_lap(S))


def test_hungarian_batched_with_padding_leaves_padding_zero():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(3, 4, 5))
    X = hungarian(S, n1=np.array([2, 4, 3]), n2=np.array([3, 5, 3]))
    assert X.shape == (3, 4, 5)
    assert X[0, 2:].sum() == 0 and X[0, :, 3:].sum() == 0
    assert X[2, :, 3:].sum() == 0
    assert np.isclose((S[0, :2, :3] * X[0, :2, :3]).sum(), _brute_lap(S[0, :2, :3]))
    assert [X[k].sum() for k in range(3)] == [2, 4, 3]


def test_hungarian_keeps_library_dtype_and_device(xp):
    S_np = np.random.default_rng(2).normal(size=(5, 5))
    S = xp.asarray(S_np, dtype=xp.float32)
    X = hungarian(S)
    assert array_namespace(X) is xp
    assert X.dtype == xp.float32 and device(X) == device(S)
    np.testing.assert_array_equal(to_numpy(X), hungarian(S_np))


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_sinkhorn_is_doubly_stochastic_and_agrees_across_libraries(xp, tau):
    S_np = np.random.default_rng(7).normal(size=(5, 5))
    P_np = sinkhorn(S_np, tau=tau, max_iter=1000, tol=1e-12)
    np.testing.assert_allclose(P_np.sum(axis=0), 1, atol=1e-10)
    np.testing.assert_allclose(P_np.sum(axis=1), 1, atol=1e-10)
    S = xp.asarray(S_np)
    P = sinkhorn(S, tau=tau, max_iter=1000, tol=1e-12)
    assert array_namespace(P) is xp
    assert P.dtype == S.dtype and device(P) == device(S)
    np.testing.assert_allclose(to_numpy(P), P_np, atol=1e-12)


def test_sinkhorn_solution_is_a_diagonal_scaling_of_exp_s():
    S = np.random.default_rng(3).normal(size=(4, 4))
    P = sinkhorn(S, tau=0.5, max_iter=2000, tol=1e-13)
    # P = diag(u) exp(S/tau) diag(v)  <=>  log P - S/tau has rank-one additive structure.
    R = np.log(P) - S / 0.5
    resid = R - R[:, :1] - R[:1, :] + R[0, 0]
    assert np.abs(resid).max() < 1e-9


def test_sinkhorn_partial_rows_sum_to_one_columns_at_most_one():
    S = np.random.default_rng(4).normal(size=(3, 7))
    P = sinkhorn(S, tau=0.3, max_iter=2000, tol=1e-12)
    np.testing.assert_allclose(P.sum(axis=1), 1, atol=1e-10)
    assert (P.sum(axis=0) <= 1 + 1e-10).all()
    # Transposed input gives the transposed answer.
    np.testing.assert_allclose(sinkhorn(S.T, tau=0.3, max_iter=2000, tol=1e-12), P.T, atol=1e-10)


@pytest.mark.filterwarnings("ignore::qapfuse.ConvergenceWarning")
def test_sinkhorn_low_temperature_approaches_hungarian():
    S = np.random.default_rng(5).normal(size=(6, 6))
    P = sinkhorn(S, tau=0.02, max_iter=5000, tol=1e-6)
    np.testing.assert_array_equal(np.round(P), hungarian(S))


def test_sinkhorn_batched_padding_gets_zero_mass():
    rng = np.random.default_rng(6)
    S = rng.normal(size=(2, 4, 4))
    P = sinkhorn(S, n1=np.array([4, 3]), n2=np.array([4, 3]), max_iter=1000, tol=1e-12)
    assert P[1, 3:].sum() == 0 and P[1, :, 3:].sum() == 0
    np.testing.assert_allclose(P[1, :3, :3], sinkhorn(S[1, :3, :3], max_iter=1000, tol=1e-12))
    np.testing.assert_allclose(P[0], sinkhorn(S[0], max_iter=1000, tol=1e-12))


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_sinkhorn_matches_pygmtools_at_convergence(tau):
    pygm = pytest.importorskip("pygmtools")
    S = np.random.default_rng(8).normal(size=(2, 6, 6))
    ref = pygm.sinkhorn(S, max_iter=4000, tau=tau, backend="numpy")
    ours = sinkhorn(S, tau=tau, max_iter=2000, tol=1e-12)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_sinkhorn_warns_when_not_converged():
    S = np.random.default_rng(9).normal(size=(6, 6)) * 50
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2 .* raise max_iter") as rec:
        sinkhorn(S, tau=0.01, max_iter=2)
    assert rec[0].filename == __file__  # stacklevel points at the caller


def test_float32_stays_float32():
    S = np.random.default_rng(10).normal(size=(4, 4)).astype(np.float32)
    assert sinkhorn(S).dtype == np.float32
    assert hungarian(S).dtype == np.float32


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: sinkhorn(np.ones((2, 2)), tau=0), ValueError, r"'tau' parameter of sinkhorn"),
        (lambda: sinkhorn(np.ones((2, 2)), max_iter=2.5), TypeError, r"'max_iter'.*an int"),
        (lambda: sinkhorn(np.ones(3)), ValueError, r"`S`.*2 dimensions"),
        (lambda: sinkhorn(np.array([[1.0, np.nan]])), ValueError, r"`S` contains NaN"),
        (lambda: hungarian(np.array([[np.inf, 0.0]])), ValueError, r"`S` contains NaN or Inf"),
        (lambda: hungarian(np.ones((2, 2)), n1=-1), ValueError, r"'n1'.*non-negative"),
        (lambda: hungarian(np.ones((2, 2)), n1=3), ValueError, r"'n1'.*exceeds"),
        (lambda: hungarian([[1.0]]), TypeError, r"`S` must be arrays"),
        (lambda: hungarian(np.array([["a"]])), TypeError, r"`S` must hold real numbers"),
    ],
)
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
