r"""Multi-graph matching with guaranteed cycle consistency.

Each of ``m`` graphs gets a matching ``U_i`` (shape ``(n_i, d)``) into a shared *universe* of
``d`` nodes, and every pairwise matching is read off as ``X_ij = U_i U_j^T``. Matchings built this
way agree around every cycle (``X_ij X_jk <= X_ik``), whatever the ``U_i`` are.

* :func:`gamgm` -- graduated assignment in the universe (Koopmans--Beckmann inputs, the same as
  pygmtools' ``gamgm``: adjacency ``A`` of shape ``(m, n, n)``, node similarities ``W`` of shape
  ``(m, m, n, n)``, sizes ``ns``);
* :func:`gamgm_affinity` -- the same solver for general pairwise affinity operators (dense,
  sparse or matrix-free ``K_ij``, anything a :class:`~qapfuse.Problem` holds);
* :func:`synchronize` -- spectral permutation synchronisation of given pairwise matchings (the
  fast consistent baseline, and the default initialiser of :func:`gamgm`);
* :func:`consistency` and :func:`accuracy` -- the fraction of cycle-consistent triples, and
  pairwise accuracy against a ground truth.

The objective of :func:`gamgm` is, over hard universe matchings,

.. math::

    F(U) = \sum_{i<j} \mathrm{vec}(X_{ij})^\top K_{ij} \, \mathrm{vec}(X_{ij}),
    \qquad X_{ij} = U_i U_j^\top,

with, in the Koopmans--Beckmann form, ``K_ij = w kron(A_j, A_i) + diag(vec(Wbar_ij))``
(``w = quad_weight``, ``Wbar_ij = (W_ij + W_ji^T) / 2``), i.e.
``F = sum_{i<j} w <X_ij, A_i X_ij A_j^T> + <X_ij, Wbar_ij>``. pygmtools sums the same terms over
ordered pairs, so its objective is twice this one (plus constants).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import backend
from .._validation import Option, check_options, check_scalar, warn_not_converged
from ..backend import Array
from ..problem import Affinity, DenseAffinity, Problem, SparseAffinity
from ._common import normalise
from .lap import _hungarian_np, sinkhorn_log

__all__ = [
    "OPTIONS",
    "MultiMatchResult",
    "accuracy",
    "consistency",
    "gamgm",
    "gamgm_affinity",
    "synchronize",
]

#: Declared options of :func:`gamgm` and :func:`gamgm_affinity` (walked by the tests).
OPTIONS: dict[str, Option] = {
    "init": Option("any"),
    "tau0": Option("float", low=0, low_inclusive=False),
    "tau_min": Option("float", low=0, low_inclusive=False),
    "decay": Option("float", low=0, high=1, low_inclusive=False),
    "max_inner": Option("int", low=1),
    "sk_iter": Option("int", low=1),
    "tol": Option("float", low=0, low_inclusive=False),
    "step": Option("float", low=0, high=1, low_inclusive=False),
    "hungarian_sweeps": Option("int", low=0),
    "rng": Option("any", allow_none=True),
}
_OPTIONS_KB: dict[str, Option] = {
    **OPTIONS,
    "init_pairs": Option("choice", choices=("auto", "all", "star")),
    "quad_weight": Option("float", low=0, low_inclusive=True),
}

INITS = ("rrwm", "ga", "uniform")
#: ``init_pairs="auto"`` solves all pairs when ``m (m - 1) / 2 * n^2`` is at most this.
AUTO_PAIRS_BUDGET = 100_000


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, repr=False)
class MultiMatchResult:
    """Outcome of a multi-graph matching: one universe matching per graph.

    Indexing follows pygmtools' ``MultiMatchingResult``: ``result[i, j]`` is the pairwise
    matching ``X_ij = U_i U_j^T`` of shape ``(n_i, n_j)`` (0/1), and ``result[i]`` is ``U_i``.

    Attributes
    ----------
    U : array of shape (m, nmax, d)
        Hard universe matchings, in the caller's array library, dtype and device. Graph ``i``
        uses rows ``:n_i`` (each row one 1, each universe column at most one); padded rows are 0.
    ns : numpy array of shape (m,)
        Number of nodes of each graph.
    soft : array of shape (m, nmax, d), or None
        The last annealed (doubly stochastic) iterate, where the solver has one.
    score : float
        ``sum_{i<j} vec(X_ij)^T K_ij vec(X_ij)`` of the hard matchings (higher is better).
    n_iter : int
        Graduated-assignment iterations (Sinkhorn projections of all graphs at once).
    converged : bool
        Whether the coldest temperature stage met its tolerance.
    time : float
        Wall-clock seconds.
    info : mapping
        :func:`gamgm`: ``"history"`` (one entry per temperature of the annealing run that was
        kept: ``tau``, inner iterations, last change, soft score; empty when its start was
        already a fixed point), ``"init"``, ``"candidates"`` (``(kind, score)`` of each
        rounded answer and hard start), ``"picked"``, ``"refine_sweeps"``.
        :func:`synchronize`: ``"eigenvalues"``.
    """

    U: Array
    ns: np.ndarray
    soft: Array | None
    score: float
    n_iter: int
    converged: bool
    time: float
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        """Number of graphs."""
        return int(self.ns.shape[0])

    @property
    def n_univ(self) -> int:
        """Size ``d`` of the universe."""
        return int(self.U.shape[2])

    def _index(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"Graph indices must be ints; got {type(i).__name__}.")
        if not -self.m <= int(i) < self.m:
            raise IndexError(f"Graph index {i} is out of range for {self.m} graphs.")
        return int(i) % self.m

    def universe(self, i: int) -> Array:
        """``U_i``: the universe matching of graph `i`, shape ``(n_i, d)``."""
        i = self._index(i)
        return self.U[i, : int(self.ns[i]), :]

    def __getitem__(self, key: Any) -> Array:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"Index a MultiMatchResult with (i, j); got {key!r}.")
            Ui, Uj = self.universe(key[0]), self.universe(key[1])
            xp = backend.namespace_of(Ui)
            return xp.matmul(Ui, xp.permute_dims(Uj, (1, 0)))
        return self.universe(key)

    def to_dense(self) -> Array:
        """All pairwise matchings, shape ``(m, m, nmax, nmax)`` (pygmtools' layout)."""
        xp = backend.namespace_of(self.U)
        U = self.U
        return xp.matmul(U[:, None, :, :], xp.permute_dims(U, (0, 2, 1))[None, :, :, :])

    def __repr__(self) -> str:
        return (
            f"MultiMatchResult(m={self.m}, n_univ={self.n_univ}, score={self.score:.6g}, "
            f"n_iter={self.n_iter}, converged={self.converged}, time={self.time:.3g}s)"
        )


# ----------------------------------------------------------------------------------------------
# Objectives: gradient and score of F(U) for a batch U of shape (m, nrow, d)
# ----------------------------------------------------------------------------------------------


class _KBObjective:
    """``F = sum_{i<j} w <X_ij, A_i X_ij A_j^T> + <X_ij, Wbar_ij>`` in closed form.

    With ``M_i = U_i^T A_i U_i`` (d x d) and ``S = sum_i M_i``, the quadratic part is
    ``w/2 (||S||^2 - sum_i ||M_i||^2)`` and its gradient with respect to ``U_i`` is
    ``w (A_i U_i R_i^T + A_i^T U_i R_i)`` with ``R_i = S - M_i``: O(m n^2 d), no pair loop.
    """

    def __init__(self, A: Array, supW: Array | None, weight: float, *, xp: Any):
        self.A, self.supW, self.w, self.xp = A, supW, float(weight), xp
        At = xp.permute_dims(A, (0, 2, 1))
        self.At = At
        self.symmetric = bool(xp.all(A == At))

    def _unary(self, U: Array) -> Array | None:
        if self.supW is None:
            return None
        xp = self.xp
        m, r, d = U.shape
        return xp.reshape(xp.matmul(self.supW, xp.reshape(U, (m * r, d))), (m, r, d))

    def grad(self, U: Array) -> Array:
        xp = self.xp
        AU = xp.matmul(self.A, U)
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), AU)
        R = xp.sum(M, axis=0, keepdims=True) - M
        Rt = xp.permute_dims(R, (0, 2, 1))
        if self.symmetric:
            G = xp.matmul(AU, R + Rt)
        else:
            G = xp.matmul(AU, Rt) + xp.matmul(xp.matmul(self.At, U), R)
        G = self.w * G
        un = self._unary(U)
        return G if un is None else G + un

    def local_problem(self, U: Array, i: int, n_i: int) -> Problem:
        """``F`` as a function of ``U_i`` alone: a KB problem of graph ``i`` vs the others.

        ``F(U_i) = w <U_i, A_i U_i R_i^T> + <U_i, H_i> + const`` with ``R_i = sum_{j != i}
        U_j^T A_j U_j`` (the other graphs, aligned and summed in the universe) and
        ``H_i = sum_j Wbar_ij U_j``.
        """
        xp = self.xp
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), xp.matmul(self.A, U))
        R = xp.sum(M, axis=0) - M[i, ...]
        un = self._unary(U)
        L = None if un is None else un[i, :n_i, :]
        return Problem.koopmans_beckmann(self.w * self.A[i, :n_i, :n_i], R, L)

    def local_problems(self, U: Array, ns: np.ndarray) -> Problem:
        """All ``m`` graph-vs-others problems of :meth:`local_problem` as one batch."""
        xp = self.xp
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), xp.matmul(self.A, U))
        R = xp.sum(M, axis=0, keepdims=True) - M
        un = self._unary(U)
        d = U.shape[2]
        return Problem.koopmans_beckmann(
            self.w * self.A, R, un, n1=ns, n2=np.full(ns.shape[0], d, dtype=np.int64)
        )

    def score(self, U: Array) -> float:
        xp = self.xp
        M = xp.matmul(xp.permute_dims(U, (0, 2, 1)), xp.matmul(self.A, U))
        S = xp.sum(M, axis=0)
        quad = 0.5 * self.w * (float(xp.sum(S * S)) - float(xp.sum(M * M)))
        un = self._unary(U)
        return quad if un is None else quad + 0.5 * float(xp.sum(U * un))


