r"""Affinity matrices for graph matching from node and edge features.

:func:`build_aff_mat` has the meaning of ``pygmtools.utils.build_aff_mat``: for graphs with
edges ``i -> j`` (features ``f_ij``) and ``a -> b`` (features ``g_ab``) the Lawler matrix is

.. math::

    K[i + a n_1, j + b n_1] = k_e(f_{ij}, g_{ab}), \qquad K[i + a n_1, i + a n_1] = k_n(u_i, v_a)

(column-major ``vec`` with the padded ``n1max`` as stride, node affinities on the diagonal,
overwriting any self-loop pair). It is built by Numba kernels (numpy input) or by vectorised
torch code (torch input, any device), as a dense array, a sparse matrix, or never at all
(``format="operator"``, see :class:`~qapfuse.affinity.EdgeFactorAffinity`).
:func:`graph_matching_problem` takes the same arguments and wraps the result in a
:class:`~qapfuse.Problem`. Both run one implementation, :func:`_build`: checks
(:mod:`._inputs`), node affinities and candidates, then assembly (:mod:`._assemble`) or the
matrix-free operator (:mod:`._operator`).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import numpy as np

from .._validation import check_choice
from ..backend import Array
from ..problem import DenseAffinity, Problem
from ._assemble import assemble, candidate_mask, node_matrix
from ._inputs import (
    FORMATS,
    CheckedGraphs,
    check_candidates,
    check_dense_budget,
    check_graphs,
    check_operator_options,
    check_threshold,
    storage_dtype,
    symmetric_graphs,
)
from ._kernel import as_kernel
from ._operator import EdgeFactorAffinity
from ._sparse import CSRAffinity, SparseGraphAffinity

__all__ = ["build_aff_mat", "graph_matching_problem"]


def build_aff_mat(
    node_feat1: Array | None,
    edge_feat1: Array | None,
    connectivity1: Array | None,
    node_feat2: Array | None,
    edge_feat2: Array | None,
    connectivity2: Array | None,
    n1: Any = None,
    ne1: Any = None,
    n2: Any = None,
    ne2: Any = None,
    *,
    node_aff: Any = "inner_product",
    edge_aff: Any = "inner_product",
    format: str = "dense",
    dtype: Any = None,
    max_bytes: int | None = None,
    tol: float = 1e-6,
    max_terms: int = 256,
    threshold: float = 0.0,
    candidates: int | None = None,
) -> Any:
    r"""Build the graph-matching affinity ``K`` from node and edge features.

    The same meaning as ``pygmtools.utils.build_aff_mat``: node affinities on the diagonal,
    the affinity of edge ``i -> j`` (graph 1) with edge ``a -> b`` (graph 2) at
    ``(i + a*n1max, j + b*n1max)``.

    Parameters
    ----------
    node_feat1, node_feat2 : array of shape (n1, dn) / (n2, dn), or batched (b, n1max, dn)
        Node features (or None for no node term).
    edge_feat1, edge_feat2 : array of shape (ne1, de) / (ne2, de), or batched (b, ne, de)
        Edge features, one row per edge (a 1-D ``(ne,)`` array means ``de = 1``).
    connectivity1, connectivity2 : int array of shape (ne, 2) or (b, ne, 2)
        Start and end node of each edge. Duplicated edges keep the last feature row.
    n1, n2 : int or array of shape (b,), optional
        Node counts; default from the node features, else ``max(connectivity) + 1``.
    ne1, ne2 : int or array of shape (b,), optional
        Edge counts (rows past them are padding); default all rows.
    node_aff, edge_aff : "inner_product", "gaussian", Kernel or Numba function
        Kernels (see :func:`~qapfuse.affinity.gaussian_kernel`,
        :func:`~qapfuse.affinity.custom_kernel`).
    format : {"dense", "sparse", "operator"}
        ``"dense"``: an array ``(b, N, N)`` (``N = n1max * n2max``); ``"sparse"``: a
        ``scipy.sparse.csr_matrix`` per instance (numpy) or a coalesced torch COO tensor
        (torch); ``"operator"``: a matrix-free
        :class:`~qapfuse.affinity.EdgeFactorAffinity` (inner-product and Gaussian kernels).
    dtype : {"float32", "float64"} or a numpy/torch dtype, optional
        Storage type of ``K``; default float32. Kernels are evaluated in float64.
    max_bytes : int, optional
        Size limit of a dense ``K``; default ``qapfuse.problem.DENSE_MAX_BYTES`` (2 GiB).
    tol, max_terms :
        Accuracy and size limit of the Gaussian expansion (``format="operator"`` only).
    threshold : float >= 0
        ``format="sparse"`` only: leave out edge-pair entries with ``|k| < threshold`` (each
        entry of ``K`` is then off by less than `threshold`). For the Gaussian kernel the test
        ``||f - g||^2 >= sigma * log(1 / threshold)`` skips the ``exp`` of every dropped pair,
        so both time and memory shrink. Default 0: exact.
    candidates : int >= 1, optional
        ``format="sparse"`` with numpy node features only: keep only the candidate pairs
        ``(i, a)`` where ``a`` is among the `candidates` nodes of graph 2 with the highest node
        affinity to ``i``, or ``i`` among the `candidates` best of ``a``. Rows and columns of
        other pairs are zero, and of the edge pairs ``(i -> j, a -> b)`` only those with both
        ``(i, a)`` and ``(j, b)`` candidates are built, so the cost is about
        ``|candidates| deg1 deg2`` instead of ``|E1| |E2|``. The result is the full ``K``
        restricted to the candidate pairs (same shape). Default None: every pair.

    Returns
    -------
    K
        Dense array ``(N, N)`` or ``(b, N, N)`` in the input's library and device; for
        ``"sparse"`` one sparse matrix or a list of ``b``; for ``"operator"`` an
        :class:`~qapfuse.problem.Affinity` (batched ``(b, n1max, n2max)``).

    Raises
    ------
    MemoryError
        If a dense ``K`` needs more than `max_bytes`: the message gives the byte count; use
        ``format="sparse"`` or ``"operator"``.

    Notes
    -----
    Unlike pygmtools, rows and columns of padded nodes (``i >= n1[k]`` or ``a >= n2[k]``)
    are zero in every instance (pygmtools puts the node affinity of padding features there).

    References
    ----------
    .. [1] R. Wang, Z. Guo, S. Jiang, X. Yang, J. Yan, "Deep learning of partial graph
           matching via differentiable top-k", CVPR 2023 (pygmtools).
    .. [2] M. Leordeanu, M. Hebert, "A spectral technique for correspondence problems using
           pairwise constraints", ICCV 2005 (the affinity matrix K).

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse.affinity import build_aff_mat
    >>> conn = np.array([[0, 1], [1, 0]])
    >>> w = np.array([[2.0], [2.0]])
    >>> K = build_aff_mat(None, w, conn, None, w, conn, dtype="float64")
    >>> K.shape, K[0 + 0 * 2, 1 + 1 * 2]
    ((4, 4), np.float64(4.0))
    """
    arguments = locals()  # exactly the parameters above: nothing else is bound yet
    built = _build("build_aff_mat", **arguments)
    if format == "operator" or built.graphs.batched:
        return built.K
    return built.K[0] if format == "sparse" else built.K[0, ...]


def graph_matching_problem(*args: Any, **kwargs: Any) -> Problem:
    """The graph matching problem ``max vec(X)^T K vec(X)`` for two (batches of) graphs.

    Takes the arguments of :func:`build_aff_mat`, in the same order and with the same
    meaning, and builds ``K`` the same way; only `format` defaults to ``"sparse"`` here.
    Returns a :class:`~qapfuse.Problem` that every solver accepts, with the per-instance sizes
    set, so that ``X`` has shape ``(n1, n2)`` (batched ``(b, n1max, n2max)``). Needs
    ``n1 <= n2``.

    Parameters
    ----------
    *args, **kwargs
        The parameters of :func:`build_aff_mat` (documented there), with
        ``format="sparse"`` by default.

    Returns
    -------
    Problem
        Its affinity is a :class:`~qapfuse.DenseAffinity` (``format="dense"``), a
        :class:`~qapfuse.affinity.CSRAffinity` (``"sparse"``, numpy; its ``candidates``, bool
        ``(b, n1max, n2max)``, holds the candidate pairs when built with `candidates`, and
        :func:`~qapfuse.solvers.match_with_outliers` then works on that support only),
        a :class:`~qapfuse.SparseAffinity` (``"sparse"``, torch) or an
        :class:`~qapfuse.affinity.EdgeFactorAffinity` (``"operator"``).

    Raises
    ------
    TypeError, ValueError, MemoryError
        As :func:`build_aff_mat`; TypeError also for arguments that do not fit its signature.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import solve
    >>> from qapfuse.affinity import graph_matching_problem
    >>> from qapfuse.graphs import isomorphic_pair
    >>> pair = isomorphic_pair(8, rng=0)
    >>> p = graph_matching_problem(None, pair.edge_feat1, pair.conn1, None,
    ...                            pair.edge_feat2, pair.conn2, dtype="float64")
    >>> p.n1max, p.n2max
    (8, 8)
    """
    try:
        bound = _PROBLEM_SIGNATURE.bind(*args, **kwargs)
    except TypeError as exc:  # as Python words it for a function with this signature
        raise TypeError(f"graph_matching_problem() {exc}") from None
    bound.apply_defaults()
    built = _build("graph_matching_problem", **bound.arguments)
    g, K = built.graphs, built.K
    n1max, n2max = g.g1.nmax, g.g2.nmax
    if bound.arguments["format"] == "operator":
        aff: Any = K
    elif bound.arguments["format"] == "dense":
        aff = DenseAffinity(K, n1max, n2max)
    else:
        symmetric = True if symmetric_graphs(g) else None  # None: tested on first use
        if g.torch:
            aff = SparseGraphAffinity(K, n1max, n2max, symmetric=symmetric)
        else:
            aff = CSRAffinity(K, n1max, n2max, symmetric=symmetric, candidates=built.candidates)
    return Problem(aff, g.g1.n, g.g2.n, batched=g.batched)


def _problem_signature() -> inspect.Signature:
    """:func:`build_aff_mat`'s signature with ``format="sparse"``, returning a Problem."""
    sig = inspect.signature(build_aff_mat)
    params = [
        p.replace(default="sparse") if p.name == "format" else p for p in sig.parameters.values()
    ]
    return sig.replace(parameters=params, return_annotation="Problem")


