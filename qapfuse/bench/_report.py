"""Shared pieces of the benchmark runners: options, timing, machine info, CSV and Markdown."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import logging
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("qapfuse.bench")

__all__ = [
    "DEFAULT_ROOT",
    "SuiteParser",
    "announce",
    "blas_threads",
    "command_line",
    "fmt",
    "machine_info",
    "markdown_table",
    "median",
    "prepare_output",
    "suite_parser",
    "timed",
    "write_csv",
]

#: Parent of the default report folders, relative to the working directory.
DEFAULT_ROOT = Path("qapfuse-bench")
EXIT_USAGE = 2


class SuiteParser(argparse.ArgumentParser):
    """Options of one suite: a usage error is one line ``qapfuse: error: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"qapfuse: error: {message} (see '{self.prog} --help')\n")


def suite_parser(suite: str, description: str) -> SuiteParser:
    """The parser of ``qapfuse bench SUITE`` with the output options every suite shares.

    ``--out`` (default: a new folder ``qapfuse-bench/<suite>-<date>-<time>`` in the working
    directory), ``--name`` (file stem, default `suite`) and ``--force`` (overwrite an existing
    report); see :func:`prepare_output`.
    """
    p = SuiteParser(prog=f"qapfuse bench {suite}", description=description)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"report folder (default: a new folder {DEFAULT_ROOT}/{suite}-YYYYMMDD-HHMMSS)",
    )
    p.add_argument("--name", default=suite, help=f"file stem of the report (default {suite!r})")
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    return p


def prepare_output(
    parser: argparse.ArgumentParser, args: argparse.Namespace, suite: str, suffixes: Sequence[str]
) -> list[Path]:
    """Settle ``args.out`` and refuse to overwrite a report; return the report's paths.

    Without ``--out`` the report goes to a new folder named by suite and time. The files
    ``<out>/<name><suffix>`` must not exist unless ``--force`` is given: a committed report is
    never replaced by accident. Called before any measurement, so a refusal costs nothing.
    """
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = DEFAULT_ROOT / f"{suite}-{stamp}"
    out: Path = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} is not a folder")
    paths = [out / f"{args.name}{suffix}" for suffix in suffixes]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.force:
        parser.error(
            f"report files exist already: {', '.join(existing)}; pass --force to overwrite "
            "them, or choose another folder with --out"
        )
    return paths


def announce(paths: Sequence[Path | None]) -> None:
    """Say where the report went: one line on stdout (the command's result, kept under -q)."""
    written = [p for p in paths if p is not None and p.exists()]
    if written:
        folder = written[0].parent
        print(f"report written to {folder}/: {', '.join(p.name for p in written)}", flush=True)


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call of `func` and its result."""
    t0 = time.perf_counter()
    out = func()
    return time.perf_counter() - t0, out


def median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN if there are none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def command_line(suite: str, args: Sequence[str]) -> str:
    """The command that reproduces a run: ``qapfuse bench SUITE ARGS``."""
    return shlex.join(["qapfuse", "bench", suite, *args])


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[str]:
    """Limit BLAS/OpenMP threads to `n` (via threadpoolctl) inside the block; yields a summary.

    Both libraries under comparison run in this process on numpy, so they share the same BLAS
    and the same thread count.
    """
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn/scipy stacks
        yield "threadpoolctl not installed: BLAS threads left at their defaults"
        return
    ctx = threadpoolctl.threadpool_limits(limits=n) if n is not None else contextlib.nullcontext()
    with ctx:
        pools = threadpoolctl.threadpool_info()
        text = ", ".join(
            f"{p.get('internal_api', '?')} {p.get('version', '')}: {p.get('num_threads')} threads"
            for p in pools
        )
        yield text or "no BLAS thread pools found"


def machine_info(threads_note: str) -> dict[str, str]:
    """Date, machine and library versions for a report header."""
    import numpy
    import scipy

    info = {
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {_cpu_name()}, {os.cpu_count()} logical CPUs",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy / scipy": f"{numpy.__version__} / {scipy.__version__}",
        "threads": threads_note,
    }
    for mod in ("torch", "numba", "pygmtools"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = "not installed"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(value: Any, digits: int = 3) -> str:
    """Short text for a table cell: floats to `digits` significant digits, NaN/None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** (digits + 2) or abs(value) < 1e-4:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write `rows` (dicts) with the given column order; missing values stay empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in row.items()
                }
            )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(lines)


def header_block(title: str, command: str, info: dict[str, str], notes: Sequence[str]) -> str:
    """Report preamble: title, the exact command, machine info and notes."""
    parts = [f"# {title}", "", "Produced by:", "", "```", command, "```", ""]
    parts += [f"- **{k}**: {v}" for k, v in info.items()]
    parts.append("")
    parts += list(notes)
    return "\n".join(parts)


def save_plot(path: Path, draw: Callable[[Any], None]) -> Path | None:
    """Draw a figure with ``draw(plt)`` and save it as PNG; skip (with a log note) without
    matplotlib (``pip install 'qapfuse[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: %s not drawn (pip install 'qapfuse[bench]')", path)
        return None
    plt.close("all")
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    return path
