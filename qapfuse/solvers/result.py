"""The result object every solver returns."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import backend
from ..backend import Array

__all__ = ["MatchResult", "make_result"]


@dataclass(frozen=True, kw_only=True, repr=False)
class MatchResult:
    """Outcome of a matching solver.

    Attributes
    ----------
    X : array of shape (n1, n2) or (b, n1max, n2max)
        Hard 0/1 matching (each row one 1, each column at most one), in the caller's array
        library, dtype and device. Padded rows/columns of a batch are zero.
    soft : array of the same shape, or None
        The last continuous iterate (doubly stochastic for Sinkhorn-based solvers), where the
        solver has one.
    score : float or numpy array of shape (b,)
        ``vec(X)^T K vec(X)``: what the solvers maximise.
    objective : float or numpy array of shape (b,)
        The value in the problem's own sense (``-score`` for ``sense="min"``, e.g. the QAPLIB
        cost).
    n_iter : int
        Iterations used (outer iterations; summed over restarts).
    converged : bool
        Whether the solver met its tolerance (local search: reached a local optimum) before its
        iteration or time limit.
    time : float
        Wall-clock seconds.
    info : mapping
        Solver-specific extras (e.g. ``"history"``, ``"restarts"``, ``"start"``). Iterative
        solvers say in ``"stopped"`` why they ended (``"time_limit"`` when their time limit
        cut them short).
    """

    X: Array
    soft: Array | None
    score: Any
    objective: Any
    n_iter: int
    converged: bool
    time: float
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def permutation(self) -> np.ndarray:
        """Column matched to each row, as numpy ints: shape (n1,) or (b, n1max); -1 if none."""
        X = backend.to_numpy(self.X)
        perm = np.argmax(X, axis=-1).astype(np.int64)
        return np.where(X.max(axis=-1) > 0.5, perm, -1)

    def __repr__(self) -> str:
        arr = f"<{type(self.X).__name__} {tuple(self.X.shape)}>"
        obj = (
            f"{self.objective:.6g}"
            if np.ndim(self.objective) == 0
            else f"<{np.shape(self.objective)[0]} values>"
        )
        return (
            f"MatchResult(X={arr}, objective={obj}, n_iter={self.n_iter}, "
            f"converged={self.converged}, time={self.time:.3g}s)"
        )


def make_result(
    problem: Any,
    X: Array,
    *,
    soft: Array | None,
    n_iter: int,
    converged: bool,
    start: float,
    score: Any = None,
    info: Mapping[str, Any] | None = None,
) -> MatchResult:
    """Build a :class:`MatchResult` from batched ``X`` (and ``soft``).

    `score` (shape (b,)) is used when the solver already knows it; otherwise ``X`` is scored
    on `problem`. Drops the batch axis when the problem is not batched. `start` is
    ``time.perf_counter()`` at the solver's entry.
    """
    X = problem.xp.astype(X, problem.dtype) if problem.dtype is not None else X
    if score is None:
        score = problem.score(X)
    score = np.asarray(backend.to_numpy(score), dtype=np.float64).reshape(problem.batch)
    objective = problem.objective_from_score(score)
    if not problem.batched:
        X = X[0, ...]
        soft = None if soft is None else soft[0, ...]
        score, objective = float(score[0]), float(objective[0])
    return MatchResult(
        X=X,
        soft=soft,
        score=score,
        objective=objective,
        n_iter=int(n_iter),
        converged=bool(converged),
        time=time.perf_counter() - start,
        info=dict(info or {}),
    )