_PROBLEM_SIGNATURE = _problem_signature()
graph_matching_problem.__signature__ = _PROBLEM_SIGNATURE  # type: ignore[attr-defined]


class _Built(NamedTuple):
    """What :func:`_build` makes, before the caller picks its return form."""

    K: Any  # (b, N, N) array, list of b sparse matrices, or an EdgeFactorAffinity
    graphs: CheckedGraphs
    candidates: np.ndarray | None  # (b, n1max, n2max) bool, or None for every pair


def _build(
    caller: str,
    *,
    node_aff: Any,
    edge_aff: Any,
    format: str,
    dtype: Any,
    max_bytes: int | None,
    tol: float,
    max_terms: int,
    threshold: float,
    candidates: int | None,
    **graph_args: Any,
) -> _Built:
    """The one implementation of both builders (arguments as documented in build_aff_mat).

    Every check runs before any work; `caller` names the public function in the messages.
    """
    check_choice(format, "format", caller, FORMATS)
    g = check_graphs(**graph_args, caller=caller)
    kn = as_kernel(node_aff, "node_aff", caller)
    ke = as_kernel(edge_aff, "edge_aff", caller)
    dt = storage_dtype(dtype, g, caller)
    check_threshold(threshold, format, caller)
    check_candidates(candidates, format, g, caller)
    if format == "operator":
        check_operator_options(tol, max_terms, caller)
    if format == "dense":
        check_dense_budget(g, 4 if str(dt).endswith("32") else 8, max_bytes, caller)
    node = node_matrix(g, kn, caller) if g.has_node else None
    cand = None if candidates is None else candidate_mask(g, node, candidates)
    if format == "operator":
        K = EdgeFactorAffinity._from_graphs(g, node, ke, dt, tol=tol, max_terms=max_terms)
    else:
        K = assemble(g, node, ke, format, dt, caller, threshold=threshold, cand=cand)
    return _Built(K, g, cand)
