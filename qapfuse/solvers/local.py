r"""Local search for QAPs over permutations: 2-opt and robust tabu search (Numba).

Both searches move between permutations by swapping the columns assigned to two rows and
need the *delta* of a swap, the change of the objective. They work in the minimisation form

.. math::  f(p) = \sum_{i,j} F_{ij} D_{p(i) p(j)} + \sum_i C_{i, p(i)}

which covers the two operator forms they support:

* **Koopmans--Beckmann** problems (``KoopmansBeckmannAffinity`` ``w * A X B^T``, optionally
  plus ``LinearAffinity`` ``<L, X>`` and ``ConstantAffinity`` terms) map to ``F = A``,
  ``D = -w B``, ``C = -L`` (``f = -score``); a swap's delta costs O(n), and after a move the
  deltas of all swaps disjoint from it are updated in O(1) each [1]_.
* Any other problem whose **dense Lawler K** fits in
  :data:`qapfuse.problem.DENSE_MAX_BYTES`: ``f(p) = -sum_{ij} K[(i,p_i),(j,p_j)]``, with the
  same O(n) delta and O(1) update written for a general ``K``.

Partial matching (``n1 < n2``) adds ``n2 - n1`` dummy rows with no affinity, so the search runs
over permutations of ``n2``; the first ``n1`` rows give the matching.

The O(1) update
---------------
Write ``Δ(p; r, s)`` for the delta of swapping rows ``r`` and ``s`` of ``p``. For general
(asymmetric, non-zero diagonal) ``F`` and ``D``::

    Δ(p; r, s) = (F_rr - F_ss)(D_{ps ps} - D_{pr pr}) + (F_rs - F_sr)(D_{ps pr} - D_{pr ps})
               + Σ_{k ∉ {r,s}} [ (F_kr - F_ks)(D_{pk ps} - D_{pk pr})
                                + (F_rk - F_sk)(D_{ps pk} - D_{pr pk}) ]
               + C_{r ps} + C_{s pr} - C_{r pr} - C_{s ps}.

After the move ``(u, v)`` turns ``p`` into ``q`` (``q_u = p_v``, ``q_v = p_u``), a pair
``{r, s}`` disjoint from ``{u, v}`` keeps ``p_r, p_s`` and only the terms ``k = u, v`` of the
sum change. Collecting them,

    Δ(q; r, s) = Δ(p; r, s) - (a_r - a_s)(b_r - b_s) - (a'_r - a'_s)(b'_r - b'_s),

with ``a_k = F_ku - F_kv``, ``a'_k = F_uk - F_vk``, ``b_k = D_{qk qu} - D_{qk qv}`` and
``b'_k = D_{qu qk} - D_{qv qk}`` (all O(n) per move). The linear term of a disjoint pair does
not change. The tests check this against recomputation.

References
----------
.. [1] É. D. Taillard, "Robust taboo search for the quadratic assignment problem",
       Parallel Computing 17(4-5), 443-455, 1991. doi:10.1016/S0167-8191(05)80147-4
.. [2] R. E. Burkard, E. Çela, P. M. Pardalos, L. S. Pitsoulis, "The quadratic assignment
       problem", Handbook of Combinatorial Optimization, 1998 (2-opt / pairwise exchange).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from .. import backend
from .._validation import Option, check_options, warn_not_converged
from ..problem import (
    DENSE_MAX_BYTES,
    ConstantAffinity,
    KoopmansBeckmannAffinity,
    LinearAffinity,
    Problem,
    SumAffinity,
    dense_nbytes,
)
from ._common import check_problem, hard_projection, initial_soft
from .result import MatchResult, make_result

__all__ = ["OPTIONS_TABU", "OPTIONS_TWO_OPT", "tabu", "two_opt"]

OPTIONS_TWO_OPT: dict[str, Option] = {
    "strategy": Option("choice", choices=("first", "best")),
    "max_iter": Option("int", low=1, allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}

OPTIONS_TABU: dict[str, Option] = {
    "max_iter": Option("int", low=1, allow_none=True),
    "time_limit": Option("float", low=0, low_inclusive=False, allow_none=True),
    "tenure": Option("float", low=0, low_inclusive=False, allow_none=True),
    "aspiration": Option("int", low=1, allow_none=True),
    "x0": Option("array", allow_none=True),
    "rng": Option("any", allow_none=True),
}

#: Default tabu iterations per instance when neither ``max_iter`` nor ``time_limit`` is given:
#: ``TABU_ITER_PER_NODE * n``, capped at ``TABU_MAX_PAIR_UPDATES / n**2`` (an iteration costs
#: O(n^2)), i.e. 1000 n up to n = 100 and fewer beyond (n = 256: 15,259).
TABU_ITER_PER_NODE = 1000
TABU_MAX_PAIR_UPDATES = 10**9


def default_tabu_iterations(n: int) -> int:
    """Iterations of a tabu run on ``n`` rows when neither max_iter nor time_limit is given."""
    n = max(int(n), 1)
    return max(1, min(TABU_ITER_PER_NODE * n, math.ceil(TABU_MAX_PAIR_UPDATES / n**2)))


# Kernel modes: Koopmans-Beckmann (general / both matrices symmetric) and dense Lawler K.
_KB, _DENSE, _KB_SYM = 0, 1, 2
_EMPTY2 = np.zeros((0, 0), dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Numba kernels (validated, C-contiguous float64 / int64 input only)
# ----------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _gpair(K, n1, i, a, j, b):
    """``K[(i,a),(j,b)] + K[(j,b),(i,a)]``; 0 when a row is a dummy (``>= n1``)."""
    if i >= n1 or j >= n1:
        return 0.0
    x = i + a * n1
    y = j + b * n1
    return K[x, y] + K[y, x]


@njit(cache=True)
def _delta_dense(K, n1, p, r, s):
    """Change of ``f = -score`` when rows r, s swap their columns (general Lawler ``K``)."""
    n = p.shape[0]
    pr = p[r]
    ps = p[s]
    d = _gpair(K, n1, r, pr, s, ps) - _gpair(K, n1, r, ps, s, pr)
    if r < n1:
        d += K[r + pr * n1, r + pr * n1] - K[r + ps * n1, r + ps * n1]
    if s < n1:
        d += K[s + ps * n1, s + ps * n1] - K[s + pr * n1, s + pr * n1]
    for k in range(n):
        if k == r or k == s or k >= n1:
            continue
        pk = p[k]
        d += (
            _gpair(K, n1, r, pr, k, pk)
            + _gpair(K, n1, s, ps, k, pk)
            - _gpair(K, n1, r, ps, k, pk)
            - _gpair(K, n1, s, pr, k, pk)
        )
    return d


@njit(cache=True, inline="always")
def _kb_fix(F, FT, G, GT, C, p, r, s):
    """Terms of ``Δ(p; r, s)`` outside the sum over ``k ∉ {r, s}``, minus the sum's ``k = r, s``
    terms (so that the sum itself can run over all k)."""
    d = 0.0
    for k in (r, s):
        d -= (FT[r, k] - FT[s, k]) * (GT[s, k] - GT[r, k]) + (F[r, k] - F[s, k]) * (
            G[s, k] - G[r, k]
        )
    d += (F[r, r] - F[s, s]) * (G[s, s] - G[r, r]) + (F[r, s] - F[s, r]) * (G[s, r] - G[r, s])
    pr = p[r]
    ps = p[s]
    d += C[r, ps] + C[s, pr] - C[r, pr] - C[s, ps]
    return d


@njit(cache=True, fastmath=True)
def _delta_kb(F, FT, G, GT, C, p, r, s):
    """Change of ``f(p) = sum F_ij G_ij + sum C_{i p_i}`` when rows r, s swap.

    ``G[i, j] = D[p_i, p_j]`` is the permuted second matrix (``GT`` its transpose), kept in
    step with ``p`` so that every access is a contiguous row.
    """
    n = p.shape[0]
    Fr = F[r]
    Fs = F[s]
    FTr = FT[r]
    FTs = FT[s]
    Gr = G[r]
    Gs = G[s]
    GTr = GT[r]
    GTs = GT[s]
    d = 0.0
    for k in range(n):
        d += (FTr[k] - FTs[k]) * (GTs[k] - GTr[k]) + (Fr[k] - Fs[k]) * (Gs[k] - Gr[k])
    return d + _kb_fix(F, FT, G, GT, C, p, r, s)


@njit(cache=True, fastmath=True)
def _refresh_kb(mode, F, FT, G, GT, C, n1, p, delta, u, v):
    """Deltas of all swaps involving row u or v (KB), both rows in one pass over the matrices.

    With symmetric F and D (``mode == _KB_SYM``) the two products of the sum are equal.
    """
    n = p.shape[0]
    Fu = F[u]
    Fv = F[v]
    Gu = G[u]
    Gv = G[v]
    FTu = FT[u]
    FTv = FT[v]
    GTu = GT[u]
    GTv = GT[v]
    for k in range(n):
        if k == u or k == v:
            continue
        do_u = min(k, u) < n1
        do_v = min(k, v) < n1
        if not (do_u or do_v):
            continue
        Fk = F[k]
        Gk = G[k]
        su = 0.0
        sv = 0.0
        if mode == 2:
            for j in range(n):
                su += (Fu[j] - Fk[j]) * (Gk[j] - Gu[j])
                sv += (Fv[j] - Fk[j]) * (Gk[j] - Gv[j])
            su *= 2.0
            sv *= 2.0
        else:
            FTk = FT[k]
            GTk = GT[k]
            for j in range(n):
                su += (FTu[j] - FTk[j]) * (GTk[j] - GTu[j]) + (Fu[j] - Fk[j]) * (Gk[j] - Gu[j])
                sv += (FTv[j] - FTk[j]) * (GTk[j] - GTv[j]) + (Fv[j] - Fk[j]) * (Gk[j] - Gv[j])
        if do_u:
            delta[min(k, u), max(k, u)] = su + _kb_fix(F, FT, G, GT, C, p, u, k)
        if do_v:
            delta[min(k, v), max(k, v)] = sv + _kb_fix(F, FT, G, GT, C, p, v, k)
    if min(u, v) < n1:
        delta[min(u, v), max(u, v)] = _delta_kb(F, FT, G, GT, C, p, u, v)


@njit(cache=True)
def _delta(mode, F, FT, G, GT, C, K, n1, p, r, s):
    if mode != 1:
        return _delta_kb(F, FT, G, GT, C, p, r, s)
    return _delta_dense(K, n1, p, r, s)


@njit(cache=True)
def _cost(mode, F, G, C, K, n1, p):
    """``f(p)`` (the minimised cost) from scratch, O(n^2)."""
    n = p.shape[0]
    c = 0.0
    if mode != 1:
        for i in range(n):
            for j in range(n):
                c += F[i, j] * G[i, j]
            c += C[i, p[i]]
    else:
        for i in range(n1):
            for j in range(n1):
                c -= K[i + p[i] * n1, j + p[j] * n1]
    return c


@njit(cache=True)
def _swap(mode, G, GT, p, u, v):
    """Swap the columns of rows u and v: ``p`` and, for KB, rows and columns of G and GT."""
    t = p[u]
    p[u] = p[v]
    p[v] = t
    if mode == 1:
        return
    n = p.shape[0]
    for M in (G, GT):
        for k in range(n):
            x = M[u, k]
            M[u, k] = M[v, k]
            M[v, k] = x
        for k in range(n):
            x = M[k, u]
            M[k, u] = M[k, v]
            M[k, v] = x


@njit(cache=True)
def _move_vectors(mode, F, FT, G, GT, p, u, v, a1, a2, b1, b2):
    """The O(n) vectors of the O(1) update after rows u, v swapped (``p`` already swapped)."""
    if mode == 1:
        return
    n = p.shape[0]
    for k in range(n):
        a1[k] = FT[u, k] - FT[v, k]
        a2[k] = F[u, k] - F[v, k]
        b1[k] = GT[u, k] - GT[v, k]
        b2[k] = G[u, k] - G[v, k]


@njit(cache=True)
def _hdense(K, n1, p, r, s, k, c):
    pr = p[r]
    ps = p[s]
    return (
        _gpair(K, n1, r, pr, k, c)
        + _gpair(K, n1, s, ps, k, c)
        - _gpair(K, n1, r, ps, k, c)
        - _gpair(K, n1, s, pr, k, c)
    )


@njit(cache=True)
def _updated(mode, F, FT, G, GT, C, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2):
    """Delta of swap (r, s) after the move (u, v) (``p`` already swapped)."""
    if r == u or r == v or s == u or s == v:
        return _delta(mode, F, FT, G, GT, C, K, n1, p, r, s)
    if mode != 1:
        return delta[r, s] - (a1[r] - a1[s]) * (b1[r] - b1[s]) - (a2[r] - a2[s]) * (b2[r] - b2[s])
    # Dense K: only the terms k = u, v of the sum change; q_u = p_v(old), q_v = p_u(old).
    qu = p[u]
    qv = p[v]
    return (
        delta[r, s]
        + _hdense(K, n1, p, r, s, u, qu)
        - _hdense(K, n1, p, r, s, u, qv)
        + _hdense(K, n1, p, r, s, v, qv)
        - _hdense(K, n1, p, r, s, v, qu)
    )


@njit(cache=True)
def _refresh_rows(mode, F, FT, G, GT, C, K, n1, p, delta, u, v):
    """Recompute (O(n) each) the deltas of all swaps that involve row u or row v."""
    if mode != 1:
        _refresh_kb(mode, F, FT, G, GT, C, n1, p, delta, u, v)
        return
    n = p.shape[0]
    for w in (u, v):
        for k in range(n):
            if k == w or (w == v and k == u):
                continue
            r = min(k, w)
            s = max(k, w)
            if r < n1:
                delta[r, s] = _delta(mode, F, FT, G, GT, C, K, n1, p, r, s)


@njit(cache=True)
def _min2(M):
    m = M[0, 0]
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if M[i, j] < m:
                m = M[i, j]
    return m


@njit(cache=True)
def _all_deltas(mode, F, FT, G, GT, C, K, n1, p, delta):
    n = p.shape[0]
    for r in range(min(n1, n - 1)):
        for s in range(r + 1, n):
            delta[r, s] = _delta(mode, F, FT, G, GT, C, K, n1, p, r, s)


@njit(cache=True)
def _two_opt_first(mode, F, FT, G, GT, C, K, n1, p, state, max_moves, max_evals, tol):
    """First-improvement 2-opt, scanning pairs cyclically from ``state[1:3]``.

    Stops after `max_moves` swaps or `max_evals` evaluated swaps. ``state`` (int64):
    [local_optimum_flag, r, s, moves, unproductive_pairs]. Returns the cost change made.
    """
    n = p.shape[0]
    rmax = min(n1, n - 1)
    npairs = 0
    for r in range(rmax):
        npairs += n - 1 - r
    total = 0.0
    r = state[1]
    s = state[2]
    since = state[4]
    moves = 0
    state[0] = 0
    if npairs == 0:
        state[0] = 1
        return 0.0
    evals = 0
    while moves < max_moves and evals < max_evals:
        evals += 1
        d = _delta(mode, F, FT, G, GT, C, K, n1, p, r, s)
        if d < -tol:
            _swap(mode, G, GT, p, r, s)
            total += d
            moves += 1
            since = 0
        else:
            since += 1
            if since >= npairs:
                state[0] = 1
                break
        s += 1
        if s >= n:
            r += 1
            if r >= rmax:
                r = 0
            s = r + 1
    state[1] = r
    state[2] = s
    state[3] += moves
    state[4] = since
    return total


@njit(cache=True)
def _two_opt_best(mode, F, FT, G, GT, C, K, n1, p, delta, state, max_moves, tol, a1, a2, b1, b2):
    """Best-improvement 2-opt over a maintained delta matrix (up to date on entry and exit).

    ``state`` (int64): [local_optimum_flag, ., ., moves, .]. Returns the cost change made.
    """
    n = p.shape[0]
    rmax = min(n1, n - 1)
    total = 0.0
    state[0] = 0
    u = -1
    v = -1
    moves = 0
    while True:
        if u >= 0:
            _refresh_rows(mode, F, FT, G, GT, C, K, n1, p, delta, u, v)
        bu = -1
        bv = -1
        bd = -tol
        for r in range(rmax):
            skip_r = u < 0 or r == u or r == v
            a1r = a1[r]
            a2r = a2[r]
            b1r = b1[r]
            b2r = b2[r]
            for s in range(r + 1, n):
                if skip_r or s == u or s == v:
                    d = delta[r, s]
                elif mode != 1:
                    d = delta[r, s] - (a1r - a1[s]) * (b1r - b1[s]) - (a2r - a2[s]) * (b2r - b2[s])
                    delta[r, s] = d
                else:
                    d = _updated(mode, F, FT, G, GT, C, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2)
                    delta[r, s] = d
                if d < bd:
                    bd = d
                    bu = r
                    bv = s
        if bu < 0:
            state[0] = 1
            break
        if moves >= max_moves:
            break  # budget spent; delta is up to date
        _swap(mode, G, GT, p, bu, bv)
        total += bd
        moves += 1
        state[3] += 1
        u = bu
        v = bv
        _move_vectors(mode, F, FT, G, GT, p, u, v, a1, a2, b1, b2)
    return total


@njit(cache=True)
def _tabu_chunk(
    mode,
    F,
    FT,
    G,
    GT,
    C,
    K,
    n1,
    p,
    delta,
    last,
    best_p,
    fstate,
    istate,
    tenures,
    period,
    aspiration,
    tol,
    n_steps,
    a1,
    a2,
    b1,
    b2,
):
    """Run `n_steps` iterations of robust tabu search on the state, in place.

    ``fstate`` (float64): [cur, best]. ``istate`` (int64): [it, last_u, last_v, best_is_local,
    at_best, best_it, min_last]. ``last[i, c]`` is the iteration at which row i last left
    column c. ``delta`` is up to date except for the move ``(last_u, last_v)`` when
    ``last_u >= 0`` (on entry and on return: the next chunk's first pass updates it).
    """
    n = p.shape[0]
    rmax = min(n1, n - 1)
    cur = fstate[0]
    best = fstate[1]
    it = istate[0]
    u = istate[1]
    v = istate[2]
    min_last = istate[6]
    if u >= 0:
        _move_vectors(mode, F, FT, G, GT, p, u, v, a1, a2, b1, b2)
    inf = np.inf
    for _ in range(n_steps):
        it += 1
        tenure = tenures[(it // period) % tenures.shape[0]]
        if u >= 0:
            _refresh_rows(mode, F, FT, G, GT, C, K, n1, p, delta, u, v)
        # Long-term aspiration needs an entry of `last` older than `aspiration` iterations;
        # min_last (a lower bound, refreshed only when it matters) skips those checks.
        may_force = it - aspiration > min_last
        if may_force:
            min_last = _min2(last)
            may_force = it - aspiration > min_last
        # Fused pass: update the deltas for the last move and pick the next move.
        f_d = inf  # forced by long-term aspiration
        f_r = -1
        f_s = -1
        o_d = inf  # allowed (not tabu, or aspired by a new best)
        o_r = -1
        o_s = -1
        t_d = inf  # any move (fallback when all are tabu)
        t_r = -1
        t_s = -1
        for r in range(rmax):
            pr = p[r]
            skip_r = u < 0 or r == u or r == v
            a1r = a1[r]
            a2r = a2[r]
            b1r = b1[r]
            b2r = b2[r]
            lastr = last[r]
            for s in range(r + 1, n):
                if skip_r or s == u or s == v:
                    d = delta[r, s]
                elif mode != 1:
                    d = delta[r, s] - (a1r - a1[s]) * (b1r - b1[s]) - (a2r - a2[s]) * (b2r - b2[s])
                    delta[r, s] = d
                else:
                    d = _updated(mode, F, FT, G, GT, C, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2)
                    delta[r, s] = d
                if d < t_d:
                    t_d = d
                    t_r = r
                    t_s = s
                if may_force:
                    ago_r = it - lastr[p[s]]
                    ago_s = it - last[s, pr]
                    if ago_r > aspiration and ago_s > aspiration:
                        if d < f_d:
                            f_d = d
                            f_r = r
                            f_s = s
                    elif d < o_d and (ago_r > tenure or ago_s > tenure or cur + d < best - tol):
                        o_d = d
                        o_r = r
                        o_s = s
                elif d < o_d and (
                    it - lastr[p[s]] > tenure or it - last[s, pr] > tenure or cur + d < best - tol
                ):
                    o_d = d
                    o_r = r
                    o_s = s
        if istate[4] == 1:
            # The previous move reached a new best: it is a local optimum iff no swap improves.
            istate[3] = 1 if t_d >= -tol else 0
            istate[4] = 0
        if f_r >= 0:
            r, s, d = f_r, f_s, f_d
        elif o_r >= 0:
            r, s, d = o_r, o_s, o_d
        elif t_r >= 0:
            r, s, d = t_r, t_s, t_d
        else:
            break  # fewer than two real rows: nothing to do
        last[r, p[r]] = it
        last[s, p[s]] = it
        _swap(mode, G, GT, p, r, s)
        cur += d
        u = r
        v = s
        _move_vectors(mode, F, FT, G, GT, p, u, v, a1, a2, b1, b2)
        if cur < best - tol:
            best = cur
            for k in range(n):
                best_p[k] = p[k]
            istate[4] = 1
            istate[3] = 0
            istate[5] = it
    fstate[0] = cur
    fstate[1] = best
    istate[0] = it
    istate[1] = u  # the next chunk updates delta for this move first
    istate[2] = v
    istate[6] = min_last
    return it


@njit(cache=True)
def _apply_pending(mode, F, FT, G, GT, C, K, n1, p, delta, istate, a1, a2, b1, b2):
    """Bring ``delta`` up to date for the move a tabu chunk left pending (``istate[1:3]``)."""
    u = istate[1]
    v = istate[2]
    if u < 0:
        return
    _move_vectors(mode, F, FT, G, GT, p, u, v, a1, a2, b1, b2)
    _refresh_rows(mode, F, FT, G, GT, C, K, n1, p, delta, u, v)
    n = p.shape[0]
    for r in range(min(n1, n - 1)):
        for s in range(r + 1, n):
            if r != u and r != v and s != u and s != v:
                delta[r, s] = _updated(
                    mode, F, FT, G, GT, C, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2
                )
    istate[1] = -1
    istate[2] = -1


# ----------------------------------------------------------------------------------------------
# Problem -> per-instance data
# ----------------------------------------------------------------------------------------------


@dataclass
class _Instance:
    """One instance in minimisation form over permutations of ``n`` (= n2) rows."""

    mode: int
    n1: int
    n: int
    F: np.ndarray
    FT: np.ndarray
    D: np.ndarray
    C: np.ndarray
    K: np.ndarray
    tol: float

    def state(self, p: np.ndarray) -> tuple[Any, ...]:
        """Kernel arguments for a search at permutation `p` (KB: fresh ``G = D[p][:, p]``)."""
        if self.mode != _DENSE:
            G = np.ascontiguousarray(self.D[np.ix_(p, p)])
            GT = np.ascontiguousarray(G.T)
        else:
            G = GT = _EMPTY2
        return (self.mode, self.F, self.FT, G, GT, self.C, self.K, self.n1)

    def cost(self, p: np.ndarray) -> float:
        args = self.state(p)
        return float(_cost(self.mode, self.F, args[3], self.C, self.K, self.n1, p))


def _split_kb(problem: Problem) -> tuple[KoopmansBeckmannAffinity, list[LinearAffinity]] | None:
    aff = problem.affinity
    terms = aff.terms if isinstance(aff, SumAffinity) else [aff]
    kb = [t for t in terms if isinstance(t, KoopmansBeckmannAffinity)]
    lin = [t for t in terms if isinstance(t, LinearAffinity)]
    const = [t for t in terms if isinstance(t, ConstantAffinity)]
    if len(kb) == 1 and len(kb) + len(lin) + len(const) == len(terms):
        return kb[0], lin
    return None


def local_search_form(problem: Problem) -> str | None:
    """``"kb"``, ``"dense"`` or ``None``: which local-search path `problem` can take."""
    if _split_kb(problem) is not None:
        return "kb"
    if dense_nbytes(problem.batch, problem.n1max, problem.n2max) <= DENSE_MAX_BYTES:
        return "dense"
    return None


def _tolerance(scale: float) -> float:
    return 1e-9 * max(scale, 1e-300)


def _instances(problem: Problem, caller: str) -> list[_Instance]:
    """Per-instance minimisation data (numpy float64), converted from the problem once."""
    split = _split_kb(problem)
    out: list[_Instance] = []
    if split is not None:
        kb, lin = split
        A = backend.to_numpy(kb.A).astype(np.float64)
        B = backend.to_numpy(kb.B).astype(np.float64)
        L = None
        for t in lin:
            Lt = backend.to_numpy(t.L).astype(np.float64)
            L = Lt if L is None else L + Lt
        for k in range(problem.batch):
            n1, n = int(problem.n1[k]), int(problem.n2[k])
            F = np.zeros((n, n))
            F[:n1, :n1] = A[k, :n1, :n1]
            D = np.ascontiguousarray(-kb.weight * B[k, :n, :n])
            C = np.zeros((n, n))
            if L is not None:
                C[:n1, :n] = -L[k, :n1, :n]
            scale = np.abs(F).max(initial=0) * np.abs(D).max(initial=0) * max(n, 1)
            scale += np.abs(C).max(initial=0)
            FT = np.ascontiguousarray(F.T)
            mode = _KB_SYM if np.array_equal(F, FT) and np.array_equal(D, D.T) else _KB
            out.append(_Instance(mode, n1, n, F, FT, D, C, _EMPTY2, _tolerance(scale)))
        return out
    need = dense_nbytes(problem.batch, problem.n1max, problem.n2max)
    if need > DENSE_MAX_BYTES:
        raise TypeError(
            f"{caller} supports Koopmans-Beckmann problems (Problem.koopmans_beckmann: one "
            "KoopmansBeckmannAffinity, optionally plus LinearAffinity/ConstantAffinity terms) "
            "and problems whose dense K fits in DENSE_MAX_BYTES "
            f"({DENSE_MAX_BYTES:,} bytes; set QAPFUSE_DENSE_MAX_BYTES). This problem's "
            f"{type(problem.affinity).__name__} would need {need:,} bytes as a dense K. Use a "
            "continuous solver (ga, ipfp, rrwm) instead."
        )
    Kall = backend.to_numpy(problem.to_dense(max_bytes=DENSE_MAX_BYTES)).astype(np.float64)
    n1max = problem.n1max
    for k in range(problem.batch):
        n1, n = int(problem.n1[k]), int(problem.n2[k])
        sel = (np.arange(n1)[:, None] + n1max * np.arange(n)[None, :]).T.ravel()
        Kk = np.ascontiguousarray(Kall[k][np.ix_(sel, sel)])
        scale = np.abs(Kk).max(initial=0) * max(n1, 1) * 4
        out.append(
            _Instance(_DENSE, n1, n, _EMPTY2, _EMPTY2, _EMPTY2, _EMPTY2, Kk, _tolerance(scale))
        )
    return out


# ----------------------------------------------------------------------------------------------
# Starts, results, compilation
# ----------------------------------------------------------------------------------------------


def _start_perms(
    problem: Problem, x0: Any, gen: np.random.Generator, caller: str
) -> list[np.ndarray]:
    """Permutations of n2[k] per instance: rounded `x0` (Hungarian) or random."""
    perms = []
    if x0 is None:
        for k in range(problem.batch):
            perms.append(gen.permutation(int(problem.n2[k])).astype(np.int64))
        return perms
    X0 = initial_soft(problem, x0, caller)
    return perms_from_hard(problem, backend.to_numpy(hard_projection(problem, X0)))


def perms_from_hard(problem: Problem, H: np.ndarray) -> list[np.ndarray]:
    """Permutations of n2[k] from hard matchings `H` (b, n1max, n2max): dummy rows take the
    unmatched columns in increasing order."""
    perms = []
    for k in range(problem.batch):
        n1, n = int(problem.n1[k]), int(problem.n2[k])
        p = np.empty(n, dtype=np.int64)
        p[:n1] = np.argmax(H[k, :n1, :n], axis=1) if n1 else []
        used = np.zeros(n, dtype=bool)
        used[p[:n1]] = True
        p[n1:] = np.nonzero(~used)[0]
        perms.append(p)
    return perms


def _perms_to_X(problem: Problem, perms: list[np.ndarray]) -> Any:
    X = np.zeros((problem.batch, problem.n1max, problem.n2max), dtype=np.float64)
    for k, p in enumerate(perms):
        n1 = int(problem.n1[k])
        X[k, np.arange(n1), p[:n1]] = 1.0
    return backend.asarray_on(X, xp=problem.xp, device=problem.device)


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
    for prob in (kb, dense):
        inst = _instances(prob, "warm_up")[0]
        for strategy in ("first", "best"):
            _run_two_opt(inst, np.arange(4, dtype=np.int64), strategy, 10, None)
        _run_tabu(inst, np.arange(4, dtype=np.int64), 10, None, None, None, rng)
    _COMPILED = True
    return time.perf_counter() - t0


def _deadline(time_limit: float | None) -> float | None:
    return None if time_limit is None else time.perf_counter() + time_limit


def _check_common(
    problem: Problem, caller: str, options: dict[str, Any], spec: dict[str, Option]
) -> dict[str, Any]:
    check_problem(problem, caller)
    return check_options(options, spec, caller)


# ----------------------------------------------------------------------------------------------
# Drivers (one instance)
# ----------------------------------------------------------------------------------------------


class _Chunker:
    """Chooses chunk sizes so that the deadline is checked every ~10 ms."""

    def __init__(self, deadline: float | None, budget: int | None, first: int):
        self.deadline, self.left, self.size = deadline, budget, max(1, first)

    def next(self) -> int:
        """Steps for the next chunk, 0 when the budget or the time is spent."""
        if self.left is not None and self.left <= 0:
            return 0
        size = self.size if self.left is None else min(self.size, self.left)
        if self.deadline is not None:
            if time.perf_counter() >= self.deadline:
                return 0
        return int(size)

    def done(self, steps: int, seconds: float) -> None:
        if self.left is not None:
            self.left -= steps
        if self.deadline is not None:
            remaining = self.deadline - time.perf_counter()
            rate = steps / max(seconds, 1e-6)
            target = min(0.01, max(remaining, 0.0) * 0.5)
            self.size = int(min(max(1, rate * target), 4 * self.size + 1))
        else:
            self.size = 1 << 30


def _run_two_opt(
    inst: _Instance,
    p: np.ndarray,
    strategy: str,
    max_iter: int | None,
    deadline: float | None,
) -> tuple[np.ndarray, int, bool]:
    """2-opt on one instance from permutation `p`; returns (p, moves, local_optimum)."""
    p = p.copy()
    state = np.zeros(5, dtype=np.int64)
    state[2] = 1
    n = inst.n
    if n < 2 or inst.n1 == 0:
        return p, 0, True
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
            if state[0]:
                break
        return p, int(state[3]), bool(state[0])
    # First improvement: chunks count evaluated swaps (each O(n)); max_iter counts moves.
    chunk = _Chunker(deadline, None, max(1, 200000 // n))
    while (evals := chunk.next()) > 0:
        moves_left = big if max_iter is None else max_iter - int(state[3])
        if moves_left <= 0:
            break
        t0 = time.perf_counter()
        _two_opt_first(
            *args, p, state, moves_left, evals if deadline is not None else big, inst.tol
        )
        chunk.done(evals, time.perf_counter() - t0)
        if state[0]:
            break
    return p, int(state[3]), bool(state[0])


def _initial_deltas(inst: _Instance, args: tuple[Any, ...], p: np.ndarray) -> np.ndarray:
    """Matrix of all swap deltas at `p` (upper triangle used): BLAS for KB, loops for dense."""
    n = inst.n
    if inst.mode == _DENSE:
        delta = np.zeros((n, n))
        _all_deltas(*args, p, delta)
        return delta
    F, FT, G, GT, C = inst.F, inst.FT, args[3], args[4], inst.C
    # Sum over all k of the two products (see the module notes), as matrix products ...
    P = FT @ GT.T
    Q = F @ G.T
    S = P + P.T + Q + Q.T
    dP, dQ = np.diag(P), np.diag(Q)
    S -= (dP + dQ)[:, None] + (dP + dQ)[None, :]
    # ... minus the k = r and k = s terms, plus the exact pair terms and the linear part.
    f, g = np.diag(F), np.diag(G)
    fr, fc = f[:, None], f[None, :]
    gr, gc = g[:, None], g[None, :]
    FTr, GTr = F.T, G.T  # F_sr and G_sr at [r, s]
    k_r = (fr - F) * (G - gr) + (fr - FTr) * (GTr - gr)
    k_s = (FTr - fc) * (gc - GTr) + (F - fc) * (gc - G)
    exact = (fr - fc) * (gc - gr) + (F - FTr) * (GTr - G)
    Cp = C[:, p]
    cd = np.diag(Cp)
    lin = Cp + Cp.T - cd[:, None] - cd[None, :]
    return np.ascontiguousarray(S - k_r - k_s + exact + lin)


@dataclass
class _TabuState:
    p: np.ndarray
    best_p: np.ndarray
    best: float
    n_iter: int
    best_is_local: bool


def _run_tabu(
    inst: _Instance,
    p: np.ndarray,
    max_iter: int | None,
    deadline: float | None,
    tenure: float | None,
    aspiration: int | None,
    gen: np.random.Generator,
) -> _TabuState:
    """Robust tabu search on one instance from permutation `p`."""
    n, n1 = inst.n, inst.n1
    p = p.copy()
    cost = inst.cost(p)
    if n < 2 or n1 == 0:
        return _TabuState(p, p.copy(), cost, 0, True)
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
    fstate = np.array([cost, cost])
    istate = np.array([0, -1, -1, 0, 1, 0, last.min()], dtype=np.int64)
    vecs = [np.zeros(n) for _ in range(4)]
    budget = max_iter
    if budget is None and deadline is None:
        budget = default_tabu_iterations(n)
    chunk = _Chunker(deadline, budget, max(1, 200000 // (n * n)))
    while True:
        steps = chunk.next()
        if steps == 0:
            break
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
    return _TabuState(p, best_p, float(fstate[1]), int(istate[0]), bool(istate[3]))


# ----------------------------------------------------------------------------------------------
# Public solvers
# ----------------------------------------------------------------------------------------------


def two_opt(
    problem: Problem,
    *,
    x0: Any = None,
    strategy: str = "first",
    max_iter: int | None = None,
    time_limit: float | None = None,
    rng: Any = None,
) -> MatchResult:
    r"""Pairwise-exchange (2-opt) local search: maximise ``vec(X)^T K vec(X)`` over matchings.

    From a start permutation, repeatedly swap the columns of two rows while that improves the
    score, until no swap improves (a local optimum). The delta of a swap costs O(n) for
    Koopmans--Beckmann problems (``score = w <X, A X B^T> + <L, X>``) and for dense Lawler
    ``K``; see the module notes. Kernels are compiled by Numba on first use (cached on disk);
    compilation is not counted against `time_limit`.

    Parameters
    ----------
    problem : Problem
        Koopmans--Beckmann problem (optionally with linear/constant terms), or any problem whose
        dense ``K`` of shape (b, n1max*n2max, n1max*n2max) fits in ``DENSE_MAX_BYTES``.
        Batched problems are searched one instance at a time; ``n1 < n2`` adds dummy rows.
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start, hard or soft (rounded by the Hungarian method), in the problem's library.
        Default: a random permutation drawn from `rng`.
    strategy : {"first", "best"}
        ``"first"``: take the first improving swap of a cyclic scan (O(n) per evaluated swap).
        ``"best"``: take the best swap of all, keeping a matrix of all swap deltas updated in
        O(n^2) per move.
    max_iter : int >= 1, optional
        Most swaps (moves) per instance. Default: no limit.
    time_limit : float > 0, optional
        Wall-clock seconds for the whole call (split evenly over the instances left).
    rng : None, int, numpy.random.Generator or torch.Generator, optional
        Source of the random start.

    Returns
    -------
    MatchResult
        ``X`` of shape (n1, n2) or (b, n1max, n2max) in the problem's library, dtype and
        device; ``soft`` is None; ``n_iter`` counts swaps; ``converged`` is True when every
        instance reached a local optimum. ``info["form"]`` is ``"kb"`` or ``"dense"``.

    Raises
    ------
    TypeError
        If the problem is neither Koopmans--Beckmann nor small enough for a dense ``K``.

    References
    ----------
    .. [1] R. E. Burkard, E. Çela, P. M. Pardalos, L. S. Pitsoulis, "The quadratic assignment
           problem", Handbook of Combinatorial Optimization, 1998.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import Problem, two_opt
    >>> rng = np.random.default_rng(0)
    >>> p = Problem.koopmans_beckmann(rng.random((6, 6)), rng.random((6, 6)), sense="min")
    >>> res = two_opt(p, rng=0)
    >>> res.converged, res.X.shape
    (True, (6, 6))
    """
    start = time.perf_counter()
    caller = "two_opt"
    _check_common(
        problem,
        caller,
        dict(strategy=strategy, max_iter=max_iter, time_limit=time_limit),
        OPTIONS_TWO_OPT,
    )
    gen = backend.rng_from(rng, caller=caller)
    insts = _instances(problem, caller)
    perms0 = _start_perms(problem, x0, gen, caller)
    warm_up()
    t_run = time.perf_counter()
    perms, moves, local = [], 0, True
    for k, inst in enumerate(insts):
        deadline = None
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - t_run)
            deadline = time.perf_counter() + max(left, 0.0) / (len(insts) - k)
        p, m, ok = _run_two_opt(inst, perms0[k], strategy, max_iter, deadline)
        perms.append(p)
        moves += m
        local = local and ok
    if not local:
        knob = "max_iter" if time_limit is None else "time_limit (or max_iter)"
        warn_not_converged(
            f"two_opt stopped after {moves} swaps before reaching a local optimum; raise {knob}."
        )
    X = _perms_to_X(problem, perms)
    return make_result(
        problem,
        X,
        soft=None,
        n_iter=moves,
        converged=local,
        start=start,
        info={"form": "dense" if insts and insts[0].mode == _DENSE else "kb", "strategy": strategy},
    )


def tabu(
    problem: Problem,
    *,
    x0: Any = None,
    max_iter: int | None = None,
    time_limit: float | None = None,
    tenure: float | None = None,
    aspiration: int | None = None,
    rng: Any = None,
) -> MatchResult:
    r"""Robust tabu search (Taillard 1991): maximise ``vec(X)^T K vec(X)`` over matchings.

    Every iteration takes the best swap of two rows that is not tabu, even when it makes the
    score worse, and the best matching seen is returned. The deltas of all ``n(n-1)/2`` swaps
    are kept in a matrix; after a move the deltas of swaps disjoint from it are updated in
    O(1) each and the others recomputed in O(n), so an iteration costs O(n^2) (module notes).

    * **Tabu rule.** When rows ``r, s`` swap, each row's old column is recorded. A swap is tabu
      if it would put *both* rows back into columns they left within the last ``t``
      iterations; ``t`` is drawn uniformly from ``[0.9 tenure, 1.1 tenure]`` and re-drawn
      every ``2 * 1.1 * tenure`` iterations.
    * **Aspiration.** A tabu swap that gives a new best score is allowed. A swap that puts
      both rows into columns they have not left for `aspiration` iterations is forced
      (diversification).

    Parameters
    ----------
    problem : Problem
        Koopmans--Beckmann problem (optionally with linear/constant terms), or any problem whose
        dense ``K`` fits in ``DENSE_MAX_BYTES``. Batched problems are searched one instance at
        a time; ``n1 < n2`` adds dummy rows (``n = n2``).
    x0 : array of shape (n1, n2) or (b, n1max, n2max), optional
        Start, hard or soft (rounded by the Hungarian method). Default: random permutation.
    max_iter : int >= 1, optional
        Iterations per instance. Default, when `time_limit` is not given either,
        ``min(1000 n, 10^9 / n^2)`` (:func:`default_tabu_iterations`: 1000 n up to n = 100,
        about 1-10 s per instance); with only `time_limit`, no iteration limit.
    time_limit : float > 0, optional
        Wall-clock seconds for the whole call, split evenly over the instances left; checked
        every ~10 ms. Numba compilation (first call) is not counted.
    tenure : float > 0, optional
        Mean tabu tenure in iterations. Default ``n``.
    aspiration : int >= 1, optional
        Long-term aspiration horizon. Default ``5 * n * n``.
    rng : None, int, numpy.random.Generator or torch.Generator, optional
        Start and tenure draws. With `max_iter` (and no `time_limit`) the same seed gives the
        same answer.

    Returns
    -------
    MatchResult
        ``X`` (best matching seen) of shape (n1, n2) or (b, n1max, n2max) in the problem's
        library, dtype and device; ``n_iter`` sums the iterations; ``converged`` is True when
        every returned matching is verified to be a local optimum of the swap neighbourhood
        (tabu search has no other stopping criterion than its budget).

    Raises
    ------
    TypeError
        If the problem is neither Koopmans--Beckmann nor small enough for a dense ``K``.

    References
    ----------
    .. [1] É. D. Taillard, "Robust taboo search for the quadratic assignment problem",
           Parallel Computing 17(4-5), 443-455, 1991. doi:10.1016/S0167-8191(05)80147-4

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import Problem, solve
    >>> rng = np.random.default_rng(1)
    >>> A, B = rng.integers(0, 9, (7, 7)), rng.integers(0, 9, (7, 7))
    >>> p = Problem.koopmans_beckmann(A, B, sense="min")
    >>> res = solve(p, "tabu", rng=0)
    >>> import itertools
    >>> best = min((A * B[np.ix_(q, q)]).sum() for q in map(list, itertools.permutations(range(7))))
    >>> bool(res.objective == best)
    True
    """
    start = time.perf_counter()
    caller = "tabu"
    _check_common(
        problem,
        caller,
        dict(max_iter=max_iter, time_limit=time_limit, tenure=tenure, aspiration=aspiration),
        OPTIONS_TABU,
    )
    gen = backend.rng_from(rng, caller=caller)
    insts = _instances(problem, caller)
    perms0 = _start_perms(problem, x0, gen, caller)
    warm_up()
    t_run = time.perf_counter()
    perms, n_iter, local = [], 0, True
    for k, inst in enumerate(insts):
        deadline = None
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - t_run)
            deadline = time.perf_counter() + max(left, 0.0) / (len(insts) - k)
        st = _run_tabu(inst, perms0[k], max_iter, deadline, tenure, aspiration, gen)
        perms.append(st.best_p)
        n_iter += st.n_iter
        local = local and st.best_is_local
    X = _perms_to_X(problem, perms)
    return make_result(
        problem,
        X,
        soft=None,
        n_iter=n_iter,
        converged=local,
        start=start,
        info={"form": "dense" if insts and insts[0].mode == _DENSE else "kb"},
    )
