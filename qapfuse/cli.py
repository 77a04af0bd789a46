"""The ``qapfuse`` command.

Subcommands:

* ``qapfuse solve FILE.dat`` (or ``--example NAME``) -- solve a QAPLIB instance and print the
  objective, the gap to the best known value and the permutation (1-indexed, as QAPLIB writes
  it); ``--json`` prints one JSON object instead.
* ``qapfuse bench SUITE [args...]`` -- run a benchmark suite (``qapfuse.bench``); the report
  goes to a new folder (or ``--out``), never over an existing one without ``--force``.
* ``qapfuse demo`` -- the library's reason to exist in under a minute, on data shipped with it:
  two small models trained on a label-skewed split of the embedded digits, fused with every
  alignment method; prints the table and writes CSV, JSON and the interpolation plot (PNG).
* ``qapfuse ensemble`` -- the same comparison for N models of the zoo (trained here on digits,
  MNIST, Fashion-MNIST or CIFAR-10 files) or for checkpoints (``--checkpoints``), with
  fine-tuning (:mod:`qapfuse.fusion.ensemble`).
* ``qapfuse fl --dataset digits --clients 5 --rounds 10 --aggregators fedavg,gamf,weight`` --
  federated learning with graph-matching aggregation on the in-process engine, Flower's
  simulation engine (``--engine flower``) or a localhost Flower deployment
  (``--engine deployment``); writes ``rounds.csv`` and ``accuracy.png`` to a new folder.

Errors (missing or malformed files, bad options) print one line ``qapfuse: error: ...`` on
stderr and exit with status 2; a library error about a parameter names the command-line flag
(``--seed``, not ``rng``). Progress goes to stderr through :mod:`logging`: ``bench`` reports one
line per measured row by default, ``demo`` and ``ensemble`` their steps and tqdm bars (training,
alignment), ``solve`` its steps with ``-v``; ``-vv`` adds debug detail and ``-q`` leaves errors
only. ``-v`` and ``-q`` may stand before or after the subcommand.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

log = logging.getLogger("qapfuse.cli")

DEFAULT_METHOD = "auto"
DEFAULT_TIME_LIMIT = 2.0
DEMO_FOLDER = "qapfuse-demo"
ENSEMBLE_FOLDER = "qapfuse-ensemble"
DEMO_EPOCHS = 30
DEFAULT_NUM_MODELS = 4
REFINERS = ("two_opt", "tabu")
EXIT_USAGE = 2
# Library parameter -> the flag a user typed, for error messages.
_FLAG_OF = {
    "rng": "--seed",
    "time_limit": "--time-limit",
    "restarts": "--restarts",
    "method": "--method",
    "refine": "--refine",
}
_PARAMETER_RE = re.compile(r"The '(\w+)' parameter of \S+ (?=must)")
_UNKNOWN_OPTION_RE = re.compile(r"solve\(method='(\w+)'\) got unknown option\(s\)")
_VERBOSITY_FLAGS = re.compile(r"-(v+|q+)|--verbose|--quiet")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class CliError(Exception):
    """A user error: printed as one line ``qapfuse: error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"qapfuse: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from . import __version__

    return __version__


def _add_verbosity(parser: argparse.ArgumentParser, dest_prefix: str) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        dest=f"{dest_prefix}verbose",
        action="count",
        default=0,
        help="more progress on stderr (-vv: debug detail)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        dest=f"{dest_prefix}quiet",
        action="count",
        default=0,
        help="errors only on stderr: no progress, no warnings",
    )


