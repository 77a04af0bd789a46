"""Activation matching: align channels by the correlation of their activations on data.

The first-order, data-driven baseline of :func:`qapfuse.fusion.align` (``method="activation"``;
Git Re-Basin's activation matching, Ainsworth et al. 2023). For every free group the
activations that *enter* the layers consuming the group are recorded (post-ReLU, post-norm,
post-residual-add: what the next layer sees), spatial positions and the ``block`` entries of a
flattened channel counting as extra samples. A residual stream consumed at several depths
pools all of them. Model ``k`` is matched to model 0 by one LAP per group on the Pearson
correlation matrix. Only the spec is needed to know where the group's channels sit: a
consuming Linear (its last axis) or Conv (axis 1) names them on its weight's axis 1. A group
no Linear/Conv consumes falls back to the outputs of the modules that produce it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import Option, check_options
from ..solvers import hungarian
from .data import as_tensors
from .spec import PermutationSpec, Segment

__all__ = ["activation_perms", "channel_points"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PRODUCERS = (nn.Linear, *_CONVS, nn.modules.batchnorm._BatchNorm)

_OPTIONS = {
    "batch_size": Option("int", low=1),
    "max_samples": Option("int", low=1, allow_none=True),
}
_DEFAULTS: dict[str, Any] = {"batch_size": 256, "max_samples": 2048}

# A hook point: (module name, "input" or "output", channel dim, segments of that axis).
Point = tuple[str, str, int, tuple[Segment, ...]]


def channel_points(model: nn.Module, spec: PermutationSpec) -> list[Point]:
    """Where each free group's channels can be observed, from the spec alone.

    Returns the inputs of the Linear/Conv layers that consume free groups (weight axis 1), and,
    for free groups no such layer consumes, the outputs of their producing Linear/Conv/BatchNorm
    modules (weight axis 0).
    """
    free = set(spec.free_groups)
    points: list[Point] = []
    seen: set[str] = set()
    modules = dict(model.named_modules())
    for name, m in modules.items():
        entry = _weight_entry(spec, name, 1)
        if isinstance(m, (nn.Linear, *_CONVS)) and entry and any(s.group in free for s in entry):
            if isinstance(m, _CONVS) and m.groups != 1:
                continue
            points.append((name, "input", -1 if isinstance(m, nn.Linear) else 1, entry))
            seen.update(s.group for s in entry)
    for name, m in modules.items():
        entry = _weight_entry(spec, name, 0)
        if isinstance(m, _PRODUCERS) and entry and len(entry) == 1 and entry[0].block == 1:
            g = entry[0].group
            if g in free and g not in seen:
                points.append((name, "output", -1 if isinstance(m, nn.Linear) else 1, entry))
    return points


def _weight_entry(spec: PermutationSpec, name: str, axis: int) -> tuple[Segment, ...] | None:
    key = f"{name}.weight" if name else "weight"
    entries = spec.axes.get(key)
    if entries is None or len(entries) <= axis:
        return None
    return entries[axis]


def _features(t: torch.Tensor, dim: int, segs: tuple[Segment, ...], sizes: dict[str, int]):
    """Split the channel axis of `t` into its groups: group -> (samples, n_g) float64."""
    t = t.detach().movedim(dim, -1)
    t = t.reshape(-1, t.shape[-1]).double()
    out = {}
    start = 0
    for seg in segs:
        n = sizes[seg.group]
        part = t[:, start : start + n * seg.block]
        start += n * seg.block
        # channel c spans entries c*block .. c*block+block-1: those become extra samples
        out[seg.group] = part.reshape(-1, n, seg.block).transpose(1, 2).reshape(-1, n)
    return out


def _record(
    model: nn.Module, points: Sequence[Point], x: torch.Tensor, spec: PermutationSpec
) -> dict[str, list[torch.Tensor]]:
    """Run `model` on `x` and return, per group, the feature matrices seen at every point."""
    sizes = spec.sizes
    free = set(spec.free_groups)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []

    def make(dim: int, segs: tuple[Segment, ...], where: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any = None) -> None:
            t = args[0] if where == "input" else output
            for g, f in _features(t, dim, segs, sizes).items():
                if g in free:
                    seen.setdefault(g, []).append(f)

        return hook

    modules = dict(model.named_modules())
    for name, where, dim, segs in points:
        hook = make(dim, segs, where)
        m = modules[name]
        handles.append(
            m.register_forward_pre_hook(hook) if where == "input" else m.register_forward_hook(hook)
        )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            p = next(iter(model.parameters()), None)
            model(x.to(p.device) if p is not None else x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return seen


class _Moments:
    """Running sums for the Pearson correlation of two feature matrices."""

    def __init__(self, n: int) -> None:
        self.count = 0
        self.sa = torch.zeros(n, dtype=torch.float64)
        self.sb = torch.zeros(n, dtype=torch.float64)
        self.saa = torch.zeros(n, dtype=torch.float64)
        self.sbb = torch.zeros(n, dtype=torch.float64)
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.cpu(), b.cpu()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> np.ndarray:
        n = self.count
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - torch.outer(ma, mb)
        sa = (self.saa / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb * mb).clamp_min(0).sqrt()
        return (cov / (torch.outer(sa, sb) + 1e-12)).numpy()


def activation_perms(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    data: Any,
    *,
    rng: Any = None,
    progress: Callable[[int, int], Any] | None = None,
    **options: Any,
) -> list[dict[str, np.ndarray]]:
    """Activation matching: one permutation per free group per model, into model 0's order.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more networks of one architecture (their state dicts fit `spec`).
    spec : PermutationSpec
        The traced spec of the architecture (with sizes).
    data : Tensor, TensorDataset or a pair (x, y)
        Inputs to run (labels are ignored); the first `max_samples` are used.
    rng : optional
        Accepted for the interface shared by all alignment methods; activation matching is
        deterministic.
    progress : callable, optional
        Called as ``progress(done, total)`` after every batch.
    **options
        ``batch_size`` (int >= 1, default 256): inputs per forward pass; ``max_samples``
        (int >= 1 or None, default 2048): cap on the number of inputs used. Unknown options
        raise ``TypeError``.

    Returns
    -------
    list of dict of str to ndarray of shape (n_g,), int64
        ``perms[k][g]``: new channel ``i`` of model ``k`` is its old channel ``perms[k][g][i]``,
        matched to channel ``i`` of model 0; ``perms[0]`` is the identity. Apply with
        :func:`qapfuse.fusion.permute`.

    Raises
    ------
    ValueError
        If a free group has no observable channels (no Linear/Conv/BatchNorm touches it).

    Notes
    -----
    A channel that never varies over `data` (a dead ReLU) has correlation 0 with every other.

    References
    ----------
    .. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging models modulo
           permutation symmetries", ICLR 2023.

    Examples
    --------
    >>> from qapfuse.fusion import trace, permute, random_permutations
    >>> from qapfuse.fusion.models import MLP
    >>> model = MLP(8, (16,), 3)
    >>> spec = trace(model, torch.zeros(1, 8))
    >>> truth = random_permutations(spec, rng=0)
    >>> copy = MLP(8, (16,), 3)
    >>> _ = copy.load_state_dict(permute(model, spec, truth))
    >>> perms = activation_perms([model, copy], spec, torch.randn(256, 8))
    >>> inverse = np.argsort(truth["layers.0"])
    >>> bool((perms[1]["layers.0"] == inverse).all())
    True
    """
    if (
        isinstance(models, nn.Module)
        or not isinstance(models, Sequence)
        or len(models) < 1
        or not all(isinstance(m, nn.Module) for m in models)
    ):
        raise TypeError(
            "The 'models' parameter of activation_perms must be a list of torch.nn.Module "
            "(activation matching runs the models; state dicts are not enough)."
        )
    if not isinstance(spec, PermutationSpec) or spec.sizes is None:
        raise TypeError(
            "The 'spec' parameter of activation_perms must be a PermutationSpec with sizes."
        )
    if data is None:
        raise ValueError(
            "Activation matching needs `data`: a batch of inputs to run the models on."
        )
    x, _ = as_tensors(data, "data", "activation_perms", labels=False)
    opts = {**_DEFAULTS, **check_options(options, _OPTIONS, "activation_perms")}
    batch_size, max_samples = opts["batch_size"], opts["max_samples"]
    if max_samples is not None:
        x = x[:max_samples]
    points = channel_points(models[0], spec)
    covered = {s.group for *_, segs in points for s in segs}
    lost = [g for g in spec.free_groups if g not in covered]
    if lost:
        raise ValueError(
            f"activation matching cannot observe the channels of group(s) {lost}: no Linear, "
            "Conv or BatchNorm produces or consumes them; use a data-free method."
        )
    moments = [{g: _Moments(spec.sizes[g]) for g in spec.free_groups} for _ in models[1:]]
    batches = range(0, len(x), batch_size)
    for i, start in enumerate(batches):
        xb = x[start : start + batch_size]
        ref = _record(models[0], points, xb, spec)
        for k, model in enumerate(models[1:]):
            other = _record(model, points, xb, spec)
            for g, mom in moments[k].items():
                mom.add(torch.cat(ref[g]), torch.cat(other[g]))
        if progress is not None:
            progress(i + 1, len(batches))
    perms: list[dict[str, np.ndarray]] = [
        {g: np.arange(spec.sizes[g], dtype=np.int64) for g in spec.free_groups}
    ]
    for mom_k in moments:
        perms_k = {}
        for g, mom in mom_k.items():
            corr = np.nan_to_num(mom.correlation(), nan=0.0)
            X = hungarian(corr)
            perms_k[g] = np.argmax(X, axis=1).astype(np.int64)
        perms.append(perms_k)
    return perms
