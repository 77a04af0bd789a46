r"""Block-structured QAPs: many assignment blocks coupled through one affinity operator.

The variable is a list of blocks ``X = [X_1, ..., X_B]``, block ``b`` an ``(r_b, c_b)``
assignment (``r_b <= c_b``; a permutation when square). The problem states itself through an
operator (:class:`BlockQAP`) with

* ``score(X) -> float``: the objective, maximised;
* ``gradient(X, blocks=None) -> list``: its derivative with respect to each block (or to the
  listed blocks only; the others come back as ``None``).

Nothing here knows where the blocks come from (channel groups of networks, graphs of a
multi-graph problem); :mod:`qapfuse.fusion.align` is one producer. Three solvers share the
operator:

* :func:`solve_blocks`: graduated assignment (the library's one annealing loop,
  :func:`~qapfuse.solvers._anneal.anneal`) with a warm-started Sinkhorn per block, Hungarian
  rounding per block, then :func:`coordinate_ascent` to a fixed point;
* :func:`coordinate_lap`: coordinate ascent alone from the identity, blocks in random order,
  with restarts. With the inner-product network operator this is Git Re-Basin's weight
  matching;
* :func:`frank_wolfe`: Frank--Wolfe over the blocks' Birkhoff polytopes with a Hungarian
  oracle and exact line search (the C2M3 baseline), Hungarian rounding at the end.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import backend
from .._validation import Option, check_options
from ._anneal import Schedule, anneal
from ._common import normalise
from ._lap import _hungarian_np
from ._sinkhorn import Sinkhorn

__all__ = [
    "ANNEAL_OPTIONS",
    "BlockQAP",
    "BlockResult",
    "coordinate_ascent",
    "coordinate_lap",
    "frank_wolfe",
    "solve_blocks",
]


class BlockQAP:
    """Interface of a block-structured QAP (subclass it; solvers call only these members).

    Attributes
    ----------
    sizes : list of (int, int)
        Shape ``(r_b, c_b)`` of every block, ``r_b <= c_b``.
    """

    sizes: list[tuple[int, int]]

    def score(self, X: Sequence[np.ndarray]) -> float:
        """The objective at blocks `X` (soft or hard), as a float."""
        raise NotImplementedError

    def gradient(
        self, X: Sequence[np.ndarray], blocks: Sequence[int] | None = None
    ) -> list[np.ndarray | None]:
        """``d score / d X_b`` for every block (or those in `blocks`; ``None`` for the rest)."""
        raise NotImplementedError

    def is_linear(self, b: int) -> bool:
        """Whether the score is affine in block `b` when the others are fixed.

        Then a change of that block changes the score by exactly ``<G_b, new - old>`` and
        :func:`coordinate_ascent` needs no new score evaluation. Default: False.
        """
        return False

    def coupled(self, b: int) -> Sequence[int] | None:
        """Blocks (besides `b`) whose values the gradient of block `b` reads; None: all.

        :func:`coordinate_ascent` re-evaluates a linear block only after one of these
        changed (its best response cannot have moved otherwise). A superset is safe; a
        block left out that the gradient does read gives wrong answers. Default: None.
        """
        return None


@dataclass
class BlockResult:
    """What the block solvers return.

    Attributes
    ----------
    X : list of numpy.ndarray
        Hard 0/1 blocks, ``X[b]`` of shape ``sizes[b]``.
    soft : list of numpy.ndarray or None
        The last soft iterate (annealing, Frank--Wolfe), before rounding.
    score : float
        ``op.score(X)``.
    n_iter : int
        Gradient evaluations of the main phase (annealing steps, Frank--Wolfe steps, or
        coordinate sweeps for :func:`coordinate_lap`).
    converged : bool
        The main phase met its tolerance before its limits.
    time : float
        Wall-clock seconds.
    info : dict
        Solver-specific extras (``history``, ``sweeps``, ``restarts``, ``rounded_score``).
    """

    X: list[np.ndarray]
    soft: list[np.ndarray] | None
    score: float
    n_iter: int
    converged: bool
    time: float
    info: dict[str, Any] = field(default_factory=dict)

    def permutations(self) -> list[np.ndarray]:
        """Column matched to each row of every block (int64 arrays of shape ``(r_b,)``)."""
        return [np.argmax(x, axis=1).astype(np.int64) for x in self.X]


#: Options of :func:`solve_blocks` (the graduated-assignment schedule and its limits).
ANNEAL_OPTIONS: dict[str, Option] = {
    "tau0": Option("float", low=0, low_inclusive=False),
    "tau_min": Option("float", low=0, low_inclusive=False),
    "decay": Option("float", low=0, high=1, low_inclusive=False),
    "step": Option("float", low=0, high=1, low_inclusive=False),
    "max_inner": Option("int", low=1),
    "sk_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
    "max_sweeps": Option("int", low=0),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
}


# -- the pieces every solver here shares --------------------------------------------------------


def _identity_blocks(sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    return [np.eye(r, c) for r, c in sizes]


def _round(X: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Hungarian rounding of every block (maximising ``<X_b, H_b>``)."""
    return [_hungarian_np(np.asarray(x, dtype=np.float64)[None], *_n(x))[0] for x in X]


