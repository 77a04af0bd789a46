"""The multi-graph objective ``F(U)``: its gradient, score and graph-vs-others problems.

Each objective works on a batch ``U`` of shape ``(m, nrow, d)``: :class:`_KBObjective` in closed
form for Koopmans--Beckmann inputs, :class:`_PairObjective` through general pairwise affinity
operators (grouped in :class:`_Group` batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import backend
from ...backend import Array
from ...problem import Affinity, Problem


class _KBObjective:
    """``F = sum_{i<j} w <X_ij, A_i X_ij A_j^T> + <X_ij, Wbar_ij>`` in closed form.

    With ``M_i = U_i^T A_i U_i`` (d x d) and ``S = sum_i M_i``, the quadratic part is
    ``w/2 (||S||^2 - sum_i ||M_i||^2)`` and its gradient with respect to ``U_i`` is
    ``w (A_i U_i R_i^T + A_i^T U_i R_i)`` with ``R_i = S - M_i``: O(m n^2 d), no pair loop.
    """

    def __init__(self, A: Array, supW: Array | None, weight: float, *, xp: Any):
        self.A, self.supW, self.w, self.xp = A, supW, float(weight), xp
        At = xp.permute_dims(A, (0, 2, 1))
        self.At = At
        self.symmetric = bool(xp.all(A == At))

    def _unary(self, U: Array) -> Array | None:
        if self.supW is None:
            return None
        xp = self.xp
        m, r, d = U.shape
        return xp.reshape(xp.matmul(self.supW, xp.reshape(U, (m * r, d))), (m, r, d))

    def grad(self, U: Array) -> Array:
        xp = self.xp
        AU = xp.matmul(self.A, U)
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), AU)
        R = xp.sum(M, axis=0, keepdims=True) - M
        Rt = xp.permute_dims(R, (0, 2, 1))
        if self.symmetric:
            G = xp.matmul(AU, R + Rt)
        else:
            G = xp.matmul(AU, Rt) + xp.matmul(xp.matmul(self.At, U), R)
        G = self.w * G
        un = self._unary(U)
        return G if un is None else G + un

    def local_problem(self, U: Array, i: int, n_i: int) -> Problem:
        """``F`` as a function of ``U_i`` alone: a KB problem of graph ``i`` vs the others.

        ``F(U_i) = w <U_i, A_i U_i R_i^T> + <U_i, H_i> + const`` with ``R_i = sum_{j != i}
        U_j^T A_j U_j`` (the other graphs, aligned and summed in the universe) and
        ``H_i = sum_j Wbar_ij U_j``.
        """
        xp = self.xp
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), xp.matmul(self.A, U))
        R = xp.sum(M, axis=0) - M[i, ...]
        un = self._unary(U)
        L = None if un is None else un[i, :n_i, :]
        return Problem.koopmans_beckmann(self.w * self.A[i, :n_i, :n_i], R, L)

    def local_problems(self, U: Array, ns: np.ndarray) -> Problem:
        """All ``m`` graph-vs-others problems of :meth:`local_problem` as one batch."""
        xp = self.xp
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), xp.matmul(self.A, U))
        R = xp.sum(M, axis=0, keepdims=True) - M
        un = self._unary(U)
        d = U.shape[2]
        return Problem.koopmans_beckmann(
            self.w * self.A, R, un, n1=ns, n2=np.full(ns.shape[0], d, dtype=np.int64)
        )

    def upper_bound(self) -> float | None:
        """``w sum_{i<j} ||A_i||_F ||A_j||_F``, an upper bound of ``F`` (no node term), or None.

        ``<X, A_i X A_j^T> = <A_i X, X A_j> <= ||A_i X|| ||X A_j|| <= ||A_i|| ||A_j||`` for any
        partial matching ``X`` (Cauchy--Schwarz), with equality for all pairs exactly when the
        matchings carry every graph's edges onto the others' (isomorphic graphs).
        """
        if self.supW is not None:
            return None
        xp = self.xp
        norms = backend.to_numpy(xp.sqrt(xp.sum(self.A * self.A, axis=(1, 2)))).astype(np.float64)
        return 0.5 * self.w * (float(norms.sum()) ** 2 - float(np.sum(norms * norms)))

    def score(self, U: Array) -> float:
        xp = self.xp
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), xp.matmul(self.A, U))
        S = xp.sum(M, axis=0)
        quad = 0.5 * self.w * (float(xp.sum(S * S)) - float(xp.sum(M * M)))
        un = self._unary(U)
        return quad if un is None else quad + 0.5 * float(xp.sum(U * un))


@dataclass
class _Group:
    """Pairs whose affinities one operator serves as a batch: pair k is ``X = U_I[k] U_J[k]^T``."""

    affinity: Affinity
    pi: np.ndarray
    pj: np.ndarray
    I_xp: Array = None
    J_xp: Array = None
    E_I: Array = None  # (m, P) one-hot: sums pair contributions into graphs
    E_J: Array = None


class _PairObjective:
    """``F = sum_pairs vec(X_ij)^T K_ij vec(X_ij)`` via the operators' ``gradient``, ``score``."""

    def __init__(
        self, groups: list[_Group], m: int, nrow: int, *, xp: Any, dtype: Any, device: Any
    ):
        self.groups, self.m, self.nrow, self.xp = groups, m, nrow, xp
        for g in groups:
            g.I_xp = backend.asarray_on(g.pi.astype(np.int64), xp=xp, device=device)
            g.J_xp = backend.asarray_on(g.pj.astype(np.int64), xp=xp, device=device)
            P = g.pi.shape[0]
            eI, eJ = np.zeros((m, P)), np.zeros((m, P))
            eI[g.pi, np.arange(P)] = 1.0
            eJ[g.pj, np.arange(P)] = 1.0
            g.E_I = xp.astype(backend.asarray_on(eI, xp=xp, device=device), dtype)
            g.E_J = xp.astype(backend.asarray_on(eJ, xp=xp, device=device), dtype)

    def upper_bound(self) -> None:
        """No cheap bound of ``F`` for general affinities (see :meth:`_KBObjective.upper_bound`)."""
        return None

    def _sides(self, U: Array, g: _Group) -> tuple[Array, Array]:
        xp = self.xp
        Ui = xp.take(U, g.I_xp, axis=0)[:, : g.affinity.n1max, :]
        Uj = xp.take(U, g.J_xp, axis=0)[:, : g.affinity.n2max, :]
        return Ui, Uj

    def _pad(self, Y: Array) -> Array:
        xp = self.xp
        P, r, d = Y.shape
        if r == self.nrow:
            return Y
        z = xp.zeros((P, self.nrow - r, d), dtype=Y.dtype, device=backend.device(Y))
        return xp.concat([Y, z], axis=1)

    def grad(self, U: Array) -> Array:
        xp = self.xp
        m, r, d = U.shape
        out = xp.zeros_like(U)
        for g in self.groups:
            Ui, Uj = self._sides(U, g)
            X = xp.matmul(Ui, xp.permute_dims(Uj, (0, 2, 1)))
            G = g.affinity.gradient(X)
            gi = self._pad(xp.matmul(G, Uj))
            gj = self._pad(xp.matmul(xp.permute_dims(G, (0, 2, 1)), Ui))
            P = gi.shape[0]
            out = out + xp.reshape(xp.matmul(g.E_I, xp.reshape(gi, (P, r * d))), (m, r, d))
            out = out + xp.reshape(xp.matmul(g.E_J, xp.reshape(gj, (P, r * d))), (m, r, d))
        return out

    def local_problems(self, U: Array, ns: np.ndarray) -> Problem:
        """Every graph's ``F(U_i)`` (others fixed) as one batch of ``m`` Lawler problems."""
        m, d = U.shape[0], U.shape[2]
        aff = _LocalPairAffinity(self, U)
        return Problem(aff, ns, np.full(m, d, dtype=np.int64), batched=True)

    def score(self, U: Array) -> float:
        xp = self.xp
        total = 0.0
        for g in self.groups:
            Ui, Uj = self._sides(U, g)
            X = xp.matmul(Ui, xp.permute_dims(Uj, (0, 2, 1)))
            total += float(xp.sum(g.affinity.score(X)))
        return total


