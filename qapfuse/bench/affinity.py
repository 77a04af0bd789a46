"""Benchmark ``qapfuse bench affinity``: building K vs pygmtools, and graph matching end to end.

Part 1 (construction): time and peak memory of ``build_aff_mat`` on

* dense graphs (every pair connected, self-loops included, one weight per edge, as in
  pygmtools' examples) with ``n = 50, 100``: pygmtools (numpy backend) against qapfuse's
  dense (float32 / float64), sparse (CSR, float32) and operator forms;
* Delaunay graphs of ``n = 200, 500`` random points (edge feature: length): qapfuse's sparse
  and operator forms; pygmtools always builds a dense ``(n^2)^2`` K and is not run there (the
  table gives the bytes it would need).

Part 2 (end to end, the ``gm`` cases at scale): Delaunay point sets of ``n = 1000, 2000``
inliers with 10% outliers on each side, node descriptors (16-d, noisy) and edge lengths;
build a sparse K (Gaussian kernels), solve with graduated assignment with slack
(:func:`qapfuse.solvers.match_with_outliers`), round by a partial Hungarian step, and
report accuracy, precision, recall and F1 against the ground truth. Two paths: ``full`` (every
pair ``(i, a)``, dense ``(n1+1) x (n2+1)`` Sinkhorn steps) and ``cand`` (``candidates=k``: the
``k`` best partners of each node by node affinity, K built on those pairs only, sparse
Sinkhorn on that support).

Every measurement runs in a fresh subprocess after a small warm-up (imports and Numba
compilation excluded); peak memory is the growth of the peak resident set size (RSS) during
the measured call, so it counts every temporary and the result. Run ``qapfuse bench affinity
--quick`` for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._report import (
    announce,
    command_line,
    header_block,
    machine_info,
    markdown_table,
    prepare_output,
    suite_parser,
    write_csv,
)

log = logging.getLogger("qapfuse.bench")

__all__ = ["build_parser", "run"]

IMPLS = ("pygmtools", "qf-dense32", "qf-dense64", "qf-sparse32", "qf-operator32")


def build_parser() -> argparse.ArgumentParser:
    p = suite_parser(
        "affinity", "Affinity construction vs pygmtools, and end-to-end matching at scale."
    )
    p.add_argument("--dense-sizes", type=int, nargs="*", default=[50, 100])
    p.add_argument("--delaunay-sizes", type=int, nargs="*", default=[200, 500])
    p.add_argument("--e2e-sizes", type=int, nargs="*", default=[1000, 2000])
    p.add_argument(
        "--e2e-paths",
        nargs="+",
        default=["full", "cand"],
        choices=["full", "cand"],
        help="end-to-end paths: every pair (full) and/or candidate pairs (cand)",
    )
    p.add_argument(
        "--candidates", type=int, default=50, help="partners per node of the 'cand' path"
    )
    p.add_argument("--kernels", nargs="+", default=["inner", "gauss"], choices=["inner", "gauss"])
    p.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLS),
        choices=IMPLS,
        metavar="IMPL",
        help=f"constructions to time (default all: {', '.join(IMPLS)})",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed builds per qapfuse case (best)")
    p.add_argument("--pygm-repeats", type=int, default=2, help="timed pygmtools builds (best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------------------
# Worker side (one measurement per process)
# ----------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the next reading covers one call."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:  # pragma: no cover - not Linux: fall back to the process-lifetime peak
        pass


def _peak() -> int:
    """Peak RSS in bytes since the last :func:`_reset_peak` (VmHWM), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _graphs(kind: str, n: int, seed: int) -> dict[str, Any]:
    from ..graphs import dense_to_edges, point_pair

    rng = np.random.default_rng(seed)
    if kind == "dense":
        out = {}
        for s in (1, 2):
            c, f = dense_to_edges(rng.random((n, n)))
            out[f"c{s}"], out[f"e{s}"] = c, f
        return out
    pair = point_pair(n, noise=0.002, rng=seed)
    return {"c1": pair.conn1, "e1": pair.edge_feat1, "c2": pair.conn2, "e2": pair.edge_feat2}


def _builder(spec: dict[str, Any], g: dict[str, Any]) -> Any:
    sigma = spec["sigma"]
    if spec["impl"] == "pygmtools":
        import functools

        import pygmtools as pygm

        pygm.set_backend("numpy")
        fn = (
            functools.partial(pygm.utils.gaussian_aff_fn, sigma=sigma)
            if spec["kernel"] == "gauss"
            else None
        )
        return lambda: pygm.utils.build_aff_mat(
            None, g["e1"], g["c1"], None, g["e2"], g["c2"], edge_aff_fn=fn
        )
    from ..affinity import build_aff_mat, gaussian_kernel

    kern = gaussian_kernel(sigma) if spec["kernel"] == "gauss" else "inner_product"
    fmt = {"qf-dense32": "dense", "qf-dense64": "dense", "qf-sparse32": "sparse"}.get(
        spec["impl"], "operator"
    )
    dt = "float64" if spec["impl"] == "qf-dense64" else "float32"
    return lambda: build_aff_mat(
        None,
        g["e1"],
        g["c1"],
        None,
        g["e2"],
        g["c2"],
        edge_aff=kern,
        format=fmt,
        dtype=dt,
        max_bytes=2**40,
    )


