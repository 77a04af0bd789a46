"""``qapfuse bench fl``: federated learning with matching aggregation, in both regimes.

For each setting (dataset, architecture, number of clients ``K``, Dirichlet ``alpha``) and
seed, the runner measures, through :func:`qapfuse.fusion.federated.run_federated` (the one
simulation loop, so every engine and every command runs the same algorithm):

* **multi-round** FL (``--rounds``, once per ``--local-epochs`` value): every aggregator of
  ``--aggregators`` from the same initial model on the same client data; per round the global
  test accuracy, the fraction of hidden units whose matched permutation is not the identity,
  the aggregation time and the round's wall time;
* **one-shot** FL: the clients train ``--oneshot-epochs`` from their own initialisations
  **once**, and every method of ``--oneshot-methods`` fuses exactly those models (``fedavg``
  is plain averaging, the ``none`` baseline); the clients' prediction ensemble; each fused
  model after ``--finetune-rounds`` FedAvg rounds; each ``--repair`` on the same models; and
  FedAvg from scratch for ``--scratch-rounds`` rounds, the multi-round reference;
* an **engine check** (``--engines local,flower,deployment``): one small setting through each
  engine, accuracies per round side by side.

Rows go to the CSV when a (mode, setting, seed, epochs) unit finishes, so a stopped run keeps
its finished units; ``--resume`` runs only the missing ones; ``--stop-at HH:MM`` (UTC) starts
no new unit after that time. The Markdown report gives mean and standard deviation over seeds
and evaluates the issue's targets (:func:`targets`, a pure function of the rows).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import logging
import math
import statistics
import sys
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
from .fusion import _data_roots, _load, _previous_commands, _stop_time

__all__ = ["COLUMNS", "build_parser", "main", "read_rows", "run", "targets"]

log = logging.getLogger("qapfuse.bench")

DATASETS = ("digits", "mnist", "fashion-mnist")
ARCHS = ("mlp", "cnn", "vgg11-bn")
BATCHNORM_ARCHS = ("vgg11-bn",)
AGGREGATORS = ("fedavg", "gamf", "weight", "merge_many", "c2m3")
ONESHOT_METHODS = ("fedavg", "weight", "merge_many", "gamf", "c2m3")
FIRST_ORDER = ("weight", "merge_many", "c2m3")
REPAIRS = ("reset_bn", "repair")
ENGINES = ("local", "flower", "deployment")
MODES = ("multi", "oneshot", "engines")
AFTER_ROUNDS = (1, 2, 5)  # FedAvg rounds after one-shot fusion shown in the report
AGG_TARGET = 0.10  # aggregation under 10% of a round's wall time
PLAIN_GAIN = 0.15  # gamf at least 15 points above plain averaging at alpha 0.5
# The engine check: one small setting, the same as the Flower tests (3 clients, 2 rounds, digits).
ENGINE_CONFIG = {"num-clients": 3, "num-server-rounds": 2, "hidden": "16", "lr": 0.01, "seed": 3}
ENGINE_AGGREGATORS = ("fedavg", "gamf")

COLUMNS = [
    "mode",
    "dataset",
    "arch",
    "clients",
    "alpha",
    "seed",
    "epochs",
    "variant",
    "aggregator",
    "round",
    "accuracy",
    "loss",
    "updates",
    "rejected",
    "non_identity",
    "aggregation_time",
    "round_time",
    "train_fraction",
    "wall_s",
    "cpu_s",
]
_TEXT = ("mode", "dataset", "arch", "variant", "aggregator")
_INT = ("clients", "seed", "epochs", "round", "updates", "rejected")

Setting = tuple[str, str, int, float]  # (dataset, arch, clients, alpha)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``qapfuse bench fl``."""
    p = suite_parser(
        "fl",
        "Federated learning with matching aggregation: multi-round (fedavg vs gamf vs weight, "
        "non-identity fraction, aggregation time), one-shot fusion of independently initialised "
        "clients (then FedAvg), and an engine check (local vs Flower vs deployment).",
    )
    p.add_argument(
        "--mode",
        nargs="+",
        choices=MODES,
        default=["multi", "oneshot"],
        metavar="MODE",
        help="multi, oneshot and/or engines (the engine check; implied by --engines with more "
        "than local); default multi oneshot",
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
        default=["mlp", "cnn"],
        metavar="ARCH",
        help="mlp (hidden --hidden), cnn (SmallCNN), vgg11-bn (VGG-11 with BatchNorm at a "
        "quarter width); default mlp cnn",
    )
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[128, 64],
        metavar="N",
        help="hidden widths of the MLP (default 128 64)",
    )
    p.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[5, 10],
        metavar="K",
        help="numbers of clients (default 5 10)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=[0.5, 0.1],
        metavar="A",
        help="Dirichlet concentrations (default 0.5 0.1)",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="DATASET/ARCH/K/ALPHA",
        help="run these settings in this order instead of the grid of --dataset, --arch, "
        "--clients and --alpha (e.g. fashion-mnist/mlp/5/0.5 mnist/cnn/10/0.1)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="local Adam learning rate (1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    p.add_argument(
        "--train-samples",
        type=int,
        default=None,
        metavar="N",
        help="a seeded subset of N training images per seed (default all)",
    )
    p.add_argument(
        "--test-samples",
        type=int,
        default=None,
        metavar="N",
        help="measure accuracy on a seeded subset of N test images, the same for every seed "
        "(default all; evaluation dominates the CNN's cost)",
    )
    p.add_argument("--rounds", type=int, default=10, help="multi-round: rounds (default 10)")
    p.add_argument(
        "--local-epochs",
        type=int,
        nargs="+",
        default=[1, 10],
        metavar="E",
        help="multi-round: local epochs per round, one run each (default 1 10)",
    )
    p.add_argument(
        "--aggregators",
        nargs="+",
        choices=AGGREGATORS,
        default=["fedavg", "gamf", "weight"],
        metavar="NAME",
        help="multi-round aggregators (default fedavg gamf weight; fedavg is the reference)",
    )
    p.add_argument(
        "--oneshot-epochs",
        type=int,
        default=5,
        help="one-shot: local epochs of each client's own model (default 5)",
    )
    p.add_argument(
        "--oneshot-methods",
        nargs="+",
        choices=ONESHOT_METHODS,
        default=list(ONESHOT_METHODS),
        metavar="NAME",
        help="one-shot fusion methods (default all; fedavg = plain averaging)",
    )
    p.add_argument(
        "--finetune-rounds",
        type=int,
        default=8,
        metavar="F",
        help="one-shot: FedAvg rounds after fusion (default 8: with the fusion round, one "
        "fewer than --scratch-rounds 10, so that 'fewer rounds' is decided)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        metavar="E",
        help="local epochs of those FedAvg rounds and of FedAvg from scratch (default 1)",
    )
    p.add_argument(
        "--scratch-rounds",
        type=int,
        default=10,
        metavar="S",
        help="one-shot: rounds of the FedAvg-from-scratch reference (default 10)",
    )
    p.add_argument(
        "--repair",
        nargs="*",
        choices=REPAIRS,
        default=[],
        metavar="REPAIR",
        help="one-shot: repairs of the fused model on server images (repair; "
        "reset_bn needs BatchNorm)",
    )
    p.add_argument(
        "--repair-samples",
        type=int,
        default=256,
        metavar="N",
        help="server training images used by a repair (default 256)",
    )
    p.add_argument(
        "--engines",
        default="local",
        metavar="E1,E2",
        help="engine check: comma-separated from local, flower, deployment; with more than "
        "local, one small setting (digits, 3 clients, 2 rounds) runs through each and is "
        "compared with local (default local: no check)",
    )
    p.add_argument(
        "--tie",
        type=float,
        default=0.002,
        help="noise used when a single seed gives no spread, and the engine check's "
        "tolerance (default 0.002 = 0.2 points)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    p.add_argument(
        "--stop-at",
        default=None,
        metavar="HH:MM",
        help="start no new unit after this UTC time; the rest is reported not run",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished units of the report in --out and run the rest",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits, a small MLP, 3 clients, 1 seed, 2 rounds, few epochs (smoke test)",
    )
    return p


# -- settings, data --------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Setting]:
    if args.settings is None:
        return [
            (d, a, k, al)
            for d in args.dataset
            for a in args.arch
            for k in args.clients
            for al in args.alpha
        ]
    out = []
    for text in args.settings:
        parts = text.split("/")
        ok = len(parts) == 4 and parts[0] in DATASETS and parts[1] in ARCHS and parts[2].isdigit()
        try:
            alpha = float(parts[3]) if ok else math.nan
        except ValueError:
            alpha = math.nan
        if not ok or not alpha > 0 or int(parts[2]) < 2:
            parser.error(
                f"--settings {text!r}: expected DATASET/ARCH/K/ALPHA with DATASET in "
                f"{', '.join(DATASETS)}, ARCH in {', '.join(ARCHS)}, K >= 2 and ALPHA > 0 "
                "(e.g. fashion-mnist/mlp/5/0.5)"
            )
        out.append((parts[0], parts[1], int(parts[2]), alpha))
    return out


def _subset(data: Any, n: int | None, seed: int, n_test: int | None = None) -> Any:
    """A seeded subset of `n` training images (per seed) and of `n_test` test images (the same
    for every seed); None: all."""
    import torch

    def pick(size: int, m: int | None, key: list[int]) -> torch.Tensor | None:
        if m is None or m >= size:
            return None
        return torch.from_numpy(np.sort(np.random.default_rng(key).permutation(size)[:m]))

    train, test = pick(len(data.y_train), n, [seed, 17]), pick(len(data.y_test), n_test, [23])
    if train is not None:
        data = dataclasses.replace(data, x_train=data.x_train[train], y_train=data.y_train[train])
    if test is not None:
        data = dataclasses.replace(data, x_test=data.x_test[test], y_test=data.y_test[test])
    return data


def _setting_text(s: Setting) -> str:
    return f"{s[0]} {s[1]} K={s[2]} alpha={s[3]:g}"


# -- the measured units ----------------------------------------------------------------------------


def _rows_of(result: Any, base: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    """The records of a :class:`FederatedResult` as CSV rows (``updates``: updates received)."""
    rows = []
    for rec in result.records:
        row = {**base, "variant": variant, **rec, "updates": rec["clients"]}
        row["clients"] = base["clients"]
        if rec["aggregator"] == "ensemble":
            row["variant"] = "ensemble"
        rows.append(row)
    return rows


def _common(args: argparse.Namespace, setting: Setting, seed: int) -> dict[str, Any]:
    _, arch, k, alpha = setting
    return dict(
        lr=args.lr,
        batch_size=args.batch_size,
        clients=k,
        split="dirichlet",
        alpha=alpha,
        model=arch,
        hidden=tuple(args.hidden),
        seed=seed,
        progress=args.progress,
    )


def _multi_unit(data: Any, setting: Setting, seed: int, epochs: int, args: argparse.Namespace):
    from ..fusion.federated import run_federated

    res = run_federated(
        data,
        rounds=args.rounds,
        local_epochs=epochs,
        aggregators=args.aggregators,
        **_common(args, setting, seed),
    )
    base = _base("multi", setting, seed, epochs)
    return _rows_of(res, base, "")


def _oneshot_unit(data: Any, setting: Setting, seed: int, args: argparse.Namespace):
    from ..fusion.federated import run_federated

    base = _base("oneshot", setting, seed, args.oneshot_epochs)
    common = _common(args, setting, seed)
    t0 = time.perf_counter()
    fused = run_federated(
        data,
        one_shot=True,
        rounds=1 + args.finetune_rounds,
        local_epochs=args.oneshot_epochs,
        finetune_epochs=args.finetune_epochs,
        aggregators=args.oneshot_methods,
        **common,
    )
    rows = _rows_of(fused, base, "fused")
    log.info(
        "fl: oneshot %s seed %d: fused and fine-tuned in %.0f s: %s",
        _setting_text(setting),
        seed,
        time.perf_counter() - t0,
        _round_text(rows, 1),
    )
    for rep in args.repair:
        if rep == "reset_bn" and setting[1] not in BATCHNORM_ARCHS:
            continue  # nothing to reset: the rows say so by their absence
        t0 = time.perf_counter()
        again = run_federated(
            data,
            one_shot=True,
            rounds=1,
            local_epochs=args.oneshot_epochs,
            aggregators=args.oneshot_methods,
            client_states=fused.client_states,
            repair=rep,
            repair_samples=args.repair_samples,
            **common,
        )
        new = [r for r in _rows_of(again, base, rep) if r["variant"] == rep]
        rows += new
        log.info(
            "fl: oneshot %s seed %d: %s in %.0f s: %s",
            _setting_text(setting),
            seed,
            rep,
            time.perf_counter() - t0,
            _round_text(new, 1),
        )
    t0 = time.perf_counter()
    scratch = run_federated(
        data,
        rounds=args.scratch_rounds,
        local_epochs=args.finetune_epochs,
        aggregators="fedavg",
        **common,
    )
    new = _rows_of(scratch, base, "scratch")
    rows += new
    log.info(
        "fl: oneshot %s seed %d: FedAvg from scratch in %.0f s: %s",
        _setting_text(setting),
        seed,
        time.perf_counter() - t0,
        _round_text(new, args.scratch_rounds),
    )
    return rows


def _engine_rows(engines: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine check's rows: the same small setting through every engine in `engines`."""
    from ..fusion.data import load_dataset
    from ..fusion.federated import run_federated
    from ..fusion.flower import DEFAULT_CONFIG

    cfg = {**DEFAULT_CONFIG, **ENGINE_CONFIG}
    setting = (cfg["dataset"], cfg["model"], cfg["num-clients"], float(cfg["alpha"]))
    seed = int(cfg["seed"])
    rows: list[dict[str, Any]] = []
    for engine in engines:
        t0 = time.perf_counter()
        if engine == "local":
            res = run_federated(
                load_dataset(cfg["dataset"], cfg["data-root"] or None, seed=seed),
                clients=cfg["num-clients"],
                rounds=cfg["num-server-rounds"],
                local_epochs=cfg["local-epochs"],
                split=cfg["split"],
                alpha=cfg["alpha"],
                model=cfg["model"],
                hidden=tuple(int(v) for v in str(cfg["hidden"]).split(",")),
                lr=cfg["lr"],
                batch_size=cfg["batch-size"],
                aggregators=ENGINE_AGGREGATORS,
                seed=seed,
                progress=False,
            )
        elif engine == "flower":
            from ..fusion.flower import simulate

            flwr_log = logging.getLogger("flwr")
            old_level = flwr_log.level
            if not log.isEnabledFor(logging.DEBUG):  # Flower's own per-round log: with -v
                flwr_log.setLevel(logging.WARNING)
            try:
                res = simulate(cfg, aggregators=ENGINE_AGGREGATORS, num_cpus=args.threads)
            finally:
                flwr_log.setLevel(old_level)
        else:
            from ..fusion.deployment import run_deployment

            res = run_deployment(cfg, aggregators=ENGINE_AGGREGATORS)
        wall = time.perf_counter() - t0
        base = _base("engines", setting, seed, int(cfg["local-epochs"]))
        new = [{**r, "wall_s": wall} for r in _rows_of(res, base, engine)]
        rows += new
        log.info(
            "fl: engine %s: %d rounds in %.0f s: %s",
            engine,
            cfg["num-server-rounds"],
            wall,
            _round_text(new, cfg["num-server-rounds"]),
        )
    return rows


def _base(mode: str, setting: Setting, seed: int, epochs: int) -> dict[str, Any]:
    dataset, arch, k, alpha = setting
    return dict(
        mode=mode, dataset=dataset, arch=arch, clients=k, alpha=alpha, seed=seed, epochs=epochs
    )


def _round_text(rows: Sequence[dict[str, Any]], r: int) -> str:
    return ", ".join(
        f"{row['aggregator']} {_pct(row['accuracy'])}"
        for row in rows
        if row["round"] == r and row["variant"] != "ensemble"
    )


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _warm_up(methods: Sequence[str]) -> None:
    """Compile the alignment kernels once, so that no measured round pays for it."""
    import torch

    from ..fusion import random_permutations, trace
    from ..fusion.federated import aggregate
    from ..fusion.models import MLP
    from ..fusion.permute import permute
    from ..fusion.training import seeded

    net = seeded(lambda: MLP(6, (8,), 3), 0)
    spec = trace(net, torch.zeros(2, 6))
    sd = net.state_dict()
    others = [permute(sd, spec, random_permutations(spec, rng=k)) for k in (1, 2)]
    for method in dict.fromkeys(m for m in methods if m != "fedavg"):
        aggregate(sd, others, [1, 1], method=method, spec=spec, rng=0)


# -- rows: reading back, finished units ------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a report CSV written by this suite, numbers as numbers (empty cells: missing)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if text in ("", None):
                    if key == "variant":
                        row[key] = ""
                    continue
                if key in _TEXT:
                    row[key] = text
                elif key in _INT:
                    row[key] = int(float(text))
                else:
                    row[key] = float(text)
            rows.append(row)
    return rows


def _unit(row: dict[str, Any]) -> tuple:
    if row["mode"] == "engines":
        return ("engines", row["variant"])
    return (
        row["mode"],
        row["dataset"],
        row["arch"],
        int(row["clients"]),
        float(row["alpha"]),
        int(row["seed"]),
        int(row["epochs"]),
    )


def _setting_of(row: dict[str, Any]) -> Setting:
    return (row["dataset"], row["arch"], int(row["clients"]), float(row["alpha"]))


# -- statistics ------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1) of the finite values; NaN with fewer than two."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(vals) if len(vals) > 1 else math.nan


def _noise(values: Sequence[float], tie: float) -> float:
    """The seed noise of a per-seed figure: its sample std, or `tie` with a single seed."""
    s = _std(values)
    return tie if math.isnan(s) else s


def _groups(rows: Sequence[dict[str, Any]], mode: str) -> dict[tuple, list[dict[str, Any]]]:
    """Rows of `mode` grouped by (setting, epochs), in order of first appearance."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["mode"] == mode:
            out.setdefault((_setting_of(r), int(r["epochs"])), []).append(r)
    return out


def _curves(rows: Sequence[dict[str, Any]], aggregator: str, variant: str) -> dict[int, dict]:
    """``{seed: {round: row}}`` of one aggregator and variant."""
    out: dict[int, dict[int, dict]] = {}
    for r in rows:
        if r["aggregator"] == aggregator and r.get("variant", "") == variant:
            out.setdefault(int(r["seed"]), {})[int(r["round"])] = r
    return out


def _final(curve: dict[int, dict]) -> dict[str, Any]:
    return curve[max(curve)]


def multi_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per multi-round setting, local epochs and aggregator: the figures of the report.

    Returns
    -------
    list of dict
        Keys ``setting``, ``epochs``, ``aggregator``, ``seeds``, ``final`` / ``final_std`` and
        ``best`` / ``best_std`` (accuracy, mean / sample std over seeds), ``to90`` (mean over
        seeds of the first round reaching 90% of that seed's FedAvg final accuracy; NaN if a
        seed never does), ``never90`` (seeds that never do), ``nonid_mean`` / ``nonid_max``
        (non-identity fraction over rounds and seeds), ``agg_s`` and ``round_s`` (seconds per
        round), ``agg_frac`` / ``agg_frac_max`` (aggregation time / round time, mean and max
        over rounds and seeds), ``agg_frac_parallel`` (the same if the K clients had trained
        in parallel: ``agg / (agg + (round - agg) / K)``) and ``agg_frac_full`` (an estimate
        for the whole training set: the rest of the round scaled by ``1 / train_fraction``).
    """
    out = []
    for (setting, epochs), grows in _groups(rows, "multi").items():
        ref = {s: _final(c)["accuracy"] for s, c in _curves(grows, "fedavg", "").items()}
        names = list(dict.fromkeys(r["aggregator"] for r in grows))
        for name in names:
            curves = _curves(grows, name, "")
            finals = [_final(c)["accuracy"] for c in curves.values()]
            bests = [max(r["accuracy"] for k, r in c.items() if k > 0) for c in curves.values()]
            reach = []
            for s, c in curves.items():
                if s in ref:
                    hit = [k for k in sorted(c) if k > 0 and c[k]["accuracy"] >= 0.9 * ref[s]]
                    reach.append(hit[0] if hit else math.nan)
            played = [r for c in curves.values() for k, r in c.items() if k > 0]
            nonid = [r.get("non_identity", math.nan) for r in played]
            fracs, par, full = [], [], []
            for r in played:
                agg, wall = r.get("aggregation_time", math.nan), r.get("round_time", math.nan)
                if wall and wall > 0:
                    rest = max(wall - agg, 0.0)
                    fracs.append(agg / wall)
                    par.append(agg / (agg + rest / setting[2]))
                    full.append(agg / (agg + rest / r.get("train_fraction", 1.0)))
            finite_nonid = [v for v in nonid if v is not None and math.isfinite(v)]
            out.append(
                {
                    "setting": setting,
                    "epochs": epochs,
                    "aggregator": name,
                    "seeds": len(curves),
                    "final": _mean(finals),
                    "final_std": _std(finals),
                    "best": _mean(bests),
                    "best_std": _std(bests),
                    "to90": _mean(reach)
                    if reach and all(math.isfinite(v) for v in reach)
                    else math.nan,
                    "never90": sum(not math.isfinite(v) for v in reach),
                    "nonid_mean": _mean(finite_nonid),
                    "nonid_max": max(finite_nonid) if finite_nonid else math.nan,
                    "agg_s": _mean([r.get("aggregation_time", math.nan) for r in played]),
                    "round_s": _mean([r.get("round_time", math.nan) for r in played]),
                    "agg_frac": _mean(fracs),
                    "agg_frac_max": max(fracs) if fracs else math.nan,
                    "agg_frac_parallel": _mean(par),
                    "agg_frac_full": _mean(full),
                }
            )
    return out


def oneshot_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per one-shot setting and method: fused, repaired and fine-tuned accuracy.

    Returns
    -------
    list of dict
        Keys ``setting``, ``method`` (an aggregator, ``"ensemble"`` or ``"scratch"``),
        ``seeds``, ``fused`` / ``fused_std`` (round 1: the fused model; for ``"scratch"`` one
        FedAvg round from the shared init; for ``"ensemble"`` the prediction ensemble),
        ``per_seed`` (``{seed: fused accuracy}``), ``after`` (``{n: mean accuracy after n FedAvg
        rounds}``, round ``1 + n``; for ``"scratch"``: after round ``n``), ``repairs``
        (``{repair: mean}``), ``reach`` (FedAvg rounds after fusion until the mean accuracy
        reaches FedAvg-from-scratch's final mean accuracy; NaN: not within the rounds run),
        ``ran`` (FedAvg rounds run after fusion) and ``scratch_rounds``.
    """
    out = []
    for (setting, _), grows in _groups(rows, "oneshot").items():
        scratch = _curves(grows, "fedavg", "scratch")
        s_rounds = min((max(c) for c in scratch.values()), default=0)
        target = _mean([c[s_rounds]["accuracy"] for c in scratch.values() if s_rounds in c])
        ens = {int(r["seed"]): r["accuracy"] for r in grows if r["variant"] == "ensemble"}
        if ens:
            out.append(
                {
                    "setting": setting,
                    "method": "ensemble",
                    "seeds": len(ens),
                    "fused": _mean(ens.values()),
                    "fused_std": _std(list(ens.values())),
                    "per_seed": ens,
                    "after": {},
                    "repairs": {},
                    "reach": math.nan,
                    "ran": 0,
                    "scratch_rounds": s_rounds,
                }
            )
        methods = [
            m
            for m in dict.fromkeys(r["aggregator"] for r in grows if r["variant"] == "fused")
            if m != "ensemble"
        ]
        repairs = [v for v in dict.fromkeys(r["variant"] for r in grows) if v in REPAIRS]
        for m in methods:
            curves = _curves(grows, m, "fused")
            per_seed = {s: c[1]["accuracy"] for s, c in curves.items() if 1 in c}
            ran = min(max(c) for c in curves.values()) - 1
            mean_at = {
                k: _mean([c[k]["accuracy"] for c in curves.values() if k in c])
                for k in range(1, ran + 2)
            }
            reach = next((n for n in range(0, ran + 1) if mean_at[1 + n] >= target), math.nan)
            reps = {}
            for rep in repairs:
                rc = _curves(grows, m, rep)
                reps[rep] = _mean([c[1]["accuracy"] for c in rc.values() if 1 in c])
            out.append(
                {
                    "setting": setting,
                    "method": m,
                    "seeds": len(per_seed),
                    "fused": _mean(per_seed.values()),
                    "fused_std": _std(list(per_seed.values())),
                    "per_seed": per_seed,
                    "after": {n: mean_at[1 + n] for n in range(1, ran + 1)},
                    "repairs": reps,
                    "reach": reach if math.isfinite(target) else math.nan,
                    "ran": ran,
                    "scratch_rounds": s_rounds,
                }
            )
        if scratch:
            mean_at = {
                k: _mean([c[k]["accuracy"] for c in scratch.values() if k in c])
                for k in range(1, s_rounds + 1)
            }
            firsts = {s: c[1]["accuracy"] for s, c in scratch.items() if 1 in c}
            out.append(
                {
                    "setting": setting,
                    "method": "scratch",
                    "seeds": len(scratch),
                    "fused": mean_at.get(1, math.nan),
                    "fused_std": _std(list(firsts.values())),
                    "per_seed": firsts,
                    "after": mean_at,
                    "repairs": {},
                    "reach": math.nan,
                    "ran": s_rounds,
                    "scratch_rounds": s_rounds,
                }
            )
    return out


# -- targets ---------------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("**met**" if ok else "**not met**")


def _overall(verdicts: Sequence[bool | None]) -> str:
    """One verdict over settings: not met if any is not, undetermined if any is unknown."""
    if not verdicts:
        return _verdict(None)
    if False in verdicts:
        return _verdict(False)
    return "undetermined" if None in verdicts else _verdict(True)


def _f2(x: float) -> str:
    """Points with two decimals (``-`` when missing)."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def targets(rows: Sequence[dict[str, Any]], tie: float = 0.002) -> list[str]:
    """The issue's targets as Markdown lines: met / not met / not run, with the numbers.

    Parameters
    ----------
    rows : sequence of dict
        Rows as in the CSV (keys of ``COLUMNS``; accuracies in [0, 1]).
    tie : float
        The noise assumed where a single seed gives no spread.

    Returns
    -------
    list of str

    Notes
    -----
    Seed noise is the sample standard deviation over seeds of the reference's figure
    (FedAvg's final accuracy; the best first-order method's fused accuracy), or `tie` with one
    seed. ``gamf`` is "below beyond noise" when its mean is lower than the reference's mean by
    more than that noise.
    """
    lines = ["### Multi-round", ""]
    multi = multi_summary(rows)
    by = {(r["setting"], r["epochs"], r["aggregator"]): r for r in multi}
    table, oks = [], []
    for (setting, epochs), grows in _groups(rows, "multi").items():
        g, f = by.get((setting, epochs, "gamf")), by.get((setting, epochs, "fedavg"))
        if g is None or f is None:
            continue
        finals = [_final(c)["accuracy"] for c in _curves(grows, "fedavg", "").values()]
        noise = _noise(finals, tie)
        ok = g["final"] >= f["final"] - noise
        oks.append(ok)
        table.append(
            [
                _setting_text(setting),
                epochs,
                g["seeds"],
                _f2(100 * g["final"]),
                _f2(100 * f["final"]),
                _f2(100 * (g["final"] - f["final"])),
                _f2(100 * noise),
                _verdict(ok),
            ]
        )
    lines.append(
        f"- `gamf` never below FedAvg beyond the seed noise (final accuracy): "
        f"{_overall(oks)}" + (f" ({sum(oks)} of {len(oks)} settings)" if oks else "")
    )
    if table:
        lines += [
            "",
            markdown_table(
                ["setting", "local epochs", "seeds", "gamf", "fedavg", "diff", "noise", "verdict"],
                table,
            ),
            "",
        ]
    matched = [r for r in multi if r["aggregator"] != "fedavg" and math.isfinite(r["agg_frac"])]
    if matched:
        worst = max(matched, key=lambda r: r["agg_frac"])
        worst_max = max(matched, key=lambda r: r["agg_frac_max"])
        ok = worst["agg_frac"] < AGG_TARGET
        lines.append(
            f"- aggregation under {100 * AGG_TARGET:g}% of a round's wall time (mean over rounds "
            f"and seeds, every matching aggregator and setting): {_verdict(ok)}: worst "
            f"{100 * worst['agg_frac']:.1f}% (`{worst['aggregator']}`, "
            f"{_setting_text(worst['setting'])}, E={worst['epochs']}: "
            f"{fmt(worst['agg_s'])} s of {fmt(worst['round_s'])} s); worst single round "
            f"{100 * worst_max['agg_frac_max']:.1f}%; with the clients training in parallel the "
            f"worst mean would be {100 * max(r['agg_frac_parallel'] for r in matched):.1f}%"
            + (
                f"; with the whole training set (the rest of each round scaled up by the "
                f"subset's inverse fraction, an estimate) it would be "
                f"{100 * max(r['agg_frac_full'] for r in matched):.1f}%"
                if any(r.get("train_fraction", 1.0) < 1.0 for r in rows if r["mode"] == "multi")
                else ""
            )
        )
    else:
        lines.append(f"- aggregation under {100 * AGG_TARGET:g}% of a round's wall time: not run")
    nonid = [r for r in multi if math.isfinite(r["nonid_max"])]
    if nonid:
        moved = [r for r in nonid if r["nonid_max"] > 0]
        lines.append(
            "- non-identity fraction: "
            + (
                "0 in every round of every matching aggregator (matched aggregation was FedAvg)"
                if not moved
                else f"nonzero in {len(moved)} of {len(nonid)} (setting, epochs, aggregator) "
                "groups, "
                f"largest {100 * max(r['nonid_max'] for r in moved):.3f}%"
            )
        )
    lines += ["", "### One-shot", ""]
    lines += _oneshot_targets(rows, tie)
    return lines


def _oneshot_targets(rows: Sequence[dict[str, Any]], tie: float) -> list[str]:
    summary = oneshot_summary(rows)
    by = {(r["setting"], r["method"]): r for r in summary}
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    t1, t2, t3 = [], [], []
    for s in settings:
        g = by.get((s, "gamf"))
        if g is None:
            continue
        firsts = [by[(s, m)] for m in FIRST_ORDER if (s, m) in by]
        if firsts:
            best = max(firsts, key=lambda r: r["fused"])
            noise = _noise(list(best["per_seed"].values()), tie)
            ok = g["fused"] >= best["fused"] - noise
            t1.append(
                (
                    ok,
                    [
                        _setting_text(s),
                        g["seeds"],
                        _f2(100 * g["fused"]),
                        best["method"],
                        _f2(100 * best["fused"]),
                        _f2(100 * (g["fused"] - best["fused"])),
                        _f2(100 * noise),
                        _verdict(ok),
                    ],
                )
            )
        plain = by.get((s, "fedavg"))
        if plain is not None and math.isclose(s[3], 0.5):
            gain = g["fused"] - plain["fused"]
            ok = gain >= PLAIN_GAIN
            t2.append(
                (
                    ok,
                    [
                        _setting_text(s),
                        _f2(100 * g["fused"]),
                        _f2(100 * plain["fused"]),
                        _f2(100 * gain),
                        _verdict(ok),
                    ],
                )
            )
        scratch = by.get((s, "scratch"))
        if scratch is not None:
            total = scratch["scratch_rounds"]
            target = scratch["after"].get(total, math.nan)
            if math.isfinite(g["reach"]):
                ok: bool | None = 1 + g["reach"] < total
                text = f"{g['reach']} (+1 one-shot round = {1 + g['reach']})"
            elif g["ran"] + 1 >= total - 1:
                ok, text = False, f"not within {g['ran']}"
            else:
                ok, text = None, f"not within {g['ran']} (undetermined: run more fine-tune rounds)"
            t3.append((ok, [_setting_text(s), _f2(100 * target), total, text, _verdict(ok)]))
    lines = []
    verdicts = [ok for ok, _ in t1]
    lines.append(
        "- `gamf` at least as accurate as the best first-order method (weight, "
        "merge_many, c2m3; fused one-shot, mean over seeds, within the seed noise of "
        f"that method): {_overall(verdicts)}"
    )
    if t1:
        lines += [
            "",
            markdown_table(
                [
                    "setting",
                    "seeds",
                    "gamf",
                    "best first-order",
                    "its mean",
                    "diff",
                    "noise",
                    "verdict",
                ],
                [r for _, r in t1],
            ),
            "",
        ]
    verdicts = [ok for ok, _ in t2]
    lines.append(
        f"- `gamf` at least {100 * PLAIN_GAIN:g} points above plain averaging (fedavg) "
        f"at alpha 0.5: {_overall(verdicts)}"
    )
    if t2:
        lines += [
            "",
            markdown_table(["setting", "gamf", "plain avg", "gain", "verdict"], [r for _, r in t2]),
            "",
        ]
    lines.append(
        "- fused-then-FedAvg (`gamf`) reaches FedAvg-from-scratch's final accuracy in "
        f"fewer communication rounds: {_overall([ok for ok, _ in t3])}"
    )
    if t3:
        lines += [
            "",
            markdown_table(
                [
                    "setting",
                    "scratch final",
                    "scratch rounds",
                    "gamf: FedAvg rounds after fusion",
                    "verdict",
                ],
                [r for _, r in t3],
            ),
            "",
        ]
    return lines


# -- report --------------------------------------------------------------------------------------


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{100 * mean:.2f}" + ("" if not math.isfinite(std) else f" ± {100 * std:.2f}")


def _engine_section(rows: Sequence[dict[str, Any]], tie: float) -> list[str]:
    erows = [r for r in rows if r["mode"] == "engines"]
    engines = list(dict.fromkeys(r["variant"] for r in erows))
    if len(engines) < 2:
        return ["Not run (pass `--engines local,flower,deployment`)."]
    cfg = {**ENGINE_CONFIG}
    lines = [
        f"One setting: digits, MLP hidden {cfg['hidden']}, {cfg['num-clients']} clients, "
        f"Dirichlet 0.5, {cfg['num-server-rounds']} rounds, seed {cfg['seed']}, through "
        "each engine; test accuracy (%) per round.",
        "",
    ]
    table, worst = [], 0.0
    for name in dict.fromkeys(r["aggregator"] for r in erows):
        acc = {
            (r["variant"], int(r["round"])): r["accuracy"] for r in erows if r["aggregator"] == name
        }
        for rnd in sorted({k for _, k in acc}):
            ref = acc.get(("local", rnd), math.nan)
            cells = [acc.get((e, rnd), math.nan) for e in engines]
            diffs = [abs(c - ref) for c in cells if math.isfinite(c) and math.isfinite(ref)]
            worst = max([worst, *diffs])
            table.append([name, rnd, *(_pct(c) for c in cells)])
    walls = {
        e: _mean([r.get("wall_s", math.nan) for r in erows if r["variant"] == e]) for e in engines
    }
    table.append(["wall s", "", *(fmt(walls[e]) for e in engines)])
    lines.append(markdown_table(["aggregator", "round", *engines], table))
    same = "identical" if worst <= 1e-9 else ("within noise" if worst <= tie else "different")
    lines += [
        "",
        f"Largest difference to the local engine: {100 * worst:.4f} points: "
        f"**{same}** (tolerance {100 * tie:g} points).",
    ]
    return lines


def write_report(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    commands: Sequence[str],
    info: dict[str, str],
    missing: Sequence[str],
    paths: Sequence[Path],
    *,
    final: bool = False,
) -> None:
    """Write the CSV (every finished unit) and the Markdown report to `paths`."""
    csv_path, md_path, png_path = paths
    write_csv(csv_path, rows, COLUMNS)
    subset = (
        f"a seeded subset of {args.train_samples} training images per seed"
        if args.train_samples
        else "the whole training set"
    ) + (
        f", accuracy on a seeded subset of {args.test_samples} test images (the same for "
        "every seed)"
        if args.test_samples
        else ", accuracy on the whole test set"
    )
    notes = [
        "## Setup",
        "",
        f"- Data: {subset}, split over K clients by a Dirichlet(alpha) label distribution; "
        f"models: MLP {'-'.join(str(h) for h in args.hidden)} hidden, the SmallCNN (convs of "
        "16 and 32 channels) or VGG-11 with BatchNorm at a quarter width; local "
        f"training Adam (lr {args.lr:g}, batch {args.batch_size}). Every run goes through "
        "`qapfuse.fusion.federated.run_federated`, each aggregator from the same initial "
        "model on the same client data and local-training seeds.",
        f"- Multi-round: {args.rounds} rounds with E local epochs per round, aggregators "
        f"{', '.join(args.aggregators)}. `rounds to 90%`: first round whose accuracy reaches "
        "90% of the same seed's FedAvg final accuracy. `non-identity`: fraction of hidden "
        "units whose matched permutation is not the identity (mean / max over rounds and "
        "seeds). `agg s` and `round s`: seconds per round; a round is the clients' "
        "sequential local training plus aggregation and evaluation; `agg % (parallel)` is "
        "the share if the K clients had trained in parallel.",
        f"- One-shot: each client trains {args.oneshot_epochs} epochs from its own "
        "initialisation, once per seed; every method fuses exactly those models (`fedavg` = "
        "plain averaging, the `none` baseline; `weight` matches every client to the first "
        "one); `ensemble`: the argmax of the plain (unweighted) average of the clients' "
        f"softmax outputs. Then {args.finetune_rounds} FedAvg rounds of "
        f"{args.finetune_epochs} local epoch(s) from each fused model; `scratch`: FedAvg from "
        f"the shared initial model for {args.scratch_rounds} rounds of "
        f"{args.finetune_epochs} local epoch(s). `reach`: FedAvg rounds after fusion until "
        "the mean accuracy reaches scratch's final mean (the fusion itself is one more "
        "communication round)."
        + (
            f" Repairs ({', '.join(args.repair)}) use {args.repair_samples} training images "
            "held by the server."
            if args.repair
            else ""
        ),
        "- Accuracy in percent on the test set, mean ± sample standard deviation over seeds. "
        "Seed noise in the targets: the sample standard deviation over seeds of the "
        f"reference's figure ({100 * args.tie:g} points with a single seed).",
        "- The machine is a shared 2-core CPU (other jobs ran at the same time): times are "
        "indicative only.",
        "",
    ]
    title = "Federated learning: matching aggregation, multi-round and one-shot"
    md = [header_block(title, "\n".join(commands), info, notes)]
    units = {_unit(r): (r.get("wall_s", 0.0), r.get("cpu_s", 0.0)) for r in rows}
    wall = sum(w for w, _ in units.values())
    cpu = sum(c for _, c in units.values())
    md.append(
        f"{len(units)} finished unit(s), {wall / 60:.1f} min of measurement "
        f"({cpu / 60:.1f} min of CPU time in this process). "
        + ("Not run: " + "; ".join(missing) + "." if missing else "Every requested unit finished.")
    )
    md += ["", "## Targets", "", *targets(rows, args.tie), "", "## Multi-round", ""]
    multi = multi_summary(rows)
    if multi:
        table = [
            [
                _setting_text(r["setting"]),
                r["epochs"],
                r["aggregator"],
                r["seeds"],
                _pm(r["final"], r["final_std"]),
                _pm(r["best"], r["best_std"]),
                fmt(r["to90"]) + (f" ({r['never90']} never)" if r["never90"] else ""),
                f"{fmt(100 * r['nonid_mean'])} / {fmt(100 * r['nonid_max'])}",
                fmt(r["agg_s"]),
                fmt(r["round_s"]),
                fmt(100 * r["agg_frac"]),
                fmt(100 * r["agg_frac_parallel"]),
            ]
            for r in multi
        ]
        md.append(
            markdown_table(
                [
                    "setting",
                    "E",
                    "aggregator",
                    "seeds",
                    "final",
                    "best",
                    "rounds to 90%",
                    "non-identity % mean / max",
                    "agg s",
                    "round s",
                    "agg %",
                    "agg % (parallel)",
                ],
                table,
            )
        )
        md += ["", "Non-identity fraction (%) per round, mean over seeds:", ""]
        md += _nonid_table(rows)
    else:
        md.append("Not run.")
    md += ["", "## One-shot", ""]
    one = oneshot_summary(rows)
    if one:
        afters = [n for n in AFTER_ROUNDS if n <= args.finetune_rounds]
        reps = list(dict.fromkeys(k for r in one for k in r["repairs"]))
        table = []
        for r in one:
            reach = "-"
            if r["method"] not in ("ensemble", "scratch"):
                reach = str(r["reach"]) if math.isfinite(r["reach"]) else f"> {r['ran']}"
            after = [r["after"].get(n, math.nan) for n in afters]
            last = (
                r["after"].get(r["scratch_rounds"], math.nan)
                if r["method"] == "scratch"
                else math.nan
            )
            table.append(
                [
                    _setting_text(r["setting"]),
                    _label(r["method"]),
                    r["seeds"],
                    _pm(r["fused"], r["fused_std"]),
                    *(_pct(r["repairs"].get(k, math.nan)) for k in reps),
                    *(_pct(a) for a in after),
                    _pct(last),
                    reach,
                ]
            )
        md.append(
            markdown_table(
                [
                    "setting",
                    "method",
                    "seeds",
                    "fused (round 1)",
                    *reps,
                    *(f"+{n} FedAvg" for n in afters),
                    "scratch final",
                    "reach",
                ],
                table,
            )
        )
        md += [
            "",
            "`scratch` rows: FedAvg from the shared init; its `+n` columns are its "
            "accuracy after n rounds in all.",
        ]
    else:
        md.append("Not run.")
    md += ["", "## Engine check", "", *_engine_section(rows, args.tie), ""]
    md += ["## Cost per unit", "", *_cost_table(rows), ""]
    if final and (multi or one):
        png = save_plot(png_path, lambda plt: _plot(plt, rows))
        if png is not None:
            md.append(f"![accuracy per round]({png.name})\n")
    md.append(f"Raw numbers (every seed and round): [`{csv_path.name}`]({csv_path.name}).\n")
    md_path.write_text("\n".join(md), encoding="utf-8")


def _cost_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Wall and CPU seconds per (mode, setting, epochs) unit, mean over seeds (for planning)."""
    units: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["mode"] != "engines":
            units[_unit(r)] = r
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in units.values():
        groups.setdefault((r["mode"], _setting_of(r), int(r["epochs"])), []).append(r)
    if not groups:
        return ["(no unit)"]
    table = [[mode, _setting_text(setting), epochs, len(g),
              fmt(_mean([r.get("wall_s", math.nan) for r in g])),
              fmt(_mean([r.get("cpu_s", math.nan) for r in g]))]
             for (mode, setting, epochs), g in groups.items()]  # fmt: skip
    return [markdown_table(["mode", "setting", "epochs", "seeds", "wall s", "CPU s"], table)]


def _label(method: str) -> str:
    return {"fedavg": "fedavg (plain avg)", "scratch": "scratch (FedAvg)"}.get(method, method)


def _nonid_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    table, width = [], 0
    for (setting, epochs), grows in _groups(rows, "multi").items():
        for name in dict.fromkeys(r["aggregator"] for r in grows):
            if name == "fedavg":
                continue
            curves = _curves(grows, name, "")
            rounds = sorted({k for c in curves.values() for k in c if k > 0})
            width = max(width, len(rounds))
            table.append(
                [
                    _setting_text(setting),
                    epochs,
                    name,
                    *(
                        fmt(
                            100
                            * _mean(
                                [
                                    c[k].get("non_identity", math.nan)
                                    for c in curves.values()
                                    if k in c
                                ]
                            )
                        )
                        for k in rounds
                    ),
                ]
            )
    if not table:
        return ["(no matching aggregator)"]
    table = [row + [""] * (3 + width - len(row)) for row in table]
    return [markdown_table(["setting", "E", "aggregator", *map(str, range(1, width + 1))], table)]


def _plot(plt: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Mean accuracy per round: one panel per multi-round (setting, E), one per one-shot setting."""
    panels = [("multi", key, grows) for key, grows in _groups(rows, "multi").items()]
    panels += [("oneshot", key, grows) for key, grows in _groups(rows, "oneshot").items()]
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    from matplotlib.ticker import MaxNLocator

    styles = ["o-", "s--", "^:", "D-.", "v--", "x-"]
    for ax, (mode, (setting, epochs), grows) in zip(axes.flat, panels):
        variant = "" if mode == "multi" else "fused"
        names = [n for n in dict.fromkeys(r["aggregator"] for r in grows) if n != "ensemble"]
        for k, name in enumerate(names):
            curves = _curves(grows, name, variant)
            if not curves:
                continue
            rounds = sorted({r for c in curves.values() for r in c})
            ax.plot(
                rounds,
                [
                    100 * _mean([c[r]["accuracy"] for c in curves.values() if r in c])
                    for r in rounds
                ],
                styles[k % len(styles)],
                ms=4,
                label=name,
            )
        if mode == "oneshot":
            scratch = _curves(grows, "fedavg", "scratch")
            rounds = sorted({r for c in scratch.values() for r in c})
            ax.plot(
                rounds,
                [
                    100 * _mean([c[r]["accuracy"] for c in scratch.values() if r in c])
                    for r in rounds
                ],
                "k:",
                label="FedAvg scratch",
            )
            ens = _mean([r["accuracy"] for r in grows if r["variant"] == "ensemble"])
            if math.isfinite(ens):
                ax.axhline(100 * ens, ls="--", color="gray", label="ensemble")
        title = f"{_setting_text(setting)}\n" + (
            f"multi-round, E={epochs}" if mode == "multi" else "one-shot (round 1), then FedAvg"
        )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("global test accuracy per round, mean over seeds")


# -- entry point ---------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    counts = {
        "--seeds": args.seeds,
        "--rounds": args.rounds,
        "--oneshot-epochs": args.oneshot_epochs,
        "--finetune-epochs": args.finetune_epochs,
        "--scratch-rounds": args.scratch_rounds,
        "--batch-size": args.batch_size,
        "--repair-samples": args.repair_samples,
    }
    for flag, value in counts.items():
        if value < 1:
            parser.error(f"{flag} must be an integer >= 1; got {value}")
    if args.finetune_rounds < 0:
        parser.error(f"--finetune-rounds must be an integer >= 0; got {args.finetune_rounds}")
    for flag, values, low in (
        ("--local-epochs", args.local_epochs, 1),
        ("--clients", args.clients, 2),
        ("--hidden", args.hidden, 1),
    ):
        if any(v < low for v in values):
            parser.error(f"{flag} must be integers >= {low}; got {values}")
    if any(not a > 0 for a in args.alpha):
        parser.error(f"--alpha must be numbers > 0; got {args.alpha}")
    for flag, value in (("--train-samples", args.train_samples),
                        ("--test-samples", args.test_samples)):  # fmt: skip
        if value is not None and value < 10:
            parser.error(f"{flag} must be an integer >= 10; got {value}")
    archs = [s.split("/")[1] for s in args.settings or [] if s.count("/") == 3] or args.arch
    if "reset_bn" in args.repair and not set(archs) & set(BATCHNORM_ARCHS):
        parser.error(
            "--repair reset_bn needs BatchNorm, which neither mlp nor cnn has; use --repair "
            "repair (or --arch vgg11-bn)"
        )
    if not args.lr > 0:
        parser.error(f"--lr must be a number > 0; got {args.lr}")
    if not 0 <= args.tie < 1:
        parser.error(f"--tie must be in [0, 1); got {args.tie}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(
            f"--engines: expected a comma-separated list from {', '.join(ENGINES)}; "
            f"got {args.engines!r}"
        )
    if len(engines) > 1 and "engines" not in args.mode:
        args.mode = [*args.mode, "engines"]
    if "engines" in args.mode and len(set(engines) - {"local"}) == 0:
        parser.error("--mode engines compares engines: pass --engines local,flower,deployment")
    if "fedavg" not in args.aggregators and "multi" in args.mode:
        args.aggregators = ["fedavg", *args.aggregators]  # the reference of every figure
    return engines


QUICK = {
    "dataset": ["digits"],
    "arch": ["mlp"],
    "hidden": [16],
    "clients": [3],
    "alpha": [0.5],
    "seeds": 1,
    "lr": 0.01,
    "rounds": 2,
    "local_epochs": [1],
    "oneshot_epochs": 2,
    "finetune_rounds": 2,
    "scratch_rounds": 3,
    "oneshot_methods": ["fedavg", "weight", "gamf"],
    "threads": 1,
}


def run(argv: Sequence[str]) -> int:
    """Run the federated-learning benchmark with options `argv`; return an exit code."""
    parser = build_parser()
    argv = list(argv)
    args = parser.parse_args(argv)
    if args.quick:  # a tiny run; options given explicitly are kept
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        args.settings = None
    engines = _check_args(args, parser)
    requested = _settings(args, parser)
    try:
        import torch
    except ImportError:
        parser.error("bench fl needs torch: pip install 'qapfuse[fusion]'")
    if len(engines) > 1 and ("flower" in engines or "deployment" in engines):
        try:
            import flwr  # noqa: F401
        except ImportError:
            parser.error("--engines flower/deployment need Flower: pip install 'qapfuse[flower]'")
        engines = ["local", *[e for e in engines if e != "local"]]
    roots = _data_roots(args.data_root, parser)
    stop = _stop_time(args.stop_at, parser)
    if args.resume:
        args.force = True  # the report is continued, not replaced
    paths = prepare_output(parser, args, "fl", (".csv", ".md", ".png"))
    rows: list[dict[str, Any]] = []
    this = command_line("fl", argv)
    commands = [this]
    if args.resume and paths[0].exists():
        rows = read_rows(paths[0])
        commands = _previous_commands(paths[1]) or [this]
        log.info(
            "fl: resuming %s with %d finished unit(s)", paths[0], len({_unit(r) for r in rows})
        )
    if not {"multi", "oneshot"} & set(args.mode):
        requested = []  # the engine check only
    datasets = {name: _load(name, roots, parser) for name in dict.fromkeys(s[0] for s in requested)}
    args.progress = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
    plan: list[tuple[tuple, Callable[[], list[dict[str, Any]]], str, _Lazy | None]] = []
    for setting in requested:
        for seed in range(args.seeds):
            data = _Lazy(datasets[setting[0]], args.train_samples, seed, args.test_samples)
            if "multi" in args.mode:
                for e in args.local_epochs:
                    key = ("multi", *setting, seed, e)
                    plan.append(
                        (
                            key,
                            lambda s=setting, i=seed, e=e, d=data: _multi_unit(
                                d.get(), s, i, e, args
                            ),
                            f"multi {_setting_text(setting)} E={e} seed {seed}",
                            data,
                        )
                    )
            if "oneshot" in args.mode:
                key = ("oneshot", *setting, seed, args.oneshot_epochs)
                plan.append(
                    (
                        key,
                        lambda s=setting, i=seed, d=data: _oneshot_unit(d.get(), s, i, args),
                        f"oneshot {_setting_text(setting)} seed {seed}",
                        data,
                    )
                )
    if "engines" in args.mode:
        for engine in engines:
            plan.append(
                (
                    ("engines", engine),
                    lambda e=engine: _engine_rows([e], args),
                    f"engine {engine}",
                    None,
                )
            )
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    missing: list[str] = []
    try:
        with blas_threads(args.threads) as note, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning of the solvers
            info = machine_info(note)
            info["torch threads"] = str(torch.get_num_threads())
            _warm_up([*args.aggregators, *args.oneshot_methods])
            for key, measure, text, lazy in plan:
                if key in {_unit(r) for r in rows}:
                    continue
                if stop is not None and _dt.datetime.now(_dt.timezone.utc) >= stop:
                    missing.append(text)
                    continue
                if this not in commands:
                    commands.append(this)
                log.info("fl: %s: started", text)
                t0, c0 = time.perf_counter(), time.process_time()
                new = measure()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                frac = 1.0 if lazy is None else lazy.fraction()
                rows += [{**r, "wall_s": r.get("wall_s", wall), "cpu_s": cpu,
                          "train_fraction": frac} for r in new]  # fmt: skip
                log.info("fl: %s: done in %.0f s (%.0f s CPU)", text, wall, cpu)
                write_report(rows, args, commands, info, missing, paths)
            if missing:
                log.info("fl: --stop-at %s reached; %d unit(s) not run", args.stop_at, len(missing))
            write_report(rows, args, commands, info, missing, paths, final=True)
    finally:
        torch.set_num_threads(threads)
    announce(paths)
    return 0


main = run


class _Lazy:
    """A dataset's seeded subsets, made when a unit first needs them."""

    def __init__(self, data: Any, n: int | None, seed: int, n_test: int | None) -> None:
        self.data, self.n, self.seed, self.n_test, self.value = data, n, seed, n_test, None

    def get(self) -> Any:
        if self.value is None:
            self.value = _subset(self.data, self.n, self.seed, self.n_test)
        return self.value

    def fraction(self) -> float:
        """The share of the training set in the subset."""
        return len(self.get().y_train) / len(self.data.y_train)
