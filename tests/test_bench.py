"""The benchmark runners (``qapfuse bench SUITE``): smoke tests at tiny sizes, where reports go,
progress and errors."""

from __future__ import annotations

import csv
import math
import re
import shutil
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


# ---------------------------------------------------------------------------------------------
# where reports go, and what the command says while it runs (through the `qapfuse` command)
# ---------------------------------------------------------------------------------------------

# The cheapest real run: one shipped instance, two methods (no pygmtools, no compiled kernels).
TINY_QAPLIB = ["--quick", "--instances", "chr12a", "--methods", "scipy_faq", "qf_ga_kb"]


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    from qapfuse.cli import main as cli_main

    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_default_report_folder_is_new_and_named_by_suite_and_time(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, ["bench", "qaplib", *TINY_QAPLIB])
    assert code == 0, err
    folders = list((tmp_path / "qapfuse-bench").iterdir())
    assert len(folders) == 1 and re.fullmatch(r"qaplib-\d{8}-\d{6}", folders[0].name)
    assert (folders[0] / "qaplib.csv").is_file() and (folders[0] / "qaplib.md").is_file()
    assert not (tmp_path / "docs").exists()  # nothing written anywhere else
    assert out.strip().splitlines()[-1].startswith(f"report written to {Path('qapfuse-bench')}")
    assert folders[0].name in out


