r"""A matrix-free graph-matching affinity: ``K`` as a short sum of Kronecker products.

For edge kernels that factor over the two edges,

.. math::  k(f, g) = \sum_{t=1}^{T} \phi_t(f)\, \psi_t(g),

the edge part of ``K`` is ``sum_t kron(B_t, A_t)`` with ``A_t[i, j] = phi_t(f_ij)`` on the
edges of graph 1 and ``B_t[a, b] = psi_t(g_ab)`` on those of graph 2, so

.. math::  \mathrm{unvec}(K \,\mathrm{vec}(X)) = \sum_t A_t X B_t^\top + L \odot X,

which costs ``T * (|E1| n2 + |E2| n1)`` multiply-adds (sparse times dense) instead of
``|E1| |E2|``, and nothing is stored beyond the ``T`` sparse factors.

* Inner product: ``<f, g> = sum_d f_d g_d``, exact with ``T = d``.
* Gaussian: with features centred (``exp(-||f - g||^2/sigma)`` is shift invariant),
  ``exp(-||f-g||^2/sigma) = e^{-||f||^2/sigma} e^{-||g||^2/sigma} exp(2<f,g>/sigma)`` and the
  last factor is expanded as ``sum_alpha (2/sigma)^{|alpha|} f^alpha g^alpha / alpha!`` over
  multi-indices with ``|alpha| <= T``. With ``z = 2 max||f|| max||g|| / sigma`` every entry of
  ``K`` is off by at most the Poisson tail ``P(N_z > T) = e^{-z} sum_{t > T} z^t / t!`` (the
  factor ``e^{-(||f||^2+||g||^2)/sigma} <= e^{-z}`` bounds the remainder of the series), and
  ``T`` is the smallest order with that tail below ``tol``.
"""

from __future__ import annotations

import math
from itertools import combinations_with_replacement
from typing import Any

import numpy as np

from .. import backend
from ..backend import Array
from ..problem import Affinity, vec
from ._inputs import CheckedGraphs, symmetric_graphs
from ._kernel import Kernel

__all__ = ["EdgeFactorAffinity", "gaussian_terms"]


def gaussian_terms(z: float, d: int, tol: float) -> tuple[int, int, float]:
    """Order ``T``, term count ``C(T + d, d)`` and entry error bound of the Gaussian expansion.

    Parameters
    ----------
    z : float >= 0
        ``2 * max||f|| * max||g|| / sigma`` of the (centred) features.
    d : int
        Feature length.
    tol : float > 0
        Wanted bound on the absolute error of every entry of ``K``.
    """
    from scipy import special  # slow to import, and needed by the Gaussian expansion only

    T = 0
    while special.pdtrc(T, z) > tol and T < 10_000:
        T += 1
    return T, math.comb(T + d, d), float(special.pdtrc(T, z)) if z > 0 else 0.0


