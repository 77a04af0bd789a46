"""Numba kernels behind :mod:`qapfuse.affinity` (private: validated, C-contiguous input only).

Every kernel works on one graph pair. A graph is given in *sorted adjacency* form: ``ptr``
(``n + 1``), ``nbr`` (end node of each edge, sorted within each start node) and the edge
features ``F`` (``|E| x d``, float64) in the same order. Row ``r = i + a*n1max`` of ``K``
(pair ``(i, a)``, column-major ``vec``) holds ``kernel(F1[e_ij], F2[e_ab])`` at column
``j + b*n1max`` for every edge ``i -> j`` of graph 1 and ``a -> b`` of graph 2, and the node
affinity ``node[i, a]`` on the diagonal. Rows are independent, so ``prange`` runs over them
and each non-zero is written exactly once.

Built-in kernels are chosen by ``kind`` (0: inner product, 1: Gaussian ``exp(-||x-y||^2 /
sigma)``, 2: the Gaussian with a single-precision ``exp`` for float32 storage) and are cached
on disk. A user kernel gets its own compiled copy of the same code (see
:func:`custom_kernels`), which Numba cannot cache. Importing this module imports Numba but
compiles nothing: a kernel is compiled, or loaded from Numba's cache, on its first call.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numba as nb
import numpy as np

INNER, GAUSSIAN, GAUSSIAN32 = 0, 1, 2


@nb.njit(cache=True, inline="always")
def _pair(A: Any, i: int, B: Any, j: int, kind: int, sigma: float) -> float:  # pragma: no cover
    """``kernel(A[i], B[j])`` without making row views (faster in the inner loops)."""
    s = 0.0
    if kind == INNER:
        for d in range(A.shape[1]):
            s += A[i, d] * B[j, d]
        return s
    for d in range(A.shape[1]):
        t = A[i, d] - B[j, d]
        s += t * t
    if kind == GAUSSIAN32:  # float32 storage: single-precision exp, about twice as fast
        return np.float64(np.exp(np.float32(-s / sigma)))
    return np.exp(-s / sigma)


def _pairwise_py(out, A, B, kind, sigma):  # pragma: no cover - jitted
    """``out[i, a] = kernel(A[i], B[a])`` for the leading ``len(A) x len(B)`` block."""
    m1, m2 = A.shape[0], B.shape[0]
    for i in nb.prange(m1):
        for a in range(m2):
            out[i, a] = _pair(A, i, B, a, kind, sigma)


def _dense_fill_py(
    out, ptr1, nbr1, F1, ptr2, nbr2, F2, node, has_node, n1, n2, n1max, kind, sigma
):  # pragma: no cover - jitted
    """Write the edge-pair and node entries of one instance into a zeroed (N, N) ``out``."""
    for q in nb.prange(n1 * n2):
        a = q // n1
        i = q - a * n1
        r = i + a * n1max
        for eb in range(ptr2[a], ptr2[a + 1]):
            cb = nbr2[eb] * n1max
            for ej in range(ptr1[i], ptr1[i + 1]):
                out[r, nbr1[ej] + cb] = _pair(F1, ej, F2, eb, kind, sigma)
        if has_node:
            out[r, r] = node[i, a]


def _sparse_count_py(
    counts,
    ptr1,
    nbr1,
    F1,
    ptr2,
    nbr2,
    F2,
    has_node,
    n1,
    n2,
    n1max,
    kind,
    sigma,
    thr,
    cut,
    cand,
    use_cand,
):  # pragma: no cover - jitted
    """Non-zeros per row of one instance (``counts`` has ``n1max*n2max`` zeroed entries).

    With ``thr > 0`` edge entries with ``|k| < thr`` are left out (for the Gaussian kernel
    without an ``exp``: ``||f - g||^2 >= cut = sigma * log(1 / thr)``). With ``use_cand``
    only candidate pairs (``cand[i, a]`` true, shape (n1max, n2max)) get a row, and an edge
    pair ``(i -> j, a -> b)`` is kept only if ``(j, b)`` is a candidate too.
    """
    for q in nb.prange(n1 * n2):
        a = q // n1
        i = q - a * n1
        r = i + a * n1max
        if use_cand and not cand[i, a]:
            counts[r] = 0
            continue
        if thr <= 0.0 and not use_cand:
            c = (ptr1[i + 1] - ptr1[i]) * (ptr2[a + 1] - ptr2[a])
            if has_node and not (_has_edge(ptr1, nbr1, i, i) and _has_edge(ptr2, nbr2, a, a)):
                c += 1
        else:
            c = 1 if has_node else 0
            for eb in range(ptr2[a], ptr2[a + 1]):
                cb = nbr2[eb] * n1max
                for ej in range(ptr1[i], ptr1[i + 1]):
                    if has_node and nbr1[ej] + cb == r:
                        continue
                    if use_cand and not cand[nbr1[ej], nbr2[eb]]:
                        continue
                    if thr <= 0.0:
                        keep = True
                    elif kind == GAUSSIAN or kind == GAUSSIAN32:
                        keep = _sqdist(F1, ej, F2, eb) < cut
                    else:
                        keep = abs(_pair(F1, ej, F2, eb, kind, sigma)) >= thr
                    if keep:
                        c += 1
        counts[r] = c


@nb.njit(cache=True, inline="always")
def _sqdist(A: Any, i: int, B: Any, j: int) -> float:  # pragma: no cover - jitted
    s = 0.0
    for d in range(A.shape[1]):
        t = A[i, d] - B[j, d]
        s += t * t
    return s


@nb.njit(cache=True, inline="always")
def _has_edge(ptr: Any, nbr: Any, i: int, j: int) -> bool:  # pragma: no cover - jitted
    for e in range(ptr[i], ptr[i + 1]):
        if nbr[e] == j:
            return True
    return False


def _sparse_fill_py(
    indptr,
    indices,
    data,
    ptr1,
    nbr1,
    F1,
    ptr2,
    nbr2,
    F2,
    node,
    has_node,
    n1,
    n2,
    n1max,
    kind,
    sigma,
    thr,
    cut,
    cand,
    use_cand,
):  # pragma: no cover - jitted
    """Fill CSR ``indices``/``data`` of one instance; columns come out sorted per row.

    Keeps the same entries as :func:`_sparse_count_py` with the same ``thr``/``cut`` and
    candidates.
    """
    for q in nb.prange(n1 * n2):
        a = q // n1
        i = q - a * n1
        r = i + a * n1max
        if use_cand and not cand[i, a]:
            continue
        pos = indptr[r]
        pending = has_node
        for eb in range(ptr2[a], ptr2[a + 1]):
            cb = nbr2[eb] * n1max
            for ej in range(ptr1[i], ptr1[i + 1]):
                c = nbr1[ej] + cb
                if has_node and c == r:  # the node affinity replaces a self-loop pair
                    indices[pos] = r
                    data[pos] = node[i, a]
                    pos += 1
                    pending = False
                    continue
                if use_cand and not cand[nbr1[ej], nbr2[eb]]:
                    continue
                if pending and c > r:
                    indices[pos] = r
                    data[pos] = node[i, a]
                    pos += 1
                    pending = False
                if thr > 0.0:
                    if kind == GAUSSIAN or kind == GAUSSIAN32:
                        if _sqdist(F1, ej, F2, eb) >= cut:
                            continue
                        v = _pair(F1, ej, F2, eb, kind, sigma)
                    else:
                        v = _pair(F1, ej, F2, eb, kind, sigma)
                        if abs(v) < thr:
                            continue
                else:
                    v = _pair(F1, ej, F2, eb, kind, sigma)
                indices[pos] = c
                data[pos] = v
                pos += 1
        if pending:
            indices[pos] = r
            data[pos] = node[i, a]


pairwise = nb.njit(parallel=True, cache=True)(_pairwise_py)
dense_fill = nb.njit(parallel=True, cache=True)(_dense_fill_py)
sparse_fill = nb.njit(parallel=True, cache=True)(_sparse_fill_py)
sparse_count = nb.njit(parallel=True, cache=True)(_sparse_count_py)


def custom_kernels(fn: Callable[..., float], parallel: bool = True) -> tuple[Any, Any, Any, Any]:
    """``(pairwise, dense_fill, sparse_fill, sparse_count)`` compiled around ``fn(x, y)``.

    The kernels are the built-in ones with ``_pair`` bound to ``fn`` (``kind`` and
    ``sigma`` are ignored). They are compiled on first use and are not cached on disk.
    """

    @nb.njit(inline="always")
    def pair(A, i, B, j, kind, sigma):  # pragma: no cover - jitted
        return fn(A[i], B[j])

    out = []
    for py in (_pairwise_py, _dense_fill_py, _sparse_fill_py, _sparse_count_py):
        g = dict(py.__globals__)
        g["_pair"] = pair
        clone = types.FunctionType(py.__code__, g, py.__name__, py.__defaults__, py.__closure__)
        out.append(nb.njit(parallel=parallel)(clone))
    return out[0], out[1], out[2], out[3]