class _LocalPairAffinity(Affinity):
    """``K_i`` with ``F(U_i) = vec(U_i)^T K_i vec(U_i) + const`` for all graphs ``i`` at once.

    ``F`` is quadratic in each ``U_i`` with the others fixed, so ``K_i vec(Y)`` (symmetrised) is
    half the gradient of ``F`` at ``U_i = Y``: for each pair ``(i, j)`` the operator is applied
    to ``Y_i U_j^T`` and to ``U_i Y_j^T``, and the results are pulled back through ``U_j``.
    """

    def __init__(self, obj: _PairObjective, U: Array):
        self.obj, self.U = obj, U
        self.xp, self.dtype, self.device = obj.xp, U.dtype, backend.device(U)
        self.batch, self.n1max, self.n2max = U.shape

    def matvec(self, Y: Array) -> Array:
        xp, obj, U = self.xp, self.obj, self.U
        m, r, d = U.shape
        Y = xp.astype(Y, U.dtype)
        out = xp.zeros_like(U)
        for g in obj.groups:
            Ui, Uj = obj._sides(U, g)
            Yi, Yj = obj._sides(Y, g)
            Gi = g.affinity.gradient(xp.matmul(Yi, xp.permute_dims(Uj, (0, 2, 1))))
            Gj = g.affinity.gradient(xp.matmul(Ui, xp.permute_dims(Yj, (0, 2, 1))))
            gi = obj._pad(xp.matmul(Gi, Uj))
            gj = obj._pad(xp.matmul(xp.permute_dims(Gj, (0, 2, 1)), Ui))
            P = gi.shape[0]
            out = out + xp.reshape(xp.matmul(g.E_I, xp.reshape(gi, (P, r * d))), (m, r, d))
            out = out + xp.reshape(xp.matmul(g.E_J, xp.reshape(gj, (P, r * d))), (m, r, d))
        return 0.5 * out

    rmatvec = matvec
    symmetric = True

    def entry_bounds(self) -> tuple[float, float]:
        raise NotImplementedError("entry bounds of a graph-vs-others operator are not known")
