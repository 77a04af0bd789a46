"""The default pipeline ("auto"): IPFP starts + robust tabu rounds."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from qapfuse import Problem, auto, solve
from qapfuse.solvers import _local_runner as lsearch
from qapfuse.solvers import _pipeline as pipeline

QAPLIB = Path(__file__).resolve().parents[2] / "shared" / "qaplib"


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    lsearch.warm_up()


def _kb(n, seed, n2=None):
    rng = np.random.default_rng(seed)
    n2 = n if n2 is None else n2
    A = rng.integers(-2, 9, (n, n)).astype(float)
    B = rng.integers(0, 9, (n2, n2)).astype(float)
    C = rng.integers(0, 9, (n, n2)).astype(float)
    return A, B, C


def _brute(A, B, C):
    n1, n2 = A.shape[0], B.shape[0]
    return min(
        (A * B[np.ix_(c, c)]).sum() + C[np.arange(n1), list(c)].sum()
        for c in itertools.permutations(range(n2), n1)
    )


def test_auto_finds_brute_force_optimum_and_reports_rounds():
    for seed in range(3):
        A, B, C = _kb(7, seed)
        p = Problem.koopmans_beckmann(A, B, C, sense="min")
        res = solve(p, "auto", time_limit=0.6, rng=seed)
        assert res.objective == pytest.approx(_brute(A, B, C))
        assert res.info["form"] == "kb" and res.info["rounds"] == 2
        assert res.info["starts"] == ["ipfp", "ipfp-random"]
        assert res.info["starts"][0] == "ipfp"


def test_auto_partial_and_batched():
    A = np.zeros((2, 5, 5))
    B = np.zeros((2, 6, 6))
    C = np.zeros((2, 5, 6))
    exact = []
    for k, (n1, n2) in enumerate([(5, 6), (3, 4)]):
        a, b, c = _kb(n1, 10 + k, n2)
        A[k, :n1, :n1], B[k, :n2, :n2], C[k, :n1, :n2] = a, b, c
        exact.append(_brute(a, b, c))
    p = Problem.koopmans_beckmann(A, B, C, n1=[5, 3], n2=[6, 4], sense="min")
    res = auto(p, time_limit=0.3, rng=0)
    assert res.X.shape == (2, 5, 6)
    assert res.X[1, 3:].sum() == 0 and res.X[1, :, 4:].sum() == 0
    np.testing.assert_array_equal(res.X.sum(axis=(1, 2)), [5, 3])
    np.testing.assert_allclose(res.objective, exact)


def test_auto_respects_time_limit_and_x0():
    rng = np.random.default_rng(0)
    n = 120
    p = Problem.koopmans_beckmann(rng.random((n, n)), rng.random((n, n)), sense="min")
    t0 = time.perf_counter()
    res = auto(p, time_limit=0.3, x0=np.eye(n), rng=0)
    assert time.perf_counter() - t0 < 1.5
    assert res.info["starts"][0] == "x0"
    with pytest.raises(ValueError, match=r"'x0' parameter of auto must have shape"):
        auto(p, x0=np.eye(3))
    with pytest.raises(ValueError, match="'time_limit' parameter of auto"):
        auto(p, time_limit=0.0)


def test_auto_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    A, B, C = _kb(6, 3)
    p = Problem.koopmans_beckmann(
        torch.tensor(A), torch.tensor(B), torch.tensor(C, dtype=torch.float64), sense="min"
    )
    res = auto(p, time_limit=0.2, rng=0)
    assert isinstance(res.X, torch.Tensor) and res.X.dtype == torch.float64
    assert res.objective == pytest.approx(_brute(A, B, C))


@pytest.mark.filterwarnings("ignore::qapfuse.ConvergenceWarning")
def test_auto_falls_back_to_ga_when_local_search_cannot_run(monkeypatch):
    K = sp.random(36, 36, density=0.2, random_state=0, format="csr")
    p = Problem.from_sparse(K + K.T)
    assert auto(p, time_limit=0.2, rng=0).info["form"] == "dense"
    monkeypatch.setattr(lsearch, "DENSE_MAX_BYTES", 100)
    res = auto(p, time_limit=0.2, rng=0)
    assert res.info["form"] == "ga"
    assert res.X.shape == (6, 6) and np.asarray(res.X).sum() == 6


@pytest.mark.skipif(not QAPLIB.is_dir(), reason="shared QAPLIB folder not present")
@pytest.mark.parametrize("name", ["nug12", "had12"])
def test_auto_reaches_qaplib_optimum(name):
    tok = np.array(open(QAPLIB / f"{name}.dat").read().split(), dtype=np.int64)
    n = int(tok[0])
    A = tok[1 : 1 + n * n].reshape(n, n)
    B = tok[1 + n * n : 1 + 2 * n * n].reshape(n, n)
    best = int(open(QAPLIB / f"{name}.sln").read().split()[1])
    res = solve(Problem.koopmans_beckmann(A, B, sense="min"), "auto", time_limit=0.5, rng=0)
    assert res.objective == best


# -- the budget: rounds and the start that every budget keeps --------------------------------------


class _SteppingClock:
    """A stand-in for the `time` module whose clock moves `step` seconds per reading."""

    def __init__(self, step):
        self.now, self.step = 1000.0, step

    def perf_counter(self):
        self.now += self.step
        return self.now


def _chr12a():
    from qapfuse.io.qaplib import example_path, read_dat

    A, B = read_dat(example_path("chr12a"))
    return Problem.koopmans_beckmann(A, B, sense="min"), A, B


@pytest.mark.filterwarnings("ignore::qapfuse.ConvergenceWarning")
def test_auto_under_any_limit_keeps_at_least_the_rounded_continuous_start(monkeypatch):
    """The path that once returned a random permutation (442% gap on chr12a): a budget too
    short for IPFP by its estimate. Round 1 still rounds a continuous start, and tabu search
    only improves on it, even when the clock leaves it no iteration at all."""
    from qapfuse import ipfp

    p, A, B = _chr12a()
    rounded_start = ipfp(p, max_iter=1).objective  # one Frank-Wolfe step from uniform
    res = auto(p, time_limit=1e-4, rng=0)
    assert res.info["starts"] == ["ipfp"]
    assert res.objective <= rounded_start
    assert sorted(res.permutation.tolist()) == list(range(12))
    assert (A * B[np.ix_(res.permutation, res.permutation)]).sum() == res.objective
    # A clock that jumps a second per reading: the budget is spent before tabu search starts,
    # which still runs its one short first chunk from the rounded start.
    clock = _SteppingClock(1.0)
    monkeypatch.setattr(pipeline, "time", clock)
    monkeypatch.setattr(lsearch, "time", clock)
    res = auto(p, time_limit=1e-4, rng=0)
    assert res.info["starts"] == ["ipfp"] and res.n_iter > 0
    assert res.objective <= rounded_start


def test_auto_checks_the_time_limit_between_rounds(monkeypatch):
    p, _, _ = _chr12a()
    rounds = {}
    for step in (0.01, 0.4):  # seconds per clock reading: ~100 or ~2 readings per round
        clock = _SteppingClock(step)
        monkeypatch.setattr(pipeline, "time", clock)
        monkeypatch.setattr(lsearch, "time", clock)
        res = auto(p, time_limit=3.0, rng=0, x0=np.eye(12))
        assert res.info["starts"][0] == "x0"
        rounds[step] = res.info["rounds"]
    assert rounds[0.01] == 3  # a 3 s budget has three rounds ...
    assert rounds[0.4] < 3  # ... and stops after the round that used it up


def test_auto_logs_one_progress_line_per_round(caplog):
    import logging

    from qapfuse import Problem, solve
    from qapfuse.io import qaplib

    problem = Problem.from_qaplib(qaplib.example_path("nug12"))
    with caplog.at_level(logging.INFO, logger="qapfuse"):
        res = solve(problem, "auto", time_limit=0.3, rng=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto: round")]
    assert len(lines) == res.info["rounds"] >= 1
    # the last line reports the returned objective
    assert lines[-1].endswith(f"best objective {res.objective:.10g}")
