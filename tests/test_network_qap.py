"""The network QAP's matrix-free operator against one dense Lawler K, and the block solvers.

For a tiny MLP (3-4-3-2) the alignment of two models is a QAP over the block-diagonal
matching ``Z = blockdiag(X^a, X^b)`` (7 x 7). Its dense ``K`` is built here from the kernel's
definition (edge pairs, node terms on the diagonal, off-block pairs forbidden by a large
negative diagonal), independently of the operator.
"""

import itertools

import numpy as np
import pytest
import torch
from helpers import block_walk

from qapfuse import Problem
from qapfuse.fusion import to_graph, trace
from qapfuse.fusion._network_qap import NetworkQAP, net_data
from qapfuse.fusion.models import MLP
from qapfuse.solvers import tabu
from qapfuse.solvers._blocks import coordinate_lap, frank_wolfe, solve_blocks

FORBID = -1e3


@pytest.fixture(autouse=True)
def _one_torch_thread():  # tiny matrices: threads only oversubscribe the busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(kernel):
    torch.manual_seed(0)
    a, b = MLP(3, (4, 3), 2), MLP(3, (4, 3), 2)
    spec = trace(a, torch.zeros(1, 3))
    graphs = [to_graph(m.state_dict(), spec) for m in (a, b)]
    return NetworkQAP(net_data(graphs), kernel), graphs


def _dense(op, graphs):
    """(K_quad, lin): ``score(Z) = vec(Z)^T K_quad vec(Z) + <lin, vec(Z)>`` on hard Z."""
    groups = ["layers.0", "layers.2"]
    off = {"layers.0": 0, "layers.2": 4}
    n = 7

    def idx(g, i, a):  # column-major pair index of (i, a) in group g's block
        return (off[g] + i) + (off[g] + a) * n

    Kq = np.zeros((n * n, n * n))
    lin = np.full(n * n, FORBID)
    for g in groups:
        for i in range(op.data.groups[g]):
            for a in range(op.data.groups[g]):
                lin[idx(g, i, a)] = 0.0
    for e0, e1 in zip(graphs[0].edges, graphs[1].edges):
        W0, W1 = e0.features.double().numpy(), e1.features.double().numpy()
        if op.kernel == "inner":
            kap = np.einsum("ijf,abf->ijab", W0, W1)
        else:
            s = op.info["sigma"][e0.key]
            d2 = ((W0[:, :, None, None, :] - W1[None, None, :, :, :]) ** 2).sum(-1)
            kap = np.exp(-d2 / s)
        o, i_ = e0.out_group, e0.in_group
        for i, j, a, b in itertools.product(*map(range, kap.shape)):
            if o in off and i_ in off:
                Kq[idx(o, i, a), idx(i_, j, b)] += kap[i, j, a, b] / 2
                Kq[idx(i_, j, b), idx(o, i, a)] += kap[i, j, a, b] / 2
            elif o in off and j == b:  # fixed input: only j == b is matched
                lin[idx(o, i, a)] += kap[i, j, a, b]
            elif i_ in off and i == a:  # fixed output
                lin[idx(i_, j, b)] += kap[i, j, a, b]
    for g in groups:
        F0 = torch.cat([nd.features for nd in graphs[0].node_features(g)], 1).double().numpy()
        F1 = torch.cat([nd.features for nd in graphs[1].node_features(g)], 1).double().numpy()
        if op.kernel == "inner":
            L = F0 @ F1.T
        else:
            L = np.exp(-((F0[:, None] - F1[None]) ** 2).sum(-1) / op.info["sigma"][g])
        for i, a in itertools.product(range(L.shape[0]), repeat=2):
            lin[idx(g, i, a)] += L[i, a]
    return Kq, lin, off


def _Z(op, blocks, off):
    Z = np.zeros((7, 7))
    for (_, g), U in zip(op.blocks, blocks):
        k = off[g]
        Z[k : k + U.shape[0], k : k + U.shape[0]] = U.T  # X_01 = U_1^T
    return Z


@pytest.mark.parametrize("kernel", ["inner", "gaussian"])
def test_matrix_free_objective_and_gradient_equal_the_dense_lawler_form(kernel):
    op, graphs = _pair(kernel)
    Kq, lin, off = _dense(op, graphs)
    tol = 1e-10 if kernel == "inner" else 1e-5
    rng = np.random.default_rng(1)
    for _ in range(3):  # hard points
        blocks = [np.eye(n)[rng.permutation(n)] for n, _ in op.sizes]
        z = _Z(op, blocks, off).ravel(order="F")
        np.testing.assert_allclose(op.score(blocks), z @ Kq @ z + lin @ z, rtol=tol, atol=tol)
    soft = [rng.random((n, n)) for n, _ in op.sizes]
    z = _Z(op, soft, off).ravel(order="F")
    G = ((Kq + Kq.T) @ z + lin).reshape(7, 7, order="F")
    for (_, g), Gb in zip(op.blocks, op.gradient(soft)):
        k, n = off[g], Gb.shape[0]
        np.testing.assert_allclose(Gb, G[k : k + n, k : k + n].T, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["inner", "gaussian"])
def test_block_solvers_and_a_generic_solver_on_dense_k_reach_the_brute_force_optimum(kernel):
    op, graphs = _pair(kernel)
    Kq, lin, _ = _dense(op, graphs)
    best = max(
        op.score([np.eye(4)[list(p)], np.eye(3)[list(q)]])
        for p in itertools.permutations(range(4))
        for q in itertools.permutations(range(3))
    )
    res = solve_blocks(op, rng=0)
    assert res.score == pytest.approx(best, rel=1e-9)
    assert op.score(res.X) == pytest.approx(res.score)
    # generic QAP solver on the 49 x 49 dense K (linear terms on its diagonal)
    prob = Problem.from_dense(Kq + np.diag(lin))
    gen = tabu(prob, rng=0)
    assert gen.score == pytest.approx(best, rel=1e-6)
    # first-order baselines: feasible, never above the optimum
    for r in (coordinate_lap(op, rng=0, restarts=3), frank_wolfe(op)):
        assert r.score <= best + 1e-9
        assert all(np.array_equal(x.sum(0), np.ones(len(x))) for x in r.X)


def _three_resnets():
    from qapfuse.fusion.models import resnet20

    torch.manual_seed(3)
    nets = [resnet20(width=4) for _ in range(3)]
    spec = trace(nets[0], torch.zeros(1, 3, 8, 8))
    return net_data([to_graph(m.state_dict(), spec) for m in nets])


def test_node_kernel_rescoring_after_block_changes_equals_a_full_rescoring():
    # the node kernel keeps each group's similarities while its neighbours' blocks are
    # unchanged; after any sequence of block changes (hard, soft, reverted) the cached
    # operator must give exactly what an operator without history gives
    data = _three_resnets()
    cached = NetworkQAP(data, "node")
    for X, b in block_walk(cached.sizes, np.random.default_rng(0), soft=lambda m: m):
        fresh = NetworkQAP(data, "node")
        assert cached.score(X) == fresh.score(X)
        np.testing.assert_array_equal(cached.gradient(X, [b])[b], fresh.gradient(X, [b])[b])
