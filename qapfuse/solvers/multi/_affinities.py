"""Parsing of the pairwise affinities of :func:`gamgm_affinity` into operator groups."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ... import backend
from ...problem import Affinity, DenseAffinity, Problem, SparseAffinity
from ._inputs import _check_sizes, _float, _pair_keys
from ._objective import _Group
from ._pairwise import _pair_indices


def _as_affinity(item: Any, key: tuple[int, int], caller: str) -> tuple[Affinity, int, int]:
    """One pair's affinity -> (operator with batch 1, n1, n2)."""
    if isinstance(item, Problem):
        if item.batch != 1:
            raise ValueError(
                f"The affinity of pair {key} in {caller} must be one instance; got a batch of "
                f"{item.batch}."
            )
        return item.affinity, int(item.n1[0]), int(item.n2[0])
    if isinstance(item, Affinity):
        if item.batch != 1:
            raise ValueError(
                f"The affinity of pair {key} in {caller} must be one instance; got a batch of "
                f"{item.batch}."
            )
        return item, item.n1max, item.n2max
    if backend.is_sparse(item):
        N = item.shape[0]
        return SparseAffinity(
            [_sparse_float(item)], *_square_sizes(N, key, caller)
        ), *_square_sizes(N, key, caller)
    try:
        xp = backend.namespace_of(item, name=f"K[{key}]")
    except TypeError:
        raise TypeError(
            f"The affinity of pair {key} in {caller} must be a Problem, an Affinity, a dense "
            f"array or a sparse matrix; got {type(item).__name__}."
        ) from None
    K = _float(xp.asarray(item), f"K[{key}]", caller, xp=xp)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(
            f"The affinity of pair {key} in {caller} must be a square (n_i n_j, n_i n_j) matrix; "
            f"got shape {tuple(K.shape)}."
        )
    n1, n2 = _square_sizes(K.shape[0], key, caller)
    return DenseAffinity(K[None, ...], n1, n2), n1, n2


def _sparse_float(M: Any) -> Any:
    if backend.is_torch_array(M):
        return M if M.dtype.is_floating_point else M.double()
    import scipy.sparse as sp

    M = sp.csr_matrix(M)
    return M if M.dtype.kind == "f" else M.astype(np.float64)


def _square_sizes(N: int, key: tuple[int, int], caller: str) -> tuple[int, int]:
    n = math.isqrt(N)
    if n * n != N:
        raise ValueError(
            f"The affinity of pair {key} in {caller} has {N} rows, not n*n; pass a Problem "
            "(with n1, n2) for graphs of different sizes."
        )
    return n, n


def _parse_affinities(
    K: Any, ns: Any, caller: str
) -> tuple[list[_Group], np.ndarray, Any, Any, Any]:
    if isinstance(K, Problem):
        P = K.batch
        m = (1 + math.isqrt(1 + 8 * P)) // 2
        if m < 2 or m * (m - 1) // 2 != P:
            raise ValueError(
                f"A batched Problem for {caller} must hold m (m - 1) / 2 pairs (0, 1), (0, 2), "
                f"...; got a batch of {P}, which is not such a number."
            )
        pi, pj = _pair_indices(m)
        g = _Group(K.affinity, pi, pj)
        g.n_pi, g.n_pj = K.n1.astype(np.int64), K.n2.astype(np.int64)
        groups = [g]
        xp, dtype, dev = K.xp, K.dtype, K.device
    elif isinstance(K, Mapping):
        groups, m, xp, dtype, dev = _groups_from_mapping(K, ns, caller)
    else:
        if backend.is_sparse(K) or not hasattr(K, "shape"):
            raise TypeError(
                f"`K` in {caller} must be a batched Problem, a mapping {{(i, j): K_ij}} or a dense "
                f"array of shape (m, m, n^2, n^2); got {type(K).__name__}."
            )
        xp = backend.namespace_of(K, name="K")
        K = _float(xp.asarray(K), "K", caller, xp=xp)
        if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[2] != K.shape[3]:
            raise ValueError(
                f"A dense `K` in {caller} must have shape (m, m, n^2, n^2); got {tuple(K.shape)}."
            )
        m = K.shape[0]
        n, _ = _square_sizes(K.shape[2], ("all", "all"), caller)
        if not bool(xp.all(xp.isfinite(K))):
            raise ValueError(f"`K` in {caller} contains NaN or Inf; clean or mask it first.")
        ns_np = _check_sizes(ns, m, n, caller)
        pi, pj = _pair_indices(m)
        swap = ns_np[pi] > ns_np[pj]
        a, b = np.where(swap, pj, pi), np.where(swap, pi, pj)
        dev = backend.device(K)
        flat = xp.reshape(K, (m * m, K.shape[2], K.shape[3]))
        Kp = xp.take(flat, backend.asarray_on(a * m + b, xp=xp, device=dev), axis=0)
        g = _Group(DenseAffinity(Kp, n, n), a, b)
        g.n_pi, g.n_pj = ns_np[a], ns_np[b]
        groups = [g]
        dtype = K.dtype
    if m < 2:
        raise ValueError(f"{caller} needs at least 2 graphs.")
    ns_np = _sizes_from_groups(groups, m, ns, caller)
    return groups, ns_np, xp, dtype, dev


def _groups_from_mapping(
    K: Mapping[Any, Any], ns: Any, caller: str
) -> tuple[list[_Group], int, Any, Any, Any]:
    keys, m = _pair_keys(K, "K", caller, "affinities")
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for key in keys:
        u = (min(key), max(key))
        if u in seen:
            raise ValueError(
                f"Pair {u} of `K` in {caller} is given twice (as {seen[u]} and {key}); give "
                "each unordered pair once."
            )
        seen[u] = key
    missing = [(i, j) for i in range(m) for j in range(i + 1, m) if (i, j) not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"`K` in {caller} must hold an affinity for every pair of the {m} graphs; missing "
            f"{', '.join(map(str, missing[:5]))}{more}."
        )
    groups = []
    xp = dtype = dev = None
    for u in sorted(seen):
        key = seen[u]
        aff, n1, n2 = _as_affinity(K[key], key, caller)
        if xp is None:
            xp, dtype, dev = aff.xp, aff.dtype, aff.device
        elif aff.xp is not xp:
            raise TypeError(f"All affinities of `K` in {caller} must be of one array library.")
        g = _Group(aff, np.array([key[0]]), np.array([key[1]]))
        g.n_pi, g.n_pj = np.array([n1]), np.array([n2])
        groups.append(g)
    return groups, m, xp, dtype, dev


def _sizes_from_groups(groups: list[_Group], m: int, ns: Any, caller: str) -> np.ndarray:
    found = np.full(m, -1, dtype=np.int64)
    for g in groups:
        for idx, nn in ((g.pi, g.n_pi), (g.pj, g.n_pj)):
            for k, i in enumerate(idx):
                pair = (int(g.pi[k]), int(g.pj[k]))
                if found[i] >= 0 and found[i] != nn[k]:
                    raise ValueError(
                        f"Graph {int(i)} has {found[i]} nodes in one pair of `K` in {caller} but "
                        f"{int(nn[k])} in pair {pair}; every affinity must fit its graphs' sizes."
                    )
                found[i] = nn[k]
    if ns is not None:
        given = _check_sizes(ns, m, int(found.max()) if found.max() > 0 else 1, caller)
        bad = np.nonzero(given != found)[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"`ns` in {caller} says graph {i} has {int(given[i])} nodes, but its affinities "
                f"are for {int(found[i])} nodes."
            )
    return found
