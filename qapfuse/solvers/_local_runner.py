r"""The local-search runner: what :func:`~qapfuse.solvers.two_opt`, :func:`~qapfuse.solvers.tabu`
and the default pipeline (:func:`~qapfuse.solvers.auto`) share.

:class:`LocalSearch` converts a problem once (:mod:`qapfuse.solvers._local_instances`), turns
starts into permutations, runs 2-opt or robust tabu search over every instance and turns
permutations back into matchings. Time limits become ``time.perf_counter`` deadlines
(:func:`deadline_in`), shared evenly between instances or rounds by :func:`share_deadline`,
the one deadline helper; the drivers run the Numba kernels
(:mod:`qapfuse.solvers._local_kernels`) in chunks and check the clock between chunks, about
every 10 ms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..problem import DENSE_MAX_BYTES, Problem
from . import _local_instances
from ._local_instances import Instance, perms_from_hard, perms_to_X, start_perms
from ._local_kernels import (
    _DENSE,
    _OPT_LOCAL,
    _OPT_MOVES,
    _TABU_BEST,
    _TABU_BEST_IS_LOCAL,
    _TABU_IT,
    _initial_deltas,
    _tabu_chunk,
    _two_opt_best,
    _two_opt_first,
    new_tabu_state,
    new_two_opt_state,
)

#: Default tabu iterations per instance when neither ``max_iter`` nor ``time_limit`` is given:
#: ``TABU_ITER_PER_NODE * n``, capped at ``TABU_MAX_PAIR_UPDATES / n**2`` (an iteration costs
#: O(n^2)), i.e. 1000 n up to n = 100 and fewer beyond (n = 256: 15,259).
TABU_ITER_PER_NODE = 1000
TABU_MAX_PAIR_UPDATES = 10**9


def default_tabu_iterations(n: int) -> int:
    """Iterations of a tabu run on ``n`` rows when neither max_iter nor time_limit is given."""
    n = max(int(n), 1)
    return max(1, min(TABU_ITER_PER_NODE * n, math.ceil(TABU_MAX_PAIR_UPDATES / n**2)))


# ----------------------------------------------------------------------------------------------
# Problem -> per-instance data (the dense-K limit is read here, at call time)
# ----------------------------------------------------------------------------------------------


def local_search_form(problem: Problem) -> str | None:
    """``"kb"``, ``"dense"`` or ``None``: which local-search path `problem` can take."""
    return _local_instances.local_search_form(problem, DENSE_MAX_BYTES)


def _instances(problem: Problem, caller: str) -> list[Instance]:
    """Per-instance minimisation data (numpy float64), converted from the problem once."""
    return _local_instances.instances(problem, caller, DENSE_MAX_BYTES)


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------


_COMPILED = False


def warm_up() -> float:
    """Compile (or load from Numba's cache) every kernel on a tiny problem; returns seconds.

    Called by the solvers before their clocks start, so a user's first `time_limit` is not
    spent compiling.
    """
    global _COMPILED
    if _COMPILED:
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    A = rng.random((4, 4))
    B = rng.random((4, 4))
    L = rng.random((3, 4))
    kb = Problem.koopmans_beckmann(A[:3, :3], B, L)
    dense = Problem.from_dense(kb.to_dense()[0], 3, 4)
    perms = [np.arange(4, dtype=np.int64)]
    for prob in (kb, dense):
        runner = LocalSearch(prob, "warm_up")
        for strategy in ("first", "best"):
            runner.two_opt(perms, strategy=strategy, max_iter=10, deadline=None)
        runner.tabu(perms, max_iter=10, deadline=None, gen=rng)
    _COMPILED = True
    return time.perf_counter() - t0


def share_deadline(deadline: float | None, k: int, count: int) -> float | None:
    """Deadline of part `k` of `count` (instances, rounds): an equal share of what is left
    until `deadline` (a ``time.perf_counter`` value), or None for no deadline."""
    if deadline is None:
        return None
    now = time.perf_counter()
    return now + max(deadline - now, 0.0) / (count - k)


def deadline_in(seconds: float | None) -> float | None:
    """The ``time.perf_counter`` value `seconds` from now, or None for no limit."""
    return None if seconds is None else time.perf_counter() + seconds


# ----------------------------------------------------------------------------------------------
# Drivers (one instance)
# ----------------------------------------------------------------------------------------------


class _Chunker:
    """Chooses chunk sizes so that the deadline is checked every ~10 ms.

    `first` is a guess of the steps in ~10 ms; under a deadline the first chunk is a sixteenth
    of it (the rate is unknown until a chunk has run: on small problems the guess can take
    ~15 ms), and later chunks follow the measured rate, growing at most fourfold. The first
    chunk runs even when the deadline has passed, so that a search that has paid its O(n^3)
    set-up makes some progress (at most ~1 ms more) when its start took all the time.
    """

    def __init__(self, deadline: float | None, budget: int | None, first: int):
        if deadline is not None:
            first //= 16
        self.deadline, self.left, self.size = deadline, budget, max(1, first)
        self.started = False

    def next(self) -> int:
        """Steps for the next chunk, 0 when the budget or the time is spent."""
        if self.left is not None and self.left <= 0:
            return 0
        size = self.size if self.left is None else min(self.size, self.left)
        if self.deadline is not None and self.started:
            if time.perf_counter() >= self.deadline:
                return 0
        return int(size)

    def done(self, steps: int, seconds: float) -> None:
        self.started = True
        if self.left is not None:
            self.left -= steps
        if self.deadline is not None:
            remaining = self.deadline - time.perf_counter()
            rate = steps / max(seconds, 1e-6)
            target = min(0.01, max(remaining, 0.0) * 0.5)
            self.size = int(min(max(1, rate * target), 4 * self.size + 1))
        else:
            self.size = 1 << 30


@dataclass(frozen=True)
class _TwoOptRun:
    """Outcome of 2-opt on one instance: final permutation, swaps made, local optimum reached."""

    p: np.ndarray
    moves: int
    local: bool


@dataclass(frozen=True)
class _TabuRun:
    """Outcome of tabu search on one instance: final and best permutation, the best cost
    (minimisation form), iterations run, and whether the best is a verified local optimum."""

    p: np.ndarray
    best_p: np.ndarray
    best: float
    n_iter: int
    best_is_local: bool


def _run_two_opt(
    inst: Instance,
    p: np.ndarray,
    strategy: str,
    max_iter: int | None,
    deadline: float | None,
) -> _TwoOptRun:
    """2-opt on one instance from permutation `p`."""
    p = p.copy()
    state = new_two_opt_state()
    n = inst.n
    if n < 2 or inst.n1 == 0:
        return _TwoOptRun(p, 0, True)
    args = inst.state(p)
    big = 1 << 62
    if strategy == "best":
        delta = _initial_deltas(inst, args, p)
        vecs = [np.zeros(n) for _ in range(4)]
        # Chunks count moves (each O(n^2)).
        chunk = _Chunker(deadline, max_iter, max(1, 200000 // (n * n)))
        while (steps := chunk.next()) > 0:
            t0 = time.perf_counter()
            _two_opt_best(*args, p, delta, state, steps, inst.tol, *vecs)
            chunk.done(steps, time.perf_counter() - t0)
            if state[_OPT_LOCAL]:
                break
        return _TwoOptRun(p, int(state[_OPT_MOVES]), bool(state[_OPT_LOCAL]))
    # First improvement: chunks count evaluated swaps (each O(n)); max_iter counts moves.
    chunk = _Chunker(deadline, None, max(1, 200000 // n))
    while (evals := chunk.next()) > 0:
        moves_left = big if max_iter is None else max_iter - int(state[_OPT_MOVES])
        if moves_left <= 0:
            break
        t0 = time.perf_counter()
        _two_opt_first(
            *args, p, state, moves_left, evals if deadline is not None else big, inst.tol
        )
        chunk.done(evals, time.perf_counter() - t0)
        if state[_OPT_LOCAL]:
            break
    return _TwoOptRun(p, int(state[_OPT_MOVES]), bool(state[_OPT_LOCAL]))


def _run_tabu(
    inst: Instance,
    p: np.ndarray,
    max_iter: int | None,
    deadline: float | None,
    tenure: float | None,
    aspiration: int | None,
    gen: np.random.Generator,
) -> _TabuRun:
    """Robust tabu search on one instance from permutation `p`."""
    n, n1 = inst.n, inst.n1
    p = p.copy()
    cost = inst.cost(p)
    if n < 2 or n1 == 0:
        return _TabuRun(p, p.copy(), cost, 0, True)
    t_mean = float(n if tenure is None else tenure)
    lo = max(1, math.floor(0.9 * t_mean))
    hi = max(lo, math.ceil(1.1 * t_mean))
    tenures = gen.integers(lo, hi + 1, size=256).astype(np.int64)
    period = 2 * hi
    asp = 5 * n * n if aspiration is None else int(aspiration)
    args = inst.state(p)
    delta = _initial_deltas(inst, args, p)
    # Never-left assignments count as left long ago (not tabu), in a fixed staggered order.
    last = -(np.arange(n * n, dtype=np.int64).reshape(n, n) + 2 * hi + 1)
    best_p = p.copy()
    fstate, istate = new_tabu_state(cost, int(last.min()))
    vecs = [np.zeros(n) for _ in range(4)]
    budget = max_iter
    if budget is None and deadline is None:
        budget = default_tabu_iterations(n)
    chunk = _Chunker(deadline, budget, max(1, 200000 // (n * n)))
    while (steps := chunk.next()) > 0:
        t0 = time.perf_counter()
        _tabu_chunk(
            *args,
            p,
            delta,
            last,
            best_p,
            fstate,
            istate,
            tenures,
            period,
            asp,
            inst.tol,
            steps,
            *vecs,
        )
        chunk.done(steps, time.perf_counter() - t0)
    return _TabuRun(
        p,
        best_p,
        float(fstate[_TABU_BEST]),
        int(istate[_TABU_IT]),
        bool(istate[_TABU_BEST_IS_LOCAL]),
    )


# ----------------------------------------------------------------------------------------------
# The runner: what two_opt, tabu and the default pipeline (auto) share
# ----------------------------------------------------------------------------------------------


class LocalSearch:
    """Local search over the instances of one problem (internal API).

    Converts the problem once (per-instance minimisation data), turns starts into
    permutations, runs 2-opt or tabu search over every instance with the time shared evenly
    (:func:`share_deadline`), and turns permutations back into matchings. :func:`two_opt`,
    :func:`tabu` and :func:`qapfuse.solvers.auto` are written on it.

    Parameters
    ----------
    problem : Problem
        Koopmans--Beckmann, or small enough for a dense ``K`` (:func:`local_search_form`).
    caller : str
        Public function named in error messages.

    Raises
    ------
    TypeError
        If the problem has no local-search form.
    """

    def __init__(self, problem: Problem, caller: str):
        self.problem = problem
        self.caller = caller
        self.instances = _instances(problem, caller)

    @property
    def form(self) -> str:
        """``"kb"`` or ``"dense"``."""
        return "dense" if self.instances and self.instances[0].mode == _DENSE else "kb"

    def start_perms(self, x0: Any, gen: np.random.Generator) -> list[np.ndarray]:
        """One permutation of ``n2[k]`` per instance: `x0` rounded (Hungarian), or random."""
        return start_perms(self.problem, x0, gen, self.caller)

    def perms_from_hard(self, H: np.ndarray) -> list[np.ndarray]:
        """Permutations from hard matchings `H` of shape (b, n1max, n2max) (numpy)."""
        return perms_from_hard(self.problem, H)

    def to_X(self, perms: list[np.ndarray]) -> Any:
        """Matchings (b, n1max, n2max) in the problem's library and device from permutations."""
        return perms_to_X(self.problem, perms)

    def two_opt(
        self,
        perms: list[np.ndarray],
        *,
        strategy: str,
        max_iter: int | None,
        deadline: float | None,
    ) -> list[_TwoOptRun]:
        """2-opt from `perms`, instance by instance, sharing the time until `deadline`."""
        count = len(self.instances)
        return [
            _run_two_opt(inst, perms[k], strategy, max_iter, share_deadline(deadline, k, count))
            for k, inst in enumerate(self.instances)
        ]

    def tabu(
        self,
        perms: list[np.ndarray],
        *,
        max_iter: int | None,
        deadline: float | None,
        gen: np.random.Generator,
        tenure: float | None = None,
        aspiration: int | None = None,
    ) -> list[_TabuRun]:
        """Robust tabu search from `perms`, instance by instance, sharing the time until
        `deadline`; with neither `max_iter` nor `deadline`, :func:`default_tabu_iterations`."""
        count = len(self.instances)
        return [
            _run_tabu(
                inst,
                perms[k],
                max_iter,
                share_deadline(deadline, k, count),
                tenure,
                aspiration,
                gen,
            )
            for k, inst in enumerate(self.instances)
        ]
