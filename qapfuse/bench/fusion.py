"""``qapfuse bench fusion``: fused-model accuracy of every alignment method on the same models.

For each setting (dataset, architecture, number of models ``K``, data split) and each seed, the
runner trains ``K`` models **once** (model ``j`` of seed ``s`` is initialised and shuffled from
its own seed) and then, on exactly those models, measures:

* every single model, the best one, and the prediction ensemble (averaged softmax);
* for every alignment method of :func:`qapfuse.fusion.align` (``gamf`` once per kernel in
  ``--kernels``): the objective reached, the alignment time and the test accuracy of the fused
  model (:func:`qapfuse.fusion.fuse_aligned`), one-shot, after each ``--repair``, and after
  ``--finetune-epochs`` of fine-tuning on the union of the models' training data (the best
  single model, fine-tuned as long, is the control);
* the first-order methods' objectives under every ``gamf`` kernel (``align`` with that
  ``kernel`` and the same seed: the same matching, scored on the kernel's objective), so that
  ``gamf`` is compared with them on its own objective;
* weight matching's *restart spread* (the noise floor): ``--restarts`` extra weight-matching
  runs with other seeds (other random sweep orders) on the same models; the standard
  deviation of their one-shot accuracy says how far two first-order alignments of the same
  models differ by chance alone.

The report gives, per setting, method and variant, the mean and standard deviation over seeds,
per-seed wins / ties / losses against weight matching, the issue's targets (met / not met, with
the numbers), and which requested settings or seeds were not run. Rows go to the CSV as they
are measured, so a stopped run leaves its results; ``--resume`` keeps them and runs only what is
missing; ``--stop-at HH:MM`` (UTC) starts no new seed after that time.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._report import (
    announce,
    blas_threads,
    command_line,
    fmt,
    header_block,
    machine_info,
    markdown_table,
    prepare_output,
    save_plot,
    suite_parser,
    write_csv,
)

__all__ = ["COLUMNS", "build_parser", "main", "model_factory", "run", "summarise"]

log = logging.getLogger("qapfuse.bench")

DATASETS = ("digits", "mnist", "fashion-mnist")
ARCHS = ("mlp", "cnn", "vgg-bn")
METHODS = ("none", "weight", "merge_many", "activation", "c2m3", "gamf")
KERNELS = ("inner", "gaussian", "node")
FIRST_ORDER = ("weight", "merge_many", "activation", "c2m3")
REPAIRS = ("reset_bn", "repair")
SPLITS = ("same", "label-skew")
DEFAULT_EPOCHS = {"mlp": 5, "cnn": 3, "vgg-bn": 3}
REFERENCE = "weight"  # the method every other one is compared with, seed by seed
SPREAD = "weight restarts"  # the noise-floor row: the last row of a finished seed

COLUMNS = [
    "dataset",
    "arch",
    "n_models",
    "split",
    "seed",
    "method",
    "variant",
    "accuracy",
    "loss",
    "objective",
    "objective_inner",
    "objective_node",
    "objective_gaussian",
    "align_s",
    "n_iter",
    "best_model",
    "ensemble",
    "wall_s",
]

#: The issue's reference figures (independent implementation, 3 seeds; MNIST, percent).
REFERENCE_FIGURES: dict[tuple[str, str, int, str], dict[str, float]] = {
    ("mnist", "mlp", 2, "same"): {
        "best model": 97.80,
        "ensemble": 98.16,
        "none": 87.10,
        "weight": 97.74,
        "activation": 97.46,
    },
    ("mnist", "mlp", 4, "same"): {
        "best model": 97.85,
        "ensemble": 98.32,
        "none": 62.69,
        "weight": 97.45,
        "merge_many": 97.65,
        "activation": 96.87,
    },
    ("mnist", "mlp", 2, "label-skew"): {
        "best model": 95.14,
        "ensemble": 97.19,
        "none": 87.37,
        "weight": 96.51,
        "activation": 95.94,
    },
    ("mnist", "cnn", 2, "same"): {
        "best model": 98.68,
        "ensemble": 98.81,
        "none": 84.14,
        "weight": 98.47,
        "activation": 98.31,
    },
    ("mnist", "cnn", 4, "same"): {
        "best model": 98.69,
        "ensemble": 98.90,
        "none": 48.97,
        "weight": 98.11,
        "activation": 97.77,
    },
    ("mnist", "cnn", 2, "label-skew"): {
        "best model": 97.19,
        "ensemble": 98.25,
        "none": 81.93,
        "weight": 97.63,
        "activation": 97.51,
    },
}

Setting = tuple[str, str, int, str]  # (dataset, arch, n_models, split)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``qapfuse bench fusion``."""
    p = suite_parser(
        "fusion",
        "Fusion of K trained models by every alignment method, on the same models: one-shot, "
        "repaired and fine-tuned accuracy, objectives, and weight matching's noise floor.",
    )
    p.add_argument(
        "--dataset",
        nargs="+",
        choices=DATASETS,
        default=["digits"],
        metavar="NAME",
        help="datasets (digits, mnist, fashion-mnist; default digits)",
    )
    p.add_argument(
        "--data-root",
        nargs="+",
        default=[],
        metavar="[NAME=]DIR",
        help="folder of a dataset's IDX files, as NAME=DIR, or DIR (the files, or one "
        "sub-folder per dataset name)",
    )
    p.add_argument(
        "--arch",
        nargs="+",
        choices=ARCHS,
        default=["mlp"],
        metavar="ARCH",
        help="mlp (hidden --hidden), cnn (SmallCNN), vgg-bn (small VGG with "
        "BatchNorm); default mlp",
    )
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[256, 128],
        metavar="N",
        help="hidden widths of the MLP (default 256 128)",
    )
    p.add_argument(
        "--n-models",
        type=int,
        nargs="+",
        default=[2],
        metavar="K",
        help="numbers of models (default 2)",
    )
    p.add_argument(
        "--split",
        nargs="+",
        choices=SPLITS,
        default=["same"],
        metavar="SPLIT",
        help="same (all data, other seeds) or label-skew (90%% own classes)",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="DATASET/ARCH/K/SPLIT",
        help="run these settings in this order instead of the grid of --dataset, --arch, "
        "--n-models and --split (e.g. mnist/mlp/2/same mnist/mlp/4/same)",
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds per setting (default 5)")
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: MLP 5, CNN 3, VGG 3)"
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=None,
        metavar="N",
        help="use a seeded subset of N training images (default all)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"alignment methods (default: {' '.join(METHODS)})",
    )
    p.add_argument(
        "--kernels",
        nargs="+",
        choices=KERNELS,
        default=list(KERNELS),
        metavar="KERNEL",
        help="kernels of gamf, one row each (default all)",
    )
    p.add_argument(
        "--kernel-option",
        dest="kernel_options",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="an option of the Gaussian kernel for align, e.g. max_terms=400 (repeatable: "
        "sigma, expansion_tol, max_terms, max_kernel_evals)",
    )
    p.add_argument(
        "--repair",
        nargs="*",
        choices=REPAIRS,
        default=[],
        metavar="REPAIR",
        help="repairs measured after one-shot fusion (reset_bn needs BatchNorm)",
    )
    p.add_argument(
        "--repair-samples",
        type=int,
        default=1024,
        metavar="N",
        help="training images used by a repair (default 1024)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        metavar="E",
        help="epochs of fine-tuning of each fused model (0: none; default 1)",
    )
    p.add_argument(
        "--restarts",
        type=int,
        default=4,
        help="extra weight-matching seeds for the noise floor (default 4)",
    )
    p.add_argument(
        "--activation-samples",
        type=int,
        default=2048,
        metavar="N",
        help="training images for activation matching (default 2048)",
    )
    p.add_argument(
        "--tie",
        type=float,
        default=0.0005,
        help="accuracy difference counted as a tie (default 0.0005 = 0.05 points)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    p.add_argument(
        "--stop-at",
        default=None,
        metavar="HH:MM",
        help="start no new seed after this UTC time; the rest is reported not run",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished seeds of the report in --out and run the rest",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits, a tiny MLP, 2 models, 1 seed, none and weight (smoke test)",
    )
    return p