def test_existing_report_is_kept_without_force(capsys, tmp_path):
    md = tmp_path / "qaplib.md"
    md.write_text("committed report\n", encoding="utf-8")
    argv = ["bench", "qaplib", *TINY_QAPLIB, "--out", str(tmp_path)]
    code, out, err = _cli(capsys, argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qapfuse: error: report files exist already")
    assert "--force" in lines[0] and str(md) in lines[0]
    assert md.read_text(encoding="utf-8") == "committed report\n"
    assert not (tmp_path / "qaplib.csv").exists()  # refused before any work

    code, out, err = _cli(capsys, [*argv, "--force"])
    assert code == 0, err
    assert "## Summary" in md.read_text(encoding="utf-8")
    assert f"report written to {tmp_path}" in out


def test_qaplib_reads_data_option_and_defaults_to_shipped_instances(capsys, tmp_path, monkeypatch):
    from qapfuse.io import qaplib as qio

    data = tmp_path / "data"
    data.mkdir()
    for ext in (".dat", ".sln"):
        shutil.copy(qio.example_path("had12").with_suffix(ext), data / f"zz12{ext}")
    run = ["bench", "qaplib", "--methods", "scipy_faq", "--faq-starts", "1", "-q"]
    code, _, err = _cli(capsys, [*run, "--data", str(data), "--out", str(tmp_path / "a")])
    assert code == 0, err
    assert {r["instance"] for r in _read_csv(tmp_path / "a" / "qaplib.csv")[1]} == {"zz12"}

    # Without --data: the shipped folder (here replaced by `data`), no other path.
    monkeypatch.setattr(qio, "examples_dir", lambda: data)
    code, _, err = _cli(capsys, [*run, "--out", str(tmp_path / "b")])
    assert code == 0, err
    assert {r["instance"] for r in _read_csv(tmp_path / "b" / "qaplib.csv")[1]} == {"zz12"}


def test_integer_objectives_stay_integers_in_the_report(tmp_path, capsys):
    code, _, err = _cli(capsys, ["bench", "qaplib", *TINY_QAPLIB, "--out", str(tmp_path), "-q"])
    assert code == 0, err
    text = (tmp_path / "qaplib.csv").read_text(encoding="utf-8")
    for row in _read_csv(tmp_path / "qaplib.csv")[1]:
        assert re.fullmatch(r"\d+", row["objective"]) and row["best_known"] == "9552"
    assert ".0," not in text
    assert "| chr12a | 12 | 9552 |" in (tmp_path / "qaplib.md").read_text(encoding="utf-8")


def test_quiet_bench_writes_nothing_on_stderr(capsys, tmp_path):
    code, out, err = _cli(capsys, ["-q", "bench", "qaplib", *TINY_QAPLIB, "--out", str(tmp_path)])
    assert code == 0
    assert err == ""
    assert "report written to" in out  # the result itself still goes to stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_bench_reports_one_progress_line_per_row(capsys, tmp_path, where):
    argv = ["bench", "qaplib", *TINY_QAPLIB, "--out", str(tmp_path)]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]  # -v anywhere; -v = debug
    code, _, err = _cli(capsys, argv)
    assert code == 0, err
    progress = [ln for ln in err.splitlines() if ln.startswith("qapfuse: info: qaplib: chr12a")]
    rows = _read_csv(tmp_path / "qaplib.csv")[1]
    assert len(progress) == len(rows) == 2
    for line, row in zip(progress, rows):
        assert f"{row['method']}: objective {row['objective']} (best known 9552" in line
    assert "qapfuse: debug: running benchmark suite 'qaplib'" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["bench", "qaplib", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "gm", "--sizes", "x"], "argument --sizes: invalid int value: 'x'"),
        (["bench", "mgm", "--cases", "nope"], "argument --cases: invalid choice: 'nope'"),
        (["bench", "affinity", "--repeats"], "argument --repeats: expected one argument"),
        (["bench", "qaplib", "--data", "no/such/dir"], "--data 'no/such/dir' is not a folder"),
        (["bench", "qaplib", "--instances", "nug13"], "--instances: no .dat for nug13"),
        (["bench", "qapilb"], "did you mean 'qaplib'?"),
    ],
)
def test_bench_errors_are_one_line_and_exit_2(capsys, argv, match):
    code, out, err = _cli(capsys, argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qapfuse: error: ") and match in lines[0]


def test_bench_suite_help_exits_zero(capsys):
    code, out, _ = _cli(capsys, ["bench", "qaplib", "--help"])
    assert code == 0 and "--data" in out and "--force" in out and "--out" in out


@pytest.mark.slow  # ~10 s: six methods, pygmtools' multi-graph solvers among them
def test_mgm_runner_quick_smoke(capsys, tmp_path):
    pytest.importorskip("pygmtools")
    from qapfuse.bench.mgm import COLUMNS, METHODS

    argv = ["bench", "mgm", "--quick", "--cases", "exact", "--out", str(tmp_path), "-q"]
    code, out, err = _cli(capsys, argv)
    assert code == 0, err
    cols, rows = _read_csv(tmp_path / "mgm.csv")
    assert cols == COLUMNS
    assert {r["method"] for r in rows} == set(METHODS)
    for r in rows:
        assert (r["m"], r["n"], r["case"]) == ("4", "6", "exact")
        if r["note"] == "":
            assert 0.0 <= _num(r["accuracy"]) <= 1.0 and 0.0 <= _num(r["consistency"]) <= 1.0
    gamgm = next(r for r in rows if r["method"] == "qapfuse gamgm")
    assert _num(gamgm["consistency"]) == 1.0  # gamgm's matchings are cycle-consistent
    assert "report written to" in out


@pytest.mark.slow  # ~15 s: each measurement runs in a fresh subprocess
def test_affinity_runner_quick_smoke(capsys, tmp_path):
    pytest.importorskip("pygmtools")
    argv = ["bench", "affinity", "--quick", "--kernels", "inner", "--e2e-paths", "cand"]
    argv += ["--impls", "pygmtools", "qf-sparse32", "--candidates", "5"]
    code, _, err = _cli(capsys, [*argv, "--out", str(tmp_path), "-q"])
    assert code == 0, err
    _, rows = _read_csv(tmp_path / "affinity.csv")
    run = {(r["graph"], r["impl"]): r for r in rows if r["time_s"] != ""}
    assert set(run) == {
        ("dense", "pygmtools"),
        ("dense", "qf-sparse32"),
        ("delaunay", "qf-sparse32"),
    }
    assert all(_num(r["time_s"]) > 0 for r in run.values())
    assert _num(run[("dense", "qf-sparse32")]["speedup"]) > 0  # measured against pygmtools
    skipped = [r for r in rows if r["graph"] == "delaunay" and r["impl"] == "pygmtools"]
    assert len(skipped) == 1 and "not run: dense K needs" in skipped[0]["note"]
    _, e2e = _read_csv(tmp_path / "affinity_e2e.csv")
    assert len(e2e) == 1 and e2e[0]["error"] == "" and 0.0 <= _num(e2e[0]["f1"]) <= 1.0
    assert "## Targets" in (tmp_path / "affinity.md").read_text(encoding="utf-8")
