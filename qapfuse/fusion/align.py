r"""Align 2..N networks of one architecture: one permutation per free group per model.

:func:`align` states the network QAP (:mod:`qapfuse.fusion._network_qap`: blocks of universe
matchings, an operator built layer by layer from :class:`NetworkGraph` s) and hands it to the
block solvers of :mod:`qapfuse.solvers._blocks`; it carries no solver loop of its own.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import backend
from .._validation import Option, check_choice, check_options
from ..solvers._blocks import ANNEAL_OPTIONS, coordinate_lap, frank_wolfe, solve_blocks
from ._network_qap import NetData, NetworkQAP, net_data
from .graph import to_graph
from .spec import PermutationSpec, check_same_shapes

__all__ = ["KERNELS", "METHODS", "Alignment", "align"]

METHODS = ("gamf", "weight", "merge_many", "c2m3", "activation", "none")
KERNELS = ("inner", "gaussian", "node")

_KERNEL_OPTIONS = {
    "sigma": Option("float", low=0, low_inclusive=False, allow_none=True),
    "expansion_tol": Option("float", low=0, low_inclusive=False),
    "max_terms": Option("int", low=1, allow_none=True),
    "max_expansion_bytes": Option("float", low=0, low_inclusive=False),
    "max_kernel_evals": Option("float", low=0, low_inclusive=False),
    "precision": Option("choice", choices=("float64", "float32")),
}
_METHOD_OPTIONS: dict[str, dict[str, Option]] = {
    "gamf": {**ANNEAL_OPTIONS, "start": Option("choice", choices=("uniform", "identity"))},
    "weight": {
        "restarts": Option("int", low=1),
        "max_sweeps": Option("int", low=1),
        "time_limit": ANNEAL_OPTIONS["time_limit"],
    },
    "merge_many": {"max_rounds": Option("int", low=1), "max_sweeps": Option("int", low=1)},
    "c2m3": {
        "max_iter": Option("int", low=1),
        "tol": ANNEAL_OPTIONS["tol"],
        "max_sweeps": Option("int", low=0),
        "time_limit": ANNEAL_OPTIONS["time_limit"],
    },
    "none": {},
}

#: solve_blocks' defaults, read once so the schedule logic here cannot drift from them.
_ANNEAL_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(solve_blocks).parameters.items()
    if p.default is not inspect.Parameter.empty
}

#: Parameters above which `progress=None` shows a progress bar and the kernel products run
#: in float32 unless `precision` is given, and up to which they run on one torch thread.
_LONG = 1_000_000


@dataclass(frozen=True, kw_only=True, repr=False)
class Alignment:
    """The result of :func:`align`.

    Attributes
    ----------
    spec : PermutationSpec
        The models' spec (with sizes).
    perms : list of dict of str to numpy.ndarray
        One dict per model: free group -> int64 permutation of shape ``(n_g,)``.
        ``permute(models[k], spec, perms[k])`` puts model ``k`` into the common order
        (model 0's own order for every method except ``merge_many``).
    method, kernel : str
    objective : float
        The kernel's network-QAP objective at `perms` (sum over model pairs, weighted by
        ``w_p w_q``; edge sets between fixed groups, constants, left out).
    n_iter : int
        The method's iterations (annealing steps, sweeps, Frank--Wolfe steps or rounds).
    time : float
        Wall-clock seconds.
    info : dict
        ``precision`` of the kernel products, and method-specific extras (e.g. ``history``,
        ``rounded_score``, ``sigma``).
    """

    spec: PermutationSpec
    perms: list[dict[str, np.ndarray]]
    method: str
    kernel: str
    objective: float
    n_iter: int
    time: float
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Alignment(method={self.method!r}, kernel={self.kernel!r}, models={len(self.perms)},"
            f" objective={self.objective:.6g}, n_iter={self.n_iter}, time={self.time:.3g}s)"
        )


def align(
    models: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
    *,
    method: str = "gamf",
    kernel: str = "inner",
    example_input: Any = None,
    spec: PermutationSpec | None = None,
    weights: Sequence[float] | None = None,
    rng: Any = None,
    data: Any = None,
    progress: bool | None = None,
    **options: Any,
) -> Alignment:
    r"""Align N >= 2 networks of one architecture into one common channel order.

    Methods:

    * ``"gamf"``: graduated assignment on the second-order network QAP under `kernel`, all
      models' universe matchings optimised together (cycle-consistent), then Hungarian
      rounding and coordinate sweeps (:func:`~qapfuse.solvers._blocks.solve_blocks`);
    * ``"weight"``: Git Re-Basin weight matching, each model to model 0 (coordinate ascent over
      per-group LAPs on the inner-product objective);
    * ``"merge_many"``: Git Re-Basin MergeMany: each model in turn matched by weight matching
      to the (weighted) mean of the others, until no permutation changes;
    * ``"c2m3"``: Frank--Wolfe over all models' universe matchings with a Hungarian oracle on
      the inner-product objective (C2M3);
    * ``"activation"``: correlation of hidden activations on `data` (from
      :mod:`qapfuse.fusion._activation`);
    * ``"none"``: the identity (plain averaging).

    First-order methods (and activation matching) optimise their own criterion whatever
    `kernel` is; `kernel` then only sets the objective reported, so methods compare on one
    objective.

    Options: every method takes the kernel options, which configure the kernel that scores
    the reported objective (and, for ``"gamf"``, the one it optimises); the other options
    are the method's own, and an option the method does not know raises ``TypeError``.

    Parameters
    ----------
    models : sequence of torch.nn.Module or state dicts
        N >= 2 models of one architecture and width (never modified).
    method : {"gamf", "weight", "merge_many", "c2m3", "activation", "none"}
    kernel : {"inner", "gaussian", "node"}
        Edge affinity: ``"inner"`` (weight products: Git Re-Basin's objective),
        ``"gaussian"`` (``exp(-||e - e'||^2 / sigma)``, median-heuristic ``sigma`` per layer),
        ``"node"`` (GAMF's released neuron similarity).
    example_input : Tensor, optional
        Input for :func:`~qapfuse.fusion.trace` when `spec` is not given.
    spec : PermutationSpec, optional
    weights : sequence of float, optional
        Model weights (>= 0, not all 0), rescaled to mean 1: pair ``(p, q)`` counts
        ``w_p w_q`` in the objective, and MergeMany's means are weighted. Default: uniform
        (every pair counts once).
    rng : None, int or numpy.random.Generator
        Start noise and block orders; same seed, same answer.
    data : optional
        Batches for ``method="activation"``.
    progress : bool, optional
        A tqdm bar on stderr; default: on for models over a million parameters.
    **options
        Method options (``gamf``: ``tau0``, ``tau_min``, ``decay``, ``step``, ``max_inner``,
        ``sk_iter``, ``tol``, ``max_sweeps``, ``time_limit``, and ``start``: ``"uniform"``
        (default: anneal from the uniform matching at ``tau0``) or ``"identity"`` (start at
        the models' own order, at ``tau0 = tau_min`` unless `tau0` is given: for models that
        share a recent common start, such as federated clients after one round, where
        annealing from the uniform matching only finds the identity again, 10-20 times
        slower; it stays near the identity and does not recover shuffled copies);
        ``weight``: ``restarts``, ``max_sweeps``, ``time_limit``; ``merge_many``:
        ``max_rounds``, ``max_sweeps``;
        ``c2m3``: ``max_iter``, ``tol``, ``max_sweeps``, ``time_limit``; ``activation``:
        ``batch_size``, ``max_samples``) and kernel options, accepted by every method
        (``sigma``, ``expansion_tol`` (default 1e-6), ``max_terms`` (None: as many as
        ``expansion_tol`` needs), ``max_expansion_bytes`` (2 GiB of expansion features per
        scalar layer), ``max_kernel_evals`` (5e8), ``precision``: ``"float64"`` or
        ``"float32"``, the arithmetic of the kernel products; default ``"float64"`` up to a
        million parameters per model and ``"float32"`` (the weights' own precision) above,
        where it is about twice as fast: two VGG-11 in 54 s instead of 101 s; always
        ``"float64"`` for ``kernel="gaussian"``, whose ``expansion_tol`` needs it).

    Returns
    -------
    Alignment

    Raises
    ------
    ValueError
        Unknown method or kernel, models of different architectures (naming the first
        differing key and shapes), NaN/Inf weights, bad `weights`, no `spec` and no
        `example_input`.
    TypeError
        Unknown options (listing the valid ones), models of the wrong type.

    References
    ----------
    .. [1] Z. Liu et al., "Deep neural network fusion via graph matching with applications to
           model ensemble and federated learning", ICML 2022.
    .. [2] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: merging models modulo
           permutation symmetries", ICLR 2023.
    .. [3] D. Crisostomi et al., "C2M3: cycle-consistent multi-model merging", NeurIPS 2024.

    Examples
    --------
    >>> import torch
    >>> from qapfuse.fusion import align, permute, random_permutations, trace
    >>> from qapfuse.fusion.models import MLP
    >>> a = MLP(6, (5,), 2)
    >>> spec = trace(a, torch.zeros(1, 6))
    >>> b = permute(a, spec, random_permutations(spec, rng=0))  # a shuffled copy
    >>> res = align([a, b], spec=spec, rng=0)
    >>> back = permute(b, spec, res.perms[1])
    >>> all(torch.equal(back[k], v) for k, v in a.state_dict().items())
    True
    """
    start = time.perf_counter()
    caller = "align"
    check_choice(method, "method", caller, METHODS)
    check_choice(kernel, "kernel", caller, KERNELS)
    sds = _state_dicts(models, caller)
    N = len(sds)
    w = _weights(weights, N, caller)
    spec = _spec(models, sds, spec, example_input, caller)
    # kernel options configure the kernel that scores the objective, whatever the method;
    # the rest are the method's own
    kern_opts = check_options(
        {k: v for k, v in options.items() if k in _KERNEL_OPTIONS}, _KERNEL_OPTIONS, caller
    )
    opts = {k: v for k, v in options.items() if k not in _KERNEL_OPTIONS}
    if method == "activation":
        from ._activation import activation_perms

        perms = activation_perms(models, spec, data, rng=rng, **opts)
    else:
        valid = {**_METHOD_OPTIONS[method], **_KERNEL_OPTIONS}
        opts = check_options(opts, valid, caller)
    n_params = sum(int(t.numel()) for t in sds[0].values())
    # float32 on large networks, except for the Gaussian expansion: its stated error bound
    # (expansion_tol, 1e-6) is below float32's rounding of a sum of hundreds of terms
    large = n_params > _LONG and kernel != "gaussian"
    precision = kern_opts.pop("precision", "float32" if large else "float64")
    nets = net_data([to_graph(sd, spec) for sd in sds], getattr(torch, precision))
    show = n_params > _LONG if progress is None else bool(progress)
    gen = backend.rng_from(rng, caller=caller)

    def operator(data_: NetData, kern: str, pw: Sequence[float] | None) -> NetworkQAP:
        return NetworkQAP(data_, kern, pair_weights=pw, **kern_opts)

    with _torch_threads(1 if n_params <= _LONG else None):
        info: dict[str, Any] = {"precision": precision}
        n_iter = 0
        op = operator(nets, kernel, w)
        if method == "none":
            perms = op.perms_from_blocks([np.eye(*s) for s in op.sizes])
        elif method == "gamf":
            if opts.pop("start", "uniform") == "identity":
                opts.setdefault("tau0", opts.get("tau_min", _ANNEAL_DEFAULTS["tau_min"]))
                opts["x0"] = [np.eye(*s) for s in op.sizes]
            with _Bar(show, "align gamf", _stages(opts)) as bar:
                # an int seed goes through as such: with two models and the inner kernel,
                # the identity candidate is then `weight` with the same seed
                seed = rng if isinstance(rng, (int, np.integer)) else gen
                res = solve_blocks(op, rng=seed, progress=bar.stage, **opts)
            perms = op.perms_from_blocks(res.X)
            n_iter = res.n_iter
            info.update(converged=res.converged, **res.info)
        elif method == "c2m3":
            inner = op if kernel == "inner" else operator(nets, "inner", w)
            res = frank_wolfe(inner, rng=gen, **opts)
            perms = inner.perms_from_blocks(res.X)
            n_iter = res.n_iter
            info.update(gap=res.info["gap"], converged=res.converged)
        elif method == "weight":
            perms = [{}] * N
            with _Bar(show, "align weight", N - 1) as bar:
                for k in range(1, N):
                    pair = operator(nets.select([0, k]), "inner", [w[0], w[k]])
                    res = coordinate_lap(pair, rng=gen, **opts)
                    perms[k] = pair.perms_from_blocks(res.X)[1]
                    n_iter += res.n_iter
                    bar.update()
            perms[0] = op.perms_from_blocks([np.eye(*s) for s in op.sizes])[0]
        elif method == "merge_many":
            perms, n_iter, rounds = _merge_many(nets, w, gen, opts, show, operator)
            info["rounds"] = rounds
        blocks = _universe_blocks(op, perms)
        objective = op.score(blocks)
        info.update(op.info)
    return Alignment(
        spec=spec,
        perms=perms,
        method=method,
        kernel=kernel,
        objective=float(objective),
        n_iter=int(n_iter),
        time=time.perf_counter() - start,
        info=info,
    )


def _merge_many(nets, w, gen, opts, show, operator):
    """Git Re-Basin's MergeMany: match each model to the mean of the others until stable."""
    N = nets.n_models
    ident = {g: np.arange(nets.groups[g], dtype=np.int64) for g in nets.free_groups}
    perms = [dict(ident) for _ in range(N)]
    max_rounds = opts.get("max_rounds", 100)
    sweeps = {"max_sweeps": opts["max_sweeps"]} if "max_sweeps" in opts else {}
    n_iter, rounds = 0, 0
    with _Bar(show, "align merge_many", max_rounds) as bar:
        for rounds in range(1, max_rounds + 1):
            changed = False
            for k in gen.permutation(N):
                aligned = nets
                for m in range(N):
                    aligned = aligned.permuted(m, perms[m]) if m != k else aligned
                others = [m for m in range(N) if m != k]
                mean = aligned.mean(others, [w[m] for m in others])
                pair_data = NetData(
                    nets.groups,
                    nets.fixed,
                    [
                        (o, i, key, [a[0], F[k]])
                        for (o, i, key, a), (_, _, _, F) in zip(mean.edges, nets.edges)
                    ],
                    {g: [mean.nodes[g][0], nets.nodes[g][k]] for g in nets.nodes},
                )
                pair = operator(pair_data, "inner", None)
                x0 = pair.blocks_from_perms([ident, perms[k]])
                res = coordinate_lap(pair, x0=x0, rng=gen, **sweeps)
                new = pair.perms_from_blocks(res.X)[1]
                n_iter += res.n_iter
                if any(not np.array_equal(new[g], perms[k][g]) for g in new):
                    perms[k], changed = new, True
            bar.update()
            if not changed:
                break
    return perms, n_iter, rounds


def _universe_blocks(op: NetworkQAP, perms: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Blocks of `op` (model 0 as the universe) for permutations into any common order."""
    inv0 = {g: np.argsort(p) for g, p in perms[0].items()}
    rel = [{g: p[inv0[g]] for g, p in pk.items()} for pk in perms]  # model 0's order
    return op.blocks_from_perms(rel)


def _stages(opts: dict[str, Any]) -> int:
    from ..solvers._anneal import Schedule

    d = {**_ANNEAL_DEFAULTS, **opts}
    s = Schedule(d["tau0"], d["tau_min"], d["decay"], 1, 1)
    return s.stages


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch threads (``None``: leave the setting), then restore it.

    A small network's products take microseconds; splitting them over threads costs more
    than it saves, and on a busy machine each split waits for a time slice (measured on the
    2-core machine at load 6: a 5 x 21 product 2 ms with 2 threads, 10 us with 1).
    """
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _Bar:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, show: bool, desc: str, total: int):
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def stage(self, entry: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(score=f"{entry.get('score', float('nan')):.4g}")
            self.bar.update(1)


# -- input checks ---------------------------------------------------------------------------------


def _state_dicts(models: Any, caller: str) -> list[Mapping[str, torch.Tensor]]:
    if isinstance(models, (torch.nn.Module, Mapping)) or not isinstance(models, Sequence):
        raise TypeError(
            f"The 'models' parameter of {caller} must be a sequence of at least 2 models or "
            f"state dicts. Got {type(models).__name__} instead."
        )
    if len(models) < 2:
        raise ValueError(
            f"The 'models' parameter of {caller} must hold at least 2 models. "
            f"Got {len(models)} instead."
        )
    sds = []
    for k, m in enumerate(models):
        if isinstance(m, torch.nn.Module):
            sds.append(m.state_dict())
        elif isinstance(m, Mapping):
            sds.append(m)
        else:
            raise TypeError(
                f"models[{k}] passed to {caller} must be a torch.nn.Module or a state dict. "
                f"Got {type(m).__name__} instead."
            )
    check_same_shapes(*sds)
    for k, sd in enumerate(sds):
        for key, t in sd.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"models[{k}][{key!r}] passed to {caller} contains NaN or Inf; clean the "
                    "model first."
                )
    return sds


def _weights(weights: Any, N: int, caller: str) -> np.ndarray:
    if weights is None:
        return np.ones(N)
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"The 'weights' parameter of {caller} must be a sequence of {N} floats. "
            f"Got {type(weights).__name__} instead."
        ) from None
    if w.shape != (N,):
        raise ValueError(
            f"The 'weights' parameter of {caller} must have one entry per model ({N}). "
            f"Got shape {w.shape} instead."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"The 'weights' parameter of {caller} must be finite, >= 0 and not all 0. "
            f"Got {w.tolist()} instead."
        )
    return w / w.mean()  # uniform weights: all 1, the unweighted objective


def _spec(models, sds, spec, example_input, caller) -> PermutationSpec:
    if spec is None:
        if example_input is None:
            raise ValueError(
                f"{caller} needs a 'spec' or an 'example_input' to trace the models with."
            )
        if not isinstance(models[0], torch.nn.Module):
            raise TypeError(
                f"{caller} traces models[0] with 'example_input', so it must be a "
                "torch.nn.Module; pass 'spec' with state dicts."
            )
        from .tracing import trace

        spec = trace(models[0], example_input)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"The 'spec' parameter of {caller} must be a PermutationSpec. "
            f"Got {type(spec).__name__} instead."
        )
    return spec.resolve(sds[0])