def _multi_indices(T: int, d: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for t in range(T + 1):
        for combo in combinations_with_replacement(range(d), t):
            alpha = [0] * d
            for c in combo:
                alpha[c] += 1
            out.append(tuple(alpha))
    return out


class EdgeFactorAffinity(Affinity):
    r"""Graph-matching affinity applied as ``sum_t A_t X B_t^T + L * X``, never building ``K``.

    Made by :func:`~qapfuse.affinity.build_aff_mat` with ``format="operator"`` (or
    :func:`~qapfuse.affinity.graph_matching_problem`); every solver takes it unchanged.

    Attributes
    ----------
    kernel : Kernel
        The edge kernel (``"inner_product"`` or ``"gaussian"``).
    n_terms : list of int
        Number of Kronecker terms ``T`` per instance.
    error_bound : float
        Bound on the absolute error of every entry of the represented ``K`` against the exact
        kernel (0 for the inner product; the Poisson tail for the Gaussian, see the module
        notes). ``|matvec(X) - K vec(X)|`` is at most ``error_bound * deg1 * deg2 * max|X|``
        entrywise, with ``deg`` the largest out-degrees.
    """

    def __init__(
        self,
        factors: list[tuple[Any, Any, Any, Any]],
        L: Array | None,
        *,
        n1max: int,
        n2max: int,
        dtype: Any,
        device: Any,
        xp: Any,
        kernel: Kernel,
        n_terms: list[int],
        error_bound: float,
        symmetric: bool,
        bounds: tuple[float, float],
    ):
        self.xp, self.dtype, self.device = xp, dtype, device
        self.batch, self.n1max, self.n2max = len(factors), n1max, n2max
        self._factors = factors  # per instance: (A_stack, B_h, At_stack, Bt_h) or Nones
        self.L = L
        self.kernel = kernel
        self.n_terms = n_terms
        self.error_bound = error_bound
        self._sym = symmetric
        self._bounds = bounds
        self._torch = backend.is_torch_array(L) if L is not None else xp.__name__.endswith("torch")

    # -- products -----------------------------------------------------------------------------
    def _apply(self, X: Array, transpose: bool) -> Array:
        xp = self.xp
        n1, n2 = self.n1max, self.n2max
        outs = []
        for k, fac in enumerate(self._factors):
            A, B = (fac[2], fac[3]) if transpose else (fac[0], fac[1])
            Xk = X[k, ...]
            if A is None:
                outs.append(xp.zeros_like(Xk))
                continue
            T = A.shape[0] // max(n1, 1)
            if self._torch:
                torch = backend._torch()
                Y = torch.sparse.mm(A, Xk)  # (T*n1, n2)
                Z = Y.reshape(T, n1, n2).transpose(1, 2).reshape(T * n2, n1)
                outs.append(torch.sparse.mm(B, Z).T)
            else:
                Y = A @ Xk
                Z = np.ascontiguousarray(Y.reshape(T, n1, n2).transpose(0, 2, 1)).reshape(
                    T * n2, n1
                )
                outs.append(np.asarray(B @ Z).T)
        out = xp.stack(outs)
        if out.dtype != X.dtype:
            out = xp.astype(out, X.dtype)
        if self.L is not None:
            out = out + xp.astype(self.L, X.dtype) * X
        return out

    def matvec(self, X: Array) -> Array:
        """``unvec(K @ vec(X))`` for ``X`` of shape ``(b, n1max, n2max)``."""
        return self._apply(X, False)

    def rmatvec(self, X: Array) -> Array:
        """``unvec(K^T @ vec(X))``."""
        return self._apply(X, not self._sym)

    @property
    def symmetric(self) -> bool:
        """True when both graphs hold every edge in both directions with equal features."""
        return self._sym

    def entry_bounds(self) -> tuple[float, float]:
        """Bounds on the entries of ``K`` (within `error_bound` for the Gaussian)."""
        return self._bounds

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        """The represented ``K`` of shape ``(b, N, N)`` (refuses over `max_bytes`)."""
        self._dense_check(max_bytes)
        n1, n2 = self.n1max, self.n2max
        N = n1 * n2
        out = []
        for fac in self._factors:
            A, B = fac[0], fac[1]
            K = np.zeros((N, N), dtype=np.float64)
            if A is not None:
                An = _to_dense_np(A)
                Bn = _to_dense_np(B)
                T = An.shape[0] // max(n1, 1)
                for t in range(T):
                    K += np.kron(Bn[:, t * n2 : (t + 1) * n2], An[t * n1 : (t + 1) * n1, :])
            out.append(K)
        K = np.stack(out)
        if self.L is not None:
            Lv = backend.to_numpy(vec(self.L, xp=self.xp)).astype(np.float64)
            K[:, np.arange(N), np.arange(N)] += Lv
        ref = self.L if self.L is not None else None
        if ref is not None:
            return backend.from_numpy(K, like=ref, dtype=self.dtype)
        return backend.asarray_on(
            K.astype(str(self.dtype).replace("torch.", "")), xp=self.xp, device=self.device
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def _from_graphs(
        cls,
        g: CheckedGraphs,
        node: Array | None,
        ke: Kernel,
        dt: Any,
        *,
        tol: float,
        max_terms: int,
    ) -> EdgeFactorAffinity:
        caller = "build_aff_mat(format='operator')"
        if ke.name not in ("inner_product", "gaussian") and g.has_edge:
            raise ValueError(
                f"{caller} supports the 'inner_product' and 'gaussian' edge kernels only (a "
                f"custom kernel has no known factorisation); got {ke.name!r}. Use "
                "format='sparse'."
            )
        xp, is_torch = g.xp, g.torch
        n1max, n2max = g.g1.nmax, g.g2.nmax
        dev = None
        if is_torch:
            dev = (g.g1.node if g.has_node else g.g1.conn[0]).device
        sym = symmetric_graphs(g)
        factors, n_terms, err = [], [], 0.0
        L = None
        if node is not None:
            L = backend.to_numpy(node).astype(np.float64).copy()
        edge_lo, edge_hi = 0.0, 0.0
        for k in range(g.batch):
            if not g.has_edge or g.g1.conn[k].shape[0] == 0 or g.g2.conn[k].shape[0] == 0:
                factors.append((None, None, None, None))
                n_terms.append(0)
                continue
            c1 = backend.to_numpy(g.g1.conn[k])
            c2 = backend.to_numpy(g.g2.conn[k])
            F1 = backend.to_numpy(g.g1.feat[k]).astype(np.float64)
            F2 = backend.to_numpy(g.g2.feat[k]).astype(np.float64)
            d = F1.shape[1]
            if ke.name == "inner_product":
                P1, P2 = F1.T, F2.T  # (T, ne)
                r1 = float(np.sqrt((F1**2).sum(1)).max())
                r2 = float(np.sqrt((F2**2).sum(1)).max())
                nonneg = bool((F1 >= 0).all() and (F2 >= 0).all())
                if d == 1:
                    prods = [a * b for a in (F1.min(), F1.max()) for b in (F2.min(), F2.max())]
                    edge_lo, edge_hi = min(edge_lo, *prods), max(edge_hi, *prods)
                else:
                    edge_lo = min(edge_lo, 0.0 if nonneg else -r1 * r2)
                    edge_hi = max(edge_hi, r1 * r2)
            else:
                sigma = ke.sigma
                c = np.concatenate([F1, F2]).mean(0)
                G1, G2 = F1 - c, F2 - c
                q1, q2 = (G1**2).sum(1), (G2**2).sum(1)
                z = 2.0 * math.sqrt(q1.max()) * math.sqrt(q2.max()) / sigma
                T, count, bound = gaussian_terms(z, d, tol)
                if count > max_terms:
                    raise ValueError(
                        f"{caller}: the Gaussian expansion needs {count} terms (order {T}, "
                        f"z = 2 max|f| max|g| / sigma = {z:.3g}) for tol={tol:g}, more than "
                        f"max_terms={max_terms}. Raise sigma, tol or max_terms, or use "
                        "format='sparse'."
                    )
                err = max(err, bound)
                alphas = _multi_indices(T, d)
                P1 = np.empty((len(alphas), F1.shape[0]))
                P2 = np.empty((len(alphas), F2.shape[0]))
                # log-space weights: (2/sigma)^|alpha| / alpha! overflows for high orders
                for t, alpha in enumerate(alphas):
                    a = np.asarray(alpha)
                    half_logw = 0.5 * (
                        a.sum() * math.log(2.0 / sigma) - sum(math.lgamma(x + 1) for x in alpha)
                    )
                    P1[t] = _scaled_monomial(G1, a, half_logw - q1 / sigma)
                    P2[t] = _scaled_monomial(G2, a, half_logw - q2 / sigma)
                edge_lo, edge_hi = min(edge_lo, -bound), max(edge_hi, 1.0 + bound)
            T = P1.shape[0]
            if L is not None:  # node affinities replace self-loop pairs on the diagonal
                s1 = np.nonzero(c1[:, 0] == c1[:, 1])[0]
                s2 = np.nonzero(c2[:, 0] == c2[:, 1])[0]
                if s1.size and s2.size:
                    L[k][np.ix_(c1[s1, 0], c2[s2, 0])] -= P1[:, s1].T @ P2[:, s2]
            n_terms.append(T)
            fac = [
                _stack_rows(P1, c1, n1max, T, dt, dev, is_torch),
                _stack_cols(P2, c2, n2max, T, dt, dev, is_torch),
            ]
            if sym:
                fac += [None, None]
            else:
                fac += [
                    _stack_rows(P1, c1[:, ::-1], n1max, T, dt, dev, is_torch),
                    _stack_cols(P2, c2[:, ::-1], n2max, T, dt, dev, is_torch),
                ]
            factors.append(tuple(fac))
        lo, hi = edge_lo, edge_hi
        Lx = None
        if L is not None:
            lo, hi = min(lo, float(L.min())), max(hi, float(L.max()))
            Lx = backend.asarray_on(L, xp=xp, device=dev) if is_torch else L
            Lx = xp.astype(Lx, dt)
        return cls(
            factors,
            Lx,
            n1max=n1max,
            n2max=n2max,
            dtype=dt,
            device=dev if is_torch else "cpu",
            xp=xp,
            kernel=ke,
            n_terms=n_terms,
            error_bound=err,
            symmetric=sym,
            bounds=(lo, hi),
        )


def _scaled_monomial(G: np.ndarray, alpha: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    """``exp(log_scale) * prod_d G[:, d]^alpha_d`` per row, without overflow."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = (alpha * np.log(np.abs(G))).sum(1, where=alpha > 0)
    sign = np.prod(np.where(alpha > 0, np.sign(G) ** alpha, 1.0), axis=1)
    return sign * np.exp(logm + log_scale)


def _stack_rows(P: np.ndarray, c: np.ndarray, n: int, T: int, dt: Any, dev: Any, torch_: bool):
    """Sparse ``(T*n, n)``: rows ``t*n + start``, columns ``end``, values ``P[t, e]``."""
    ne = c.shape[0]
    rows = (np.arange(T)[:, None] * n + c[:, 0][None, :]).reshape(-1)
    cols = np.broadcast_to(c[:, 1], (T, ne)).reshape(-1)
    return _sparse(P.reshape(-1), rows, cols, (T * n, n), dt, dev, torch_)


def _stack_cols(P: np.ndarray, c: np.ndarray, n: int, T: int, dt: Any, dev: Any, torch_: bool):
    """Sparse ``(n, T*n)``: rows ``start``, columns ``t*n + end``, values ``P[t, e]``."""
    ne = c.shape[0]
    rows = np.broadcast_to(c[:, 0], (T, ne)).reshape(-1)
    cols = (np.arange(T)[:, None] * n + c[:, 1][None, :]).reshape(-1)
    return _sparse(P.reshape(-1), rows, cols, (n, T * n), dt, dev, torch_)


def _sparse(vals, rows, cols, shape, dt, dev, torch_):
    if torch_:
        torch = backend._torch()
        idx = torch.as_tensor(np.stack([rows, cols]), dtype=torch.int64, device=dev)
        v = torch.as_tensor(vals, dtype=dt, device=dev)
        return torch.sparse_coo_tensor(idx, v, shape, check_invariants=False).coalesce()
    import scipy.sparse as sp

    return sp.csr_matrix((vals.astype(dt), (rows, cols)), shape=shape)


def _to_dense_np(M: Any) -> np.ndarray:
    if backend.is_torch_array(M):
        return M.to_dense().detach().cpu().numpy().astype(np.float64)
    return np.asarray(M.todense(), dtype=np.float64)
