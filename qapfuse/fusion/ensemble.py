"""Compact ensembles: fuse N trained models into one and measure what that costs.

A prediction ensemble of N models is accurate but costs N forward passes; a fused model costs
one. :func:`compact_ensemble` takes N trained models of one architecture, fuses them with every
alignment method of :func:`~qapfuse.fusion.align.align`, and evaluates each fused model one-shot
and after a few epochs of fine-tuning, next to each model and the prediction ensemble. For the
first two models it also traces the interpolation curve, test accuracy of
``(1 - alpha) * A + alpha * B`` in each method's common order against ``alpha`` (Figure 3 of the
GAMF paper): a flat, high curve means the two models lie in one basin once aligned.

:func:`build_model` and :func:`train_models` make the models from a small zoo (``ZOO``);
:func:`write_report` writes the table and curves as CSV and JSON and draws the curves as a PNG.
``qapfuse ensemble`` and ``qapfuse demo`` are the command-line front ends.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_scalar
from .align import METHODS, align
from .data import ImageData, as_tensors
from .fuse import fuse_aligned
from .models import MLP, VGG, LeNet, SmallCNN
from .training import evaluate, predict_ensemble, seeded, train

__all__ = [
    "DEFAULT_ALPHAS",
    "METHODS",
    "ZOO",
    "EnsembleResult",
    "build_model",
    "compact_ensemble",
    "format_table",
    "model_inputs",
    "train_models",
    "write_report",
]

log = logging.getLogger("qapfuse.ensemble")

#: Interpolation weights of the curve: 0, 0.1, ..., 1.
DEFAULT_ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))
#: Inputs used by activation matching and by repair (the first ones of the training set).
ALIGN_SAMPLES = 512

# VGG-11's conv widths divided by 4 (16 .. 128): small enough to train on a CPU.
_VGG11_QUARTER = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M")


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    d = int(np.prod(input_shape))
    hidden = (64, 64) if d <= 64 else (256, 128)
    return MLP(d, hidden, num_classes)


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, _ = input_shape
    return SmallCNN(c, num_classes, input_size=h)


def _lenet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, _ = input_shape
    if h < 16:
        raise ValueError(
            f"Model 'lenet' needs images of at least 16x16 pixels; these are {h}x{h} "
            "(use 'cnn' or 'mlp')."
        )
    return LeNet(c, num_classes, input_size=h)


def _vgg11_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, _ = input_shape
    cfg: list[int | str] = []
    side = h
    for v in _VGG11_QUARTER:
        if v == "M":
            if side < 2:  # a small image is pooled to one pixel early: skip the rest
                continue
            side //= 2
        cfg.append(v)
    return VGG(cfg, batch_norm=True, in_channels=c, num_classes=num_classes, classifier=(),
               pool_size=None, input_size=h)  # fmt: skip


#: Model name -> ``factory(input_shape, num_classes)``. ``mlp``: hidden (64, 64) on inputs of
#: at most 64 values (8x8 digits), else (256, 128), on flattened images; ``cnn``: the small
#: CNN (convs of 16 and 32 channels); ``lenet``: LeNet-5 (images >= 16x16); ``vgg11-bn``:
#: VGG-11 with BatchNorm at a quarter width (16..128 channels), one Linear head, max-pools
#: skipped once the image is one pixel.
ZOO: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "lenet": _lenet,
    "vgg11-bn": _vgg11_bn,
}


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None
) -> nn.Module:
    """A model of the zoo for images of `input_shape` ``(C, H, W)``.

    Parameters
    ----------
    name : {"mlp", "cnn", "lenet", "vgg11-bn"}
        See ``ZOO``.
    input_shape : (int, int, int)
        ``(C, H, W)`` of one image.
    num_classes : int
    seed : int, optional
        Seeds the initial weights (from a private random state).

    Returns
    -------
    torch.nn.Module
        In eval mode. An ``mlp`` takes flattened images: see :func:`model_inputs`.

    Examples
    --------
    >>> build_model("cnn", (1, 8, 8), 10, seed=0)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    check_choice(name, "name", "build_model", list(ZOO))
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"`input_shape` must be (C, H, W); got {shape}.")
    model = (
        ZOO[name](shape, num_classes)
        if seed is None
        else seeded(lambda: ZOO[name](shape, num_classes), seed)
    )
    return model.eval()


