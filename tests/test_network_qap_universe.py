"""The network QAP of N models against its definition, the pairwise sum, computed densely here.

The operator sums the inner-product terms in the universe (``sum_{p<q} w_p w_q <A_p, A_q>`` with
``A_k = U_k^{oT} Phi_k U_k^in``, linear in N) and the other kernels pair by pair. Here the
objective is the sum over model pairs of every edge pair's kernel value times
``X_pq^o[i, a] X_pq^in[j, b]`` (``X_pq = U_p U_q^T``) plus the node terms, and its gradient
comes from autograd, independently of the operator.
"""

import numpy as np
import pytest
import torch
from helpers import block_walk
from torch import nn

from qapfuse.fusion import to_graph, trace
from qapfuse.fusion._network_qap import NetworkQAP, net_data
from qapfuse.fusion.models import MLP, SmallCNN


@pytest.fixture(autouse=True)
def _one_torch_thread():  # tiny matrices: threads only oversubscribe the busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ResidualBN(nn.Module):
    """``fc1`` reads and writes the residual group (an edge set with out == in), BatchNorm on it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(4, 5)
        self.fc1 = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)

        with torch.no_grad():  # statistics and affine parameters that matter
            self.bn.running_mean.normal_(0.0, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.normal_(1.0, 0.2)
            self.bn.bias.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc0(x)
        h = h + self.fc1(torch.relu(h))
        return self.out(torch.relu(self.bn(h)))


NETS = {
    "mlp": (lambda: MLP(12, (5, 3), 2), (1, 12)),
    "cnn": (lambda: SmallCNN(channels=(3, 4), input_size=4), (1, 1, 4, 4)),
    "residual_bn": (ResidualBN, (2, 4)),
}


def _data(net, N, seed):
    make, shape = NETS[net] if isinstance(net, str) else net
    torch.manual_seed(seed)
    models = [make().eval() for _ in range(N)]
    spec = trace(models[0], torch.zeros(shape))
    return net_data([to_graph(m.state_dict(), spec) for m in models])


def _deep_mlp(*hidden):
    """An MLP whose first and last hidden groups share no edge set (``_data``'s ``net``)."""
    return (lambda: MLP(6, hidden, 2), (1, 6))


def _kernel(op, key, Wp, Wq):
    """Every edge pair's kernel value, ``(n_o, n_in, n_o, n_in)``."""
    if op.kernel == "inner":
        return torch.einsum("ijf,abf->ijab", Wp, Wq)
    d2 = ((Wp[:, :, None, None, :] - Wq[None, None, :, :, :]) ** 2).sum(-1)
    return torch.exp(-d2 / op.info["sigma"][key])


def _node_affinity(op, g, Fp, Fq):
    if op.kernel == "inner":
        return Fp @ Fq.T
    return torch.exp(-(torch.cdist(Fp, Fq) ** 2) / op.info["sigma"][g])


def _pairwise(op, X, weights):
    """(score, gradient per block) of the pairwise definition, by autograd."""
    data = op.data
    U = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in X]

    def match(p, q, g):  # X_pq^g
        def u(k):
            b = op.index.get((k, g))
            return torch.eye(data.groups[g], dtype=torch.float64) if b is None else U[b]

        return u(p) @ u(q).T

    total = torch.zeros((), dtype=torch.float64)
    for p in range(op.N):
        for q in range(p + 1, op.N):
            pair = torch.zeros((), dtype=torch.float64)
            for o, i, key, F in data.edges:
                kap = _kernel(op, key, F[p], F[q])
                pair = pair + torch.einsum("ijab,ia,jb->", kap, match(p, q, o), match(p, q, i))
            for g, F in data.nodes.items():
                pair = pair + (_node_affinity(op, g, F[p], F[q]) * match(p, q, g)).sum()
            total = total + weights[p] * weights[q] * pair
    total.backward()
    return float(total.detach()), [u.grad.numpy() for u in U]


def _sinkhorn(M, iters=200):
    for _ in range(iters):
        M = M / M.sum(1, keepdims=True)
        M = M / M.sum(0, keepdims=True)
    return M


def _points(op, rng):
    """Hard, soft (doubly stochastic), and mixed blocks."""
    hard = [np.eye(n)[rng.permutation(n)] for n, _ in op.sizes]
    soft = [_sinkhorn(rng.random((n, n)) + 0.1) for n, _ in op.sizes]
    mixed = [h if b % 2 else s for b, (h, s) in enumerate(zip(hard, soft))]
    return {"hard": hard, "soft": soft, "mixed": mixed}


