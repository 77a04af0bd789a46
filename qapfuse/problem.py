r"""Quadratic assignment problems and the affinity operators behind them.

A :class:`Problem` is the Lawler QAP

.. math::  \max_X \; \mathrm{vec}(X)^\top K \, \mathrm{vec}(X)

over (partial) assignment matrices ``X`` of shape ``(n1, n2)``, ``n1 <= n2``, with ``vec``
column-major (pair ``(i, a)`` at index ``i + a*n1``, pygmtools' layout). Solvers never need
``K`` itself, only ``K @ vec(X)``: an *affinity operator* supplies that as ``matvec(X)`` on
arrays of shape ``(b, n1max, n2max)``. Implementations:

* :class:`DenseAffinity` -- an explicit ``K`` of shape ``(b, n1n2, n1n2)``;
* :class:`SparseAffinity` -- scipy.sparse or torch sparse ``K`` (one per instance);
* :class:`KoopmansBeckmannAffinity` -- ``K = w * kron(B, A)`` applied as ``w * A X B^T``;
* :class:`LinearAffinity` -- a linear term ``<L, X>`` (``diag(vec(L))`` in Lawler form);
* :class:`ConstantAffinity` -- ``c * 11^T`` restricted to valid pairs;
* :class:`SumAffinity` -- any sum of the above.

All operators are batched: instance ``k`` has ``n1[k] <= n1max`` rows and ``n2[k] <= n2max``
columns, and padded entries are zero.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backend
from ._validation import Option, check_choice, check_finite, check_scalar, validate_options
from .backend import Array

__all__ = [
    "DENSE_MAX_BYTES",
    "Affinity",
    "ConstantAffinity",
    "DenseAffinity",
    "KoopmansBeckmannAffinity",
    "LinearAffinity",
    "Problem",
    "SparseAffinity",
    "SumAffinity",
    "dense_nbytes",
]

#: Largest dense ``K`` (in bytes) that qapfuse builds without being asked for more
#: (``max_bytes=``). Override with the environment variable ``QAPFUSE_DENSE_MAX_BYTES``.
DENSE_MAX_BYTES: int = int(os.environ.get("QAPFUSE_DENSE_MAX_BYTES", 2 * 2**30))


def dense_nbytes(batch: int, n1: int, n2: int, itemsize: int = 8) -> int:
    """Bytes a dense ``(batch, n1*n2, n1*n2)`` affinity matrix takes."""
    return int(batch) * (int(n1) * int(n2)) ** 2 * int(itemsize)


def _check_dense_budget(batch: int, n1: int, n2: int, itemsize: int, max_bytes: int | None) -> None:
    limit = DENSE_MAX_BYTES if max_bytes is None else max_bytes
    need = dense_nbytes(batch, n1, n2, itemsize)
    if need > limit:
        raise MemoryError(
            f"A dense K for batch={batch}, n1={n1}, n2={n2} needs {need:,} bytes, more than "
            f"the limit of {limit:,} bytes (max_bytes / QAPFUSE_DENSE_MAX_BYTES). Use the "
            "operator form instead: Problem.koopmans_beckmann(A, B) or a sparse K."
        )


def vec(X: Array, *, xp: Any) -> Array:
    """Column-major ``vec``: ``(b, n1, n2) -> (b, n1*n2)``, pair ``(i, a)`` at ``i + a*n1``."""
    b, n1, n2 = X.shape
    return xp.reshape(xp.permute_dims(X, (0, 2, 1)), (b, n1 * n2))


def unvec(v: Array, n1: int, n2: int, *, xp: Any) -> Array:
    """Inverse of :func:`vec`: ``(b, n1*n2) -> (b, n1, n2)``."""
    return xp.permute_dims(xp.reshape(v, (v.shape[0], n2, n1)), (0, 2, 1))


# ----------------------------------------------------------------------------------------------
# Affinity operators
# ----------------------------------------------------------------------------------------------


class Affinity:
    """Base class of affinity operators: ``matvec`` on ``(b, n1max, n2max)`` arrays.

    Subclasses set ``xp``, ``dtype``, ``device``, ``batch``, ``n1max``, ``n2max`` and implement
    :meth:`matvec`, :meth:`to_dense` and :meth:`entry_bounds`.
    """

    xp: Any
    dtype: Any
    device: Any
    batch: int
    n1max: int
    n2max: int

    def matvec(self, X: Array) -> Array:
        """``unvec(K @ vec(X))`` for ``X`` of shape ``(b, n1max, n2max)``; same shape back."""
        raise NotImplementedError

    def rmatvec(self, X: Array) -> Array:
        """``unvec(K^T @ vec(X))``; equal to :meth:`matvec` for symmetric ``K``."""
        raise NotImplementedError

    @property
    def symmetric(self) -> bool:
        """Whether ``K`` is symmetric (then ``rmatvec == matvec``)."""
        raise NotImplementedError

    def gradient(self, X: Array) -> Array:
        """``(K + K^T) vec(X)``, the gradient of the score, as an array of X's shape."""
        if self.symmetric:
            return 2.0 * self.matvec(X)
        return self.matvec(X) + self.rmatvec(X)

    def score(self, X: Array) -> Array:
        """``vec(X)^T K vec(X)`` per instance, shape ``(b,)``."""
        xp = self.xp
        return xp.sum(X * self.matvec(X), axis=(1, 2))

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        """The explicit ``K`` of shape ``(b, n1max*n2max, n1max*n2max)``."""
        raise NotImplementedError

    def entry_bounds(self) -> tuple[float, float]:
        """Lower and upper bounds on the entries of ``K`` (over the whole batch)."""
        raise NotImplementedError

    def __add__(self, other: Affinity) -> SumAffinity:
        return SumAffinity([self, other])

    def _dense_check(self, max_bytes: int | None) -> None:
        itemsize = np.dtype(_np_dtype_name(self.dtype)).itemsize
        _check_dense_budget(self.batch, self.n1max, self.n2max, itemsize, max_bytes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch={self.batch}, n1max={self.n1max}, "
            f"n2max={self.n2max}, dtype={self.dtype})"
        )