def model_inputs(name: str, x: torch.Tensor) -> torch.Tensor:
    """Images ``(N, C, H, W)`` as zoo model `name` takes them: flattened for ``mlp``."""
    return x.flatten(1) if name == "mlp" else x


def train_models(
    name: str,
    data: ImageData,
    parts: Sequence[Any],
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> list[nn.Module]:
    """Train one zoo model per part of the training set (model ``k`` seeded with ``seed + k``).

    Parameters
    ----------
    name : str
        Zoo model (see ``ZOO``).
    data : ImageData
        Gives the input shape and number of classes.
    parts : sequence of TensorDataset or (x, y) pairs
        One training set per model (:func:`~qapfuse.fusion.data.split_dataset`), images
        ``(N, C, H, W)``.
    epochs, lr, batch_size, progress
        As in :func:`~qapfuse.fusion.training.train`.
    seed : int
        Model ``k``'s initial weights and batch order come from ``seed + k``.

    Returns
    -------
    list of torch.nn.Module
        The trained models, in eval mode.
    """
    models = []
    for k, part in enumerate(parts):
        x, y = as_tensors(part, f"parts[{k}]", "train_models")
        log.info("training model %d/%d (%s, %d images)", k + 1, len(parts), name, len(y))
        model = build_model(name, data.input_shape, data.num_classes, seed=seed + k)
        train(model, (model_inputs(name, x), y), epochs=epochs, lr=lr, batch_size=batch_size,
              seed=seed + k, progress=progress)  # fmt: skip
        models.append(model)
    return models


@dataclasses.dataclass
class EnsembleResult:
    """What :func:`compact_ensemble` measured.

    Attributes
    ----------
    rows : list of dict
        One per model (``kind="model"``), the prediction ensemble (``kind="ensemble"``) and each
        method (``kind="fused"``), with keys ``name``, ``kind``, ``accuracy`` and ``loss`` (test
        set), ``finetuned_accuracy`` and ``finetuned_loss`` (fused models after fine-tuning;
        None without it), ``align_time`` (seconds) and ``objective`` (the alignment's).
    alphas : list of float
        Interpolation weights of the curves.
    curves : dict of str to list of float
        Method -> test accuracy of ``(1 - alpha) * model 0 + alpha * model 1`` at each alpha.
    pair_ensemble : float
        Test accuracy of the prediction ensemble of models 0 and 1 (the curves' reference).
    settings : dict
        How the result was made (models, methods, epochs, seeds, ...), for the report.
    """

    rows: list[dict[str, Any]]
    alphas: list[float]
    curves: dict[str, list[float]]
    pair_ensemble: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        """The row called `name` (``"model 0"``, ``"ensemble"``, a method)."""
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(name)


def _check_methods(methods: Any) -> list[str]:
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise TypeError(
            "The 'methods' parameter of compact_ensemble must be a non-empty list of method "
            f"names. Got {methods!r} instead."
        )
    for m in methods:
        check_choice(m, "methods", "compact_ensemble", METHODS)
    return list(dict.fromkeys(methods))


def _check_alphas(alphas: Any) -> list[float]:
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise TypeError(
            f"`alphas` must be a sequence of numbers in [0, 1]; got {alphas!r}."
        ) from None
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"`alphas` must be numbers in [0, 1] (at least one); got {values}.")
    return values


def _pair(alignment: Any) -> Any:
    """The alignment of models 0 and 1 alone (their permutations into the common order)."""
    return dataclasses.replace(alignment, perms=list(alignment.perms[:2]))