@dataclass
class _Group:
    """Pairs whose affinities one operator serves as a batch: pair k is ``X = U_I[k] U_J[k]^T``."""

    affinity: Affinity
    pi: np.ndarray
    pj: np.ndarray
    I_xp: Array = None
    J_xp: Array = None
    E_I: Array = None  # (m, P) one-hot: sums pair contributions into graphs
    E_J: Array = None


class _PairObjective:
    """``F = sum_pairs vec(X_ij)^T K_ij vec(X_ij)`` via the operators' ``gradient``, ``score``."""

    def __init__(
        self, groups: list[_Group], m: int, nrow: int, *, xp: Any, dtype: Any, device: Any
    ):
        self.groups, self.m, self.nrow, self.xp = groups, m, nrow, xp
        for g in groups:
            g.I_xp = backend.asarray_on(g.pi.astype(np.int64), xp=xp, device=device)
            g.J_xp = backend.asarray_on(g.pj.astype(np.int64), xp=xp, device=device)
            P = g.pi.shape[0]
            eI, eJ = np.zeros((m, P)), np.zeros((m, P))
            eI[g.pi, np.arange(P)] = 1.0
            eJ[g.pj, np.arange(P)] = 1.0
            g.E_I = xp.astype(backend.asarray_on(eI, xp=xp, device=device), dtype)
            g.E_J = xp.astype(backend.asarray_on(eJ, xp=xp, device=device), dtype)

    def _sides(self, U: Array, g: _Group) -> tuple[Array, Array]:
        xp = self.xp
        Ui = xp.take(U, g.I_xp, axis=0)[:, : g.affinity.n1max, :]
        Uj = xp.take(U, g.J_xp, axis=0)[:, : g.affinity.n2max, :]
        return Ui, Uj

    def _pad(self, Y: Array) -> Array:
        xp = self.xp
        P, r, d = Y.shape
        if r == self.nrow:
            return Y
        z = xp.zeros((P, self.nrow - r, d), dtype=Y.dtype, device=backend.device(Y))
        return xp.concat([Y, z], axis=1)

    def grad(self, U: Array) -> Array:
        xp = self.xp
        m, r, d = U.shape
        out = xp.zeros_like(U)
        for g in self.groups:
            Ui, Uj = self._sides(U, g)
            X = xp.matmul(Ui, xp.permute_dims(Uj, (0, 2, 1)))
            G = g.affinity.gradient(X)
            gi = self._pad(xp.matmul(G, Uj))
            gj = self._pad(xp.matmul(xp.permute_dims(G, (0, 2, 1)), Ui))
            P = gi.shape[0]
            out = out + xp.reshape(xp.matmul(g.E_I, xp.reshape(gi, (P, r * d))), (m, r, d))
            out = out + xp.reshape(xp.matmul(g.E_J, xp.reshape(gj, (P, r * d))), (m, r, d))
        return out

    def local_problems(self, U: Array, ns: np.ndarray) -> Problem:
        """Every graph's ``F(U_i)`` (others fixed) as one batch of ``m`` Lawler problems."""
        m, d = U.shape[0], U.shape[2]
        aff = _LocalPairAffinity(self, U)
        return Problem(aff, ns, np.full(m, d, dtype=np.int64), batched=True)

    def score(self, U: Array) -> float:
        xp = self.xp
        total = 0.0
        for g in self.groups:
            Ui, Uj = self._sides(U, g)
            X = xp.matmul(Ui, xp.permute_dims(Uj, (0, 2, 1)))
            total += float(xp.sum(g.affinity.score(X)))
        return total


class _LocalPairAffinity(Affinity):
    """``K_i`` with ``F(U_i) = vec(U_i)^T K_i vec(U_i) + const`` for all graphs ``i`` at once.

    ``F`` is quadratic in each ``U_i`` with the others fixed, so ``K_i vec(Y)`` (symmetrised) is
    half the gradient of ``F`` at ``U_i = Y``: for each pair ``(i, j)`` the operator is applied
    to ``Y_i U_j^T`` and to ``U_i Y_j^T``, and the results are pulled back through ``U_j``.
    """

    def __init__(self, obj: _PairObjective, U: Array):
        self.obj, self.U = obj, U
        self.xp, self.dtype, self.device = obj.xp, U.dtype, backend.device(U)
        self.batch, self.n1max, self.n2max = U.shape

    def matvec(self, Y: Array) -> Array:
        xp, obj, U = self.xp, self.obj, self.U
        m, r, d = U.shape
        Y = xp.astype(Y, U.dtype)
        out = xp.zeros_like(U)
        for g in obj.groups:
            Ui, Uj = obj._sides(U, g)
            Yi, Yj = obj._sides(Y, g)
            Gi = g.affinity.gradient(xp.matmul(Yi, xp.permute_dims(Uj, (0, 2, 1))))
            Gj = g.affinity.gradient(xp.matmul(Ui, xp.permute_dims(Yj, (0, 2, 1))))
            gi = obj._pad(xp.matmul(Gi, Uj))
            gj = obj._pad(xp.matmul(xp.permute_dims(Gj, (0, 2, 1)), Ui))
            P = gi.shape[0]
            out = out + xp.reshape(xp.matmul(g.E_I, xp.reshape(gi, (P, r * d))), (m, r, d))
            out = out + xp.reshape(xp.matmul(g.E_J, xp.reshape(gj, (P, r * d))), (m, r, d))
        return 0.5 * out

    rmatvec = matvec
    symmetric = True

    def entry_bounds(self) -> tuple[float, float]:
        raise NotImplementedError("entry bounds of a graph-vs-others operator are not known")


# ----------------------------------------------------------------------------------------------
# Public solvers
# ----------------------------------------------------------------------------------------------


