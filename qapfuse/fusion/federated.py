"""Federated learning with graph-matching aggregation: one aggregation step and a simulation loop.

:func:`aggregate` is the server step shared by the in-process loop (:func:`run_federated`) and
the Flower strategy (:mod:`qapfuse.fusion.flower`): it rejects malformed client updates, aligns
the rest with a :func:`~qapfuse.fusion.align` method and takes their sample-weighted average.
:func:`run_federated` is a small, deterministic simulation: a global model, ``K`` clients with
their own splits, ``R`` rounds of ``E`` local epochs, and one run per aggregator from the same
start, so the aggregators compare on the same client data. :func:`write_report` writes the
per-round metrics as CSV and a PNG of accuracy per round.

Aggregators: ``"fedavg"`` (coordinate-wise average), ``"gamf"`` (all client models aligned
together into one universe, then averaged), ``"weight"`` (each client matched to the current
global model by weight matching, then averaged), ``"merge_many"`` and ``"c2m3"``.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_scalar
from .align import align
from .data import ImageData, split_indices
from .fuse import REPAIRS, average_state_dicts, fusion_weights
from .models import MLP, SmallCNN
from .permute import permute
from .repair import repair_statistics, reset_bn
from .spec import PermutationSpec
from .tracing import trace
from .training import evaluate, seeded, train

__all__ = [
    "AGGREGATORS",
    "MODELS",
    "SPLITS",
    "Aggregate",
    "FederatedResult",
    "aggregate",
    "build_model",
    "check_update",
    "client_splits",
    "run_federated",
    "write_report",
]

log = logging.getLogger(__name__)

AGGREGATORS = ("fedavg", "gamf", "weight", "merge_many", "c2m3")
MODELS = ("mlp", "cnn", "vgg11-bn")
SPLITS = ("iid", "dirichlet", "label-skew")
MLP_HIDDEN = (128, 64)
METRICS = (
    "aggregator",
    "round",
    "accuracy",
    "loss",
    "clients",
    "rejected",
    "non_identity",
    "aggregation_time",
    "round_time",
)


# -- one aggregation step ------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    """The result of :func:`aggregate`.

    Attributes
    ----------
    state_dict : OrderedDict of str to Tensor
        The new global state dict (the previous one, copied, if every update was rejected).
    accepted : tuple of int
        Indices of the updates that were averaged.
    rejected : tuple of (int, str)
        Index and reason of every rejected update.
    non_identity : float
        Fraction of hidden units (over accepted clients and free groups) whose matched
        permutation is not the identity relative to the reference (the global model for
        ``"weight"``, the first accepted client otherwise); NaN for ``"fedavg"``.
    time : float
        Wall-clock seconds of the alignment and averaging.
    perms : tuple of dict
        Per accepted update, the permutation (group -> index array) that put it into the
        averaged order; empty dicts for ``"fedavg"`` (identity). What REPAIR needs.
    weights : tuple of float
        The averaging weight of each accepted update (summing to 1).
    """

    state_dict: OrderedDict[str, torch.Tensor]
    accepted: tuple[int, ...]
    rejected: tuple[tuple[int, str], ...]
    non_identity: float
    time: float
    perms: tuple[Mapping[str, np.ndarray], ...] = ()
    weights: tuple[float, ...] = ()

    @property
    def kept_previous(self) -> bool:
        """True when every update was rejected and the previous global model was kept."""
        return not self.accepted


def check_update(
    reference: Mapping[str, torch.Tensor], update: Any, num_examples: Any = 1
) -> str | None:
    """Why a client update cannot be aggregated, or None when it can.

    Parameters
    ----------
    reference : mapping of str to Tensor
        The global model's state dict.
    update : mapping of str to Tensor
        The client's state dict.
    num_examples : number
        The client's training-set size (its averaging weight): must be finite and > 0.

    Returns
    -------
    str or None
        A one-line reason (different keys, a different shape, NaN/inf values, no examples).

    Examples
    --------
    >>> ref = {"w": torch.zeros(2, 3)}
    >>> check_update(ref, {"w": torch.zeros(3, 2)})
    "'w' has shape (3, 2), expected (2, 3)"
    >>> check_update(ref, {"w": torch.full((2, 3), float("nan"))})
    "'w' holds NaN or inf"
    """
    if not isinstance(update, Mapping):
        return f"the update is a {type(update).__name__}, not a state dict"
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        parts = [f"missing keys {missing[:3]}"] if missing else []
        parts += [f"unexpected keys {extra[:3]}"] if extra else []
        return "different keys: " + ", ".join(parts)
    for key, ref in reference.items():
        t = update[key]
        if not isinstance(t, torch.Tensor):
            return f"{key!r} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(ref.shape):
            return f"{key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return f"{key!r} holds NaN or inf"
    try:
        n = float(num_examples)
    except (TypeError, ValueError):
        return f"num-examples is {num_examples!r}, not a number"
    if not math.isfinite(n) or n <= 0:
        return f"num-examples is {num_examples!r}; it must be finite and > 0"
    return None


def _non_identity(
    perms: Sequence[Mapping[str, np.ndarray]], ref: Mapping[str, np.ndarray]
) -> float:
    moved = total = 0
    for p in perms:
        for group, ref_perm in ref.items():
            moved += int(np.count_nonzero(np.asarray(p[group]) != np.asarray(ref_perm)))
            total += len(ref_perm)
    return moved / total if total else 0.0


def aggregate(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[Any],
    num_examples: Sequence[Any],
    *,
    method: str = "gamf",
    spec: PermutationSpec | None = None,
    from_global: bool = True,
    rng: Any = None,
    **options: Any,
) -> Aggregate:
    """One server step: reject malformed updates, align the others, take the weighted average.

    Parameters
    ----------
    global_state : mapping of str to Tensor
        The current global model's state dict (reference for keys and shapes; the anchor of
        ``method="weight"``; returned, copied, when every update is rejected).
    updates : sequence of mappings of str to Tensor
        The clients' state dicts.
    num_examples : sequence of numbers
        Each client's training-set size: the averaging weights.
    method : {"fedavg", "gamf", "weight", "merge_many", "c2m3"}
        ``"fedavg"`` averages coordinate-wise; ``"weight"`` matches each client to the global
        model (Git Re-Basin weight matching); the others align all accepted clients together
        with :func:`~qapfuse.fusion.align` and average in the first client's order.
    spec : PermutationSpec
        The architecture's spec (from :func:`~qapfuse.fusion.trace`); needed by every method
        except ``"fedavg"``.
    from_global : bool
        Whether the clients trained from `global_state` (multi-round FL, the default). False in
        a one-shot round, where they start from their own initialisations: the global model is
        then unrelated to them, so ``"weight"`` matches every client to the first accepted one
        instead. With True, ``"gamf"`` starts at the identity at its lowest temperature
        (``start="identity"`` of :func:`~qapfuse.fusion.align`; pass ``start="uniform"`` in
        `options` for the full annealing); with False it anneals from the uniform matching.
    rng : None, int or numpy.random.Generator
        Randomness of the alignment.
    **options
        Options of the alignment method (see :func:`~qapfuse.fusion.align`).

    Returns
    -------
    Aggregate

    Raises
    ------
    ValueError
        Unknown `method`, `updates` and `num_examples` of different lengths, or no `spec` for a
        matching method.

    Notes
    -----
    A rejected update is logged (warning) with its reason; if all are rejected the previous
    global model is kept and a warning says so. The inputs are never modified.

    Examples
    --------
    >>> g = {"w": torch.zeros(2)}
    >>> out = aggregate(g, [{"w": torch.ones(2)}, {"w": torch.full((2,), 4.0)}], [3, 1],
    ...                 method="fedavg")
    >>> out.state_dict["w"].tolist()
    [1.75, 1.75]
    >>> aggregate(g, [{"v": torch.ones(2)}], [1], method="fedavg").kept_previous
    True
    """
    check_choice(method, "method", "aggregate", AGGREGATORS)
    if len(updates) != len(num_examples):
        raise ValueError(
            f"`updates` ({len(updates)}) and `num_examples` ({len(num_examples)}) must have "
            "the same length."
        )
    if method != "fedavg" and not isinstance(spec, PermutationSpec):
        raise ValueError(
            f"aggregate(method={method!r}) needs `spec`, the PermutationSpec of the model "
            "(from qapfuse.fusion.trace)."
        )
    start = time.perf_counter()
    accepted: list[int] = []
    rejected: list[tuple[int, str]] = []
    for k, (update, n) in enumerate(zip(updates, num_examples)):
        reason = check_update(global_state, update, n)
        if reason is None:
            accepted.append(k)
        else:
            rejected.append((k, reason))
            log.warning("client update %d rejected: %s", k, reason)
    if not accepted:
        log.warning(
            "all %d client updates were rejected; keeping the previous global model",
            len(updates),
        )
        state = OrderedDict((k, v.detach().clone()) for k, v in global_state.items())
        return Aggregate(state, (), tuple(rejected), math.nan, time.perf_counter() - start)
    states = [updates[k] for k in accepted]
    w = fusion_weights(len(states), [float(num_examples[k]) for k in accepted])
    non_identity = math.nan
    perms: list[Mapping[str, np.ndarray]] = [{} for _ in states]
    if method != "fedavg":
        if method == "weight" and from_global:
            al = align([global_state, *states], method="weight", spec=spec, rng=rng, **options)
            ref, perms = al.perms[0], al.perms[1:]
        elif len(states) == 1:
            ref, perms = None, []
        else:
            if method == "gamf" and from_global:
                # clients that started from one global model are nearly aligned already
                options = {"start": "identity", **options}
            al = align(states, method=method, spec=spec, weights=w, rng=rng, **options)
            ref, perms = al.perms[0], al.perms
        if ref is not None:
            states = [permute(sd, spec, p) for sd, p in zip(states, perms)]
            anchored = method == "weight" and from_global
            non_identity = _non_identity(perms if anchored else perms[1:], ref)
        else:
            perms = [{}]
            non_identity = 0.0
    state = average_state_dicts(states, w)
    return Aggregate(
        state,
        tuple(accepted),
        tuple(rejected),
        non_identity,
        time.perf_counter() - start,
        tuple(perms),
        tuple(float(v) for v in w),
    )


# -- the simulation loop -------------------------------------------------------------------------


def build_model(
    name: str, data: ImageData, *, hidden: Sequence[int] = MLP_HIDDEN
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model factory for a dataset and the inputs in the shape it takes.

    Parameters
    ----------
    name : {"mlp", "cnn", "vgg11-bn"}
        ``"mlp"``: :class:`~qapfuse.fusion.models.MLP` on flattened images; ``"cnn"``:
        :class:`~qapfuse.fusion.models.SmallCNN`; ``"vgg11-bn"``: VGG-11 with BatchNorm at a
        quarter width (``ZOO["vgg11-bn"]`` of :mod:`qapfuse.fusion.ensemble`).
    data : ImageData
    hidden : sequence of int
        Hidden widths of the MLP (default ``(128, 64)``).

    Returns
    -------
    (callable, Tensor, Tensor)
        A zero-argument factory of a fresh model, and the training and test inputs.
    """
    check_choice(name, "model", "build_model", MODELS)
    c, h = data.x_train.shape[1], data.x_train.shape[2]
    if name == "mlp":
        n_in = int(np.prod(data.x_train.shape[1:]))

        def factory() -> nn.Module:
            return MLP(n_in, tuple(hidden), data.num_classes)

        return factory, data.x_train.flatten(1), data.x_test.flatten(1)

    if name == "vgg11-bn":
        from .ensemble import ZOO

        def vgg() -> nn.Module:
            return ZOO["vgg11-bn"](tuple(data.x_train.shape[1:]), data.num_classes)

        return vgg, data.x_train, data.x_test

    def cnn() -> nn.Module:
        return SmallCNN(c, data.num_classes, input_size=h)

    return cnn, data.x_train, data.x_test


