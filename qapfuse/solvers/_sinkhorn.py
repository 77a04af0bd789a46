r"""The one Sinkhorn core: entropic assignment ``P = diag(u) exp(S / tau) diag(v)``.

Every Sinkhorn in qapfuse (``sinkhorn``, ``sinkhorn_slack``, ``sinkhorn_slack_sparse``,
``ga``, ``rrwm``, ``match_with_outliers``, ``gamgm``, the network QAP of model fusion) is a
:class:`Sinkhorn` state object called once per projection:

.. code-block:: python

    project = Sinkhorn(mask, square=n1 == n2, warm=True, max_iter=100, tol=1e-4)
    P = project(G, tau)      # (b, r, c); the next call starts from this call's potentials

Layouts
    *square / rectangular* (``r <= c``): rows sum to 1, columns to 1 on instances marked
    `square`, to at most 1 on the others; *slack* (``slack=(n1, n2)``): one slack row and one
    slack column per instance (capacities ``n2`` and ``n1``) so that any node may stay
    unmatched; *sparse support* (:meth:`Sinkhorn.on_support`): the slack layout on a list of
    candidate pairs, ``O(m + n1 + n2)`` per half-step.
Paths
    numpy float64 runs compiled (Numba) kernels; any other array (torch on any device,
    array_api_strict, float32) runs the same iteration in the array API, in the log domain.
Scaling form or log domain (:data:`SCALING_SPREAD`, the one threshold)
    The compiled cold path iterates on the scaling factors ``u = exp(f)``, ``v = exp(g)`` (one
    ``exp`` per entry and call, then products) when the spread ``max L - min L`` of the valid
    scores ``L = S / tau`` is at most :data:`SCALING_SPREAD` (700: ``exp(-700)`` is still a
    normal float64), and on the log potentials ``f``, ``g`` otherwise, or when a scaling factor
    overflows. Both give the same plan up to rounding. The cold compiled kernels (dense and on
    a support) test the spread themselves against this one constant; the warm compiled
    iteration (below) and the array-API path need no switch.
Warm start
    ``warm=True`` keeps the potentials of the last call (in units of the scores, so a new
    ``tau`` rescales them) and starts the next call from them: graduated assignment calls
    Sinkhorn on slowly changing scores, and a warm start saves most iterations. On the
    compiled path the warm iteration is log-stabilised scaling (one exact log-domain update,
    then scaling on the kernel with the potentials absorbed, re-absorbing factors that leave
    ``[1e-50, 1e50]``). :meth:`Sinkhorn.reset` forgets the potentials.
Many blocks
    A state holds a few arrays of the block's size and nothing else, so blocks of different
    sizes (one per channel group in model fusion) simply get one state each:
    ``states = [Sinkhorn(np.ones((r, c), bool), warm=True) for r, c in shapes]``, each
    called as ``states[k](G_k, tau)`` with ``G_k`` of shape ``(r, c)``.

The stopping test is the largest row-marginal error over rows with a valid entry, checked
every `check_every` iterations (a full pass over the plan).

References
----------
.. [1] R. Sinkhorn, P. Knopp, "Concerning nonnegative matrices and doubly stochastic
       matrices", Pacific J. Math. 21(2), 1967.
.. [2] B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
       problems", SIAM J. Sci. Comput. 41(3), 2019 (absorption of the scaling factors).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from .. import backend
from ..backend import Array

__all__ = ["SCALING_SPREAD", "Sinkhorn", "compiled"]

#: Largest spread of the valid scores ``L = S / tau`` at which the compiled path iterates on
#: scaling factors instead of log potentials.
SCALING_SPREAD = 700.0

#: Warm scaling factors outside ``[1 / _ABSORB, _ABSORB]`` are absorbed into the potentials.
_ABSORB = 1e50


def compiled(S: Any) -> bool:
    """Whether :class:`Sinkhorn` runs its compiled kernels on `S` (numpy float64, 3-D)."""
    return backend.is_numpy_array(S) and S.dtype == np.float64 and S.ndim == 3


class Sinkhorn:
    """Sinkhorn projection with warm-startable potentials, for one layout of scores.

    Parameters
    ----------
    mask : bool array of shape (b, r, c) or (r, c)
        Valid pairs (numpy or the scores' library); ``r <= c`` without slack. A 2-D mask
        makes a state for one block, called with scores of shape (r, c).
    square : bool array of shape (b,) or (b, 1, 1), optional
        Instances whose columns must sum to exactly 1 (the others: at most 1). Default: all.
        Ignored with `slack` (every marginal is then exact).
    slack : pair of int arrays of shape (b,), optional
        ``(n1, n2)``: add a slack row (capacity ``n2``, valid on columns ``< n2``) and a slack
        column (capacity ``n1``, valid on rows ``< n1``) to every instance; see
        :func:`qapfuse.solvers.match_with_outliers`.
    warm : bool
        Start each call from the previous call's potentials.
    max_iter : int >= 1
        Iterations (a row and a column update) per call.
    tol : float >= 0
        Stop when the largest row-marginal error is at most `tol`.
    check_every : int >= 1
        Iterations between two checks of the marginal error.

    Attributes
    ----------
    n_iter : int
        Iterations of the last call (the most over the batch).
    err : float
        Largest row-marginal error at the last check of the last call.
    unmatched1, unmatched2 : array or None
        With `slack`: mass on the slack column (b, r) and slack row (b, c) after the last call.
    """

    def __init__(
        self,
        mask: Any,
        *,
        square: Any = None,
        slack: tuple[Any, Any] | None = None,
        warm: bool = False,
        max_iter: int = 100,
        tol: float = 1e-6,
        check_every: int = 10,
    ):
        mask_np = np.ascontiguousarray(backend.to_numpy(mask), dtype=np.bool_)
        self._single = mask_np.ndim == 2  # one (r, c) block: calls take and give (r, c)
        if self._single:
            mask_np = mask_np[None]
        b, r, c = mask_np.shape
        self._shape = (b, r, c)
        self._slack = slack is not None
        if self._slack:
            n1, n2 = (np.asarray(n, dtype=np.int64).reshape(b) for n in slack)
            full = np.zeros((b, r + 1, c + 1), dtype=np.bool_)
            full[:, :r, :c] = mask_np
            log_a = np.zeros((b, r + 1))
            log_b = np.zeros((b, c + 1))
            for k in range(b):
                full[k, : n1[k], c] = True
                full[k, r, : n2[k]] = True
                full[k, r, c] = True
                log_a[k, r] = math.log(max(int(n2[k]), 1))
                log_b[k, c] = math.log(max(int(n1[k]), 1))
            mask_np, capped = full, np.zeros(b, dtype=np.bool_)
            self._log_a, self._log_b = log_a, log_b
        else:
            sq = np.ones(b, bool) if square is None else backend.to_numpy(square).reshape(b)
            capped = np.ascontiguousarray(~sq.astype(np.bool_))
            self._log_a = self._log_b = None  # unit masses (kept apart: exact arithmetic)
        b, r, c = mask_np.shape
        self._log_a_np = np.zeros((b, r)) if self._log_a is None else self._log_a
        self._log_b_np = np.zeros((b, c)) if self._log_b is None else self._log_b
        self._mask = mask_np
        self._capped = capped
        self._support: tuple[np.ndarray, np.ndarray, int, int] | None = None
        self.warm = bool(warm)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.check_every = int(check_every)
        self._on: dict[Any, Any] = {}  # per-device copies of the layout (array-API path)
        self.reset()

    @classmethod
    def on_support(
        cls,
        rows: np.ndarray,
        cols: np.ndarray,
        n1: int,
        n2: int,
        *,
        max_iter: int = 200,
        tol: float = 1e-6,
        check_every: int = 5,
    ) -> Sinkhorn:
        """Slack layout on the pairs ``(rows[e], cols[e])`` of an ``n1 x n2`` block (numpy).

        Calling the state with scores of shape (m,) returns the plan on the support (m,) and
        sets ``unmatched1`` (n1,) and ``unmatched2`` (n2,). Always cold.
        """
        self = cls(np.zeros((1, 0, 0), bool), max_iter=max_iter, tol=tol, check_every=check_every)
        self._slack = True
        self._support = (
            np.ascontiguousarray(rows, dtype=np.int64),
            np.ascontiguousarray(cols, dtype=np.int64),
            int(n1),
            int(n2),
        )
        return self

    def reset(self) -> None:
        """Forget the potentials: the next call starts cold."""
        self._f: Any = None  # row potentials times tau (units of the scores)
        self._g: Any = None  # column potentials times tau
        self.n_iter, self.err = 0, math.inf
        self.unmatched1 = self.unmatched2 = None

    def __call__(self, S: Array, tau: float = 1.0, *, slack: float = 0.0) -> Array:
        """Plan of ``S / tau`` (slack entries score ``slack / tau``), same library as `S`.

        Parameters
        ----------
        S : array of shape (b, r, c), (r, c) for a 2-D mask, or (m,) on a support
            Scores.
        tau : float > 0
            Temperature.
        slack : float
            Score of a slack entry (slack layouts only).

        Returns
        -------
        P : array like `S`
            The plan on the pairs (slack row and column excluded); 0 off the mask.
        """
        if self._support is not None:
            return self._on_support(S, tau, slack)
        if self._single:
            P = self._batched(backend.namespace_of(S).expand_dims(S, axis=0), tau, slack)
            if self._slack:
                self.unmatched1, self.unmatched2 = self.unmatched1[0, ...], self.unmatched2[0, ...]
            return P[0, ...]
        return self._batched(S, tau, slack)

    def _batched(self, S: Array, tau: float, slack: float) -> Array:
        L = S / tau
        if self._slack:
            L = self._augment(L, slack / tau)
        if compiled(L):
            P = self._compiled(L, tau)
        else:
            P = self._array_api(L, tau)
        if not self._slack:
            return P
        r, c = self._shape[1], self._shape[2]
        self.unmatched1, self.unmatched2 = P[:, :r, c], P[:, r, :c]
        return P[:, :r, :c]

    def _augment(self, L: Array, slack_L: float) -> Array:
        """``L`` (b, r, c) with a slack column and row scoring `slack_L` (b, r+1, c+1)."""
        if backend.is_numpy_array(L):
            b, r, c = L.shape
            out = np.full((b, r + 1, c + 1), slack_L, dtype=L.dtype)
            out[:, :r, :c] = L
            return out
        xp = backend.namespace_of(L)
        b, r, c = L.shape
        full = xp.full((b, r + 1, c + 1), slack_L, dtype=L.dtype, device=backend.device(L))
        return xp.concat([xp.concat([L, full[:, :r, c:]], axis=2), full[:, r:, :]], axis=1)

    def _compiled(self, L: np.ndarray, tau: float) -> np.ndarray:
        L = np.ascontiguousarray(L)
        args = (self._mask, self._capped, self._log_a_np, self._log_b_np)
        if self.warm:
            b, r, c = L.shape
            f = np.zeros((b, r)) if self._f is None else self._f / tau
            g = np.zeros((b, c)) if self._g is None else self._g / tau
            P = np.zeros_like(L)
            it, err = _warm_scaling_nb(L, *args, f, g, P, self.max_iter, self.tol, self.check_every)
            self._f, self._g = f * tau, g * tau
        else:
            # the cold kernels write log P (-inf off the mask); one numpy exp gives the plan
            P = np.full_like(L, -np.inf)
            ok, it, err = _scaling_nb(
                L, *args, SCALING_SPREAD, P, self.max_iter, self.tol, self.check_every
            )
            if not ok:
                it, err = _log_nb(L, *args, P, self.max_iter, self.tol, self.check_every)
            P = np.exp(P, out=P)
        self.n_iter, self.err = it, err
        return P

    def _array_api(self, L: Array, tau: float) -> Array:
        xp = backend.namespace_of(L)
        dev = backend.device(L)
        key = (id(xp), str(dev), L.dtype)
        if key not in self._on:
            on = lambda a: backend.asarray_on(a, xp=xp, device=dev)  # noqa: E731
            b = self._mask.shape[0]
            lay = {
                "mask": on(self._mask),
                "row_valid": on(self._mask.any(axis=2)[:, :, None]),
                "square": on(~self._capped[:, None, None]),
                "capped": bool(self._capped.any()),
            }
            if self._log_a is not None:
                lay["log_a"] = xp.astype(on(self._log_a.reshape(b, -1, 1)), L.dtype)
                lay["log_b"] = xp.astype(on(self._log_b.reshape(b, 1, -1)), L.dtype)
            self._on[key] = lay
        lay = self._on[key]
        g0 = self._g / tau if self.warm and self._g is not None else None
        P, g, it, err = _log_xp(
            L,
            g0,
            lay,
            max_iter=self.max_iter,
            tol=self.tol,
            check_every=self.check_every,
            xp=xp,
        )
        if self.warm:
            self._g = g * tau
        self.n_iter, self.err = it, err
        return P

    def _on_support(self, values: np.ndarray, tau: float, slack: float) -> np.ndarray:
        rows, cols, n1, n2 = self._support
        L, sL = values / tau, slack / tau
        args = (L, rows, cols, n1, n2, sL, self.max_iter, self.tol, self.check_every)
        p, u1, u2, it, err, ok = _support_scaling_nb(*args, SCALING_SPREAD)
        if not ok:
            lp, l1, l2, it, err = _support_log_nb(*args)
            p, u1, u2 = np.exp(lp), np.exp(l1), np.exp(l2)
        self.unmatched1, self.unmatched2 = u1, u2
        self.n_iter, self.err = it, err
        return p


# --------------------------------------------------------------------------------------
# array-API path (torch on any device, array_api_strict, float32): log domain
# --------------------------------------------------------------------------------------


def _log_xp(
    L: Array,
    g0: Array | None,
    lay: dict[str, Any],
    *,
    max_iter: int,
    tol: float,
    check_every: int,
    xp: Any,
) -> tuple[Array, Array, int, float]:
    """Log-domain Sinkhorn on ``L`` (b, r, c) from column potentials `g0` (b, 1, c) or 0.

    Returns ``(P, g, n_iter, err)``. Unit masses are left out of the arithmetic (not added as
    ``log 1 = 0``) so that square and rectangular plans are bit-for-bit the plain iteration.
    """
    neg_inf = xp.asarray(-xp.inf, dtype=L.dtype, device=backend.device(L))
    L = xp.where(lay["mask"], L, neg_inf)
    if g0 is None:
        g = xp.zeros((L.shape[0], 1, L.shape[2]), dtype=L.dtype, device=backend.device(L))
    else:
        g = g0
    log_a, log_b = lay.get("log_a"), lay.get("log_b")
    target = 1.0 if log_a is None else xp.exp(log_a)
    err, it = math.inf, 0
    for it in range(1, max_iter + 1):
        f = -backend.logsumexp(L + g, axis=2, xp=xp)
        if log_a is not None:
            f = log_a + f
        g = -backend.logsumexp(L + f, axis=1, xp=xp)
        if log_b is not None:
            g = log_b + g
        if lay["capped"]:
            g = xp.where(lay["square"], g, xp.minimum(g, xp.zeros_like(g)))
        if it % check_every == 0 or it == max_iter:
            rows = xp.sum(xp.exp(L + f + g), axis=2, keepdims=True)
            gap = xp.abs(rows - target)
            err = float(xp.max(xp.where(lay["row_valid"], gap, xp.zeros_like(rows))))
            if err <= tol:
                break
    return xp.exp(L + f + g), g, it, err


# --------------------------------------------------------------------------------------
# compiled path (numpy float64): dense kernels
# --------------------------------------------------------------------------------------


@njit(cache=True)
def _row_error(rows: np.ndarray, log_a: np.ndarray, valid: np.ndarray) -> float:  # pragma: no cover
    """Largest ``|rows[i] - exp(log_a[i])|`` over the rows with ``valid[i]``."""
    err = 0.0
    for i in range(rows.shape[0]):
        if valid[i]:
            d = abs(rows[i] - math.exp(log_a[i]))
            if d > err:
                err = d
    return err


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
def _scaling_nb(
    L, mask, capped, log_a, log_b, spread_max, logP, max_iter, tol, check_every
):  # pragma: no cover - compiled
    """Cold Sinkhorn-Knopp on ``E = exp(L - max L)`` (b, r, c); writes ``log P`` on the mask.

    Row update ``u_i = a_i / sum_j E_ij v_j``, column update ``v_j = b_j / sum_i u_i E_ij``
    (capped at 1 on `capped` instances); an empty row or column keeps factor 1. Returns
    ``(ok, n_iter, err)``; ``ok`` is False (and `logP` unset) when the valid entries of `L` span
    more than `spread_max` or a factor overflows: take the log domain then.
    """
    b, nr, nc = L.shape
    top, low = -np.inf, np.inf
    for k in range(b):
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j]:
                    top = max(top, L[k, i, j])
                    low = min(low, L[k, i, j])
    if top - low > spread_max:  # (all masked: -inf - inf, not > spread_max)
        return False, 0, np.inf
    E = np.zeros((b, nr, nc))
    a = np.exp(log_a)
    bm = np.exp(log_b)
    tops = np.full(b, -np.inf)  # per-instance max of L over the mask: E is exp(L - top)
    for k in range(b):
        tk = -np.inf
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j] and L[k, i, j] > tk:
                    tk = L[k, i, j]
        tops[k] = tk
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j]:
                    E[k, i, j] = math.exp(L[k, i, j] - tk)
    u = np.ones((b, nr))
    v = np.ones((b, nc))
    colsum = np.empty(nc)
    rows = np.empty(nr)
    valid = np.empty(nr, dtype=np.bool_)
    err = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        for k in range(b):
            for i in range(nr):
                tot = 0.0
                for j in range(nc):
                    tot += E[k, i, j] * v[k, j]
                u[k, i] = a[k, i] / tot if tot > 0.0 else 1.0
            colsum[:] = 0.0
            for i in range(nr):
                for j in range(nc):
                    colsum[j] += E[k, i, j] * u[k, i]
            for j in range(nc):
                ve = bm[k, j] / colsum[j] if colsum[j] > 0.0 else 1.0
                v[k, j] = ve if not capped[k] or ve < 1.0 else 1.0
        if it % check_every == 0 or it == max_iter:
            err = 0.0
            for k in range(b):
                for i in range(nr):
                    tot = 0.0
                    valid[i] = False
                    for j in range(nc):
                        tot += u[k, i] * E[k, i, j] * v[k, j]
                        valid[i] = valid[i] or mask[k, i, j]
                    rows[i] = tot
                err = max(err, _row_error(rows, log_a[k], valid))
            if err <= tol:
                break
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
        return False, it, err
    for k in range(b):
        tk = tops[k]
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j]:
                    logP[k, i, j] = (L[k, i, j] - tk) + math.log(u[k, i]) + math.log(v[k, j])
    return True, it, err


@njit(cache=True, inline="always")
def _log_update(L, mask, capped, log_a, log_b, f, g, k, buf_r, buf_c):  # pragma: no cover
    """One log-domain row then column update of instance `k` (potentials `f`, `g` in place).

    A capped instance (columns summing to at most 1) keeps its column potentials <= 0.
    """
    nr, nc = L.shape[1], L.shape[2]
    for i in range(nr):
        for j in range(nc):
            buf_r[j] = L[k, i, j] + g[k, j]
        f[k, i] = log_a[k, i] - _lse_masked(buf_r, mask[k, i, :])
    for j in range(nc):
        for i in range(nr):
            buf_c[i] = L[k, i, j] + f[k, i]
        ge = log_b[k, j] - _lse_masked(buf_c, mask[k, :, j])
        g[k, j] = ge if not capped[k] or ge < 0.0 else 0.0


@njit(cache=True)
def _log_nb(L, mask, capped, log_a, log_b, logP, max_iter, tol, check_every):  # pragma: no cover
    """Cold log-domain Sinkhorn on ``L`` (b, r, c); writes ``log P = L + f + g`` on the mask.

    ``f_i = log a_i - lse_j(L_ij + g_j)``, ``g_j = log b_j - lse_i(L_ij + f_i)`` (capped at 0
    on `capped` instances). Returns ``(n_iter, err)``.
    """
    b, nr, nc = L.shape
    f = np.zeros((b, nr))
    g = np.zeros((b, nc))
    buf_r = np.empty(nc)
    buf_c = np.empty(nr)
    rows = np.empty(nr)
    valid = np.empty(nr, dtype=np.bool_)
    err = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        for k in range(b):
            _log_update(L, mask, capped, log_a, log_b, f, g, k, buf_r, buf_c)
        if it % check_every == 0 or it == max_iter:
            err = 0.0
            for k in range(b):
                for i in range(nr):
                    tot = 0.0
                    valid[i] = False
                    for j in range(nc):
                        if mask[k, i, j]:
                            tot += math.exp(L[k, i, j] + f[k, i] + g[k, j])
                            valid[i] = True
                    rows[i] = tot
                err = max(err, _row_error(rows, log_a[k], valid))
            if err <= tol:
                break
    for k in range(b):
        for i in range(nr):
            for j in range(nc):
                if mask[k, i, j]:
                    logP[k, i, j] = L[k, i, j] + f[k, i] + g[k, j]
    return it, err


@njit(cache=True, nogil=True)  # nogil: independent blocks may be projected in threads
def _warm_scaling_nb(
    L, mask, capped, log_a, log_b, f, g, P, max_iter, tol, check_every
):  # pragma: no cover - compiled
    """Warm, log-stabilised Sinkhorn on ``L`` (b, r, c) from potentials `f`, `g` (in place).

    One exact log-domain row and column update first (so the kernel ``exp(L + f + g)`` has
    entries <= 1 and no row sum below ``1 / r``), then scaling on that kernel: rows
    ``u_i = a_i / sum_j E_ij v_j``, columns ``v_j = b_j / sum_i u_i E_ij`` (on `capped`
    instances capped so that ``g_j + log v_j <= 0``). Factors leaving ``[1e-50, 1e50]`` are
    absorbed into ``f``, ``g`` and the kernel recomputed. Each instance stops on its own.
    Writes ``P`` (0 off the mask) and returns ``(most iterations, largest row error)``.
    """
    b, nr, nc = L.shape
    E = np.zeros((nr, nc))
    u = np.ones(nr)
    v = np.ones(nc)
    cap = np.empty(nc)
    colsum = np.empty(nc)
    buf_r = np.empty(nc)
    buf_c = np.empty(nr)
    rows = np.empty(nr)
    err_all = 0.0
    it_all = 0
    for k in range(b):
        a = np.exp(log_a[k])
        bm = np.exp(log_b[k])
        # exact log-domain row then column update from the warm potentials
        _log_update(L, mask, capped, log_a, log_b, f, g, k, buf_r, buf_c)
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
                u[i] = a[i] / tot if tot > 0.0 else 1.0
            colsum[:] = 0.0
            for i in range(nr):
                for j in range(nc):
                    colsum[j] += E[i, j] * u[i]
            for j in range(nc):
                ve = bm[j] / colsum[j] if colsum[j] > 0.0 else 1.0
                v[j] = ve if not capped[k] or ve < cap[j] else cap[j]
            if it % check_every == 0 or it == max_iter:
                for i in range(nr):
                    tot = 0.0
                    for j in range(nc):
                        tot += u[i] * E[i, j] * v[j]
                    rows[i] = tot
                err = _row_error(rows, log_a[k], rows > 0.0)
                if err <= tol:
                    break
        for i in range(nr):
            for j in range(nc):
                P[k, i, j] = u[i] * E[i, j] * v[j]
        for i in range(nr):
            f[k, i] += math.log(u[i])
        for j in range(nc):
            g[k, j] += math.log(v[j])
        it_all = max(it_all, it)
        err_all = max(err_all, err)
    return it_all, err_all


# --------------------------------------------------------------------------------------
# compiled path: slack layout on a sparse support (m pairs of an n1 x n2 block)
# --------------------------------------------------------------------------------------


@njit(cache=True)
def _lse_groups(L, idx, h, n, extra):  # pragma: no cover - compiled
    """``out[i] = log(sum_{e: idx[e] = i} exp(L[e] + h[e]) + exp(extra[i]))`` for i < n."""
    mx = extra.copy()
    for e in range(L.shape[0]):
        x = L[e] + h[e]
        if x > mx[idx[e]]:
            mx[idx[e]] = x
    sm = np.zeros(n)
    for i in range(n):
        sm[i] = np.exp(extra[i] - mx[i])
    for e in range(L.shape[0]):
        sm[idx[e]] += np.exp(L[e] + h[e] - mx[idx[e]])
    return mx + np.log(sm)


@njit(cache=True)
def _lse_plus(x, extra):  # pragma: no cover - compiled
    """``log(sum(exp(x)) + exp(extra))``."""
    mx = extra
    for v in x:
        mx = max(mx, v)
    s = np.exp(extra - mx)
    for v in x:
        s += np.exp(v - mx)
    return mx + np.log(s)


@njit(cache=True)
def _support_log_nb(L, rows, cols, n1, n2, sL, max_iter, tol, check_every):  # pragma: no cover
    """Log-domain Sinkhorn on support scores ``L`` (m,) plus a slack row and column.

    Rows ``i < n1`` have mass 1, the slack row ``n2``; columns ``a < n2`` mass 1, the slack
    column ``n1``; every slack entry (corner included) scores ``sL``. Returns the plan on the
    support, the masses on the slack column (n1,) and row (n2,), all as logarithms,
    ``n_iter`` and the largest row-marginal error.
    """
    f = np.zeros(n1)
    g = np.zeros(n2)
    fs, gs = 0.0, 0.0
    la, lb = np.log(max(n2, 1)), np.log(max(n1, 1))
    err, it = np.inf, 0
    for it in range(1, max_iter + 1):
        f = -_lse_groups(L, rows, g[cols], n1, np.full(n1, sL + gs))
        fs = la - _lse_plus(sL + g, sL + gs)
        g = -_lse_groups(L, cols, f[rows], n2, np.full(n2, sL + fs))
        gs = lb - _lse_plus(sL + f, sL + fs)
        if it % check_every == 0 or it == max_iter:
            r = _lse_groups(L, rows, g[cols], n1, np.full(n1, sL + gs)) + f
            err = 0.0
            for i in range(n1):
                err = max(err, abs(np.exp(r[i]) - 1.0))
            err = max(err, abs(np.exp(_lse_plus(sL + g, sL + gs) + fs) - n2))
            if err <= tol:
                break
    return L + f[rows] + g[cols], sL + f + gs, sL + fs + g, it, err


@njit(cache=True)
def _support_scaling_nb(
    L, rows, cols, n1, n2, sL, max_iter, tol, check_every, spread_max
):  # pragma: no cover - compiled
    """Scaling form of :func:`_support_log_nb`: one ``exp`` per entry, then products.

    Returns ``(p, unmatched1, unmatched2, n_iter, err, ok)``; ``ok`` is False when the scores
    span more than `spread_max` or the scalings overflow: take the log domain then.
    """
    m = L.shape[0]
    top, low = sL, sL
    for e in range(m):
        top = max(top, L[e])
        low = min(low, L[e])
    p = np.zeros(m)
    if top - low > spread_max:
        return p, np.zeros(n1), np.zeros(n2), 0, np.inf, False
    E = np.exp(L - top)
    Es = np.exp(sL - top)
    u = np.zeros(n1)
    v = np.ones(n2)
    us, vs = 0.0, 1.0
    err, it = np.inf, 0
    acc1 = np.zeros(n1)
    acc2 = np.zeros(n2)
    for it in range(1, max_iter + 1):
        acc1[:] = Es * vs
        for e in range(m):
            acc1[rows[e]] += E[e] * v[cols[e]]
        u = 1.0 / acc1
        us = n2 / (Es * (v.sum() + vs))
        acc2[:] = Es * us
        for e in range(m):
            acc2[cols[e]] += E[e] * u[rows[e]]
        v = 1.0 / acc2
        vs = n1 / (Es * (u.sum() + us))
        if it % check_every == 0 or it == max_iter:
            acc1[:] = Es * vs
            for e in range(m):
                acc1[rows[e]] += E[e] * v[cols[e]]
            err = np.max(np.abs(u * acc1 - 1.0)) if n1 else 0.0
            err = max(err, abs(us * Es * (v.sum() + vs) - n2))
            if err <= tol:
                break
    for e in range(m):
        p[e] = u[rows[e]] * E[e] * v[cols[e]]
    u1 = u * Es * vs
    u2 = us * Es * v
    ok = np.all(np.isfinite(p)) and np.all(np.isfinite(u1)) and np.all(np.isfinite(u2))
    return p, u1, u2, it, err, ok
