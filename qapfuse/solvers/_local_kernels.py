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

Kernel state
------------
The kernels keep their state in plain int64/float64 arrays, so that a time-limited driver can
run them in chunks and resume in place; each slot has a named constant (``_OPT_*``,
``_TABU_*``) and fresh states come from :func:`new_two_opt_state` and :func:`new_tabu_state`.
The update of all pairs disjoint from a move is written once, in :func:`_update_row`, which the
2-opt, tabu and pending-move loops call once per row: a helper called once per *pair*, even
with ``inline="always"``, made tabu search about 13 times slower (tai100a, 20,000
iterations: 7.2 s against 0.53 s), while the row helper keeps the same speed.

References
----------
.. [1] É. D. Taillard, "Robust taboo search for the quadratic assignment problem",
       Parallel Computing 17(4-5), 443-455, 1991. doi:10.1016/S0167-8191(05)80147-4
.. [2] R. E. Burkard, E. Çela, P. M. Pardalos, L. S. Pitsoulis, "The quadratic assignment
       problem", Handbook of Combinatorial Optimization, 1998 (2-opt / pairwise exchange).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

if TYPE_CHECKING:
    from ._local_instances import Instance

# Kernel modes: Koopmans-Beckmann (general / both matrices symmetric) and dense Lawler K.
_KB, _DENSE, _KB_SYM = 0, 1, 2
_EMPTY2 = np.zeros((0, 0), dtype=np.float64)

# Named slots of the kernels' state arrays (Numba reads module-level ints as constants, so the
# names cost nothing; the arrays stay plain int64/float64 so a chunk can resume in place).
# 2-opt, int64: local optimum reached (0/1), next pair of the first-improvement scan (r, s),
# moves made, pairs scanned since the last improving swap.
_OPT_LOCAL, _OPT_R, _OPT_S, _OPT_MOVES, _OPT_SINCE = range(5)
# Tabu, float64: current and best cost.
_TABU_CUR, _TABU_BEST = range(2)
# Tabu, int64: iterations run; the last move (u, v), whose delta update is pending (-1: none);
# best is a verified local optimum (0/1); the last move reached a new best (0/1); iteration of
# the best; a lower bound of ``last`` (long-term aspiration).
(
    _TABU_IT,
    _TABU_U,
    _TABU_V,
    _TABU_BEST_IS_LOCAL,
    _TABU_AT_BEST,
    _TABU_BEST_IT,
    _TABU_MIN_LAST,
) = range(7)


def new_two_opt_state() -> np.ndarray:
    """The int64 state of a fresh 2-opt search (scan starts at pair (0, 1))."""
    state = np.zeros(5, dtype=np.int64)
    state[_OPT_S] = 1
    return state