def _key_value(text: str) -> tuple[str, float | int]:
    """``KEY=VALUE`` with a numeric value (int when it reads as one)."""
    key, sep, raw = text.partition("=")
    if not sep or key not in ("sigma", "expansion_tol", "max_terms", "max_kernel_evals"):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY one of sigma, expansion_tol, max_terms, "
            f"max_kernel_evals; got {text!r}"
        )
    try:
        return key, int(raw)
    except ValueError:
        pass
    try:
        return key, float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} must be a number; got {raw!r}") from None


# -- models and data ---------------------------------------------------------------------------


class _Flat:
    """Namespace holder so that the MLP-on-images class is built only once torch is imported."""

    cls: Any = None


def _flat_mlp_class() -> Any:
    if _Flat.cls is None:
        import torch

        class FlatMLP(torch.nn.Module):
            """An MLP on images: flatten, then the zoo's MLP (whose spec is traced as usual)."""

            def __init__(self, mlp: torch.nn.Module) -> None:
                super().__init__()
                self.mlp = mlp

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.mlp(torch.flatten(x, 1))

        _Flat.cls = FlatMLP
    return _Flat.cls


def model_factory(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (256, 128),
) -> Callable[[], Any]:
    """A zero-argument constructor of the benchmark's architecture for this input shape.

    Parameters
    ----------
    arch : {"mlp", "cnn", "vgg-bn"}
        ``mlp``: flatten, then ``MLP(C*H*W, hidden, num_classes)`` (784-256-128-10 on MNIST);
        ``cnn``: :class:`~qapfuse.fusion.models.SmallCNN`; ``vgg-bn``: a small VGG with
        BatchNorm (16..64 channels).
    input_shape : (C, H, W)
    num_classes : int
    hidden : sequence of int
        Hidden widths of the MLP.

    Returns
    -------
    callable
        Builds a new, randomly initialised model at each call.
    """
    from ..fusion.models import MLP, VGG, SmallCNN

    c, h, w = input_shape
    if arch == "mlp":
        flat = _flat_mlp_class()
        return lambda: flat(MLP(c * h * w, tuple(hidden), num_classes))
    if arch == "cnn":
        return lambda: SmallCNN(c, num_classes, input_size=h)
    cfg = (16, "M", 32, "M", 64, 64, "M") if h >= 16 else (16, 32, "M", 64, "M")
    return lambda: VGG(
        cfg,
        batch_norm=True,
        in_channels=c,
        num_classes=num_classes,
        classifier=(),
        pool_size=1,
        dropout=0.0,
    )


