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
fusion
    Fusing trained networks: every alignment method of :func:`qapfuse.fusion.align` on the same
    models, one-shot, repaired and fine-tuned, with weight matching's noise floor
    (:mod:`qapfuse.bench.fusion`; needs torch and, for MNIST / Fashion-MNIST, their IDX files).
fl
    Federated learning: multi-round FedAvg vs matching aggregation (non-identity fraction,
    aggregation time), one-shot fusion of independently initialised clients then FedAvg, and
    an engine check against Flower (:mod:`qapfuse.bench.fl`).

Each suite writes a CSV and a Markdown report (with the command that produced it, the machine
and the date) into a new folder ``qapfuse-bench/<suite>-<date>-<time>/`` in the working
directory, or into ``--out DIR``; an existing report is never overwritten without ``--force``.
The last line on stdout says where the report went; progress goes to the ``qapfuse.bench``
logger, one line per measured row. ``--quick`` runs a tiny version (the smoke test). The suites
need ``pip install 'qapfuse[bench]'`` (pygmtools, the baseline; matplotlib, the plots); the
library never does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["SUITES", "main"]

SUITES = ("gm", "qaplib", "mgm", "affinity", "fusion", "fl")

log = logging.getLogger("qapfuse.bench")


def main(argv: Sequence[str]) -> int:
    """Run the suite named by ``argv[0]`` with the options that follow; return an exit code.

    Usage and input errors (unknown suite or option, missing data, a report that exists) print
    one line ``qapfuse: error: ...`` on stderr and return 2.
    """
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
    elif suite == "fusion":
        from .fusion import run
    elif suite == "fl":
        from .fl import run
    else:
        log.error("unknown benchmark suite %r; choose one of %s", suite, ", ".join(SUITES))
        return 2
    try:
        return int(run(rest))
    except SystemExit as exc:  # the suite's parser: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
