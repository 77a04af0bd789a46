"""The one Sinkhorn core: layouts, paths (compiled / array API), warm starts, the form switch."""

from __future__ import annotations

import numpy as np
import pytest

from qapfuse.backend import to_numpy
from qapfuse.solvers import _sinkhorn
from qapfuse.solvers._sinkhorn import Sinkhorn


def _case(seed=3):
    """Scores (3, 5, 7): a square 5x5 instance, a padded 3x7 one, a full rectangular one."""
    S = np.random.default_rng(seed).normal(size=(3, 5, 7))
    mask = np.ones(S.shape, dtype=bool)
    mask[0, :, 5:] = False
    mask[1, 3:, :] = False
    square = np.array([True, False, False])
    return S, mask, square


@pytest.fixture
def log_domain(monkeypatch):
    """Force the compiled path's log domain (the spread switch's other side)."""
    monkeypatch.setattr(_sinkhorn, "SCALING_SPREAD", -1.0)


def _marginals_hold(P, mask, square, atol=1e-9):
    rows = P.sum(axis=2)
    np.testing.assert_allclose(rows[mask.any(axis=2)], 1.0, atol=atol)
    cols = P.sum(axis=1)
    for k in range(P.shape[0]):
        if square[k]:
            np.testing.assert_allclose(cols[k][mask[k].any(axis=0)], 1.0, atol=atol)
        assert np.all(cols[k] <= 1.0 + atol)
    assert np.all(P[~mask] == 0.0)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_compiled_path_agrees_with_every_array_library(xp, tau):
    S, mask, square = _case()
    kw = dict(square=square, max_iter=5000, tol=1e-12)
    P_np = Sinkhorn(mask, **kw)(S, tau)
    _marginals_hold(P_np, mask, square)
    P = Sinkhorn(mask, **kw)(xp.asarray(S), tau)  # numpy runs compiled, the rest the array API
    np.testing.assert_allclose(to_numpy(P), P_np, atol=1e-10)


def test_scaling_form_equals_log_domain(monkeypatch):
    S, mask, square = _case(4)
    kw = dict(square=square, max_iter=3000, tol=1e-13)
    scaling = Sinkhorn(mask, **kw)(S, 0.2)
    slack_kw = dict(slack=(np.array([5, 3, 5]), np.array([5, 7, 7])), max_iter=3000, tol=1e-13)
    slack_scaling = Sinkhorn(mask, **slack_kw)(S, 0.2, slack=0.3)
    monkeypatch.setattr(_sinkhorn, "SCALING_SPREAD", -1.0)
    np.testing.assert_allclose(Sinkhorn(mask, **kw)(S, 0.2), scaling, atol=1e-12)
    np.testing.assert_allclose(
        Sinkhorn(mask, **slack_kw)(S, 0.2, slack=0.3), slack_scaling, atol=1e-12
    )


def test_a_spread_beyond_the_scaling_form_still_gives_a_finite_plan():
    S, mask, square = _case(5)
    project = Sinkhorn(mask, square=square, max_iter=2000, tol=1e-9)
    P = project(S, 1e-3)  # spread ~ 5e3: log domain (slow at this temperature, but safe)
    assert np.all(np.isfinite(P)) and project.err <= 1e-3
    _marginals_hold(P, mask, square, atol=1e-3)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_warm_start_reaches_the_cold_plan_in_fewer_iterations(lib):
    xp_lib = pytest.importorskip(lib)
    S, mask, square = _case(6)
    S2 = S + 1e-3 * S**2  # the next, nearby scores of an annealing loop
    as_lib = (lambda a: a) if lib == "numpy" else xp_lib.asarray
    kw = dict(square=square, max_iter=5000, tol=1e-11, check_every=1)
    warm = Sinkhorn(mask, warm=True, **kw)
    warm(as_lib(S), 0.3)
    P_warm = to_numpy(warm(as_lib(S2), 0.25))
    cold = Sinkhorn(mask, **kw)
    P_cold = to_numpy(cold(as_lib(S2), 0.25))
    assert warm.n_iter < cold.n_iter
    np.testing.assert_allclose(P_warm, P_cold, atol=1e-9)
    warm.reset()  # forgets the potentials: the next call is a cold one
    np.testing.assert_allclose(to_numpy(warm(as_lib(S2), 0.25)), P_cold, atol=1e-9)


def test_slack_layout_numpy_equals_torch_and_leaves_bad_pairs_unmatched():
    torch = pytest.importorskip("torch")
    S = np.array([[2.0, -1.0, 0.0], [-1.0, -2.0, -3.0]])[None]
    mask = np.ones(S.shape, dtype=bool)
    kw = dict(slack=(np.array([2]), np.array([3])), max_iter=2000, tol=1e-12, check_every=5)
    project = Sinkhorn(mask, **kw)
    P = project(S, 0.05, slack=0.0)
    np.testing.assert_allclose(P[0, 0], [1.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(project.unmatched1[0], [0.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(project.unmatched2[0], [0.0, 1.0, 1.0], atol=1e-3)
    t = Sinkhorn(mask, **kw)
    np.testing.assert_allclose(t(torch.asarray(S), 0.05, slack=0.0).numpy(), P, atol=1e-10)
    np.testing.assert_allclose(t.unmatched1.numpy(), project.unmatched1, atol=1e-10)


@pytest.mark.parametrize("force_log", [False, True])
def test_sparse_support_equals_dense_on_the_same_support(force_log, monkeypatch):
    if force_log:
        monkeypatch.setattr(_sinkhorn, "SCALING_SPREAD", -1.0)
    rng = np.random.default_rng(8)
    S = rng.normal(size=(6, 8))
    C = rng.random((6, 8)) < 0.5
    C[2] = False  # a node without candidates: all its mass on the slack column
    rows, cols = np.nonzero(C)
    sparse = Sinkhorn.on_support(rows, cols, 6, 8, max_iter=4000, tol=1e-12)
    p = sparse(S[rows, cols], 0.4, slack=0.1)
    dense = Sinkhorn(C[None], slack=([6], [8]), max_iter=4000, tol=1e-12, check_every=5)
    P = dense(S[None], 0.4, slack=0.1)[0]
    np.testing.assert_allclose(p, P[rows, cols], atol=1e-10)
    np.testing.assert_allclose(sparse.unmatched1, dense.unmatched1[0], atol=1e-10)
    np.testing.assert_allclose(sparse.unmatched2, dense.unmatched2[0], atol=1e-10)
    assert sparse.unmatched1[2] == pytest.approx(1.0)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_one_state_per_block_of_its_own_size(lib):
    xp_lib = pytest.importorskip(lib)
    as_lib = (lambda a: a) if lib == "numpy" else xp_lib.asarray
    rng = np.random.default_rng(9)
    shapes = [(3, 3), (4, 6), (2, 5)]
    states = [Sinkhorn(np.ones(s, bool), square=[s[0] == s[1]], warm=True) for s in shapes]
    blocks = [rng.normal(size=s) for s in shapes]
    for _ in range(2):  # the second call warm-starts each block from its own potentials
        plans = [to_numpy(st(as_lib(G), 0.5)) for st, G in zip(states, blocks)]
    for P, G in zip(plans, blocks):
        assert P.shape == G.shape
        ref = Sinkhorn(np.ones(G.shape, bool)[None], square=[G.shape[0] == G.shape[1]])(
            G[None], 0.5
        )[0]
        np.testing.assert_allclose(P, ref, atol=1e-6)
        np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-6)
