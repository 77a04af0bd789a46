"""The annealing loop shared by :func:`gamgm` and :func:`gamgm_affinity`.

Starts (pairwise matchings + synchronisation, a given ``U``, or uniform), graduated assignment
in the universe, Hungarian rounding, and the hand-over to the Hungarian phase (``_sweeps``).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from ... import backend
from ..._validation import warn_not_converged
from ...backend import Array
from .._anneal import Schedule, anneal
from .._common import normalise
from .._lap import _hungarian_np
from .._sinkhorn import Sinkhorn, compiled
from ._inputs import _row_mask
from ._objective import _KBObjective
from ._result import MultiMatchResult
from ._sweeps import _consensus_sweeps, _pair_sweeps
from ._sync import _consistent_universe, _sync_blocks

INITS = ("rrwm", "ga", "uniform")


def _run(
    obj: Any,
    ns: np.ndarray,
    nrow: int,
    d: int,
    opts: dict[str, Any],
    pairwise: Any,
    caller: str,
    start: float,
    *,
    xp: Any,
    dtype: Any,
    device: Any,
) -> MultiMatchResult:
    m = ns.shape[0]
    tau0, tau_min, decay = opts["tau0"], opts["tau_min"], opts["decay"]
    max_inner, tol = opts["max_inner"], opts["tol"]
    sweeps, init = opts["hungarian_sweeps"], opts["init"]
    mask_np = np.zeros((m, nrow, d), dtype=bool)
    for i in range(m):
        mask_np[i, : ns[i], :] = True
    mask = backend.asarray_on(mask_np, xp=xp, device=device)
    square = backend.asarray_on((ns == d)[:, None, None], xp=xp, device=device)

    # Starts (pairwise matchings + synchronisation, a given U, or uniform).
    init_name, starts, relay = _initial(
        init, pairwise, ns, nrow, d, opts.get("rng"), caller, xp=xp, dtype=dtype, device=device
    )
    if not starts:
        gen = backend.rng_from(opts.get("rng"), caller=caller)
        u = np.where(mask_np, 1.0 / d + gen.random((m, nrow, d)) * 1e-3, 0.0)
        starts = [(xp.astype(backend.asarray_on(u, xp=xp, device=device), dtype), False)]

    # Graduated assignment from each start: all graphs at once (Algorithm 1 of [2], in the
    # universe form); the best rounded answer (or hard start) goes on to the Hungarian phase.
    schedule = Schedule(tau0, tau_min, decay, max_inner, tol, opts["step"])
    runs = []
    n_iter = 0
    bound, certified = obj.upper_bound(), False
    for U0, hard in starts:
        s0 = obj.score(U0) if hard else None
        if hard and bound is not None and s0 >= bound - 1e-10 * max(1.0, abs(bound)):
            # optimal: nothing can improve it
            runs, certified = [(s0, U0, U0, [], 0.0, "start (attains the upper bound)")], True
            break
        if hard and _is_fixed_point(obj, U0, ns, xp=xp):
            # the cold update maps this start to itself: annealing would only return to it
            runs.append((s0, U0, U0, [], 0.0, "start (fixed point)"))
            continue
        U, history, n_it, change = _anneal(obj, U0, mask, square, schedule, opts["sk_iter"], xp=xp)
        n_iter += n_it
        U_hard = _round(U, ns, xp=xp)
        runs.append((obj.score(U_hard), U_hard, U, history, change, "annealed"))
        if hard:
            runs.append((s0, U0, U, history, change, "start"))
    best = max(range(len(runs)), key=lambda k: runs[k][0])
    score, U_hard, soft, history, change, picked = runs[best]
    converged = change < tol
    if not converged:
        warn_not_converged(
            f"{caller} stopped at max_inner={max_inner} in its last stage with change "
            f"{change:.2e} > tol={tol:g}; raise max_inner or lower decay.",
            stacklevel=4,
        )

    # Hungarian phase: graph-by-graph improvement sweeps from the best rounded answer.
    info: dict[str, Any] = {
        "history": history,
        "init": init_name,
        "candidates": [(r[5], r[0]) for r in runs],
        "picked": picked,
    }
    if certified:
        used = 0
    elif isinstance(obj, _KBObjective):
        U_hard, score, used = _consensus_sweeps(obj, U_hard, ns, sweeps, xp=xp, relay=relay)
    else:
        U_hard, score, used = _pair_sweeps(obj, U_hard, ns, sweeps, xp=xp)
    info["refine_sweeps"] = used
    return MultiMatchResult(
        U=U_hard[:, : int(ns.max()), :],
        ns=ns,
        soft=soft[:, : int(ns.max()), :],
        score=score,
        n_iter=n_iter,
        converged=converged,
        time=time.perf_counter() - start,
        info=info,
    )


def _is_fixed_point(obj: Any, U: Array, ns: np.ndarray, *, xp: Any) -> bool:
    """Whether the Hungarian projection of ``G(U)`` gives back the hard ``U`` (every graph)."""
    return bool(xp.all(_round(obj.grad(U), ns, xp=xp) == U))


def _anneal(
    obj: Any, U: Array, mask: Array, square: Array, schedule: Schedule, sk_iter: int, *, xp: Any
) -> tuple[Array, list[dict[str, Any]], int, float]:
    """The annealing loop: ``U <- (1 - step) U + step sinkhorn(G(U) / tau)``, tau decaying."""
    # numpy float64: compiled Sinkhorn whose potentials carry over from one call to the next
    project = Sinkhorn(mask, square=square, warm=compiled(U), max_iter=sk_iter, tol=1e-5)
    run = anneal(lambda U: normalise(obj.grad(U), xp=xp), project, U, schedule, score=obj.score)
    return run.X, run.history, run.n_iter, run.change


def _initial(
    init: Any,
    pairwise: Any,
    ns: np.ndarray,
    nrow: int,
    d: int,
    rng: Any,
    caller: str,
    *,
    xp: Any,
    dtype: Any,
    device: Any,
) -> tuple[str, list[tuple[Array, bool]], Array | None]:
    """Starts ``(U, is_hard)``: pairwise + synchronisation (and the star), or the given one.

    Also returns the pairwise matchings (m, m, nrow, nrow) behind the starts, or None.
    """
    m = ns.shape[0]
    if isinstance(init, str):
        if init not in INITS:
            from ..._validation import check_choice

            check_choice(init, "init", caller, INITS)
        if init == "uniform":
            return "uniform", [], None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pairwise non-convergence is fine for a start
            Xb, star_only = pairwise(init)
        if star_only:
            U = _star_universe(Xb, ns, d, xp=xp)
        else:
            U, _ = _sync_blocks(Xb, ns, d, xp=xp)
        starts = [(U, True)]
        if not star_only:  # also the star around the largest graph, read off the same pairs
            ref = int(np.argmax(ns))
            touch = np.zeros((m, m), dtype=bool)
            touch[ref, :] = touch[:, ref] = True
            keep = backend.asarray_on(touch[:, :, None, None], xp=xp, device=device)
            U_star = _star_universe(xp.where(keep, Xb, xp.zeros_like(Xb)), ns, d, xp=xp)
            starts.append((U_star, True))
        return f"{init}+synchronize", starts, Xb
    if isinstance(init, MultiMatchResult):
        if not np.array_equal(init.ns, ns) or init.n_univ != d:
            raise ValueError(
                f"The 'init' result of {caller} must be for graphs of sizes {ns.tolist()} and a "
                f"universe of {d}; got sizes {init.ns.tolist()} and a universe of {init.n_univ}."
            )
        U0 = init.U
    else:
        try:
            xp_init = backend.namespace_of(init, name="init")
        except TypeError:
            xp_init = None
        if xp_init is not xp:
            raise TypeError(
                f"The 'init' parameter of {caller} must be one of {', '.join(map(repr, INITS))}, "
                f"a MultiMatchResult or an array of the inputs' library; got {type(init).__name__}."
            )
        U0 = init
    want = (m, int(ns.max()), d)
    if tuple(U0.shape) != want:
        raise ValueError(
            f"The 'init' parameter of {caller} must have shape (m, max(ns), n_univ) = {want}; "
            f"got {tuple(U0.shape)}."
        )
    U0 = xp.astype(U0, dtype)
    if not bool(xp.all(xp.isfinite(U0))) or bool(xp.any(U0 < 0)):
        raise ValueError(f"The 'init' parameter of {caller} must be finite and non-negative.")
    if nrow > want[1]:
        z = xp.zeros((m, nrow - want[1], d), dtype=dtype, device=device)
        U0 = xp.concat([U0, z], axis=1)
    mask = backend.asarray_on(_row_mask(ns, nrow)[:, :, None], xp=xp, device=device)
    U0 = xp.where(mask, U0, xp.zeros_like(U0))
    hard = bool(xp.all((U0 == 0) | (U0 == 1)))
    return "given", [(U0, hard)], None


def _star_universe(Xb: Array, ns: np.ndarray, d: int, *, xp: Any) -> Array:
    """Universe matchings from a star of pairs around the largest graph (no cycles: exact)."""
    U = _consistent_universe(Xb, ns, d, complete=False)
    if U is None:  # a node left unmatched to the largest graph: the spectral route places it
        return _sync_blocks(Xb, ns, d, xp=xp)[0]
    return backend.from_numpy(U, like=Xb)


def _round(U: Array, ns: np.ndarray, *, xp: Any) -> Array:
    """Hungarian projection of each ``U_i`` (rows ``:n_i``) to a 0/1 universe matching."""
    m, d = U.shape[0], U.shape[2]
    X = _hungarian_np(backend.to_numpy(U).astype(np.float64), ns, np.full(m, d))
    return backend.from_numpy(X, like=U)