def _build_parser() -> argparse.ArgumentParser:
    verbose = argparse.ArgumentParser(add_help=False)
    _add_verbosity(verbose, "sub_")  # after the subcommand; added to the global count
    parser = _Parser(
        prog="qapfuse",
        description=(
            "Quadratic assignment and graph matching solvers, and neural-network fusion "
            "(qapfuse). New here? Run 'qapfuse demo'."
        ),
    )
    parser.add_argument("--version", action="version", version=f"qapfuse {_version()}")
    _add_verbosity(parser, "")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    solve = sub.add_parser(
        "solve",
        parents=[verbose],
        help="solve a QAPLIB instance",
        description=(
            "Solve a QAPLIB instance (minimise sum_ij A[i,j] B[p(i),p(j)]) and print the "
            "objective, the gap to the best known value (from the .sln given with --sln or "
            "lying beside the .dat) and the permutation, 1-indexed as QAPLIB writes it."
        ),
    )
    solve.add_argument("file", nargs="?", metavar="FILE.dat", help="QAPLIB .dat file")
    solve.add_argument(
        "--example",
        metavar="NAME",
        help="a QAPLIB instance shipped with qapfuse instead of FILE (e.g. nug20)",
    )
    solve.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"solver (default {DEFAULT_METHOD!r}: continuous start refined by tabu search)",
    )
    solve.add_argument(
        "--refine", metavar="{two_opt,tabu}", help="local search applied to each result"
    )
    solve.add_argument("--sln", metavar="FILE.sln", help="solution file with the best known value")
    solve.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    solve.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        metavar="S",
        help=f"wall-clock budget in seconds (default {DEFAULT_TIME_LIMIT:g})",
    )
    solve.add_argument(
        "--restarts", type=int, default=1, metavar="K", help="runs from random starts (default 1)"
    )
    solve.add_argument(
        "-O",
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "an option of --method, e.g. -O max_inner=60 to raise an iteration cap that a "
            "ConvergenceWarning names (repeatable; names and ranges as in the method's docstring)"
        ),
    )
    solve.add_argument("--json", action="store_true", help="print one JSON object")

    bench = sub.add_parser(
        "bench",
        parents=[verbose],
        help="run a benchmark suite (gm, qaplib, mgm, affinity, fusion, fl)",
        description=(
            "Run a benchmark suite; options after SUITE go to the suite itself (see "
            "'qapfuse bench SUITE --help'). The report goes to a new folder "
            "qapfuse-bench/SUITE-DATE-TIME, or to --out DIR; an existing report is never "
            "overwritten without --force. Progress: one line per measured row on stderr "
            "(-q: none)."
        ),
        add_help=True,
    )
    bench.add_argument(
        "suite", metavar="SUITE", help="benchmark suite: gm, qaplib, mgm, affinity, fusion or fl"
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the suite")
    _add_demo_parser(sub, verbose)
    _add_ensemble_parser(sub, verbose)
    _add_fl_parser(sub, verbose)
    return parser


def _add_report_options(parser: argparse.ArgumentParser, default_folder: str) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"report folder (default: a new folder ./{default_folder}-YYYYMMDD-HHMMSS)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing report")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="alignment methods to compare (default: all; space- or comma-separated)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's; the demo uses 1, fastest for its tiny models)",
    )


def _add_demo_parser(sub: Any, verbose: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        "demo",
        parents=[verbose],
        help="fuse two models trained on the embedded digits (under a minute)",
        description=(
            "Train two small MLPs (64-64-64-10) on a label-skewed split of the 8x8 digits "
            "shipped with scikit-learn (model 0 sees mostly digits 0-4, model 1 mostly 5-9), "
            "fuse them with every alignment method, fine-tune each fused model for one epoch, "
            "and print the table: each model, their prediction ensemble, every fused model. The "
            "table (CSV), everything (JSON) and the interpolation curve (PNG: accuracy of "
            "(1 - alpha) A + alpha B, aligned by each method) go to a new folder."
        ),
    )
    _add_report_options(demo, DEMO_FOLDER)
    demo.add_argument(
        "--epochs",
        type=int,
        default=DEMO_EPOCHS,
        help=f"training epochs of each model (default {DEMO_EPOCHS})",
    )
    demo.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        metavar="F",
        help="fine-tuning epochs of each fused model (default 1; 0: one-shot only)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds: 10 epochs, no fine-tuning, a 3-point curve (for tests)",
    )


def _add_ensemble_parser(sub: Any, verbose: argparse.ArgumentParser) -> None:
    ens = sub.add_parser(
        "ensemble",
        parents=[verbose],
        help="fuse N models (trained here or from checkpoints) and compare with the ensemble",
        description=(
            "Train --num-models models of the zoo (or load --checkpoints: state dicts saved "
            "with torch.save or safetensors, never unpickled code), fuse them with every "
            "alignment method, evaluate one-shot and after --finetune-epochs, and print the "
            "table: each model, the prediction ensemble, every fused model. CSV, JSON and the "
            "interpolation curve of models 0 and 1 (PNG) go to a new folder."
        ),
    )
    ens.add_argument(
        "--model",
        default="cnn",
        metavar="NAME",
        help="zoo model: mlp, cnn, lenet or vgg11-bn (default cnn)",
    )
    ens.add_argument(
        "--dataset",
        default="digits",
        metavar="NAME",
        help="digits (embedded), mnist, fashion-mnist or cifar10 (default digits)",
    )
    ens.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder of the dataset's files (MNIST/Fashion-MNIST: the IDX files; CIFAR-10: "
        "the python batches)",
    )
    ens.add_argument("--num-models", type=int, metavar="N", help="models to train (default 4)")
    ens.add_argument(
        "--split",
        default="same",
        metavar="SPLIT",
        help="how the training set is dealt out: same, iid, label-skew or dirichlet(ALPHA) "
        "(default same)",
    )
    ens.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    ens.add_argument(
        "--finetune-epochs",
        type=int,
        default=1,
        metavar="F",
        help="fine-tuning epochs of each fused model (default 1; 0: one-shot only)",
    )
    ens.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    ens.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    ens.add_argument(
        "--repair",
        metavar="{reset_bn,repair}",
        help="re-estimate activation statistics after averaging (on 512 training images)",
    )
    ens.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="FILE",
        help="state dicts of --model (.pt/.pth via torch.load(weights_only=True), or "
        ".safetensors) instead of training",
    )
    _add_report_options(ens, ENSEMBLE_FOLDER)