def gamgm(
    A: Array,
    W: Array | None = None,
    ns: Any = None,
    n_univ: int | None = None,
    *,
    quad_weight: float = 1.0,
    init: Any = "rrwm",
    init_pairs: str = "auto",
    tau0: float = 0.05,
    tau_min: float = 1e-3,
    decay: float = 0.5,
    max_inner: int = 20,
    sk_iter: int = 100,
    tol: float = 1e-3,
    step: float = 0.5,
    hungarian_sweeps: int = 10,
    rng: Any = None,
) -> MultiMatchResult:
    r"""Multi-graph graduated assignment in a shared universe (Koopmans--Beckmann inputs).

    Maximises ``F = sum_{i<j} quad_weight <X_ij, A_i X_ij A_j^T> + <X_ij, Wbar_ij>`` over
    universe matchings ``U_i`` with ``X_ij = U_i U_j^T`` (so the result is cycle-consistent by
    construction). All ``U_i`` are updated together: ``U_i <- sinkhorn(G_i / tau)`` with
    ``G_i = dF/dU_i = sum_{j != i} (quad_weight (A_i X_ij A_j^T + A_i^T X_ij A_j) + Wbar_ij) U_j``
    scaled to ``max |G_i| = 1``, computed for all graphs at once in O(m n^2 d). The temperature
    ``tau`` is annealed from `tau0` to `tau_min` (each step damped by `step`); the soft result
    is rounded by the Hungarian method. The Hungarian phase then improves one graph at a time:
    with the others fixed, ``F`` as a function of ``U_i`` is itself a Koopmans--Beckmann
    problem between ``A_i`` and the aligned sum of the other graphs
    ``R_i = sum_{j != i} U_j^T A_j U_j`` (their noise averages out), which is solved by RRWM
    and GA (proposals) and polished by 2-opt; a change is kept only when ``F`` grows.

    The start matters: from a uniform start with ``W = 0`` the update sits at the symmetric
    saddle (all ``U_i`` uniform), which is why pygmtools' ``gamgm`` matches few nodes without
    node similarities. The default start solves graph pairs with RRWM and synchronises them
    (:func:`synchronize`); the annealing runs from that and from the star around the largest
    graph, and the better rounded answer goes on to the Hungarian phase.

    Parameters
    ----------
    A : array of shape (m, n, n)
        Weighted adjacency matrices, zero-padded to ``n = max(ns)`` (pygmtools' layout).
    W : array of shape (m, m, n, n), optional
        Node similarities: ``W[i, j]`` scores node pairs of graphs ``i`` and ``j``. ``W[i, j]``
        and ``W[j, i].T`` describe the same pair and are averaged. Default: none.
    ns : array-like of int, shape (m,), optional
        Number of nodes of each graph (``1 <= n_i <= n``); entries of `A`, `W` beyond them are
        ignored. Default: every graph has ``n`` nodes.
    n_univ : int, optional
        Universe size ``d >= max(ns)``. Default ``max(ns)``. A larger universe needs partial
        graphs (some ``n_i < d``); with all graphs full it must equal ``n``.
    quad_weight : float >= 0
        Weight of the edge (quadratic) term.
    init : {"rrwm", "ga", "uniform"}, MultiMatchResult or array of shape (m, n, d)
        Start. ``"rrwm"``/``"ga"``: pairwise matching of graph pairs (qapfuse's
        :func:`~qapfuse.rrwm` / :func:`~qapfuse.ga`, matrix-free, all pairs in one batch),
        then :func:`synchronize`.
        ``"uniform"``: ``1/d`` plus a small random perturbation from `rng` (pygmtools' start;
        it can stall at the symmetric saddle when ``W`` carries no information). A result or an
        array is used as given (e.g. from :func:`synchronize`).
    tau0, tau_min : float > 0
        First and last Sinkhorn temperature, relative to the largest gradient entry.
    decay : float in (0, 1)
        Temperature factor between stages.
    max_inner : int >= 1
        Fixed-point iterations per temperature (stops early when ``U`` moves less than `tol`).
    sk_iter : int >= 1
        Sinkhorn iterations per projection.
    tol : float > 0
        Largest entry change of ``U`` that ends a temperature stage.
    step : float in (0, 1]
        Damping of the annealing update, ``U <- (1 - step) U + step sinkhorn(G / tau)``
        (simultaneous updates of all graphs can oscillate without it).
    hungarian_sweeps : int >= 0
        Most sweeps over the graphs in the Hungarian phase (0: plain rounding).
    init_pairs : {"auto", "all", "star"}
        Pairs solved for the pairwise start: all ``m (m - 1) / 2`` of them, or the ``m - 1``
        pairs with the largest graph (faster, less robust at high noise). ``"auto"``: all when
        ``m (m - 1) / 2 * n^2 <= 100000`` (the pairwise stage's cost), else the star.
    rng : None, int, numpy.random.Generator or torch.Generator
        Randomness of the ``"uniform"`` start. Same seed and backend, same answer.

    Returns
    -------
    MultiMatchResult
        ``U`` of shape (m, n, d); ``result[i, j]`` is the ``(n_i, n_j)`` matching of graphs
        ``i`` and ``j``; ``score`` is ``F`` (half of pygmtools' objective); ``info["history"]``
        lists each temperature with its soft score.

    Raises
    ------
    ValueError
        Shapes that do not fit (``A`` not ``(m, n, n)``, ``W`` not ``(m, m, n, n)``, ``ns``
        not ``(m,)`` or outside ``[1, n]``), ``n_univ < max(ns)``, a non-square universe for
        full graphs, NaN/Inf.

    See Also
    --------
    gamgm_affinity : the same solver for general pairwise affinities.
    synchronize : spectral synchronisation of pairwise matchings.

    References
    ----------
    .. [1] A. Solé-Ribalta, F. Serratosa, "Graduated assignment algorithm for multiple graph
           matching based on a common labeling", IJPRAI 27(1), 2013.
           doi:10.1142/S0218001413500018
    .. [2] R. Wang, pj. Yan, X. Yang, "Graduated assignment for joint multi-graph matching and
           clustering with application to unsupervised graph matching network learning",
           NeurIPS 2020.
    .. [3] R. Wang et al., "Deep neural network fusion via graph matching with applications to
           model ensemble and federated learning" (GAMF), ICML 2022.

    Examples
    --------
    Five noisy copies of one graph, matched without node similarities:

    >>> import numpy as np
    >>> from qapfuse.solvers.multi import gamgm, consistency
    >>> rng = np.random.default_rng(0)
    >>> A0 = np.triu(rng.random((8, 8)), 1); A0 = A0 + A0.T
    >>> perms = [rng.permutation(8) for _ in range(5)]
    >>> A = np.stack([A0[np.ix_(p, p)] for p in perms])
    >>> res = gamgm(A)
    >>> consistency(res)
    1.0
    >>> X01 = res[0, 1]                         # node a of graph 0 -> node b of graph 1
    >>> truth = np.zeros((8, 8)); truth[np.argsort(perms[0]), np.argsort(perms[1])] = 1
    >>> bool((X01 == truth).all())
    True
    """
    start = time.perf_counter()
    caller = "gamgm"
    opts = check_options(
        dict(
            quad_weight=quad_weight,
            init=init,
            init_pairs=init_pairs,
            tau0=tau0,
            tau_min=tau_min,
            decay=decay,
            max_inner=max_inner,
            sk_iter=sk_iter,
            tol=tol,
            step=step,
            hungarian_sweeps=hungarian_sweeps,
            rng=rng,
        ),
        _OPTIONS_KB,
        caller,
    )
    _check_schedule(opts, caller)
    xp = backend.namespace_of(A, W, name="A, W")
    A, W, ns_np, d = _check_kb(A, W, ns, n_univ, caller, xp=xp)
    m, n = A.shape[0], A.shape[1]
    dtype, dev = A.dtype, backend.device(A)
    mask_n = _row_mask(ns_np, n)
    A = xp.where(
        backend.asarray_on(mask_n[:, :, None] & mask_n[:, None, :], xp=xp, device=dev),
        A,
        xp.zeros_like(A),
    )
    Wbar = supW = None
    if W is not None:
        pair_mask = mask_n[:, None, :, None] & mask_n[None, :, None, :]
        not_self = ~np.eye(m, dtype=bool)[:, :, None, None]
        keep = backend.asarray_on(pair_mask & not_self, xp=xp, device=dev)
        W = xp.where(keep, W, xp.zeros_like(W))
        Wbar = 0.5 * (W + xp.permute_dims(W, (1, 0, 3, 2)))
        supW = xp.reshape(xp.permute_dims(Wbar, (0, 2, 1, 3)), (m * n, m * n))
    obj = _KBObjective(A, supW, opts["quad_weight"], xp=xp)

    def pairwise(method: str) -> Array:
        pairs = opts["init_pairs"]
        if pairs == "auto":  # all pairs unless their cost (pairs x n^2) is large
            pairs = "all" if m * (m - 1) // 2 * n * n <= AUTO_PAIRS_BUDGET else "star"
        Xb = _pairwise_kb(A, Wbar, ns_np, opts["quad_weight"], method, pairs=pairs, xp=xp)
        return Xb, pairs == "star"

    return _run(obj, ns_np, n, d, opts, pairwise, caller, start, xp=xp, dtype=dtype, device=dev)


