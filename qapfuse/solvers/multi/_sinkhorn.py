"""Warm-started Sinkhorn for the annealing loop (numpy float64, compiled).

The annealing calls Sinkhorn on ``G(U) / tau`` some hundred times, each input close to the
last one. :func:`sinkhorn_warm` keeps the log potentials between calls (rescaled when ``tau``
changes) and iterates on scaling factors over a kernel with the potentials absorbed
(log-stabilised scaling): one ``exp`` per entry per call instead of two per entry and
iteration of the log-domain kernel, and far fewer iterations from a warm start.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Scaling factors outside ``[1 / _ABSORB, _ABSORB]`` are absorbed into the log potentials
#: (and the kernel recomputed), so the factors never overflow or underflow.
_ABSORB = 1e50


class SinkhornWarm:
    """Log potentials of the last solve, in units of the scores (``tau * f``, ``tau * g``).

    Parameters
    ----------
    mask : numpy.ndarray of bool, shape (b, r, c)
        Valid entries.
    square : numpy.ndarray of bool, shape (b,)
        Instances whose columns must sum to exactly 1 (the others: at most 1).
    """

    def __init__(self, mask: np.ndarray, square: np.ndarray):
        b, r, c = mask.shape
        self.mask = np.ascontiguousarray(mask, dtype=np.bool_)
        self.square = np.ascontiguousarray(square, dtype=np.bool_)
        self.phi_r = np.zeros((b, r))
        self.phi_c = np.zeros((b, c))

    def __call__(
        self, S: np.ndarray, tau: float, *, max_iter: int, tol: float, check_every: int = 10
    ) -> tuple[np.ndarray, int, float]:
        """Doubly stochastic ``P`` for ``S / tau``, warm-started from the last call.

        Returns ``(P, n_iter, err)`` with ``err`` the largest row-sum error at the last check.
        """
        L = np.ascontiguousarray(S, dtype=np.float64) / tau
        f = self.phi_r / tau
        g = self.phi_c / tau
        P = np.zeros_like(L)
        it, err = _sinkhorn_stab_nb(
            L, self.mask, self.square, f, g, P, int(max_iter), float(tol), int(check_every)
        )
        self.phi_r = f * tau
        self.phi_c = g * tau
        return P, it, err


@njit(cache=True)
def _lse_masked(vals: np.ndarray, valid: np.ndarray) -> float:  # pragma: no cover - compiled
    """``log(sum(exp(vals[valid])))``, and 0 when nothing is valid."""
    top = -np.inf
    for x, v in zip(vals, valid):
        if v and x > top:
            top = x
    if not math.isfinite(top):
        return 0.0
    s = 0.0
    for x, v in zip(vals, valid):
        if v:
            s += math.exp(x - top)
    return top + math.log(s)


@njit(cache=True)
def _sinkhorn_stab_nb(
    L: np.ndarray,
    mask: np.ndarray,
    square: np.ndarray,
    f: np.ndarray,
    g: np.ndarray,
    P: np.ndarray,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[int, float]:  # pragma: no cover - compiled
    """Sinkhorn on ``L`` (b, r, c) from log potentials `f` (b, r), `g` (b, c), updated in place.

    One exact log-domain row and column update first (so the kernel ``exp(L + f + g)`` has
    entries <= 1 and no row sum below ``1 / r``), then scaling on that kernel: rows
    ``u_i = 1 / sum_j E_ij v_j``, columns ``v_j = 1 / sum_i u_i E_ij`` (for non-square
    instances capped so that ``g_j + log v_j <= 0``). Factors leaving ``[1e-50, 1e50]`` are
    absorbed into ``f``, ``g`` and the kernel recomputed. Writes ``P`` (0 off the mask) and
    returns ``(most iterations of an instance, largest row-sum error)``.
    """
    b, nr, nc = L.shape
    E = np.zeros((nr, nc))
    u = np.ones(nr)
    v = np.ones(nc)
    cap = np.empty(nc)
    colsum = np.empty(nc)
    buf_r = np.empty(nc)
    buf_c = np.empty(nr)
    err_all = 0.0
    it_all = 0
    for k in range(b):
        # exact log-domain row then column update from the warm potentials
        for i in range(nr):
            for j in range(nc):
                buf_r[j] = L[k, i, j] + g[k, j]
            f[k, i] = -_lse_masked(buf_r, mask[k, i, :])
        for j in range(nc):
            for i in range(nr):
                buf_c[i] = L[k, i, j] + f[k, i]
            ge = -_lse_masked(buf_c, mask[k, :, j])
            g[k, j] = ge if square[k] or ge < 0.0 else 0.0
        u[:] = 1.0
        v[:] = 1.0
        err = np.inf
        it = 0
        for it in range(1, max_iter + 1):
            absorb = it == 1
            for i in range(nr):
                if u[i] > _ABSORB or u[i] < 1.0 / _ABSORB:
                    absorb = True
            for j in range(nc):
                if v[j] > _ABSORB or v[j] < 1.0 / _ABSORB:
                    absorb = True
            if absorb:  # fold the factors into the potentials and rebuild the kernel
                for i in range(nr):
                    f[k, i] += math.log(u[i])
                    u[i] = 1.0
                for j in range(nc):
                    g[k, j] += math.log(v[j])
                    v[j] = 1.0
                    cap[j] = math.exp(min(-g[k, j], 700.0))
                for i in range(nr):
                    for j in range(nc):
                        if mask[k, i, j]:
                            E[i, j] = math.exp(L[k, i, j] + f[k, i] + g[k, j])
                        else:
                            E[i, j] = 0.0
            for i in range(nr):
                tot = 0.0
                for j in range(nc):
                    tot += E[i, j] * v[j]
                u[i] = 1.0 / tot if tot > 0.0 else 1.0
            colsum[:] = 0.0
            for i in range(nr):
                for j in range(nc):
                    colsum[j] += E[i, j] * u[i]
            for j in range(nc):
                ve = 1.0 / colsum[j] if colsum[j] > 0.0 else 1.0
                v[j] = ve if square[k] or ve < cap[j] else cap[j]
            if it % check_every == 0 or it == max_iter:
                err = 0.0
                for i in range(nr):
                    tot = 0.0
                    for j in range(nc):
                        tot += u[i] * E[i, j] * v[j]
                    if tot > 0.0 and abs(tot - 1.0) > err:
                        err = abs(tot - 1.0)
                if err <= tol:
                    break
        for i in range(nr):
            for j in range(nc):
                P[k, i, j] = u[i] * E[i, j] * v[j]
        for i in range(nr):
            f[k, i] += math.log(u[i])
        for j in range(nc):
            g[k, j] += math.log(v[j])
        if it > it_all:
            it_all = it
        if err > err_all:
            err_all = err
    return it_all, err_all