def _np_dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "").replace("array_api_strict.", "")


class DenseAffinity(Affinity):
    """Explicit Lawler ``K`` of shape ``(b, n1max*n2max, n1max*n2max)`` (column-major pairs)."""

    def __init__(self, K: Array, n1max: int, n2max: int):
        self.xp = backend.namespace_of(K, name="K")
        self.K = K
        self._symmetric: bool | None = None
        self.dtype, self.device = K.dtype, backend.device(K)
        self.batch, self.n1max, self.n2max = K.shape[0], n1max, n2max

    def matvec(self, X: Array) -> Array:
        xp = self.xp
        v = vec(X, xp=xp)
        Kv = xp.matmul(self.K, v[..., None])[..., 0]
        return unvec(Kv, self.n1max, self.n2max, xp=xp)

    def rmatvec(self, X: Array) -> Array:
        xp = self.xp
        v = vec(X, xp=xp)
        Kv = xp.matmul(v[:, None, :], self.K)[:, 0, :]
        return unvec(Kv, self.n1max, self.n2max, xp=xp)

    @property
    def symmetric(self) -> bool:
        if self._symmetric is None:
            xp, K = self.xp, self.K
            diff = float(xp.max(xp.abs(K - xp.permute_dims(K, (0, 2, 1))))) if K.size else 0.0
            self._symmetric = diff <= 1e-12 * max(float(xp.max(xp.abs(K))) if K.size else 0, 1.0)
        return self._symmetric

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        return self.K

    def entry_bounds(self) -> tuple[float, float]:
        return float(self.xp.min(self.K)), float(self.xp.max(self.K))


