"""Sparse affinities made by the builders: symmetry known from the graphs, candidate support."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import Array
from ..problem import SparseAffinity

__all__ = ["CSRAffinity", "SparseGraphAffinity"]


class SparseGraphAffinity(SparseAffinity):
    """:class:`~qapfuse.problem.SparseAffinity` whose symmetry is known from the graphs.

    Parameters
    ----------
    Ks : sequence of sparse matrices of shape (n1max*n2max, n1max*n2max)
        One ``K`` per instance (scipy.sparse or torch sparse).
    n1max, n2max : int
        Padded graph sizes.
    symmetric : bool, optional
        True when ``K = K^T`` is known (both graphs hold each edge in both directions with
        equal features), so ``symmetric`` costs no transpose; None: tested on first use.
    """

    def __init__(self, Ks: Sequence[Any], n1max: int, n2max: int, *, symmetric: bool | None = None):
        super().__init__(Ks, n1max, n2max)
        self._symmetric = symmetric  # SparseAffinity's cached test, answered by the graphs


class CSRAffinity(SparseGraphAffinity):
    """A sparse ``K`` of scipy CSR matrices, built by :func:`~qapfuse.affinity.build_aff_mat`.

    When ``K`` is symmetric, ``rmatvec`` is ``matvec``. Products are scipy's (a Numba
    row-parallel product measured 2x slower on this machine).

    Parameters
    ----------
    Ks : sequence of scipy.sparse.csr_matrix of shape (n1max*n2max, n1max*n2max)
        One ``K`` per instance.
    n1max, n2max : int
        Padded graph sizes.
    symmetric : bool, optional
        See :class:`SparseGraphAffinity`.
    candidates : bool array of shape (b, n1max, n2max), optional
        The candidate pairs ``K`` was built on (``candidates=k`` of the builders): rows and
        columns of other pairs are zero, and
        :func:`~qapfuse.solvers.match_with_outliers` works on this support only.

    Attributes
    ----------
    candidates : bool array of shape (b, n1max, n2max) or None
        As given; None for a full ``K``.
    """

    def __init__(
        self,
        Ks: Sequence[Any],
        n1max: int,
        n2max: int,
        *,
        symmetric: bool | None = None,
        candidates: np.ndarray | None = None,
    ):
        super().__init__(Ks, n1max, n2max, symmetric=symmetric)
        if candidates is not None:
            candidates = np.asarray(candidates)
            want = (self.batch, n1max, n2max)
            if candidates.dtype != np.bool_ or candidates.shape != want:
                raise ValueError(
                    f"The 'candidates' parameter of CSRAffinity must be a bool array of shape "
                    f"{want}. Got dtype {candidates.dtype} and shape {candidates.shape} instead."
                )
        self.candidates = candidates

    def rmatvec(self, X: Array) -> Array:
        if self._symmetric:
            return self.matvec(X)
        return super().rmatvec(X)