def _nbytes(K: Any) -> int:
    if isinstance(K, np.ndarray):
        return K.nbytes
    if hasattr(K, "indptr"):
        return K.data.nbytes + K.indices.nbytes + K.indptr.nbytes
    facs = getattr(K, "_factors", [])
    tot = 0
    for f in facs:
        for M in f:
            if M is not None:
                tot += M.data.nbytes + M.indices.nbytes + M.indptr.nbytes
    return tot


def _work_build(spec: dict[str, Any]) -> dict[str, Any]:
    small = _graphs(spec["graph"], 8, spec["seed"] + 1)
    _builder(spec, small)()  # warm-up: imports, Numba compilation
    g = _graphs(spec["graph"], spec["n"], spec["seed"])
    build = _builder(spec, g)
    _reset_peak()
    rss0 = _rss()
    t0 = time.perf_counter()
    K = build()
    first = time.perf_counter() - t0
    peak = max(_peak() - rss0, 0)
    result_bytes = _nbytes(K)
    nnz = int(K.nnz) if hasattr(K, "nnz") else None
    times = [first]
    del K
    reps = spec["pygm_repeats"] if spec["impl"] == "pygmtools" else spec["repeats"]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        build()
        times.append(time.perf_counter() - t0)
    return {
        "time_s": min(times),
        "peak_mb": peak / 2**20,
        "result_mb": result_bytes / 2**20,
        "nnz": nnz,
        "ne1": len(g["c1"]),
        "ne2": len(g["c2"]),
    }


