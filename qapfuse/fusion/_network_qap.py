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

Where the kernel is an inner product of feature maps ``Phi`` (``kernel="inner"``: the weights;
``"gaussian"`` on scalar edges: the Taylor features; inner-product node affinities
``F_p F_q^T``), a pair's term is ``<A_p, A_q>`` with every model mapped into the universe,
``A_k = U_k^{oT} Phi_{k,t} U_k^in`` per feature ``t``, so

.. math::

    \sum_{p<q} w_p w_q \langle A_p, A_q \rangle, \qquad
    \frac{\partial}{\partial U_k} = w_k \frac{\partial \langle A_k, R_k \rangle}{\partial U_k},
    \quad R_k = \sum_{q \ne k} w_q A_q,

that is ``w_k sum_t Phi_t U^in R_t^T`` for the out side and ``w_k sum_t Phi_t^T U^o R_t`` for
the in side (a group that feeds itself gets both: the product rule). Score and gradient cost
``O(N)`` products instead of one per model pair, and each ``A_k`` is kept while its two
matchings are unchanged, so a coordinate sweep's one-block gradient maps one model. A term
with one side fixed (a first layer, node features) is summed instead through its constant
pair Gram matrices ``Phi_p Phi_q^T`` where those are cheaper (``N n_free < 2 n_fixed T``).
The exact Gaussian on vector (conv) edges and Gaussian node affinities are not inner products
of feature maps and are summed pair by pair.

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
    gaussian_features,
    median_sigma,
)
from ._node_kernel import BlockVersions, NodeSimilarity, _lookup, _permutation, _store
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
        self.w = [float(x) for x in w]
        self.pairs = [(p, q, self.w[p] * self.w[q]) for p in range(N) for q in range(p + 1, N)]
        free = data.free_groups
        self.blocks = [(k, g) for k in range(1, N) for g in free]
        self.index = {b: n for n, b in enumerate(self.blocks)}
        self.sizes = [(data.groups[g], data.groups[g]) for _, g in self.blocks]
        self.info: dict[str, Any] = {"sigma": {}, "terms": {}, "bound": 0.0}
        self._self_loops = {o for o, i, _, _ in data.edges if o == i}
        self._versions = BlockVersions(len(self.blocks))
        near: dict[str, set[str]] = {g: {g} for g in data.groups}
        for o, i, _, _ in data.edges:
            near[o].add(i)
            near[i].add(o)
        self._coupled = [
            [c for c, (_, h) in enumerate(self.blocks) if h in near[g] and c != n]
            for n, (_, g) in enumerate(self.blocks)
        ]
        # factorised terms (out group, in group or None, per-model features (n_o, T, n_in))
        self._terms: list[tuple[str, str | None, list[torch.Tensor]]] = []
        self._mapped_cache: dict[tuple[int, int], dict] = {}
        self._matchings: dict[int, dict] = {}  # block -> {version: _Matching}
        # pairwise terms: edge sets with the exact Gaussian; constant pair affinities per
        # group (Gaussian node affinities, the Gram matrices of cheap fixed-side terms)
        self._edge_pairs: dict[int, dict[tuple[int, int], ExactGaussianPair]] = {}
        self._pair_aff: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self._cache: dict[tuple[int, str, int, int], torch.Tensor] = {}
        self._memo: dict[tuple, torch.Tensor] = {}
        if kernel == "node":
            self._node = NodeSimilarity(data.edges, data.nodes)
            return
        for n, (o, i, key, F) in enumerate(data.edges):
            kern = self._edge_kernel(
                key, F, sigma, expansion_tol, max_terms, max_expansion_bytes, max_kernel_evals
            )
            if isinstance(kern, dict):
                self._edge_pairs[n] = kern
            else:
                self._add_inner_term(o, i, [f.permute(0, 2, 1).contiguous() for f in kern])
        for g, F in data.nodes.items():
            if kernel == "inner":
                self._add_inner_term(g, None, [f[:, :, None] for f in F])
            else:
                s = median_sigma(F) if sigma is None else sigma
                self.info["sigma"][g] = s
                for p, q, _ in self.pairs:
                    L = torch.exp(-(torch.cdist(F[p], F[q]) ** 2) / s)
                    self._add_pair_affinity(g, p, q, L)

    def _add_inner_term(self, o: str, i: str | None, feats: list[torch.Tensor]) -> None:
        """An inner-product term, features ``(n_o, T, n_in)`` per model (``i`` None: node
        features, ``n_in = 1``): factorised in the universe, or, when one side is fixed and
        the pairs' Gram matrices are cheaper, as constant pair affinities of the free group.

        Per soft gradient the universe costs ``2 (N-1) n_free^2 n_fixed T`` (map the free side,
        contract with the rest), the Gram matrices ``N (N-1) n_free^3`` (one product by the
        other model's matching per pair and direction).
        """
        fixed_o, fixed_i = o in self.data.fixed, i is None or i in self.data.fixed
        n_o, T, n_in = feats[0].shape
        if fixed_o != fixed_i:
            n_free, n_fixed = (n_in, n_o) if fixed_o else (n_o, n_in)
            if self.N * n_free < 2 * n_fixed * T:
                for p, q, _ in self.pairs:
                    if fixed_o:  # sum_{i,t} Phi_p[i, t, j] Phi_q[i, t, b]
                        L = feats[p].reshape(-1, n_in).T @ feats[q].reshape(-1, n_in)
                    else:  # sum_{j,t} Phi_p[i, t, j] Phi_q[a, t, j]
                        L = feats[p].reshape(n_o, -1) @ feats[q].reshape(n_o, -1).T
                    self._add_pair_affinity(i if fixed_o else o, p, q, L)
                return
        self._terms.append((o, i, feats))

    def _add_pair_affinity(self, g: str, p: int, q: int, L: torch.Tensor) -> None:
        """Add ``<L, X_pq^g>`` to the objective (pair weight applied later)."""
        aff = self._pair_aff.setdefault(g, {})
        aff[p, q] = aff[p, q] + L if (p, q) in aff else L

    def _edge_kernel(self, key, F, sigma, tol, max_terms, max_bytes, max_evals):
        """Every model's feature maps (an inner-product kernel), or the pairs' exact kernels."""
        if self.kernel == "inner":
            return F
        s = median_sigma([f.reshape(-1, f.shape[2]) for f in F]) if sigma is None else sigma
        self.info["sigma"][key] = s
        n_o, n_in, f = F[0].shape
        if f == 1:
            Phi, T, bound = gaussian_features(
                F, s, tol, max_terms, max_bytes=max_bytes, dtype=self.dtype, name=repr(key)
            )
            self.info["terms"][key] = T + 1
            self.info["bound"] = max(self.info["bound"], bound)
            return Phi
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

    def coupled(self, b: int) -> list[int]:
        """Every model's blocks of the block's group and of the groups it shares an edge set
        with: the only matchings its gradient reads (for every kernel)."""
        return self._coupled[b]

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

    # -- factorised terms: every model mapped into the universe ---------------------------------
    def _mapped(
        self, m: int, k: int, at: _Point, partial: tuple[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``A_k = U_k^{oT} Phi_k U_k^in`` of term `m` (layout ``(n_o, T, n_in)``), kept while
        both matchings are unchanged; `partial` is ``("in", Phi_k U_k^in)`` or
        ``("out", U_k^{oT} Phi_k)`` when the caller has it."""
        o, i, feats = self._terms[m]
        sig = (at.version(k, o), at.version(k, i))
        if sig == (None, None):
            return feats[k]
        A = _lookup(self._mapped_cache, (m, k), sig)
        if A is None:
            if partial is not None and partial[0] == "in":
                A = _map_out(partial[1], at.matching(k, o))
            elif partial is not None:
                A = _map_in(partial[1], at.matching(k, i))
            else:
                A = _map_out(_map_in(feats[k], at.matching(k, i)), at.matching(k, o))
            _store(self._mapped_cache, (m, k), sig, A)
        return A

    def _factorised_score(self, at: _Point) -> float:
        # sum_{p<q} w_p w_q <A_p, A_q> = sum_p w_p <A_p, sum_{q>p} w_q A_q>: no difference of
        # large norms, so no cancellation beyond the pairwise sum's own
        total = 0.0
        for m in range(len(self._terms)):
            later = None
            for k in reversed(range(self.N)):
                A = self._mapped(m, k, at)
                if later is not None:
                    total += self.w[k] * float(torch.dot(A.reshape(-1), later.reshape(-1)))
                    later.add_(A, alpha=self.w[k])
                else:
                    later = self.w[k] * A
        return total

    def _factorised_gradient(self, at: _Point, want: set[int], G: dict[int, torch.Tensor]):
        for m, (o, i, _) in enumerate(self._terms):
            out_side = [k for k in range(1, self.N) if self.index.get((k, o)) in want]
            in_side = [k for k in range(1, self.N) if self.index.get((k, i)) in want]
            if out_side or in_side:
                self._term_gradient(m, at, out_side, in_side, G)

    def _term_gradient(
        self,
        m: int,
        at: _Point,
        out_side: list[int],
        in_side: list[int],
        G: dict[int, torch.Tensor],
    ) -> None:
        """Add term `m`'s part of the gradient of blocks ``(k, o)``, k in `out_side`, and
        ``(k, in)``, k in `in_side`.

        ``d/dU_k`` of ``sum_{p<q} w_p w_q <A_p, A_q>`` is ``w_k d<A_k, R_k>/dU_k`` with
        ``R_k = sum_{q != k} w_q A_q`` (free of ``U_k``): ``sum_t Phi_t U^in R_t^T`` on the
        out side, ``sum_t Phi_t^T U^o R_t`` on the in side; a group that feeds itself gets
        both (the product rule).
        """
        o, i, feats = self._terms[m]
        P = {k: _map_in(feats[k], at.matching(k, i)) for k in out_side}  # Phi U^in
        Q = {k: _map_out(feats[k], at.matching(k, o)) for k in in_side}  # U^oT Phi

        def mapped(k: int) -> torch.Tensor:
            part = ("in", P[k]) if k in P else ("out", Q[k]) if k in Q else None
            return self._mapped(m, k, at, part)

        models = sorted({*out_side, *in_side})
        # one model (a coordinate sweep): its own A_k is not needed
        total = None if len(models) == 1 else _weighted_sum(self.w, map(mapped, range(self.N)))
        for k in models:
            if total is None:
                others = [q for q in range(self.N) if q != k]
                R = _weighted_sum([self.w[q] for q in others], map(mapped, others))
            else:
                R = total - self.w[k] * mapped(k)
            n_o, _, n_in = R.shape
            if k in P:
                G_out = P[k].reshape(n_o, -1) @ R.reshape(n_o, -1).T
                _accumulate(G, self.index[k, o], self.w[k] * G_out)
            if k in Q:
                G_in = Q[k].reshape(-1, n_in).T @ R.reshape(-1, n_in)
                _accumulate(G, self.index[k, i], self.w[k] * G_in)

    # -- pairwise terms -------------------------------------------------------------------------
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
            if len(self._memo) > 4 * max(1, len(self._edge_pairs)):
                self._memo.pop(next(iter(self._memo)))
            return R
        key = (n, "t" if transpose else "o", p, q)
        if key not in self._cache:
            o, i = self.data.edges[n][:2]
            size = self.data.groups[o if transpose else i]
            eye = torch.eye(size, dtype=self.dtype)
            self._cache[key] = kern.apply_t(eye) if transpose else kern.apply(eye)
        return self._cache[key]

    def _pairwise_score(self, X: Sequence[np.ndarray]) -> float:
        total = 0.0
        versions = self._versions(X) if self.kernel == "node" else None
        for p, q, w in self.pairs:
            if self.kernel == "node":
                for g in self.data.free_groups:
                    Xg = self._X(X, p, q, g)
                    S = self._similarity(X, p, q, g, versions)
                    total += w * float((S * Xg).sum() if Xg is not None else S.trace())
                continue
            for n in self._edge_pairs:
                o, i = self.data.edges[n][:2]
                R = self._apply(n, p, q, self._X(X, p, q, i), False)
                Xo = self._X(X, p, q, o)
                total += w * float((R * Xo).sum() if Xo is not None else R.trace())
            for g, aff in self._pair_aff.items():
                Xg = self._X(X, p, q, g)
                L = aff[(p, q)]
                total += w * float((L * Xg).sum() if Xg is not None else L.trace())
        return total

    def _pairwise_gradient(
        self, X: Sequence[np.ndarray], want: set[int], G: dict[int, torch.Tensor]
    ) -> None:
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
            for n in self._edge_pairs:
                o, i = self.data.edges[n][:2]
                if wanted(p, o) or wanted(q, o):
                    R = self._apply(n, p, q, self._X(X, p, q, i), False)
                    add(p, o, R, q, w, False)
                    add(q, o, R, p, w, True)
                if wanted(p, i) or wanted(q, i):
                    R = self._apply(n, p, q, self._X(X, p, q, o), True)
                    add(p, i, R, q, w, False)
                    add(q, i, R, p, w, True)
            for g, aff in self._pair_aff.items():
                if wanted(p, g) or wanted(q, g):
                    add(p, g, aff[(p, q)], q, w, False)
                    add(q, g, aff[(p, q)], p, w, True)
        for (b, other), R in acc.items():
            Uo = self._U(X, other, self.blocks[b][1])
            _accumulate(G, b, R if Uo is None else R @ Uo)

    # -- the operator -------------------------------------------------------------------------
    def score(self, X: Sequence[np.ndarray]) -> float:
        total = self._pairwise_score(X)
        if self._terms:
            total += self._factorised_score(_Point(self, X))
        return total

    def gradient(
        self, X: Sequence[np.ndarray], blocks: Sequence[int] | None = None
    ) -> list[np.ndarray | None]:
        want = set(range(len(self.blocks)) if blocks is None else blocks)
        G: dict[int, torch.Tensor] = {}
        self._pairwise_gradient(X, want, G)
        if self._terms:
            self._factorised_gradient(_Point(self, X), want, G)
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


class _Matching:
    """One block's matching ``U`` (a tensor) and, when it is a permutation, ``cols`` with
    ``U[cols[u], u] = 1``: mapping by it is a gather, not a product."""

    def __init__(self, U: torch.Tensor):
        self.U = U
        self.cols = None if _permutation(U) is None else U.argmax(0)


class _Point:
    """The blocks at one point of the operator's calls: their versions, and their matchings
    from the operator's store (made once per block version)."""

    def __init__(self, op: NetworkQAP, X: Sequence[np.ndarray]):
        self.op, self.X = op, X
        self.versions = op._versions(X)

    def _block(self, k: int, g: str | None) -> int | None:
        return None if g is None else self.op.index.get((k, g))

    def version(self, k: int, g: str | None) -> int | None:
        """A value that changes with ``U_k^g``; None for the identity."""
        b = self._block(k, g)
        return None if b is None else self.versions[b]

    def matching(self, k: int, g: str | None) -> _Matching | None:
        """``U_k^g``, or None for the identity (model 0, fixed groups, node features)."""
        b = self._block(k, g)
        if b is None:
            return None
        # kept across calls while the block is unchanged: a coordinate sweep asks for the
        # same neighbours' matchings again and again
        M = _lookup(self.op._matchings, b, self.versions[b])
        if M is None:
            M = _Matching(self.op._U(self.X, k, g))
            _store(self.op._matchings, b, self.versions[b], M)
        return M


def _map_in(F: torch.Tensor, M: _Matching | None) -> torch.Tensor:
    """``F[i, t, :] @ U``: the in side of features ``(n_o, T, n_in)`` mapped into the universe."""
    if M is None:
        return F
    if M.cols is not None:
        return F.index_select(2, M.cols)
    return (F.reshape(-1, F.shape[2]) @ M.U).reshape(F.shape)


def _map_out(F: torch.Tensor, M: _Matching | None) -> torch.Tensor:
    """``U^T @ F[:, t, j]``: the out side of features ``(n_o, T, n_in)`` mapped likewise."""
    if M is None:
        return F
    if M.cols is not None:
        return F.index_select(0, M.cols)
    return (M.U.T @ F.reshape(F.shape[0], -1)).reshape(F.shape)


def _weighted_sum(weights: Sequence[float], tensors) -> torch.Tensor:
    """``sum_k weights[k] tensors[k]`` in a new tensor (the inputs are left untouched)."""
    total = None
    for w, A in zip(weights, tensors):
        if total is None:
            total = w * A
        else:
            total.add_(A, alpha=w)
    return total


def _accumulate(G: dict[int, torch.Tensor], b: int, T: torch.Tensor) -> None:
    G[b] = G[b] + T if b in G else T
