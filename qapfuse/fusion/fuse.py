"""Fuse 2..N networks of one architecture into one: align, permute, average, repair.

:func:`fuse` is the one-call entry point; :func:`fuse_aligned` averages models under an
alignment computed once (so a benchmark can sweep interpolation weights without re-aligning).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice
from .data import as_tensors
from .permute import permute
from .repair import repair_statistics, reset_bn
from .spec import PermutationSpec, SpecError, check_same_shapes

__all__ = ["REPAIRS", "average_state_dicts", "fuse", "fuse_aligned", "fusion_weights"]

REPAIRS = ("reset_bn", "repair")


def _check_models(models: Any, caller: str) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or len(models) == 0:
        raise TypeError(
            f"The 'models' parameter of {caller} must be a non-empty sequence of "
            f"torch.nn.Module. Got {type(models).__name__} instead."
        )
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"models[{k}] of {caller} must be a torch.nn.Module. Got {type(m).__name__}."
            )
        if type(m) is not type(models[0]):
            raise ValueError(
                f"The models passed to {caller} must share one architecture: models[0] is a "
                f"{type(models[0]).__name__}, models[{k}] a {type(m).__name__}."
            )
    state_dicts = [m.state_dict() for m in models]
    try:
        check_same_shapes(*state_dicts)
    except SpecError as e:  # say it in the caller's terms: models, not state dicts
        raise SpecError(f"{caller}: {str(e).replace('state_dicts[', 'models[')}") from None
    for k, sd in enumerate(state_dicts):
        for key, t in sd.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"models[{k}] passed to {caller} has NaN or Inf in {key!r}; fusing it "
                    "would spread them to every channel."
                )
    return list(models)


def fusion_weights(
    n_models: int, weights: Sequence[float] | None = None, alpha: float | None = None
) -> np.ndarray:
    """Normalised averaging weights: uniform, given (e.g. sample counts), or ``(1 - alpha, alpha)``.

    Parameters
    ----------
    n_models : int
    weights : sequence of float, optional
        Non-negative, not all zero, one per model; normalised to sum to 1.
    alpha : float in [0, 1], optional
        Two-model interpolation: model 0 gets ``1 - alpha``, model 1 gets ``alpha``.

    Returns
    -------
    ndarray of shape (n_models,)

    Examples
    --------
    >>> fusion_weights(3, [100, 300, 100]).tolist()
    [0.2, 0.6, 0.2]
    >>> fusion_weights(2, alpha=0.25).tolist()
    [0.75, 0.25]
    """
    if weights is not None and alpha is not None:
        raise ValueError("Give `weights` or `alpha`, not both.")
    if alpha is not None:
        if n_models != 2:
            raise ValueError(
                f"`alpha` interpolates between two models; got {n_models} models (use `weights`)."
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"`alpha` must be a float in [0, 1]. Got {type(alpha).__name__}.")
        if not 0.0 <= alpha <= 1.0:  # NaN fails too
            raise ValueError(f"`alpha` must be a float in [0, 1]. Got {alpha!r} instead.")
        return np.array([1.0 - alpha, float(alpha)])
    if weights is None:
        return np.full(n_models, 1.0 / n_models)
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"`weights` must be a sequence of numbers. Got {weights!r}.") from None
    if w.shape != (n_models,):
        raise ValueError(
            f"`weights` must hold one number per model ({n_models}); got shape {w.shape}."
        )
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"`weights` must be finite and non-negative. Got {w.tolist()}.")
    if w.sum() <= 0:
        raise ValueError("`weights` are all zero; at least one model must have weight > 0.")
    return w / w.sum()


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: np.ndarray
) -> OrderedDict[str, torch.Tensor]:
    """Weighted average of state dicts with the same keys and shapes (already aligned).

    Floating tensors are averaged in float64 and cast back. Integer tensors are counters such
    as BatchNorm's ``num_batches_tracked``: the largest value is kept.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, ref in state_dicts[0].items():
        tensors = [sd[key] for sd in state_dicts]
        if ref.is_floating_point() or ref.is_complex():
            acc = sum(float(w) * t.to(torch.float64) for w, t in zip(weights, tensors))
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = torch.stack([t.to(ref.device) for t in tensors]).amax(0)
    return out


def _check_alignment(alignment: Any, n_models: int) -> tuple[PermutationSpec, list[Any]]:
    spec = getattr(alignment, "spec", None)
    perms = getattr(alignment, "perms", None)
    if not isinstance(spec, PermutationSpec) or not isinstance(perms, Sequence):
        raise TypeError(
            "The 'alignment' parameter of fuse_aligned must have a PermutationSpec `spec` and a "
            f"list `perms` (an Alignment from align()). Got {type(alignment).__name__}."
        )
    if len(perms) != n_models:
        raise ValueError(
            f"The alignment has permutations for {len(perms)} models, but {n_models} models "
            "were given."
        )
    return spec, list(perms)


def _check_repair(repair: Any, data: Any, caller: str) -> None:
    if repair is None:
        return
    check_choice(repair, "repair", caller, REPAIRS)
    if data is None:
        raise ValueError(
            f"repair={repair!r} re-estimates activation statistics and needs `data` (a few "
            "batches of inputs); none was given."
        )
    as_tensors(data, "data", caller, labels=False)


