"""Repair a fused network's activation statistics: ``reset_bn`` and REPAIR.

Averaging aligned weights shrinks the variance of hidden activations ("variance collapse"),
which is what makes plain merging of deep networks fail. Two remedies, both needing a few
batches of inputs:

* :func:`reset_bn`: re-estimate every BatchNorm's running mean and variance on `data`;
* :func:`repair_statistics` (REPAIR, Jordan et al. 2022): make each hidden channel's output
  mean and standard deviation in the fused model equal to the weighted average of the
  corresponding (aligned) channels' statistics in the endpoint models. The correction is an
  affine map per channel folded into the module that produces the channel (a norm layer's
  weight and bias when the group has one, else the Linear/Conv weight and bias), so no layer is
  inserted and the result has the input's architecture and state-dict keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_scalar
from .data import as_tensors
from .spec import PermutationSpec

__all__ = ["repair_points", "repair_statistics", "reset_bn"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _inputs(data: Any, caller: str, max_samples: int | None) -> torch.Tensor:
    x, _ = as_tensors(data, "data", caller, labels=False)
    if max_samples is not None:
        check_scalar(max_samples, "max_samples", caller, integer=True, low=1, low_inclusive=True)
        x = x[:max_samples]
    return x


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def reset_bn(
    model: nn.Module, data: Any, *, batch_size: int = 128, max_samples: int | None = None
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm layer of `model` on `data`, in place.

    The statistics are reset and then accumulated as an exact average over all batches
    (``momentum=None``), with only the BatchNorm layers in training mode (dropout stays off).
    Momentum and training flags are restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Must contain at least one BatchNorm layer.
    data : Tensor, TensorDataset or a pair (x, y)
        Inputs (labels are ignored).
    batch_size : int >= 1
    max_samples : int >= 1, optional
        Use only the first `max_samples` inputs.

    Returns
    -------
    torch.nn.Module
        `model`.

    Raises
    ------
    ValueError
        If `model` has no BatchNorm layer.
    """
    x = _inputs(data, "reset_bn", max_samples)
    check_scalar(batch_size, "batch_size", "reset_bn", integer=True, low=1, low_inclusive=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(
            f"repair='reset_bn' needs BatchNorm layers; {type(model).__name__} has none "
            "(use repair='repair')."
        )
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    device = _device(model)
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size].to(device))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
    return model


def _channel_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.LayerNorm):
        return -len(module.normalized_shape)
    return 1


def repair_points(model: nn.Module, spec: PermutationSpec) -> list[tuple[str, str]]:
    """The modules whose outputs REPAIR corrects, as ``(module name, group)`` in module order.

    For each free group: its norm layers with affine parameters if it has any, else the
    Linear/Conv layers producing it (weight axis 0 in the group).
    """
    free = set(spec.free_groups)
    norms: dict[str, list[str]] = {}
    producers: dict[str, list[str]] = {}
    order = []
    for name, m in model.named_modules():
        entries = spec.axes.get(f"{name}.weight")
        if not entries or not entries[0] or len(entries[0]) != 1 or entries[0][0].block != 1:
            continue
        g = entries[0][0].group
        if g not in free:
            continue
        if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            norms.setdefault(g, []).append(name)
            order.append(name)
        elif isinstance(m, _PRODUCERS):
            producers.setdefault(g, []).append(name)
            order.append(name)
    chosen = {}
    for g in spec.free_groups:
        for name in norms.get(g) or producers.get(g, []):
            chosen[name] = g
    return [(name, chosen[name]) for name in order if name in chosen]


