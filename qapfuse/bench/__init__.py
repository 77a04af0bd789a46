"""Benchmark runners behind ``qapfuse bench SUITE [options]``.

Suites
------
gm
    Graph matching on random graph pairs: pygmtools vs qapfuse, the same algorithm side by side
    (:mod:`qapfuse.bench.gm`).
qaplib
    The QAPLIB instances: qapfuse methods vs ``scipy.optimize.quadratic_assignment`` and
    pygmtools (:mod:`qapfuse.bench.qaplib`).
mgm
    Multi-graph matching: qapfuse ``gamgm`` vs pygmtools' multi-graph solvers
    (:mod:`qapfuse.bench.mgm`).
affinity
    Building affinities vs pygmtools, and graph matching end to end at scale
    (:mod:`qapfuse.bench.affinity`).

Each suite writes a CSV and a Markdown report (with the command that produced it, the machine
and the date) into ``--out`` (default ``docs/benchmarks/``). ``--quick`` runs a tiny version
(the smoke test). pygmtools is needed only by the benchmarks, never by the library.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["SUITES", "main"]

SUITES = ("gm", "qaplib", "mgm", "affinity")

log = logging.getLogger("qapfuse.bench")


def main(argv: Sequence[str]) -> int:
    """Run the suite named by ``argv[0]`` with the options that follow; return an exit code."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    suite, rest = argv[0], argv[1:]
    if not log.hasHandlers():  # run outside the CLI: show progress
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if suite == "gm":
        from .gm import run
    elif suite == "qaplib":
        from .qaplib import run
    elif suite == "mgm":
        from .mgm import run
    elif suite == "affinity":
        from .affinity import run
    else:
        log.error("unknown benchmark suite %r; choose one of %s", suite, ", ".join(SUITES))
        return 2
    return int(run(rest))
