r"""The network QAP of N models as a block operator for :mod:`qapfuse.solvers._blocks`.

Model ``k`` gets, for every free group ``g``, a universe matching ``U_k^g`` of shape
``(n_g, n_g)`` (``U_k^g[c, u] = 1``: channel ``c`` of model ``k`` sits at common position
``u``). Model 0 is the anchor (``U_0 = I``: the common order is model 0's), fixed groups keep
the identity, and the blocks are ``U_k^g`` for ``k = 1..N-1``. The pairwise matchings
``X_pq^g = U_p^g U_q^{gT}`` are cycle-consistent by construction. The objective is

.. math::

    F(U) = \sum_{p<q} w_p w_q \Big[ \sum_e \sum_{ij,ab} k(W^p_{e,ij}, W^q_{e,ab})
           X^{o(e)}_{pq}[i,a] X^{in(e)}_{pq}[j,b] + \sum_g \langle L^g_{pq}, X^g_{pq} \rangle \Big]

over the edge sets ``e`` (weights from group ``in(e)`` to ``o(e)``) and node features (biases,
normalisation parameters, running statistics) with node affinities ``L``. Edge sets between two
fixed groups are constants and left out. With two models and the inner-product kernel this is
Git Re-Basin's weight-matching objective. The gradient of a block touches only the edge sets
of its group and the neighbouring groups' current matchings ("slice and scan"); nothing of
size ``(n_o n_in)^2`` is ever formed.

``kernel="node"`` is the neuron-similarity fixed point of GAMF's released solver: for each
group and pair, ``S[i, a] = exp(-d/2) / mean`` with ``d`` the squared distance between neuron
``i`` of ``p`` and neuron ``a`` of ``q`` (incoming weights with ``q``'s inputs mapped by the
current matching, outgoing weights likewise, node features), and ``F = sum <X^g_pq, S^g_pq>``;
its "gradient" holds ``S`` fixed. That objective is not affine in a block, so a coordinate
sweep scores every trial; :class:`~qapfuse.fusion._node_kernel.NodeSimilarity` keeps each
edge set's part of ``S`` under the version of the one matching it reads, and a trial
recomputes only the parts next to the changed block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..solvers._blocks import BlockQAP
from ._kernels import (
    DEFAULT_EXPANSION_BYTES,
    ExactGaussianPair,
    FeaturePair,
    gaussian_features,
    median_sigma,
)
from ._node_kernel import BlockVersions, NodeSimilarity
from .graph import NetworkGraph

__all__ = ["NetData", "NetworkQAP", "net_data"]


@dataclass
class NetData:
    """What the operator reads of N networks of one architecture.

    Attributes
    ----------
    groups : dict of str to int
        Every group and its size.
    fixed : frozenset of str
    edges : list of (out_group, in_group, key, list of Tensor (n_o, n_in, f))
        One entry per edge set, one feature tensor per model.
    nodes : dict of str to list of Tensor (n_g, f_total)
        Per free group, every model's node features side by side.
    """

    groups: dict[str, int]
    fixed: frozenset[str]
    edges: list[tuple[str, str, str, list[torch.Tensor]]]
    nodes: dict[str, list[torch.Tensor]]

    @property
    def free_groups(self) -> list[str]:
        return [g for g in self.groups if g not in self.fixed]

    @property
    def n_models(self) -> int:
        return len(self.edges[0][3]) if self.edges else len(next(iter(self.nodes.values())))

    def select(self, models: Sequence[int]) -> NetData:
        """The same architecture with only the listed models (in that order)."""
        return NetData(
            self.groups,
            self.fixed,
            [(o, i, k, [F[m] for m in models]) for o, i, k, F in self.edges],
            {g: [F[m] for m in models] for g, F in self.nodes.items()},
        )

    def permuted(self, model: int, perms: dict[str, np.ndarray]) -> NetData:
        """Model `model`'s features reordered by `perms` (new channel ``u`` is old ``perm[u]``)."""

        def idx(g: str) -> torch.Tensor | None:
            return None if g not in perms else torch.as_tensor(perms[g], dtype=torch.long)

        edges = []
        for o, i, k, F in self.edges:
            f = F[model]
            if idx(o) is not None:
                f = f[idx(o)]
            if idx(i) is not None:
                f = f[:, idx(i)]
            edges.append((o, i, k, [*F[:model], f, *F[model + 1 :]]))
        nodes = {}
        for g, F in self.nodes.items():
            f = F[model] if idx(g) is None else F[model][idx(g)]
            nodes[g] = [*F[:model], f, *F[model + 1 :]]
        return NetData(self.groups, self.fixed, edges, nodes)

    def mean(self, models: Sequence[int], weights: Sequence[float]) -> NetData:
        """One model: the weighted mean of the listed models' features (already aligned)."""
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()

        def avg(F: list[torch.Tensor]) -> list[torch.Tensor]:
            return [sum(float(c) * F[m] for c, m in zip(w, models))]

        return NetData(
            self.groups,
            self.fixed,
            [(o, i, k, avg(F)) for o, i, k, F in self.edges],
            {g: avg(F) for g, F in self.nodes.items()},
        )


