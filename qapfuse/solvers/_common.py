"""Pieces shared by the continuous solvers: checks, starts, projection, masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import backend
from ..backend import Array
from ..problem import DenseAffinity, Problem
from ._lap import _hungarian_np
from .result import MatchResult, make_result

__all__ = [
    "check_problem",
    "finish",
    "hard_projection",
    "hard_score",
    "initial_soft",
    "random_soft",
    "square_mask",
]


def check_problem(problem: Any, caller: str) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(
            f"The 'problem' parameter of {caller} must be a qapfuse.Problem (build one with "
            f"Problem.from_dense, Problem.koopmans_beckmann, ...). Got "
            f"{type(problem).__name__} instead."
        )
    return problem


def square_mask(problem: Problem) -> Array:
    """Bool (b, 1, 1): instances with ``n1 == n2`` (columns must sum to exactly 1)."""
    return backend.asarray_on(
        (problem.n1 == problem.n2)[:, None, None], xp=problem.xp, device=problem.device
    )


def uniform_soft(problem: Problem) -> Array:
    """``1 / n2`` on each instance's valid block, 0 on padding; shape (b, n1max, n2max)."""
    m = np.zeros((problem.batch, problem.n1max, problem.n2max))
    for k in range(problem.batch):
        if problem.n2[k]:
            m[k, : problem.n1[k], : problem.n2[k]] = 1.0 / problem.n2[k]
    return _like_problem(m, problem)


def _like_problem(a: np.ndarray, problem: Problem) -> Array:
    xp = problem.xp
    out = backend.asarray_on(a, xp=xp, device=problem.device)
    return xp.astype(out, problem.dtype) if problem.dtype is not None else out


def initial_soft(problem: Problem, x0: Any, caller: str) -> Array:
    """Validated start of shape (b, n1max, n2max): `x0` if given, else uniform."""
    if x0 is None:
        return uniform_soft(problem)
    xp = problem.xp
    try:
        xp_x0 = backend.namespace_of(x0, name="x0")
    except TypeError:
        xp_x0 = None
    if xp_x0 is not xp:
        raise TypeError(
            f"The 'x0' parameter of {caller} must be an array of the problem's library "
            f"({xp.__name__.split('.')[-1]}); got {type(x0).__name__}."
        )
    want = (problem.n1max, problem.n2max)
    given = tuple(x0.shape)  # reported as passed, without the batch axis added below
    if x0.ndim == 2 and problem.batch == 1:
        x0 = x0[None]
    if tuple(x0.shape) != (problem.batch, *want):
        expected = f"{want}" if problem.batch == 1 else f"{(problem.batch, *want)}"
        raise ValueError(
            f"The 'x0' parameter of {caller} must have shape {expected}. Got {given} instead."
        )
    if not bool(xp.all(xp.isfinite(x0))) or bool(xp.any(x0 < 0)):
        raise ValueError(f"The 'x0' parameter of {caller} must be finite and non-negative.")
    x0 = xp.astype(x0, problem.dtype) if problem.dtype is not None else x0
    return xp.where(problem.mask, x0, xp.zeros_like(x0))


def random_soft(problem: Problem, rng: np.random.Generator, *, mix: float = 0.5) -> Array:
    """A random start: uniform mixed with a random permutation matrix (per instance)."""
    m = np.zeros((problem.batch, problem.n1max, problem.n2max))
    for k in range(problem.batch):
        n1, n2 = int(problem.n1[k]), int(problem.n2[k])
        if n1 == 0:
            continue
        cols = rng.permutation(n2)[:n1]
        block = np.full((n1, n2), (1.0 - mix) / n2)
        block[np.arange(n1), cols] += mix
        m[k, :n1, :n2] = block
    return _like_problem(m, problem)


