"""``qapfuse bench gm``: graph matching, pygmtools vs qapfuse, the same algorithm side by side.

For each size ``n`` and each case (an isomorphic pair and a noisy one) every repeat draws a new
pair of random weighted graphs (graph 2 is a node permutation of graph 1, with Gaussian noise
on the edge weights in the noisy case) and times, interleaved in one process:

* **pygmtools**: ``build_aff_mat`` with a Gaussian edge kernel (the construction), then the
  solver and ``pygmtools.hungarian`` on its soft output (the solve);
* **qapfuse, same dense K**: ``Problem.from_dense`` on pygmtools' ``K`` (the prep) and the
  solver (the solve);
* **qapfuse, Koopmans-Beckmann**: ``Problem.koopmans_beckmann(A1, A2)`` (inner-product edge
  kernel, ``K = kron(A2, A1)`` applied as ``A1 X A2^T``, never built) and the solver.

``sinkhorn`` and ``hungarian`` are compared on a random score matrix of the same size with the
same settings. Accuracy is the fraction of nodes matched as in the ground truth.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import warnings
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
    median,
    prepare_output,
    save_plot,
    suite_parser,
    timed,
    write_csv,
)

log = logging.getLogger("qapfuse.bench")

QAP_SOLVERS = ("rrwm", "ipfp", "sm", "ga")
LAP_SOLVERS = ("sinkhorn", "hungarian")
ALL_SOLVERS = QAP_SOLVERS + LAP_SOLVERS
CASES = ("isomorphic", "noisy")

COLUMNS = [
    "n",
    "case",
    "solver",
    "repeats",
    "pygm_build_s",
    "pygm_solve_s",
    "pygm_acc",
    "qf_dense_prep_s",
    "qf_dense_solve_s",
    "qf_dense_acc",
    "qf_dense_iter",
    "speedup_dense_solve",
    "speedup_dense_prep_solve",
    "qf_kb_build_s",
    "qf_kb_solve_s",
    "qf_kb_acc",
    "speedup_kb_total",
    "max_abs_diff",
]


def build_parser() -> argparse.ArgumentParser:
    p = suite_parser(
        "gm", "Graph matching benchmark: pygmtools vs qapfuse on the same graph pairs."
    )
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="node counts (10 30 50 100)")
    p.add_argument(
        "--solvers", nargs="+", default=list(ALL_SOLVERS), choices=ALL_SOLVERS, metavar="SOLVER"
    )
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, metavar="CASE")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (a new pair each)")
    p.add_argument("--density", type=float, default=0.5, help="edge probability")
    p.add_argument("--noise", type=float, default=0.05, help="std of the weight noise (noisy)")
    p.add_argument("--sigma", type=float, default=0.1, help="Gaussian edge kernel width")
    p.add_argument("--tau", type=float, default=0.05, help="Sinkhorn temperature (LAP rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="BLAS threads for both libraries")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    return p


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def graph_pair(
    n: int, noise: float, density: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric weighted graph ``A1``, its permuted (noisy) copy ``A2`` and the truth ``X``.

    ``X[i, a] = 1`` when node ``a`` of graph 2 is node ``i`` of graph 1. Weights are uniform in
    (0, 1); noise is added to the weights of existing edges only (the edge set is kept).
    """
    W = rng.random((n, n)) * (rng.random((n, n)) < density)
    A1 = np.triu(W, 1) + np.triu(W, 1).T
    perm = rng.permutation(n)  # node a of graph 2 is node perm[a] of graph 1
    A2 = A1[np.ix_(perm, perm)]
    if noise:
        E = rng.normal(scale=noise, size=(n, n))
        E = np.triu(E, 1) + np.triu(E, 1).T
        A2 = A2 + E * (A2 != 0)
    truth = np.zeros((n, n))
    truth[perm, np.arange(n)] = 1.0
    return A1, A2, truth