def _data_roots(entries: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    """``--data-root`` entries as ``{dataset: folder}`` (key ``""``: a folder for any dataset)."""
    roots: dict[str, Path] = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep:
            name, folder = "", entry
        elif name not in DATASETS:
            parser.error(f"--data-root {entry!r}: unknown dataset {name!r} ({', '.join(DATASETS)})")
        roots[name] = Path(folder)
    return roots


def _root_for(name: str, roots: dict[str, Path]) -> Path | None:
    if name == "digits":
        return None
    if name in roots:
        return roots[name]
    if "" in roots:
        base = roots[""]
        return base / name if (base / name).is_dir() else base
    return None


def _load(name: str, roots: dict[str, Path], parser: argparse.ArgumentParser) -> Any:
    from ..fusion.data import load_dataset

    root = _root_for(name, roots)
    if name != "digits" and root is None:
        parser.error(f"--dataset {name} needs --data-root (the folder of its four IDX files)")
    try:
        return load_dataset(name, root)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data-root: {' '.join(str(exc).split())}")


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Setting]:
    if args.settings is None:
        return [
            (d, a, k, s)
            for d in args.dataset
            for a in args.arch
            for k in args.n_models
            for s in args.split
        ]
    out = []
    for text in args.settings:
        parts = text.split("/")
        ok = len(parts) == 4 and parts[0] in DATASETS and parts[1] in ARCHS
        ok = ok and parts[2].isdigit() and parts[3] in SPLITS
        if not ok:
            parser.error(
                f"--settings {text!r}: expected DATASET/ARCH/K/SPLIT with DATASET in "
                f"{', '.join(DATASETS)}, ARCH in {', '.join(ARCHS)}, K >= 2 and SPLIT in "
                f"{', '.join(SPLITS)} (e.g. mnist/mlp/2/same)"
            )
        out.append((parts[0], parts[1], int(parts[2]), parts[3]))
    return out