def new_tabu_state(cost: float, min_last: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fstate, istate)`` of a fresh tabu search at a start of cost `cost`."""
    fstate = np.zeros(2, dtype=np.float64)
    fstate[_TABU_CUR] = fstate[_TABU_BEST] = cost
    istate = np.zeros(7, dtype=np.int64)
    istate[_TABU_U] = istate[_TABU_V] = -1
    istate[_TABU_AT_BEST] = 1  # the start is the best so far: check it for local optimality
    istate[_TABU_MIN_LAST] = min_last
    return fstate, istate


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
        if mode == _KB_SYM:
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
    if mode != _DENSE:
        return _delta_kb(F, FT, G, GT, C, p, r, s)
    return _delta_dense(K, n1, p, r, s)


@njit(cache=True)
def _cost(mode, F, G, C, K, n1, p):
    """``f(p)`` (the minimised cost) from scratch, O(n^2)."""
    n = p.shape[0]
    c = 0.0
    if mode != _DENSE:
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
    if mode == _DENSE:
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
    if mode == _DENSE:
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


@njit(cache=True, inline="always")
def _kb_moved(d, a1r, a1s, a2r, a2s, b1r, b1s, b2r, b2s):
    """The O(1) KB update of the module notes: ``Δ(q; r, s)`` from ``d = Δ(p; r, s)``."""
    return d - (a1r - a1s) * (b1r - b1s) - (a2r - a2s) * (b2r - b2s)


@njit(cache=True)
def _moved(mode, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2):
    """Delta of swap (r, s) after the move (u, v), for ``{r, s}`` disjoint from ``{u, v}``.

    KB: the O(1) update of the module notes from the move vectors ``a1, a2, b1, b2``
    (:func:`_move_vectors`). Dense K: only the terms ``k = u, v`` of the sum change
    (``q_u = p_v(old)``, ``q_v = p_u(old)``).
    """
    if mode != _DENSE:
        return _kb_moved(delta[r, s], a1[r], a1[s], a2[r], a2[s], b1[r], b1[s], b2[r], b2[s])
    qu = p[u]
    qv = p[v]
    return (
        delta[r, s]
        + _hdense(K, n1, p, r, s, u, qu)
        - _hdense(K, n1, p, r, s, u, qv)
        + _hdense(K, n1, p, r, s, v, qv)
        - _hdense(K, n1, p, r, s, v, qu)
    )


@njit(cache=True, inline="always")
def _update_row(mode, K, n1, p, delta, r, u, v, a1, a2, b1, b2):
    """Bring row r of ``delta`` up to date after the move (u, v), for ``r`` not in ``{u, v}``
    (the entries ``(r, u)``, ``(r, v)`` are refreshed by :func:`_refresh_rows`).

    The one copy of the per-pair update that the 2-opt, tabu and pending-move loops share,
    a row per call (see "Kernel state" in the module notes for why not a pair per call).
    Inlined, so that the per-row call costs nothing on small problems.
    """
    n = p.shape[0]
    if mode != _DENSE:
        a1r = a1[r]
        a2r = a2[r]
        b1r = b1[r]
        b2r = b2[r]
        # Update every entry (a branch-free loop that vectorises), then put back the two that
        # _refresh_rows has already recomputed.
        keep_u = delta[r, u]
        keep_v = delta[r, v]
        for s in range(r + 1, n):
            delta[r, s] = _kb_moved(delta[r, s], a1r, a1[s], a2r, a2[s], b1r, b1[s], b2r, b2[s])
        delta[r, u] = keep_u
        delta[r, v] = keep_v
        return
    for s in range(r + 1, n):
        if s != u and s != v:
            delta[r, s] = _moved(mode, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2)


@njit(cache=True)
def _updated(mode, F, FT, G, GT, C, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2):
    """Delta of swap (r, s) after the move (u, v) (``p`` already swapped)."""
    if r == u or r == v or s == u or s == v:
        return _delta(mode, F, FT, G, GT, C, K, n1, p, r, s)
    return _moved(mode, K, n1, p, delta, r, s, u, v, a1, a2, b1, b2)


@njit(cache=True)
def _refresh_rows(mode, F, FT, G, GT, C, K, n1, p, delta, u, v):
    """Recompute (O(n) each) the deltas of all swaps that involve row u or row v."""
    if mode != _DENSE:
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
    """First-improvement 2-opt, scanning pairs cyclically from ``(state[_OPT_R], state[_OPT_S])``.

    Stops after `max_moves` swaps or `max_evals` evaluated swaps. ``state`` (int64, slots
    ``_OPT_*``, :func:`new_two_opt_state`) is updated in place. Returns the cost change made.
    """
    n = p.shape[0]
    rmax = min(n1, n - 1)
    npairs = 0
    for r in range(rmax):
        npairs += n - 1 - r
    total = 0.0
    r = state[_OPT_R]
    s = state[_OPT_S]
    since = state[_OPT_SINCE]
    moves = 0
    state[_OPT_LOCAL] = 0
    if npairs == 0:
        state[_OPT_LOCAL] = 1
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
                state[_OPT_LOCAL] = 1
                break
        s += 1
        if s >= n:
            r += 1
            if r >= rmax:
                r = 0
            s = r + 1
    state[_OPT_R] = r
    state[_OPT_S] = s
    state[_OPT_MOVES] += moves
    state[_OPT_SINCE] = since
    return total


@njit(cache=True)
def _two_opt_best(mode, F, FT, G, GT, C, K, n1, p, delta, state, max_moves, tol, a1, a2, b1, b2):
    """Best-improvement 2-opt over a maintained delta matrix (up to date on entry and exit).

    ``state``: as for :func:`_two_opt_first` (the scan slots unused). Returns the cost change.
    """
    n = p.shape[0]
    rmax = min(n1, n - 1)
    total = 0.0
    state[_OPT_LOCAL] = 0
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
            if u >= 0 and r != u and r != v:
                _update_row(mode, K, n1, p, delta, r, u, v, a1, a2, b1, b2)
            for s in range(r + 1, n):
                d = delta[r, s]
                if d < bd:
                    bd = d
                    bu = r
                    bv = s
        if bu < 0:
            state[_OPT_LOCAL] = 1
            break
        if moves >= max_moves:
            break  # budget spent; delta is up to date
        _swap(mode, G, GT, p, bu, bv)
        total += bd
        moves += 1
        state[_OPT_MOVES] += 1
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

    ``fstate`` (float64, slots ``_TABU_CUR, _TABU_BEST``) and ``istate`` (int64, slots
    ``_TABU_IT`` ... ``_TABU_MIN_LAST``) come from :func:`new_tabu_state`. ``last[i, c]`` is the
    iteration at which row i last left column c. ``delta`` is up to date except for the move
    ``(istate[_TABU_U], istate[_TABU_V])`` when ``istate[_TABU_U] >= 0`` (on entry and on
    return: the next chunk's first pass updates it).
    """
    n = p.shape[0]
    rmax = min(n1, n - 1)
    cur = fstate[_TABU_CUR]
    best = fstate[_TABU_BEST]
    it = istate[_TABU_IT]
    u = istate[_TABU_U]
    v = istate[_TABU_V]
    min_last = istate[_TABU_MIN_LAST]
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
            if u >= 0 and r != u and r != v:
                _update_row(mode, K, n1, p, delta, r, u, v, a1, a2, b1, b2)
            lastr = last[r]
            for s in range(r + 1, n):
                d = delta[r, s]
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
        if istate[_TABU_AT_BEST] == 1:
            # The previous move reached a new best: it is a local optimum iff no swap improves.
            istate[_TABU_BEST_IS_LOCAL] = 1 if t_d >= -tol else 0
            istate[_TABU_AT_BEST] = 0
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
            istate[_TABU_AT_BEST] = 1
            istate[_TABU_BEST_IS_LOCAL] = 0
            istate[_TABU_BEST_IT] = it
    fstate[_TABU_CUR] = cur
    fstate[_TABU_BEST] = best
    istate[_TABU_IT] = it
    istate[_TABU_U] = u  # the next chunk updates delta for this move first
    istate[_TABU_V] = v
    istate[_TABU_MIN_LAST] = min_last
    return it


@njit(cache=True)
def _apply_pending(mode, F, FT, G, GT, C, K, n1, p, delta, istate, a1, a2, b1, b2):
    """Bring ``delta`` up to date for the move a tabu chunk left pending (``_TABU_U, _TABU_V``)."""
    u = istate[_TABU_U]
    v = istate[_TABU_V]
    if u < 0:
        return
    _move_vectors(mode, F, FT, G, GT, p, u, v, a1, a2, b1, b2)
    _refresh_rows(mode, F, FT, G, GT, C, K, n1, p, delta, u, v)
    n = p.shape[0]
    for r in range(min(n1, n - 1)):
        if r != u and r != v:
            _update_row(mode, K, n1, p, delta, r, u, v, a1, a2, b1, b2)
    istate[_TABU_U] = -1
    istate[_TABU_V] = -1


def _initial_deltas(inst: Instance, args: tuple[Any, ...], p: np.ndarray) -> np.ndarray:
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