def fuse_aligned(
    models: Sequence[nn.Module],
    alignment: Any,
    *,
    weights: Sequence[float] | None = None,
    alpha: float | None = None,
    repair: str | None = None,
    data: Any = None,
    repair_samples: int | None = 1024,
    batch_size: int = 128,
) -> nn.Module:
    """Average `models` in the common channel order given by `alignment` (and repair).

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Networks of one class and shape (not modified).
    alignment : Alignment
        From :func:`qapfuse.fusion.align`, or any object with ``spec`` (PermutationSpec) and
        ``perms`` (one mapping group -> permutation per model).
    weights, alpha
        See :func:`fusion_weights`.
    repair : {None, "reset_bn", "repair"}
        ``"reset_bn"``: :func:`~qapfuse.fusion.repair.reset_bn`; ``"repair"``:
        :func:`~qapfuse.fusion.repair.repair_statistics`. Both need `data`.
    data : Tensor, TensorDataset or a pair (x, y), optional
        Inputs for `repair`.
    repair_samples : int or None
        Inputs of `data` used by the repair (None: all).
    batch_size : int
        Batch size of the repair passes.

    Returns
    -------
    torch.nn.Module
        A deep copy of ``models[0]`` holding the fused weights, in eval mode.
    """
    models = _check_models(models, "fuse_aligned")
    w = fusion_weights(len(models), weights, alpha)
    _check_repair(repair, data, "fuse_aligned")
    spec, perms = _check_alignment(alignment, len(models))
    aligned = [permute(m, spec, p if p is not None else {}) for m, p in zip(models, perms)]
    fused = copy.deepcopy(models[0])
    fused.load_state_dict(average_state_dicts(aligned, w))
    fused.eval()
    if repair == "reset_bn":
        reset_bn(fused, data, batch_size=batch_size, max_samples=repair_samples)
    elif repair == "repair":
        repair_statistics(fused, models, spec, [p or {} for p in perms], w.tolist(), data,
                          batch_size=batch_size, max_samples=repair_samples)  # fmt: skip
    return fused


def fuse(
    models: Sequence[nn.Module],
    *,
    method: str = "gamf",
    weights: Sequence[float] | None = None,
    alpha: float | None = None,
    repair: str | None = None,
    data: Any = None,
    example_input: Any = None,
    spec: PermutationSpec | None = None,
    rng: Any = None,
    progress: Any = None,
    repair_samples: int | None = 1024,
    **options: Any,
) -> nn.Module:
    """Fuse networks of one architecture into one: align, permute, average, optionally repair.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more trained networks of one class and shape (not modified).
    method : str
        Alignment method of :func:`qapfuse.fusion.align` (``"gamf"``, ``"weight"``,
        ``"merge_many"``, ``"activation"``, ``"c2m3"``, or ``"none"`` for plain averaging).
    weights : sequence of float, optional
        Averaging weights, e.g. sample counts; normalised. Default: uniform.
    alpha : float in [0, 1], optional
        Two models only: the result is ``(1 - alpha) * A + alpha * B`` in the common order.
    repair : {None, "reset_bn", "repair"}
        Statistics repair after averaging (needs `data`); see :mod:`qapfuse.fusion.repair`.
    data : Tensor, TensorDataset or a pair (x, y), optional
        Inputs for ``method="activation"`` and for `repair`.
    example_input : Tensor, optional
        An input batch for tracing; default: the first input of `data`, if given.
    spec : PermutationSpec, optional
        The architecture's spec (default: traced from ``models[0]``).
    rng : None, int or numpy.random.Generator
        Randomness of the alignment method.
    progress : optional
        Passed on to :func:`~qapfuse.fusion.align`.
    repair_samples : int or None
        Inputs of `data` used by the repair.
    **options
        Options of the alignment method (unknown ones raise ``TypeError``).

    Returns
    -------
    torch.nn.Module
        A new model of the same class as ``models[0]`` (a deep copy holding the fused state
        dict), in eval mode. To keep the alignment (or reuse it for several `alpha`), call
        :func:`~qapfuse.fusion.align` and :func:`fuse_aligned` instead.

    Raises
    ------
    ValueError, TypeError
        Models of different classes or shapes (naming the first differing key), NaN/Inf in a
        model, bad `weights` / `alpha`, unknown `repair`, `repair` without `data`, and the
        errors of :func:`~qapfuse.fusion.align`.
    """
    models = _check_models(models, "fuse")
    fusion_weights(len(models), weights, alpha)  # validate before the expensive part
    _check_repair(repair, data, "fuse")
    if example_input is None and data is not None:
        example_input = as_tensors(data, "data", "fuse", labels=False)[0][:1]
    from .align import align  # the alignment layer sits beside this module; imported late

    alignment = align(
        models, method=method, example_input=example_input, spec=spec, weights=weights,
        rng=rng, data=data, progress=progress, **options,
    )  # fmt: skip
    return fuse_aligned(
        models, alignment, weights=weights, alpha=alpha, repair=repair, data=data,
        repair_samples=repair_samples,
    )  # fmt: skip
