"""Pairwise starts: solve graph pairs with a two-graph solver and lay them out as blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ... import backend
from ...backend import Array
from ...problem import Problem
from ..result import MatchResult
from ._objective import _Group


def _pair_indices(m: int) -> tuple[np.ndarray, np.ndarray]:
    pi, pj = np.triu_indices(m, 1)
    return pi.astype(np.int64), pj.astype(np.int64)


def _pairwise_solver(method: str) -> Any:
    from .._ga import ga
    from .._rrwm import rrwm

    return {"rrwm": rrwm, "ga": ga}[method]


def _pairwise_kb(
    A: Array,
    Wbar: Array | None,
    ns: np.ndarray,
    w: float,
    method: str,
    *,
    pairs: str = "all",
    tabu_per_node: int = 0,
    rng: Any = None,
    xp: Any,
) -> Array:
    """Solve the pairs of the KB form (all ``i < j``, or a star around the largest graph).

    With ``tabu_per_node > 0`` the answers are then polished (:func:`_polish_pairs`).
    Returns blocks (m, m, n, n) with ``X_ji = X_ij^T`` and zeros for pairs not solved.
    """
    m, n = A.shape[0], A.shape[1]
    if pairs == "star":
        ref = int(np.argmax(ns))
        others = np.array([i for i in range(m) if i != ref], dtype=np.int64)
        pi, pj = np.full(m - 1, ref, dtype=np.int64), others
    else:
        pi, pj = _pair_indices(m)
    swap = ns[pi] > ns[pj]
    a, b = np.where(swap, pj, pi), np.where(swap, pi, pj)
    dev = backend.device(A)

    def pair_problems(k: np.ndarray) -> Problem:  # the pairs a[k], b[k] as one batch
        a_x = backend.asarray_on(a[k], xp=xp, device=dev)
        b_x = backend.asarray_on(b[k], xp=xp, device=dev)
        L = None
        if Wbar is not None:
            flat = xp.reshape(Wbar, (m * m, n, n))
            L = xp.take(flat, backend.asarray_on(a[k] * m + b[k], xp=xp, device=dev), axis=0)
        return Problem.koopmans_beckmann(
            w * xp.take(A, a_x, axis=0), xp.take(A, b_x, axis=0), L, n1=ns[a[k]], n2=ns[b[k]]
        )

    prob = pair_problems(np.arange(a.shape[0]))
    res = _pairwise_solver(method)(prob)
    X = res.X  # (P, n, n), X_ab
    if tabu_per_node > 0:
        X = _polish_pairs(prob, res, pair_problems, tabu_per_node * n, rng)
    Xt = xp.permute_dims(X, (0, 2, 1))
    sw = backend.asarray_on(swap[:, None, None], xp=xp, device=dev)
    X = xp.where(sw, Xt, X)  # X_ij for i < j
    return _scatter_pairs(X, pi, pj, m, xp=xp)


def _polish_pairs(
    prob: Problem,
    res: MatchResult,
    pair_problems: Callable[[np.ndarray], Problem],
    tabu_iter: int,
    rng: Any,
) -> Array:
    """2-opt on every pair's answer (`res`, a solver's result on the batch `prob`); robust tabu
    search (`tabu_iter`) where 2-opt improved it.

    A pairwise answer that 2-opt can improve was not even a local optimum: in the benchmark
    sets such pairs were wrong as a whole, while answers 2-opt left alone were right, so the
    (costly) tabu search goes only to the former. Exact answers (isomorphic graphs) are
    2-opt optima and pass through unchanged. ``pair_problems(k)`` builds pairs ``k`` of the
    batch `prob` as a batch of their own.
    """
    from .._local import tabu, two_opt

    polished = two_opt(prob, x0=res.X)
    X2 = polished.X
    before = np.asarray(res.score, dtype=np.float64)  # the solvers score their hard answers
    after = np.asarray(polished.score, dtype=np.float64)
    redo = np.nonzero(after > before + 1e-9 * np.maximum(1.0, np.abs(before)))[0]
    if redo.size == 0:
        return X2
    Xn = backend.to_numpy(X2).copy()
    gen = np.random.default_rng(0) if rng is None else backend.rng_from(rng)
    x0 = backend.from_numpy(Xn[redo], like=X2)
    Xn[redo] = backend.to_numpy(tabu(pair_problems(redo), x0=x0, max_iter=tabu_iter, rng=gen).X)
    return backend.from_numpy(Xn, like=X2)


def _pairwise_groups(
    groups: list[_Group], m: int, nrow: int, method: str, *, xp: Any, dtype: Any, device: Any
) -> Array:
    solver = _pairwise_solver(method)
    blocks = xp.zeros((m * m, nrow * nrow), dtype=dtype, device=device)
    for g in groups:
        prob = Problem(g.affinity, g.n_pi, g.n_pj, batched=True)
        X = solver(prob).X  # (P, r, c): X_IJ
        P = X.shape[0]
        X = _pad2(X, nrow, xp=xp)
        flat_ij = xp.reshape(X, (P, nrow * nrow))
        flat_ji = xp.reshape(xp.permute_dims(X, (0, 2, 1)), (P, nrow * nrow))
        E1 = np.zeros((m * m, P))
        E2 = np.zeros((m * m, P))
        E1[g.pi * m + g.pj, np.arange(P)] = 1.0
        E2[g.pj * m + g.pi, np.arange(P)] = 1.0
        E1x = xp.astype(backend.asarray_on(E1, xp=xp, device=device), dtype)
        E2x = xp.astype(backend.asarray_on(E2, xp=xp, device=device), dtype)
        blocks = blocks + xp.matmul(E1x, flat_ij) + xp.matmul(E2x, flat_ji)
    return xp.reshape(blocks, (m, m, nrow, nrow))


def _pad2(X: Array, r: int, *, xp: Any) -> Array:
    P, a, b = X.shape
    if a < r:
        X = xp.concat([X, xp.zeros((P, r - a, b), dtype=X.dtype, device=backend.device(X))], axis=1)
    if b < r:
        X = xp.concat([X, xp.zeros((P, r, r - b), dtype=X.dtype, device=backend.device(X))], axis=2)
    return X


def _scatter_pairs(X: Array, pi: np.ndarray, pj: np.ndarray, m: int, *, xp: Any) -> Array:
    """Pair matchings X_ij (P, r, r) for i < j -> blocks (m, m, r, r) with X_ji = X_ij^T."""
    P, r, _ = X.shape
    dev = backend.device(X)
    E1 = np.zeros((m * m, P))
    E2 = np.zeros((m * m, P))
    E1[pi * m + pj, np.arange(P)] = 1.0
    E2[pj * m + pi, np.arange(P)] = 1.0
    E1x = xp.astype(backend.asarray_on(E1, xp=xp, device=dev), X.dtype)
    E2x = xp.astype(backend.asarray_on(E2, xp=xp, device=dev), X.dtype)
    flat = xp.matmul(E1x, xp.reshape(X, (P, r * r))) + xp.matmul(
        E2x, xp.reshape(xp.permute_dims(X, (0, 2, 1)), (P, r * r))
    )
    return xp.reshape(flat, (m, m, r, r))
