"""The ``qapfuse`` command.

Subcommands:

* ``qapfuse solve FILE.dat`` (or ``--example NAME``) -- solve a QAPLIB instance and print the
  objective, the gap to the best known value and the permutation (1-indexed, as QAPLIB writes
  it); ``--json`` prints one JSON object instead.
* ``qapfuse bench SUITE [args...]`` -- run a benchmark suite (``qapfuse.bench``); the report
  goes to a new folder (or ``--out``), never over an existing one without ``--force``.

Errors (missing or malformed files, bad options) print one line ``qapfuse: error: ...`` on
stderr and exit with status 2; a library error about a parameter names the command-line flag
(``--seed``, not ``rng``). Progress goes to stderr through :mod:`logging`: ``bench`` reports one
line per measured row by default, ``solve`` its steps with ``-v``; ``-vv`` adds debug detail and
``-q`` leaves errors only. ``-v`` and ``-q`` may stand before or after the subcommand.
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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

log = logging.getLogger("qapfuse.cli")

DEFAULT_METHOD = "auto"
DEFAULT_TIME_LIMIT = 2.0
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
        description="Quadratic assignment and graph matching solvers (qapfuse).",
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
        help="run a benchmark suite (gm, qaplib, mgm, affinity, fusion)",
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
        "suite", metavar="SUITE", help="benchmark suite: gm, qaplib, mgm, affinity or fusion"
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the suite")
    return parser


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
    from . import METHODS

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

    from . import METHODS, Problem, solve
    from .io import qaplib

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
    """``-q``: errors only. ``bench`` shows progress (INFO) by default, ``solve`` from ``-v``;
    ``-vv`` (``-v`` for bench) adds DEBUG detail."""
    if quiet > 0:
        return logging.ERROR
    steps = verbose + (1 if command == "bench" else 0)
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
            "qapfuse: error: a command is required: solve or bench (see 'qapfuse --help')",
            file=sys.stderr,
        )
        return EXIT_USAGE

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
