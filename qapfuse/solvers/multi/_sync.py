"""Spectral permutation synchronisation: :func:`synchronize` and its eigen/projection kernel."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ... import backend
from ...backend import Array
from ._inputs import _check_universe, _parse_pairs, _row_mask
from ._result import MultiMatchResult


def synchronize(
    X_pairs: Any,
    d: int | None = None,
    *,
    ns: Any = None,
) -> MultiMatchResult:
    r"""Spectral permutation synchronisation: the nearest cycle-consistent set of matchings.

    The pairwise matchings form a symmetric block matrix ``Z`` (block ``(i, j)`` is ``X_ij``,
    diagonal blocks identities). For consistent matchings ``Z = U U^T`` has rank ``d``; for
    noisy ones its top ``d`` eigenpairs ``V, Lambda`` give the best rank-``d`` fit
    ``Z ~ (V Lambda^{1/2}) (V Lambda^{1/2})^T`` (found by subspace iteration started from the
    largest graph's block column). The rows of ``V Lambda^{1/2}`` (node embeddings) of each
    graph are then projected to a universe matching by the Hungarian method against running
    centroids of the universe nodes (graphs taken from the largest down, then two
    leave-one-out refinement passes); a row far from every centroid (similarity below 1/2)
    opens a new universe node while any is free, so partial graphs work. Missing pairs (zero
    blocks in an array input) are tolerated by the algebra but not by the mapping input.

    Parameters
    ----------
    X_pairs : MultiMatchResult, array of shape (m, m, n, n), or mapping {(i, j): X_ij}
        Pairwise matchings (0/1 or soft), ``X_ij`` of shape ``(n_i, n_j)``. An array is read in
        pygmtools' layout (``cao``/``mgm_floyd`` output); ``X[i, j]`` and ``X[j, i].T`` are
        averaged. A mapping needs one entry per unordered pair (``(j, i)`` means ``X_ji``).
    d : int, optional
        Universe size, ``>= max(ns)``. Default ``max(ns)``.
    ns : array-like of int, shape (m,), optional
        Graph sizes for an array input. Default: all ``n`` (a mapping gives its own sizes).

    Returns
    -------
    MultiMatchResult
        Cycle-consistent ``U``; ``score`` is the agreement ``sum_{i<j} <X_ij, U_i U_j^T>`` with
        the input, and ``info["eigenvalues"]`` holds the top ``d`` eigenvalues (for consistent
        input: how many graphs hold each universe node).

    Notes
    -----
    The eigen-decomposition is dense (``O((sum n_i)^3)``) and runs in the input's library and
    device; the projection (``m`` small assignment problems) runs on the host. Input that is
    already consistent (0/1 matchings for every pair, agreeing around every cycle, every node
    matched to the largest graph) skips it: ``U`` is read off the largest graph's pairs and the
    eigenvalues are the universe nodes' counts, which is what the decomposition would give.

    References
    ----------
    .. [1] D. Pachauri, R. Kondor, V. Singh, "Solving the multi-way matching problem by
           permutation synchronization", NeurIPS 2013.
    .. [2] E. Maset, F. Arrigoni, A. Fusiello, "Practical and efficient multi-view matching",
           ICCV 2017.

    Examples
    --------
    Matchings of four graphs with one corrupted pair:

    >>> import numpy as np
    >>> from qapfuse.solvers.multi import synchronize, consistency
    >>> rng = np.random.default_rng(0)
    >>> P = [np.eye(5)[rng.permutation(5)] for _ in range(4)]
    >>> X = {(i, j): P[i] @ P[j].T for i in range(4) for j in range(i + 1, 4)}
    >>> X[(0, 1)] = X[(0, 1)][:, [1, 0, 2, 3, 4]]    # two nodes swapped
    >>> res = synchronize(X)
    >>> consistency(X), consistency(res)
    (0.5, 1.0)
    >>> bool((res[0, 1] == P[0] @ P[1].T).all())
    True
    """
    start = time.perf_counter()
    caller = "synchronize"
    Xb, ns_np, xp = _parse_pairs(X_pairs, ns, caller, soft_ok=True)
    d = _check_universe(ns_np, d, caller)
    U, evals = _sync_blocks(Xb, ns_np, d, xp=xp)
    score = 0.5 * float(xp.sum(_pair_blocks(U, xp=xp) * Xb * _off_diagonal(len(ns_np), Xb, xp=xp)))
    return MultiMatchResult(
        U=U,
        ns=ns_np,
        soft=None,
        score=score,
        n_iter=0,
        converged=True,
        time=time.perf_counter() - start,
        info={"eigenvalues": evals},
    )


def _sync_blocks(Xb: Array, ns: np.ndarray, d: int, *, xp: Any) -> tuple[Array, np.ndarray]:
    """Validated blocks (m, m, r, r) with zero padding -> hard U (m, r, d), top eigenvalues."""
    m, _, r, _ = Xb.shape
    U = _consistent_universe(Xb, ns, d, complete=True)
    if U is not None:  # already consistent: Z = U U^T exactly, its eigenvalues are U's counts
        counts = np.sort(U.sum(axis=(0, 1)))[::-1]
        return backend.from_numpy(U, like=Xb), counts
    N = m * r
    eye = xp.eye(r, dtype=Xb.dtype, device=backend.device(Xb))
    rows = backend.asarray_on(_row_mask(ns, r), xp=xp, device=backend.device(Xb))
    diag = xp.astype(rows[:, :, None] & rows[:, None, :], Xb.dtype) * eye[None, :, :]
    sel = backend.asarray_on(
        np.eye(m, dtype=bool)[:, :, None, None], xp=xp, device=backend.device(Xb)
    )
    B = xp.where(sel, diag[:, None, :, :], Xb)  # identity on the diagonal blocks
    Z = xp.reshape(xp.permute_dims(B, (0, 2, 1, 3)), (N, N))
    Z = 0.5 * (Z + xp.permute_dims(Z, (1, 0)))
    V, ev = _top_eigenvectors(Z, d, start_block=int(np.argmax(ns)), block=r, xp=xp)
    # rows of V sqrt(lambda) are node embeddings whose inner products fit Z (1: same universe
    # node); the weights silence directions with no support (d > the nodes any graph shares)
    emb = backend.to_numpy(V).astype(np.float64) * np.sqrt(np.maximum(ev, 0.0))[None, :]
    U = _project_universe(emb.reshape(m, r, d), ns, d)
    return backend.from_numpy(U, like=Xb), ev


def _consistent_universe(Xb: Array, ns: np.ndarray, d: int, *, complete: bool) -> np.ndarray | None:
    """Hard ``U`` (m, r, d) read off the largest graph's pairs, if every given pair agrees.

    The largest graph's nodes are the first universe nodes and graph ``i`` takes them through
    its matching with it (``U_i = X_i,ref U_ref``). Returned when the blocks are 0/1, every node
    is matched to the largest graph, and every non-zero block ``X_ij`` equals ``U_i U_j^T``
    (with `complete`, every pair must also be given); else None. For consistent input (or a
    star of pairs, which has no cycle to disagree on) this is the exact synchronisation.
    """
    X = backend.to_numpy(Xb).astype(np.float64)
    m, _, r, _ = X.shape
    if not np.all((X == 0) | (X == 1)):
        return None
    ref = int(np.argmax(ns))
    U = np.zeros((m, r, d))
    U[ref, np.arange(ns[ref]), np.arange(ns[ref])] = 1.0
    for i in range(m):
        if i != ref:
            U[i] = X[i, ref] @ U[ref]
            if not np.array_equal(U[i, : ns[i]].sum(axis=1), np.ones(ns[i])):
                return None
    for i in range(m):
        for j in range(i + 1, m):
            given = bool(X[i, j].any())
            if (complete and not given) or (given and not np.array_equal(X[i, j], U[i] @ U[j].T)):
                return None
    return U


def _top_eigenvectors(
    Z: Array, d: int, *, start_block: int, block: int, xp: Any, max_iter: int = 50
) -> tuple[Array, np.ndarray]:
    """Top-``d`` eigenvectors of the symmetric PSD-like ``Z`` (N, N) by subspace iteration.

    Starts from the block column of graph `start_block` (``Z[:, block]``, which already spans
    the answer for consistent input) padded with the next columns, orthonormalised by QR;
    stops when the Ritz values settle (relative change below 1e-10) or after `max_iter`.
    Returns ``V`` (N, d) and the Ritz values, largest first.
    """
    N = Z.shape[0]
    lo = start_block * block
    cols = np.concatenate([np.arange(lo, N), np.arange(0, lo)])[:d]
    V = xp.take(Z, backend.asarray_on(cols, xp=xp, device=backend.device(Z)), axis=1)
    # a tiny deterministic tilt keeps padded (all-zero) columns from making V rank-deficient
    tilt = np.cos(np.outer(np.arange(N) + 1.0, np.arange(d) + 1.0)) * 1e-3
    V = V + xp.astype(backend.asarray_on(tilt, xp=xp, device=backend.device(Z)), Z.dtype)
    V, _ = xp.linalg.qr(V)
    prev = None
    for _ in range(max_iter):
        V, _ = xp.linalg.qr(xp.matmul(Z, V))
        ritz = backend.to_numpy(xp.sum(V * xp.matmul(Z, V), axis=0)).astype(np.float64)
        if prev is not None and np.max(np.abs(ritz - prev)) <= 1e-8 * max(1.0, np.max(ritz)):
            break
        prev = ritz
    order = np.argsort(-ritz, kind="stable")
    V = xp.take(V, backend.asarray_on(order, xp=xp, device=backend.device(Z)), axis=1)
    return V, ritz[order]


def _project_universe(V: np.ndarray, ns: np.ndarray, d: int, threshold: float = 0.5) -> np.ndarray:
    """Rows ``V_i`` (m, r, k) of the top eigenvectors -> 0/1 universe matchings (m, r, d)."""
    m, r, k = V.shape
    order = np.argsort(-ns, kind="stable")
    C_sum = np.zeros((d, k))
    count = np.zeros(d)
    slots: list[np.ndarray | None] = [None] * m

    def assign(i: int) -> np.ndarray:
        Vi = V[i, : ns[i], :]
        C = C_sum / np.maximum(count, 1.0)[:, None]
        norm2 = np.einsum("ij,ij->i", C, C)
        S = (Vi @ C.T) / np.where(norm2 > 0, norm2, 1.0)[None, :]
        S[:, count == 0] = threshold
        rows, cols = linear_sum_assignment(S, maximize=True)
        out = np.empty(ns[i], dtype=np.int64)
        out[rows] = cols
        return out

    def add(i: int, sign: float) -> None:
        s = slots[i]
        np.add.at(C_sum, s, sign * V[i, : ns[i], :])
        np.add.at(count, s, sign)

    for i in order:
        slots[i] = assign(i)
        add(i, 1.0)
    for _ in range(2):  # leave-one-out refinement
        for i in order:
            add(i, -1.0)
            slots[i] = assign(i)
            add(i, 1.0)
    U = np.zeros((m, r, d))
    for i in range(m):
        U[i, np.arange(ns[i]), slots[i]] = 1.0
    return U


def _off_diagonal(m: int, like: Array, *, xp: Any) -> Array:
    off = ~np.eye(m, dtype=bool)[:, :, None, None]
    return xp.astype(backend.asarray_on(off, xp=xp, device=backend.device(like)), like.dtype)


def _pair_blocks(U: Array, *, xp: Any) -> Array:
    return xp.matmul(U[:, None, :, :], xp.permute_dims(U, (0, 2, 1))[None, :, :, :])
