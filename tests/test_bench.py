"""Smoke tests of the benchmark runners (``qapfuse bench gm|qaplib``) at tiny sizes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from qapfuse.bench import main


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _num(text: str) -> float:
    return float(text) if text != "" else math.nan


def test_unknown_suite_is_refused(caplog):
    assert main(["nope"]) == 2
    assert "unknown benchmark suite 'nope'" in caplog.text


def test_gm_runner_writes_csv_and_markdown(tmp_path):
    pytest.importorskip("pygmtools")
    from qapfuse.bench.gm import COLUMNS

    args = ["--quick", "--sizes", "6", "--out", str(tmp_path), "--name", "gm_smoke"]
    assert main(["gm", *args]) == 0
    cols, rows = _read_csv(tmp_path / "gm_smoke.csv")
    assert cols == COLUMNS
    solvers = {r["solver"] for r in rows}
    assert solvers == {"rrwm", "ipfp", "sm", "ga", "sinkhorn", "hungarian"}
    assert {r["case"] for r in rows} == {"isomorphic", "noisy", "random scores"}
    for r in rows:
        assert int(r["n"]) == 6
        assert _num(r["qf_dense_solve_s"]) > 0
        assert 0.0 <= _num(r["qf_dense_acc"]) <= 1.0
        if r["solver"] == "ga":
            assert r["pygm_solve_s"] == "" and r["speedup_dense_solve"] == ""
        else:
            assert _num(r["pygm_solve_s"]) > 0 and _num(r["speedup_dense_solve"]) > 0
            assert 0.0 <= _num(r["pygm_acc"]) <= 1.0
        if r["case"] == "random scores":
            assert _num(r["max_abs_diff"]) < 1e-9  # the same algorithm on both sides
        else:
            assert _num(r["qf_kb_solve_s"]) > 0 and 0.0 <= _num(r["qf_kb_acc"]) <= 1.0
    iso = [r for r in rows if r["case"] == "isomorphic" and r["solver"] in ("ipfp", "ga")]
    assert all(_num(r["qf_dense_acc"]) == 1.0 for r in iso)  # exact on isomorphic pairs
    md = (tmp_path / "gm_smoke.md").read_text(encoding="utf-8")
    assert "qapfuse bench gm " + " ".join(args) in md
    assert "## Targets" in md and "## isomorphic" in md and "date (UTC)" in md


def test_qaplib_runner_writes_csv_and_markdown(tmp_path):
    pytest.importorskip("pygmtools")
    from qapfuse.bench.qaplib import COLUMNS, METHODS
    from qapfuse.io import qaplib as qio

    data = Path(qio.example_path("had12")).parent
    args = ["--quick", "--data", str(data), "--instances", "had12", "chr12a"]
    args += ["--out", str(tmp_path), "--name", "q_smoke"]
    assert main(["qaplib", *args]) == 0
    cols, rows = _read_csv(tmp_path / "q_smoke.csv")
    assert cols == COLUMNS
    assert {r["instance"] for r in rows} == {"had12", "chr12a"}
    ran = {r["method"] for r in rows}
    assert {"scipy_faq", "scipy_faq10", "pygm_ipfp", "qf_ipfp_dense", "qf_ga_kb"} <= ran
    assert ran <= set(METHODS)
    for r in rows:
        best, value, gap = float(r["best_known"]), float(r["objective"]), float(r["gap"])
        assert value >= best  # the best known values of these two are optimal
        assert gap == pytest.approx((value - best) / best)
        assert float(r["time_s"]) > 0
    md = (tmp_path / "q_smoke.md").read_text(encoding="utf-8")
    assert "qapfuse bench qaplib " + " ".join(args) in md
    assert "## Summary: all instances run" in md and "| had12 | 12 |" in md