FL_ENGINES = ("local", "flower", "deployment")
FL_DEFAULT_ROOT = Path("qapfuse-fl")


def _add_fl_parser(sub: Any, verbose: argparse.ArgumentParser) -> None:
    fl = sub.add_parser(
        "fl",
        parents=[verbose],
        help="federated learning with graph-matching aggregation",
        description=(
            "Federated learning: K clients with their own data split, R rounds of local "
            "training, the server aggregates with each of --aggregators (fedavg, gamf, weight, "
            "merge_many, c2m3), each from the same start. Engines: local (in process), flower "
            "(Flower's simulation engine, Ray backend), deployment (a Flower SuperLink and K "
            "SuperNodes on 127.0.0.1, insecure mode). Writes rounds.csv and accuracy.png to a "
            "new folder qapfuse-fl/fl-DATE-TIME or --out DIR (not over an existing report "
            "without --force); prints the final accuracy per aggregator."
        ),
    )
    fl.add_argument("--dataset", default="digits", help="digits, mnist, fashion-mnist or cifar10")
    fl.add_argument("--data-root", metavar="DIR", help="folder of the dataset's files")
    fl.add_argument("--clients", type=int, default=5, help="number of clients (default 5)")
    fl.add_argument("--rounds", type=int, default=10, help="communication rounds (default 10)")
    fl.add_argument(
        "--split", default="dirichlet", help="iid, dirichlet or label-skew (default dirichlet)"
    )
    fl.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)"
    )
    fl.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    fl.add_argument(
        "--fraction", type=float, default=1.0, help="fraction of clients per round (default 1)"
    )
    fl.add_argument(
        "--one-shot",
        action="store_true",
        help=(
            "round 1: each client trains from its own initialisation and the server fuses "
            "them; later rounds are FedAvg fine-tuning from the fused model (--rounds 1: "
            "fusion only)"
        ),
    )
    fl.add_argument(
        "--repair",
        default=None,
        help=(
            "with --one-shot: repair the fused model's activation statistics on server images: "
            "repair (REPAIR) or reset_bn (BatchNorm models); local engine only"
        ),
    )
    fl.add_argument(
        "--repair-samples",
        type=int,
        default=256,
        help="training images the server holds for --repair (default 256)",
    )
    fl.add_argument(
        "--aggregators", default="fedavg,gamf,weight", help="comma-separated (default %(default)s)"
    )
    fl.add_argument("--model", default="mlp", help="mlp, cnn or vgg11-bn (default mlp)")
    fl.add_argument(
        "--hidden", default="128,64", help="hidden widths of the MLP (default %(default)s)"
    )
    fl.add_argument("--lr", type=float, default=1e-3, help="local Adam learning rate")
    fl.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    fl.add_argument("--engine", default="local", help="local, flower or deployment")
    fl.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fl.add_argument("--out", type=Path, metavar="DIR", help="report folder")
    fl.add_argument("--force", action="store_true", help="overwrite an existing report in --out")


# ----------------------------------------------------------------------------------------------
# solve
# ----------------------------------------------------------------------------------------------