def _labels(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(row label, kernel) of every alignment method run: ``gamf`` once per kernel."""
    out = []
    for m in args.methods:
        if m == "gamf":
            out += [(f"gamf[{k}]", k) for k in args.kernels]
        else:
            out.append((m, "inner"))
    return out


def _has_batchnorm(model: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


# -- one setting, one seed -----------------------------------------------------------------------


def _seed_rows(
    data: Any, setting: Setting, seed: int, args: argparse.Namespace, emit: Callable[[dict], None]
) -> None:
    """Train the models of one (setting, seed) once and measure every method on them.

    Each measured row goes to `emit` as soon as it exists; the last one is weight matching's
    restart spread (its presence marks the seed as finished).
    """
    import torch

    from ..fusion import (
        align,
        evaluate,
        fuse_aligned,
        predict_ensemble,
        seeded,
        split_indices,
        train,
    )

    t_start = time.perf_counter()
    dataset, arch, k, split = setting
    x, y = data.x_train, data.y_train
    if args.train_samples is not None and args.train_samples < len(y):
        pick = np.random.default_rng([seed, 17]).permutation(len(y))[: args.train_samples]
        x, y = x[torch.from_numpy(np.sort(pick))], y[torch.from_numpy(np.sort(pick))]
    parts = split_indices(y.numpy(), k, split, rng=seed)
    union = torch.from_numpy(np.unique(np.concatenate(parts)))
    xu, yu = x[union], y[union]
    shuffled = torch.from_numpy(np.random.default_rng([seed, 29]).permutation(len(union)))
    repair_x = xu[shuffled[: args.repair_samples]]
    activation_x = xu[shuffled[: args.activation_samples]]
    factory = model_factory(arch, data.input_shape, data.num_classes, args.hidden)
    epochs = args.epochs or DEFAULT_EPOCHS[arch]
    models = []
    for j, idx in enumerate(parts):
        t = torch.from_numpy(idx)
        model = seeded(factory, 1000 * seed + j)
        models.append(
            train(model, (x[t], y[t]), epochs=epochs, seed=1000 * seed + j, progress=False)
        )
    test = data.test
    singles = [evaluate(m, test) for m in models]
    ensemble = predict_ensemble(models, test)
    best = max(range(k), key=lambda j: singles[j][0])
    base = {
        "dataset": dataset,
        "arch": arch,
        "n_models": k,
        "split": split,
        "seed": seed,
        "best_model": singles[best][0],
        "ensemble": ensemble,
    }
    for j, (acc, loss) in enumerate(singles):
        emit({**base, "method": f"model {j}", "variant": "one-shot", "accuracy": acc, "loss": loss})
    emit(
        {
            **base,
            "method": "best model",
            "variant": "one-shot",
            "accuracy": singles[best][0],
            "loss": singles[best][1],
        }
    )
    emit({**base, "method": "ensemble", "variant": "one-shot", "accuracy": ensemble})
    log.info(
        "fusion: %s seed %d: trained %d models in %s s; best %s, ensemble %s",
        _setting_text(setting),
        seed,
        k,
        fmt(time.perf_counter() - t_start),
        _pct(singles[best][0]),
        _pct(ensemble),
    )

    def finetune(model: Any) -> tuple[float, float]:
        tuned = train(
            copy.deepcopy(model),
            (xu, yu),
            epochs=args.finetune_epochs,
            seed=1000 * seed + 999,
            progress=False,
        )
        return evaluate(tuned, test)

    if args.finetune_epochs:
        acc, loss = finetune(models[best])
        emit(
            {**base, "method": "best model", "variant": "finetuned", "accuracy": acc, "loss": loss}
        )

    example = x[:1]
    spec = None
    bn = _has_batchnorm(models[0])
    kernels = [kern for kern in args.kernels if "gamf" in args.methods]
    reference_acc: dict[str, float] = {}
    for label, kernel in _labels(args):
        method = label.split("[")[0]
        if method == "merge_many" and k < 3:
            continue  # with two models MergeMany is weight matching to the other model
        opts: dict[str, Any] = {}
        if method == "activation":
            opts = {"data": activation_x, "max_samples": args.activation_samples}
        try:
            t0 = time.perf_counter()
            res = align(models, method=method, kernel=kernel, example_input=example, spec=spec,
                        rng=seed, **opts, **(_kernel_opts(args, method, kernel) or {}))  # fmt: skip
            align_s = time.perf_counter() - t0
        except (ValueError, TypeError, RuntimeError, MemoryError) as exc:
            # e.g. a Gaussian expansion that needs more terms than allowed: this method's
            # rows are left out (and logged), the others still run
            log.warning("fusion: %s seed %d: %s failed: %s", _setting_text(setting), seed,
                        label, " ".join(str(exc).split()))  # fmt: skip
            continue
        spec = res.spec
        row = {**base, "method": label, "align_s": align_s, "n_iter": res.n_iter,
               "objective": res.objective, f"objective_{kernel}": res.objective}  # fmt: skip
        for other in kernels if method != "gamf" else ():
            if other == kernel:
                continue
            # the same matching (same method and seed) scored on each gamf kernel
            kopts = _kernel_opts(args, method, other)
            if kopts is None:
                continue
            try:
                again = align(models, method=method, kernel=other, spec=spec, rng=seed, **opts,
                              **kopts)  # fmt: skip
            except (ValueError, TypeError, RuntimeError, MemoryError) as exc:
                log.warning("fusion: %s seed %d: %s not scored on kernel %s: %s",
                            _setting_text(setting), seed, label, other,
                            " ".join(str(exc).split()))  # fmt: skip
                continue
            _check_same(res, again, label)
            row[f"objective_{other}"] = again.objective
        fused = fuse_aligned(models, res)
        acc, loss = evaluate(fused, test)
        if label == REFERENCE:
            reference_acc["one-shot"] = acc
        emit({**row, "variant": "one-shot", "accuracy": acc, "loss": loss})
        for rep in args.repair:
            if rep == "reset_bn" and not bn:
                continue
            fixed = fuse_aligned(
                models, res, repair=rep, data=repair_x, repair_samples=args.repair_samples
            )
            acc_r, loss_r = evaluate(fixed, test)
            emit({**row, "variant": rep, "accuracy": acc_r, "loss": loss_r})
        if args.finetune_epochs:
            acc_f, loss_f = finetune(fused)
            emit({**row, "variant": "finetuned", "accuracy": acc_f, "loss": loss_f})

    spread = math.nan
    if REFERENCE in args.methods and args.restarts:
        accs = [reference_acc.get("one-shot", math.nan)]
        for r in range(1, args.restarts + 1):
            t0 = time.perf_counter()
            res = align(models, method=REFERENCE, spec=spec, rng=seed * 7919 + r)
            align_s = time.perf_counter() - t0
            acc, loss = evaluate(fuse_aligned(models, res), test)
            accs.append(acc)
            emit(
                {
                    **base,
                    "method": REFERENCE,
                    "variant": f"restart {r}",
                    "accuracy": acc,
                    "loss": loss,
                    "objective": res.objective,
                    "objective_inner": res.objective,
                    "align_s": align_s,
                    "n_iter": res.n_iter,
                }
            )
        finite = [a for a in accs if math.isfinite(a)]
        spread = statistics.pstdev(finite) if len(finite) > 1 else math.nan
    emit(
        {
            **base,
            "method": SPREAD,
            "variant": "std",
            "accuracy": spread,
            "wall_s": time.perf_counter() - t_start,
        }
    )


def _kernel_opts(args: argparse.Namespace, method: str, kernel: str) -> dict[str, Any] | None:
    """``--kernel-option`` values for `kernel` (the Gaussian's only).

    None where `method` cannot take them: ``align(method="activation")`` passes its options to
    activation matching, so with kernel options its Gaussian objective is not scored (a
    default-kernel number would not be comparable).
    """
    if kernel != "gaussian" or not args.kernel_options:
        return {}
    return None if method == "activation" else dict(args.kernel_options)


def _check_same(a: Any, b: Any, label: str) -> None:
    """The same method and seed must give the same matching whatever kernel scores it."""
    same = all(np.array_equal(pa[g], pb[g]) for pa, pb in zip(a.perms, b.perms) for g in pa)
    if not same:
        log.warning(
            "fusion: %s gave another matching when rerun to score a second kernel; "
            "that objective belongs to the rerun",
            label,
        )


def _setting_text(s: Setting) -> str:
    return f"{s[0]} {s[1]} K={s[2]} {s[3]}"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


# -- rows: reading back, finished seeds ----------------------------------------------------------

_INT_COLUMNS = ("n_models", "seed", "n_iter")
_TEXT_COLUMNS = ("dataset", "arch", "split", "method", "variant")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a report CSV written by this suite, with numbers as numbers (empty: missing)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if text in ("", None):
                    continue
                if key in _TEXT_COLUMNS:
                    row[key] = text
                elif key in _INT_COLUMNS:
                    row[key] = int(float(text))
                else:
                    row[key] = float(text)
            rows.append(row)
    return rows


def _unit(row: dict[str, Any]) -> tuple[Setting, int]:
    return (row["dataset"], row["arch"], int(row["n_models"]), row["split"]), int(row["seed"])


def finished_units(rows: list[dict[str, Any]]) -> set[tuple[Setting, int]]:
    """(setting, seed) pairs whose last row (weight matching's restart spread) was written."""
    return {_unit(r) for r in rows if r["method"] == SPREAD}


# -- summary -------------------------------------------------------------------------------------


def _seeds_of(rows: list[dict[str, Any]], method: str, variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if r["method"] == method and r["variant"] == variant}


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def _settings_in(rows: list[dict[str, Any]]) -> dict[Setting, list[dict[str, Any]]]:
    """Finished rows grouped by setting, in order of first appearance."""
    done = finished_units(rows)
    out: dict[Setting, list[dict[str, Any]]] = {}
    for r in rows:
        setting, seed = _unit(r)
        if (setting, seed) in done:
            out.setdefault(setting, []).append(r)
    return out


def noise_floor(rows: list[dict[str, Any]]) -> float:
    """Mean over seeds of weight matching's per-seed restart spread (accuracy std, in [0, 1])."""
    return _mean([r.get("accuracy", math.nan) for r in rows if r["method"] == SPREAD])


def summarise(rows: list[dict[str, Any]], tie: float) -> list[dict[str, Any]]:
    """Per finished setting, method and variant: mean / std over seeds and W/T/L vs weight.

    Parameters
    ----------
    rows : list of dict
        Measured rows (the CSV's); only finished seeds count.
    tie : float
        Per-seed accuracy difference to weight matching counted as a tie.

    Returns
    -------
    list of dict
        Keys ``setting``, ``method``, ``variant``, ``seeds``, ``mean``, ``std`` (percent),
        ``diff`` (mean per-seed difference to weight matching, points), ``wtl``
        (``"W/T/L"`` or ``"-"``), ``objective``, ``align_s`` and ``noise`` (the setting's
        noise floor, points).
    """
    out = []
    for setting, srows in _settings_in(rows).items():
        noise = 100 * noise_floor(srows)
        keys: list[tuple[str, str]] = []
        for r in srows:
            key = (r["method"], r["variant"])
            skip = r["method"].startswith("model ") or r["method"] == SPREAD
            if not skip and not r["variant"].startswith("restart") and key not in keys:
                keys.append(key)
        for method, variant in keys:
            by_seed = _seeds_of(srows, method, variant)
            accs = [r["accuracy"] for r in by_seed.values()]
            ref = _seeds_of(srows, REFERENCE, variant)
            wtl, diff = "-", math.nan
            comparable = method not in (REFERENCE, "best model", "ensemble")
            if comparable and ref:
                d = [by_seed[s]["accuracy"] - ref[s]["accuracy"] for s in by_seed if s in ref]
                wtl = "/".join(
                    str(n)
                    for n in (
                        sum(v > tie for v in d),
                        sum(abs(v) <= tie for v in d),
                        sum(v < -tie for v in d),
                    )
                )
                diff = 100 * _mean(d)
            out.append(
                {
                    "setting": _setting_text(setting),
                    "method": method,
                    "variant": variant,
                    "seeds": len(accs),
                    "mean": 100 * _mean(accs),
                    "std": 100 * statistics.pstdev(accs) if len(accs) > 1 else math.nan,
                    "diff": diff,
                    "wtl": wtl,
                    "objective": _mean([r.get("objective", math.nan) for r in by_seed.values()]),
                    "align_s": _mean([r.get("align_s", math.nan) for r in by_seed.values()]),
                    "noise": noise,
                }
            )
    return out


# -- targets -------------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("**met**" if ok else "**not met**")


def _f2(x: float) -> str:
    """Points with two decimals (``-`` when missing)."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _mean_acc(srows: list[dict[str, Any]], method: str, variant: str = "one-shot") -> float:
    return _mean([r["accuracy"] for r in _seeds_of(srows, method, variant).values()])


def _objective_targets(groups: dict[Setting, list[dict]], labels: list[str]) -> list[str]:
    lines = []
    total = ok = 0
    worst = math.inf
    below = []
    for setting, srows in groups.items():
        g, w = _seeds_of(srows, "gamf[inner]", "one-shot"), _seeds_of(srows, REFERENCE, "one-shot")
        for s in sorted(g.keys() & w.keys()):
            gv, wv = g[s]["objective_inner"], w[s]["objective_inner"]
            total += 1
            ok += gv >= wv - 1e-9 * abs(wv)
            worst = min(worst, (gv - wv) / abs(wv))
            if gv < wv - 1e-9 * abs(wv):
                below.append(f"{_setting_text(setting)} seed {s}: {gv:.6g} < {wv:.6g}")
    text = _verdict(None)
    if total:
        text = (f"{_verdict(ok == total)}: on {ok} of {total} seeds (smallest relative "
                f"difference gamf - weight: {worst:+.2e}"
                + (f"; below on {'; '.join(below)})" if below else ")"))  # fmt: skip
    lines.append(
        f"- `gamf` kernel=inner reaches at least `weight`'s objective on every pair: {text}"
    )
    for label in labels:
        col = f"objective_{label[5:-1]}"
        total = ok = 0
        margins = []
        for srows in groups.values():
            g = _seeds_of(srows, label, "one-shot")
            firsts = [_seeds_of(srows, m, "one-shot") for m in FIRST_ORDER]
            for s, row in g.items():
                others = [f[s][col] for f in firsts if s in f and col in f[s]]
                if others and col in row:
                    total += 1
                    ok += row[col] > max(others)
                    margins.append((row[col] - max(others)) / abs(max(others)))
        text = _verdict(None)
        if total:
            text = (f"{_verdict(ok == total)}: on {ok} of {total} seeds (relative margin over "
                    f"the best first-order matching: min {min(margins):+.2e}, mean "
                    f"{_mean(margins):+.2e})")  # fmt: skip
        lines.append(f"- `{label}` above every first-order method on its own kernel's "
                     f"objective: {text}")  # fmt: skip
    return lines


def _accuracy_targets(groups: dict[Setting, list[dict]], labels: list[str]) -> list[str]:
    table = []
    for setting, srows in groups.items():
        floor = 100 * noise_floor(srows)
        wm = 100 * _mean_acc(srows, REFERENCE)
        for label in labels:
            gm = 100 * _mean_acc(srows, label)
            if math.isnan(gm) or math.isnan(wm):
                continue
            versus = ["", "", ""]
            if setting[2] >= 4:
                mm, cm = (100 * _mean_acc(srows, m) for m in ("merge_many", "c2m3"))
                beats = None if math.isnan(mm) or math.isnan(cm) else gm > max(mm, cm)
                versus = [_f2(mm), _f2(cm), _verdict(beats)]
            seeds = len(_seeds_of(srows, label, "one-shot"))
            table.append([_setting_text(setting), seeds, label, _f2(gm), _f2(wm), _f2(gm - wm),
                          _f2(floor), _verdict(gm >= wm - floor), *versus])  # fmt: skip
    if not table:
        return ["- not run (no setting with both `gamf` and `weight` finished)"]
    headers = ["setting", "seeds", "gamf", "gamf mean", "weight mean", "diff", "noise floor",
               "no lower than weight - floor", "merge_many", "c2m3",
               "4 models: beats both"]  # fmt: skip
    lines = [markdown_table(headers, table), ""]
    for setting, srows in groups.items():
        means = {m: 100 * _mean_acc(srows, m) for m in dict.fromkeys(r["method"] for r in srows)
                 if r_is_method(m) and m != "none"}  # fmt: skip
        means = {m: v for m, v in means.items() if math.isfinite(v)}
        if means:
            best = max(means, key=means.get)
            lines.append(f"- best one-shot method, {_setting_text(setting)}: `{best}` "
                         f"({_f2(means[best])})")  # fmt: skip
    return lines


def _repair_targets(groups: dict[Setting, list[dict]], labels: list[str]) -> list[str]:
    table = []
    for setting, srows in groups.items():
        ens = 100 * _mean_acc(srows, "ensemble")
        control = 100 * _mean_acc(srows, "best model", "finetuned")
        for method in [REFERENCE, *labels]:
            one = 100 * _mean_acc(srows, method)
            if math.isnan(one):
                continue
            gap = ens - one
            rep = 100 * _mean_acc(srows, method, "repair")
            if math.isnan(rep):
                rep = 100 * _mean_acc(srows, method, "reset_bn")
            tuned = 100 * _mean_acc(srows, method, "finetuned")
            verdict = "-"
            if setting[0] == "fashion-mnist" and not math.isnan(tuned):
                if setting[2] == 2:
                    verdict = _verdict(ens - tuned <= 0.5) + " (within 0.5)"
                else:
                    verdict = _verdict(gap > 0 and (tuned - one) / gap >= 0.75) + " (3/4 of gap)"
            seeds = len(_seeds_of(srows, method, "one-shot"))
            table.append([_setting_text(setting), seeds, method, _f2(one), _f2(rep),
                          _f2(100 * (rep - one) / gap) if gap > 0 else "-", _f2(tuned),
                          _f2(100 * (tuned - one) / gap) if gap > 0 else "-", _f2(ens),
                          _f2(control), verdict])  # fmt: skip
    lines = []
    if table:
        headers = ["setting", "seeds", "method", "one-shot", "repaired", "repair closes % of gap",
                   "finetuned", "finetune closes % of gap", "ensemble",
                   "best model finetuned", "Fashion-MNIST target"]  # fmt: skip
        lines += [markdown_table(headers, table), ""]
    lines.append("- The fine-tuning targets (within 0.5 points of the ensemble on 2-model rows, "
                 "three quarters of the gap on 4-model rows) are stated for Fashion-MNIST rows; "
                 "other rows are reported without a verdict."
                 + ("" if any(s[0] == "fashion-mnist" for s in groups) else
                    " No Fashion-MNIST row finished: not run."))  # fmt: skip
    if not any(s[1] == "vgg-bn" for s in groups):
        lines.append("- Repair / reset_bn closing half the gap on the Fashion-MNIST "
                     "VGG-with-BatchNorm rows: not run (not in this run).")  # fmt: skip
    lines.append("- Scale (VGG-11 / ResNet-20 alignment time and memory): not measured by this "
                 "suite: not run.")  # fmt: skip
    return lines


def targets(rows: list[dict[str, Any]], requested: Sequence[Setting]) -> list[str]:
    """The issue's targets as Markdown: met / not met / not run, with the numbers."""
    groups = _settings_in(rows)
    labels = sorted({r["method"] for r in rows if r["method"].startswith("gamf[")})
    lines = ["### Objective", ""]
    lines += _objective_targets(groups, labels)
    lines += ["", "### One-shot accuracy", ""]
    lines += _accuracy_targets(groups, labels)
    lines += [f"- {_setting_text(s)}: not run (no finished seed)" for s in requested
              if s not in groups]  # fmt: skip
    lines += ["", "### Repair and fine-tuning", ""]
    lines += _repair_targets(groups, labels)
    return lines


# -- report --------------------------------------------------------------------------------------


def write_report(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    commands: Sequence[str],
    info: dict[str, str],
    requested: Sequence[Setting],
    paths: Sequence[Path],
    *,
    final: bool = False,
) -> None:
    """Write the CSV (every row) and the Markdown report (finished seeds) to `paths`."""
    csv_path, md_path, png_path = paths
    write_csv(csv_path, rows, COLUMNS)
    summary = summarise(rows, args.tie)
    groups = _settings_in(rows)
    done = finished_units(rows)
    epochs = (f"{args.epochs} epochs" if args.epochs else
              "MLP 5 epochs, CNN 3, VGG 3")  # fmt: skip
    notes = [
        "## Setup",
        "",
        f"- For each setting and seed the models are trained once (Adam, lr 1e-3, batch 128, "
        f"{epochs}); every method fuses exactly those models. `label-skew`: model k gets 90% "
        "of the images of its own block of classes and 10% of the others'.",
        "- Accuracy in percent on the test set; mean and standard deviation (population) over "
        "seeds. `W/T/L`: seeds where the method beats / ties (within "
        f"{100 * args.tie:g} points) / loses to weight matching in the same variant "
        "(one-shot, repair, finetuned) on the same models; `diff`: the mean per-seed "
        "difference to weight matching, in points.",
        f"- Noise floor: per seed, the standard deviation of weight matching's one-shot "
        f"accuracy over its main run and {args.restarts} restarts with other seeds (other "
        "random sweep orders) on the same models, averaged over seeds.",
        "- `objective`: the method's network-QAP objective at its matching (the inner product, "
        "Git Re-Basin's objective, for first-order methods and plain averaging; gamf's own "
        "kernel for gamf), summed over model pairs; the objectives table scores every "
        "matching on every kernel. `align s`: wall-clock seconds of `align`.",
        f"- `repair`: REPAIR statistics on {args.repair_samples} training images; "
        f"`finetuned`: {args.finetune_epochs} epoch(s) of Adam on the union of the models' "
        "training data, starting from the one-shot fused model; `best model` finetuned is "
        "the control (one model, the same extra training). `merge_many` runs with 3 or more "
        "models only (with two it is weight matching).",
        "- The machine is a shared 2-core CPU (other jobs ran at the same time): times are "
        "indicative only.",
        "",
    ]
    title = "Fusion: fused-model accuracy by alignment method, on the same trained models"
    md = [header_block(title, "\n".join(commands), info, notes)]
    wall = sum(r.get("wall_s", 0.0) for r in rows if r["method"] == SPREAD)
    counts = {s: sum((s, i) in done for i in range(args.seeds)) for s in requested}
    missing = [f"{_setting_text(s)} ({n} of {args.seeds} seeds)" for s, n in counts.items()
               if n < args.seeds]  # fmt: skip
    md.append(f"Wall time of the finished seeds: {wall / 60:.1f} min. "
              + ("Not run or incomplete: " + "; ".join(missing) + "." if missing else
                 "Every requested seed finished."))  # fmt: skip
    md += ["", "## Targets", ""]
    md += targets(rows, requested)
    md += ["", "## Overview", ""]
    over = []
    for setting, srows in groups.items():
        over.append([_setting_text(setting), len({r["seed"] for r in srows}),
                     *(_f2(100 * _mean_acc(srows, m)) for m in
                       ("best model", "ensemble", "none", REFERENCE)),
                     _f2(100 * noise_floor(srows)),
                     fmt(_mean([r.get("wall_s", math.nan) for r in srows
                                if r["method"] == SPREAD]))])  # fmt: skip
    md.append(markdown_table(["setting", "seeds", "best model", "ensemble", "plain avg",
                              "weight", "noise floor", "s per seed"], over))  # fmt: skip
    md.append("")
    headers = ["method", "variant", "seeds", "mean", "std", "diff", "W/T/L vs weight",
               "objective", "align s"]  # fmt: skip
    for setting in groups:
        text = _setting_text(setting)
        table = [[r["method"], r["variant"], r["seeds"], _f2(r["mean"]), _f2(r["std"]),
                  _f2(r["diff"]), r["wtl"], fmt(r["objective"], 6), fmt(r["align_s"])]
                 for r in summary if r["setting"] == text]  # fmt: skip
        md += [f"## {text}", "", markdown_table(headers, table), ""]
    md += ["## Objectives", "",
           "Means over seeds; each method's matching scored on every kernel (first-order "
           "matchings re-run with the same seed; `-`: not scored).", ""]  # fmt: skip
    obj_rows = []
    for setting, srows in groups.items():
        for m in [m for m in dict.fromkeys(r["method"] for r in srows) if r_is_method(m)]:
            by = _seeds_of(srows, m, "one-shot")
            obj_rows.append([_setting_text(setting), m, *(
                fmt(_mean([r.get(f"objective_{k}", math.nan) for r in by.values()]), 6)
                for k in KERNELS)])  # fmt: skip
    md.append(markdown_table(["setting", "method", *[f"{k}" for k in KERNELS]], obj_rows))
    md.append("")
    refs = [(s, REFERENCE_FIGURES[s]) for s in groups if s in REFERENCE_FIGURES]
    if refs:
        md += ["## Against the issue's reference figures", "",
               "The issue's figures come from an independent implementation (3 seeds, same "
               "training recipe); ours are the means above.", ""]  # fmt: skip
        cols = ["best model", "ensemble", "none", "weight", "merge_many", "activation"]
        table = []
        for s, ref in refs:
            table.append([_setting_text(s), "this run",
                          *(_f2(100 * _mean_acc(groups[s], c)) for c in cols)])  # fmt: skip
            table.append(["", "reference", *(_f2(ref.get(c, math.nan)) for c in cols)])
        md += [markdown_table(["setting", "", *cols], table), ""]
    if final and summary:
        png = save_plot(png_path, lambda plt: _plot(plt, summary))
        if png is not None:
            md.append(f"![one-shot accuracy]({png.name})\n")
    md.append(f"Raw numbers (every seed, every model, every restart): "
              f"[`{csv_path.name}`]({csv_path.name}).\n")  # fmt: skip
    md_path.write_text("\n".join(md), encoding="utf-8")


def r_is_method(name: str) -> bool:
    """Whether a row's method is an alignment method (not a model, the ensemble or the floor)."""
    return name.split("[")[0] in METHODS


def _plot(plt: Any, summary: list[dict[str, Any]]) -> None:
    """One-shot accuracy per method (mean and std over seeds), one panel per setting."""
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    cols = min(len(settings), 4)
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(settings) :]:
        ax.set_visible(False)
    for ax, text in zip(axes.flat, settings):
        sub = [
            r
            for r in summary
            if r["setting"] == text and r["variant"] == "one-shot" and r["method"] != "none"
        ]
        ax.errorbar(
            range(len(sub)),
            [r["mean"] for r in sub],
            yerr=[0 if math.isnan(r["std"]) else r["std"] for r in sub],
            fmt="o",
        )
        ax.set_xticks(range(len(sub)), [r["method"] for r in sub], rotation=60, fontsize=7)
        ax.set_title(text, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle("one-shot accuracy, mean +- std over seeds (plain averaging left out)")


# -- entry point ---------------------------------------------------------------------------------


def _stop_time(text: str | None, parser: argparse.ArgumentParser) -> _dt.datetime | None:
    if text is None:
        return None
    try:
        hh, mm = (int(v) for v in text.split(":"))
        now = _dt.datetime.now(_dt.timezone.utc)
        return now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    except ValueError:
        parser.error(f"--stop-at expects a UTC time HH:MM, e.g. 09:50; got {text!r}")


def _previous_commands(md_path: Path) -> list[str]:
    """The commands in the "Produced by" block of an earlier report (for ``--resume``)."""
    if not md_path.exists():
        return []
    lines = md_path.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index("```") + 1
        end = lines.index("```", start)
    except ValueError:
        return []
    return lines[start:end]


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    positive = {
        "--seeds": args.seeds,
        "--repair-samples": args.repair_samples,
        "--activation-samples": args.activation_samples,
    }
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be an integer >= 1; got {value}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be an integer >= 1; got {args.epochs}")
    if args.train_samples is not None and args.train_samples < 10:
        parser.error(f"--train-samples must be an integer >= 10; got {args.train_samples}")
    if args.finetune_epochs < 0 or args.restarts < 0:
        parser.error("--finetune-epochs and --restarts must be integers >= 0")
    if any(k < 2 for k in args.n_models):
        parser.error(f"--n-models must be integers >= 2; got {args.n_models}")
    if any(h < 1 for h in args.hidden):
        parser.error(f"--hidden must be integers >= 1; got {args.hidden}")
    if not 0 <= args.tie < 1:
        parser.error(f"--tie must be in [0, 1); got {args.tie}")


def run(argv: Sequence[str]) -> int:
    """Run the fusion benchmark with command-line options `argv`; return an exit code."""
    parser = build_parser()
    argv = list(argv)
    args = parser.parse_args(argv)
    if args.quick:  # a tiny run; options given explicitly are kept
        quick = {"dataset": ["digits"], "arch": ["mlp"], "n_models": [2], "split": ["same"],
                 "hidden": [32, 16], "seeds": 1, "epochs": 10, "restarts": 1,
                 "methods": ["none", "weight"]}  # fmt: skip
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        args.settings = None
    _check_args(args, parser)
    requested = _settings(args, parser)
    if any(s[2] < 2 for s in requested):
        parser.error("--settings: K must be at least 2")
    try:
        import torch
    except ImportError:
        parser.error("bench fusion needs torch: pip install 'qapfuse[fusion]'")
    roots = _data_roots(args.data_root, parser)
    stop = _stop_time(args.stop_at, parser)
    if args.resume:
        args.force = True  # the report is continued, not replaced
    paths = prepare_output(parser, args, "fusion", (".csv", ".md", ".png"))
    rows: list[dict[str, Any]] = []
    this = command_line("fusion", argv)
    commands = [this]
    if args.resume and paths[0].exists():
        done = finished_units(read_rows(paths[0]))
        rows = [r for r in read_rows(paths[0]) if _unit(r) in done]  # unfinished seeds: redone
        commands = _previous_commands(paths[1]) or [this]  # this one joins once it runs a seed
        log.info("fusion: resuming %s with %d finished seed(s)", paths[0], len(done))
    datasets = {name: _load(name, roots, parser) for name in dict.fromkeys(s[0] for s in requested)}
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    stopped = False
    try:
        with blas_threads(args.threads) as note, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning of the solvers
            info = machine_info(note)
            info["torch threads"] = str(torch.get_num_threads())
            for setting in requested:
                for seed in range(args.seeds):
                    if (setting, seed) in finished_units(rows):
                        continue
                    if stop is not None and _dt.datetime.now(_dt.timezone.utc) >= stop:
                        stopped = True
                        break
                    unit_rows: list[dict[str, Any]] = []
                    if this not in commands:
                        commands.append(this)

                    def emit(row: dict[str, Any], unit_rows: list = unit_rows) -> None:
                        rows.append(row)
                        unit_rows.append(row)
                        _log_row(row, unit_rows)
                        write_csv(paths[0], rows, COLUMNS)  # partial results survive

                    _seed_rows(datasets[setting[0]], setting, seed, args, emit)
                    write_report(rows, args, commands, info, requested, paths)
                if stopped:
                    log.info("fusion: --stop-at %s reached; no new seed started", args.stop_at)
                    break
            write_report(rows, args, commands, info, requested, paths, final=True)
    finally:
        torch.set_num_threads(threads)
    announce(paths)
    return 0


main = run


def _log_row(row: dict[str, Any], unit_rows: list[dict[str, Any]]) -> None:
    """One progress line per measured row (models and the ensemble are in the seed's line)."""
    method, variant = row["method"], row["variant"]
    if method.startswith("model ") or (
        method in ("best model", "ensemble") and (variant == "one-shot")
    ):
        return
    where = f"{row['dataset']} {row['arch']} K={row['n_models']} {row['split']} seed {row['seed']}"
    if method == SPREAD:
        log.info(
            "fusion: %s: weight matching's restart spread %s points; seed done in %s s",
            where,
            _pct(row["accuracy"]),
            fmt(row.get("wall_s")),
        )
        return
    ref = next((r for r in unit_rows if r["method"] == REFERENCE and r["variant"] == variant), None)
    vs = "" if ref is None or method == REFERENCE else f" (weight {_pct(ref['accuracy'])})"
    extra = ""
    if row.get("objective") is not None:
        extra = f", objective {fmt(row['objective'], 6)} in {fmt(row.get('align_s'))} s"
    log.info(
        "fusion: %s: %s %s: accuracy %s%s%s",
        where,
        method,
        variant,
        _pct(row["accuracy"]),
        vs,
        extra,
    )
