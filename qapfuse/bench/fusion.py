"""``qapfuse bench fusion``: one-shot fusion accuracy of every alignment method on the same models.

For each setting (dataset, architecture, number of models, data split) and each seed, the
runner trains ``K`` models once (model ``k`` of seed ``s`` is initialised and shuffled from its
own seed) and then, on exactly those models, measures:

* the best single model and the prediction ensemble (averaged softmax), on the test set;
* for every alignment method: the objective reached, the alignment time and the test accuracy
  of the fused model, one-shot and after each requested repair (``reset_bn``, ``repair``) and,
  with ``--finetune-epochs``, after fine-tuning on the union of the models' training data;
* weight matching's *restart spread* (the noise floor): ``--restarts`` extra weight-matching
  runs with other seeds, whose accuracy standard deviation says how far two first-order
  alignments of the same models differ by chance alone.

The summary gives, per setting and method, the mean and standard deviation over seeds and
per-seed wins / ties / losses against weight matching (a tie: within ``--tie`` accuracy).
Reports go to ``--out`` as CSV and Markdown. Scale it with care: every seed trains ``K`` models.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._report import (
    blas_threads,
    command_line,
    fmt,
    header_block,
    machine_info,
    markdown_table,
    write_csv,
)

log = logging.getLogger("qapfuse.bench")

DATASETS = ("digits", "mnist", "fashion-mnist")
ARCHS = ("mlp", "cnn", "vgg-bn")
METHODS = ("none", "weight", "merge_many", "activation", "c2m3", "gamf")
REPAIRS = ("reset_bn", "repair")
SPLITS = ("same", "label-skew")
DEFAULT_ROOTS = {
    "mnist": "../shared/datasets/mnist",
    "fashion-mnist": "../shared/datasets/fashion-mnist",
}

COLUMNS = [
    "dataset", "arch", "n_models", "split", "seed", "method", "variant", "accuracy", "loss",
    "objective", "align_s", "best_model", "ensemble",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qapfuse bench fusion",
        description="One-shot fusion of K trained models by every alignment method.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--root", type=Path, default=None, help="folder of the IDX files")
    p.add_argument("--arch", nargs="+", choices=ARCHS, default=["mlp", "cnn"])
    p.add_argument("--n-models", type=int, nargs="+", default=[2], help="K values (e.g. 2 4)")
    p.add_argument("--split", nargs="+", choices=SPLITS, default=["same"])
    p.add_argument("--seeds", type=int, default=5, help="seeds per setting (>= 5 for reports)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (MLP 5, CNN 3)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--kernel", default="inner", help="kernel of gamf (inner, gaussian, node)")
    p.add_argument("--repair", nargs="*", choices=REPAIRS, default=[], help="repairs to add")
    p.add_argument("--repair-samples", type=int, default=1024)
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--restarts", type=int, default=3, help="extra weight-matching seeds")
    p.add_argument("--activation-samples", type=int, default=2048)
    p.add_argument("--train-samples", type=int, default=None, help="subsample the training set")
    p.add_argument("--tie", type=float, default=0.001, help="accuracy difference counted a tie")
    p.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--name", default="fusion", help="file stem of the CSV / Markdown report")
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits, MLP, 2 models, 1 seed, none/weight/activation only (smoke test)",
    )
    return p


# -- models and data ---------------------------------------------------------------------------


def model_factory(arch: str, input_shape: Sequence[int], num_classes: int) -> Callable[[], Any]:
    """A zero-argument constructor of the benchmark's architecture for this input shape."""
    from ..fusion.models import MLP, VGG, SmallCNN

    c, h, _ = input_shape
    if arch == "mlp":
        return lambda: _Flat(MLP(c * h * h, (256, 128), num_classes))
    if arch == "cnn":
        return lambda: SmallCNN(c, num_classes, input_size=h)
    cfg = (16, "M", 32, "M", 64, 64, "M") if h >= 16 else (16, 32, "M", 64, "M")
    return lambda: VGG(cfg, batch_norm=True, in_channels=c, num_classes=num_classes,
                       classifier=(), pool_size=1, dropout=0.0)  # fmt: skip


