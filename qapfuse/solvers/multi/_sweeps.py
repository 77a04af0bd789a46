"""The Hungarian phase: improve hard universe matchings one graph at a time while ``F`` grows."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ... import backend
from ...backend import Array
from ...problem import Problem
from ._objective import _KBObjective, _PairObjective


def _relayed(relay: Array, U: Array, i: int, ns: np.ndarray, *, xp: Any) -> list[Array]:
    """Graph ``i`` re-aligned through each of its pairwise matchings: ``round(X_ij U_j)``.

    One candidate ``U_i`` (n_i, d) per graph ``j`` whose pair with ``i`` was matched. A graph
    that the start placed wrongly as a whole (the annealing and 2-opt cannot move it back) is
    often matched correctly to some other graph on its own; this carries that pair over.
    """
    from ._annealing import _round

    n_i = int(ns[i])
    js = [j for j in range(U.shape[0]) if j != i and bool(xp.any(relay[i, j] != 0))]
    if not js:
        return []
    C = xp.stack([xp.matmul(relay[i, j], U[j]) for j in js])  # (k, nrow, d)
    C = _round(C, np.full(len(js), n_i), xp=xp)
    return [C[k, :n_i, :] for k in range(len(js))]


def _relay_pass(obj: _KBObjective, U: Array, ns: np.ndarray, relay: Array, *, xp: Any) -> Array:
    """Each graph in turn takes its best relayed placement (:func:`_relayed`) if ``F`` grows.

    With the others fixed, ``F`` differs from graph ``i``'s local score by a constant, so the
    candidates are compared on :meth:`_KBObjective.local_problem`. This runs before any other
    move, while the rest of the universe still agrees with the pairs the candidates come from.
    """
    for i in range(U.shape[0]):
        n_i = int(ns[i])
        prob = obj.local_problem(U, i, n_i)
        current = float(prob.score(U[None, i, :n_i, :])[0])
        cands = _relayed(relay, U, i, ns, xp=xp)
        if not cands:
            continue
        scores = [float(prob.score(c[None, ...])[0]) for c in cands]
        k = int(np.argmax(scores))
        if scores[k] > current + 1e-9 * max(1.0, abs(current)):
            U = _replace_graph(U, i, cands[k], xp=xp)
    return U


def _hungarian_sweeps(
    obj: Any, U: Array, ns: np.ndarray, sweeps: int, *, xp: Any
) -> tuple[Array, float, int]:
    """Improve hard ``U`` one graph at a time: ``U_i <- LAP(dF/dU_i)`` when ``F`` grows."""
    best = obj.score(U)
    m, r, d = U.shape
    Un = backend.to_numpy(U).astype(np.float64)
    used = 0
    for _ in range(sweeps):
        used += 1
        improved = False
        for i in range(m):
            G = backend.to_numpy(obj.grad(U))[i, : ns[i], :].astype(np.float64)
            rows, cols = linear_sum_assignment(G, maximize=True)
            new_i = np.zeros((r, d))
            new_i[rows, cols] = 1.0
            if np.array_equal(new_i, Un[i]):
                continue
            cand = Un.copy()
            cand[i] = new_i
            U_cand = backend.from_numpy(cand, like=U)
            s = obj.score(U_cand)
            if s > best + 1e-12 * max(1.0, abs(best)):
                U, Un, best, improved = U_cand, cand, s, True
        if not improved:
            break
    return U, best, used


def _consensus_sweeps(
    obj: _KBObjective,
    U: Array,
    ns: np.ndarray,
    sweeps: int,
    *,
    xp: Any,
    relay: Array | None = None,
) -> tuple[Array, float, int]:
    """Block-coordinate ascent: re-match each graph to the sum of the others, aligned.

    For graph ``i`` the objective is a Koopmans--Beckmann problem between ``A_i`` and the
    aligned sum ``R_i`` of the other graphs (:meth:`_KBObjective.local_problems`), whose noise
    averages out. A sweep runs 2-opt on each graph in turn against the current others,
    from the best of the current ``U_i`` and, in the first sweep and whenever 2-opt alone is
    stuck (at most twice), proposals for all graphs from RRWM and a short GA (one batch each);
    a change is kept when ``F`` grows. With the pairwise matchings of the start (`relay`), a
    first pass re-aligns graphs through their pairs (:func:`_relay_pass`).
    """
    from .._local import two_opt

    if relay is not None:
        U = _relay_pass(obj, U, ns, relay, xp=xp)
    best = obj.score(U)
    m = U.shape[0]
    used = 0
    want_proposals, proposal_sweeps = True, 0
    for _ in range(sweeps):
        used += 1
        improved = False
        proposals = []
        if want_proposals:  # the costly part: only first, and when 2-opt alone is stuck
            proposal_sweeps += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # proposals need not converge
                local = obj.local_problems(U, ns)
                proposals = [solver(local).X for solver in _proposers()]
        for i in range(m):
            n_i = int(ns[i])
            prob = obj.local_problem(U, i, n_i)
            starts = [U[i, :n_i, :]] + [P[i, :n_i, :] for P in proposals]
            scores = [float(prob.score(x[None, ...])[0]) for x in starts]
            new = two_opt(prob, x0=starts[int(np.argmax(scores))]).X
            cand = _replace_graph(U, i, new, xp=xp)
            s = obj.score(cand)
            if s > best + 1e-9 * max(1.0, abs(best)):
                U, best, improved = cand, s, True
        if improved:
            want_proposals = False
        elif not want_proposals and proposal_sweeps < 2:
            want_proposals = True
        else:
            break
    return U, best, used


def _pair_sweeps(
    obj: _PairObjective, U: Array, ns: np.ndarray, sweeps: int, *, xp: Any
) -> tuple[Array, float, int]:
    """Re-match each graph to the others (GA proposals on :meth:`local_problems`, kept when
    ``F`` grows), then linearised Hungarian sweeps; repeated while either improves ``F``."""
    from .._ga import ga

    best = obj.score(U)
    used = 0
    for _ in range(sweeps):
        used += 1
        improved = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proposals = ga(obj.local_problems(U, ns)).X
        for i in range(U.shape[0]):
            cand = _replace_graph(U, i, proposals[i, : int(ns[i]), :], xp=xp)
            s = obj.score(cand)
            if s > best + 1e-9 * max(1.0, abs(best)):
                U, best, improved = cand, s, True
        U, s, _ = _hungarian_sweeps(obj, U, ns, sweeps, xp=xp)
        if s > best + 1e-9 * max(1.0, abs(best)):
            best, improved = s, True
        if not improved:
            break
    return U, best, used


def _proposers() -> list[Any]:
    """Pairwise solvers that propose a new ``U_i`` for every graph (light settings)."""
    from .._ga import ga
    from .._rrwm import rrwm

    def ga_light(problem: Problem) -> Any:
        return ga(problem, tau0=0.05, tau_min=0.005, decay=0.4, max_inner=5, sk_iter=30)

    return [rrwm, ga_light]


def _replace_graph(U: Array, i: int, Ui: Array, *, xp: Any) -> Array:
    """``U`` with graph ``i``'s rows ``:n_i`` replaced by `Ui` (n_i, d)."""
    m, r, d = U.shape
    Ui = xp.astype(Ui, U.dtype)
    if Ui.shape[0] < r:
        pad = xp.zeros((r - Ui.shape[0], d), dtype=U.dtype, device=backend.device(U))
        Ui = xp.concat([Ui, pad])
    sel = backend.asarray_on((np.arange(m) == i)[:, None, None], xp=xp, device=backend.device(U))
    return xp.where(sel, Ui[None, ...], U)