def gamgm_affinity(
    K: Any,
    ns: Any = None,
    n_univ: int | None = None,
    *,
    init: Any = "rrwm",
    tau0: float = 0.05,
    tau_min: float = 1e-3,
    decay: float = 0.5,
    max_inner: int = 20,
    sk_iter: int = 100,
    tol: float = 1e-3,
    step: float = 0.5,
    hungarian_sweeps: int = 10,
    rng: Any = None,
) -> MultiMatchResult:
    r"""Multi-graph graduated assignment for general pairwise affinities (Lawler form).

    Maximises ``F = sum_{i<j} vec(X_ij)^T K_ij vec(X_ij)`` over universe matchings with
    ``X_ij = U_i U_j^T``. The gradient for graph ``i`` sums ``G_ij U_j`` over its pairs, with
    ``G_ij = (K_ij + K_ij^T) vec(X_ij)`` from each operator's ``gradient``; only ``matvec`` is
    needed, so dense, sparse and matrix-free (Koopmans--Beckmann, factorised) affinities all
    work. The schedule is that of :func:`gamgm`.

    Parameters
    ----------
    K : Problem, mapping or array
        The pairwise affinities, in one of three forms:

        * a :class:`~qapfuse.Problem` with a batch of ``m (m - 1) / 2`` instances, the pairs
          ``(0, 1), (0, 2), ..., (m-2, m-1)`` in this order; instance ``k`` has sizes
          ``(n_i, n_j)`` (so ``n_i <= n_j``: order the graphs by size, or use a mapping);
        * a mapping ``{(i, j): K_ij}`` with one entry per unordered pair, ``K_ij`` a
          :class:`~qapfuse.Problem` (batch 1), an :class:`~qapfuse.problem.Affinity`, a dense
          array of shape ``(n_i n_j, n_i n_j)`` or a scipy/torch sparse matrix; the key ``(j, i)``
          stands for ``X_ji = X_ij^T`` (use it when ``n_i > n_j``);
        * a dense array of shape ``(m, m, n^2, n^2)`` (pygmtools' ``cao``/``mgm_floyd`` input);
          ``K[i, j]`` for ``i < j`` is used.

        ``vec`` is column-major throughout (pair ``(a, b)`` at ``a + b * n_i``).
    ns : array-like of int, shape (m,), optional
        Graph sizes. Default: read from `K` (every graph must appear in some pair).
    n_univ : int, optional
        Universe size ``d >= max(ns)``, as in :func:`gamgm`.
    init, tau0, tau_min, decay, max_inner, sk_iter, tol, step, hungarian_sweeps, rng
        As in :func:`gamgm`; ``"rrwm"``/``"ga"`` solve every pair with that solver first.
        The Hungarian phase re-matches each graph to the others through the operators
        (GA proposals on ``F(U_i)``, which is quadratic in ``U_i`` with the others fixed),
        then runs linearised Hungarian sweeps; changes are kept when ``F`` grows.

    Returns
    -------
    MultiMatchResult
        As in :func:`gamgm`.

    Raises
    ------
    ValueError
        A pair missing or given twice, a pair whose operator does not fit its graphs' sizes,
        a batch that is not ``m (m - 1) / 2`` pairs, ``n_univ < max(ns)``.

    References
    ----------
    .. [1] R. Wang, pj. Yan, X. Yang, "Graduated assignment for joint multi-graph matching and
           clustering with application to unsupervised graph matching network learning",
           NeurIPS 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse import Problem
    >>> from qapfuse.solvers.multi import gamgm_affinity, consistency
    >>> rng = np.random.default_rng(1)
    >>> A0 = np.triu(rng.random((6, 6)), 1); A0 = A0 + A0.T
    >>> perms = [rng.permutation(6) for _ in range(4)]
    >>> As = [A0[np.ix_(p, p)] for p in perms]
    >>> K = {(i, j): np.kron(As[j], As[i]) for i in range(4) for j in range(i + 1, 4)}
    >>> res = gamgm_affinity(K)
    >>> consistency(res), res[0, 1].shape
    (1.0, (6, 6))
    """
    start = time.perf_counter()
    caller = "gamgm_affinity"
    opts = check_options(
        dict(
            init=init,
            tau0=tau0,
            tau_min=tau_min,
            decay=decay,
            max_inner=max_inner,
            sk_iter=sk_iter,
            tol=tol,
            step=step,
            hungarian_sweeps=hungarian_sweeps,
            rng=rng,
        ),
        OPTIONS,
        caller,
    )
    _check_schedule(opts, caller)
    groups, ns_np, xp, dtype, dev = _parse_affinities(K, ns, caller)
    d = _check_universe(ns_np, n_univ, caller)
    nrow = max([int(ns_np.max())] + [max(g.affinity.n1max, g.affinity.n2max) for g in groups])
    obj = _PairObjective(groups, len(ns_np), nrow, xp=xp, dtype=dtype, device=dev)

    def pairwise(method: str) -> Array:
        Xb = _pairwise_groups(groups, len(ns_np), nrow, method, xp=xp, dtype=dtype, device=dev)
        return Xb, False

    return _run(obj, ns_np, nrow, d, opts, pairwise, caller, start, xp=xp, dtype=dtype, device=dev)


def synchronize(
    X_pairs: Any,
    d: int | None = None,
    *,
    ns: Any = None,
) -> MultiMatchResult:
    r"""Spectral permutation synchronisation: the nearest cycle-consistent set of matchings.

    The pairwise matchings form a symmetric block matrix ``Z`` (block ``(i, j)`` is ``X_ij``,
    diagonal blocks identities). For consistent matchings ``Z = U U^T`` has rank ``d``; for
    noisy ones its top ``d`` eigenpairs ``V, Lambda`` give the best rank-``d`` fit
    ``Z ~ (V Lambda^{1/2}) (V Lambda^{1/2})^T`` (found by subspace iteration started from the
    largest graph's block column). The rows of ``V Lambda^{1/2}`` (node embeddings) of each
    graph are then projected to a universe matching by the Hungarian method against running
    centroids of the universe nodes (graphs taken from the largest down, then two
    leave-one-out refinement passes); a row far from every centroid (similarity below 1/2)
    opens a new universe node while any is free, so partial graphs work. Missing pairs (zero
    blocks in an array input) are tolerated by the algebra but not by the mapping input.

    Parameters
    ----------
    X_pairs : MultiMatchResult, array of shape (m, m, n, n), or mapping {(i, j): X_ij}
        Pairwise matchings (0/1 or soft), ``X_ij`` of shape ``(n_i, n_j)``. An array is read in
        pygmtools' layout (``cao``/``mgm_floyd`` output); ``X[i, j]`` and ``X[j, i].T`` are
        averaged. A mapping needs one entry per unordered pair (``(j, i)`` means ``X_ji``).
    d : int, optional
        Universe size, ``>= max(ns)``. Default ``max(ns)``.
    ns : array-like of int, shape (m,), optional
        Graph sizes for an array input. Default: all ``n`` (a mapping gives its own sizes).

    Returns
    -------
    MultiMatchResult
        Cycle-consistent ``U``; ``score`` is the agreement ``sum_{i<j} <X_ij, U_i U_j^T>`` with
        the input, and ``info["eigenvalues"]`` holds the top ``d`` eigenvalues (for consistent
        input: how many graphs hold each universe node).

    Notes
    -----
    The eigen-decomposition is dense (``O((sum n_i)^3)``) and runs in the input's library and
    device; the projection (``m`` small assignment problems) runs on the host.

    References
    ----------
    .. [1] D. Pachauri, R. Kondor, V. Singh, "Solving the multi-way matching problem by
           permutation synchronization", NeurIPS 2013.
    .. [2] E. Maset, F. Arrigoni, A. Fusiello, "Practical and efficient multi-view matching",
           ICCV 2017.

    Examples
    --------
    Matchings of four graphs with one corrupted pair:

    >>> import numpy as np
    >>> from qapfuse.solvers.multi import synchronize, consistency
    >>> rng = np.random.default_rng(0)
    >>> P = [np.eye(5)[rng.permutation(5)] for _ in range(4)]
    >>> X = {(i, j): P[i] @ P[j].T for i in range(4) for j in range(i + 1, 4)}
    >>> X[(0, 1)] = X[(0, 1)][:, [1, 0, 2, 3, 4]]    # two nodes swapped
    >>> res = synchronize(X)
    >>> consistency(X), consistency(res)
    (0.5, 1.0)
    >>> bool((res[0, 1] == P[0] @ P[1].T).all())
    True
    """
    start = time.perf_counter()
    caller = "synchronize"
    Xb, ns_np, xp = _parse_pairs(X_pairs, ns, caller, soft_ok=True)
    d = _check_universe(ns_np, d, caller)
    U, evals = _sync_blocks(Xb, ns_np, d, xp=xp)
    score = 0.5 * float(xp.sum(_pair_blocks(U, xp=xp) * Xb * _off_diagonal(len(ns_np), Xb, xp=xp)))
    return MultiMatchResult(
        U=U,
        ns=ns_np,
        soft=None,
        score=score,
        n_iter=0,
        converged=True,
        time=time.perf_counter() - start,
        info={"eigenvalues": evals},
    )