@torch.no_grad()
def _output_moments(
    model: nn.Module, names: Sequence[str], x: torch.Tensor, batch_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation of the outputs of modules `names` on `x`."""
    modules = dict(model.named_modules())
    sums: dict[str, list[Any]] = {}
    handles = []

    def make(name: str, dim: int):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            t = out.detach().double().movedim(dim, 0)
            t = t.reshape(t.shape[0], -1)  # (channels, samples x positions)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += t.shape[1]
            s[1] = s[1] + t.sum(1).cpu()
            s[2] = s[2] + (t * t).sum(1).cpu()

        return hook

    for name in names:
        m = modules[name]
        handles.append(m.register_forward_hook(make(name, _channel_dim(m))))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = _device(model)
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    out = {}
    for name, (n, s1, s2) in sums.items():
        mean = s1 / n
        out[name] = (mean, (s2 / n - mean * mean).clamp_min(0).sqrt())
    return out


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` (one per channel) shaped to broadcast along axis 0 of `like`."""
    return values.to(like).view((-1,) + (1,) * (like.ndim - 1))


@torch.no_grad()
def repair_statistics(
    fused: nn.Module,
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    perms: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    data: Any,
    *,
    batch_size: int = 128,
    max_samples: int | None = None,
    eps: float = 1e-8,
) -> nn.Module:
    """REPAIR: give every hidden channel of `fused` the interpolated statistics of the endpoints.

    For each repair point (see :func:`repair_points`), in module order, the per-channel output
    mean ``mu_k`` and standard deviation ``sigma_k`` of every endpoint model ``k`` (taken at the
    channel it contributes after alignment) set the target ``mu = sum_k w_k mu_k``,
    ``sigma = sum_k w_k sigma_k``; the fused model's own statistics ``mu_f, sigma_f`` (measured
    after the earlier points were corrected) are then mapped onto it by folding
    ``o -> (sigma / sigma_f) (o - mu_f) + mu`` into that module's weight and bias. A module
    without bias gets the scale only.

    Parameters
    ----------
    fused : torch.nn.Module
        The fused model, modified in place.
    models : sequence of torch.nn.Module
        The endpoint models, in their own channel order (not modified).
    spec : PermutationSpec
        Spec of the architecture (with sizes).
    perms : sequence of mapping
        ``perms[k][g]``: the permutation that put model ``k`` into the common order (groups
        left out: identity).
    weights : sequence of float
        The averaging weights (non-negative, summing to 1).
    data : Tensor, TensorDataset or a pair (x, y)
        Inputs; REPAIR needs on the order of a thousand.
    batch_size : int >= 1
    max_samples : int >= 1, optional
        Use only the first `max_samples` inputs.
    eps : float
        Guards the division by ``sigma_f`` (a dead channel stays dead).

    Returns
    -------
    torch.nn.Module
        `fused`.

    References
    ----------
    .. [1] K. Jordan, H. Sedghi, O. Saukh, R. Entezari, B. Neyshabur, "REPAIR: REnormalizing
           Permuted Activations for Interpolation Repair", ICLR 2023 (arXiv:2211.08403, 2022).
    """
    x = _inputs(data, "repair", max_samples)
    check_scalar(batch_size, "batch_size", "repair", integer=True, low=1, low_inclusive=True)
    points = repair_points(fused, spec)
    names = [n for n, _ in points]
    target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, (model, w) in enumerate(zip(models, weights)):
        moments = _output_moments(model, names, x, batch_size)
        for name, g in points:
            p = perms[k].get(g) if perms[k] is not None else None
            idx = torch.as_tensor(np.asarray(p)) if p is not None else slice(None)
            mean, std = moments[name]
            mu, sd = target.get(name, (0.0, 0.0))
            target[name] = (mu + w * mean[idx], sd + w * std[idx])
    modules = dict(fused.named_modules())
    for name, _ in points:
        mean_f, std_f = _output_moments(fused, [name], x, batch_size)[name]
        mu, sd = target[name]
        scale = sd / (std_f + eps)
        shift = mu - scale * mean_f
        m = modules[name]
        m.weight.mul_(_per_channel(scale, m.weight))
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(_per_channel(scale, m.bias)).add_(_per_channel(shift, m.bias))
    return fused