def net_data(graphs: Sequence[NetworkGraph], dtype: torch.dtype = torch.float64) -> NetData:
    """Gather N models' :class:`NetworkGraph` s (one spec) into a :class:`NetData` of `dtype`."""
    g0 = graphs[0]
    edges = []
    for k, e in enumerate(g0.edges):
        if e.out_group in g0.fixed and e.in_group in g0.fixed:
            continue  # a constant of the objective
        edges.append(
            (e.out_group, e.in_group, e.key, [g.edges[k].features.to(dtype) for g in graphs])
        )
    nodes: dict[str, list[torch.Tensor]] = {}
    for g in g0.free_groups:
        idx = [k for k, n in enumerate(g0.nodes) if n.group == g]
        if idx:
            nodes[g] = [
                torch.cat([gr.nodes[k].features.to(dtype) for k in idx], 1) for gr in graphs
            ]
    return NetData(dict(g0.groups), frozenset(g0.fixed), edges, nodes)


class NetworkQAP(BlockQAP):
    """The network QAP of :class:`NetData` under one kernel (see the module notes).

    Parameters
    ----------
    data : NetData
        N >= 2 models.
    kernel : {"inner", "gaussian", "node"}
    pair_weights : array of shape (N,), optional
        Model weights ``w`` (pair ``(p, q)`` counts ``w_p w_q``); default all 1.
    sigma : float, optional
        Gaussian width for every layer; default: the median heuristic per edge set (and per
        group for node features).
    expansion_tol : float
        Error bound of every scalar Gaussian kernel value (Taylor expansion).
    max_terms : int, optional
        Most expansion terms per scalar layer; default: as many as `expansion_tol` needs,
        within `max_expansion_bytes`.
    max_expansion_bytes : float
        Largest size of one scalar layer's expansion features (all models), in bytes.
    max_kernel_evals : float
        Largest ``(n_o n_in)^2`` for the exact Gaussian on vector (conv) edges.

    Attributes
    ----------
    blocks : list of (int, str)
        ``(model, group)`` of every block, models ``1..N-1`` times free groups.
    sizes : list of (int, int)
    info : dict
        ``sigma`` per edge set, ``terms`` and ``bound`` of the Gaussian expansions.
    """

    def __init__(
        self,
        data: NetData,
        kernel: str = "inner",
        *,
        pair_weights: Sequence[float] | None = None,
        sigma: float | None = None,
        expansion_tol: float = 1e-6,
        max_terms: int | None = None,
        max_expansion_bytes: float = DEFAULT_EXPANSION_BYTES,
        max_kernel_evals: float = 5e8,
    ):
        self.data, self.kernel = data, kernel
        self.dtype = data.edges[0][3][0].dtype if data.edges else torch.float64
        N = data.n_models
        self.N = N
        w = np.ones(N) if pair_weights is None else np.asarray(pair_weights, dtype=np.float64)
        self.pairs = [(p, q, float(w[p] * w[q])) for p in range(N) for q in range(p + 1, N)]
        free = data.free_groups
        self.blocks = [(k, g) for k in range(1, N) for g in free]
        self.index = {b: n for n, b in enumerate(self.blocks)}
        self.sizes = [(data.groups[g], data.groups[g]) for _, g in self.blocks]
        self.info: dict[str, Any] = {"sigma": {}, "terms": {}, "bound": 0.0}
        self._edge_pairs: list[dict[tuple[int, int], Any]] = []
        self._node_aff: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self._cache: dict[tuple[int, str, int, int], torch.Tensor] = {}
        self._self_loops = {o for o, i, _, _ in data.edges if o == i}
        self._memo: dict[tuple, torch.Tensor] = {}
        if kernel == "node":
            self._node = NodeSimilarity(data.edges, data.nodes)
            self._versions = BlockVersions(len(self.blocks))
            return
        for o, i, key, F in data.edges:
            self._edge_pairs.append(
                self._pair_kernels(
                    key, F, sigma, expansion_tol, max_terms, max_expansion_bytes, max_kernel_evals
                )
            )
        for g, F in data.nodes.items():
            if kernel == "inner":
                self._node_aff[g] = {(p, q): F[p] @ F[q].T for p, q, _ in self.pairs}
            else:
                s = median_sigma(F) if sigma is None else sigma
                self.info["sigma"][g] = s
                self._node_aff[g] = {
                    (p, q): torch.exp(-(torch.cdist(F[p], F[q]) ** 2) / s) for p, q, _ in self.pairs
                }

    def _pair_kernels(self, key, F, sigma, tol, max_terms, max_bytes, max_evals):
        if self.kernel == "inner":
            return {(p, q): FeaturePair(F[p], F[q]) for p, q, _ in self.pairs}
        s = median_sigma([f.reshape(-1, f.shape[2]) for f in F]) if sigma is None else sigma
        self.info["sigma"][key] = s
        n_o, n_in, f = F[0].shape
        if f == 1:
            Phi, T, bound = gaussian_features(
                F, s, tol, max_terms, max_bytes=max_bytes, dtype=self.dtype, name=repr(key)
            )
            self.info["terms"][key] = T + 1
            self.info["bound"] = max(self.info["bound"], bound)
            return {(p, q): FeaturePair(Phi[p], Phi[q]) for p, q, _ in self.pairs}
        evals = float(n_o * n_in) ** 2
        if evals > max_evals:
            raise ValueError(
                f"kernel='gaussian' on {key!r} (edges with {f} features, shape "
                f"{tuple(F[0].shape)}) is summed exactly and needs {evals:.3g} kernel values "
                f"per product, more than max_kernel_evals={max_evals:g} (vector edges have "
                "no factorisation with a stated error bound that is cheaper than the exact "
                "sum: docs/fusion.md, Scale). To fix: use kernel='inner' or 'node' for this "
                "network, or raise max_kernel_evals (time grows in proportion: about 1e7 "
                "kernel values per second per product on a 2-core CPU)."
            )
        self.info["terms"][key] = "exact"
        return {(p, q): ExactGaussianPair(F[p], F[q], s) for p, q, _ in self.pairs}

    def is_linear(self, b: int) -> bool:
        """True unless the block's group feeds itself (an edge set with ``out == in``) or the
        kernel is ``"node"`` (whose similarities depend on every neighbour)."""
        g = self.blocks[b][1]
        return self.kernel != "node" and g not in self._self_loops

    # -- blocks and matchings ---------------------------------------------------------------
    def _U(self, X: Sequence[np.ndarray], k: int, g: str) -> torch.Tensor | None:
        """``U_k^g`` as a tensor, or None for the identity (model 0, fixed groups)."""
        b = self.index.get((k, g))
        if b is None:
            return None
        return torch.from_numpy(np.asarray(X[b], dtype=np.float64)).to(self.dtype)

    def _X(self, X: Sequence[np.ndarray], p: int, q: int, g: str) -> torch.Tensor | None:
        """``X_pq^g = U_p U_q^T``, or None for the identity."""
        Up, Uq = self._U(X, p, g), self._U(X, q, g)
        if Up is None and Uq is None:
            return None
        if Up is None:
            return Uq.T
        if Uq is None:
            return Up
        return Up @ Uq.T

    def _apply(self, n: int, p: int, q: int, Y: torch.Tensor | None, transpose: bool):
        """``apply`` (or ``apply_t``) of edge set `n`, pair (p, q); identity inputs cached."""
        kern = self._edge_pairs[n][(p, q)]
        if Y is not None:
            # coordinate sweeps ask again for products whose input has not changed since
            memo = (
                n,
                transpose,
                p,
                q,
                hashlib.blake2b(Y.numpy().tobytes(), digest_size=16).digest(),
            )
            if memo in self._memo:
                return self._memo[memo]
            R = kern.apply_t(Y) if transpose else kern.apply(Y)
            self._memo[memo] = R
            if len(self._memo) > 4 * max(1, len(self.data.edges)):
                self._memo.pop(next(iter(self._memo)))
            return R
        key = (n, "t" if transpose else "o", p, q)
        if key not in self._cache:
            o, i = self.data.edges[n][:2]
            size = self.data.groups[o if transpose else i]
            eye = torch.eye(size, dtype=self.dtype)
            self._cache[key] = kern.apply_t(eye) if transpose else kern.apply(eye)
        return self._cache[key]

    # -- the operator -------------------------------------------------------------------------
    def score(self, X: Sequence[np.ndarray]) -> float:
        total = 0.0
        versions = self._versions(X) if self.kernel == "node" else None
        for p, q, w in self.pairs:
            if self.kernel == "node":
                for g in self.data.free_groups:
                    Xg = self._X(X, p, q, g)
                    S = self._similarity(X, p, q, g, versions)
                    total += w * float((S * Xg).sum() if Xg is not None else S.trace())
                continue
            for n, (o, i, _, _) in enumerate(self.data.edges):
                R = self._apply(n, p, q, self._X(X, p, q, i), False)
                Xo = self._X(X, p, q, o)
                total += w * float((R * Xo).sum() if Xo is not None else R.trace())
            for g, aff in self._node_aff.items():
                Xg = self._X(X, p, q, g)
                L = aff[(p, q)]
                total += w * float((L * Xg).sum() if Xg is not None else L.trace())
        return total

    def gradient(
        self, X: Sequence[np.ndarray], blocks: Sequence[int] | None = None
    ) -> list[np.ndarray | None]:
        want = set(range(len(self.blocks)) if blocks is None else blocks)
        # block b's gradient is sum over pairs (b's model, other) of (sum of that pair's
        # products for b's group) @ U_other: the products are summed first, so each pair
        # costs one multiplication by U_other per block, not one per edge set
        acc: dict[tuple[int, int], torch.Tensor] = {}

        def add(k: int, g: str, R: torch.Tensor, other: int, w: float, t: bool) -> None:
            b = self.index.get((k, g))
            if b is None or b not in want:
                return
            R = w * (R.T if t else R)
            acc[b, other] = acc[b, other] + R if (b, other) in acc else R

        def wanted(k: int, g: str) -> bool:
            return self.index.get((k, g)) in want

        versions = self._versions(X) if self.kernel == "node" else None
        for p, q, w in self.pairs:
            if self.kernel == "node":
                for g in self.data.free_groups:
                    if wanted(p, g) or wanted(q, g):
                        S = self._similarity(X, p, q, g, versions)
                        add(p, g, S, q, w, False)
                        add(q, g, S, p, w, True)
                continue
            for n, (o, i, _, _) in enumerate(self.data.edges):
                if wanted(p, o) or wanted(q, o):
                    R = self._apply(n, p, q, self._X(X, p, q, i), False)
                    add(p, o, R, q, w, False)
                    add(q, o, R, p, w, True)
                if wanted(p, i) or wanted(q, i):
                    R = self._apply(n, p, q, self._X(X, p, q, o), True)
                    add(p, i, R, q, w, False)
                    add(q, i, R, p, w, True)
            for g, aff in self._node_aff.items():
                if wanted(p, g) or wanted(q, g):
                    add(p, g, aff[(p, q)], q, w, False)
                    add(q, g, aff[(p, q)], p, w, True)
        G: dict[int, torch.Tensor] = {}
        for (b, other), R in acc.items():
            Uo = self._U(X, other, self.blocks[b][1])
            contrib = R if Uo is None else R @ Uo
            G[b] = G[b] + contrib if b in G else contrib
        out: list[np.ndarray | None] = [None] * len(self.blocks)
        for b in want:
            out[b] = G[b].double().numpy() if b in G else np.zeros(self.sizes[b])
        return out

    def _similarity(
        self, X: Sequence[np.ndarray], p: int, q: int, g: str, versions: Sequence[int]
    ) -> torch.Tensor:
        """GAMF's neuron similarity of group `g` between models p and q at `X`; parts whose
        matchings are unchanged since an earlier call are reused (:class:`NodeSimilarity`)."""

        def version(h: str) -> tuple[int | None, int | None]:
            return tuple(
                None if (b := self.index.get((m, h))) is None else versions[b] for m in (p, q)
            )

        return self._node(p, q, g, lambda h: self._X(X, p, q, h), version)

    # -- conversions ----------------------------------------------------------------------------
    def blocks_from_perms(self, perms: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Hard blocks for permutations into the common order (``perm[u]`` = channel at ``u``)."""
        out = []
        for k, g in self.blocks:
            n = self.data.groups[g]
            U = np.zeros((n, n))
            U[np.asarray(perms[k][g]), np.arange(n)] = 1.0
            out.append(U)
        return out

    def perms_from_blocks(self, X: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Inverse of :meth:`blocks_from_perms`; model 0 gets the identity."""
        perms: list[dict[str, np.ndarray]] = [
            {g: np.arange(self.data.groups[g], dtype=np.int64) for g in self.data.free_groups}
            for _ in range(self.N)
        ]
        for (k, g), U in zip(self.blocks, X):
            perms[k][g] = np.argmax(np.asarray(U), axis=0).astype(np.int64)
        return perms
