"""Multi-graph matching: GAMGM in a universe, synchronisation, consistency and accuracy."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from qapfuse import Problem
from qapfuse.solvers.multi import (
    OPTIONS,
    MultiMatchResult,
    accuracy,
    consistency,
    gamgm,
    gamgm_affinity,
    synchronize,
)


def noisy_graph_set(m, n, *, noise=0.0, density=0.6, seed=0):
    """m noisy permuted copies of one weighted graph; true matchings (m, m, n, n)."""
    rng = np.random.default_rng(seed)
    A0 = np.triu(rng.random((n, n)) * (rng.random((n, n)) < density), 1)
    A0 = A0 + A0.T
    As, perms = [], []
    for _ in range(m):
        E = np.triu(rng.normal(size=(n, n)), 1)
        B = np.clip(A0 + noise * (E + E.T) * (A0 > 0), 0, None)
        p = rng.permutation(n)
        Ai = np.zeros((n, n))
        Ai[np.ix_(p, p)] = B
        As.append(Ai)
        perms.append(p)
    T = np.zeros((m, m, n, n))
    for i, j in itertools.product(range(m), repeat=2):
        T[i, j, perms[i], perms[j]] = 1.0
    return np.stack(As), T


def pairwise_blocks(T, corrupt=(), seed=0):
    """Pairwise matchings from the truth, with the listed pairs replaced by random ones."""
    rng = np.random.default_rng(seed)
    X = {}
    m, n = T.shape[0], T.shape[2]
    for i, j in itertools.combinations(range(m), 2):
        X[(i, j)] = T[i, j].copy()
        if (i, j) in corrupt:
            X[(i, j)] = np.eye(n)[rng.permutation(n)]
    return X


def pairwise_rrwm_accuracy(A, T):
    from qapfuse import rrwm

    pi, pj = np.triu_indices(A.shape[0], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = rrwm(Problem.koopmans_beckmann(A[pi], A[pj])).X
    return float((X * T[pi, pj]).sum() / T[pi, pj].sum())


# ----------------------------------------------------------------------------------------------
# gamgm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [5, 10])
def test_gamgm_recovers_truth_at_zero_noise(m):
    A, T = noisy_graph_set(m, 10, noise=0.0, seed=m)
    res = gamgm(A)
    assert isinstance(res, MultiMatchResult)
    assert accuracy(res, T) == 1.0
    assert consistency(res) == 1.0


def test_gamgm_is_exactly_consistent_and_beats_pairwise_at_moderate_noise():
    A, T = noisy_graph_set(8, 16, noise=0.2, density=0.5, seed=3)
    res = gamgm(A)
    assert consistency(res) == 1.0
    pw = pairwise_rrwm_accuracy(A, T)
    acc = accuracy(res, T)
    assert pw < 0.95  # the pairwise problem is genuinely hard here
    assert acc > pw + 0.05
    # every pairwise matching is a permutation read off the universe
    X = res.to_dense()
    for i, j in itertools.permutations(range(8), 2):
        np.testing.assert_array_equal(X[i, j], res[i, j])
        np.testing.assert_array_equal(res[i, j].sum(axis=0), np.ones(16))
        np.testing.assert_array_equal(res[i, j].sum(axis=1), np.ones(16))


def test_gamgm_score_is_the_sum_of_pairwise_lawler_scores():
    A, _ = noisy_graph_set(4, 5, noise=0.1, seed=1)
    rng = np.random.default_rng(0)
    W = rng.random((4, 4, 5, 5))
    res = gamgm(A, W, quad_weight=0.5)
    total = 0.0
    for i, j in itertools.combinations(range(4), 2):
        K = 0.5 * np.kron(A[j], A[i]) + np.diag(0.5 * (W[i, j] + W[j, i].T).ravel(order="F"))
        x = res[i, j].ravel(order="F")
        total += x @ K @ x
    assert res.score == pytest.approx(total)


def test_gamgm_history_and_info():
    A, _ = noisy_graph_set(5, 6, noise=0.1, seed=2)
    res = gamgm(A)
    hist = res.info["history"]
    if res.info["picked"] == "start (fixed point)":  # the start needed no annealing
        assert hist == []
    else:
        assert len(hist) >= 1 and {"tau", "inner", "score"} <= set(hist[0])
    assert res.n_iter >= sum(h["inner"] for h in hist)
    # from a uniform start there is always an annealing history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uni = gamgm(A, init="uniform", rng=0)
    assert uni.info["picked"] == "annealed" and len(uni.info["history"]) >= 1
    assert uni.n_iter == sum(h["inner"] for h in uni.info["history"])
    assert res.info["init"] == "rrwm+synchronize"
    assert res.U.shape == (5, 6, 6) and res.soft.shape == (5, 6, 6)
    assert "MultiMatchResult(m=5" in repr(res)


def test_gamgm_partial_graphs_and_larger_universe():
    A, _ = noisy_graph_set(5, 7, noise=0.0, seed=4)
    ns = np.array([7, 7, 6, 6, 5])
    for i, k in enumerate(ns):
        A[i, k:, :] = 0
        A[i, :, k:] = 0
    for d in (7, 9):
        res = gamgm(A, ns=ns, n_univ=d)
        assert res.U.shape == (5, 7, d)
        assert consistency(res) == 1.0
        for i in range(5):
            Ui = res[i]
            assert Ui.shape == (ns[i], d)
            np.testing.assert_array_equal(Ui.sum(axis=1), np.ones(ns[i]))
            assert Ui.sum(axis=0).max() <= 1
        assert res[3, 4].shape == (6, 5)


def test_gamgm_uniform_start_and_seed():
    A, _ = noisy_graph_set(4, 6, noise=0.1, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = gamgm(A, init="uniform", rng=3)
        b = gamgm(A, init="uniform", rng=3)
    np.testing.assert_array_equal(a.U, b.U)
    assert consistency(a) == 1.0


def test_gamgm_accepts_a_synchronized_start():
    A, T = noisy_graph_set(5, 8, noise=0.0, seed=6)
    start = synchronize(T)
    res = gamgm(A, init=start)
    assert res.info["init"] == "given"
    assert accuracy(res, T) == 1.0


def test_upper_bound_holds_and_isomorphic_graphs_attain_it():
    from qapfuse.solvers.multi._objective import _KBObjective

    A, _ = noisy_graph_set(5, 7, noise=0.2, seed=11)
    obj = _KBObjective(A, None, 0.7, xp=np)
    bound = obj.upper_bound()
    rng = np.random.default_rng(0)
    for _ in range(20):  # random universe matchings never beat the bound
        U = np.stack([np.eye(7)[rng.permutation(7)] for _ in range(5)])
        assert obj.score(U) <= bound
    assert _KBObjective(A, np.zeros((35, 35)), 1.0, xp=np).upper_bound() is None
    # exactly isomorphic graphs: the start attains the bound and is returned as it is
    A0, T0 = noisy_graph_set(6, 9, noise=0.0, seed=12)
    res = gamgm(A0)
    assert res.info["picked"] == "start (attains the upper bound)"
    assert res.info["refine_sweeps"] == 0
    assert res.score == pytest.approx(_KBObjective(A0, None, 1.0, xp=np).upper_bound())
    assert accuracy(res, T0) == 1.0
    # noisy graphs cannot attain it: the Hungarian phase runs
    assert gamgm(A).info["refine_sweeps"] >= 1


def test_gamgm_reaches_the_planted_solution_at_high_noise():
    from qapfuse.bench.mgm import graph_set
    from qapfuse.solvers.multi._objective import _KBObjective

    # Seeds where pairwise RRWM is mostly wrong (accuracy < 0.5): the tabu-polished pairwise
    # start is what lets gamgm find the planted matchings here.
    for seed in (2035, 3035):
        A, T = graph_set(8, 20, noise=0.3, rng=seed)
        assert pairwise_rrwm_accuracy(A, T) < 0.5
        res = gamgm(A)
        planted = np.stack([T[i, 0] for i in range(8)])  # graph 0's nodes as the universe
        assert res.score >= _KBObjective(A, None, 1.0, xp=np).score(planted) - 1e-9
        assert accuracy(res, T) == 1.0


def test_pair_polish_never_lowers_a_pair_score():
    from qapfuse import rrwm
    from qapfuse.solvers.multi._pairwise import _polish_pairs

    A, _ = noisy_graph_set(6, 12, noise=0.4, seed=13)
    pi, pj = np.triu_indices(6, 1)

    def pairs(k):
        return Problem.koopmans_beckmann(A[pi[k]], A[pj[k]])

    prob = pairs(np.arange(pi.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rrwm(prob)
    X = res.X
    Y = _polish_pairs(prob, res, pairs, 100 * 12, rng=0)
    before, after = prob.score(X), prob.score(Y)
    assert np.all(after >= before - 1e-9)
    assert np.any(after > before + 1e-6)  # at this noise some RRWM answers are improvable
    for y in Y:  # still permutations
        np.testing.assert_array_equal(y.sum(axis=0), np.ones(12))
        np.testing.assert_array_equal(y.sum(axis=1), np.ones(12))


def test_relayed_candidates_put_a_misplaced_graph_back():
    from qapfuse.bench.mgm import graph_set
    from qapfuse.solvers.multi._objective import _KBObjective
    from qapfuse.solvers.multi._sweeps import _consensus_sweeps, _relay_pass, _relayed

    A, T = graph_set(6, 10, noise=0.05, outliers=2, rng=5)
    N = A.shape[1]
    m, ns = 6, np.full(6, N)
    # a consistent universe whose inliers follow the truth; graph 4 is placed at random
    U = np.zeros((m, N, N))
    U[0] = np.eye(N)
    for i in range(1, m):
        U[i] = T[i, 0] @ U[0]
        free_rows = np.nonzero(U[i].sum(axis=1) == 0)[0]
        free_cols = np.nonzero(U[i].sum(axis=0) == 0)[0]
        U[i, free_rows, free_cols] = 1.0
    good = U[4].copy()
    U[4] = np.eye(N)[np.random.default_rng(1).permutation(N)]
    relay = np.einsum("iab,jcb->ijac", U, U)  # pairwise matchings that agree with U ...
    relay[4] = np.stack([good @ U[j].T for j in range(m)])  # ... and graph 4's right pairs
    relay[:, 4] = np.transpose(relay[4], (0, 2, 1))
    cands = _relayed(relay, U, 4, ns, xp=np)
    assert len(cands) == m - 1
    assert all(np.array_equal(c, good) for c in cands)
    obj = _KBObjective(A, None, 1.0, xp=np)
    fixed = _relay_pass(obj, U, ns, relay, xp=np)
    np.testing.assert_array_equal(fixed[4], good)
    np.testing.assert_array_equal(np.delete(fixed, 4, axis=0), np.delete(U, 4, axis=0))
    _, score, _ = _consensus_sweeps(obj, U, ns, 3, xp=np, relay=relay)
    assert score >= obj.score(fixed) - 1e-9


def test_gamgm_numpy_equals_torch():
    torch = pytest.importorskip("torch")
    A, T = noisy_graph_set(5, 7, noise=0.15, seed=7)
    opts = dict(max_inner=5, sk_iter=30, tau0=0.02, tau_min=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res_np = gamgm(A, **opts)
        res_t = gamgm(torch.asarray(A), **opts)
    assert isinstance(res_t.U, torch.Tensor) and res_t.U.dtype == torch.float64
    np.testing.assert_array_equal(res_t.U.numpy(), res_np.U)
    assert res_t.score == pytest.approx(res_np.score)
    assert accuracy(res_t, T) == accuracy(res_np, T)


# ----------------------------------------------------------------------------------------------
# gamgm_affinity
# ----------------------------------------------------------------------------------------------


def test_gamgm_affinity_forms_agree_with_kb_form():
    m, n = 5, 7
    A, T = noisy_graph_set(m, n, noise=0.1, density=0.9, seed=9)
    pi, pj = np.triu_indices(m, 1)
    kb = gamgm(A)
    batched = gamgm_affinity(Problem.koopmans_beckmann(A[pi], A[pj]))
    mapping = gamgm_affinity({(int(i), int(j)): np.kron(A[j], A[i]) for i, j in zip(pi, pj)})
    K = np.zeros((m, m, n * n, n * n))
    for i, j in itertools.product(range(m), repeat=2):
        K[i, j] = np.kron(A[j], A[i])
    dense = gamgm_affinity(K)
    assert accuracy(kb, T) == 1.0
    for res in (batched, mapping, dense):
        assert consistency(res) == 1.0
        assert accuracy(res, T) == 1.0
        assert res.score == pytest.approx(kb.score)


def test_gamgm_affinity_sparse_and_reversed_pairs_for_unequal_sizes():
    sp = pytest.importorskip("scipy.sparse")
    A, _ = noisy_graph_set(4, 6, noise=0.0, seed=9)
    ns = [6, 6, 5, 6]
    A2 = [A[i][: ns[i], : ns[i]] for i in range(4)]
    K = {}
    for i, j in itertools.combinations(range(4), 2):
        if ns[i] <= ns[j]:
            K[(i, j)] = Problem.koopmans_beckmann(A2[i], A2[j])
        else:  # X_ji is (5, 6): give the pair the other way round
            K[(j, i)] = sp.csr_matrix(np.kron(A2[i], A2[j]))
            K[(j, i)] = Problem.from_sparse(K[(j, i)], n1=ns[j], n2=ns[i])
    res = gamgm_affinity(K)
    assert consistency(res) == 1.0
    assert res[2, 0].shape == (5, 6) and res[0, 2].shape == (6, 5)
    np.testing.assert_array_equal(res.ns, ns)


def test_gamgm_affinity_torch_problem():
    torch = pytest.importorskip("torch")
    A, T = noisy_graph_set(4, 6, noise=0.0, seed=10)
    pi, pj = np.triu_indices(4, 1)
    res = gamgm_affinity(Problem.koopmans_beckmann(torch.asarray(A[pi]), torch.asarray(A[pj])))
    assert isinstance(res.U, torch.Tensor)
    assert accuracy(res, T) == 1.0


# ----------------------------------------------------------------------------------------------
# synchronize, consistency, accuracy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [6, 10])
def test_synchronize_repairs_a_few_corrupted_pairs(m):
    _, T = noisy_graph_set(m, 12, seed=11)
    corrupt = [(0, 1), (2, 4), (1, 5)]
    X = pairwise_blocks(T, corrupt=corrupt, seed=m)
    assert consistency(X) < 1.0
    assert accuracy(X, T) < 1.0
    res = synchronize(X)
    assert consistency(res) == 1.0
    assert accuracy(res, T) == 1.0
    ev = res.info["eigenvalues"]
    assert ev.shape == (12,) and ev.min() > m / 2


def test_synchronize_of_consistent_input_keeps_it_and_gives_the_spectrum():
    _, T = noisy_graph_set(5, 6, seed=14)
    ns = [6, 5, 6, 4, 6]
    X = {(i, j): T[i, j][: ns[i], : ns[j]] for i, j in itertools.combinations(range(5), 2)}
    res = synchronize(X)
    for (i, j), M in X.items():
        np.testing.assert_array_equal(res[i, j], M)
    # the block matrix Z (identities on the diagonal) and its top eigenvalues, computed densely
    offsets = np.concatenate([[0], np.cumsum(ns)])
    Z = np.zeros((offsets[-1], offsets[-1]))
    for i in range(5):
        for j in range(5):
            M = np.eye(ns[i]) if i == j else T[i, j][: ns[i], : ns[j]]
            Z[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = M
    top = np.sort(np.linalg.eigvalsh(Z))[::-1][:6]
    np.testing.assert_allclose(res.info["eigenvalues"], top, atol=1e-9)
    # one corrupted pair: not consistent any more, the spectral route runs and repairs it
    X[(1, 3)] = X[(1, 3)][[1, 0, 2, 3, 4], :]
    assert consistency(synchronize(X)) == 1.0


def test_synchronize_numpy_equals_torch_and_array_form():
    torch = pytest.importorskip("torch")
    _, T = noisy_graph_set(6, 8, seed=12)
    X = pairwise_blocks(T, corrupt=[(0, 3)], seed=1)
    dense = np.zeros_like(T)
    for (i, j), M in X.items():
        dense[i, j], dense[j, i] = M, M.T
    a = synchronize(X)
    b = synchronize(dense)
    c = synchronize(torch.asarray(dense))
    assert isinstance(c.U, torch.Tensor)
    for r in (b, c):
        for i, j in itertools.combinations(range(6), 2):
            np.testing.assert_array_equal(np.asarray(r[i, j]), a[i, j])


def test_synchronize_partial_graphs():
    _, T = noisy_graph_set(5, 6, seed=13)
    ns = [6, 5, 6, 4, 6]
    X = {(i, j): T[i, j][: ns[i], : ns[j]] for i, j in itertools.combinations(range(5), 2)}
    res = synchronize(X)
    assert consistency(res) == 1.0
    truth = {k: v.copy() for k, v in X.items()}
    assert accuracy(res, truth) == 1.0
    res8 = synchronize(X, 8)
    assert res8.n_univ == 8 and consistency(res8) == 1.0
    assert accuracy(res8, truth) == 1.0


def test_consistency_counts_triples():
    E, S = np.eye(3), np.eye(3)[[1, 0, 2]]
    X = {(0, 1): E, (1, 2): E, (0, 2): E, (0, 3): E, (1, 3): E, (2, 3): S}
    # triples {0,1,2} consistent; {0,1,3}: consistent; {0,2,3}, {1,2,3}: not
    assert consistency(X) == 0.5
    assert consistency({(0, 1): E}) == 1.0


def test_accuracy_ignores_outliers_and_the_diagonal():
    T = np.zeros((2, 2, 3, 3))
    T[0, 1, 0, 0] = T[0, 1, 1, 1] = 1  # node 2 is an outlier in both
    T[1, 0] = T[0, 1].T
    T[0, 0] = T[1, 1] = np.eye(3)
    X = {(0, 1): np.eye(3)[[0, 2, 1]]}
    assert accuracy(X, T) == 0.5


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_missing_and_duplicate_pairs():
    E = np.eye(3)
    with pytest.raises(ValueError, match=r"missing \(0, 2\)"):
        synchronize({(0, 1): E, (1, 2): E})
    with pytest.raises(ValueError, match=r"missing \(1, 2\)"):
        gamgm_affinity({(0, 1): np.eye(9), (0, 2): np.eye(9)})
    with pytest.raises(ValueError, match="given twice"):
        gamgm_affinity({(0, 1): np.eye(9), (1, 0): np.eye(9)})


def test_size_mismatch_between_graph_and_affinities():
    with pytest.raises(ValueError, match=r"Graph 0 has 3 nodes .* but 2 in pair \(0, 2\)"):
        gamgm_affinity({(0, 1): np.eye(9), (1, 2): np.eye(4), (0, 2): np.eye(4)})
    with pytest.raises(ValueError, match=r"`ns` in gamgm_affinity says graph 0 has 2 nodes"):
        gamgm_affinity({(0, 1): np.eye(9), (1, 2): np.eye(9), (0, 2): np.eye(9)}, ns=[2, 3, 3])
    with pytest.raises(ValueError, match=r"must hold m \(m - 1\) / 2 pairs"):
        A = np.ones((4, 3, 3))
        gamgm_affinity(Problem.koopmans_beckmann(A, A))
    with pytest.raises(ValueError, match=r"`W` in gamgm must have shape \(m, m, n, n\)"):
        gamgm(np.ones((3, 4, 4)), np.ones((3, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"`A` in gamgm must have shape \(m, n, n\)"):
        gamgm(np.ones((3, 4, 5)))
    with pytest.raises(ValueError, match=r"`ns` in gamgm must lie in \[1, n\]"):
        gamgm(np.ones((3, 4, 4)), ns=[4, 5, 4])
    with pytest.raises(ValueError, match="Graph 0 has 2 nodes"):
        synchronize({(0, 1): np.eye(2), (0, 2): np.eye(3), (1, 2): np.eye(2)})


def test_universe_errors():
    A = np.ones((3, 4, 4))
    with pytest.raises(ValueError, match=r"must be >= the largest graph \(max\(ns\) = 4\); got 3"):
        gamgm(A, n_univ=3)
    with pytest.raises(ValueError, match="universe must be square: n_univ = 4; got 6"):
        gamgm(A, n_univ=6)
    with pytest.raises(ValueError, match="must be >= the largest graph"):
        synchronize(np.zeros((3, 3, 4, 4)), 2)
    with pytest.raises(ValueError, match=r"init.*shape \(m, max\(ns\), n_univ\)"):
        gamgm(A, init=np.ones((3, 4, 5)))


def test_bad_types_and_options():
    A = np.ones((3, 4, 4))
    with pytest.raises(
        TypeError, match=r"gamgm got unknown option\(s\) 'tau_0' \(did you mean 'tau0'"
    ):
        gamgm(A, **{"tau_0": 0.1})
    with pytest.raises(ValueError, match="'init' parameter of gamgm must be one of"):
        gamgm(A, init="spectral")
    with pytest.raises(ValueError, match="'tau_min' parameter of gamgm must be <= tau0"):
        gamgm(A, tau0=0.01, tau_min=0.1)
    with pytest.raises(TypeError, match="'max_inner' parameter of gamgm must be an int"):
        gamgm(A, max_inner=2.0)
    with pytest.raises(ValueError, match="at least 2 graphs"):
        gamgm(np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        gamgm(np.full((3, 2, 2), np.nan))
    with pytest.raises(ValueError, match="0/1 matchings"):
        consistency(np.full((3, 3, 2, 2), 0.5))
    with pytest.raises(TypeError, match="must be a MultiMatchResult, an array"):
        consistency([[1, 0], [0, 1]])
    with pytest.raises(TypeError, match="must be a batched Problem, a mapping"):
        gamgm_affinity("K")
    assert {"tau0", "tau_min", "decay", "init", "rng"} <= set(OPTIONS)


def test_result_indexing_errors():
    _, T = noisy_graph_set(3, 4, seed=14)
    res = synchronize(T)
    with pytest.raises(IndexError, match="out of range for 3 graphs"):
        res[0, 3]
    with pytest.raises(TypeError, match="Graph indices must be ints"):
        res["a"]


def test_bench_mgm_smoke(tmp_path):
    pytest.importorskip("pygmtools")
    from qapfuse.bench import mgm

    A, T = mgm.graph_set(4, 5, noise=0.1, outliers=1, rng=0)
    assert A.shape == (4, 6, 6) and T.shape == (4, 4, 6, 6)
    assert T[0, 1].sum() == 5  # the outlier has no partner
    argv = ["--quick", "--out", str(tmp_path), "--cases", "exact", "outliers", "--methods"]
    code = mgm.run([*argv, "qapfuse gamgm", "qapfuse sync", "--name", "smoke"])
    assert code == 0
    text = (tmp_path / "smoke.md").read_text()
    assert "## outliers" in text and "qapfuse gamgm acc / cons / s" in text
    assert (tmp_path / "smoke.csv").read_text().count("\n") == 1 + 2 * 2


def _sinkhorn_case(seed=21):
    """Scores (4, 6, 8): one instance with padding rows and one non-square (columns <= 1)."""
    rng = np.random.default_rng(seed)
    S = rng.random((4, 6, 8))
    mask = np.ones(S.shape, dtype=bool)
    mask[1, 4:, :] = False  # graph 1 has 4 nodes
    square = np.array([False, False, False, False])
    return S, mask, square


def test_warm_sinkhorn_agrees_with_the_log_domain_kernel(monkeypatch):
    from qapfuse.solvers import _sinkhorn
    from qapfuse.solvers._sinkhorn import Sinkhorn

    monkeypatch.setattr(_sinkhorn, "SCALING_SPREAD", -1.0)  # cold calls: the log domain
    S, mask, square = _sinkhorn_case()
    for tau in (0.5, 0.05):
        warm = Sinkhorn(mask, square=square, warm=True, max_iter=5000, tol=1e-12)
        P = warm(S, tau)
        it, err = warm.n_iter, warm.err
        cold = Sinkhorn(mask, square=square, max_iter=5000, tol=1e-12)
        P_log = cold(S, tau)
        assert err <= 1e-12 and it < 5000
        np.testing.assert_allclose(P, P_log, atol=1e-9)
        rows = P.sum(axis=2)
        np.testing.assert_allclose(rows[mask.any(axis=2)], 1.0, atol=1e-9)
        assert np.all(P.sum(axis=1) <= 1.0 + 1e-9)
        assert np.all(P[~mask] == 0.0)


def test_warm_sinkhorn_reuses_its_potentials_and_survives_a_large_spread():
    from qapfuse.solvers._sinkhorn import Sinkhorn

    S = np.random.default_rng(22).random((4, 6, 6))
    mask, square = np.ones(S.shape, dtype=bool), np.ones(4, dtype=bool)
    warm = Sinkhorn(mask, square=square, warm=True, max_iter=1000, tol=1e-10, check_every=1)
    warm(S, 0.1)
    it_cold = warm.n_iter
    P = warm(S, 0.1)
    it_warm, err = warm.n_iter, warm.err
    assert it_warm < it_cold and err <= 1e-10
    # tau = 1e-4: the scores span ~1e4, far beyond exp's range; the result is still finite,
    # (nearly) doubly stochastic and concentrated on the best assignment
    warm.max_iter, warm.tol, warm.check_every = 5000, 1e-8, 10
    P = warm(S, 1e-4)
    err = warm.err
    assert np.all(np.isfinite(P)) and err <= 1e-3
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)
    from scipy.optimize import linear_sum_assignment

    for k in range(S.shape[0]):
        r, c = linear_sum_assignment(S[k], maximize=True)
        assert P[k, r, c].min() > 0.5
