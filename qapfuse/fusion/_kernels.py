r"""Edge kernels of the network QAP, applied matrix-free to one edge set of two models.

For an edge set (a weight tensor) with features ``W^p`` of shape ``(n_o, n_in, f)`` in model
``p`` and ``W^q`` in model ``q``, the affinity of edge ``(j -> i)`` of ``p`` with edge
``(b -> a)`` of ``q`` is ``k(W^p[i, j], W^q[a, b])``. The QAP needs two products with it, never
the ``(n_o n_in)^2`` matrix itself:

* ``apply(Y)[i, a] = sum_{j,b} k(W^p_ij, W^q_ab) Y[j, b]`` (``Y``: matching of the inputs);
* ``apply_t(Z)[j, b] = sum_{i,a} k(W^p_ij, W^q_ab) Z[i, a]`` (``Z``: matching of the outputs).

Kernels:

* inner product ``<e, e'>``: ``apply(Y) = sum_t W^p_t Y W^{qT}_t``, which makes the objective
  Git Re-Basin's weight-matching objective (summed over models in the universe by
  :class:`~qapfuse.fusion._network_qap.NetworkQAP`, not per pair);
* Gaussian ``exp(-||e - e'||^2 / sigma)`` on scalar edges (``f = 1``): the same product over
  ``T + 1`` feature maps of a truncated Taylor expansion (:func:`gaussian_features`, the
  expansion of :class:`qapfuse.affinity.EdgeFactorAffinity`, with its Poisson-tail error bound);
* Gaussian on vector edges (``f > 1``, conv kernels): exact sums in row chunks
  (:class:`ExactGaussianPair`), ``(n_o n_in)^2 f`` operations per product, refused above a
  budget (a Taylor expansion in ``f`` variables needs ``C(T + f, f)`` terms: 10^4 to 5 10^5
  for ``f = 9`` at tolerances 1e-2 to 1e-6, more flops than the exact sum; pivoted Cholesky
  and the SVD lower bound are no cheaper at useful accuracy: measured in docs/fusion.md,
  Scale).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..affinity._operator import _scaled_monomial, gaussian_terms

__all__ = [
    "DEFAULT_EXPANSION_BYTES",
    "ExactGaussianPair",
    "gaussian_features",
    "median_sigma",
]

#: Entries of the kernel block computed at once by :class:`ExactGaussianPair`.
_CHUNK = 1 << 22

#: Default cap on one scalar layer's Gaussian feature maps (all models), in bytes.
DEFAULT_EXPANSION_BYTES = float(2**31)


class ExactGaussianPair:
    """``exp(-||e - e'||^2 / sigma)`` between two edge sets, summed exactly in row chunks.

    Parameters
    ----------
    Wp, Wq : Tensor of shape (n_o, n_in, f)
    sigma : float > 0
    """

    def __init__(self, Wp: torch.Tensor, Wq: torch.Tensor, sigma: float):
        self.n_o, self.n_in, f = Wp.shape
        self.A = Wp.reshape(-1, f)
        self.B = Wq.reshape(-1, f)
        self.a2 = (self.A**2).sum(1)
        self.b2 = (self.B**2).sum(1)
        self.sigma = sigma
        self.rows = max(1, _CHUNK // max(1, self.n_in * self.B.shape[0]))

    def _blocks(self):
        n_o, n_in = self.n_o, self.n_in
        for i0 in range(0, n_o, self.rows):
            i1 = min(n_o, i0 + self.rows)
            a = self.A[i0 * n_in : i1 * n_in]
            d2 = self.a2[i0 * n_in : i1 * n_in, None] + self.b2[None, :] - 2.0 * a @ self.B.T
            K = torch.exp(-d2.clamp_min(0.0) / self.sigma)
            yield i0, i1, K.reshape(i1 - i0, n_in, n_o, n_in)

    def apply(self, Y: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.n_o, self.n_o), dtype=Y.dtype)
        for i0, i1, K in self._blocks():
            out[i0:i1] = torch.einsum("ijab,jb->ia", K, Y)
        return out

    def apply_t(self, Z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((self.n_in, self.n_in), dtype=Z.dtype)
        for i0, i1, K in self._blocks():
            out += torch.einsum("ijab,ia->jb", K, Z[i0:i1])
        return out


def median_sigma(features: list[torch.Tensor], *, max_pairs: int = 1 << 20) -> float:
    """Median heuristic: the median of ``||e - e'||^2`` over edges of different models.

    The value depends on each model's edges as a multiset only, never on their order, so
    permuting a model's channels (which permutes its rows) leaves sigma unchanged and the
    kernel permutation-equivariant.

    Parameters
    ----------
    features : list of Tensor of shape (n, f)
        Each model's edges (or nodes) of one layer, one row per edge.
    max_pairs : int
        With at most this many cross-model pairs the median is exact; otherwise it is taken
        over ``max_pairs`` pairs drawn with a fixed seed from each model's rows in sorted
        (lexicographic) order, so the same multisets of rows give the same sigma.

    Returns
    -------
    float
        The median, or the mean when the median is 0, or 1 when every distance is 0.
    """
    F = [f.detach().double().reshape(f.shape[0], -1).numpy() for f in features]
    pairs = [(p, q) for p in range(len(F)) for q in range(p + 1, len(F))]
    total = sum(F[p].shape[0] * F[q].shape[0] for p, q in pairs)
    if total <= max_pairs:
        d2 = np.concatenate(
            [((F[p][:, None, :] - F[q][None, :, :]) ** 2).sum(-1).ravel() for p, q in pairs]
        )
    else:
        F = [_sorted_rows(f) for f in F]  # sampling by index must not see the channel order
        gen = np.random.default_rng(0)
        per = max(1, max_pairs // len(pairs))
        parts = []
        for p, q in pairs:
            i = gen.integers(F[p].shape[0], size=per)
            j = gen.integers(F[q].shape[0], size=per)
            parts.append(((F[p][i] - F[q][j]) ** 2).sum(-1))
        d2 = np.concatenate(parts)
    med = float(np.median(d2))
    if med > 0:
        return med
    mean = float(d2.mean())
    return mean if mean > 0 else 1.0


def _sorted_rows(F: np.ndarray) -> np.ndarray:
    """The rows of `F` (n, f) in lexicographic order: a canonical order of the multiset."""
    if F.shape[1] == 1:
        return np.sort(F, axis=0)
    return F[np.lexsort(F.T[::-1])]


def gaussian_features(
    values: list[torch.Tensor],
    sigma: float,
    tol: float,
    max_terms: int | None = None,
    *,
    max_bytes: float = DEFAULT_EXPANSION_BYTES,
    dtype: torch.dtype = torch.float64,
    name: str = "the layer",
) -> tuple[list[torch.Tensor], int, float]:
    r"""Feature maps of the scalar Gaussian: ``exp(-(x - y)^2 / sigma) ~ sum_t phi_t(x) phi_t(y)``.

    With ``x, y`` shifted by the midrange ``c`` of all values (the kernel is shift invariant,
    and the midrange makes ``r = max |x - c|`` smallest),
    ``exp(-(x-y)^2/sigma) = e^{-x^2/sigma} e^{-y^2/sigma} sum_t (2xy/sigma)^t / t!``, so
    ``phi_t(x) = e^{-x^2/sigma} (2/sigma)^{t/2} x^t / sqrt(t!)``, ``t = 0..T``.

    Error bound: every kernel value is off by at most the Poisson tail ``P(N_z > T)``,
    ``z = 2 r^2 / sigma`` (the dropped terms are ``e^{-(x^2+y^2)/sigma} sum_{t>T} w^t / t!``
    with ``w = 2|xy|/sigma <= (x^2 + y^2)/sigma`` and ``w <= z``), and ``T`` is the smallest
    order with that tail <= `tol` (``gaussian_terms`` of the affinity package): for large
    ``z`` about ``z + 5 sqrt(z)`` terms at ``tol = 1e-6``, so the count follows the weights'
    scale (the ratio of the largest centred weight to the median distance), not a fixed
    number. A
    product with the features is then off by at most ``bound * sum(|Y|)`` per entry.

    Parameters
    ----------
    values : list of Tensor of shape (n_o, n_in, 1)
        Each model's scalar edges of one layer.
    sigma, tol : float > 0
    max_terms : int, optional
        Largest ``T + 1`` accepted; default: no cap beyond `max_bytes`.
    max_bytes : float
        Largest size in bytes of all models' feature maps of this layer (``N n_o n_in (T + 1)``
        values of `dtype`); default 2 GiB.
    dtype : torch.dtype
        Of the returned features (they are computed in float64, one order at a time).
    name : str
        The layer, for error messages.

    Returns
    -------
    features : list of Tensor of shape (n_o, n_in, T + 1), `dtype`
    T : int
    bound : float
        The error bound on every kernel value.

    Raises
    ------
    ValueError
        If more than `max_terms` terms, or more than `max_bytes` of features, are needed.
    """
    xs = [v.detach().double().reshape(-1).numpy() for v in values]
    nonempty = [x for x in xs if x.size]
    lo = min((float(x.min()) for x in nonempty), default=0.0)
    hi = max((float(x.max()) for x in nonempty), default=0.0)
    c = 0.5 * (lo + hi)
    xs = [x - c for x in xs]
    r = 0.5 * (hi - lo)
    z = 2.0 * r * r / sigma
    T, _, bound = gaussian_terms(z, 1, tol)
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = float(sum(x.size for x in xs)) * (T + 1) * itemsize
    what = (
        f"The Gaussian expansion of {name} needs {T + 1} terms (z = 2 r^2 / sigma = {z:.3g}, "
        f"r = max|x - midrange| = {r:.3g}, sigma = {sigma:.3g}) for expansion_tol={tol:g}"
    )
    fix = (
        "raise expansion_tol or sigma (fewer terms), or use kernel='inner' or 'node' for "
        "this network."
    )
    if bound > tol:
        raise ValueError(f"{what}, and {T + 1} terms do not reach it. To fix: {fix}")
    if max_terms is not None and T + 1 > max_terms:
        raise ValueError(f"{what}, more than max_terms={max_terms}. To fix: raise max_terms, {fix}")
    if need > max_bytes:
        raise ValueError(
            f"{what}; their feature maps take {need / 2**30:.3g} GiB for {len(xs)} models, "
            f"more than max_expansion_bytes={max_bytes:.4g}. To fix: raise "
            f"max_expansion_bytes, use precision='float32' (half the memory), {fix}"
        )
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    out = []
    for x, v in zip(xs, values):
        phi = np.empty((x.size, T + 1), dtype=np_dtype)
        for t in range(T + 1):
            half_logw = 0.5 * (t * math.log(2.0 / sigma) - math.lgamma(t + 1))
            phi[:, t] = _scaled_monomial(x[:, None], np.array([t]), half_logw - x * x / sigma)
        out.append(torch.from_numpy(phi).reshape(*v.shape[:2], T + 1))
    return out, T, bound