class SparseAffinity(Affinity):
    """Sparse Lawler ``K``: ``b`` scipy.sparse or torch sparse matrices of shape (n1n2, n1n2)."""

    def __init__(self, Ks: Sequence[Any], n1max: int, n2max: int):
        self.Ks = list(Ks)
        first = self.Ks[0]
        self.is_torch = backend.is_torch_array(first)
        if self.is_torch:
            self.xp = backend.namespace_of(first.to_dense()[:0], name="K")
            self.dtype, self.device = first.dtype, first.device
        else:
            self.xp = backend.namespace_of(np.empty(0), name="K")
            self.dtype, self.device = np.dtype(first.dtype), "cpu"
        self.batch, self.n1max, self.n2max = len(self.Ks), n1max, n2max
        self._symmetric: bool | None = None

    def matvec(self, X: Array) -> Array:
        xp = self.xp
        v = vec(X, xp=xp)
        if self.is_torch:
            torch = backend._torch()
            out = [torch.sparse.mm(K, v[k][:, None])[:, 0] for k, K in enumerate(self.Ks)]
        else:
            out = [np.asarray(K @ v[k]) for k, K in enumerate(self.Ks)]
        return unvec(xp.stack(out), self.n1max, self.n2max, xp=xp)

    def rmatvec(self, X: Array) -> Array:
        xp = self.xp
        v = vec(X, xp=xp)
        if self.is_torch:
            torch = backend._torch()
            out = [torch.sparse.mm(K.t(), v[k][:, None])[:, 0] for k, K in enumerate(self.Ks)]
        else:
            out = [np.asarray(K.T @ v[k]) for k, K in enumerate(self.Ks)]
        return unvec(xp.stack(out), self.n1max, self.n2max, xp=xp)

    @property
    def symmetric(self) -> bool:
        if self._symmetric is None:
            if self.is_torch:
                self._symmetric = (
                    all(bool((K.to_dense() == K.to_dense().T).all()) for K in self.Ks)
                    if self.n1max * self.n2max <= 4096
                    else False
                )
            else:
                self._symmetric = all((K != K.T).nnz == 0 for K in self.Ks)
        return self._symmetric

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        self._dense_check(max_bytes)
        if self.is_torch:
            return self.xp.stack([K.to_dense() for K in self.Ks])
        return np.stack([np.asarray(K.todense()) for K in self.Ks])

    def entry_bounds(self) -> tuple[float, float]:
        if self.is_torch:
            vals = [
                K.coalesce().values() if K.layout == backend._torch().sparse_coo else K.values()
                for K in self.Ks
            ]
            lo = min([float(v.min()) for v in vals if v.numel()] + [0.0])
            hi = max([float(v.max()) for v in vals if v.numel()] + [0.0])
        else:
            lo = min([float(K.data.min()) for K in self.Ks if K.nnz] + [0.0])
            hi = max([float(K.data.max()) for K in self.Ks if K.nnz] + [0.0])
        return lo, hi


class KoopmansBeckmannAffinity(Affinity):
    """``K = weight * kron(B, A)``, applied as ``weight * A @ X @ B^T`` without building ``K``.

    ``A`` has shape ``(b, n1max, n1max)``, ``B`` ``(b, n2max, n2max)`` (zero-padded), so
    ``score(X) = weight * <X, A X B^T> = weight * sum_ij A[i,j] B[p(i), p(j)]`` for a
    permutation ``p``.
    """

    def __init__(self, A: Array, B: Array, weight: float = 1.0):
        self.xp = backend.namespace_of(A, B, name="A, B")
        self.A, self.B, self.weight = A, B, float(weight)
        self._symmetric: bool | None = None
        self.dtype, self.device = A.dtype, backend.device(A)
        self.batch, self.n1max, self.n2max = A.shape[0], A.shape[1], B.shape[1]

    def matvec(self, X: Array) -> Array:
        xp = self.xp
        out = xp.matmul(xp.matmul(self.A, X), xp.permute_dims(self.B, (0, 2, 1)))
        return out if self.weight == 1.0 else self.weight * out

    def rmatvec(self, X: Array) -> Array:
        xp = self.xp
        out = xp.matmul(xp.matmul(xp.permute_dims(self.A, (0, 2, 1)), X), self.B)
        return out if self.weight == 1.0 else self.weight * out

    @property
    def symmetric(self) -> bool:
        if self._symmetric is None:
            xp = self.xp
            sym_a = bool(xp.all(self.A == xp.permute_dims(self.A, (0, 2, 1))))
            sym_b = bool(xp.all(self.B == xp.permute_dims(self.B, (0, 2, 1))))
            self._symmetric = sym_a and sym_b
        return self._symmetric

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        self._dense_check(max_bytes)
        xp, b, n1, n2 = self.xp, self.batch, self.n1max, self.n2max
        K = self.B[:, :, None, :, None] * self.A[:, None, :, None, :]
        return self.weight * xp.reshape(K, (b, n1 * n2, n1 * n2))

    def entry_bounds(self) -> tuple[float, float]:
        xp = self.xp
        a = (float(xp.min(self.A)), float(xp.max(self.A)))
        c = (float(xp.min(self.B)), float(xp.max(self.B)))
        prods = [self.weight * x * y for x in a for y in c]
        return min(prods), max(prods)