def compact_ensemble(
    models: Sequence[nn.Module],
    test: Any,
    *,
    train_data: Any = None,
    methods: Sequence[str] = METHODS,
    finetune_epochs: int = 0,
    alphas: Sequence[float] | None = DEFAULT_ALPHAS,
    repair: str | None = None,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool | None = None,
    align_options: dict[str, dict[str, Any]] | None = None,
) -> EnsembleResult:
    """Fuse `models` with every method and compare them with each model and their ensemble.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        N >= 2 trained models of one architecture and width (not modified).
    test : TensorDataset or (x, y)
        The evaluation set, inputs as the models take them.
    train_data : TensorDataset or (x, y), optional
        Training inputs and labels: the first ``ALIGN_SAMPLES`` inputs feed activation
        matching and `repair`; fine-tuning uses all of it. Needed by ``"activation"``,
        `repair` and ``finetune_epochs > 0``.
    methods : sequence of str
        Alignment methods of :func:`~qapfuse.fusion.align.align` (default: all).
    finetune_epochs : int >= 0
        Epochs of fine-tuning each fused model on `train_data` (0: one-shot only).
    alphas : sequence of float in [0, 1], optional
        Interpolation weights of the curves between models 0 and 1; None or empty: no curves.
    repair : {None, "reset_bn", "repair"}
        Statistics repair after averaging (see :func:`~qapfuse.fusion.fuse.fuse_aligned`).
    lr, batch_size : float, int
        Fine-tuning's Adam learning rate and batch size.
    seed : int
        Seeds the alignment methods and fine-tuning.
    progress : bool, optional
        tqdm bars on stderr for alignment and fine-tuning (default: when stderr is a terminal).
    align_options : dict of str to dict, optional
        Extra options per method, e.g. ``{"gamf": {"max_inner": 20}}``.

    Returns
    -------
    EnsembleResult

    Raises
    ------
    ValueError, TypeError
        Fewer than two models, unknown methods, negative `finetune_epochs`, alphas outside
        [0, 1], `train_data` missing where needed, and the errors of
        :func:`~qapfuse.fusion.align.align`.
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or len(models) < 2:
        raise ValueError("The 'models' parameter of compact_ensemble must list at least 2 models.")
    methods = _check_methods(methods)
    check_scalar(finetune_epochs, "finetune_epochs", "compact_ensemble", integer=True, low=0,
                 low_inclusive=True)  # fmt: skip
    alphas = [] if alphas is None or len(alphas) == 0 else _check_alphas(alphas)
    needs_train = [
        why
        for why, needed in (
            ("method 'activation'", "activation" in methods),
            (f"repair={repair!r}", repair is not None),
            (f"finetune_epochs={finetune_epochs}", finetune_epochs > 0),
        )
        if needed
    ]
    if needs_train and train_data is None:
        raise ValueError(f"{' and '.join(needs_train)} need `train_data`; none was given.")
    options = dict(align_options or {})
    sample = None
    if train_data is not None:
        x_train, y_train = as_tensors(train_data, "train_data", "compact_ensemble")
        sample = x_train[:ALIGN_SAMPLES]
    x_test, y_test = as_tensors(test, "test", "compact_ensemble")

    rows: list[dict[str, Any]] = []
    for k, model in enumerate(models):
        acc, loss = evaluate(model, (x_test, y_test))
        rows.append(_row(f"model {k}", "model", acc, loss))
    ens = predict_ensemble(list(models), (x_test, y_test))
    rows.append(_row("ensemble", "ensemble", ens, None))
    pair_ens = predict_ensemble(list(models[:2]), (x_test, y_test))

    curves: dict[str, list[float]] = {}
    for method in methods:
        log.info("aligning %d models with %r", len(models), method)
        opts = options.get(method, {})
        alignment = align(list(models), method=method, example_input=x_test[:1],
                          data=sample if method == "activation" else None, rng=seed,
                          progress=progress, **opts)  # fmt: skip
        fused = fuse_aligned(list(models), alignment, repair=repair, data=sample)
        acc, loss = evaluate(fused, (x_test, y_test))
        row = _row(method, "fused", acc, loss)
        row["align_time"] = float(alignment.time)
        row["objective"] = float(alignment.objective)
        if finetune_epochs > 0:
            log.info("fine-tuning the %r model for %d epoch(s)", method, finetune_epochs)
            tuned = train(copy.deepcopy(fused), (x_train, y_train), epochs=finetune_epochs,
                          lr=lr, batch_size=batch_size, seed=seed, progress=progress)  # fmt: skip
            row["finetuned_accuracy"], row["finetuned_loss"] = evaluate(tuned, (x_test, y_test))
        rows.append(row)
        if alphas:
            pair = _pair(alignment)
            curves[method] = [
                evaluate(
                    fuse_aligned(list(models[:2]), pair, alpha=a, repair=repair, data=sample),
                    (x_test, y_test),
                )[0]
                for a in alphas
            ]
    settings = {
        "num_models": len(models),
        "architecture": type(models[0]).__name__,
        "parameters": sum(p.numel() for p in models[0].parameters()),
        "methods": methods,
        "finetune_epochs": finetune_epochs,
        "repair": repair,
        "seed": seed,
        "test_size": len(y_test),
    }
    return EnsembleResult(rows, alphas, curves, pair_ens, settings)


def _row(name: str, kind: str, acc: float, loss: float | None) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "accuracy": acc,
        "loss": loss,
        "finetuned_accuracy": None,
        "finetuned_loss": None,
        "align_time": None,
        "objective": None,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(result: EnsembleResult) -> str:
    """The result as a plain-text table: one row per model, the ensemble and each method.

    Columns: test accuracy (%), test loss, accuracy after fine-tuning (%), alignment seconds.
    """
    tuned = any(r["finetuned_accuracy"] is not None for r in result.rows)
    headers = ["", "accuracy %", "loss"]
    if tuned:
        headers.append(f"+{result.settings.get('finetune_epochs', '?')} ep. %")
    headers.append("align s")
    body = []
    for r in result.rows:
        name = r["name"] if r["kind"] != "fused" else f"fused: {r['name']}"
        if r["kind"] == "ensemble":
            name = f"ensemble ({result.settings.get('num_models', '?')} models)"
        cells = [name, _pct(r["accuracy"]), "-" if r["loss"] is None else f"{r['loss']:.3f}"]
        if tuned:
            cells.append(_pct(r["finetuned_accuracy"]))
        cells.append("-" if r["align_time"] is None else f"{r['align_time']:.2f}")
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *body)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    lines = [line(headers), "  ".join("-" * w for w in widths), *(line(c) for c in body)]
    return "\n".join(lines)


TABLE_COLUMNS = (
    "name", "kind", "accuracy", "loss", "finetuned_accuracy", "finetuned_loss", "align_time",
    "objective",
)  # fmt: skip


def report_files(out: Path, stem: str = "ensemble") -> dict[str, Path]:
    """The files :func:`write_report` writes into `out`: table CSV, curves CSV, JSON, PNG."""
    return {
        "table": out / f"{stem}.csv",
        "curves": out / f"{stem}-interpolation.csv",
        "json": out / f"{stem}.json",
        "plot": out / f"{stem}-interpolation.png",
    }


def write_report(
    result: EnsembleResult, out: str | Path, *, stem: str = "ensemble", title: str | None = None
) -> dict[str, Path]:
    """Write the table (CSV), the curves (CSV), everything (JSON) and the curves' plot (PNG).

    Parameters
    ----------
    result : EnsembleResult
    out : str or Path
        Folder (created if missing). Existing files of the same names are replaced: the
        command line refuses that without ``--force`` before any work is done.
    stem : str
        File-name stem.
    title : str, optional
        Title of the plot.

    Returns
    -------
    dict of str to Path
        ``table``, ``curves``, ``json`` and ``plot`` (the plot only when matplotlib is
        installed and there are curves).
    """
    from ..bench._report import save_plot, write_csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = report_files(out, stem)
    write_csv(files["table"], result.rows, TABLE_COLUMNS)
    curve_rows = [
        {"method": m, "alpha": a, "accuracy": acc}
        for m, accs in result.curves.items()
        for a, acc in zip(result.alphas, accs)
    ]
    write_csv(files["curves"], curve_rows, ("method", "alpha", "accuracy"))
    payload = {
        "settings": result.settings,
        "rows": result.rows,
        "interpolation": {
            "alphas": result.alphas,
            "curves": result.curves,
            "pair_ensemble": result.pair_ensemble,
        },
    }
    files["json"].write_text(json.dumps(_json_safe(payload), indent=2) + "\n", encoding="utf-8")
    written = {k: files[k] for k in ("table", "curves", "json")}
    if result.curves:
        plot = save_plot(files["plot"], lambda plt: _draw_curves(plt, result, title))
        if plot is not None:
            written["plot"] = plot
    return written


def _draw_curves(plt: Any, result: EnsembleResult, title: str | None) -> None:
    _, ax = plt.subplots(figsize=(6.4, 4.6))
    for method, accs in result.curves.items():
        style = ":" if method == "none" else "-"
        ax.plot(result.alphas, [100 * a for a in accs], style, marker="o", ms=3, label=method)
    ax.axhline(100 * result.pair_ensemble, color="0.3", ls="--", lw=1,
               label="prediction ensemble")  # fmt: skip
    ax.set_xlabel("alpha  (model 0 at 0, model 1 at 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Interpolating two aligned models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=4, frameon=False)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return value