def _check_name(value: str, what: str, choices: Sequence[str]) -> str:
    if value in choices:
        return value
    close = difflib.get_close_matches(value, list(choices), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CliError(f"unknown {what} {value!r} (choose from {', '.join(choices)}){hint}")


def _resolve_path(args: argparse.Namespace) -> Path:
    from .io import qaplib

    if args.example is not None and args.file is not None:
        raise CliError("give either FILE.dat or --example NAME, not both")
    if args.example is not None:
        try:
            return qaplib.example_path(args.example)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.file is None:
        raise CliError(
            f"missing FILE.dat (or --example NAME; shipped: {', '.join(qaplib.list_examples())})"
        )
    path = Path(args.file)
    if not path.exists():
        raise CliError(f"no such file: {args.file!r}")
    if not path.is_file():
        raise CliError(f"not a file: {args.file!r}")
    return path


def _coerce_option(key: str, raw: str, kind: str, allow_none: bool) -> Any:
    """The value of ``-O key=raw`` in the type that the method declares for `key`."""
    if allow_none and raw.lower() == "none":
        return None
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise CliError(f"-O {key} must be {what}; got {raw!r}") from None
    if kind == "bool":
        if raw.lower() not in _TRUE + _FALSE:
            raise CliError(f"-O {key} must be true or false; got {raw!r}")
        return raw.lower() in _TRUE
    if kind == "array":
        raise CliError(f"-O {key}: an array cannot be given on the command line")
    return raw


def _method_options(pairs: Sequence[str], method: str) -> dict[str, Any]:
    """``-O KEY=VALUE`` pairs as keyword options of `method`, typed by its declared options.

    Unknown keys pass through as text, so that ``solve`` refuses them with its own message
    (valid names and the closest match).
    """
    from .solvers import METHODS

    declared = METHODS[method].options
    options: dict[str, Any] = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"-O expects KEY=VALUE, e.g. -O max_inner=60; got {text!r}")
        if key in _FLAG_OF:
            raise CliError(f"-O {key}: use {_FLAG_OF[key]} instead")
        opt = declared.get(key)
        options[key] = raw if opt is None else _coerce_option(key, raw, opt.kind, opt.allow_none)
    return options


def _in_cli_terms(message: str, options: Sequence[str]) -> str:
    """A library error message with parameter names replaced by the flags the user typed."""

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in _FLAG_OF:
            return f"{_FLAG_OF[name]} "
        return f"-O {name} " if name in options else match.group(0)

    message = _PARAMETER_RE.sub(flag, message)
    return _UNKNOWN_OPTION_RE.sub(r"-O: --method \1 has no option(s)", message)