def consistency(result_or_pairs: Any, *, ns: Any = None) -> float:
    """Fraction of cycle-consistent triples of graphs.

    A triple ``{i, j, k}`` is consistent when composing two of its matchings never contradicts
    the third: ``X_ij X_jk <= X_ik`` entrywise, for every order of the three graphs (for full
    permutations: ``X_ij X_jk = X_ik``).

    Parameters
    ----------
    result_or_pairs : MultiMatchResult, array of shape (m, m, n, n), or mapping {(i, j): X_ij}
        0/1 pairwise matchings (see :func:`synchronize` for the forms).
    ns : array-like of int, shape (m,), optional
        Graph sizes for an array input.

    Returns
    -------
    float
        In ``[0, 1]``; 1.0 for a :class:`MultiMatchResult` (and for fewer than three graphs).

    Examples
    --------
    >>> import numpy as np
    >>> from qapfuse.solvers.multi import consistency
    >>> pi, S = np.eye(2), np.eye(2)[::-1]
    >>> consistency({(0, 1): pi, (1, 2): pi, (0, 2): S})
    0.0
    """
    caller = "consistency"
    Xb, _, xp = _parse_pairs(result_or_pairs, ns, caller, soft_ok=False)
    m = Xb.shape[0]
    if m < 3:
        return 1.0
    ok = np.ones((m, m, m), dtype=bool)
    for i in range(m):
        Xi = Xb[i, ...]  # (m, n, n): X_ij for all j
        comp = xp.matmul(Xi[:, None, :, :], Xb)  # [j, k] = X_ij X_jk
        bad = xp.any(comp > Xi[None, :, :, :] + 0.5, axis=(2, 3))  # vs X_ik
        ok[i] = ~backend.to_numpy(bad).astype(bool)
    for perm in ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        ok = ok & np.transpose(ok, perm)
    idx = np.array([(a, b, c) for a in range(m) for b in range(a + 1, m) for c in range(b + 1, m)])
    return float(np.mean(ok[idx[:, 0], idx[:, 1], idx[:, 2]]))


