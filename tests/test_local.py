"""Local search (2-opt, robust tabu search): brute force, delta formulas, paths, backends."""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from qapfuse import ConvergenceWarning, Problem, solve, tabu, two_opt
from qapfuse.solvers import _local_kernels as kernels
from qapfuse.solvers import _local_runner as lsearch

QAPLIB = Path(__file__).resolve().parents[2] / "shared" / "qaplib"


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile (or load) the Numba kernels once, so timing tests measure search only."""
    lsearch.warm_up()


# -- helpers -----------------------------------------------------------------------------------


def kb_instance(n: int, seed: int, *, linear: bool = True, n2: int | None = None):
    """Integer data: asymmetric A, B with non-zero diagonals, optional linear term."""
    rng = np.random.default_rng(seed)
    n2 = n if n2 is None else n2
    A = rng.integers(-3, 10, (n, n)).astype(float)
    B = rng.integers(0, 10, (n2, n2)).astype(float)
    C = rng.integers(0, 10, (n, n2)).astype(float) if linear else None
    return A, B, C


def kb_cost(A, B, C, cols) -> float:
    """``sum A[i,j] B[c_i, c_j] + sum C[i, c_i]`` for the partial permutation `cols`."""
    cols = np.asarray(cols)
    v = (A * B[np.ix_(cols, cols)]).sum()
    if C is not None:
        v += C[np.arange(len(cols)), cols].sum()
    return float(v)


def brute_min(A, B, C) -> float:
    n1, n2 = A.shape[0], B.shape[0]
    return min(kb_cost(A, B, C, c) for c in itertools.permutations(range(n2), n1))


def assert_partial_permutation(X, n1, n2):
    X = np.asarray(X)
    assert X.shape == (n1, n2)
    assert set(np.unique(X)) <= {0.0, 1.0}
    np.testing.assert_array_equal(X.sum(axis=1), np.ones(n1))
    assert X.sum(axis=0).max() <= 1


def read_qaplib(name: str):
    tok = np.array(open(QAPLIB / f"{name}.dat").read().split(), dtype=np.int64)
    n = int(tok[0])
    A = tok[1 : 1 + n * n].reshape(n, n).astype(float)
    B = tok[1 + n * n : 1 + 2 * n * n].reshape(n, n).astype(float)
    best = int(open(QAPLIB / f"{name}.sln").read().split()[1])
    return A, B, best


# -- brute force -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 7])
def test_tabu_reaches_brute_force_optimum(n):
    hits = 0
    seeds = range(8) if n == 5 else range(4)
    for seed in seeds:
        A, B, C = kb_instance(n, seed)
        p = Problem.koopmans_beckmann(A, B, C, sense="min")
        res = tabu(p, rng=seed)
        assert_partial_permutation(res.X, n, n)
        cost = kb_cost(A, B, C, res.permutation)
        assert res.objective == pytest.approx(cost)
        hits += cost == pytest.approx(brute_min(A, B, C))
    assert hits >= len(seeds) - 1


@pytest.mark.filterwarnings("ignore::qapfuse.ConvergenceWarning")
def test_ga_plus_two_opt_reaches_brute_force_optimum_on_most():
    hits, trials = 0, 10
    for seed in range(trials):
        A, B, C = kb_instance(6, 100 + seed)
        p = Problem.koopmans_beckmann(A, B, C, sense="min")
        res = solve(p, "ga", refine="two_opt", rng=seed)
        assert_partial_permutation(res.X, 6, 6)
        hits += res.objective == pytest.approx(brute_min(A, B, C))
    assert hits >= trials // 2


def test_two_opt_result_is_a_local_optimum():
    A, B, C = kb_instance(7, 3)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    for strategy in ("first", "best"):
        res = two_opt(p, strategy=strategy, rng=1)
        assert res.converged
        cols = res.permutation
        base = kb_cost(A, B, C, cols)
        for r, s in itertools.combinations(range(7), 2):
            q = cols.copy()
            q[[r, s]] = q[[s, r]]
            assert kb_cost(A, B, C, q) >= base - 1e-9


def test_maximisation_sense_and_linear_only_problem():
    A, B, C = kb_instance(6, 11)
    p = Problem.koopmans_beckmann(A, B, C, sense="max")
    res = solve(p, "tabu", rng=0)
    best = max(kb_cost(A, B, C, c) for c in itertools.permutations(range(6)))
    assert res.score == pytest.approx(best)
    assert res.objective == pytest.approx(best)


# -- delta formulas ----------------------------------------------------------------------------


def _full_cost(inst, p):
    return inst.cost(p)


@pytest.mark.parametrize("form", ["kb", "dense"])
def test_swap_delta_matches_recomputation(form):
    A, B, C = kb_instance(7, 5, n2=9)  # partial: two dummy rows
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    if form == "dense":
        p = Problem.from_dense(p.to_dense()[0], 7, 9)
    inst = lsearch._instances(p, "test")[0]
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = rng.permutation(9).astype(np.int64)
        args = inst.state(perm)
        base = _full_cost(inst, perm)
        for r in range(7):
            for s in range(r + 1, 9):
                q = perm.copy()
                q[[r, s]] = q[[s, r]]
                d = kernels._delta(*args, perm, r, s)
                assert d == pytest.approx(_full_cost(inst, q) - base, abs=1e-9)


@pytest.mark.parametrize("form", ["kb", "dense"])
def test_incremental_delta_update_matches_recomputation(form):
    """After each move, O(1)-updated deltas equal deltas recomputed from scratch."""
    n = 8
    A, B, C = kb_instance(n, 9)
    A[0, 0], B[1, 1] = 7.0, 5.0  # make sure the diagonals are non-zero
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    if form == "dense":
        p = Problem.from_dense(p.to_dense()[0])
    inst = lsearch._instances(p, "test")[0]
    rng = np.random.default_rng(1)
    perm = rng.permutation(n).astype(np.int64)
    args = inst.state(perm)
    delta = np.zeros((n, n))
    kernels._all_deltas(*args, perm, delta)
    vecs = [np.zeros(n) for _ in range(4)]
    for _ in range(25):
        u, v = sorted(rng.choice(n, 2, replace=False))
        kernels._swap(args[0], args[3], args[4], perm, u, v)
        kernels._move_vectors(*args[:5], perm, u, v, *vecs)
        fresh = np.zeros((n, n))
        kernels._all_deltas(*args, perm, fresh)
        for r in range(n):
            for s in range(r + 1, n):
                delta[r, s] = kernels._updated(*args, perm, delta, r, s, u, v, *vecs)
        np.testing.assert_allclose(np.triu(delta, 1), np.triu(fresh, 1), atol=1e-9)
        # The permuted second matrix stays in step with the permutation.
        if form == "kb":
            np.testing.assert_array_equal(args[3], inst.D[np.ix_(perm, perm)])


@pytest.mark.parametrize("symmetric", [False, True])
def test_tabu_kernel_keeps_deltas_and_costs_exact(symmetric):
    """Running the tabu kernel leaves its delta matrix and cost equal to recomputation."""
    n = 10
    A, B, C = kb_instance(n, 21)
    if symmetric:  # the symmetric kernel mode (one product in the O(n) sums)
        A, B = A + A.T, B + B.T
    inst = lsearch._instances(Problem.koopmans_beckmann(A, B, C, sense="min"), "test")[0]
    assert inst.mode == (kernels._KB_SYM if symmetric else kernels._KB)
    perm = np.random.default_rng(2).permutation(n).astype(np.int64)
    st = lsearch._run_tabu(inst, perm, 137, None, None, None, np.random.default_rng(0))
    assert kernels._cost(inst.mode, inst.F, inst.state(st.p)[3], inst.C, inst.K, n, st.p) == (
        pytest.approx(inst.cost(st.p))
    )
    assert st.best == pytest.approx(kb_cost(A, B, C, st.best_p))
    args = inst.state(st.p)
    delta = np.zeros((n, n))
    kernels._all_deltas(*args, st.p, delta)
    # Re-run one chunk from the final state through the public driver path: the kernel's
    # incremental deltas must match a fresh computation at every step.
    p2 = st.p.copy()
    args2 = inst.state(p2)
    d2 = delta.copy()
    last = -(np.arange(n * n, dtype=np.int64).reshape(n, n) + 100)
    fstate = np.array([inst.cost(p2)] * 2)
    istate = np.array([0, -1, -1, 0, 1, 0, last.min()], dtype=np.int64)
    vecs = [np.zeros(n) for _ in range(4)]
    tenures = np.full(8, n, dtype=np.int64)
    for _ in range(20):
        kernels._tabu_chunk(
            *args2, p2, d2, last, p2.copy(), fstate, istate, tenures, 22, 500, 1e-9, 3, *vecs
        )
        kernels._apply_pending(*args2, p2, d2, istate, *vecs)
        fresh = np.zeros((n, n))
        kernels._all_deltas(*inst.state(p2), p2, fresh)
        np.testing.assert_allclose(np.triu(d2, 1), np.triu(fresh, 1), atol=1e-9)
        assert fstate[0] == pytest.approx(kb_cost(A, B, C, p2))


# -- paths: dense K, partial, batched, torch ---------------------------------------------------


def test_dense_path_equals_kb_path():
    A, B, C = kb_instance(9, 4)
    kb = Problem.koopmans_beckmann(A, B, C, sense="min")
    dense = Problem.from_dense(kb.to_dense()[0], sense="max")
    for fn, kw in ((tabu, {"max_iter": 300}), (two_opt, {"strategy": "best"}), (two_opt, {})):
        r1, r2 = fn(kb, rng=3, **kw), fn(dense, rng=3, **kw)
        assert r1.info["form"] == "kb" and r2.info["form"] == "dense"
        np.testing.assert_array_equal(r1.X, r2.X)
        assert r1.score == pytest.approx(r2.score)


def test_general_dense_lawler_problem_matches_brute_force():
    from helpers import brute_force_lawler

    rng = np.random.default_rng(8)
    K = rng.normal(size=(25, 25))  # not Koopmans-Beckmann, not symmetric
    p = Problem.from_dense(K)
    best, _ = brute_force_lawler(K, 5, 5)
    assert tabu(p, rng=0).score == pytest.approx(best)
    assert two_opt(p, rng=0).score <= best + 1e-9


@pytest.mark.parametrize("form", ["kb", "dense"])
def test_partial_matching_matches_brute_force(form):
    from helpers import brute_force_lawler

    A, B, C = kb_instance(4, 12, n2=6)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    if form == "dense":
        p = Problem.from_dense(p.to_dense()[0], 4, 6)
    res = tabu(p, rng=0)
    assert_partial_permutation(res.X, 4, 6)
    best, _ = brute_force_lawler(np.asarray(p.to_dense()[0]), 4, 6)
    assert res.score == pytest.approx(best)
    assert -res.score == pytest.approx(brute_min(A, B, C))
    r2 = two_opt(p, rng=0)
    assert_partial_permutation(r2.X, 4, 6)


def test_batched_instances_of_different_sizes():
    sizes = [(3, 5), (5, 5), (4, 4)]
    A = np.zeros((3, 5, 5))
    B = np.zeros((3, 5, 5))
    Cs = np.zeros((3, 5, 5))
    exact = []
    for k, (n1, n2) in enumerate(sizes):
        a, b, c = kb_instance(n1, 40 + k, n2=n2)
        A[k, :n1, :n1], B[k, :n2, :n2], Cs[k, :n1, :n2] = a, b, c
        exact.append(brute_min(a, b, c))
    n1s, n2s = [s[0] for s in sizes], [s[1] for s in sizes]
    p = Problem.koopmans_beckmann(A, B, Cs, n1=n1s, n2=n2s, sense="min")
    res = tabu(p, rng=0)
    assert res.X.shape == (3, 5, 5)
    for k, (n1, n2) in enumerate(sizes):
        assert_partial_permutation(res.X[k, :n1, :n2], n1, n2)
        assert res.X[k].sum() == n1
    np.testing.assert_allclose(res.objective, exact)


def test_torch_input_gives_torch_output_with_the_same_matching():
    torch = pytest.importorskip("torch")
    A, B, C = kb_instance(8, 7)
    p_np = Problem.koopmans_beckmann(A, B, C, sense="min")
    p_t = Problem.koopmans_beckmann(
        torch.tensor(A, dtype=torch.float32),
        torch.tensor(B, dtype=torch.float32),
        torch.tensor(C, dtype=torch.float32),
        sense="min",
    )
    for method, kw in (("tabu", {"max_iter": 400}), ("two_opt", {})):
        r_np = solve(p_np, method, rng=5, **kw)
        r_t = solve(p_t, method, rng=5, **kw)
        assert isinstance(r_t.X, torch.Tensor) and r_t.X.dtype == torch.float32
        assert r_t.X.device == torch.device("cpu")
        np.testing.assert_array_equal(r_t.X.numpy(), r_np.X)
        assert r_t.objective == pytest.approx(r_np.objective)
    x0 = torch.eye(8, dtype=torch.float32)
    r = two_opt(p_t, x0=x0)
    assert isinstance(r.X, torch.Tensor)


def test_start_from_x0_hard_or_soft():
    A, B, C = kb_instance(7, 2)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    local = two_opt(p, rng=0)
    # A local optimum given as the start stays put (hard) ...
    again = two_opt(p, x0=local.X)
    np.testing.assert_array_equal(again.X, local.X)
    assert again.n_iter == 0
    # ... and a soft matrix is rounded first (Hungarian on the soft start).
    soft = 0.6 * local.X + 0.4 / 7
    np.testing.assert_array_equal(two_opt(p, x0=soft).X, local.X)


def test_same_seed_same_answer_and_rng_types():
    A, B, _ = kb_instance(12, 1, linear=False)
    p = Problem.koopmans_beckmann(A, B, sense="min")
    a = tabu(p, rng=7, max_iter=200)
    b = tabu(p, rng=np.random.default_rng(7), max_iter=200)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.n_iter == 200


# -- QAPLIB --------------------------------------------------------------------------------------


@pytest.mark.skipif(not QAPLIB.is_dir(), reason="shared QAPLIB folder not present")
@pytest.mark.parametrize("name", ["chr12a", "had12", "nug12", "tai12a"])
def test_tabu_reaches_qaplib_best_known(name):
    A, B, best = read_qaplib(name)
    p = Problem.koopmans_beckmann(A, B, sense="min")
    res = solve(p, "tabu", rng=0, max_iter=30000)
    assert res.objective == best
    assert kb_cost(A, B, None, res.permutation) == best


# -- time limit --------------------------------------------------------------------------------


def test_tabu_time_limit_is_respected():
    rng = np.random.default_rng(0)
    n, limit = 150, 0.2
    p = Problem.koopmans_beckmann(rng.random((n, n)), rng.random((n, n)), sense="min")
    t0 = time.perf_counter()
    res = solve(p, "tabu", time_limit=limit, rng=0)
    assert time.perf_counter() - t0 < 5 * limit
    assert res.n_iter > 0


@pytest.mark.parametrize("strategy", ["first", "best"])
def test_two_opt_time_limit_is_respected_and_warns_when_cut(strategy):
    rng = np.random.default_rng(1)
    n, limit = 800, 0.05
    p = Problem.koopmans_beckmann(rng.random((n, n)), rng.random((n, n)), sense="min")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = two_opt(p, strategy=strategy, time_limit=limit, rng=0)
    assert time.perf_counter() - t0 < 5 * limit + 1.0  # + the O(n^3) set-up of "best"
    assert not res.converged  # n=800 needs far more than 0.05 s (n=300 did not, quiet)
    assert any(issubclass(w.category, ConvergenceWarning) for w in seen)


# -- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    A, B, C = kb_instance(5, 0)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    with pytest.raises(ValueError, match="'strategy' parameter of two_opt"):
        two_opt(p, strategy="steepest")
    with pytest.raises(ValueError, match="'time_limit' parameter of tabu must be a float > 0"):
        tabu(p, time_limit=-1.0)
    with pytest.raises(ValueError, match="'time_limit'"):
        solve(p, "tabu", time_limit=-1.0)
    with pytest.raises(ValueError, match=r"'x0' parameter of tabu must have shape \(5, 5\)"):
        tabu(p, x0=np.eye(4))
    with pytest.raises(TypeError, match="'max_iter' parameter of tabu must be an int"):
        tabu(p, max_iter=2.5)
    with pytest.raises(ValueError, match="'tenure' parameter of tabu"):
        tabu(p, tenure=0)
    with pytest.raises(TypeError, match="unknown option"):
        solve(p, "tabu", tenur=3)
    with pytest.raises(TypeError, match="'problem' parameter of two_opt"):
        two_opt(np.eye(3))


def test_unsupported_operator_names_the_supported_forms(monkeypatch):
    K = sp.random(400, 400, density=0.01, random_state=0, format="csr")
    p = Problem.from_sparse(K)
    monkeypatch.setattr(lsearch, "DENSE_MAX_BYTES", 1000)
    with pytest.raises(TypeError, match=r"Koopmans-Beckmann problems .* dense K fits"):
        tabu(p)
    monkeypatch.undo()
    res = two_opt(Problem.from_sparse(sp.random(16, 16, density=0.3, random_state=1)), rng=0)
    assert res.info["form"] == "dense"


# -- the shared delta-update row, the runner, and the clock ---------------------------------------


@pytest.mark.parametrize("form", ["kb", "dense"])
def test_row_update_after_a_move_matches_recomputation(form):
    """The kernels' per-row update (one copy for 2-opt, tabu and pending moves) is exact."""
    n = 9
    A, B, C = kb_instance(n, 31)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    if form == "dense":
        p = Problem.from_dense(p.to_dense()[0])
    inst = lsearch._instances(p, "test")[0]
    rng = np.random.default_rng(4)
    perm = rng.permutation(n).astype(np.int64)
    args = inst.state(perm)
    delta = np.zeros((n, n))
    kernels._all_deltas(*args, perm, delta)
    vecs = [np.zeros(n) for _ in range(4)]
    for _ in range(10):
        u, v = sorted(rng.choice(n, 2, replace=False))
        kernels._swap(args[0], args[3], args[4], perm, u, v)
        kernels._move_vectors(*args[:5], perm, u, v, *vecs)
        kernels._refresh_rows(*args, perm, delta, u, v)
        for r in range(n - 1):
            if r not in (u, v):
                kernels._update_row(inst.mode, inst.K, n, perm, delta, r, u, v, *vecs)
        fresh = np.zeros((n, n))
        kernels._all_deltas(*args, perm, fresh)
        np.testing.assert_allclose(np.triu(delta, 1), np.triu(fresh, 1), atol=1e-9)