def _run_solve(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from . import Problem, solve
    from .io import qaplib
    from .solvers import METHODS

    method = _check_name(args.method, "method", list(METHODS))
    refine = None if args.refine is None else _check_name(args.refine, "refine", REFINERS)
    options = _method_options(args.options, method)
    if not (args.time_limit > 0 and math.isfinite(args.time_limit)):
        raise CliError(f"--time-limit must be a positive number of seconds; got {args.time_limit}")
    if args.restarts < 1:
        raise CliError(f"--restarts must be an integer >= 1; got {args.restarts}")
    path = _resolve_path(args)
    if args.sln is not None and not Path(args.sln).is_file():
        raise CliError(f"no such file: {args.sln!r}")

    log.info("reading %s", path)
    try:
        inst = qaplib.load_instance(path, sln=args.sln)
        problem = Problem.from_qaplib(path, sln=args.sln)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if inst.sln_path is not None:
        log.info("best known value %s (from %s)", inst.best_known, inst.sln_path)
    log.info(
        "solving %s (n = %d) with method %r%s, time limit %g s, %d restart(s), seed %d",
        inst.name,
        inst.n,
        method,
        "" if refine is None else f" + {refine}",
        args.time_limit,
        args.restarts,
        args.seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = solve(
                problem,
                method,
                refine=refine,
                rng=args.seed,
                time_limit=args.time_limit,
                restarts=args.restarts,
                **options,
            )
        except NotImplementedError:
            raise CliError(
                f"method {method!r}{'' if refine is None else f' + {refine!r}'} is not "
                "available in this build yet; try --method ga"
            ) from None
        except (ValueError, TypeError) as exc:
            raise CliError(_in_cli_terms(str(exc), list(options))) from None
    _report_warnings(caught, verbose=args.verbose)

    perm = np.asarray(res.permutation, dtype=np.int64)
    if perm.shape != (inst.n,) or not np.array_equal(np.sort(perm), np.arange(inst.n)):
        raise CliError(f"method {method!r} returned no full permutation: {perm.tolist()}")
    value = qaplib.objective(inst.A, inst.B, perm)  # exact, in the file's own number type
    gap = None if inst.best_known is None else qaplib.relative_gap(value, inst.best_known)
    log.info("done in %.3f s: objective %s", res.time, value)
    log.debug(
        "%d iteration(s), converged %s; info: %s",
        res.n_iter,
        res.converged,
        ", ".join(f"{k}={v}" for k, v in res.info.items() if isinstance(v, (int, float, str))),
    )
    best_known: int | float | None = inst.best_known
    if best_known is not None and float(best_known).is_integer():
        best_known = int(best_known)
    return {
        "instance": inst.name,
        "path": str(path),
        "n": inst.n,
        "method": method,
        "refine": refine,
        "objective": value,
        "best_known": best_known,
        "gap": gap,
        "time": float(res.time),
        "time_limit": args.time_limit,
        "restarts": int(res.info.get("restarts", args.restarts)),
        "seed": args.seed,
        "options": options,
        "sln": None if inst.sln_path is None else str(inst.sln_path),
        "permutation": (perm + 1).tolist(),
    }


def _report_warnings(caught: list[warnings.WarningMessage], *, verbose: int) -> None:
    if not caught:
        return
    if verbose:
        for w in caught:
            log.warning("%s: %s", w.category.__name__, str(w.message).replace("\n", " "))
        return
    kinds = sorted({w.category.__name__ for w in caught})
    log.warning(
        "%d solver warning(s) (%s); rerun with -v to see them", len(caught), ", ".join(kinds)
    )


def _format_text(out: dict[str, Any]) -> str:
    method = out["method"] + ("" if out["refine"] is None else f" + {out['refine']}")
    options = "".join(f", {k}={v}" for k, v in out["options"].items())
    lines = [
        f"instance     {out['instance']} ({out['path']})",
        f"n            {out['n']}",
        f"method       {method} (seed {out['seed']}, restarts {out['restarts']}{options})",
        f"objective    {out['objective']}",
    ]
    if out["best_known"] is not None:
        lines.append(f"best known   {out['best_known']} (from {out['sln']})")
        gap = out["gap"]
        lines.append(f"gap          {gap:.3%}" if math.isfinite(gap) else f"gap          {gap}")
    lines.append(f"time         {out['time']:.3f} s (limit {out['time_limit']:g} s)")
    lines.append(f"permutation  {' '.join(map(str, out['permutation']))}")
    return "\n".join(lines)


def _json_safe(out: dict[str, Any]) -> dict[str, Any]:
    # JSON has no inf/nan: an undefined gap (best known 0, value > 0) becomes null.
    safe = dict(out)
    if safe["gap"] is not None and not math.isfinite(safe["gap"]):
        safe["gap"] = None
    return safe


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------


def _run_bench(args: argparse.Namespace) -> int:
    try:
        bench = importlib.import_module("qapfuse.bench")  # lazy: heavy optional deps
    except ModuleNotFoundError as exc:
        if exc.name != "qapfuse.bench":
            raise
        raise CliError("the benchmark runner (qapfuse.bench) is not installed") from None
    runner = getattr(bench, "main", None)
    if runner is None:
        raise CliError("the benchmark runner (qapfuse.bench) has no main() in this build")
    suites = getattr(bench, "SUITES", None)
    if suites is not None:
        _check_name(args.suite, "benchmark suite", suites)
    log.debug("running benchmark suite %r with %s", args.suite, args.args)
    code = runner([args.suite, *args.args])
    return int(code or 0)


# ----------------------------------------------------------------------------------------------
# demo and ensemble
# ----------------------------------------------------------------------------------------------


def _methods(raw: Sequence[str] | None) -> list[str] | None:
    """``--methods a b`` or ``--methods a,b``, each checked against the alignment methods."""
    from .fusion.align import METHODS

    if raw is None:
        return None
    names = [m for token in raw for m in token.split(",") if m]
    if not names:
        raise CliError("--methods needs at least one method")
    return [_check_name(m, "method in --methods", METHODS) for m in names]


def _check_count(value: int | None, flag: str, low: int) -> None:
    if value is not None and value < low:
        raise CliError(f"{flag} must be an integer >= {low}; got {value}")


def _report_folder(args: argparse.Namespace, default_folder: str) -> Path:
    """The report folder; refuses (before any work) one that holds a report, unless --force."""
    import datetime as dt

    from .fusion.ensemble import report_files

    out: Path = args.out
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(f"{default_folder}-{stamp}")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is not a folder")
    existing = [str(p) for p in report_files(out, args.command).values() if p.exists()]
    if existing and not args.force:
        raise CliError(
            f"report files exist already: {', '.join(existing)}; pass --force to overwrite "
            "them, or choose another folder with --out"
        )
    return out


class _TorchThreads:
    """Set torch's CPU thread count inside a ``with`` block (None: leave it)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.old = n, None

    def __enter__(self) -> None:
        import torch

        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.old is not None:
            torch.set_num_threads(self.old)


def _load_data(args: argparse.Namespace) -> Any:
    from .fusion.data import DATASETS, IDX_FILES, load_dataset

    name = _check_name(args.dataset, "dataset", DATASETS)
    if name != "digits" and args.data_root is None:
        files = (
            "the python batches data_batch_1 .. data_batch_5 and test_batch"
            if name == "cifar10"
            else ", ".join(IDX_FILES.values()) + " (or .gz)"
        )
        raise CliError(f"--dataset {name} is read from files: give --data-root DIR, the folder "
                       f"that holds {files}")  # fmt: skip
    if name == "digits" and args.data_root is not None:
        raise CliError("--data-root is not used by --dataset digits (embedded in scikit-learn)")
    try:
        return load_dataset(name, args.data_root, seed=args.seed)
    except (OSError, ValueError) as exc:
        raise CliError(f"--data-root: {exc}") from None


def _load_checkpoints(args: argparse.Namespace, data: Any) -> list[Any]:
    from .fusion.checkpoints import CheckpointError, check_compatible, load_into, load_state_dict
    from .fusion.ensemble import build_model

    if len(args.checkpoints) < 2:
        raise CliError(f"--checkpoints needs at least 2 files; got {len(args.checkpoints)}")
    try:
        state_dicts = [load_state_dict(p) for p in args.checkpoints]
        reference = build_model(args.model, data.input_shape, data.num_classes)
        check_compatible(state_dicts, reference, names=args.checkpoints,
                         model_name=f"--model {args.model} on {data.name}")  # fmt: skip
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:  # e.g. lenet on 8x8 images
        raise CliError(f"--model {args.model}: {exc}") from None
    models = []
    for sd in state_dicts:
        model = build_model(args.model, data.input_shape, data.num_classes)
        models.append(load_into(model, sd))
    return models


def _run_fusion(args: argparse.Namespace) -> int:
    """``qapfuse demo`` and ``qapfuse ensemble``: check everything, run, then write."""
    demo = args.command == "demo"
    methods = _methods(args.methods)
    _check_count(args.epochs, "--epochs", 1)
    _check_count(args.finetune_epochs, "--finetune-epochs", 0)
    _check_count(args.threads, "--threads", 1)
    if args.seed < 0:
        raise CliError(f"--seed must be an integer >= 0; got {args.seed}")
    try:
        from .fusion import ensemble
        from .fusion.data import split_dataset
    except ModuleNotFoundError as exc:
        raise CliError(f"{args.command} needs {exc.name}: pip install 'qapfuse[fusion]'") from None

    if demo:
        args.model, args.dataset, args.data_root = "mlp", "digits", None
        args.split, args.num_models, args.checkpoints, args.repair = "label-skew", 2, None, None
        args.lr, args.batch_size = 1e-3, 64
        if args.threads is None:
            args.threads = 1
        alphas = ensemble.DEFAULT_ALPHAS
        if args.quick:
            args.epochs, args.finetune_epochs, alphas = 10, 0, (0.0, 0.5, 1.0)
    else:
        _check_name(args.model, "model", list(ensemble.ZOO))
        if args.checkpoints and args.num_models is not None:
            raise CliError("give --num-models (models to train) or --checkpoints, not both")
        if not args.checkpoints:
            if args.num_models is None:
                args.num_models = DEFAULT_NUM_MODELS
            _check_count(args.num_models, "--num-models", 2)
        _check_count(args.batch_size, "--batch-size", 1)
        if not (args.lr > 0 and math.isfinite(args.lr)):
            raise CliError(f"--lr must be a positive number; got {args.lr}")
        if args.repair is not None:
            _check_name(args.repair, "--repair", ("reset_bn", "repair"))
        alphas = ensemble.DEFAULT_ALPHAS
    out = _report_folder(args, DEMO_FOLDER if demo else ENSEMBLE_FOLDER)
    data = _load_data(args)
    progress = args.quiet == 0

    with _TorchThreads(args.threads):
        if args.checkpoints:
            models = _load_checkpoints(args, data)
            log.info("loaded %d checkpoints of --model %s", len(models), args.model)
        else:
            try:
                ensemble.build_model(args.model, data.input_shape, data.num_classes)
                parts = split_dataset(data, args.num_models, args.split, rng=args.seed)
            except ValueError as exc:
                flag = "--split" if "split" in str(exc) else f"--model {args.model}"
                raise CliError(f"{flag}: {exc}") from None
            models = ensemble.train_models(
                args.model, data, parts, epochs=args.epochs, lr=args.lr,
                batch_size=args.batch_size, seed=args.seed, progress=progress,
            )  # fmt: skip
        test = (ensemble.model_inputs(args.model, data.x_test), data.y_test)
        train_data = (ensemble.model_inputs(args.model, data.x_train), data.y_train)
        try:
            result = ensemble.compact_ensemble(
                models, test, train_data=train_data,
                methods=methods or list(ensemble.METHODS), finetune_epochs=args.finetune_epochs,
                alphas=alphas, repair=args.repair, lr=args.lr, batch_size=args.batch_size,
                seed=args.seed, progress=progress,
            )  # fmt: skip
        except (ValueError, TypeError) as exc:  # e.g. a model the tracer cannot align
            raise CliError(str(exc)) from None
    result.settings.update(
        command=_command_line(args),
        model=args.model,
        dataset=data.name,
        split=None if args.checkpoints else args.split,
        epochs=None if args.checkpoints else args.epochs,
        checkpoints=args.checkpoints,
    )
    title = f"{data.name}, {args.model}: {len(models)} models" + (
        "" if args.checkpoints else f", split {args.split}"
    )
    files = ensemble.write_report(result, out, stem=args.command, title=title)
    print(ensemble.format_table(result))
    print()
    if "plot" in files:
        print(f"interpolation plot: {files['plot']}")
    else:
        print("interpolation plot: not drawn (needs matplotlib: pip install 'qapfuse[bench]')")
    print(f"report written to {out}/: {', '.join(p.name for p in files.values())}", flush=True)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    import shlex

    return shlex.join(["qapfuse", *args.argv])


# ----------------------------------------------------------------------------------------------
# fl
# ----------------------------------------------------------------------------------------------


def _fl_output(args: argparse.Namespace) -> Path:
    if args.out is None:
        import datetime as _dt

        args.out = FL_DEFAULT_ROOT / f"fl-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} is not a folder")
    if (out / "rounds.csv").exists() and not args.force:
        raise CliError(
            f"a report exists already in {out}; pass --force to overwrite it, or choose "
            "another folder with --out"
        )
    return out


def _fl_config(args: argparse.Namespace, aggregators: list[str]) -> dict[str, Any]:
    root = "" if args.data_root is None else str(Path(args.data_root).resolve())
    return {
        "dataset": args.dataset,
        "data-root": root,
        "model": args.model,
        "hidden": args.hidden,
        "split": args.split,
        "alpha": args.alpha,
        "num-clients": args.clients,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "fraction-train": args.fraction,
        "aggregator": aggregators[0],
        "one-shot": args.one_shot,
        "lr": args.lr,
        "batch-size": args.batch_size,
        "seed": args.seed,
        "metrics-file": "",
    }


def _run_fl(args: argparse.Namespace) -> int:
    _check_name(args.engine, "engine", FL_ENGINES)
    aggregators = [a.strip() for a in args.aggregators.split(",") if a.strip()]
    try:
        hidden = tuple(int(v) for v in args.hidden.split(",") if v.strip())
    except ValueError:
        raise CliError(f"--hidden must be comma-separated integers; got {args.hidden!r}") from None
    try:
        from .fusion import federated
    except ModuleNotFoundError as exc:
        raise CliError(str(exc)) from None
    for name in aggregators:
        _check_name(name, "aggregator", federated.AGGREGATORS)
    if not aggregators:
        raise CliError("--aggregators is empty")
    if args.repair is not None:
        from .fusion.fuse import REPAIRS

        _check_name(args.repair, "repair", REPAIRS)
        if not args.one_shot:
            raise CliError("--repair applies to the one-shot round: add --one-shot")
        if args.engine != "local":
            raise CliError(f"--repair runs on the local engine only; got --engine {args.engine}")
    out = _fl_output(args)
    start = time.perf_counter()
    try:
        if args.engine == "local":
            from .fusion.data import load_dataset

            data = load_dataset(args.dataset, args.data_root, seed=args.seed)
            show = sys.stderr.isatty() and args.quiet == 0
            result = federated.run_federated(
                data,
                clients=args.clients,
                rounds=args.rounds,
                local_epochs=args.local_epochs,
                split=args.split,
                alpha=args.alpha,
                fraction=args.fraction,
                aggregators=aggregators,
                one_shot=args.one_shot,
                model=args.model,
                hidden=hidden,
                lr=args.lr,
                batch_size=args.batch_size,
                seed=args.seed,
                progress=show,
                repair=args.repair,
                repair_samples=args.repair_samples,
            )
        else:
            config = _fl_config(args, aggregators)
            _check_fl_config(config, federated)
            if args.engine == "flower":
                from .fusion.flower import simulate

                flwr_log = logging.getLogger("flwr")
                old_level = flwr_log.level
                if args.verbose == 0:  # Flower's own per-round log: with -v only
                    flwr_log.setLevel(logging.WARNING)
                try:
                    result = simulate(config, aggregators=aggregators)
                finally:
                    flwr_log.setLevel(old_level)
            else:
                from .fusion.deployment import run_deployment

                result = run_deployment(config, aggregators=aggregators)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise CliError(_in_fl_terms(str(exc))) from None
    except RuntimeError as exc:  # a failed Flower run (DeploymentError) or simulation
        raise CliError(f"the {args.engine} run failed: {exc}") from None
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    paths = federated.write_report(result, out)
    print(f"report written to {out}/: {', '.join(p.name for p in paths)}")
    print(f"engine {args.engine}: {wall:.1f} s")
    for name in [*aggregators, *(["ensemble"] if args.one_shot else [])]:
        rows = [r for r in result.records if r["aggregator"] == name]
        if rows:
            print(
                f"{name:>10}: final accuracy {rows[-1]['accuracy']:.4f} (round {rows[-1]['round']})"
            )
    return 0


def _check_fl_config(config: dict[str, Any], federated: Any) -> None:
    """The checks the in-process loop makes, before any Flower process starts."""
    from .fusion.data import load_dataset

    data = load_dataset(config["dataset"], config["data-root"] or None, seed=config["seed"])
    federated.client_splits(
        data.y_train, config["num-clients"], config["split"], config["alpha"], config["seed"]
    )
    for key in ("num-server-rounds", "local-epochs"):
        if config[key] < 1:
            raise ValueError(f"--{key.replace('num-server-', '')} must be >= 1; got {config[key]}")
    if not 0 < config["fraction-train"] <= 1:
        raise ValueError(f"--fraction must be in (0, 1]; got {config['fraction-train']}")
    _check_name(config["model"], "model", federated.MODELS)


_FL_FLAGS = {
    "clients": "--clients",
    "alpha": "--alpha",
    "rounds": "--rounds",
    "local_epochs": "--local-epochs",
    "fraction": "--fraction",
    "split": "--split",
    "seed": "--seed",
    "model": "--model",
    "name": "--dataset",
    "root": "--data-root",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "aggregators": "--aggregators",
    "repair_samples": "--repair-samples",
    "repair": "--repair",
}


def _in_fl_terms(message: str) -> str:
    """Name the flag a user typed instead of the library's parameter."""

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        return _FL_FLAGS.get(name, match.group(0))

    message = re.sub(r"The '(\w+)' parameter of \S+", lambda m: flag(m), message)
    return re.sub(r"`(\w+)`", lambda m: _FL_FLAGS.get(m.group(1), m.group(0)), message)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    """``qapfuse: warning: ...``: lower-case level names, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return " ".join(super().format(record).split("\n"))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured)
        pass


def _split_verbosity(tokens: Sequence[str]) -> tuple[list[str], int, int]:
    """Take ``-v``/``-q`` out of a suite's arguments: they are the command's, wherever they stand.

    Returns the remaining tokens and the counts of ``-v`` and ``-q`` (``-vv`` counts twice).
    Tokens after ``--`` are left alone.
    """
    rest: list[str] = []
    verbose = quiet = 0
    for k, tok in enumerate(tokens):
        if tok == "--":
            rest += tokens[k:]
            break
        if _VERBOSITY_FLAGS.fullmatch(tok):
            if tok in ("--verbose", "--quiet"):
                verbose, quiet = verbose + (tok == "--verbose"), quiet + (tok == "--quiet")
            elif tok[1] == "v":
                verbose += len(tok) - 1
            else:
                quiet += len(tok) - 1
        else:
            rest.append(tok)
    return rest, verbose, quiet


def _log_level(command: str, verbose: int, quiet: int) -> int:
    """``-q``: errors only. ``bench``, ``demo`` and ``ensemble`` show progress (INFO) by
    default, ``solve`` from ``-v``; ``-vv`` (``-v`` for those) adds DEBUG detail."""
    if quiet > 0:
        return logging.ERROR
    steps = verbose + (1 if command in ("bench", "demo", "ensemble", "fl") else 0)
    return logging.WARNING if steps <= 0 else logging.INFO if steps == 1 else logging.DEBUG


def _setup_logging(level: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("qapfuse: %(levelname)s: %(message)s"))
    logger = logging.getLogger("qapfuse")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qapfuse`` command; return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 on a usage or input error (one line ``qapfuse: error: ...`` on
        stderr), or the benchmark runner's status for ``qapfuse bench``.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if args.command is None:
        print(
            "qapfuse: error: a command is required: demo, ensemble, solve, bench or fl "
            "(see 'qapfuse --help')",
            file=sys.stderr,
        )
        return EXIT_USAGE

    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.verbose += args.sub_verbose
    args.quiet += args.sub_quiet
    if args.command == "bench":
        args.args, more_verbose, more_quiet = _split_verbosity(args.args)
        args.verbose += more_verbose
        args.quiet += more_quiet
    logger = logging.getLogger("qapfuse")
    old_level = logger.level
    handler = _setup_logging(_log_level(args.command, args.verbose, args.quiet))
    try:
        if args.command == "bench":
            return _run_bench(args)
        if args.command in ("demo", "ensemble"):
            return _run_fusion(args)
        if args.command == "fl":
            return _run_fl(args)
        out = _run_solve(args)
        if args.json:
            print(json.dumps(_json_safe(out), allow_nan=False))
        else:
            print(_format_text(out))
        return 0
    except CliError as exc:
        print(f"qapfuse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `qapfuse solve ... | head -c 100`
        _silence_stdout()
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