class LinearAffinity(Affinity):
    """Linear term ``<L, X>`` (Lawler ``K = diag(vec(L))``), ``L`` of shape (b, n1max, n2max)."""

    def __init__(self, L: Array):
        self.xp = backend.namespace_of(L, name="L")
        self.L = L
        self.dtype, self.device = L.dtype, backend.device(L)
        self.batch, self.n1max, self.n2max = L.shape

    def matvec(self, X: Array) -> Array:
        return self.L * X

    rmatvec = matvec
    symmetric = True

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        self._dense_check(max_bytes)
        xp, N = self.xp, self.n1max * self.n2max
        eye = xp.eye(N, dtype=self.dtype, device=self.device)
        return vec(self.L, xp=xp)[:, None, :] * eye[None, :, :]

    def entry_bounds(self) -> tuple[float, float]:
        return min(float(self.xp.min(self.L)), 0.0), max(float(self.xp.max(self.L)), 0.0)


class ConstantAffinity(Affinity):
    """``K = c * m m^T`` with ``m = vec(mask)``: adds ``c * (sum X)^2`` to every score.

    For full assignments ``sum X = n1`` is fixed, so this term shifts scores by a constant
    without changing the optimum; solvers that need a non-negative ``K`` use it.
    """

    def __init__(self, c: float, mask: Array):
        self.xp = backend.namespace_of(mask, name="mask")
        self.c, self.mask = float(c), mask
        self.batch, self.n1max, self.n2max = mask.shape
        self.device = backend.device(mask)
        self.dtype = None  # follows the operand

    def matvec(self, X: Array) -> Array:
        xp = self.xp
        tot = xp.sum(X, axis=(1, 2), keepdims=True)
        return self.c * tot * xp.astype(self.mask, X.dtype)

    rmatvec = matvec
    symmetric = True

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        xp = self.xp
        m = xp.astype(vec(self.mask, xp=xp), xp.float64)
        return self.c * m[:, :, None] * m[:, None, :]

    def entry_bounds(self) -> tuple[float, float]:
        return min(self.c, 0.0), max(self.c, 0.0)