def _work_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    from ..affinity import gaussian_kernel, graph_matching_problem
    from ..graphs import matching_metrics, point_pair
    from ..solvers import hungarian, match_with_outliers

    def make(n: int, seed: int) -> Any:
        # jitter scales with the mean edge length (~ n^-1/2): the same difficulty at every n
        o = max(n // 10, 1)
        noise = 0.002 * (1000 / n) ** 0.5
        return point_pair(
            n, noise=noise, outliers1=o, outliers2=o, node_feat_dim=16, node_noise=1.0, rng=seed
        )

    kw = dict(
        edge_aff=gaussian_kernel(spec["sigma"] * 1000 / spec["n"]),
        node_aff=gaussian_kernel(16.0),
        threshold=spec["threshold"],
        candidates=spec.get("candidates"),
    )
    solver_kw = dict(slack=0.05, tau0=0.5, tau_min=0.02, decay=0.5, max_inner=3, sk_iter=10)
    warm = make(30, spec["seed"] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        match_with_outliers(graph_matching_problem(*warm.aff_args(), **kw), **solver_kw)
    pair = make(spec["n"], spec["seed"])
    _reset_peak()
    rss0 = _rss()
    t0 = time.perf_counter()
    p = graph_matching_problem(*pair.aff_args(), **kw)
    t_build = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = match_with_outliers(p, **solver_kw)
    t_total = time.perf_counter() - t0
    m = matching_metrics(res.X, pair.X_gt)
    K = p.affinity.Ks[0]
    F1, F2 = pair.node_feat1, pair.node_feat2  # node affinities of every pair (sigma 16)
    d2 = (F1 * F1).sum(1)[:, None] + (F2 * F2).sum(1)[None, :] - 2.0 * (F1 @ F2.T)
    L = np.exp(-np.maximum(d2, 0.0) / 16.0)
    node_only = matching_metrics(hungarian(L), pair.X_gt)
    cand = getattr(p.affinity, "candidates", None)
    return {
        "support": int(cand.sum()) if cand is not None else pair.n1 * pair.n2,
        "n1": pair.n1,
        "n2": pair.n2,
        "ne1": len(pair.conn1),
        "ne2": len(pair.conn2),
        "nnz": int(K.nnz),
        "build_s": t_build,
        "solve_s": t_total - t_build,
        "total_s": t_total,
        "n_iter": res.n_iter,
        "peak_mb": (_peak() - rss0) / 2**20,
        "peak_rss_mb": _peak() / 2**20,
        **{k: float(v) for k, v in m.items()},
        "node_only_f1": float(node_only["f1"]),
    }


def _spawn(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qapfuse.bench.affinity", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    """Run the affinity benchmark; write ``<name>.csv``/``<name>_e2e.csv`` and ``<name>.md``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        out = _work_e2e(spec) if spec.get("e2e") else _work_build(spec)
        print(json.dumps(out))
        return 0
    if args.quick:
        args.dense_sizes, args.delaunay_sizes, args.e2e_sizes = [12], [40], [60]
        args.repeats = args.pygm_repeats = 1
    paths = prepare_output(parser, args, "affinity", (".csv", "_e2e.csv", ".md"))
    rows: list[dict[str, Any]] = []
    for graph, sizes in (("dense", args.dense_sizes), ("delaunay", args.delaunay_sizes)):
        for n in sizes:
            for kernel in args.kernels:
                sigma = 1.0 if graph == "dense" else 0.01
                for impl in args.impls:
                    row = {"graph": graph, "n": n, "kernel": kernel, "impl": impl}
                    N = n * n
                    if graph == "delaunay" and impl in ("pygmtools", "qf-dense64", "qf-dense32"):
                        item = 4 if impl == "qf-dense32" else 8
                        row["note"] = f"not run: dense K needs {N * N * item / 2**30:.1f} GiB"
                        rows.append(row)
                        continue
                    spec = {
                        "graph": graph,
                        "n": n,
                        "kernel": kernel,
                        "impl": impl,
                        "sigma": sigma,
                        "seed": args.seed,
                        "repeats": args.repeats,
                        "pygm_repeats": args.pygm_repeats,
                    }
                    res = _spawn(spec)
                    row.update(res)
                    log.info("affinity: %s n=%d %s %s: %s", graph, n, kernel, impl, _brief(res))
                    rows.append(row)
    e2e: list[dict[str, Any]] = []
    for n in args.e2e_sizes:
        for path in args.e2e_paths:
            spec = {"e2e": True, "n": n, "sigma": 2e-5, "threshold": 1e-2, "seed": args.seed}
            spec["candidates"] = args.candidates if path == "cand" else None
            label = f"cand k={args.candidates}" if path == "cand" else "full"
            res = _spawn(spec)
            log.info("affinity: end to end n=%d %s: %s", n, label, _brief(res))
            e2e.append({"n": n, "path": label, **res})
    _write(args, argv, rows, e2e)
    announce(paths)
    return 0


def _brief(res: dict[str, Any]) -> str:
    """What a progress line shows of one measurement: time, memory, F1 (or the error)."""
    if "error" in res:
        return f"failed: {res['error']}"
    keys = ("time_s", "total_s", "peak_mb", "peak_rss_mb", "f1")
    return ", ".join(f"{k}={res[k]:.3g}" for k in keys if isinstance(res.get(k), float))


def _speedup(rows: list[dict[str, Any]], row: dict[str, Any], key: str) -> Any:
    ref = next(
        (
            r
            for r in rows
            if r["impl"] == "pygmtools"
            and r["graph"] == row["graph"]
            and r["n"] == row["n"]
            and r["kernel"] == row["kernel"]
            and key in r
        ),
        None,
    )
    if ref is None or key not in row or not row[key]:
        return None
    return ref[key] / row[key]


def _write(args: Any, argv: list[str], rows: list[dict[str, Any]], e2e: list[dict[str, Any]]):
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if r["impl"] != "pygmtools":
            r["speedup"] = _speedup(rows, r, "time_s")
            r["mem_ratio"] = _speedup(rows, r, "peak_mb")
    cols = [
        "graph",
        "n",
        "kernel",
        "impl",
        "ne1",
        "ne2",
        "nnz",
        "time_s",
        "peak_mb",
        "result_mb",
        "speedup",
        "mem_ratio",
        "note",
        "error",
    ]
    write_csv(out / f"{args.name}.csv", rows, cols)
    ecols = [
        "n",
        "path",
        "n1",
        "n2",
        "ne1",
        "ne2",
        "support",
        "nnz",
        "build_s",
        "solve_s",
        "total_s",
        "n_iter",
        "peak_mb",
        "peak_rss_mb",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "node_only_f1",
        "error",
    ]
    write_csv(out / f"{args.name}_e2e.csv", e2e, ecols)
    info = machine_info(f"numba {_numba_threads()} threads; load average {_load()}")
    notes = [
        "Peak memory is the growth of the peak RSS during the measured call (temporaries and "
        "result); `speedup` and `mem ratio` are pygmtools / qapfuse on the same inputs. Times "
        "are the best of `--repeats` builds for qapfuse and of `--pygm-repeats` for pygmtools "
        "(the 2-core machine is shared with other jobs: single timings vary by 2-5x). "
        "Dense graphs: every "
        "ordered pair incl. self-loops, one uniform weight per edge, so ne = n^2; Gaussian "
        "sigma = 1 (dense) / 0.01 (Delaunay, edge lengths). The machine is shared: see the load "
        "average above.",
        "",
    ]
    md = [
        header_block(
            "Affinity construction and graph matching at scale",
            command_line("affinity", argv),
            info,
            notes,
        )
    ]
    md += ["## Construction", ""]
    md.append(
        markdown_table(
            [
                "graph",
                "n",
                "kernel",
                "impl",
                "time (s)",
                "peak (MB)",
                "K (MB)",
                "speedup",
                "mem ratio",
                "note",
            ],
            [
                [
                    r["graph"],
                    r["n"],
                    r["kernel"],
                    r["impl"],
                    r.get("time_s"),
                    r.get("peak_mb"),
                    r.get("result_mb"),
                    r.get("speedup"),
                    r.get("mem_ratio"),
                    r.get("note") or r.get("error"),
                ]
                for r in rows
            ],
        )
    )
    md += ["", "## End to end: Delaunay graphs with outliers", ""]
    md.append(
        "Inliers n (uniform points, graph 2 rotated with jitter 0.002 sqrt(1000/n), i.e. "
        "proportional to the mean edge length), plus n/10 uniform outliers on each side; "
        "Delaunay edges, edge feature = length. Sparse K, float32: Gaussian edge kernel "
        "sigma = 2e-5 * 1000/n with `threshold=1e-2` (edge pairs below 0.01 "
        "dropped), Gaussian node kernel sigma = 16 on 16-d descriptors (noise 1.0). Solver: "
        "`match_with_outliers` (graduated assignment with slack 0.05; tau 0.5 -> 0.02, decay "
        "0.5, 3 steps per stage, 10 Sinkhorn iterations) and a partial Hungarian rounding. "
        "`node-only F1`: Hungarian on the node affinities alone, for reference. Peak RSS is "
        "the whole process (Python, numpy, scipy, numba included). Path `full`: every pair "
        "(i, a) is a candidate (dense Sinkhorn steps, K over all edge pairs); `cand k=...`: "
        "`candidates=k` in `graph_matching_problem` (pair (i, a) kept if a is among the k "
        "best node affinities of i or i among those of a; K only between candidate pairs) "
        "and `match_with_outliers` on that support (sparse Sinkhorn). `support`: number of "
        "candidate pairs."
    )
    md.append("")
    md.append(
        markdown_table(
            [
                "n",
                "path",
                "n1 x n2",
                "support",
                "nnz(K)",
                "build (s)",
                "solve (s)",
                "total (s)",
                "peak RSS (MB)",
                "accuracy",
                "precision",
                "recall",
                "F1",
                "node-only F1",
                "error",
            ],
            [
                [
                    r["n"],
                    r.get("path"),
                    f"{r.get('n1', '-')} x {r.get('n2', '-')}",
                    r.get("support"),
                    r.get("nnz"),
                    r.get("build_s"),
                    r.get("solve_s"),
                    r.get("total_s"),
                    r.get("peak_rss_mb"),
                    r.get("accuracy"),
                    r.get("precision"),
                    r.get("recall"),
                    r.get("f1"),
                    r.get("node_only_f1"),
                    r.get("error"),
                ]
                for r in e2e
            ],
        )
    )
    md.append("")
    md += ["## Targets (issue #3)", "", *_targets(rows, e2e), ""]
    (out / f"{args.name}.md").write_text("\n".join(md), encoding="utf-8")


def _targets(rows: list[dict[str, Any]], e2e: list[dict[str, Any]]) -> list[str]:
    """One line per target: >= 20x faster and <= 1/4 peak memory at n = 100 (dense graphs),
    end to end under 10 s and 4 GB at n = 1000 and 2000."""
    out = []
    for r in rows:
        if r["graph"] == "dense" and r["n"] == 100 and r["impl"] == "qf-dense32":
            sp, mr = r.get("speedup"), r.get("mem_ratio")
            if sp and mr:
                ok = "met" if sp >= 20 and mr >= 4 else "not met"
                out.append(
                    f"- dense n=100, {r['kernel']}: {sp:.1f}x faster, 1/{mr:.0f} of the peak "
                    f"memory (target >= 20x, <= 1/4): {ok}"
                )
    for r in e2e:
        if "total_s" in r:
            ok = "met" if r["total_s"] < 10 and r["peak_rss_mb"] < 4096 else "not met"
            out.append(
                f"- end to end n={r['n']} ({r.get('path', 'full')}): {r['total_s']:.1f} s, "
                f"{r['peak_rss_mb']:.0f} MB, "
                f"F1 {r['f1']:.3f} (target < 10 s, < 4 GB): {ok}"
            )
    return out or ["- (no case of the targets was run)"]


def _numba_threads() -> str:
    try:
        import numba

        return str(numba.get_num_threads())
    except ImportError:  # pragma: no cover
        return "?"


def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