def test_runner_shares_one_start_and_result_path_with_the_public_solvers():
    A, B, C = kb_instance(8, 41)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    runner = lsearch.LocalSearch(p, "test")
    perms = runner.start_perms(None, np.random.default_rng(5))
    runs = runner.tabu(perms, max_iter=200, deadline=None, gen=np.random.default_rng(5))
    res = tabu(p, max_iter=200, rng=5)
    np.testing.assert_array_equal(runner.to_X([run.best_p for run in runs])[0], res.X)
    assert runs[0].best == pytest.approx(kb_cost(A, B, C, runs[0].best_p))
    assert runner.form == res.info["form"] == "kb"


class _SteppingClock:
    """A stand-in for the `time` module whose clock moves `step` seconds per reading."""

    def __init__(self, step):
        self.now, self.step, self.reads = 1000.0, step, 0

    def perf_counter(self):
        self.reads += 1
        self.now += self.step
        return self.now


def test_tabu_stops_at_the_time_limit_within_a_run(monkeypatch):
    """With only a time limit there is no iteration budget: the clock alone ends the run."""
    A, B, C = kb_instance(30, 51)
    p = Problem.koopmans_beckmann(A, B, C, sense="min")
    clock = _SteppingClock(1e-3)
    monkeypatch.setattr(lsearch, "time", clock)
    res = tabu(p, time_limit=0.02, rng=0)
    assert 0 < res.n_iter < lsearch.default_tabu_iterations(30)
    assert clock.reads < 60  # about 4 readings per chunk over 20 ms of 1 ms readings
    assert kb_cost(A, B, C, res.permutation) == res.objective


@pytest.mark.parametrize("strategy", ["first", "best"])
def test_two_opt_stops_at_the_time_limit_within_a_run(monkeypatch, strategy):
    rng = np.random.default_rng(6)
    n = 200
    p = Problem.koopmans_beckmann(rng.random((n, n)), rng.random((n, n)), sense="min")
    clock = _SteppingClock(1e-3)
    monkeypatch.setattr(lsearch, "time", clock)
    with pytest.warns(ConvergenceWarning, match="raise time_limit"):
        res = two_opt(p, strategy=strategy, time_limit=0.01, rng=0)
    assert res.n_iter > 0 and not res.converged
    assert clock.reads < 30
