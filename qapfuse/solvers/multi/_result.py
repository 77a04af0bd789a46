"""The result of a multi-graph matching: one universe matching per graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import numpy as np

from ... import backend
from ...backend import Array


@dataclass(frozen=True, kw_only=True, repr=False)
class MultiMatchResult:
    """Outcome of a multi-graph matching: one universe matching per graph.

    Indexing follows pygmtools' ``MultiMatchingResult``: ``result[i, j]`` is the pairwise
    matching ``X_ij = U_i U_j^T`` of shape ``(n_i, n_j)`` (0/1), and ``result[i]`` is ``U_i``.

    Attributes
    ----------
    U : array of shape (m, nmax, d)
        Hard universe matchings, in the caller's array library, dtype and device. Graph ``i``
        uses rows ``:n_i`` (each row one 1, each universe column at most one); padded rows are 0.
    ns : numpy array of shape (m,)
        Number of nodes of each graph.
    soft : array of shape (m, nmax, d), or None
        The last annealed (doubly stochastic) iterate, where the solver has one.
    score : float
        ``sum_{i<j} vec(X_ij)^T K_ij vec(X_ij)`` of the hard matchings (higher is better).
    n_iter : int
        Graduated-assignment iterations (Sinkhorn projections of all graphs at once).
    converged : bool
        Whether the coldest temperature stage met its tolerance.
    time : float
        Wall-clock seconds.
    info : mapping
        :func:`gamgm`: ``"history"`` (one entry per temperature of the annealing run that was
        kept: ``tau``, inner iterations, last change, soft score; empty when its start was
        already a fixed point), ``"init"``, ``"candidates"`` (``(kind, score)`` of each
        rounded answer and hard start), ``"picked"``, ``"refine_sweeps"``.
        :func:`synchronize`: ``"eigenvalues"``.
    """

    U: Array
    ns: np.ndarray
    soft: Array | None
    score: float
    n_iter: int
    converged: bool
    time: float
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        """Number of graphs."""
        return int(self.ns.shape[0])

    @property
    def n_univ(self) -> int:
        """Size ``d`` of the universe."""
        return int(self.U.shape[2])

    def _index(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"Graph indices must be ints; got {type(i).__name__}.")
        if not -self.m <= int(i) < self.m:
            raise IndexError(f"Graph index {i} is out of range for {self.m} graphs.")
        return int(i) % self.m

    def universe(self, i: int) -> Array:
        """``U_i``: the universe matching of graph `i`, shape ``(n_i, d)``."""
        i = self._index(i)
        return self.U[i, : int(self.ns[i]), :]

    def __getitem__(self, key: Any) -> Array:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"Index a MultiMatchResult with (i, j); got {key!r}.")
            Ui, Uj = self.universe(key[0]), self.universe(key[1])
            xp = backend.namespace_of(Ui)
            return xp.matmul(Ui, xp.permute_dims(Uj, (1, 0)))
        return self.universe(key)

    def to_dense(self) -> Array:
        """All pairwise matchings, shape ``(m, m, nmax, nmax)`` (pygmtools' layout)."""
        xp = backend.namespace_of(self.U)
        U = self.U
        return xp.matmul(U[:, None, :, :], xp.permute_dims(U, (0, 2, 1))[None, :, :, :])

    def __repr__(self) -> str:
        return (
            f"MultiMatchResult(m={self.m}, n_univ={self.n_univ}, score={self.score:.6g}, "
            f"n_iter={self.n_iter}, converged={self.converged}, time={self.time:.3g}s)"
        )
