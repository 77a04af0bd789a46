"""Multi-graph graduated assignment in a shared universe: the public entry points.

:func:`gamgm` takes Koopmans--Beckmann inputs, :func:`gamgm_affinity` general pairwise
affinities; both check their options (:data:`OPTIONS`) and inputs, then run the shared loop.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ... import backend
from ..._validation import Option, check_options, validate_options
from ...backend import Array
from ._affinities import _parse_affinities
from ._annealing import _run
from ._inputs import _check_kb, _check_schedule, _check_universe, _row_mask
from ._objective import _KBObjective, _PairObjective
from ._pairwise import _pairwise_groups, _pairwise_kb
from ._result import MultiMatchResult

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
    "pair_tabu": Option("int", low=0),
    "quad_weight": Option("float", low=0, low_inclusive=True),
}

#: ``init_pairs="auto"`` solves all pairs when ``m (m - 1) / 2 * n^2`` is at most this.
AUTO_PAIRS_BUDGET = 100_000


@validate_options(_OPTIONS_KB)
def gamgm(
    A: Array,
    W: Array | None = None,
    ns: Any = None,
    n_univ: int | None = None,
    *,
    quad_weight: float = 1.0,
    init: Any = "rrwm",
    init_pairs: str = "auto",
    pair_tabu: int = 200,
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
    node similarities. The default start solves graph pairs with RRWM, polishes them by local
    search (`pair_tabu`) and synchronises them (:func:`synchronize`); the annealing runs from
    that and from the star around the largest graph, and the better rounded answer goes on to
    the Hungarian phase, which first re-places each graph through each of its pairwise
    matchings (``X_ij U_j``) where that raises ``F`` (it puts back a graph that the start
    misplaced as a whole). Without node similarities, a start whose score attains the upper
    bound ``quad_weight sum_{i<j} ||A_i||_F ||A_j||_F`` (isomorphic graphs) is optimal and is
    returned at once (``info["picked"]`` says so).

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
    pair_tabu : int >= 0
        Polish of the pairwise start: every pair's answer goes through 2-opt, and the pairs
        that 2-opt improved (the answer was not even a local optimum, a sign of a wrong match)
        get robust tabu search (:func:`~qapfuse.solvers.tabu`) for ``pair_tabu * n``
        iterations. 0: the pairwise answers as they are.
    rng : None, int, numpy.random.Generator or torch.Generator
        Randomness of the ``"uniform"`` start and of the tabu searches. Same seed and
        backend, same answer; ``None`` seeds the tabu searches with 0 (reproducible).

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
    .. [2] R. Wang, J. Yan, X. Yang, "Graduated assignment for joint multi-graph matching and
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
            pair_tabu=pair_tabu,
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
        Xb = _pairwise_kb(
            A,
            Wbar,
            ns_np,
            opts["quad_weight"],
            method,
            pairs=pairs,
            tabu_per_node=opts["pair_tabu"],
            rng=opts["rng"],
            xp=xp,
        )
        return Xb, pairs == "star"

    return _run(obj, ns_np, n, d, opts, pairwise, caller, start, xp=xp, dtype=dtype, device=dev)


@validate_options(OPTIONS)
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
    .. [1] R. Wang, J. Yan, X. Yang, "Graduated assignment for joint multi-graph matching and
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