def client_splits(
    labels: Any, clients: int, split: str, alpha: float | None, seed: int
) -> list[np.ndarray]:
    """The training indices of each client (the same for every engine and aggregator).

    Parameters
    ----------
    labels : array of shape (N,)
    clients : int >= 1
        Number of clients; at most N.
    split : {"iid", "dirichlet", "label-skew"}
    alpha : float > 0, optional
        Dirichlet concentration (``split="dirichlet"`` only).
    seed : int

    Raises
    ------
    ValueError
        More clients than samples, ``alpha <= 0``, an unknown split.
    """
    caller = "client_splits"
    check_scalar(clients, "clients", caller, integer=True, low=1, low_inclusive=True)
    check_choice(split, "split", caller, SPLITS)
    n = len(labels)
    if clients > n:
        raise ValueError(f"`clients`={clients} exceeds the {n} training samples.")
    if split == "dirichlet":
        if alpha is None or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"`alpha` must be a float > 0 for split='dirichlet'. Got {alpha!r}.")
    else:
        alpha = None
    return split_indices(np.asarray(labels), clients, split, alpha=alpha, rng=seed)


@dataclass
class FederatedResult:
    """The result of :func:`run_federated` (or of a Flower run).

    Attributes
    ----------
    records : list of dict
        One row per aggregator and round with the keys of ``METRICS`` (round 0: the initial
        global model; one-shot runs add an ``"ensemble"`` row, the clients' prediction ensemble).
    states : dict of str to OrderedDict
        The final global state dict of each aggregator.
    client_sizes : list of int
        Training samples per client.
    config : dict
        The run's settings.
    client_states : dict of int to OrderedDict
        One-shot runs: the round-1 model of each client that trained (what every aggregator
        fused); pass it back as ``client_states=`` to fuse the same models again.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, OrderedDict[str, torch.Tensor]] = field(default_factory=dict)
    client_sizes: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    client_states: dict[int, OrderedDict[str, torch.Tensor]] = field(default_factory=dict)

    def final(self, aggregator: str) -> dict[str, Any]:
        """The last round's row of `aggregator`."""
        rows = [r for r in self.records if r["aggregator"] == aggregator]
        if not rows:
            raise KeyError(f"no records of aggregator {aggregator!r}")
        return rows[-1]