class SumAffinity(Affinity):
    """Sum of affinity operators of one batch shape."""

    def __init__(self, terms: Sequence[Affinity]):
        flat: list[Affinity] = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, SumAffinity) else [t])
        if not flat:
            raise ValueError("`terms` must hold at least one affinity operator.")
        shapes = {(t.batch, t.n1max, t.n2max) for t in flat}
        if len(shapes) != 1:
            raise ValueError(
                f"All terms must have one (batch, n1max, n2max); got {sorted(shapes)}."
            )
        self.terms = flat
        typed = [t for t in flat if t.dtype is not None]
        ref = typed[0] if typed else flat[0]
        self.xp, self.dtype, self.device = ref.xp, ref.dtype, ref.device
        self.batch, self.n1max, self.n2max = ref.batch, ref.n1max, ref.n2max

    def matvec(self, X: Array) -> Array:
        out = self.terms[0].matvec(X)
        for t in self.terms[1:]:
            out = out + t.matvec(X)
        return out

    def rmatvec(self, X: Array) -> Array:
        out = self.terms[0].rmatvec(X)
        for t in self.terms[1:]:
            out = out + t.rmatvec(X)
        return out

    @property
    def symmetric(self) -> bool:
        return all(t.symmetric for t in self.terms)

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        self._dense_check(max_bytes)
        out = self.terms[0].to_dense(max_bytes=max_bytes)
        for t in self.terms[1:]:
            out = out + self.xp.astype(t.to_dense(max_bytes=max_bytes), out.dtype)
        return out

    def entry_bounds(self) -> tuple[float, float]:
        bounds = [t.entry_bounds() for t in self.terms]
        return sum(b[0] for b in bounds), sum(b[1] for b in bounds)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _float_array(x: Array, name: str, *, xp: Any) -> Array:
    """Integer/bool arrays become float64; float arrays keep their dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        if xp.isdtype(x.dtype, ("integral", "bool")):
            return xp.astype(x, xp.float64)
        raise TypeError(f"`{name}` must hold real numbers; got dtype {x.dtype}.")
    return x


def _sizes(n: Any, name: str, batch: int, nmax: int | None, caller: str) -> np.ndarray | None:
    """Per-instance sizes as an int64 numpy array of shape (batch,), or None if not given."""
    if n is None:
        return None
    if backend.is_torch_array(n) or not np.isscalar(n):
        arr = backend.to_numpy(n) if not isinstance(n, (list, tuple)) else np.asarray(n)
        arr = np.asarray(arr)
        if arr.ndim == 0:
            arr = arr.reshape(1)
    else:
        arr = np.asarray([n])
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise TypeError(f"The {name!r} parameter of {caller} must be int(s). Got {n!r} instead.")
    arr = arr.astype(np.int64)
    if arr.ndim != 1 or (arr.shape[0] not in (1, batch)):
        raise ValueError(
            f"The {name!r} parameter of {caller} must be an int or an array of shape "
            f"({batch},). Got shape {arr.shape} instead."
        )
    if np.any(arr < 0):
        raise ValueError(
            f"The {name!r} parameter of {caller} must be non-negative. Got {arr.tolist()} instead."
        )
    if nmax is not None and np.any(arr > nmax):
        raise ValueError(
            f"The {name!r} parameter of {caller} exceeds the padded size {nmax}: "
            f"got {arr.tolist()}."
        )
    return np.broadcast_to(arr, (batch,)).copy()


def _check_n1_le_n2(n1: np.ndarray, n2: np.ndarray, caller: str) -> None:
    bad = np.nonzero(n1 > n2)[0]
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"{caller} needs n1 <= n2 (partial matching maps the smaller graph into the "
            f"larger); instance {k} has n1={int(n1[k])} > n2={int(n2[k])}. Swap the graphs."
        )


def _check_not_empty(batch: int, n1: np.ndarray, n2: np.ndarray) -> None:
    """Refuse a problem with no instance, or an instance without nodes on one side."""
    if batch == 0:
        raise ValueError("A Problem needs at least one instance; got a batch of size 0.")
    empty = np.nonzero((n1 == 0) | (n2 == 0))[0]
    if empty.size:
        k = int(empty[0])
        where = "" if batch == 1 else f" (instance {k})"
        raise ValueError(
            f"A Problem needs at least one node in each graph; got n1={int(n1[k])}, "
            f"n2={int(n2[k])}{where}. There is nothing to match."
        )


def _batched(x: Array, ndim: int, name: str, caller: str) -> tuple[Array, bool]:
    """Add a batch axis to an unbatched array; returns (array, was_batched)."""
    if x.ndim == ndim:
        return x[None, ...], False
    if x.ndim == ndim + 1:
        return x, True
    raise ValueError(
        f"`{name}` in {caller} must have {ndim} dimensions (or {ndim + 1} with a batch axis); "
        f"got shape {tuple(x.shape)}."
    )


# ----------------------------------------------------------------------------------------------
# Problem
# ----------------------------------------------------------------------------------------------


_SENSE = Option("choice", choices=("max", "min"))
_PADDED_OPTIONS = {
    "n1max": Option("int", low=0, allow_none=True),
    "n2max": Option("int", low=0, allow_none=True),
    "sense": _SENSE,
}


class Problem:
    r"""A batch of Lawler QAPs ``max vec(X)^T K vec(X)`` given by an affinity operator.

    Parameters
    ----------
    affinity : Affinity
        Operator with ``matvec`` on arrays of shape ``(b, n1max, n2max)``.
    n1, n2 : int or array of shape (b,), optional
        Per-instance sizes (``n1 <= n2``); default the padded sizes.
    sense : {"max", "min"}
        The problem's own sense, used to report :attr:`MatchResult.objective`. The solvers
        always maximise ``score``; for ``sense="min"`` the affinity holds the negated cost
        and ``objective = -score``.
    batched : bool, optional
        Whether results keep the batch axis. Default: ``True`` when ``b > 1``.
    name : str, optional
        Label used in reports (e.g. the QAPLIB instance name).
    best_known : float, optional
        Best known objective, when known (QAPLIB ``.sln``).

    Raises
    ------
    ValueError
        For an empty problem (no instance, or ``n1 = 0`` or ``n2 = 0``), sizes beyond the
        padded ones, or ``n1 > n2``.

    Notes
    -----
    Build problems with the class methods :meth:`from_dense`, :meth:`from_sparse`,
    :meth:`koopmans_beckmann` and :meth:`from_qaplib`. Every constructor takes its arrays
    first, then the sizes ``n1, n2`` (positional or by name), then keyword-only options.
    """

    def __init__(
        self,
        affinity: Affinity,
        n1: Any = None,
        n2: Any = None,
        *,
        sense: str = "max",
        batched: bool | None = None,
        name: str | None = None,
        best_known: float | None = None,
    ):
        if not isinstance(affinity, Affinity):
            raise TypeError(
                f"The 'affinity' parameter of Problem must be an Affinity operator. "
                f"Got {type(affinity).__name__} instead."
            )
        check_choice(sense, "sense", "Problem", ("max", "min"))
        b = affinity.batch
        n1a = _sizes(n1, "n1", b, affinity.n1max, "Problem")
        n2a = _sizes(n2, "n2", b, affinity.n2max, "Problem")
        self.n1 = np.full(b, affinity.n1max, np.int64) if n1a is None else n1a
        self.n2 = np.full(b, affinity.n2max, np.int64) if n2a is None else n2a
        _check_not_empty(b, self.n1, self.n2)
        _check_n1_le_n2(self.n1, self.n2, "Problem")
        self.affinity = affinity
        self.sense = sense
        self.batched = (b > 1) if batched is None else bool(batched)
        self.name = name
        self.best_known = best_known
        self._mask: Array | None = None

    # -- basic properties ---------------------------------------------------------------------
    @property
    def xp(self) -> Any:
        return self.affinity.xp

    @property
    def dtype(self) -> Any:
        return self.affinity.dtype

    @property
    def device(self) -> Any:
        return self.affinity.device

    @property
    def batch(self) -> int:
        return self.affinity.batch

    @property
    def n1max(self) -> int:
        return self.affinity.n1max

    @property
    def n2max(self) -> int:
        return self.affinity.n2max

    @property
    def mask(self) -> Array:
        """Boolean array ``(b, n1max, n2max)``: True on each instance's valid ``n1 x n2`` block."""
        if self._mask is None:
            m = np.zeros((self.batch, self.n1max, self.n2max), dtype=bool)
            for k in range(self.batch):
                m[k, : self.n1[k], : self.n2[k]] = True
            self._mask = backend.asarray_on(m, xp=self.xp, device=self.device)
        return self._mask

    @property
    def padded(self) -> bool:
        """True if any instance is smaller than the padded shape."""
        return bool(np.any(self.n1 < self.n1max) or np.any(self.n2 < self.n2max))

    # -- evaluation ---------------------------------------------------------------------------
    def matvec(self, X: Array) -> Array:
        """``K @ vec(X)`` as an array of X's shape; ``X`` batched ``(b, n1max, n2max)``."""
        return self.affinity.matvec(X)

    def score(self, X: Array) -> Array:
        """``vec(X)^T K vec(X)`` per instance: array of shape ``(b,)``."""
        return self.affinity.score(X)

    def gradient(self, X: Array) -> Array:
        """``(K + K^T) vec(X)`` as an array of X's shape (the score's gradient)."""
        return self.affinity.gradient(X)

    def objective_from_score(self, score: Any) -> Any:
        """The objective in the problem's own sense (``-score`` when ``sense="min"``)."""
        return score if self.sense == "max" else -score

    def to_dense(self, *, max_bytes: int | None = None) -> Array:
        """Explicit ``K`` of shape ``(b, n1max*n2max, n1max*n2max)``; refuses over `max_bytes`."""
        return self.affinity.to_dense(max_bytes=max_bytes)

    def with_affinity(self, affinity: Affinity) -> Problem:
        """The same problem (sizes, sense, labels) over another affinity operator."""
        return Problem(
            affinity,
            self.n1,
            self.n2,
            sense=self.sense,
            batched=self.batched,
            name=self.name,
            best_known=self.best_known,
        )

    def __repr__(self) -> str:
        sizes = (
            f"n1={int(self.n1[0])}, n2={int(self.n2[0])}"
            if self.batch == 1
            else f"batch={self.batch}, n1max={self.n1max}, n2max={self.n2max}"
        )
        label = f"{self.name!r}, " if self.name else ""
        kind = type(self.affinity).__name__
        return f"Problem({label}{sizes}, sense={self.sense!r}, affinity={kind})"

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    @validate_options(_PADDED_OPTIONS)
    def from_dense(
        cls,
        K: Array,
        n1: Any = None,
        n2: Any = None,
        *,
        n1max: int | None = None,
        n2max: int | None = None,
        sense: str = "max",
    ) -> Problem:
        """Problem from an explicit Lawler ``K`` (pygmtools' column-major layout).

        Parameters
        ----------
        K : array of shape (n1*n2, n1*n2) or (b, n1max*n2max, n1max*n2max)
            Affinity; pair ``(i, a)`` at index ``i + a*n1max``.
        n1, n2 : int or array of shape (b,), optional
            Sizes. With neither given, ``K`` must be for square problems (``n1 = n2``).
        n1max, n2max : int, optional
            Padded sizes of a batch; default ``max(n1)``, ``max(n2)``.
        sense : {"max", "min"}
            ``"min"`` negates ``K`` so that the solvers minimise ``vec(X)^T K vec(X)``.
        """
        caller = "Problem.from_dense"
        if backend.is_sparse(K):
            raise TypeError(f"`K` in {caller} is sparse; use Problem.from_sparse.")
        xp = backend.namespace_of(K, name="K")
        K = xp.asarray(K)
        given = tuple(K.shape)
        K, batched = _batched(K, 2, "K", caller)
        K = _float_array(K, "K", xp=xp)
        b, N, N2 = K.shape
        if N != N2:
            raise ValueError(f"`K` in {caller} must be square; got shape {given}.")
        n1max, n2max = _infer_padded(N, n1, n2, n1max, n2max, b, caller)
        check_finite(K, "K", xp=xp)
        if sense == "min":
            K = -K
        return cls(DenseAffinity(K, n1max, n2max), n1, n2, sense=sense, batched=batched)

    @classmethod
    @validate_options(_PADDED_OPTIONS)
    def from_sparse(
        cls,
        K: Any,
        n1: Any = None,
        n2: Any = None,
        *,
        n1max: int | None = None,
        n2max: int | None = None,
        sense: str = "max",
    ) -> Problem:
        """Problem from a sparse Lawler ``K`` (scipy.sparse or torch sparse), or a list of them.

        Parameters
        ----------
        K : sparse (n1n2, n1n2) matrix, or a sequence of b of them
            Same layout as :meth:`from_dense`.
        """
        caller = "Problem.from_sparse"
        Ks = list(K) if isinstance(K, (list, tuple)) else [K]
        batched = isinstance(K, (list, tuple))
        if not Ks:
            raise ValueError(f"`K` in {caller} is an empty list.")
        for k, M in enumerate(Ks):
            if not backend.is_sparse(M):
                raise TypeError(
                    f"`K` in {caller} must be scipy.sparse or torch sparse matrices; "
                    f"item {k} is {type(M).__name__}. Use Problem.from_dense for dense K."
                )
        shapes = {tuple(M.shape) for M in Ks}
        if len(shapes) != 1:
            raise ValueError(f"All sparse `K` in {caller} must share one shape; got {shapes}.")
        N, N2 = shapes.pop()
        if N != N2:
            raise ValueError(f"`K` in {caller} must be square; got shape {(N, N2)}.")
        n1max, n2max = _infer_padded(N, n1, n2, n1max, n2max, len(Ks), caller)
        out = []
        for M in Ks:
            if backend.is_torch_array(M):
                vals = (
                    M.coalesce().values() if M.layout == backend._torch().sparse_coo else M.values()
                )
                if not vals.dtype.is_floating_point:
                    M = M.to(backend._torch().float64)
                    vals = vals.double()
                if not bool(backend._torch().isfinite(vals).all()):
                    raise ValueError("`K` contains NaN or Inf; clean or mask it first.")
            else:
                import scipy.sparse as sp

                M = sp.csr_matrix(M)
                if M.dtype.kind != "f":
                    M = M.astype(np.float64)
                if not np.all(np.isfinite(M.data)):
                    raise ValueError("`K` contains NaN or Inf; clean or mask it first.")
            out.append(-M if sense == "min" else M)
        return cls(SparseAffinity(out, n1max, n2max), n1, n2, sense=sense, batched=batched)

    @classmethod
    @validate_options({"sense": _SENSE})
    def koopmans_beckmann(
        cls,
        A: Array,
        B: Array,
        L: Array | None = None,
        n1: Any = None,
        n2: Any = None,
        *,
        sense: str = "max",
    ) -> Problem:
        r"""Koopmans--Beckmann problem ``opt_X <X, A X B^T> + <L, X>``, never building ``K``.

        For a permutation ``p`` (``X[i, p(i)] = 1``) the quadratic part is
        ``sum_ij A[i,j] B[p(i), p(j)]``, QAPLIB's objective. In Lawler form
        ``K = kron(B, A) + diag(vec(L))``.

        Parameters
        ----------
        A : array of shape (n1, n1) or (b, n1max, n1max)
            First graph (QAPLIB: the first matrix of the ``.dat``).
        B : array of shape (n2, n2) or (b, n2max, n2max)
            Second graph, ``n1 <= n2``.
        L : array of shape (n1, n2) or (b, n1max, n2max), optional
            Linear term (node affinities / assignment costs).
        n1, n2 : int or array of shape (b,), optional
            Per-instance sizes of a padded batch (padding must be zero).
        sense : {"max", "min"}
            ``"min"`` for cost minimisation (QAPLIB).
        """
        caller = "Problem.koopmans_beckmann"
        xp = backend.namespace_of(A, B, L, name="A, B" if L is None else "A, B, L")
        A, B = xp.asarray(A), xp.asarray(B)
        shapes = f"{tuple(A.shape)} and {tuple(B.shape)}"  # as passed, for the messages
        A, batched = _batched(A, 2, "A", caller)
        B, batched_b = _batched(B, 2, "B", caller)
        if batched != batched_b:
            raise ValueError(
                f"`A` and `B` in {caller} must both have a batch axis or neither; got shapes "
                f"{shapes}."
            )
        A = _float_array(A, "A", xp=xp)
        B = _float_array(B, "B", xp=xp)
        if A.shape[-1] != A.shape[-2] or B.shape[-1] != B.shape[-2]:
            raise ValueError(f"`A` and `B` in {caller} must be square; got shapes {shapes}.")
        if A.shape[0] != B.shape[0]:
            raise ValueError(
                f"`A` and `B` in {caller} must have the same batch size; got {A.shape[0]} and "
                f"{B.shape[0]}."
            )
        if A.shape[-1] > B.shape[-1]:
            raise ValueError(
                f"{caller} needs n1 <= n2; got A of shape {tuple(A.shape)[-2:]} and B of shape "
                f"{tuple(B.shape)[-2:]}. Swap A and B (the optimal permutation becomes its "
                "inverse)."
            )
        if A.dtype != B.dtype:
            dt = xp.result_type(A.dtype, B.dtype)
            A, B = xp.astype(A, dt), xp.astype(B, dt)
        check_finite(A, "A", xp=xp)
        check_finite(B, "B", xp=xp)
        sign = -1.0 if sense == "min" else 1.0
        aff: Affinity = KoopmansBeckmannAffinity(A, B, weight=sign)
        if L is not None:
            L = xp.asarray(L)
            given = tuple(L.shape)
            L, _ = _batched(L, 2, "L", caller)
            L = xp.astype(_float_array(L, "L", xp=xp), A.dtype)
            want = (A.shape[0], A.shape[-1], B.shape[-1])
            if tuple(L.shape) != want:
                expected = want if batched else want[1:]
                raise ValueError(
                    f"`L` in {caller} must have shape {expected} (like A and B); got {given}."
                )
            check_finite(L, "L", xp=xp)
            aff = aff + LinearAffinity(sign * L)
        return cls(aff, n1, n2, sense=sense, batched=batched)

    @classmethod
    @validate_options({"sln": Option("any", allow_none=True)})
    def from_qaplib(cls, path: str | os.PathLike[str], *, sln: Any = None) -> Problem:
        """Read a QAPLIB ``.dat`` file as a minimisation problem (numpy, float64).

        The best known value is taken from `sln` (a path) or from a ``.sln`` file beside the
        ``.dat``, when there is one.
        """
        from .io import qaplib

        inst = qaplib.load_instance(path, sln=sln)
        p = cls.koopmans_beckmann(inst.A.astype(np.float64), inst.B.astype(np.float64), sense="min")
        p.name = inst.name
        p.best_known = inst.best_known
        return p