def accuracy(result_or_pairs: Any, truth: Any, *, ns: Any = None) -> float:
    """Pairwise matching accuracy against a ground truth.

    ``sum_{i != j} <X_ij, T_ij> / sum_{i != j} <T_ij, T_ij>``: the fraction of true node
    correspondences (over all ordered pairs of distinct graphs) that the matchings contain.
    Nodes without a true partner (outliers: zero rows of ``T_ij``) do not count.

    Parameters
    ----------
    result_or_pairs : MultiMatchResult, array of shape (m, m, n, n), or mapping {(i, j): X_ij}
        0/1 pairwise matchings (see :func:`synchronize` for the forms).
    truth : same forms
        The true matchings ``T_ij``.
    ns : array-like of int, shape (m,), optional
        Graph sizes for array inputs.

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    caller = "accuracy"
    Xb, ns_x, _ = _parse_pairs(result_or_pairs, ns, caller, soft_ok=False)
    Tb, ns_t, _ = _parse_pairs(truth, ns, caller, soft_ok=False, name="truth")
    if not np.array_equal(ns_x, ns_t):
        raise ValueError(
            f"`truth` in {caller} must describe the same graphs as the matchings; got sizes "
            f"{ns_t.tolist()} and {ns_x.tolist()}."
        )
    Xn = backend.to_numpy(Xb).astype(np.float64)
    Tn = backend.to_numpy(Tb).astype(np.float64)
    off = ~np.eye(Xn.shape[0], dtype=bool)
    total = float(Tn[off].sum())
    if total == 0:
        raise ValueError(f"`truth` in {caller} holds no correspondences.")
    return float((Xn[off] * Tn[off]).sum() / total)


# ----------------------------------------------------------------------------------------------
# The annealing loop shared by both entry points
# ----------------------------------------------------------------------------------------------


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
    init_name, starts = _initial(
        init, pairwise, ns, nrow, d, opts.get("rng"), caller, xp=xp, dtype=dtype, device=device
    )
    if not starts:
        gen = backend.rng_from(opts.get("rng"), caller=caller)
        u = np.where(mask_np, 1.0 / d + gen.random((m, nrow, d)) * 1e-3, 0.0)
        starts = [(xp.astype(backend.asarray_on(u, xp=xp, device=device), dtype), False)]

    # Graduated assignment from each start: all graphs at once (Algorithm 1 of [2], in the
    # universe form); the best rounded answer (or hard start) goes on to the Hungarian phase.
    stages = max(1, math.floor(math.log(tau_min / tau0) / math.log(decay) + 1e-9) + 1)
    runs = []
    n_iter = 0
    for U0, hard in starts:
        if hard and _is_fixed_point(obj, U0, ns, xp=xp):
            # the cold update maps this start to itself: annealing would only return to it
            runs.append((obj.score(U0), U0, U0, [], 0.0, "start (fixed point)"))
            continue
        U, history, n_it, change = _anneal(obj, U0, mask, square, stages, opts, xp=xp)
        n_iter += n_it
        U_hard = _round(U, ns, xp=xp)
        runs.append((obj.score(U_hard), U_hard, U, history, change, "annealed"))
        if hard:
            runs.append((obj.score(U0), U0, U, history, change, "start"))
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
    refine = _consensus_sweeps if isinstance(obj, _KBObjective) else _pair_sweeps
    info: dict[str, Any] = {
        "history": history,
        "init": init_name,
        "candidates": [(r[5], r[0]) for r in runs],
        "picked": picked,
    }
    U_hard, score, used = refine(obj, U_hard, ns, sweeps, xp=xp)
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
    obj: Any, U: Array, mask: Array, square: Array, stages: int, opts: dict[str, Any], *, xp: Any
) -> tuple[Array, list[dict[str, Any]], int, float]:
    """The annealing loop: ``U <- (1 - step) U + step sinkhorn(G(U) / tau)``, tau decaying."""
    tau0, decay, tol, step = opts["tau0"], opts["decay"], opts["tol"], opts["step"]
    history: list[dict[str, Any]] = []
    n_iter, change = 0, float("inf")
    for stage in range(stages):
        tau = tau0 * decay**stage
        inner = 0
        for inner in range(1, opts["max_inner"] + 1):
            G = normalise(obj.grad(U), xp=xp)
            log_U, _, _ = sinkhorn_log(
                G / tau, mask=mask, square=square, max_iter=opts["sk_iter"], tol=1e-5, xp=xp
            )
            U_new = xp.exp(log_U)
            if step < 1.0:
                U_new = step * U_new + (1.0 - step) * U
            change = float(xp.max(xp.abs(U_new - U)))
            U = U_new
            n_iter += 1
            if change < tol:
                break
        history.append({"tau": tau, "inner": inner, "change": change, "score": obj.score(U)})
    return U, history, n_iter, change


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
) -> tuple[str, list[tuple[Array, bool]]]:
    """Starts ``(U, is_hard)``: pairwise + synchronisation (and the star), or the given one."""
    m = ns.shape[0]
    if isinstance(init, str):
        if init not in INITS:
            from .._validation import check_choice

            check_choice(init, "init", caller, INITS)
        if init == "uniform":
            return "uniform", []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pairwise non-convergence is fine for a start
            Xb, star_only = pairwise(init)
        U, _ = _sync_blocks(Xb, ns, d, xp=xp)
        starts = [(U, True)]
        if not star_only:  # also the star around the largest graph, read off the same pairs
            ref = int(np.argmax(ns))
            touch = np.zeros((m, m), dtype=bool)
            touch[ref, :] = touch[:, ref] = True
            keep = backend.asarray_on(touch[:, :, None, None], xp=xp, device=device)
            U_star, _ = _sync_blocks(xp.where(keep, Xb, xp.zeros_like(Xb)), ns, d, xp=xp)
            starts.append((U_star, True))
        return f"{init}+synchronize", starts
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
    return "given", [(U0, hard)]


def _round(U: Array, ns: np.ndarray, *, xp: Any) -> Array:
    """Hungarian projection of each ``U_i`` (rows ``:n_i``) to a 0/1 universe matching."""
    m, d = U.shape[0], U.shape[2]
    X = _hungarian_np(backend.to_numpy(U).astype(np.float64), ns, np.full(m, d))
    return backend.from_numpy(X, like=U)


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


# ----------------------------------------------------------------------------------------------
# Synchronisation kernel
# ----------------------------------------------------------------------------------------------


def _sync_blocks(Xb: Array, ns: np.ndarray, d: int, *, xp: Any) -> tuple[Array, np.ndarray]:
    """Validated blocks (m, m, r, r) with zero padding -> hard U (m, r, d), top eigenvalues."""
    m, _, r, _ = Xb.shape
    N = m * r
    eye = xp.eye(r, dtype=Xb.dtype, device=backend.device(Xb))
    rows = backend.asarray_on(_row_mask(ns, r), xp=xp, device=backend.device(Xb))
    diag = xp.astype(rows[:, :, None] & rows[:, None, :], Xb.dtype) * eye[None, :, :]
    sel = backend.asarray_on(
        np.eye(m, dtype=bool)[:, :, None, None], xp=xp, device=backend.device(Xb)
    )
    B = xp.where(sel, diag[:, None, :, :], Xb)  # identity on the diagonal blocks
    Z = xp.reshape(xp.permute_dims(B, (0, 2, 1, 3)), (N, N))
    Z = 0.5 * (Z + xp.permute_dims(Z, (1, 0)))
    V, ev = _top_eigenvectors(Z, d, start_block=int(np.argmax(ns)), block=r, xp=xp)
    # rows of V sqrt(lambda) are node embeddings whose inner products fit Z (1: same universe
    # node); the weights silence directions with no support (d > the nodes any graph shares)
    emb = backend.to_numpy(V).astype(np.float64) * np.sqrt(np.maximum(ev, 0.0))[None, :]
    U = _project_universe(emb.reshape(m, r, d), ns, d)
    return backend.from_numpy(U, like=Xb), ev


def _top_eigenvectors(
    Z: Array, d: int, *, start_block: int, block: int, xp: Any, max_iter: int = 50
) -> tuple[Array, np.ndarray]:
    """Top-``d`` eigenvectors of the symmetric PSD-like ``Z`` (N, N) by subspace iteration.

    Starts from the block column of graph `start_block` (``Z[:, block]``, which already spans
    the answer for consistent input) padded with the next columns, orthonormalised by QR;
    stops when the Ritz values settle (relative change below 1e-10) or after `max_iter`.
    Returns ``V`` (N, d) and the Ritz values, largest first.
    """
    N = Z.shape[0]
    lo = start_block * block
    cols = np.concatenate([np.arange(lo, N), np.arange(0, lo)])[:d]
    V = xp.take(Z, backend.asarray_on(cols, xp=xp, device=backend.device(Z)), axis=1)
    # a tiny deterministic tilt keeps padded (all-zero) columns from making V rank-deficient
    tilt = np.cos(np.outer(np.arange(N) + 1.0, np.arange(d) + 1.0)) * 1e-3
    V = V + xp.astype(backend.asarray_on(tilt, xp=xp, device=backend.device(Z)), Z.dtype)
    V, _ = xp.linalg.qr(V)
    prev = None
    for _ in range(max_iter):
        V, _ = xp.linalg.qr(xp.matmul(Z, V))
        ritz = backend.to_numpy(xp.sum(V * xp.matmul(Z, V), axis=0)).astype(np.float64)
        if prev is not None and np.max(np.abs(ritz - prev)) <= 1e-8 * max(1.0, np.max(ritz)):
            break
        prev = ritz
    order = np.argsort(-ritz, kind="stable")
    V = xp.take(V, backend.asarray_on(order, xp=xp, device=backend.device(Z)), axis=1)
    return V, ritz[order]


def _project_universe(V: np.ndarray, ns: np.ndarray, d: int, threshold: float = 0.5) -> np.ndarray:
    """Rows ``V_i`` (m, r, k) of the top eigenvectors -> 0/1 universe matchings (m, r, d)."""
    m, r, k = V.shape
    order = np.argsort(-ns, kind="stable")
    C_sum = np.zeros((d, k))
    count = np.zeros(d)
    slots: list[np.ndarray | None] = [None] * m

    def assign(i: int) -> np.ndarray:
        Vi = V[i, : ns[i], :]
        C = C_sum / np.maximum(count, 1.0)[:, None]
        norm2 = np.einsum("ij,ij->i", C, C)
        S = (Vi @ C.T) / np.where(norm2 > 0, norm2, 1.0)[None, :]
        S[:, count == 0] = threshold
        rows, cols = linear_sum_assignment(S, maximize=True)
        out = np.empty(ns[i], dtype=np.int64)
        out[rows] = cols
        return out

    def add(i: int, sign: float) -> None:
        s = slots[i]
        np.add.at(C_sum, s, sign * V[i, : ns[i], :])
        np.add.at(count, s, sign)

    for i in order:
        slots[i] = assign(i)
        add(i, 1.0)
    for _ in range(2):  # leave-one-out refinement
        for i in order:
            add(i, -1.0)
            slots[i] = assign(i)
            add(i, 1.0)
    U = np.zeros((m, r, d))
    for i in range(m):
        U[i, np.arange(ns[i]), slots[i]] = 1.0
    return U


# ----------------------------------------------------------------------------------------------
# Pairwise starts
# ----------------------------------------------------------------------------------------------


def _pair_indices(m: int) -> tuple[np.ndarray, np.ndarray]:
    pi, pj = np.triu_indices(m, 1)
    return pi.astype(np.int64), pj.astype(np.int64)


def _pairwise_solver(method: str) -> Any:
    from .ga import ga
    from .rrwm import rrwm

    return {"rrwm": rrwm, "ga": ga}[method]


def _pairwise_kb(
    A: Array,
    Wbar: Array | None,
    ns: np.ndarray,
    w: float,
    method: str,
    *,
    pairs: str = "all",
    xp: Any,
) -> Array:
    """Solve the pairs of the KB form (all ``i < j``, or a star around the largest graph).

    Returns blocks (m, m, n, n) with ``X_ji = X_ij^T`` and zeros for pairs not solved.
    """
    m, n = A.shape[0], A.shape[1]
    if pairs == "star":
        ref = int(np.argmax(ns))
        others = np.array([i for i in range(m) if i != ref], dtype=np.int64)
        pi, pj = np.full(m - 1, ref, dtype=np.int64), others
    else:
        pi, pj = _pair_indices(m)
    swap = ns[pi] > ns[pj]
    a, b = np.where(swap, pj, pi), np.where(swap, pi, pj)
    dev = backend.device(A)
    a_x = backend.asarray_on(a, xp=xp, device=dev)
    b_x = backend.asarray_on(b, xp=xp, device=dev)
    L = None
    if Wbar is not None:
        flat = xp.reshape(Wbar, (m * m, n, n))
        L = xp.take(flat, backend.asarray_on(a * m + b, xp=xp, device=dev), axis=0)
    prob = Problem.koopmans_beckmann(
        w * xp.take(A, a_x, axis=0), xp.take(A, b_x, axis=0), L, n1=ns[a], n2=ns[b]
    )
    X = _pairwise_solver(method)(prob).X  # (P, n, n), X_ab
    Xt = xp.permute_dims(X, (0, 2, 1))
    sw = backend.asarray_on(swap[:, None, None], xp=xp, device=dev)
    X = xp.where(sw, Xt, X)  # X_ij for i < j
    return _scatter_pairs(X, pi, pj, m, xp=xp)


def _pairwise_groups(
    groups: list[_Group], m: int, nrow: int, method: str, *, xp: Any, dtype: Any, device: Any
) -> Array:
    solver = _pairwise_solver(method)
    blocks = xp.zeros((m * m, nrow * nrow), dtype=dtype, device=device)
    for g in groups:
        prob = Problem(g.affinity, g.n_pi, g.n_pj, batched=True)
        X = solver(prob).X  # (P, r, c): X_IJ
        P = X.shape[0]
        X = _pad2(X, nrow, xp=xp)
        flat_ij = xp.reshape(X, (P, nrow * nrow))
        flat_ji = xp.reshape(xp.permute_dims(X, (0, 2, 1)), (P, nrow * nrow))
        E1 = np.zeros((m * m, P))
        E2 = np.zeros((m * m, P))
        E1[g.pi * m + g.pj, np.arange(P)] = 1.0
        E2[g.pj * m + g.pi, np.arange(P)] = 1.0
        E1x = xp.astype(backend.asarray_on(E1, xp=xp, device=device), dtype)
        E2x = xp.astype(backend.asarray_on(E2, xp=xp, device=device), dtype)
        blocks = blocks + xp.matmul(E1x, flat_ij) + xp.matmul(E2x, flat_ji)
    return xp.reshape(blocks, (m, m, nrow, nrow))


def _pad2(X: Array, r: int, *, xp: Any) -> Array:
    P, a, b = X.shape
    if a < r:
        X = xp.concat([X, xp.zeros((P, r - a, b), dtype=X.dtype, device=backend.device(X))], axis=1)
    if b < r:
        X = xp.concat([X, xp.zeros((P, r, r - b), dtype=X.dtype, device=backend.device(X))], axis=2)
    return X


def _scatter_pairs(X: Array, pi: np.ndarray, pj: np.ndarray, m: int, *, xp: Any) -> Array:
    """Pair matchings X_ij (P, r, r) for i < j -> blocks (m, m, r, r) with X_ji = X_ij^T."""
    P, r, _ = X.shape
    dev = backend.device(X)
    E1 = np.zeros((m * m, P))
    E2 = np.zeros((m * m, P))
    E1[pi * m + pj, np.arange(P)] = 1.0
    E2[pj * m + pi, np.arange(P)] = 1.0
    E1x = xp.astype(backend.asarray_on(E1, xp=xp, device=dev), X.dtype)
    E2x = xp.astype(backend.asarray_on(E2, xp=xp, device=dev), X.dtype)
    flat = xp.matmul(E1x, xp.reshape(X, (P, r * r))) + xp.matmul(
        E2x, xp.reshape(xp.permute_dims(X, (0, 2, 1)), (P, r * r))
    )
    return xp.reshape(flat, (m, m, r, r))


# ----------------------------------------------------------------------------------------------
# Input parsing and checks
# ----------------------------------------------------------------------------------------------


def _row_mask(ns: np.ndarray, r: int) -> np.ndarray:
    return np.arange(r)[None, :] < ns[:, None]


def _off_diagonal(m: int, like: Array, *, xp: Any) -> Array:
    off = ~np.eye(m, dtype=bool)[:, :, None, None]
    return xp.astype(backend.asarray_on(off, xp=xp, device=backend.device(like)), like.dtype)


def _pair_blocks(U: Array, *, xp: Any) -> Array:
    return xp.matmul(U[:, None, :, :], xp.permute_dims(U, (0, 2, 1))[None, :, :, :])


def _check_schedule(opts: dict[str, Any], caller: str) -> None:
    if opts["tau_min"] > opts["tau0"]:
        raise ValueError(
            f"The 'tau_min' parameter of {caller} must be <= tau0; got tau_min="
            f"{opts['tau_min']}, tau0={opts['tau0']}."
        )


def _check_sizes(ns: Any, m: int, n: int, caller: str) -> np.ndarray:
    if ns is None:
        return np.full(m, n, dtype=np.int64)
    if backend.is_torch_array(ns) or hasattr(ns, "__array_namespace__"):
        ns = backend.to_numpy(ns)
    arr = np.asarray(ns)
    if arr.dtype.kind not in "iu" and not (
        arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    ):
        raise TypeError(f"`ns` in {caller} must hold ints; got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if arr.shape != (m,):
        raise ValueError(f"`ns` in {caller} must have shape (m,) = ({m},); got {arr.shape}.")
    if np.any(arr < 1) or np.any(arr > n):
        raise ValueError(
            f"`ns` in {caller} must lie in [1, n] = [1, {n}] (the padded size); got {arr.tolist()}."
        )
    return arr


def _check_universe(ns: np.ndarray, d: Any, caller: str) -> int:
    nmax = int(ns.max())
    if d is None:
        return nmax
    if backend.is_torch_array(d) or isinstance(d, np.ndarray):
        d = int(backend.to_numpy(d).item())
    check_scalar(d, "n_univ", caller, integer=True, low=1, low_inclusive=True)
    if d < nmax:
        raise ValueError(
            f"The 'n_univ' parameter of {caller} must be >= the largest graph (max(ns) = "
            f"{nmax}); got {d}."
        )
    if d > nmax and np.all(ns == nmax):
        raise ValueError(
            f"All graphs of {caller} are full ({nmax} nodes each), so the universe must be "
            f"square: n_univ = {nmax}; got {d}. A larger universe needs partial graphs (pass "
            "`ns` with some n_i < n_univ)."
        )
    return int(d)


def _float(x: Array, name: str, caller: str, *, xp: Any) -> Array:
    if not xp.isdtype(x.dtype, "real floating"):
        if xp.isdtype(x.dtype, ("integral", "bool")):
            return xp.astype(x, xp.float64)
        raise TypeError(f"`{name}` in {caller} must be real; got dtype {x.dtype}.")
    return x


def _check_kb(
    A: Any, W: Any, ns: Any, n_univ: Any, caller: str, *, xp: Any
) -> tuple[Array, Array | None, np.ndarray, int]:
    A = _float(xp.asarray(A), "A", caller, xp=xp)
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"`A` in {caller} must have shape (m, n, n); got {tuple(A.shape)}.")
    m, n = A.shape[0], A.shape[1]
    if m < 2:
        raise ValueError(f"{caller} needs at least 2 graphs; `A` has shape {tuple(A.shape)}.")
    if not bool(xp.all(xp.isfinite(A))):
        raise ValueError(f"`A` in {caller} contains NaN or Inf; clean or mask it first.")
    if W is not None:
        W = xp.astype(_float(xp.asarray(W), "W", caller, xp=xp), A.dtype)
        if tuple(W.shape) != (m, m, n, n):
            raise ValueError(
                f"`W` in {caller} must have shape (m, m, n, n) = {(m, m, n, n)} for `A` of shape "
                f"{tuple(A.shape)}; got {tuple(W.shape)}."
            )
        if not bool(xp.all(xp.isfinite(W))):
            raise ValueError(f"`W` in {caller} contains NaN or Inf; clean or mask it first.")
    ns_np = _check_sizes(ns, m, n, caller)
    d = _check_universe(ns_np, n_univ, caller)
    return A, W, ns_np, d


def _as_affinity(item: Any, key: tuple[int, int], caller: str) -> tuple[Affinity, int, int]:
    """One pair's affinity -> (operator with batch 1, n1, n2)."""
    if isinstance(item, Problem):
        if item.batch != 1:
            raise ValueError(
                f"The affinity of pair {key} in {caller} must be one instance; got a batch of "
                f"{item.batch}."
            )
        return item.affinity, int(item.n1[0]), int(item.n2[0])
    if isinstance(item, Affinity):
        if item.batch != 1:
            raise ValueError(
                f"The affinity of pair {key} in {caller} must be one instance; got a batch of "
                f"{item.batch}."
            )
        return item, item.n1max, item.n2max
    if backend.is_sparse(item):
        N = item.shape[0]
        return SparseAffinity(
            [_sparse_float(item)], *_square_sizes(N, key, caller)
        ), *_square_sizes(N, key, caller)
    try:
        xp = backend.namespace_of(item, name=f"K[{key}]")
    except TypeError:
        raise TypeError(
            f"The affinity of pair {key} in {caller} must be a Problem, an Affinity, a dense "
            f"array or a sparse matrix; got {type(item).__name__}."
        ) from None
    K = _float(xp.asarray(item), f"K[{key}]", caller, xp=xp)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(
            f"The affinity of pair {key} in {caller} must be a square (n_i n_j, n_i n_j) matrix; "
            f"got shape {tuple(K.shape)}."
        )
    n1, n2 = _square_sizes(K.shape[0], key, caller)
    return DenseAffinity(K[None, ...], n1, n2), n1, n2


