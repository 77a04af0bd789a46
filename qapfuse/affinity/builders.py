r"""Affinity matrices for graph matching from node and edge features.

:func:`build_aff_mat` has the meaning of ``pygmtools.utils.build_aff_mat``: for graphs with
edges ``i -> j`` (features ``f_ij``) and ``a -> b`` (features ``g_ab``) the Lawler matrix is

.. math::

    K[i + a n_1, j + b n_1] = k_e(f_{ij}, g_{ab}), \qquad K[i + a n_1, i + a n_1] = k_n(u_i, v_a)

(column-major ``vec`` with the padded ``n1max`` as stride, node affinities on the diagonal,
overwriting any self-loop pair). It is built by Numba kernels (numpy input) or by vectorised
torch code (torch input, any device), as a dense array, a sparse matrix, or never at all
(``format="operator"``, see :class:`~qapfuse.affinity.EdgeFactorAffinity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backend
from .. import problem as _problem
from .._validation import check_choice, check_scalar
from ..backend import Array
from ..problem import DenseAffinity, Problem, SparseAffinity
from . import _kernels
from .kernels import Kernel, as_kernel

__all__ = ["build_aff_mat", "graph_matching_problem"]

FORMATS = ("dense", "sparse", "operator")


# ----------------------------------------------------------------------------------------------
# Input checks: one pass, shared by every format and backend
# ----------------------------------------------------------------------------------------------


@dataclass
class _Side:
    """One graph of every instance, validated: per-instance edges sorted and de-duplicated."""

    node: Array | None  # (b, nmax, dn) float64 (numpy or torch) or None
    conn: list[Any]  # per instance (ne_k, 2) int64, sorted by (start, end), unique
    feat: list[Any]  # per instance (ne_k, de) float64, same order
    n: np.ndarray  # (b,) int64 node counts
    nmax: int


@dataclass
class _Graphs:
    xp: Any
    torch: bool
    batched: bool
    batch: int
    g1: _Side
    g2: _Side
    has_node: bool
    has_edge: bool


def _as_array(x: Any, name: str, caller: str, xp: Any) -> Array:
    if backend.is_sparse(x):
        raise TypeError(f"`{name}` in {caller} must be a dense array; got a sparse matrix.")
    return xp.asarray(x)


def _float_feat(x: Array, name: str, caller: str, xp: Any) -> Array:
    if not (xp.isdtype(x.dtype, "real floating") or xp.isdtype(x.dtype, ("integral", "bool"))):
        raise TypeError(f"`{name}` in {caller} must hold real numbers; got dtype {x.dtype}.")
    x = xp.astype(x, xp.float64)
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"`{name}` in {caller} contains NaN or Inf; clean or mask it first.")
    return x


def _check_graphs(
    node_feat1: Any,
    edge_feat1: Any,
    conn1: Any,
    node_feat2: Any,
    edge_feat2: Any,
    conn2: Any,
    n1: Any,
    ne1: Any,
    n2: Any,
    ne2: Any,
    caller: str,
) -> _Graphs:
    arrays = [node_feat1, edge_feat1, conn1, node_feat2, edge_feat2, conn2]
    xp = backend.namespace_of(
        *[a for a in arrays if a is not None],
        name="node_feat1, edge_feat1, connectivity1, node_feat2, edge_feat2, connectivity2",
    )
    is_torch = any(backend.is_torch_array(a) for a in arrays if a is not None)
    has_node = node_feat1 is not None or node_feat2 is not None
    if has_node and (node_feat1 is None or node_feat2 is None):
        missing = "node_feat2" if node_feat2 is None else "node_feat1"
        raise ValueError(
            f"{caller}: node features need both node_feat1 and node_feat2; `{missing}` is None."
        )
    edge_args = {
        "edge_feat1": edge_feat1,
        "connectivity1": conn1,
        "edge_feat2": edge_feat2,
        "connectivity2": conn2,
    }
    has_edge = any(v is not None for v in edge_args.values())
    if has_edge:
        missing = [k for k, v in edge_args.items() if v is None]
        if missing:
            raise ValueError(
                f"{caller}: edge affinities need edge_feat1, connectivity1, edge_feat2 and "
                f"connectivity2; {', '.join(f'`{m}`' for m in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} None."
            )
    if not has_node and not has_edge:
        raise ValueError(f"{caller} needs node features, edge features, or both; all are None.")

    batched: bool | None = None
    batch: int | None = None

    def batch_of(x: Array, nd: int, name: str) -> Array:
        nonlocal batched, batch
        if x.ndim == nd:
            this, x = False, x[None, ...]
        elif x.ndim == nd + 1:
            this = True
        else:
            shape = {"c": "(ne, 2)", "e": "(ne, d)"}.get(name[0], "(n, d)")
            raise ValueError(
                f"`{name}` in {caller} must have shape {shape} or with a batch axis "
                f"(b, {shape[1:]}; got shape {tuple(x.shape)}."
            )
        if batched is None:
            batched, batch = this, int(x.shape[0])
        elif batched != this:
            raise ValueError(
                f"{caller}: `{name}` has {'a' if this else 'no'} batch axis but the arguments "
                f"before it have {'none' if this else 'one'}; give all inputs a batch axis or "
                "none."
            )
        elif int(x.shape[0]) != batch:
            raise ValueError(
                f"{caller}: `{name}` has batch size {int(x.shape[0])}, the arguments before it "
                f"{batch}."
            )
        return x

    nodes: list[Array | None] = [None, None]
    if has_node:
        for s, (x, nm) in enumerate(((node_feat1, "node_feat1"), (node_feat2, "node_feat2"))):
            x = _as_array(x, nm, caller, xp)
            x = batch_of(x, 2, nm)
            nodes[s] = _float_feat(x, nm, caller, xp)
        d1, d2 = nodes[0].shape[-1], nodes[1].shape[-1]
        if d1 != d2:
            raise ValueError(
                f"{caller}: `node_feat1` has {d1} features per node and `node_feat2` has {d2}; "
                "they must match."
            )
    edges: list[tuple[Array, Array] | None] = [None, None]
    if has_edge:
        for s, (f, c, fn, cn) in enumerate(
            (
                (edge_feat1, conn1, "edge_feat1", "connectivity1"),
                (edge_feat2, conn2, "edge_feat2", "connectivity2"),
            )
        ):
            c = _as_array(c, cn, caller, xp)
            f = _as_array(f, fn, caller, xp)
            if not xp.isdtype(c.dtype, "integral"):
                raise TypeError(
                    f"`{cn}` in {caller} must hold integer node indices; got dtype {c.dtype}."
                )
            if c.ndim in (2, 3) and c.shape[-1] != 2:
                hint = (
                    " It looks transposed (a (2, ne) edge index): pass its transpose."
                    if c.shape[-2] == 2
                    else ""
                )
                raise ValueError(
                    f"`{cn}` in {caller} must have shape (ne, 2) or (b, ne, 2) (start and end "
                    f"node of each edge); got shape {tuple(c.shape)}.{hint}"
                )
            if f.ndim == c.ndim - 1:  # one scalar feature per edge
                f = f[..., None]
            c = batch_of(c, 2, cn)
            f = batch_of(f, 2, fn)
            if f.shape[1] != c.shape[1]:
                raise ValueError(
                    f"{caller}: `{fn}` has {f.shape[1]} edges but `{cn}` has {c.shape[1]}; "
                    "there must be one feature row per edge."
                )
            edges[s] = (_float_feat(f, fn, caller, xp), xp.astype(c, xp.int64))
        d1, d2 = edges[0][0].shape[-1], edges[1][0].shape[-1]
        if d1 != d2:
            raise ValueError(
                f"{caller}: `edge_feat1` has {d1} features per edge and `edge_feat2` has {d2}; "
                "they must match."
            )
    assert batch is not None and batched is not None  # set by the first array above
    sides = []
    for s, (n, ne, nm, nem) in enumerate(((n1, ne1, "n1", "ne1"), (n2, ne2, "n2", "ne2"))):
        node, edge = nodes[s], edges[s]
        ecount = int(edge[1].shape[1]) if edge is not None else 0
        ne_arr = _problem._sizes(ne, nem, batch, ecount, caller)
        ne_arr = np.full(batch, ecount, np.int64) if ne_arr is None else ne_arr
        if node is not None:
            nmax = int(node.shape[1])
            n_arr = _problem._sizes(n, nm, batch, nmax, caller)
        else:
            n_arr = _problem._sizes(n, nm, batch, None, caller)
            if n_arr is not None:
                nmax = int(n_arr.max()) if batch else 0
            else:
                tops = [
                    int(xp.max(edge[1][k, : ne_arr[k], :])) + 1 if ne_arr[k] else 0
                    for k in range(batch)
                ]
                n_arr = np.asarray(tops, dtype=np.int64)
                nmax = int(n_arr.max()) if batch else 0
        n_arr = np.full(batch, nmax, np.int64) if n_arr is None else n_arr
        conns, feats = [], []
        if edge is not None:
            f_all, c_all = edge
            cname = f"connectivity{s + 1}"
            for k in range(batch):
                c = c_all[k, : ne_arr[k], :]
                if ne_arr[k]:
                    lo, hi = int(xp.min(c)), int(xp.max(c))
                    if lo < 0 or hi >= n_arr[k]:
                        bad = lo if lo < 0 else hi
                        where = f" of instance {k}" if batched else ""
                        raise ValueError(
                            f"`{cname}`{where} in {caller} holds node index {bad}, outside "
                            f"[0, {int(n_arr[k])}) for a graph of {int(n_arr[k])} nodes "
                            f"(`{nm}`)."
                        )
                cs, fs = _dedupe(c, f_all[k, : ne_arr[k], :], int(nmax), xp=xp)
                conns.append(cs)
                feats.append(fs)
        sides.append(_Side(node=node, conn=conns, feat=feats, n=n_arr, nmax=int(nmax)))
    return _Graphs(
        xp=xp,
        torch=is_torch,
        batched=batched,
        batch=batch,
        g1=sides[0],
        g2=sides[1],
        has_node=has_node,
        has_edge=has_edge,
    )


def _dedupe(c: Array, f: Array, nmax: int, *, xp: Any) -> tuple[Array, Array]:
    """Sort edges by (start, end) and keep the last of duplicates (pygmtools' write order)."""
    if c.shape[0] == 0:
        return c, f
    key = c[:, 0] * max(nmax, 1) + c[:, 1]
    if backend.is_torch_array(c):
        order = xp.argsort(key, stable=True)
    else:
        order = np.argsort(key, kind="stable")
    sk = xp.take(key, order)
    last = xp.concat([sk[1:] != sk[:-1], xp.ones(1, dtype=xp.bool, device=backend.device(c))])
    keep = order[last]
    return xp.take(c, keep, axis=0), xp.take(f, keep, axis=0)


# ----------------------------------------------------------------------------------------------
# Public builders
# ----------------------------------------------------------------------------------------------


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
    caller = "build_aff_mat"
    check_choice(format, "format", caller, FORMATS)
    g = _check_graphs(
        node_feat1,
        edge_feat1,
        connectivity1,
        node_feat2,
        edge_feat2,
        connectivity2,
        n1,
        ne1,
        n2,
        ne2,
        caller,
    )
    kn = as_kernel(node_aff, "node_aff", caller)
    ke = as_kernel(edge_aff, "edge_aff", caller)
    dt = _dtype(dtype, g, caller)
    if format == "operator":
        from .operator import EdgeFactorAffinity

        check_scalar(tol, "tol", caller)
        check_scalar(max_terms, "max_terms", caller, integer=True, low=1, low_inclusive=True)
        node = _node_matrix(g, kn, caller) if g.has_node else None
        return EdgeFactorAffinity._from_graphs(g, node, ke, dt, tol=tol, max_terms=max_terms)
    _check_threshold(threshold, format, caller)
    node, cand = _candidates(g, kn, candidates, format, caller)
    out = _build(g, kn, ke, format, dt, max_bytes, caller, threshold, cand, node)
    if format == "sparse":
        return out if g.batched else out[0]
    return out if g.batched else out[0, ...]


def graph_matching_problem(
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
    format: str = "sparse",
    dtype: Any = None,
    max_bytes: int | None = None,
    tol: float = 1e-6,
    max_terms: int = 256,
    threshold: float = 0.0,
    candidates: int | None = None,
) -> Problem:
    """The graph matching problem ``max vec(X)^T K vec(X)`` for two (batches of) graphs.

    Same arguments as :func:`build_aff_mat` (default ``format="sparse"``); returns a
    :class:`~qapfuse.Problem` that every solver accepts, with the per-instance sizes set, so
    that ``X`` has shape ``(n1, n2)`` (batched ``(b, n1max, n2max)``). Needs ``n1 <= n2``.
    With `candidates`, the affinity is a :class:`CSRAffinity` whose ``candidates`` attribute
    (bool, ``(b, n1max, n2max)``) holds the candidate pairs; :func:`~qapfuse.solvers.partial.
    match_with_outliers` then works on that support only.

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
    caller = "graph_matching_problem"
    check_choice(format, "format", caller, FORMATS)
    g = _check_graphs(
        node_feat1,
        edge_feat1,
        connectivity1,
        node_feat2,
        edge_feat2,
        connectivity2,
        n1,
        ne1,
        n2,
        ne2,
        caller,
    )
    kn = as_kernel(node_aff, "node_aff", caller)
    ke = as_kernel(edge_aff, "edge_aff", caller)
    dt = _dtype(dtype, g, caller)
    n1max, n2max = g.g1.nmax, g.g2.nmax
    _check_threshold(threshold, format, caller)
    node, cand = _candidates(g, kn, candidates, format, caller)
    if format == "operator":
        from .operator import EdgeFactorAffinity

        check_scalar(tol, "tol", caller)
        check_scalar(max_terms, "max_terms", caller, integer=True, low=1, low_inclusive=True)
        node = _node_matrix(g, kn, caller) if g.has_node else None
        aff: Any = EdgeFactorAffinity._from_graphs(g, node, ke, dt, tol=tol, max_terms=max_terms)
    elif format == "dense":
        aff = DenseAffinity(_build(g, kn, ke, "dense", dt, max_bytes, caller), n1max, n2max)
    else:
        Ks = _build(g, kn, ke, "sparse", dt, max_bytes, caller, threshold, cand, node)
        aff = SparseAffinity(Ks, n1max, n2max) if g.torch else CSRAffinity(Ks, n1max, n2max)
        if cand is not None:
            aff.candidates = cand
        if _symmetric_graphs(g):
            aff._symmetric = True
    return Problem(aff, g.g1.n, g.g2.n, batched=g.batched)


class CSRAffinity(SparseAffinity):
    """:class:`~qapfuse.problem.SparseAffinity` over the CSR matrices of the builders.

    The builders know when ``K`` is symmetric (both graphs hold each edge in both directions
    with equal features), so ``symmetric`` costs no transpose and ``rmatvec`` is ``matvec``.
    Products are scipy's (a Numba row-parallel product measured 2x slower on this machine).

    Attributes
    ----------
    candidates : bool array of shape (b, n1max, n2max) or None
        The candidate pairs when built with ``candidates=k`` (rows and columns of ``K`` outside
        them are zero); None for a full ``K``.
    """

    candidates: np.ndarray | None = None

    def rmatvec(self, X: Array) -> Array:
        if self._symmetric:
            return self.matvec(X)
        return super().rmatvec(X)


# ----------------------------------------------------------------------------------------------
# Implementation
# ----------------------------------------------------------------------------------------------


def _check_threshold(threshold: float, format: str, caller: str) -> None:
    check_scalar(threshold, "threshold", caller, low=0, low_inclusive=True)
    if threshold > 0 and format != "sparse":
        raise ValueError(
            f"The 'threshold' parameter of {caller} applies to format='sparse' only; got "
            f"threshold={threshold} with format={format!r}."
        )


def _candidates(
    g: _Graphs, kn: Kernel, k: int | None, format: str, caller: str
) -> tuple[Any, np.ndarray | None]:
    """Node affinities (or None) and the candidate masks (b, n1max, n2max) for `k`, or None.

    A pair ``(i, a)`` is a candidate if ``a`` is among the `k` nodes with the highest node
    affinity to ``i`` or ``i`` among the `k` highest of ``a`` (ties broken arbitrarily).
    """
    if k is None:
        return None, None
    check_scalar(k, "candidates", caller, integer=True, low=1, low_inclusive=True)
    if format != "sparse":
        raise ValueError(
            f"The 'candidates' parameter of {caller} applies to format='sparse' only; got "
            f"candidates={k} with format={format!r}."
        )
    if g.torch:
        raise TypeError(
            f"The 'candidates' parameter of {caller} needs numpy inputs; got torch tensors "
            "(build the full K, or convert the features with .cpu().numpy())."
        )
    if not g.has_node:
        raise ValueError(
            f"The 'candidates' parameter of {caller} ranks pairs by node affinity and needs "
            "node_feat1 and node_feat2; both are None."
        )
    node = _node_matrix(g, kn, caller)
    cand = np.zeros(node.shape, dtype=np.bool_)
    for b in range(g.batch):
        m1, m2 = int(g.g1.n[b]), int(g.g2.n[b])
        if m1 == 0 or m2 == 0:
            continue
        L = np.ascontiguousarray(node[b, :m1, :m2])
        k2 = min(k, m2)
        top = np.argpartition(L, m2 - k2, axis=1)[:, m2 - k2 :]  # (m1, k2): best of each i
        cand[b, np.repeat(np.arange(m1), k2), top.ravel()] = True
        k1 = min(k, m1)
        LT = np.ascontiguousarray(L.T)  # rows of the transpose: a contiguous partition
        top = np.argpartition(LT, m1 - k1, axis=1)[:, m1 - k1 :]  # (m2, k1): best of each a
        cand[b, top.ravel(), np.repeat(np.arange(m2), k1)] = True
    return node, cand


def _dtype(dtype: Any, g: _Graphs, caller: str) -> Any:
    """Storage dtype in the input's library: float32 unless float64 is asked for."""
    name = "float32" if dtype is None else str(dtype).replace("torch.", "")
    if name not in ("float32", "float64"):
        raise ValueError(
            f"The 'dtype' parameter of {caller} must be 'float32' or 'float64' (or the numpy / "
            f"torch dtype). Got {dtype!r} instead."
        )
    if g.torch:
        return getattr(backend._torch(), name)
    return np.dtype(name)


def _check_budget(g: _Graphs, itemsize: int, max_bytes: int | None, caller: str) -> None:
    limit = _problem.DENSE_MAX_BYTES if max_bytes is None else max_bytes
    need = _problem.dense_nbytes(g.batch, g.g1.nmax, g.g2.nmax, itemsize)
    if need > limit:
        raise MemoryError(
            f"{caller}: a dense K for batch={g.batch}, n1max={g.g1.nmax}, n2max={g.g2.nmax} "
            f"needs {need:,} bytes, more than the limit of {limit:,} bytes (max_bytes / "
            "QAPFUSE_DENSE_MAX_BYTES). Use format='sparse' (stores only the edge pairs) or "
            "format='operator' (never builds K)."
        )


def _node_matrix(g: _Graphs, kn: Kernel, caller: str) -> Array:
    """Node affinities (b, n1max, n2max) float64, zero outside each instance's valid block."""
    b = g.batch
    F1, F2 = g.g1.node, g.g2.node
    if g.torch:
        torch = backend._torch()
        out = torch.zeros((b, g.g1.nmax, g.g2.nmax), dtype=torch.float64, device=F1.device)
        for k in range(b):
            m1, m2 = int(g.g1.n[k]), int(g.g2.n[k])
            out[k, :m1, :m2] = _torch_pairwise(F1[k, :m1], F2[k, :m2], kn, caller, "node_aff")
        return out
    out = np.zeros((b, g.g1.nmax, g.g2.nmax), dtype=np.float64)
    pairwise = _numba_kernels(kn, caller, "node_aff")[0]
    for k in range(b):
        m1, m2 = int(g.g1.n[k]), int(g.g2.n[k])
        block = np.empty((m1, m2), dtype=np.float64)
        pairwise(
            block,
            np.ascontiguousarray(F1[k, :m1]),
            np.ascontiguousarray(F2[k, :m2]),
            kn.kind,
            kn.sigma,
        )
        out[k, :m1, :m2] = block
    return out


def _numba_kernels(kern: Kernel, caller: str, name: str) -> tuple[Any, Any, Any, Any]:
    if kern.name != "custom":
        k = _kernels
        return k.pairwise, k.dense_fill, k.sparse_fill, k.sparse_count
    if kern.numba_fn is None:
        raise TypeError(
            f"The {name!r} kernel of {caller} has no Numba function for numpy inputs; pass "
            "custom_kernel(numba_fn=...)."
        )
    key = (id(kern.numba_fn), kern.parallel)
    cached = _CUSTOM.get(key)
    if cached is None or cached[0] is not kern.numba_fn:
        cached = (kern.numba_fn, _kernels.custom_kernels(kern.numba_fn, kern.parallel))
        _CUSTOM[key] = cached
    return cached[1]


_CUSTOM: dict[tuple[int, bool], tuple[Any, tuple[Any, Any, Any, Any]]] = {}


def _torch_pairwise(F1: Any, F2: Any, kern: Kernel, caller: str, name: str) -> Any:
    """``(m1, m2)`` kernel values of the rows of F1 and F2 (torch, float64)."""
    torch = backend._torch()
    if kern.name == "inner_product":
        return F1 @ F2.T
    if kern.name == "gaussian":
        if F1.shape[0] * F2.shape[0] * max(F1.shape[1], 1) <= 2**24:
            d2 = ((F1[:, None, :] - F2[None, :, :]) ** 2).sum(-1)
        else:  # ||x||^2 + ||y||^2 - 2 <x, y> without the (m1, m2, d) temporary
            d2 = (F1 * F1).sum(1)[:, None] + (F2 * F2).sum(1)[None, :] - 2.0 * (F1 @ F2.T)
            d2 = torch.clamp_min(d2, 0.0)
        return torch.exp(-d2 / kern.sigma)
    if kern.torch_fn is None:
        raise TypeError(
            f"The {name!r} kernel of {caller} has no torch function for torch inputs; pass "
            "custom_kernel(torch_fn=...)."
        )
    out = kern.torch_fn(F1, F2)
    if tuple(out.shape) != (F1.shape[0], F2.shape[0]):
        raise ValueError(
            f"The torch_fn of the {name!r} kernel of {caller} must return shape "
            f"({F1.shape[0]}, {F2.shape[0]}); got {tuple(out.shape)}."
        )
    return out.to(torch.float64)


def _adjacency(conn: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``ptr`` (nmax + 1) and ``nbr`` of edges already sorted by (start, end)."""
    counts = np.bincount(conn[:, 0], minlength=nmax) if conn.shape[0] else np.zeros(nmax, int)
    ptr = np.zeros(nmax + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, np.ascontiguousarray(conn[:, 1], dtype=np.int64)


def _instance_numpy(g: _Graphs, k: int) -> tuple[Any, ...]:
    sides = []
    for s in (g.g1, g.g2):
        if g.has_edge and s.conn[k].shape[0]:
            ptr, nbr = _adjacency(s.conn[k], s.nmax)
            F = np.ascontiguousarray(s.feat[k], dtype=np.float64)
        else:
            d = s.feat[k].shape[1] if g.has_edge else 1
            ptr, nbr = np.zeros(s.nmax + 1, np.int64), np.zeros(0, np.int64)
            F = np.zeros((0, d), np.float64)
        sides.append((ptr, nbr, F))
    return sides[0] + sides[1]


def _build(
    g: _Graphs,
    kn: Kernel,
    ke: Kernel,
    format: str,
    dt: Any,
    max_bytes: int | None,
    caller: str,
    threshold: float = 0.0,
    cand: np.ndarray | None = None,
    node: Any = None,
) -> Any:
    """Build K; `cand` (b, n1max, n2max) bool restricts it to candidate pairs (sparse numpy),
    `node` passes node affinities already computed."""
    n1max, n2max = g.g1.nmax, g.g2.nmax
    N = n1max * n2max
    if format == "dense":
        itemsize = 4 if str(dt).endswith("32") else 8
        _check_budget(g, itemsize, max_bytes, caller)
    if node is None and g.has_node:
        node = _node_matrix(g, kn, caller)
    if g.torch:
        return _build_torch(g, node, ke, format, dt, caller, threshold)
    ek = ke if g.has_edge else Kernel("inner_product")  # no edges: only the node diagonal
    _, dense_fill, sparse_fill, sparse_count = _numba_kernels(ek, caller, "edge_aff")
    thr = float(threshold)
    # float32 storage: the Gaussian's exp in single precision (relative error ~1e-7)
    kind = 2 if ek.kind == 1 and np.dtype(dt) == np.float32 else ek.kind
    cut = ke.sigma * math.log(1.0 / thr) if thr > 0 else 0.0
    nd = np.zeros((1, 1, 1), np.float64) if node is None else node
    if format == "dense":
        out = np.zeros((g.batch, N, N), dtype=dt)
        for k in range(g.batch):
            p1, b1, F1, p2, b2, F2 = _instance_numpy(g, k)
            dense_fill(
                out[k],
                p1,
                b1,
                F1,
                p2,
                b2,
                F2,
                nd[min(k, nd.shape[0] - 1)],
                node is not None,
                int(g.g1.n[k]),
                int(g.g2.n[k]),
                n1max,
                kind,
                ke.sigma,
            )
        return out
    import scipy.sparse as sp

    cm = np.zeros((1, 1, 1), np.bool_) if cand is None else cand
    Ks = []
    for k in range(g.batch):
        p1, b1, F1, p2, b2, F2 = _instance_numpy(g, k)
        m1, m2 = int(g.g1.n[k]), int(g.g2.n[k])
        counts = np.zeros(N, dtype=np.int64)
        sparse_count(
            counts,
            p1,
            b1,
            F1,
            p2,
            b2,
            F2,
            node is not None,
            m1,
            m2,
            n1max,
            kind,
            ek.sigma,
            thr,
            cut,
            cm[min(k, cm.shape[0] - 1)],
            cand is not None,
        )
        nnz = int(counts.sum())
        idx_t = np.int32 if max(nnz, N) < 2**31 - 1 else np.int64
        indptr = np.zeros(N + 1, dtype=idx_t)
        np.cumsum(counts, out=indptr[1:])
        del counts
        indices = np.empty(nnz, dtype=idx_t)
        data = np.empty(nnz, dtype=dt)
        sparse_fill(
            indptr,
            indices,
            data,
            p1,
            b1,
            F1,
            p2,
            b2,
            F2,
            nd[min(k, nd.shape[0] - 1)],
            node is not None,
            m1,
            m2,
            n1max,
            kind,
            ek.sigma,
            thr,
            cut,
            cm[min(k, cm.shape[0] - 1)],
            cand is not None,
        )
        K = sp.csr_matrix((data, indices, indptr), shape=(N, N), copy=False)
        K.has_sorted_indices = True  # columns come out sorted per row, no duplicates
        Ks.append(K)
    return Ks


def _build_torch(
    g: _Graphs, node: Any, ke: Kernel, format: str, dt: Any, caller: str, threshold: float = 0.0
) -> Any:
    """Vectorised torch construction (any device): index arithmetic and one scatter."""
    torch = backend._torch()
    n1max, n2max = g.g1.nmax, g.g2.nmax
    N = n1max * n2max
    dev = (g.g1.node if g.has_node else g.g1.conn[0]).device
    dense = []
    sparse = []
    for k in range(g.batch):
        rows = [torch.zeros(0, dtype=torch.int64, device=dev)]
        cols = [torch.zeros(0, dtype=torch.int64, device=dev)]
        vals = [torch.zeros(0, dtype=torch.float64, device=dev)]
        if g.has_edge and g.g1.conn[k].shape[0] and g.g2.conn[k].shape[0]:
            c1, c2 = g.g1.conn[k], g.g2.conn[k]
            E = _torch_pairwise(g.g1.feat[k], g.g2.feat[k], ke, caller, "edge_aff")
            r = c1[:, 0][:, None] + c2[:, 0][None, :] * n1max
            c = c1[:, 1][:, None] + c2[:, 1][None, :] * n1max
            r, c, v = r.reshape(-1), c.reshape(-1), E.reshape(-1)
            if threshold > 0:  # the same entries as the Numba path keeps
                keep = v.abs() >= threshold
                r, c, v = r[keep], c[keep], v[keep]
            if node is not None:  # node affinities overwrite self-loop pairs
                off = r != c
                r, c, v = r[off], c[off], v[off]
            rows.append(r)
            cols.append(c)
            vals.append(v)
        if node is not None:
            m1, m2 = int(g.g1.n[k]), int(g.g2.n[k])
            ii = torch.arange(m1, device=dev)[:, None].expand(m1, m2).reshape(-1)
            aa = torch.arange(m2, device=dev)[None, :].expand(m1, m2).reshape(-1)
            d = ii + aa * n1max
            rows.append(d)
            cols.append(d)
            vals.append(node[k, :m1, :m2].reshape(-1))
        r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals).to(dt)
        if format == "dense":
            K = torch.zeros((N, N), dtype=dt, device=dev)
            K[r, c] = v
            dense.append(K)
        else:
            K = torch.sparse_coo_tensor(
                torch.stack([r, c]), v, (N, N), check_invariants=False
            ).coalesce()
            sparse.append(K)
    return torch.stack(dense) if format == "dense" else sparse


def _symmetric_graphs(g: _Graphs) -> bool:
    """True if every edge has its reverse with the same features in both graphs (K = K^T)."""
    if not g.has_edge:
        return True
    xp = g.xp
    for s in (g.g1, g.g2):
        for c, f in zip(s.conn, s.feat):
            if c.shape[0] == 0:
                continue
            rev = xp.stack([c[:, 1], c[:, 0]], axis=1)
            rc, rf = _dedupe(rev, f, s.nmax, xp=xp)
            if c.shape != rc.shape or not bool(xp.all(rc == c)) or not bool(xp.all(rf == f)):
                return False
    return True
