"""The one graduated-assignment loop: an annealed, damped fixed point over assignment blocks.

Every annealing solver in qapfuse (``ga``, the outlier solvers, the multi-graph universe
annealing, the network QAP of model fusion) is this loop with its own gradient and its own
projection (a Sinkhorn of ``G / tau``, with or without slack, dense or on a support):

.. code-block:: text

    for tau in schedule:                       # tau0, tau0*decay, ..., down to tau_min
        repeat at most max_inner times:
            P = project(gradient(X), tau)      # e.g. sinkhorn(G / tau), warm-started
            X_new = step * P + (1 - step) * X  # damped (step = 1: the classic update)
            stop the stage when max |X_new - X| < tol

``X`` is one array or a sequence of arrays (blocks of assignment variables, each with its own
shape): damping and the change are taken block by block, the change being the largest over
all blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import backend

__all__ = ["AnnealResult", "Schedule", "anneal"]


@dataclass(frozen=True)
class Schedule:
    """A graduated-assignment schedule: temperatures ``tau0 * decay**k`` down to `tau_min`.

    Parameters
    ----------
    tau0, tau_min : float > 0
        First and last temperature (``tau_min <= tau0``).
    decay : float in (0, 1)
        Temperature factor between stages.
    max_inner : int >= 1
        Fixed-point iterations per temperature.
    tol : float > 0
        Largest entry change that ends a temperature stage.
    step : float in (0, 1]
        Damping of the fixed-point update (``1``: the classic, undamped update).
    """

    tau0: float
    tau_min: float
    decay: float
    max_inner: int
    tol: float
    step: float = 1.0

    @property
    def stages(self) -> int:
        """Number of temperatures: the largest ``k + 1`` with ``tau0 * decay**k >= tau_min``."""
        ratio = math.log(self.tau_min / self.tau0) / math.log(self.decay)
        return max(1, math.floor(ratio + 1e-9) + 1)

    def temperatures(self) -> list[float]:
        """The temperatures, hottest first (``stages`` of them)."""
        return [self.tau0 * self.decay**k for k in range(self.stages)]


@dataclass
class AnnealResult:
    """What :func:`anneal` returns.

    Attributes
    ----------
    X : array or list of arrays
        The last soft iterate, in the shape `X0` was given (one array or a list of blocks).
    n_iter : int
        Fixed-point iterations done (over all stages).
    change : float
        Largest entry change of the last iteration.
    converged : bool
        The last stage that ran met `tol` (False also when stopped by the deadline).
    stopped : str
        ``"done"`` (every stage ran) or ``"time_limit"`` (the deadline passed).
    history : list of dict
        One entry per stage: ``tau``, ``inner`` (iterations), ``change`` and, when a `score`
        was given, ``score`` of the stage's last iterate.
    """

    X: Any
    n_iter: int
    change: float
    converged: bool
    stopped: str
    history: list[dict[str, Any]] = field(default_factory=list)


def anneal(
    gradient: Callable[[Any], Any],
    project: Callable[[Any, float], Any],
    X0: Any,
    schedule: Schedule,
    *,
    deadline: float | None = None,
    score: Callable[[Any], float] | None = None,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> AnnealResult:
    """Run graduated assignment: ``X <- step * project(gradient(X), tau) + (1 - step) * X``.

    Parameters
    ----------
    gradient : callable
        ``gradient(X) -> G``, the same structure as ``X`` (one array or a list of blocks).
    project : callable
        ``project(G, tau) -> P``, the same structure: the soft assignment at temperature
        ``tau`` (the caller keeps any warm-start state inside it).
    X0 : array or sequence of arrays
        Start (one block, or several blocks of any shapes).
    schedule : Schedule
        Temperatures, iterations per stage, tolerance and damping.
    deadline : float, optional
        A ``time.perf_counter()`` value; the loop stops after the first iteration that ends
        past it (the iterate is kept, ``stopped == "time_limit"``).
    score : callable, optional
        ``score(X) -> float``, recorded in ``history`` once per stage.
    on_stage : callable, optional
        Called with each stage's history entry as it ends (progress output).

    Returns
    -------
    AnnealResult
    """
    blocks = isinstance(X0, (list, tuple))
    X: list[Any] = list(X0) if blocks else [X0]
    step = schedule.step
    n_iter, change, history, stopped = 0, math.inf, [], "done"
    last_ok = False
    for tau in schedule.temperatures():
        inner = 0
        for inner in range(1, schedule.max_inner + 1):
            G = gradient(X if blocks else X[0])
            P = project(G, tau)
            P = list(P) if blocks else [P]
            if step != 1.0:
                P = [step * p + (1.0 - step) * x for p, x in zip(P, X)]
            change = max((_max_abs_diff(p, x) for p, x in zip(P, X)), default=0.0)
            X = P
            n_iter += 1
            if change < schedule.tol:
                break
            if deadline is not None and time.perf_counter() > deadline:
                break
        last_ok = change < schedule.tol
        entry: dict[str, Any] = {"tau": tau, "inner": inner, "change": change}
        if score is not None:
            entry["score"] = score(X if blocks else X[0])
        history.append(entry)
        if on_stage is not None:
            on_stage(entry)
        if deadline is not None and time.perf_counter() > deadline:
            stopped = "time_limit"
            break
    converged = last_ok and stopped == "done"
    return AnnealResult(
        X=X if blocks else X[0],
        n_iter=n_iter,
        change=change,
        converged=converged,
        stopped=stopped,
        history=history,
    )


def _max_abs_diff(a: Any, b: Any) -> float:
    """``max |a - b|`` as a Python float, for numpy or any array-API array (0 when empty)."""
    if math.prod(a.shape) == 0:
        return 0.0
    if isinstance(a, np.ndarray):  # the common case, without the namespace lookup
        return float(np.max(np.abs(a - b)))
    xp = backend.namespace_of(a)
    return float(xp.max(xp.abs(a - b)))