def _sparse_float(M: Any) -> Any:
    if backend.is_torch_array(M):
        return M if M.dtype.is_floating_point else M.double()
    import scipy.sparse as sp

    M = sp.csr_matrix(M)
    return M if M.dtype.kind == "f" else M.astype(np.float64)


def _square_sizes(N: int, key: tuple[int, int], caller: str) -> tuple[int, int]:
    n = math.isqrt(N)
    if n * n != N:
        raise ValueError(
            f"The affinity of pair {key} in {caller} has {N} rows, not n*n; pass a Problem "
            "(with n1, n2) for graphs of different sizes."
        )
    return n, n


def _parse_affinities(
    K: Any, ns: Any, caller: str
) -> tuple[list[_Group], np.ndarray, Any, Any, Any]:
    if isinstance(K, Problem):
        P = K.batch
        m = (1 + math.isqrt(1 + 8 * P)) // 2
        if m < 2 or m * (m - 1) // 2 != P:
            raise ValueError(
                f"A batched Problem for {caller} must hold m (m - 1) / 2 pairs (0, 1), (0, 2), "
                f"...; got a batch of {P}, which is not such a number."
            )
        pi, pj = _pair_indices(m)
        g = _Group(K.affinity, pi, pj)
        g.n_pi, g.n_pj = K.n1.astype(np.int64), K.n2.astype(np.int64)
        groups = [g]
        xp, dtype, dev = K.xp, K.dtype, K.device
    elif isinstance(K, Mapping):
        groups, m, xp, dtype, dev = _groups_from_mapping(K, ns, caller)
    else:
        if backend.is_sparse(K) or not hasattr(K, "shape"):
            raise TypeError(
                f"`K` in {caller} must be a batched Problem, a mapping {{(i, j): K_ij}} or a dense "
                f"array of shape (m, m, n^2, n^2); got {type(K).__name__}."
            )
        xp = backend.namespace_of(K, name="K")
        K = _float(xp.asarray(K), "K", caller, xp=xp)
        if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[2] != K.shape[3]:
            raise ValueError(
                f"A dense `K` in {caller} must have shape (m, m, n^2, n^2); got {tuple(K.shape)}."
            )
        m = K.shape[0]
        n, _ = _square_sizes(K.shape[2], ("all", "all"), caller)
        if not bool(xp.all(xp.isfinite(K))):
            raise ValueError(f"`K` in {caller} contains NaN or Inf; clean or mask it first.")
        ns_np = _check_sizes(ns, m, n, caller)
        pi, pj = _pair_indices(m)
        swap = ns_np[pi] > ns_np[pj]
        a, b = np.where(swap, pj, pi), np.where(swap, pi, pj)
        dev = backend.device(K)
        flat = xp.reshape(K, (m * m, K.shape[2], K.shape[3]))
        Kp = xp.take(flat, backend.asarray_on(a * m + b, xp=xp, device=dev), axis=0)
        g = _Group(DenseAffinity(Kp, n, n), a, b)
        g.n_pi, g.n_pj = ns_np[a], ns_np[b]
        groups = [g]
        dtype = K.dtype
    if m < 2:
        raise ValueError(f"{caller} needs at least 2 graphs.")
    ns_np = _sizes_from_groups(groups, m, ns, caller)
    return groups, ns_np, xp, dtype, dev