def _parse_aggregators(aggregators: Any, caller: str) -> tuple[str, ...]:
    names = (aggregators,) if isinstance(aggregators, str) else tuple(aggregators)
    if not names:
        raise ValueError(f"`aggregators` of {caller} is empty; choose from {AGGREGATORS}.")
    for name in names:
        check_choice(name, "aggregators", caller, AGGREGATORS)
    return names


def train_seed(seed: int, server_round: int, client: int) -> int:
    """The local-training seed of `client` in `server_round` (shared by every engine)."""
    return (seed * 1_000_003 + server_round * 10_007 + client) % (2**31)


def sample_clients(
    seed: int, server_round: int, eligible: Sequence[int], fraction: float
) -> list[int]:
    """The clients that train in `server_round`: a seeded sample of ``ceil(fraction * K)``."""
    m = max(1, math.ceil(fraction * len(eligible)))
    gen = np.random.default_rng([seed, server_round])
    return sorted(int(k) for k in gen.choice(np.asarray(eligible), size=m, replace=False))


def run_federated(
    data: ImageData,
    *,
    clients: int = 5,
    rounds: int = 10,
    local_epochs: int = 1,
    split: str = "dirichlet",
    alpha: float | None = 0.5,
    fraction: float = 1.0,
    aggregators: Sequence[str] | str = ("fedavg", "gamf", "weight"),
    one_shot: bool = False,
    model: str = "mlp",
    hidden: Sequence[int] = MLP_HIDDEN,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool | None = None,
    align_options: Mapping[str, Any] | None = None,
    finetune_epochs: int | None = None,
    client_states: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    repair: str | None = None,
    repair_samples: int = 256,
) -> FederatedResult:
    """Simulate federated learning in process, once per aggregator from the same start.

    Parameters
    ----------
    data : ImageData
        From :func:`~qapfuse.fusion.data.load_dataset`; the test set measures the global model.
    clients : int >= 1
        Number of clients ``K`` (at most the number of training samples).
    rounds : int >= 1
        Communication rounds ``R``.
    local_epochs : int >= 1
        Epochs of local Adam training per round.
    split : {"iid", "dirichlet", "label-skew"}
    alpha : float > 0
        Dirichlet concentration (small: very uneven clients).
    fraction : float in (0, 1]
        Fraction of clients sampled per round (at least one).
    aggregators : sequence of str
        Names from ``AGGREGATORS``; each gets its own run from the same initial model.
    one_shot : bool
        Round 1: every client trains from its own initialisation (seed ``seed + 1 + k``)
        instead of the global model, and the server fuses them with the aggregator: the
        setting where matching pays off. Rounds 2..R are then FedAvg rounds started from the
        fused model (fine-tuning); ``rounds=1`` is pure one-shot fusion.
    model : {"mlp", "cnn", "vgg11-bn"}
    hidden : sequence of int
        Hidden widths of the MLP.
    lr, batch_size
        Local Adam training.
    seed : int >= 0
        Seeds the initial model, the splits, the client sampling, local training and alignment:
        the same seed gives the same result.
    progress : bool, optional
        A tqdm bar per aggregator (one step per round) on stderr; default: when stderr is a
        terminal.
    align_options : mapping, optional
        Options of the alignment method (e.g. ``{"time_limit": 5}``), see
        :func:`~qapfuse.fusion.align`.
    finetune_epochs : int >= 1, optional
        One-shot runs: local epochs of the FedAvg rounds 2..R (default `local_epochs`, which
        then sets the one-shot round's training only).
    client_states : mapping of int to state dict, optional
        One-shot runs: the clients' round-1 models, by client index (e.g.
        ``FederatedResult.client_states`` of an earlier run with the same data, clients,
        split and seed, or checkpoints); clients left out train from their own inits. Their
        training time is not in the round time.
    repair : {None, "reset_bn", "repair"}
        One-shot runs: after the server fuses the round-1 models it repairs the fused model's
        activation statistics on `repair_samples` training images it holds
        (:func:`~qapfuse.fusion.repair.reset_bn`, which needs BatchNorm, or
        :func:`~qapfuse.fusion.repair.repair_statistics` with the aggregation's permutations
        and weights); the repair's time counts as aggregation time.
    repair_samples : int >= 1
        Server images for `repair`: a seeded sample of the training set.

    Returns
    -------
    FederatedResult

    Examples
    --------
    >>> from qapfuse.fusion.data import load_digits
    >>> res = run_federated(load_digits(), clients=2, rounds=1, aggregators="fedavg",
    ...                     hidden=(16,), progress=False)
    >>> [r["round"] for r in res.records], res.final("fedavg")["clients"]
    ([0, 1], 2)

    Raises
    ------
    ValueError
        More clients than samples, ``alpha <= 0``, an unknown aggregator, split, model or
        repair, a bad count, `repair` or `client_states` without `one_shot`, or a client state
        that does not fit the model.
    """
    caller = "run_federated"
    if not isinstance(data, ImageData):
        raise TypeError(
            f"The 'data' parameter of {caller} must be an ImageData (qapfuse.fusion.data."
            f"load_dataset). Got {type(data).__name__} instead."
        )
    names = _parse_aggregators(aggregators, caller)
    for value, name in ((rounds, "rounds"), (local_epochs, "local_epochs")):
        check_scalar(value, name, caller, integer=True, low=1, low_inclusive=True)
    check_scalar(seed, "seed", caller, integer=True, low=0, low_inclusive=True)
    check_scalar(fraction, "fraction", caller, low=0, high=1)
    if finetune_epochs is None:
        finetune_epochs = local_epochs
    check_scalar(finetune_epochs, "finetune_epochs", caller, integer=True, low=1,
                 low_inclusive=True)  # fmt: skip
    if repair is not None:
        check_choice(repair, "repair", caller, REPAIRS)
        check_scalar(repair_samples, "repair_samples", caller, integer=True, low=1,
                     low_inclusive=True)  # fmt: skip
    if not one_shot and (repair is not None or client_states):
        raise ValueError(
            "`repair` and `client_states` apply to the one-shot round; pass one_shot=True."
        )
    factory, x_train, x_test = build_model(model, data, hidden=hidden)
    parts = client_splits(data.y_train, clients, split, alpha, seed)
    sizes = [len(p) for p in parts]
    eligible = [k for k, n in enumerate(sizes) if n > 0]
    if len(eligible) < clients:
        log.info(
            "%d of %d clients received no data and never train", clients - len(eligible), clients
        )
    init = seeded(factory, seed)
    spec = trace(init, x_train[:2])
    test = (x_test, data.y_test)
    if repair == "reset_bn" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in init.modules()
    ):
        raise ValueError(
            f"repair='reset_bn' needs BatchNorm layers; model={model!r} has none "
            "(use repair='repair')."
        )
    server_x = None
    if repair is not None:
        pick = np.random.default_rng([seed, 31]).permutation(len(x_train))[:repair_samples]
        server_x = x_train[torch.from_numpy(np.sort(pick))]
    result = FederatedResult(
        client_sizes=sizes,
        config=dict(
            dataset=data.name,
            clients=clients,
            rounds=rounds,
            local_epochs=local_epochs,
            split=split,
            alpha=alpha,
            fraction=fraction,
            one_shot=bool(one_shot),
            model=model,
            hidden=list(hidden) if model == "mlp" else None,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            engine="local",
            finetune_epochs=finetune_epochs if one_shot else None,
            repair=repair,
            repair_samples=repair_samples if repair is not None else None,
        ),
    )
    # Round 1 starts every aggregator from the same model: its updates are trained once and
    # replayed, their training time counted in each aggregator's round time.
    cache: dict[int, tuple[OrderedDict[str, torch.Tensor], float]] = {}
    for k, given in dict(client_states or {}).items():
        if not isinstance(k, int) or not 0 <= k < clients:
            raise ValueError(
                f"`client_states` keys must be client indices in [0, {clients}); got {k!r}."
            )
        reason = check_update(init.state_dict(), given)
        if reason is not None:
            raise ValueError(f"`client_states`[{k}] does not fit the model: {reason}.")
        cache[k] = (OrderedDict((n, t.detach().clone()) for n, t in given.items()), 0.0)

    def local_update(k: int, r: int, global_state: Mapping[str, torch.Tensor]) -> tuple[Any, float]:
        if r == 1 and k in cache:
            return cache[k][0], cache[k][1]
        t0 = time.perf_counter()
        own_init = one_shot and r == 1
        net = seeded(factory, seed + 1 + k) if own_init else factory()
        if not own_init:
            net.load_state_dict(global_state)
        idx = torch.from_numpy(parts[k])
        train(
            net,
            (x_train[idx], data.y_train[idx]),
            epochs=finetune_epochs if one_shot and r > 1 else local_epochs,
            lr=lr,
            batch_size=batch_size,
            seed=train_seed(seed, r, k),
            progress=False,
        )
        state = OrderedDict((n, t.detach().clone()) for n, t in net.state_dict().items())
        if r == 1:
            cache[k] = (state, time.perf_counter() - t0)
        return state, 0.0

    evaluator = factory()
    show = sys.stderr.isatty() if progress is None else bool(progress)
    for name in names:
        state = OrderedDict((n, t.detach().clone()) for n, t in init.state_dict().items())
        evaluator.load_state_dict(state)
        acc, loss = evaluate(evaluator, test)
        result.records.append(_row(name, 0, acc, loss, 0, 0, math.nan, 0.0, 0.0))
        bar = _bar(show, rounds, f"fl {name}")
        try:
            for r in range(1, rounds + 1):
                t0 = time.perf_counter()
                chosen = sample_clients(seed, r, eligible, fraction)
                trained = [local_update(k, r, state) for k in chosen]
                updates = [u for u, _ in trained]
                replayed = sum(seconds for _, seconds in trained)
                fusing = one_shot and r == 1
                out = aggregate(
                    state,
                    updates,
                    [sizes[k] for k in chosen],
                    method=name if r == 1 or not one_shot else "fedavg",
                    spec=spec,
                    from_global=not fusing,
                    rng=train_seed(seed, r, 0),
                    **dict(align_options or {}),
                )
                state = out.state_dict
                agg_time = out.time
                if fusing and repair is not None and out.accepted:
                    t_repair = time.perf_counter()
                    fused_updates = [updates[k] for k in out.accepted]
                    state = _repaired(factory, state, fused_updates, out, spec, repair, server_x)
                    agg_time += time.perf_counter() - t_repair
                evaluator.load_state_dict(state)
                acc, loss = evaluate(evaluator, test)
                row = _row(
                    name,
                    r,
                    acc,
                    loss,
                    len(chosen),
                    len(out.rejected),
                    out.non_identity,
                    agg_time,
                    time.perf_counter() - t0 + replayed,
                )
                result.records.append(row)
                log.info(
                    "%s round %d/%d: accuracy %.4f, loss %.4f, aggregation %.3fs, "
                    "non-identity %.4f, rejected %d",
                    name,
                    r,
                    rounds,
                    acc,
                    loss,
                    agg_time,
                    out.non_identity,
                    len(out.rejected),
                )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(acc=f"{acc:.3f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        result.states[name] = state
    if one_shot:
        from .training import predict_ensemble

        nets = []
        for k in (k for k in eligible if k in cache):
            net = factory()
            net.load_state_dict(cache[k][0])
            nets.append(net)
        acc = predict_ensemble(nets, test)
        result.records.append(_row("ensemble", 1, acc, math.nan, len(nets), 0, math.nan, 0.0, 0.0))
        result.client_states = {k: cache[k][0] for k in sorted(cache)}
    return result


def _repaired(
    factory: Any,
    state: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    out: Aggregate,
    spec: PermutationSpec,
    repair: str,
    server_x: torch.Tensor,
) -> OrderedDict[str, torch.Tensor]:
    """The fused `state` after `repair` on the server's images (the updates: `out`'s accepted)."""
    fused = factory()
    fused.load_state_dict(state)
    fused.eval()
    if repair == "reset_bn":
        reset_bn(fused, server_x)
    else:
        models = []
        for sd in updates:
            net = factory()
            net.load_state_dict(sd)
            models.append(net)
        repair_statistics(fused, models, spec, list(out.perms), list(out.weights), server_x)
    return OrderedDict((n, t.detach().clone()) for n, t in fused.state_dict().items())


def _row(agg, r, acc, loss, n, rejected, non_identity, agg_time, round_time) -> dict[str, Any]:
    values = (agg, r, acc, loss, n, rejected, non_identity, agg_time, round_time)
    return dict(zip(METRICS, values))


def _bar(show: bool, total: int, desc: str) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


# -- report --------------------------------------------------------------------------------------


def write_report(result: FederatedResult, out: str | Path) -> list[Path]:
    """Write ``rounds.csv`` (one row per aggregator and round) and ``accuracy.png``.

    Parameters
    ----------
    result : FederatedResult
    out : str or Path
        An existing folder.

    Returns
    -------
    list of Path
        The files written (the PNG only when matplotlib is installed; else a warning).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "rounds.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRICS)
        writer.writeheader()
        for row in result.records:
            writer.writerow({k: _fmt(row.get(k)) for k in METRICS})
    paths = [csv_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        log.warning("matplotlib is not installed: no accuracy.png (pip install 'qapfuse[bench]')")
        return paths
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    # Distinct markers and dashes: aggregators that agree (multi-round FL often does) overlap.
    styles = [("o", "-", 8), ("s", "--", 6), ("^", ":", 5), ("D", "-.", 4), ("v", "--", 3)]
    names = list(dict.fromkeys(r["aggregator"] for r in result.records))
    for k, name in enumerate(names):
        rows = [r for r in result.records if r["aggregator"] == name]
        if name == "ensemble":
            ax.axhline(rows[0]["accuracy"], ls="--", color="gray", label="client ensemble")
            continue
        marker, ls, size = styles[k % len(styles)]
        ax.plot(
            [r["round"] for r in rows],
            [r["accuracy"] for r in rows],
            marker=marker,
            ls=ls,
            markersize=size,
            label=name,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    cfg = result.config
    ax.set(
        xlabel="round",
        ylabel="global test accuracy",
        title=f"{cfg.get('dataset')}: {cfg.get('clients')} clients, {cfg.get('split')} "
        f"(alpha {cfg.get('alpha')}), engine {cfg.get('engine')}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out / "accuracy.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    paths.append(png)
    return paths


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value