def _check(op, X, weights, rtol):
    want_score, want_grad = _pairwise(op, X, weights)
    assert op.score(X) == pytest.approx(want_score, rel=rtol)
    got = op.gradient(X)
    scale = max(np.abs(g).max() for g in want_grad)
    for b, (g, w) in enumerate(zip(got, want_grad)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=f"block {b}")
        # one block at a time (a coordinate sweep) gives the same as all together
        np.testing.assert_allclose(op.gradient(X, [b])[b], g, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("N", [2, 3, 5])
def test_inner_product_score_and_gradient_equal_the_pairwise_sum(net, N):
    data = _data(net, N, seed=N)
    rng = np.random.default_rng(N)
    weights = rng.uniform(0.3, 2.0, N)
    op = NetworkQAP(data, "inner", pair_weights=weights)
    if net == "mlp":  # its first layer (12 fixed inputs) goes by Gram matrices below N = 5
        assert bool(op._pair_aff) == (N < 5)
    for X in _points(op, rng).values():
        _check(op, X, weights, rtol=1e-9)


@pytest.mark.parametrize("net", sorted(NETS))
def test_gaussian_mixed_factorised_and_pairwise_terms_equal_the_pairwise_sum(net):
    # scalar edges go through the Taylor features (factorised), conv edges and node
    # features pair by pair; the expansion's error is below 1e-13 per kernel value
    N = 3
    data = _data(net, N, seed=7)
    rng = np.random.default_rng(7)
    weights = rng.uniform(0.3, 2.0, N)
    op = NetworkQAP(data, "gaussian", pair_weights=weights, expansion_tol=1e-13)
    assert op.info["bound"] <= 1e-13
    for X in _points(op, rng).values():
        _check(op, X, weights, rtol=1e-9)


def test_kept_universe_maps_follow_every_block_change():
    # A_k is kept per term and model while its matchings are unchanged; after any sequence of
    # block changes (hard, soft, reverted) the operator must give what a fresh one gives
    data = _data("residual_bn", 4, seed=1)
    cached = NetworkQAP(data, "inner")
    rng = np.random.default_rng(0)
    for X, b in block_walk(cached.sizes, rng, soft=_sinkhorn):
        fresh = NetworkQAP(data, "inner")
        assert cached.score(X) == pytest.approx(fresh.score(X), rel=1e-13)
        for c in (b, int(rng.integers(len(X)))):
            np.testing.assert_allclose(
                cached.gradient(X, [c])[c], fresh.gradient(X, [c])[c], rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("kernel", ["inner", "gaussian", "node"])
@pytest.mark.parametrize("net", ["deep_mlp", "residual_bn"])
def test_a_block_gradient_reads_only_its_coupled_blocks(net, kernel):
    # changing every block outside coupled(b) leaves block b's gradient as it was
    data = _data(_deep_mlp(5, 4, 3, 4) if net == "deep_mlp" else net, 3, seed=3)
    op = NetworkQAP(data, kernel)
    rng = np.random.default_rng(0)
    X = _points(op, rng)["soft"]
    far_apart = 0
    for b in range(len(X)):
        moved = [c for c in range(len(X)) if c != b and c not in op.coupled(b)]
        far_apart += len(moved)
        Y = [_sinkhorn(rng.random(x.shape)) if c in moved else x for c, x in enumerate(X)]
        np.testing.assert_allclose(op.gradient(Y, [b])[b], op.gradient(X, [b])[b], rtol=1e-12)
    if net == "deep_mlp":
        assert far_apart > 0  # the check has blocks to move


def test_coordinate_ascent_skips_only_blocks_whose_gradient_cannot_have_changed():
    from qapfuse.solvers._blocks import coordinate_ascent

    class Counting(NetworkQAP):
        calls = 0

        def gradient(self, X, blocks=None):
            Counting.calls += 1
            return super().gradient(X, blocks)

    class AllCoupled(Counting):
        def coupled(self, b):
            return None

    data = _data(_deep_mlp(8, 7, 6, 5), 4, seed=4)
    runs = {}
    for cls in (Counting, AllCoupled):
        Counting.calls = 0
        op = cls(data, "inner")
        X0 = [np.eye(n) for n, _ in op.sizes]
        X, s, sweeps, converged = coordinate_ascent(op, X0, rng=np.random.default_rng(1))
        runs[cls] = (X, s, sweeps, converged, Counting.calls)
    (X, s, sw, conv, calls), (X_all, s_all, sw_all, conv_all, calls_all) = runs.values()
    assert (s, sw, conv) == (s_all, sw_all, conv_all) and conv and sw > 1
    assert all(np.array_equal(a, b) for a, b in zip(X, X_all))
    assert calls < calls_all
