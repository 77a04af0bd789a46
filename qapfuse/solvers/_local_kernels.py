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

from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

if TYPE_CHECKING:
    from ._local_instances import _Instance

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