def _groups_from_mapping(
    K: Mapping[Any, Any], ns: Any, caller: str
) -> tuple[list[_Group], int, Any, Any, Any]:
    keys = list(K.keys())
    for key in keys:
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in key)
            or key[0] == key[1]
            or min(key) < 0
        ):
            raise ValueError(
                f"The keys of `K` in {caller} must be pairs (i, j) of distinct graph indices "
                f">= 0; got {key!r}."
            )
    m = max(max(k) for k in keys) + 1 if keys else 0
    if m < 2:
        raise ValueError(f"`K` in {caller} must hold the affinities of at least one pair.")
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for key in keys:
        u = (min(key), max(key))
        if u in seen:
            raise ValueError(
                f"Pair {u} of `K` in {caller} is given twice (as {seen[u]} and {key}); give "
                "each unordered pair once."
            )
        seen[u] = key
    missing = [(i, j) for i in range(m) for j in range(i + 1, m) if (i, j) not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"`K` in {caller} must hold an affinity for every pair of the {m} graphs; missing "
            f"{', '.join(map(str, missing[:5]))}{more}."
        )
    groups = []
    xp = dtype = dev = None
    for u in sorted(seen):
        key = seen[u]
        aff, n1, n2 = _as_affinity(K[key], key, caller)
        if xp is None:
            xp, dtype, dev = aff.xp, aff.dtype, aff.device
        elif aff.xp is not xp:
            raise TypeError(f"All affinities of `K` in {caller} must be of one array library.")
        g = _Group(aff, np.array([key[0]]), np.array([key[1]]))
        g.n_pi, g.n_pj = np.array([n1]), np.array([n2])
        groups.append(g)
    return groups, m, xp, dtype, dev


def _sizes_from_groups(groups: list[_Group], m: int, ns: Any, caller: str) -> np.ndarray:
    found = np.full(m, -1, dtype=np.int64)
    for g in groups:
        for idx, nn in ((g.pi, g.n_pi), (g.pj, g.n_pj)):
            for k, i in enumerate(idx):
                pair = (int(g.pi[k]), int(g.pj[k]))
                if found[i] >= 0 and found[i] != nn[k]:
                    raise ValueError(
                        f"Graph {int(i)} has {found[i]} nodes in one pair of `K` in {caller} but "
                        f"{int(nn[k])} in pair {pair}; every affinity must fit its graphs' sizes."
                    )
                found[i] = nn[k]
    if ns is not None:
        given = _check_sizes(ns, m, int(found.max()) if found.max() > 0 else 1, caller)
        bad = np.nonzero(given != found)[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"`ns` in {caller} says graph {i} has {int(given[i])} nodes, but its affinities "
                f"are for {int(found[i])} nodes."
            )
    return found


def _parse_pairs(
    X: Any, ns: Any, caller: str, *, soft_ok: bool, name: str = "result_or_pairs"
) -> tuple[Array, np.ndarray, Any]:
    """Any form of pairwise matchings -> blocks (m, m, r, r) (zero padding), sizes, namespace."""
    if isinstance(X, MultiMatchResult):
        xp = backend.namespace_of(X.U)
        Xb = X.to_dense()
        ns_np = X.ns
    elif isinstance(X, Mapping):
        Xb, ns_np, xp = _blocks_from_mapping(X, caller, name)
    else:
        if not hasattr(X, "shape") or backend.is_sparse(X):
            raise TypeError(
                f"`{name}` in {caller} must be a MultiMatchResult, an array of shape "
                f"(m, m, n, n) or a mapping {{(i, j): X_ij}}; got {type(X).__name__}."
            )
        xp = backend.namespace_of(X, name=name)
        Xb = _float(xp.asarray(X), name, caller, xp=xp)
        if Xb.ndim != 4 or Xb.shape[0] != Xb.shape[1] or Xb.shape[2] != Xb.shape[3]:
            raise ValueError(
                f"`{name}` in {caller} must have shape (m, m, n, n); got {tuple(Xb.shape)}."
            )
        m, n = Xb.shape[0], Xb.shape[2]
        ns_np = _check_sizes(ns, m, n, caller)
        rows = _row_mask(ns_np, n)
        keep = rows[:, None, :, None] & rows[None, :, None, :]
        keep = keep & ~np.eye(m, dtype=bool)[:, :, None, None]
        Xb = xp.where(
            backend.asarray_on(keep, xp=xp, device=backend.device(Xb)), Xb, xp.zeros_like(Xb)
        )
        Xb = 0.5 * (Xb + xp.permute_dims(Xb, (1, 0, 3, 2)))
    if not bool(xp.all(xp.isfinite(Xb))):
        raise ValueError(f"`{name}` in {caller} contains NaN or Inf.")
    if not soft_ok and not bool(xp.all((Xb == 0) | (Xb == 1))):
        raise ValueError(
            f"`{name}` in {caller} must hold 0/1 matchings (for an array input, X[i, j] and "
            "X[j, i].T must agree); round soft matchings with hungarian first."
        )
    return Xb, ns_np, xp


def _blocks_from_mapping(
    X: Mapping[Any, Any], caller: str, name: str
) -> tuple[Array, np.ndarray, Any]:
    keys = list(X.keys())
    for key in keys:
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in key)
            or key[0] == key[1]
            or min(key) < 0
        ):
            raise ValueError(
                f"The keys of `{name}` in {caller} must be pairs (i, j) of distinct graph "
                f"indices >= 0; got {key!r}."
            )
    m = max(max(k) for k in keys) + 1 if keys else 0
    if m < 2:
        raise ValueError(f"`{name}` in {caller} must hold the matchings of at least one pair.")
    xp = backend.namespace_of(*[X[k] for k in keys], name=name)
    ns_np = np.full(m, -1, dtype=np.int64)
    mats: dict[tuple[int, int], Array] = {}
    for key in keys:
        M = _float(xp.asarray(X[key]), f"{name}[{key}]", caller, xp=xp)
        if M.ndim != 2:
            raise ValueError(
                f"The matching of pair {key} in `{name}` of {caller} must be 2-D (n_i, n_j); "
                f"got shape {tuple(M.shape)}."
            )
        i, j = key
        if i > j:
            M, i, j = xp.permute_dims(M, (1, 0)), j, i
        for g, s in ((i, M.shape[0]), (j, M.shape[1])):
            if ns_np[g] >= 0 and ns_np[g] != s:
                raise ValueError(
                    f"Graph {g} has {ns_np[g]} nodes in one matching of `{name}` in {caller} but "
                    f"{s} in pair {key}; the matchings' shapes must agree."
                )
            ns_np[g] = s
        if (i, j) in mats:
            mats[(i, j)] = 0.5 * (mats[(i, j)] + M)
        else:
            mats[(i, j)] = M
    missing = [(i, j) for i in range(m) for j in range(i + 1, m) if (i, j) not in mats]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"`{name}` in {caller} must hold a matching for every pair of the {m} graphs; "
            f"missing {', '.join(map(str, missing[:5]))}{more}."
        )
    r = int(ns_np.max())
    pi, pj = _pair_indices(m)
    stack = xp.stack(
        [_pad2(mats[(int(i), int(j))][None, ...], r, xp=xp)[0, ...] for i, j in zip(pi, pj)]
    )
    return _scatter_pairs(stack, pi, pj, m, xp=xp), ns_np, xp


def _consensus_sweeps(
    obj: _KBObjective, U: Array, ns: np.ndarray, sweeps: int, *, xp: Any
) -> tuple[Array, float, int]:
    """Block-coordinate ascent: re-match each graph to the sum of the others, aligned.

    For graph ``i`` the objective is a Koopmans--Beckmann problem between ``A_i`` and the
    aligned sum ``R_i`` of the other graphs (:meth:`_KBObjective.local_problems`), whose noise
    averages out. A sweep runs 2-opt on each graph in turn against the current others,
    from the best of the current ``U_i`` and, in the first sweep and whenever 2-opt alone is
    stuck (at most twice), proposals for all graphs from RRWM and a short GA (one batch each);
    a change is kept when ``F`` grows.
    """
    from .local import two_opt

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
    from .ga import ga

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
    from .ga import ga
    from .rrwm import rrwm

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
