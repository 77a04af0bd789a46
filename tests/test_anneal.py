import math
import time

import numpy as np
import pytest

from qapfuse.solvers._anneal import Schedule, anneal


def test_schedule_stages_cover_tau0_to_tau_min():
    s = Schedule(tau0=0.5, tau_min=5e-3, decay=0.7, max_inner=10, tol=1e-3)
    taus = s.temperatures()
    assert len(taus) == s.stages
    assert taus[0] == 0.5
    assert taus[-1] >= 5e-3 and taus[-1] * 0.7 < 5e-3
    # an exact power of decay is included despite rounding
    assert Schedule(1.0, 0.5**3, 0.5, 1, 1e-3).stages == 4


def test_anneal_damped_fixed_point_blocks_of_different_shapes():
    targets = [np.full((2, 3), 1 / 3), np.eye(4)]
    X0 = [np.zeros((2, 3)), np.zeros((4, 4))]
    res = anneal(
        lambda X: X,
        lambda G, tau: targets,
        X0,
        Schedule(1.0, 0.1, 0.5, max_inner=100, tol=1e-6, step=0.5),
        score=lambda X: float(sum(x.sum() for x in X)),
    )
    assert isinstance(res.X, list) and len(res.X) == 2
    for x, t in zip(res.X, targets):
        np.testing.assert_allclose(x, t, atol=2e-6)
    assert res.converged and res.stopped == "done"
    assert len(res.history) == 4 and math.isclose(res.history[-1]["score"], 6.0, rel_tol=1e-5)
    # step 1/2 halves the distance each iteration: about log2(1/1e-6) = 20 in the first stage
    assert 19 <= res.history[0]["inner"] <= 21


def test_anneal_single_array_and_deadline():
    calls = []

    def project(G, tau):
        calls.append(tau)
        time.sleep(0.01)
        return G + 1.0  # never converges

    res = anneal(
        lambda X: X,
        project,
        np.zeros(3),
        Schedule(1.0, 1e-3, 0.5, max_inner=1000, tol=1e-9),
        deadline=time.perf_counter() + 0.05,
    )
    assert res.stopped == "time_limit" and not res.converged
    assert isinstance(res.X, np.ndarray) and len(calls) < 50


def test_anneal_torch_blocks_match_numpy():
    torch = pytest.importorskip("torch")
    t = [np.array([[0.2, 0.8], [0.8, 0.2]])]
    r_np = anneal(
        lambda X: X, lambda G, tau: t, [np.zeros((2, 2))], Schedule(1, 0.5, 0.5, 5, 1e-9, 0.5)
    )
    tt = [torch.tensor(t[0])]
    r_t = anneal(
        lambda X: X,
        lambda G, tau: tt,
        [torch.zeros(2, 2, dtype=torch.float64)],
        Schedule(1, 0.5, 0.5, 5, 1e-9, 0.5),
    )
    np.testing.assert_allclose(r_t.X[0].numpy(), r_np.X[0])
    assert r_t.n_iter == r_np.n_iter
