"""Train, evaluate and ensemble small classifiers: the models that fusion takes as input.

:func:`train` is a plain Adam loop (deterministic for a seed on the CPU), :func:`evaluate`
returns accuracy and mean cross-entropy, :func:`predict_ensemble` the accuracy of the
averaged-softmax prediction ensemble (the N-model reference a fused model is compared with),
and :func:`seeded` builds a model under a private random state, so that model ``k`` of a
benchmark is the same on every run without touching the global seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .._validation import check_scalar
from .data import as_tensors

__all__ = ["evaluate", "predict_ensemble", "seeded", "train"]

M = TypeVar("M", bound=nn.Module)


def seeded(factory: Callable[[], M], seed: int) -> M:
    """Call `factory` (e.g. ``lambda: SmallCNN(input_size=8)``) with torch's RNG seeded to `seed`.

    The global random state is saved and restored, so nothing outside changes.

    Examples
    --------
    >>> from qapfuse.fusion.models import MLP
    >>> a, b = seeded(lambda: MLP(4, (3,), 2), 0), seeded(lambda: MLP(4, (3,), 2), 0)
    >>> torch.equal(a.layers[0].weight, b.layers[0].weight)
    True
    """
    check_scalar(seed, "seed", "seeded", integer=True, low=0, low_inclusive=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _check_model(model: Any, caller: str, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The {name!r} parameter of {caller} must be a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    return model


def _show(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise TypeError(f"The 'progress' parameter must be a bool or None. Got {progress!r}.")
    return progress


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def train(
    model: M,
    data: Any,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> M:
    """Train `model` in place with Adam on cross-entropy; return it.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits of shape (N, num_classes); trained on its own device.
    data : TensorDataset of (x, y) or a pair (x, y) of tensors
        Inputs ``x`` (N, ...) and integer labels ``y`` (N,).
    epochs : int >= 1
    lr : float > 0
        Adam's learning rate.
    batch_size : int >= 1
    seed : int >= 0
        Seeds the shuffling and any randomness in the forward pass (dropout) from a private
        random state: the same model, data and seed give the same weights on the CPU.
    progress : bool, optional
        A tqdm bar on stderr; default: only when stderr is a terminal.

    Returns
    -------
    torch.nn.Module
        `model` itself, trained, left in eval mode.

    Examples
    --------
    >>> from qapfuse.fusion.data import load_digits
    >>> from qapfuse.fusion.models import MLP
    >>> digits = load_digits()
    >>> model = seeded(lambda: MLP(64, (32,), 10), 0)
    >>> x, y = digits.x_train.flatten(1), digits.y_train
    >>> acc0 = evaluate(model, (x, y))[0]
    >>> acc1 = evaluate(train(model, (x, y), epochs=3, progress=False), (x, y))[0]
    >>> acc1 > acc0 + 0.3
    True
    """
    _check_model(model, "train")
    x, y = as_tensors(data, "data", "train")
    check_scalar(epochs, "epochs", "train", integer=True, low=1, low_inclusive=True)
    check_scalar(lr, "lr", "train", low=0)
    check_scalar(batch_size, "batch_size", "train", integer=True, low=1, low_inclusive=True)
    check_scalar(seed, "seed", "train", integer=True, low=0, low_inclusive=True)
    show = _show(progress)
    device = _device(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    steps = epochs * -(-n // batch_size)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", file=sys.stderr, leave=False)
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    xb, yb = x[idx].to(device), y[idx].to(device)
                    loss = F.cross_entropy(model(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    return model


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.cat(
            [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x),
             batch_size)]
        )  # fmt: skip
    finally:
        for m, mode in modes:
            m.training = mode


def evaluate(model: nn.Module, data: Any, *, batch_size: int = 1024) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on `data` (eval mode, no gradients).

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits (N, num_classes). Its training flags are restored.
    data : TensorDataset of (x, y) or a pair (x, y) of tensors
    batch_size : int >= 1

    Returns
    -------
    (float, float)
        Accuracy in [0, 1] and the mean cross-entropy loss.
    """
    _check_model(model, "evaluate")
    x, y = as_tensors(data, "data", "evaluate")
    check_scalar(batch_size, "batch_size", "evaluate", integer=True, low=1, low_inclusive=True)
    logits = _logits(model, x, batch_size)
    acc = (logits.argmax(1) == y).double().mean().item()
    return acc, F.cross_entropy(logits, y).item()


def predict_ensemble(models: Sequence[nn.Module], data: Any, *, batch_size: int = 1024) -> float:
    """Accuracy of the prediction ensemble: the argmax of the models' averaged softmax.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Classifiers with the same number of outputs.
    data : TensorDataset of (x, y) or a pair (x, y) of tensors
    batch_size : int >= 1

    Returns
    -------
    float
        Accuracy in [0, 1].
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or len(models) == 0:
        raise TypeError("The 'models' parameter of predict_ensemble must be a non-empty list.")
    for k, m in enumerate(models):
        _check_model(m, "predict_ensemble", f"models[{k}]")
    x, y = as_tensors(data, "data", "predict_ensemble")
    check_scalar(
        batch_size, "batch_size", "predict_ensemble", integer=True, low=1, low_inclusive=True
    )
    probs = sum(torch.softmax(_logits(m, x, batch_size), dim=1) for m in models)
    return (probs.argmax(1) == y).double().mean().item()