def _n(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array([x.shape[0]]), np.array([x.shape[1]])


#: Entries over all blocks from which the blocks' Sinkhorn projections run in threads (below
#: it a thread costs more than it saves).
_PARALLEL_ENTRIES = 1 << 17


class _BlockSinkhorn:
    """The projection of the annealing loop: a warm-started Sinkhorn of ``G_b / tau`` per block.

    Each block's gradient is scaled to unit range first (as :func:`~qapfuse.solvers.ga` does), so
    `tau` is relative to the spread of its scores. This is the one place the block solvers
    call Sinkhorn. The blocks are independent: when there are at least `_PARALLEL_ENTRIES`
    entries in all, they are projected in threads (the compiled kernel releases the GIL),
    largest first; results do not depend on the thread count.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], sk_iter: int):
        self.states = [
            Sinkhorn(
                np.ones((r, c), dtype=bool),
                square=np.array([r == c]),
                warm=True,
                max_iter=sk_iter,
                tol=1e-5,
            )
            for r, c in sizes
        ]
        self.order = sorted(range(len(sizes)), key=lambda b: -sizes[b][0] * sizes[b][1])
        workers = min(os.cpu_count() or 1, len(sizes))
        big = sum(r * c for r, c in sizes) >= _PARALLEL_ENTRIES
        self.pool = ThreadPoolExecutor(workers) if big and workers > 1 else None

    def _one(self, b: int, g: np.ndarray, tau: float) -> np.ndarray:
        g = np.asarray(g, dtype=np.float64)[None]
        return self.states[b](normalise(g, xp=np, mask=np.ones(g.shape, dtype=bool))[0], tau)

    def __call__(self, G: Sequence[np.ndarray], tau: float) -> list[np.ndarray]:
        if self.pool is None:
            return [self._one(b, g, tau) for b, g in enumerate(G)]
        jobs = {b: self.pool.submit(self._one, b, G[b], tau) for b in self.order}
        return [jobs[b].result() for b in range(len(G))]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def coordinate_ascent(
    op: BlockQAP,
    X: Sequence[np.ndarray],
    *,
    rng: np.random.Generator,
    max_sweeps: int = 100,
    score: float | None = None,
    deadline: float | None = None,
) -> tuple[list[np.ndarray], float, int, bool]:
    """Improve hard blocks one at a time: each block's LAP on its gradient, the others fixed.

    A block's new assignment (Hungarian on ``d score / d X_b`` at the current hard point) is
    kept only if the score rises, so the score never falls; where a block enters the score
    linearly given the others (``op.is_linear(b)``), the LAP is its exact best response and
    the gain ``<G_b, new - old>`` is the score change, so no score is evaluated. Blocks are
    visited in a new random order every sweep; the loop stops after a sweep without change.
    A linear block is evaluated again only once a block it is coupled with
    (``op.coupled(b)``) has changed since its last evaluation: its gradient, and so its
    LAP, would be the same, so skipping it changes nothing but the time.

    Returns
    -------
    X : list of numpy.ndarray
        The improved hard blocks.
    score : float
    sweeps : int
        Sweeps done.
    converged : bool
        The last sweep changed nothing (a coordinate-wise fixed point).
    """
    X = [np.array(x, dtype=np.float64) for x in X]
    s = op.score(X) if score is None else score
    B = len(X)
    linear = [op.is_linear(b) for b in range(B)]
    readers: list[list[int]] = [[] for _ in range(B)]  # blocks whose gradient reads block c
    for b in range(B):
        for c in range(B) if (cb := op.coupled(b)) is None else cb:
            if c != b:
                readers[c].append(b)
    stale = [True] * B  # the block's gradient may have changed since its last evaluation
    sweeps, converged = 0, max_sweeps == 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for b in map(int, rng.permutation(B)):
            if not stale[b]:
                continue
            G = op.gradient(X, [b])[b]
            new = _round([G])[0]
            stale[b] = not linear[b]
            if np.array_equal(new, X[b]):
                continue
            trial = list(X)
            trial[b] = new
            if linear[b]:  # exact: the score is affine in this block
                s_new = s + float(np.sum(G * (new - X[b])))
            else:
                s_new = op.score(trial)
            if s_new > s + 1e-12 * max(1.0, abs(s)):
                X, s, changed = trial, s_new, True
                for c in readers[b]:
                    stale[c] = True
        if not changed:
            converged = True
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
    return X, s, sweeps, converged


# -- solvers ------------------------------------------------------------------------------------


def solve_blocks(
    op: BlockQAP,
    *,
    tau0: float = 0.5,
    tau_min: float = 5e-3,
    decay: float = 0.7,
    step: float = 0.5,
    max_inner: int = 10,
    sk_iter: int = 100,
    tol: float = 1e-3,
    max_sweeps: int = 100,
    time_limit: float | None = None,
    x0: Sequence[np.ndarray] | None = None,
    rng: Any = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> BlockResult:
    r"""Graduated assignment over assignment blocks, then Hungarian rounding and polish.

    Anneals ``X_b <- step * sinkhorn(G_b / tau) + (1 - step) * X_b`` for all blocks at once
    (``G = op.gradient(X)``, each block scaled to unit range) from `tau0` down to `tau_min`,
    rounds every block by the Hungarian method and polishes it with :func:`coordinate_ascent`.
    The identity start is polished too (that is :func:`coordinate_lap` with one restart) and
    the better of the two is returned, so the result is never below a plain coordinate ascent
    run (with an int `rng`: the same run); ``info`` says which won. When the annealing rounds
    to the identity itself, that one polish is the identity's.

    Parameters
    ----------
    op : BlockQAP
        The problem (blocks' shapes in ``op.sizes``).
    tau0, tau_min, decay, step, max_inner, tol : float or int
        The schedule (see :class:`~qapfuse.solvers._anneal.Schedule`).
    sk_iter : int
        Sinkhorn iterations per projection (stops early at 1e-5 marginal error).
    max_sweeps : int >= 0
        Coordinate sweeps after rounding (0: none).
    time_limit : float, optional
        Seconds for the annealing; the rounding and one polish sweep still run after it.
    x0 : list of numpy.ndarray, optional
        Soft start per block. Default: uniform plus 1e-3 noise (from `rng`).
    rng : None, int or Generator
        Start noise and the polish's block order. With an int seed the identity candidate is
        :func:`coordinate_lap` with the same seed and defaults, block order included, so the
        result is never below it.
    progress : callable, optional
        Called with each temperature stage's history entry.

    Returns
    -------
    BlockResult
        ``info["history"]`` (per stage), ``info["rounded_score"]`` (annealed, rounded, before
        polish), ``info["candidates"]`` (score of each polished candidate: ``"annealed"``,
        ``"identity"``), ``info["picked"]``, ``info["sweeps"]``.

    References
    ----------
    .. [1] S. Gold, A. Rangarajan, "A graduated assignment algorithm for graph matching",
           IEEE TPAMI 18(4), 1996.
    .. [2] Z. Liu et al., "Deep neural network fusion via graph matching with applications to
           model ensemble and federated learning", ICML 2022.
    """
    start = time.perf_counter()
    caller = "solve_blocks"
    check_options(
        dict(
            tau0=tau0,
            tau_min=tau_min,
            decay=decay,
            step=step,
            max_inner=max_inner,
            sk_iter=sk_iter,
            tol=tol,
            max_sweeps=max_sweeps,
            time_limit=time_limit,
        ),
        ANNEAL_OPTIONS,
        caller,
    )
    if tau_min > tau0:
        raise ValueError(
            f"The 'tau_min' parameter of {caller} must be <= tau0; got tau_min={tau_min}, "
            f"tau0={tau0}."
        )
    gen = backend.rng_from(rng, caller=caller)
    sizes = list(op.sizes)
    if x0 is None:
        X0 = [np.full((r, c), 1.0 / c) + 1e-3 * gen.random((r, c)) / c for r, c in sizes]
    else:
        X0 = _check_blocks(x0, sizes, "x0", caller)
    deadline = None if time_limit is None else start + time_limit
    project = _BlockSinkhorn(sizes, sk_iter)
    try:
        res = anneal(
            lambda X: op.gradient(X),
            project,
            X0,
            Schedule(tau0, tau_min, decay, max_inner, tol, step),
            deadline=deadline,
            score=op.score,
            on_stage=progress,
        )
    finally:
        project.close()
    X = _round(res.X)
    eye = _identity_blocks(sizes)
    at_identity = all(np.array_equal(x, i) for x, i in zip(X, eye))
    rounded = op.score(X)
    # two polished candidates: the annealed rounding and the identity start (which the
    # polish turns into plain coordinate ascent); the better one is returned
    # an int seed starts the identity polish's own stream, so that it is exactly
    # coordinate_lap(op, rng=seed): weight matching with the same seed
    own = backend.rng_from(rng) if isinstance(rng, (int, np.integer)) else gen
    X, s, sweeps, _ = coordinate_ascent(
        op, X, rng=own if at_identity else gen, max_sweeps=max_sweeps, score=rounded
    )
    candidates = {"annealed": float(s)}
    if max_sweeps > 0 and not at_identity:
        Xi, si, sw_i, _ = coordinate_ascent(op, eye, rng=own, max_sweeps=max_sweeps)
        candidates["identity"] = float(si)
        sweeps += sw_i
        if si > s:
            X, s = Xi, si
    return BlockResult(
        X=X,
        soft=list(res.X),
        score=float(s),
        n_iter=res.n_iter,
        converged=res.converged,
        time=time.perf_counter() - start,
        info={
            "history": res.history,
            "rounded_score": float(rounded),
            "candidates": candidates,
            "picked": max(candidates, key=candidates.get),
            "sweeps": sweeps,
        },
    )


def coordinate_lap(
    op: BlockQAP,
    *,
    restarts: int = 1,
    max_sweeps: int = 100,
    x0: Sequence[np.ndarray] | None = None,
    rng: Any = None,
    time_limit: float | None = None,
) -> BlockResult:
    """Coordinate ascent over per-block LAPs from the identity (Git Re-Basin weight matching).

    Each restart runs :func:`coordinate_ascent` from `x0` (default: identity blocks) with its
    own random block orders; the best score is kept.

    Parameters
    ----------
    op : BlockQAP
    restarts : int >= 1
        Independent runs (different block orders).
    max_sweeps : int >= 1
        Sweeps per run.
    x0 : list of numpy.ndarray, optional
        Hard start per block.
    rng : None, int or Generator
    time_limit : float, optional
        Seconds; the current run stops after the sweep that passes it, later ones are skipped.

    Returns
    -------
    BlockResult
        ``n_iter`` is the total number of sweeps; ``info["restarts"]`` the score of every run.

    References
    ----------
    .. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: merging models modulo
           permutation symmetries", ICLR 2023 (Algorithm 2, weight matching).
    """
    start = time.perf_counter()
    caller = "coordinate_lap"
    check_options(
        dict(restarts=restarts, max_sweeps=max_sweeps, time_limit=time_limit),
        {
            "restarts": Option("int", low=1),
            "max_sweeps": Option("int", low=1),
            "time_limit": ANNEAL_OPTIONS["time_limit"],
        },
        caller,
    )
    gen = backend.rng_from(rng, caller=caller)
    sizes = list(op.sizes)
    X0 = _identity_blocks(sizes) if x0 is None else _check_blocks(x0, sizes, "x0", caller)
    deadline = None if time_limit is None else start + time_limit
    best, scores, total, all_conv = None, [], 0, True
    for _ in range(restarts):
        X, s, sweeps, conv = coordinate_ascent(
            op, X0, rng=gen, max_sweeps=max_sweeps, deadline=deadline
        )
        total += sweeps
        all_conv = all_conv and conv
        scores.append(float(s))
        if best is None or s > best[1]:
            best = (X, s)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return BlockResult(
        X=best[0],  # type: ignore[index]
        soft=None,
        score=float(best[1]),
        n_iter=total,
        converged=all_conv,
        time=time.perf_counter() - start,
        info={"restarts": scores},
    )


def frank_wolfe(
    op: BlockQAP,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    x0: Sequence[np.ndarray] | None = None,
    max_sweeps: int = 0,
    rng: Any = None,
    time_limit: float | None = None,
) -> BlockResult:
    r"""Frank--Wolfe over every block's Birkhoff polytope, with a Hungarian oracle.

    Each step takes the vertex ``V_b = hungarian(G_b)`` of every block (``G = op.gradient(X)``)
    and moves to ``X + t (V - X)``, ``t`` in [0, 1] maximising the score along that segment
    (exactly for scores that are polynomials of degree <= 4 in ``X``, as the network QAP of N
    models is: five values on the segment determine it, see :func:`_line_search`). Stops when
    the Frank--Wolfe gap ``<G, V - X>`` is below ``tol * max(1, |score|)``. The last iterate is
    rounded by the Hungarian method (then ``max_sweeps`` coordinate sweeps, 0 by default).

    Parameters
    ----------
    op : BlockQAP
    max_iter : int >= 1
    tol : float > 0
        Relative gap that stops the iteration.
    x0 : list of numpy.ndarray, optional
        Start (default: the uniform ``1 / c_b`` blocks, the Birkhoff barycentre).
    max_sweeps : int >= 0
        Coordinate sweeps after rounding.
    rng : None, int or Generator
        The sweeps' block order.
    time_limit : float, optional

    Returns
    -------
    BlockResult
        ``info["gap"]`` is the last Frank--Wolfe gap, ``info["rounded_score"]`` the score
        before the sweeps.

    References
    ----------
    .. [1] D. Crisostomi et al., "C2M3: cycle-consistent multi-model merging", NeurIPS 2024.
    .. [2] M. Frank, P. Wolfe, "An algorithm for quadratic programming", Naval Res. Logist.
           Q. 3, 1956.
    """
    start = time.perf_counter()
    caller = "frank_wolfe"
    check_options(
        dict(max_iter=max_iter, tol=tol, max_sweeps=max_sweeps, time_limit=time_limit),
        {
            "max_iter": Option("int", low=1),
            "tol": ANNEAL_OPTIONS["tol"],
            "max_sweeps": Option("int", low=0),
            "time_limit": ANNEAL_OPTIONS["time_limit"],
        },
        caller,
    )
    gen = backend.rng_from(rng, caller=caller)
    sizes = list(op.sizes)
    if x0 is None:
        X = [np.full((r, c), 1.0 / c) for r, c in sizes]
    else:
        X = _check_blocks(x0, sizes, "x0", caller)
    deadline = None if time_limit is None else start + time_limit
    s = op.score(X)
    gap, it, converged = math.inf, 0, False
    for it in range(1, max_iter + 1):
        G = op.gradient(X)
        V = _round(G)
        D = [v - x for v, x in zip(V, X)]
        gap = float(sum(np.sum(g * d) for g, d in zip(G, D)))
        if gap <= tol * max(1.0, abs(s)):
            converged = True
            break
        t, s = _line_search(op, X, D, s)
        X = [x + t * d for x, d in zip(X, D)]
        if deadline is not None and time.perf_counter() > deadline:
            break
    soft = X
    Xh = _round(soft)
    sh = op.score(Xh)
    rounded = sh
    Xh, sh, sweeps, _ = coordinate_ascent(op, Xh, rng=gen, max_sweeps=max_sweeps, score=sh)
    return BlockResult(
        X=Xh,
        soft=soft,
        score=float(sh),
        n_iter=it,
        converged=converged,
        time=time.perf_counter() - start,
        info={"gap": gap, "rounded_score": float(rounded), "sweeps": sweeps},
    )


def _line_search(
    op: BlockQAP, X: list[np.ndarray], D: list[np.ndarray], s0: float
) -> tuple[float, float]:
    """Best ``t`` in [0, 1] for ``op.score(X + t D)``: the quartic through five samples.

    Returns ``(t, score at t)``, never below ``s0`` (``t = 0`` when no sample beats it).
    """
    ts = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    vals = [s0] + [op.score([x + t * d for x, d in zip(X, D)]) for t in ts[1:]]
    coef = np.polyfit(ts, vals, 4)
    grid = np.linspace(0.0, 1.0, 201)
    t = float(grid[np.argmax(np.polyval(coef, grid))])
    best = int(np.argmax(vals))
    s_t = op.score([x + t * d for x, d in zip(X, D)]) if t not in ts else vals[int(t * 4)]
    if vals[best] > s_t:
        t, s_t = float(ts[best]), vals[best]
    return t, float(s_t)


def _check_blocks(
    X: Any, sizes: Sequence[tuple[int, int]], name: str, caller: str
) -> list[np.ndarray]:
    if not isinstance(X, (list, tuple)) or len(X) != len(sizes):
        raise ValueError(
            f"The {name!r} parameter of {caller} must be a list of {len(sizes)} blocks. "
            f"Got {type(X).__name__} of length {len(X) if hasattr(X, '__len__') else '?'}."
        )
    out = []
    for b, (x, shape) in enumerate(zip(X, sizes)):
        x = np.asarray(backend.to_numpy(x) if not isinstance(x, np.ndarray) else x, np.float64)
        if x.shape != tuple(shape):
            raise ValueError(
                f"Block {b} of the {name!r} parameter of {caller} must have shape {tuple(shape)}."
                f" Got {x.shape} instead."
            )
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError(
                f"Block {b} of the {name!r} parameter of {caller} must be finite and non-negative."
            )
        out.append(x)
    return out
