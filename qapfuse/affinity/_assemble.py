r"""Assemble ``K`` from checked graphs: Numba kernels for numpy, vectorised torch for torch.

The inputs are :class:`~qapfuse.affinity._inputs.CheckedGraphs` and options already checked by
:mod:`qapfuse.affinity._inputs`. Numpy inputs go through the compiled kernels of
:mod:`qapfuse.affinity._numba_kernels` (imported, and so compiled or loaded from Numba's disk
cache, on the first numpy build only); torch inputs through index arithmetic and one scatter
per instance, on the input's device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend
from ..backend import Array
from ._inputs import CheckedGraphs
from ._kernel import Kernel

__all__ = ["assemble", "candidate_mask", "node_matrix"]


def candidate_mask(g: CheckedGraphs, node: np.ndarray, k: int) -> np.ndarray:
    """Candidate pairs ``(b, n1max, n2max)`` (bool) from node affinities ``node`` (numpy).

    A pair ``(i, a)`` is a candidate if ``a`` is among the `k` nodes with the highest node
    affinity to ``i`` or ``i`` among the `k` highest of ``a`` (ties broken arbitrarily).
    """
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
    return cand


def node_matrix(g: CheckedGraphs, kn: Kernel, caller: str) -> Array:
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
    pairwise = _compiled_kernels(kn, caller, "node_aff")[0]
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


def _compiled_kernels(kern: Kernel, caller: str, name: str) -> tuple[Any, Any, Any, Any]:
    """``(pairwise, dense_fill, sparse_fill, sparse_count)`` for `kern` (numpy inputs)."""
    from . import _numba_kernels as nk  # imports Numba: on the first numpy build only

    if kern.name != "custom":
        return nk.pairwise, nk.dense_fill, nk.sparse_fill, nk.sparse_count
    if kern.numba_fn is None:
        raise TypeError(
            f"The {name!r} kernel of {caller} has no Numba function for numpy inputs; pass "
            "custom_kernel(numba_fn=...)."
        )
    key = (id(kern.numba_fn), kern.parallel)
    cached = _CUSTOM.get(key)
    if cached is None or cached[0] is not kern.numba_fn:
        cached = (kern.numba_fn, nk.custom_kernels(kern.numba_fn, kern.parallel))
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


def _instance_numpy(g: CheckedGraphs, k: int) -> tuple[Any, ...]:
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


def assemble(
    g: CheckedGraphs,
    node: Array | None,
    ke: Kernel,
    format: str,
    dt: Any,
    caller: str,
    *,
    threshold: float = 0.0,
    cand: np.ndarray | None = None,
) -> Any:
    """``K`` of every instance: a ``(b, N, N)`` array, or a list of ``b`` sparse matrices.

    Parameters
    ----------
    g : CheckedGraphs
    node : array of shape (b, n1max, n2max), float64, or None
        Node affinities (:func:`node_matrix`), None without node features.
    ke : Kernel
        Edge kernel.
    format : {"dense", "sparse"}
        Sparse: scipy CSR (numpy input) or coalesced torch COO (torch input).
    dt : numpy or torch dtype
        Storage type (float32 or float64).
    caller : str
        Name used in error messages.
    threshold : float >= 0
        Sparse only: drop edge-pair entries with ``|k| < threshold``.
    cand : bool array of shape (b, n1max, n2max), optional
        Sparse numpy only: build rows and columns of candidate pairs only.
    """
    if g.torch:
        return _assemble_torch(g, node, ke, format, dt, caller, threshold)
    return _assemble_numpy(g, node, ke, format, dt, caller, threshold, cand)


def _assemble_numpy(
    g: CheckedGraphs,
    node: np.ndarray | None,
    ke: Kernel,
    format: str,
    dt: Any,
    caller: str,
    threshold: float,
    cand: np.ndarray | None,
) -> Any:
    """Numba construction: one row-parallel pass (dense), or count then fill (CSR)."""
    from scipy.sparse import csr_matrix

    n1max, n2max = g.g1.nmax, g.g2.nmax
    N = n1max * n2max
    ek = ke if g.has_edge else Kernel("inner_product")  # no edges: only the node diagonal
    _, dense_fill, sparse_fill, sparse_count = _compiled_kernels(ek, caller, "edge_aff")
    thr = float(threshold)
    # float32 storage: the Gaussian's exp in single precision (relative error ~1e-7)
    kind = 2 if ek.kind == 1 and np.dtype(dt) == np.float32 else ek.kind
    cut = ke.sigma * math.log(1.0 / thr) if thr > 0 else 0.0
    nd = np.zeros((1, 1, 1), np.float64) if node is None else node
    cm = np.zeros((1, 1, 1), np.bool_) if cand is None else cand
    out = np.zeros((g.batch, N, N), dtype=dt) if format == "dense" else []
    for k in range(g.batch):
        # arguments every kernel takes: both graphs; the node term, sizes and edge kernel
        graphs = _instance_numpy(g, k)
        node_k = nd[min(k, nd.shape[0] - 1)]
        common = (node is not None, int(g.g1.n[k]), int(g.g2.n[k]), n1max, kind, ek.sigma)
        if format == "dense":
            dense_fill(out[k], *graphs, node_k, *common)
            continue
        keep = (thr, cut, cm[min(k, cm.shape[0] - 1)], cand is not None)
        counts = np.zeros(N, dtype=np.int64)
        sparse_count(counts, *graphs, *common, *keep)
        nnz = int(counts.sum())
        idx_t = np.int32 if max(nnz, N) < 2**31 - 1 else np.int64
        indptr = np.zeros(N + 1, dtype=idx_t)
        np.cumsum(counts, out=indptr[1:])
        del counts
        indices = np.empty(nnz, dtype=idx_t)
        data = np.empty(nnz, dtype=dt)
        sparse_fill(indptr, indices, data, *graphs, node_k, *common, *keep)
        K = csr_matrix((data, indices, indptr), shape=(N, N), copy=False)
        K.has_sorted_indices = True  # columns come out sorted per row, no duplicates
        out.append(K)
    return out


def _assemble_torch(
    g: CheckedGraphs, node: Any, ke: Kernel, format: str, dt: Any, caller: str, threshold: float
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