def kicked(problem: Problem, X: Array, rng: np.random.Generator) -> Array:
    """`X` (a 0/1 matching, batched or not) after random moves: a restart point for local search.

    Each instance gets ``max(2, n1 // 4)`` moves; a move gives row ``i`` a random column,
    swapping with the row that held it (or freeing the old column when the new one was free).
    """
    Xn = np.array(backend.to_numpy(X), dtype=np.float64)
    batched = Xn.ndim == 3
    Xb = Xn if batched else Xn[None]
    for k in range(Xb.shape[0]):
        n1, n2 = int(problem.n1[k]), int(problem.n2[k])
        if n1 < 2 and n1 == n2:
            continue
        cols = np.argmax(Xb[k, :n1, :n2], axis=1)
        for _ in range(max(2, n1 // 4)):
            i, a = int(rng.integers(n1)), int(rng.integers(n2))
            holder = np.nonzero(cols == a)[0]
            if holder.size:
                cols[holder[0]] = cols[i]
            cols[i] = a
        Xb[k] = 0.0
        Xb[k, np.arange(n1), cols] = 1.0
    return backend.from_numpy(Xb if batched else Xb[0], like=X)


def hard_projection(problem: Problem, S: Array) -> Array:
    """Hungarian on each valid block of scores `S` (b, n1max, n2max); 0/1 array like `S`."""
    X = _hungarian_np(backend.to_numpy(S).astype(np.float64), problem.n1, problem.n2)
    return backend.from_numpy(X, like=S)


def normalise(G: Array, *, xp: Any, mask: Array | None = None) -> Array:
    """Scale each instance of `G` (b, r, c) to unit size (an all-zero instance stays 0).

    Without `mask` the size is the largest absolute entry. With `mask` (bool, same shape) it
    is the range ``max - min`` over the valid entries, which a constant shift of ``G`` (a
    constant added to ``K``, e.g. a rescaled cost) does not change: Sinkhorn ignores such
    shifts, and so then does the temperature.
    """
    if mask is None:
        m = xp.max(xp.abs(G), axis=(1, 2), keepdims=True)
    else:
        hi = xp.max(xp.where(mask, G, xp.full_like(G, -xp.inf)), axis=(1, 2), keepdims=True)
        lo = xp.min(xp.where(mask, G, xp.full_like(G, xp.inf)), axis=(1, 2), keepdims=True)
        m = xp.where(hi > lo, hi - lo, xp.zeros_like(hi))
    return G / xp.where(m > 0, m, xp.ones_like(m))


def hard_score(problem: Problem, X: Array) -> np.ndarray:
    """``vec(X)^T K vec(X)`` per instance for a 0/1 matching `X` (b, n1max, n2max), float64.

    For a dense ``K`` only the ``n1 x n1`` block of matched pairs is read (a gather instead of
    a full pass over ``K``); other operators use :meth:`Problem.score`.
    """
    aff = problem.affinity
    if not isinstance(aff, DenseAffinity):
        return backend.to_numpy(problem.score(X)).astype(np.float64)
    xp = problem.xp
    Xn = backend.to_numpy(X)
    out = np.empty(problem.batch, dtype=np.float64)
    for k in range(problem.batch):
        rows, cols = np.nonzero(Xn[k])
        idx = backend.asarray_on(
            (rows + cols * problem.n1max).astype(np.int64), xp=xp, device=problem.device
        )
        block = xp.take(xp.take(aff.K[k, ...], idx, axis=0), idx, axis=1)
        out[k] = float(xp.sum(block))
    return out


def finish(
    problem: Problem,
    X: Array,
    *,
    soft: Array | None,
    n_iter: int,
    converged: bool,
    start: float,
    score: Any = None,
    info: Mapping[str, Any] | None = None,
) -> MatchResult:
    """:func:`~qapfuse.solvers.result.make_result` for a hard `X`, without a pass over ``K``.

    `score` (shape (b,)) is used when the solver already knows it; otherwise it comes from
    :func:`hard_score`.
    """
    X = problem.xp.astype(X, problem.dtype) if problem.dtype is not None else X
    return make_result(
        problem,
        X,
        soft=soft,
        n_iter=n_iter,
        converged=converged,
        start=start,
        score=hard_score(problem, X) if score is None else score,
        info=info,
    )