def _edges(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conn = np.argwhere(A != 0)
    return conn, A[conn[:, 0], conn[:, 1]][:, None]


def pygm_affinity(A1: np.ndarray, A2: np.ndarray, sigma: float) -> np.ndarray:
    """pygmtools' ``K`` (Gaussian edge kernel, no node term), construction included."""
    import pygmtools as pygm

    c1, e1 = _edges(A1)
    c2, e2 = _edges(A2)
    kern = functools.partial(pygm.utils.gaussian_aff_fn, sigma=sigma, backend="numpy")
    return pygm.utils.build_aff_mat(
        None,
        e1,
        c1,
        None,
        e2,
        c2,
        n1=np.array([A1.shape[0]]),
        n2=np.array([A2.shape[0]]),
        edge_aff_fn=kern,
        backend="numpy",
    )


# ---------------------------------------------------------------------------------------------
# solver calls
# ---------------------------------------------------------------------------------------------


def _pygm_solve(name: str, K: np.ndarray, n: int) -> np.ndarray:
    import pygmtools as pygm

    soft = getattr(pygm, name)(K, n, n, backend="numpy")
    return pygm.hungarian(soft, backend="numpy")


def _qf_solve(name: str, problem: Any) -> Any:
    from .. import solvers

    return getattr(solvers, name)(problem)


def _accuracy(X: Any, truth: np.ndarray) -> float:
    return float((np.asarray(X) * truth).sum() / truth.shape[0])


def _qap_rows(
    n: int, case: str, names: list[str], args: argparse.Namespace, repeats: int
) -> list[dict[str, Any]]:
    from ..problem import Problem

    noise = args.noise if case == "noisy" else 0.0
    rec: dict[str, dict[str, list[float]]] = {m: {} for m in names}

    def add(m: str, key: str, value: float) -> None:
        rec[m].setdefault(key, []).append(value)

    for rep in range(repeats):
        rng = np.random.default_rng([args.seed, n, CASES.index(case), rep])
        A1, A2, truth = graph_pair(n, noise, args.density, rng)
        t_build, K = timed(lambda A1=A1, A2=A2: pygm_affinity(A1, A2, args.sigma))
        for m in names:
            # alternate the order so neither library always runs on a warmer cache
            order = ("pygm", "dense", "kb") if rep % 2 == 0 else ("kb", "dense", "pygm")
            for side in order:
                if side == "pygm" and m != "ga":
                    t, X = timed(lambda m=m, K=K: _pygm_solve(m, K, n))
                    add(m, "pygm_build_s", t_build)
                    add(m, "pygm_solve_s", t)
                    add(m, "pygm_acc", _accuracy(X, truth))
                elif side == "dense":
                    t_prep, prob = timed(lambda K=K: Problem.from_dense(K, n, n))
                    t, res = timed(lambda m=m, prob=prob: _qf_solve(m, prob))
                    add(m, "qf_dense_prep_s", t_prep)
                    add(m, "qf_dense_solve_s", t)
                    add(m, "qf_dense_acc", _accuracy(res.X, truth))
                    add(m, "qf_dense_iter", res.n_iter)
                elif side == "kb":
                    t_kb, prob = timed(lambda A1=A1, A2=A2: Problem.koopmans_beckmann(A1, A2))
                    t, res = timed(lambda m=m, prob=prob: _qf_solve(m, prob))
                    add(m, "qf_kb_build_s", t_kb)
                    add(m, "qf_kb_solve_s", t)
                    add(m, "qf_kb_acc", _accuracy(res.X, truth))
        del K
    rows = []
    for m in names:
        r = rec[m]
        row: dict[str, Any] = {"n": n, "case": case, "solver": m, "repeats": repeats}
        for key, vals in r.items():
            row[key] = float(np.mean(vals)) if key.endswith(("_acc", "_iter")) else median(vals)
        _speedups(row)
        rows.append(row)
    return rows


def _speedups(row: dict[str, Any]) -> None:
    def ratio(a: Any, b: Any) -> float:
        if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
            return math.nan
        return a / b

    ps, pb = row.get("pygm_solve_s"), row.get("pygm_build_s")
    ds, dp = row.get("qf_dense_solve_s"), row.get("qf_dense_prep_s")
    kb, ks = row.get("qf_kb_build_s"), row.get("qf_kb_solve_s")
    row["speedup_dense_solve"] = ratio(ps, ds)
    row["speedup_dense_prep_solve"] = ratio(ps, None if ds is None else ds + (dp or 0.0))
    if pb is not None and ps is not None and kb is not None and ks is not None:
        row["speedup_kb_total"] = ratio(pb + ps, kb + ks)


def _lap_rows(
    n: int, names: list[str], args: argparse.Namespace, repeats: int
) -> list[dict[str, Any]]:
    import pygmtools as pygm
    from scipy.optimize import linear_sum_assignment

    from ..solvers import hungarian, sinkhorn

    rec: dict[str, dict[str, list[float]]] = {m: {} for m in names}
    for rep in range(repeats):
        rng = np.random.default_rng([args.seed, n, 7, rep])
        S = rng.random((n, n))
        r_opt, c_opt = linear_sum_assignment(S, maximize=True)
        exact = np.zeros((n, n))
        exact[r_opt, c_opt] = 1.0

        def agree(P: np.ndarray, exact: np.ndarray = exact) -> float:
            r, c = linear_sum_assignment(P, maximize=True)
            return float(exact[r, c].sum() / n)

        for m in names:
            if m == "sinkhorn":
                # the same algorithm and work: 10 row+column updates at temperature tau
                def f_p(S: np.ndarray = S) -> np.ndarray:
                    return pygm.sinkhorn(S, max_iter=20, tau=args.tau, backend="numpy")

                def f_q(S: np.ndarray = S) -> np.ndarray:
                    return sinkhorn(S, tau=args.tau, max_iter=10, tol=1e-12)
            else:

                def f_p(S: np.ndarray = S) -> np.ndarray:
                    return pygm.hungarian(S, backend="numpy")

                def f_q(S: np.ndarray = S) -> np.ndarray:
                    return hungarian(S)

            first, second = (f_p, f_q) if rep % 2 == 0 else (f_q, f_p)
            t1, o1 = timed(first)
            t2, o2 = timed(second)
            (tp, Pp), (tq, Pq) = ((t1, o1), (t2, o2)) if rep % 2 == 0 else ((t2, o2), (t1, o1))
            d = rec[m]
            d.setdefault("pygm_solve_s", []).append(tp)
            d.setdefault("qf_dense_solve_s", []).append(tq)
            d.setdefault("pygm_acc", []).append(agree(Pp))
            d.setdefault("qf_dense_acc", []).append(agree(Pq))
            d.setdefault("max_abs_diff", []).append(float(np.max(np.abs(Pp - Pq))))
    rows = []
    for m in names:
        d = rec[m]
        row: dict[str, Any] = {"n": n, "case": "random scores", "solver": m, "repeats": repeats}
        row["pygm_solve_s"] = median(d["pygm_solve_s"])
        row["qf_dense_solve_s"] = median(d["qf_dense_solve_s"])
        row["pygm_acc"] = float(np.mean(d["pygm_acc"]))
        row["qf_dense_acc"] = float(np.mean(d["qf_dense_acc"]))
        row["max_abs_diff"] = float(np.max(d["max_abs_diff"]))
        _speedups(row)
        rows.append(row)
    return rows


def _warm_up(args: argparse.Namespace) -> None:
    """First calls (imports, scipy/numpy first-use costs) outside the timed region."""
    sub = argparse.Namespace(**{**vars(args), "seed": args.seed + 999})
    qap = [m for m in args.solvers if m in QAP_SOLVERS]
    lap = [m for m in args.solvers if m in LAP_SOLVERS]
    for case in args.cases:
        if qap:
            _qap_rows(8, case, qap, sub, 1)
    if lap:
        _lap_rows(8, lap, sub, 1)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _ms(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 1e3 * x


def _x(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{fmt(x)}x"


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    at50 = [r for r in rows if r["n"] == 50 and r["solver"] in ("rrwm", "ipfp", "sm")]
    for r in at50:
        sp, pa, qa = r.get("speedup_dense_solve"), r.get("pygm_acc"), r.get("qf_dense_acc")
        ok = sp is not None and sp >= 3 and qa is not None and pa is not None and qa >= pa - 1e-12
        out.append(
            f"- n=50 {r['case']}, {r['solver']}, same dense K: {fmt(sp)}x faster "
            f"(solve; {fmt(r.get('speedup_dense_prep_solve'))}x counting Problem.from_dense), "
            f"accuracy {fmt(qa)} vs {fmt(pa)}: **{'met' if ok else 'not met'}** "
            "(target >= 3x, accuracy >= pygmtools)"
        )
    at100 = [r for r in rows if r["n"] == 100 and r["solver"] in ("rrwm", "ipfp", "sm")]
    for r in at100:
        sp = r.get("speedup_kb_total")
        ok = sp is not None and sp >= 100
        out.append(
            f"- n=100 {r['case']}, {r['solver']}, whole match through the KB operator vs "
            f"pygmtools build_aff_mat + solve: {fmt(sp)}x: **{'met' if ok else 'not met'}** "
            "(target >= 100x)"
        )
    return out


def write_report(
    rows: list[dict[str, Any]], args: argparse.Namespace, command: str, info: dict[str, str]
) -> tuple[Path, Path]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{args.name}.csv", out / f"{args.name}.md"
    write_csv(csv_path, rows, COLUMNS)
    notes = [
        "## Setup",
        "",
        f"- Graphs: random symmetric weighted graphs, edge probability {args.density}, weights "
        "uniform in (0, 1); graph 2 is a random node permutation of graph 1; the noisy case adds "
        f"N(0, {args.noise}^2) to every edge weight. Each repeat draws a new pair.",
        f"- **pygmtools** columns: `pygmtools.utils.build_aff_mat` with the Gaussian edge kernel "
        f"`exp(-(w1 - w2)^2 / {args.sigma})` and no node term (build), then the solver and "
        "`pygmtools.hungarian` on its output (solve). numpy backend, default solver options.",
        "- **qapfuse dense** columns: the *same* `K` through `Problem.from_dense` (prep: checks "
        "only) and the solver with default options (solve, Hungarian included).",
        "- **qapfuse KB** columns: `Problem.koopmans_beckmann(A1, A2)`, the inner-product edge "
        "kernel `w1 * w2`, i.e. `K = kron(A2, A1)` applied as `A1 X A2^T` and never built "
        "(a different, equally valid QAP for the same pair: accuracy is reported for it).",
        "- sinkhorn / hungarian rows: a random `n x n` score matrix, the same work on both "
        f"sides (Sinkhorn: 10 row+column updates at tau={args.tau}); accuracy = agreement with "
        "the exact LAP, `max|diff|` = largest difference between the two outputs.",
        "- `ga` has no pygmtools counterpart: reported without a ratio.",
        f"- Times are medians over {args.repeats if not args.quick else 1} repeats after a "
        "warm-up run; accuracy is the mean. Speedup = pygmtools time / qapfuse time, measured "
        "side by side in this one run (calls interleaved, order alternated per repeat).",
        "- The machine is shared (other jobs ran concurrently), so absolute times are noisy; "
        "the side-by-side ratios are what counts.",
        "",
    ]
    md = [header_block("Graph matching: pygmtools vs qapfuse", command, info, notes)]
    md.append("## Targets\n")
    md += _targets(rows) or ["- (no n=50 / n=100 rows in this run)"]
    md.append("")
    for case in [*args.cases, "random scores"]:
        sub = [r for r in rows if r["case"] == case]
        if not sub:
            continue
        md.append(f"## {case}\n")
        headers = [
            "n",
            "solver",
            "pygm build ms",
            "pygm solve ms",
            "pygm acc",
            "qf dense solve ms",
            "qf dense acc",
            "speedup (solve)",
            "speedup (prep+solve)",
            "qf KB build+solve ms",
            "qf KB acc",
            "speedup (whole, KB)",
        ]
        if case == "random scores":
            headers = [*headers[:2], "pygm ms", "pygm acc", "qf ms", "qf acc", "speedup"]
            headers.append("max abs diff")
        table = []
        for r in sub:
            kb_total = None
            if r.get("qf_kb_solve_s") is not None:
                kb_total = r["qf_kb_build_s"] + r["qf_kb_solve_s"]
            if case == "random scores":
                table.append(
                    [
                        r["n"],
                        r["solver"],
                        _ms(r.get("pygm_solve_s")),
                        r.get("pygm_acc"),
                        _ms(r.get("qf_dense_solve_s")),
                        r.get("qf_dense_acc"),
                        _x(r.get("speedup_dense_solve")),
                        r.get("max_abs_diff"),
                    ]
                )
            else:
                table.append(
                    [
                        r["n"],
                        r["solver"],
                        _ms(r.get("pygm_build_s")),
                        _ms(r.get("pygm_solve_s")),
                        r.get("pygm_acc"),
                        _ms(r.get("qf_dense_solve_s")),
                        r.get("qf_dense_acc"),
                        _x(r.get("speedup_dense_solve")),
                        _x(r.get("speedup_dense_prep_solve")),
                        _ms(kb_total),
                        r.get("qf_kb_acc"),
                        _x(r.get("speedup_kb_total")),
                    ]
                )
        md.append(markdown_table(headers, table))
        md.append("")
    png = save_plot(out / f"{args.name}.png", lambda plt: _plot(plt, rows, args))
    if png is not None:
        md.append(f"![speedups]({png.name})\n")
    md.append(f"Raw numbers: [`{csv_path.name}`]({csv_path.name}).\n")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return csv_path, md_path


def _plot(plt: Any, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Speedup vs n: same dense K (solve) and whole match through the KB operator."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (
        ("speedup_dense_solve", "same dense K: solve"),
        ("speedup_kb_total", "whole match: KB"),
    )
    for ax, (key, title) in zip(axes, panels):
        for case, style in (("isomorphic", "-"), ("noisy", "--"), ("random scores", ":")):
            for solver in ALL_SOLVERS:
                pts = [
                    (r["n"], r[key])
                    for r in rows
                    if r["case"] == case and r["solver"] == solver and _finite(r.get(key))
                ]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="o", label=f"{solver} ({case})")
        ax.axhline(3 if key == "speedup_dense_solve" else 100, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (nodes)")
        ax.set_title(title)
    axes[0].set_ylabel("pygmtools time / qapfuse time")
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle("qapfuse vs pygmtools (grey: target)")


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, float) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    """Run the graph-matching benchmark with command-line options `argv`; return 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [6, 9] if args.quick else [10, 30, 50, 100]
    if args.quick:
        args.repeats = 1
    try:
        import pygmtools  # noqa: F401
    except ImportError:
        parser.error("bench gm needs pygmtools: pip install 'qapfuse[bench]'")
    paths = prepare_output(parser, args, "gm", (".csv", ".md", ".png"))
    command = command_line("gm", argv)
    rows: list[dict[str, Any]] = []
    qap = [m for m in args.solvers if m in QAP_SOLVERS]
    lap = [m for m in args.solvers if m in LAP_SOLVERS]
    with blas_threads(args.threads) as threads_note, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning / pygmtools' runtime warnings
        info = machine_info(threads_note)
        log.info("gm: warming up (imports, first calls) before any clock runs")
        _warm_up(args)
        for n in args.sizes:
            for case in args.cases:
                if qap:
                    _log_rows(new := _qap_rows(n, case, qap, args, args.repeats))
                    rows += new
            if lap:
                _log_rows(new := _lap_rows(n, lap, args, args.repeats))
                rows += new
    write_report(rows, args, command, info)
    announce(paths)
    return 0


def _log_rows(rows: list[dict[str, Any]]) -> None:
    """One progress line per measured row: accuracy and time of each side."""
    for r in rows:
        pygm = "no pygmtools counterpart"
        if r.get("pygm_solve_s") is not None:
            pygm = (
                f"pygmtools acc {fmt(r.get('pygm_acc'))} in {fmt(_ms(r['pygm_solve_s']))} ms, "
                f"speedup {_x(r.get('speedup_dense_solve'))}"
            )
        log.info(
            "gm: n=%d %s %s: qapfuse acc %s in %s ms; %s",
            r["n"],
            r["case"],
            r["solver"],
            fmt(r.get("qf_dense_acc")),
            fmt(_ms(r.get("qf_dense_solve_s"))),
            pygm,
        )
