"""The ``qapfuse`` command, run in-process (plus one run of the installed console script)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import qapfuse
from qapfuse.cli import main
from qapfuse.io import qaplib

# Small and quick: GA works today; the default pipeline ("auto") is tested where it lands.
FAST = ["--method", "ga", "--time-limit", "5"]


def _solve_json(capsys, *args: str) -> dict:
    code = main(["solve", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON object
    return json.loads(lines[0])


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qapfuse: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_solve_example_json_has_every_key_and_a_consistent_permutation(capsys):
    res = _solve_json(capsys, "--example", "nug12", *FAST, "--seed", "3")
    keys = {"instance", "n", "method", "objective", "best_known", "gap", "time", "permutation"}
    assert keys | {"seed"} <= res.keys()
    assert res["instance"] == "nug12" and res["n"] == 12 and res["method"] == "ga"
    assert res["seed"] == 3
    perm1 = res["permutation"]
    assert sorted(perm1) == list(range(1, 13))  # 1-indexed permutation
    inst = qaplib.load_instance(qaplib.example_path("nug12"))
    assert res["objective"] == qaplib.objective(inst.A, inst.B, np.array(perm1) - 1)
    assert res["best_known"] == 578
    assert res["gap"] == pytest.approx((res["objective"] - 578) / 578)
    assert res["objective"] >= 578  # 578 is optimal
    assert res["time"] > 0


def test_solve_file_text_output(capsys, tmp_path):
    # A copy without its .sln: no best known value, no gap.
    dat = tmp_path / "had12.dat"
    shutil.copy(qaplib.example_path("had12"), dat)
    assert main(["solve", str(dat), *FAST]) == 0
    out = capsys.readouterr().out
    assert "had12" in out and "objective" in out
    assert "gap" not in out and "best known" not in out
    perm_line = next(line for line in out.splitlines() if line.startswith("permutation"))
    perm1 = [int(v) for v in perm_line.split()[1:]]
    assert sorted(perm1) == list(range(1, 13))
    inst = qaplib.load_instance(dat)
    value = qaplib.objective(inst.A, inst.B, np.array(perm1) - 1)
    assert f"objective    {value}" in out

    # With --sln the gap appears, computed against the .sln value.
    sln = qaplib.example_path("had12").with_suffix(".sln")
    res = _solve_json(capsys, str(dat), *FAST, "--sln", str(sln))
    assert res["best_known"] == 1652
    assert res["gap"] == pytest.approx((res["objective"] - 1652) / 1652)
    assert main(["solve", str(dat), *FAST, "--sln", str(sln)]) == 0
    assert "gap" in capsys.readouterr().out


def test_solve_same_seed_same_answer(capsys):
    a = _solve_json(capsys, "--example", "tai12a", *FAST, "--seed", "7")
    b = _solve_json(capsys, "--example", "tai12a", *FAST, "--seed", "7")
    assert a["permutation"] == b["permutation"] and a["objective"] == b["objective"]


def test_solve_passes_options_to_solve(capsys, monkeypatch):
    seen = {}
    real = qapfuse.solve

    def spy(problem, method, **kw):
        seen.update(kw, method=method, problem=problem)
        return real(problem, "ga", rng=kw["rng"])

    monkeypatch.setattr(qapfuse, "solve", spy)
    argv = ["--example", "nug12", "--method", "rrwm", "--refine", "tabu", "--seed", "5"]
    res = _solve_json(capsys, *argv, "--time-limit", "1.5", "--restarts", "3")
    assert seen["method"] == "rrwm" and seen["refine"] == "tabu"
    assert seen["rng"] == 5 and seen["time_limit"] == 1.5 and seen["restarts"] == 3
    assert seen["problem"].sense == "min" and seen["problem"].best_known == 578
    assert res["method"] == "rrwm" and res["refine"] == "tabu"


def test_default_method_is_auto_with_two_second_limit(capsys, monkeypatch):
    seen = {}
    real = qapfuse.solve

    def spy(problem, method, **kw):
        seen.update(kw, method=method)
        return real(problem, "ga", rng=kw["rng"])

    monkeypatch.setattr(qapfuse, "solve", spy)
    res = _solve_json(capsys, "--example", "chr12a")
    assert seen["method"] == "auto" and seen["time_limit"] == 2.0 and seen["refine"] is None
    assert res["method"] == "auto"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["solve", "no/such/file.dat"], "no such file: 'no/such/file.dat'"),
        (["solve", "--example", "nug13"], "Did you mean 'nug12'?"),
        (["solve", "--example", "nug12", "--method", "gaa"], "did you mean 'ga'?"),
        (["solve", "--example", "nug12", "--refine", "tabuu"], "did you mean 'tabu'?"),
        (["solve", "--example", "nug12", "--time-limit", "0"], "--time-limit must be"),
        (["solve", "--example", "nug12", "--restarts", "0"], "--restarts must be"),
        (["solve", "--example", "nug12", "--seed", "x"], "invalid int value: 'x'"),
        (["solve", "--example", "nug12", "--sln", "nope.sln"], "no such file: 'nope.sln'"),
        (["solve"], "missing FILE.dat"),
        (["solve", "a.dat", "--example", "nug12"], "not both"),
        (["solve", "--example", "nug12", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "a command is required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, argv, match):
    assert match in _one_line_error(capsys, argv)


def test_malformed_file_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.dat"
    bad.write_text("2\n0 1\n1 0\n0 x\n2 0\n")
    line = _one_line_error(capsys, ["solve", str(bad), *FAST])
    assert "bad.dat: line 4" in line and "'x'" in line
    trunc = tmp_path / "trunc.dat"
    trunc.write_text("2\n0 1\n1 0\n0 2\n")
    line = _one_line_error(capsys, ["solve", str(trunc), *FAST])
    assert "expected 2*n*n = 8 numbers after n, found 6; file ends at line 4" in line


def test_bad_sln_beside_dat_is_reported(capsys, tmp_path):
    shutil.copy(qaplib.example_path("nug12"), tmp_path / "nug12.dat")
    (tmp_path / "nug12.sln").write_text("12 578\n1 2 3 4 5 6 7 8 9 10 11 11\n")
    line = _one_line_error(capsys, ["solve", str(tmp_path / "nug12.dat"), *FAST])
    assert "nug12.sln: line 2" in line and "11 appears twice" in line


def test_unavailable_method_is_a_clean_error(capsys, monkeypatch):
    def not_yet(problem, method, **kw):
        raise NotImplementedError

    monkeypatch.setattr(qapfuse, "solve", not_yet)
    assert "not available" in _one_line_error(capsys, ["solve", "--example", "nug12"])


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qapfuse {qapfuse.__version__}"


def test_help_exits_zero(capsys):
    assert main(["solve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--example" in out and "--time-limit" in out and "--json" in out


def test_verbose_logs_progress_to_stderr(capsys):
    assert main(["-v", "solve", "--example", "nug12", *FAST, "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout still holds only the JSON object
    assert "qapfuse: info: reading" in err and "solving nug12" in err


def test_bench_forwards_every_argument(capsys, monkeypatch):
    calls = []

    def fake_main(argv):
        calls.append(list(argv))
        return 3

    monkeypatch.setitem(sys.modules, "qapfuse.bench", types.SimpleNamespace(main=fake_main))
    argv = ["bench", "gm", "--n", "5", "-v", "--out", "x.csv", "--help", "--", "-q"]
    assert main(argv) == 3
    # -v/-q are the command's own, wherever they stand (up to "--"); the rest is the suite's.
    assert calls == [["gm", "--n", "5", "--out", "x.csv", "--help", "--", "-q"]]
    assert main(["bench", "qaplib"]) == 3
    assert calls[-1] == ["qaplib"]


def test_bench_without_runner_is_a_clean_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "qapfuse.bench", types.SimpleNamespace())
    assert "qapfuse.bench" in _one_line_error(capsys, ["bench", "gm"])


def test_installed_console_script_reports_version():
    exe = Path(sys.executable).with_name("qapfuse")
    cmd = [str(exe)] if exe.exists() else [shutil.which("qapfuse") or "qapfuse"]
    if not Path(cmd[0]).exists() and shutil.which(cmd[0]) is None:
        pytest.skip("the qapfuse console script is not installed (pip install -e .)")
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qapfuse {qapfuse.__version__}"


def test_default_pipeline_on_nug12(capsys):
    res = _solve_json(capsys, "--example", "nug12")
    assert res["method"] == "auto" and res["time_limit"] == 2.0
    assert sorted(res["permutation"]) == list(range(1, 13))
    assert res["gap"] <= 0.05  # tabu search reaches 578 (optimal) or very close on n = 12


def test_integer_objectives_print_as_integers(capsys):
    res = _solve_json(capsys, "--example", "chr12a", *FAST)
    assert type(res["objective"]) is int and type(res["best_known"]) is int
    assert main(["-v", "solve", "--example", "chr12a", *FAST]) == 0
    out, err = capsys.readouterr()
    assert "best known value 9552 (from" in err
    assert re.search(r"^objective    \d+$", out, re.M) and "best known   9552 (" in out


def test_quiet_solve_prints_nothing_on_stderr(capsys):
    # max_inner=1 makes ga stop early: a ConvergenceWarning that -q must keep off stderr.
    assert main(["solve", "--example", "nug12", *FAST, "-O", "max_inner=1", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "objective" in out
    assert main(["solve", "--example", "nug12", *FAST, "-O", "max_inner=1"]) == 0
    assert "rerun with -v" in capsys.readouterr().err  # without -q: one summary line


def test_verbose_is_accepted_after_the_subcommand_and_vv_adds_debug(capsys):
    assert main(["solve", "-v", "--example", "nug12", *FAST]) == 0
    err = capsys.readouterr().err
    assert "qapfuse: info: solving nug12" in err and "debug" not in err
    assert main(["solve", "--example", "nug12", *FAST, "-vv"]) == 0
    err = capsys.readouterr().err
    assert "qapfuse: info: solving nug12" in err and "qapfuse: debug: " in err


def test_option_values_are_typed_by_the_method(capsys, monkeypatch):
    seen = {}
    real = qapfuse.solve

    def spy(problem, method, **kw):
        seen.update(kw)
        return real(problem, "ga", rng=kw["rng"])

    monkeypatch.setattr(qapfuse, "solve", spy)
    argv = ["--example", "nug12", "--method", "ga", "-O", "max_inner=60", "--option", "tau0=2.5"]
    res = _solve_json(capsys, *argv)
    assert seen["max_inner"] == 60 and type(seen["max_inner"]) is int
    assert seen["tau0"] == 2.5 and type(seen["tau0"]) is float
    assert res["options"] == {"max_inner": 60, "tau0": 2.5}


def test_option_reaches_the_solver(capsys):
    # One inner step per stage cannot converge on nug12: the warning names the cap that -O set.
    assert main(["-v", "solve", "--example", "nug12", *FAST, "-O", "max_inner=1"]) == 0
    assert "max_inner=1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--seed", "-1"], "--seed must be a non-negative int"),
        (["-O", "max_iner=3"], "'max_iner' (did you mean 'max_inner'?)"),
        (["-O", "max_inner=0"], "-O max_inner must be an int >= 1. Got 0 instead."),
        (["-O", "max_inner=x"], "-O max_inner must be an integer; got 'x'"),
        (["-O", "tau0"], "-O expects KEY=VALUE"),
        (["-O", "rng=3"], "-O rng: use --seed instead"),
        (["-O", "x0=1"], "-O x0: an array cannot be given on the command line"),
    ],
)
def test_errors_name_the_flags_the_user_typed(capsys, argv, match):
    line = _one_line_error(capsys, ["solve", "--example", "nug12", "--method", "ga", *argv])
    assert match in line
    assert "'rng'" not in line and "parameter of" not in line