def _infer_padded(
    N: int,
    n1: Any,
    n2: Any,
    n1max: int | None,
    n2max: int | None,
    batch: int,
    caller: str,
) -> tuple[int, int]:
    """Work out (n1max, n2max) from ``N = n1max * n2max`` and whatever sizes were given."""
    for v, nm in ((n1max, "n1max"), (n2max, "n2max")):
        if v is not None:
            check_scalar(v, nm, caller, integer=True, low=0, low_inclusive=True)
    a1 = _sizes(n1, "n1", batch, None, caller)
    a2 = _sizes(n2, "n2", batch, None, caller)
    if n1max is None and a1 is not None:
        n1max = int(a1.max())
    if n2max is None and a2 is not None:
        n2max = int(a2.max())
    if n1max is None and n2max is None:
        r = round(N**0.5)
        if r * r != N:
            raise ValueError(
                f"`K` in {caller} has {N} rows, which is not n*n; pass n1 and n2 for "
                "rectangular problems."
            )
        n1max = n2max = r
    elif n1max is None:
        n1max = N // n2max if n2max else 0
    elif n2max is None:
        n2max = N // n1max if n1max else 0
    if n1max * n2max != N:
        raise ValueError(
            f"`K` in {caller} must have shape (n1*n2, n1*n2) = ({n1max * n2max}, "
            f"{n1max * n2max}) for n1max={n1max}, n2max={n2max}; got ({N}, {N})."
        )
    return n1max, n2max