class _Flat(torch.nn.Module):
    """An MLP on images: flatten, then the MLP (keeps the zoo's MLP and its spec)."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(x, 1))


def _load(args: argparse.Namespace) -> Any:
    from ..fusion.data import load_dataset

    root = args.root or DEFAULT_ROOTS.get(args.dataset)
    return load_dataset(args.dataset, root)


# -- one setting, one seed -----------------------------------------------------------------------


def _seed_rows(
    data: Any, arch: str, k: int, split: str, seed: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    from ..fusion import align, evaluate, fuse_aligned, predict_ensemble, seeded, split_dataset
    from ..fusion import train as train_model

    x, y = data.x_train, data.y_train
    if args.train_samples is not None:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=gen)[: args.train_samples]
        x, y = x[idx], y[idx]
    parts = split_dataset((x, y), k, split, rng=seed)
    factory = model_factory(arch, data.input_shape, data.num_classes)
    epochs = args.epochs or (5 if arch == "mlp" else 3)
    models = [
        train_model(seeded(factory, 1000 * seed + j), part, epochs=epochs, seed=1000 * seed + j,
                    progress=False)
        for j, part in enumerate(parts)
    ]  # fmt: skip
    test = data.test
    singles = [evaluate(m, test)[0] for m in models]
    base = {
        "dataset": data.name, "arch": arch, "n_models": k, "split": split, "seed": seed,
        "best_model": max(singles), "ensemble": predict_ensemble(models, test),
    }  # fmt: skip
    example = x[:1]
    repair_x = x[: args.repair_samples]
    rows = []

    def measure(method: str, variant: str, rng: int, **opts: Any) -> None:
        t0 = time.perf_counter()
        res = align(models, method=method, example_input=example, rng=rng, **opts)
        align_s = time.perf_counter() - t0
        fused = fuse_aligned(models, res)
        acc, loss = evaluate(fused, test)
        rows.append({**base, "method": method, "variant": variant, "accuracy": acc,
                     "loss": loss, "objective": res.objective, "align_s": align_s})  # fmt: skip
        if variant != "one-shot":
            return
        for rep in args.repair:
            if rep == "reset_bn" and arch != "vgg-bn":
                continue
            fixed = fuse_aligned(models, res, repair=rep, data=repair_x,
                                 repair_samples=args.repair_samples)  # fmt: skip
            acc, loss = evaluate(fixed, test)
            rows.append({**base, "method": method, "variant": rep, "accuracy": acc,
                         "loss": loss, "objective": res.objective, "align_s": align_s})  # fmt: skip
        if args.finetune_epochs:
            tuned = train_model(fused, (x, y), epochs=args.finetune_epochs, seed=seed,
                                progress=False)  # fmt: skip
            acc, loss = evaluate(tuned, test)
            rows.append({**base, "method": method, "variant": "finetuned", "accuracy": acc,
                         "loss": loss, "objective": res.objective, "align_s": align_s})  # fmt: skip

    for method in args.methods:
        opts: dict[str, Any] = {}
        if method == "gamf":
            opts["kernel"] = args.kernel
        if method == "activation":
            opts.update(data=x, max_samples=args.activation_samples)
        measure(method, "one-shot", seed, **opts)
    if "weight" in args.methods:
        for r in range(1, args.restarts + 1):
            measure("weight", f"restart {r}", seed * 7919 + r)
    return rows


# -- summary and report ----------------------------------------------------------------------------


def summarise(rows: list[dict[str, Any]], tie: float) -> list[dict[str, Any]]:
    """Per setting, method and variant: mean/std over seeds and W/T/L against weight matching."""
    settings: dict[tuple, dict[tuple, dict[int, float]]] = {}
    refs: dict[tuple, dict[str, dict[int, float]]] = {}
    restarts: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        key = (r["dataset"], r["arch"], r["n_models"], r["split"])
        if r["variant"].startswith("restart"):
            restarts.setdefault(key, {}).setdefault(r["seed"], []).append(r["accuracy"])
            continue
        by_seed = settings.setdefault(key, {}).setdefault((r["method"], r["variant"]), {})
        by_seed[r["seed"]] = r["accuracy"]
        ref = refs.setdefault(key, {"best_model": {}, "ensemble": {}})
        ref["best_model"][r["seed"]] = r["best_model"]
        ref["ensemble"][r["seed"]] = r["ensemble"]
    out = []
    for key, methods in settings.items():
        main = methods.get(("weight", "one-shot"), {})
        # the noise floor: per seed, the spread of weight matching over its restarts (same
        # models, other random orders), averaged over seeds
        spreads = [
            statistics.pstdev([main[s], *accs])
            for s, accs in restarts.get(key, {}).items()
            if s in main
        ]
        noise_sd = statistics.fmean(spreads) if spreads else math.nan
        for name in ("best_model", "ensemble"):
            vals = list(refs[key][name].values())
            out.append(_stat(key, name, "", vals, None, noise_sd))
        for (method, variant), by_seed in methods.items():
            ref = methods.get(("weight", variant), {})
            wtl = None
            if ref and method != "weight":
                d = [by_seed[s] - ref[s] for s in by_seed if s in ref]
                wtl = (sum(v > tie for v in d), sum(abs(v) <= tie for v in d),
                       sum(v < -tie for v in d))  # fmt: skip
            out.append(_stat(key, method, variant, list(by_seed.values()), wtl, noise_sd))
    return out


def _stat(key, method, variant, vals, wtl, noise_sd) -> dict[str, Any]:
    return {
        "setting": f"{key[0]} {key[1]} K={key[2]} {key[3]}",
        "method": method,
        "variant": variant,
        "seeds": len(vals),
        "mean": 100 * statistics.fmean(vals),
        "std": 100 * statistics.pstdev(vals) if len(vals) > 1 else math.nan,
        "w/t/l vs weight": "-" if wtl is None else "/".join(map(str, wtl)),
        "weight restart std": 100 * noise_sd,
    }


def write_report(
    rows: list[dict[str, Any]], args: argparse.Namespace, command: str, info: dict[str, str]
) -> tuple[Path, Path]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{args.name}.csv", out / f"{args.name}.md"
    write_csv(csv_path, rows, COLUMNS)
    summary = summarise(rows, args.tie)
    notes = [
        "## Setup",
        "",
        "- Every method fuses the same trained models (one training run per seed and setting);",
        "  accuracy in percent on the test set; mean and standard deviation over seeds.",
        f"- W/T/L: seeds where the method beats / ties (within {100 * args.tie:g} points) /"
        " loses to weight matching with the same variant (one-shot, repair, ...) on the same"
        " models.",
        "- Weight restart std: per seed, the standard deviation of weight matching's one-shot "
        f"accuracy over the main run and {args.restarts} restarts with other seeds, averaged "
        "over seeds (the noise floor).",
        "",
    ]
    headers = ["setting", "method", "variant", "seeds", "mean", "std", "w/t/l vs weight",
               "weight restart std"]  # fmt: skip
    md = [header_block("Fusion: one-shot accuracy by alignment method", command, info, notes)]
    md.append(markdown_table(headers, [[r[h] for h in headers] for r in summary]))
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return csv_path, md_path


def run(argv: Sequence[str]) -> int:
    """Run the fusion benchmark with command-line options `argv`; return an exit code."""
    args = build_parser().parse_args(list(argv))
    if args.quick:
        args.dataset, args.arch, args.n_models, args.split = "digits", ["mlp"], [2], ["same"]
        args.seeds, args.epochs, args.restarts = 1, 2, 1
        args.methods = [m for m in args.methods if m in ("none", "weight", "activation")]
    if args.seeds < 1 or any(k < 2 for k in args.n_models):
        log.error("bench fusion needs --seeds >= 1 and --n-models >= 2")
        return 2
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = command_line("fusion", list(argv))
    try:
        data = _load(args)
    except (FileNotFoundError, ValueError) as e:
        log.error("bench fusion: %s", e)
        return 2
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with blas_threads(args.threads) as note, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = machine_info(note)
            for arch in args.arch:
                for k in args.n_models:
                    for split in args.split:
                        for seed in range(args.seeds):
                            t0 = time.perf_counter()
                            rows += _seed_rows(data, arch, k, split, seed, args)
                            log.info("fusion: %s %s K=%d %s seed %d in %s s", data.name, arch,
                                     k, split, seed, fmt(time.perf_counter() - t0))  # fmt: skip
                            write_report(rows, args, command, info)  # partial results survive
    finally:
        torch.set_num_threads(threads)
    csv_path, md_path = write_report(rows, args, command, info)
    log.info("fusion: wrote %s and %s", csv_path, md_path)
    return 0


main = run
