"""``qapfuse bench fusion``: a smoke run on digits, the bookkeeping of rows, summary and targets."""

from __future__ import annotations

import statistics

import pytest

pytest.importorskip("torch")

from qapfuse.bench import main as bench_main
from qapfuse.bench.fusion import (
    COLUMNS,
    SPREAD,
    finished_units,
    model_factory,
    read_rows,
    summarise,
    targets,
)
from qapfuse.cli import main as cli_main

QUICK = ["--quick", "--methods", "none", "weight", "--repair", "repair", "--restarts", "2"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion")
    assert bench_main(["fusion", *QUICK, "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_every_row_of_one_seed(quick_report):
    rows = read_rows(quick_report / "fusion.csv")
    header = (quick_report / "fusion.csv").read_text().splitlines()[0]
    assert header.split(",") == COLUMNS
    assert finished_units(rows) == {(("digits", "mlp", 2, "same"), 0)}
    got = {(r["method"], r["variant"]) for r in rows}
    for method in ("none", "weight"):
        assert {(method, "one-shot"), (method, "repair"), (method, "finetuned")} <= got
    assert {("model 0", "one-shot"), ("model 1", "one-shot"), ("ensemble", "one-shot")} <= got
    assert {("weight", "restart 1"), ("weight", "restart 2"), ("best model", "finetuned")} <= got
    assert rows[-1]["method"] == SPREAD  # the spread row closes a finished seed
    # the models are trained once: every row of the seed sees the same best model and ensemble
    assert len({(r["best_model"], r["ensemble"]) for r in rows if "best_model" in r}) == 1
    singles = [r["accuracy"] for r in rows if r["method"].startswith("model ")]
    best = next(r for r in rows if (r["method"], r["variant"]) == ("best model", "one-shot"))
    assert best["accuracy"] == max(singles)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows if r["method"] != SPREAD)


def test_smoke_run_noise_floor_and_objectives_are_consistent(quick_report):
    rows = read_rows(quick_report / "fusion.csv")
    weight = [r for r in rows if r["method"] == "weight"]
    accs = [r["accuracy"] for r in weight if r["variant"] in ("one-shot", "restart 1", "restart 2")]
    assert rows[-1]["accuracy"] == pytest.approx(statistics.pstdev(accs))
    # weight matching ascends from the identity: never below plain averaging's objective
    none = next(r for r in rows if (r["method"], r["variant"]) == ("none", "one-shot"))
    one = next(r for r in weight if r["variant"] == "one-shot")
    assert one["objective_inner"] >= none["objective_inner"] - 1e-9
    assert one["objective"] == one["objective_inner"]


def test_smoke_report_has_command_targets_and_tables(quick_report):
    md = (quick_report / "fusion.md").read_text()
    assert "qapfuse bench fusion --quick" in md
    assert "## Targets" in md and "## digits mlp K=2 same" in md
    assert "reaches at least `weight`'s objective on every pair: not run" in md


def test_resume_keeps_finished_seeds_and_redoes_unfinished_ones(quick_report, tmp_path):
    csv_text = (quick_report / "fusion.csv").read_text()
    (tmp_path / "fusion.csv").write_text(csv_text)
    (tmp_path / "fusion.md").write_text((quick_report / "fusion.md").read_text())
    assert bench_main(["fusion", *QUICK, "--out", str(tmp_path), "--resume"]) == 0
    assert (tmp_path / "fusion.csv").read_text() == csv_text  # nothing was run again
    assert (tmp_path / "fusion.md").read_text().count("qapfuse bench fusion --quick") == 1
    # an unfinished seed (no spread row) is dropped and measured again
    lines = csv_text.splitlines()
    (tmp_path / "fusion.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert bench_main(["fusion", *QUICK, "--out", str(tmp_path), "--resume"]) == 0
    again = read_rows(tmp_path / "fusion.csv")
    assert finished_units(again) == {(("digits", "mlp", 2, "same"), 0)}
    assert len(again) == len(lines) - 1
    # the command that measured it joins the one of the first run
    assert (tmp_path / "fusion.md").read_text().count("qapfuse bench fusion --quick") == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--settings", "mnist/mlp/two/same"], "--settings 'mnist/mlp/two/same'"),
        (["--dataset", "mnist"], "--dataset mnist needs --data-root"),
        (["--data-root", "cifar=/x"], "unknown dataset 'cifar'"),
        (["--seeds", "0"], "--seeds must be an integer >= 1"),
        (["--stop-at", "noon"], "--stop-at expects a UTC time HH:MM"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    code = cli_main(["bench", "fusion", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("qapfuse: error: ") and message in err


def test_missing_data_root_names_the_folder(capsys, tmp_path):
    code = cli_main(["bench", "fusion", "--dataset", "mnist", "--data-root", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "--data-root" in err and str(tmp_path / "no") in err


@pytest.mark.parametrize("arch", ["mlp", "cnn", "vgg-bn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_benchmark_architectures_run_and_trace(arch, shape):
    import torch

    from qapfuse.fusion import trace

    model = model_factory(arch, shape, 10, hidden=(8, 4))()
    x = torch.zeros(2, *shape)
    assert model(x).shape == (2, 10)
    assert len(trace(model.eval(), x[:1]).free_groups) >= 2


# -- summary and targets on rows written by hand ----------------------------------------------


def row(method, variant, seed, acc, **kw):
    base = {"dataset": "digits", "arch": "mlp", "n_models": 2, "split": "same",
            "best_model": 0.9, "ensemble": 0.95}  # fmt: skip
    return {**base, **kw, "method": method, "variant": variant, "seed": seed, "accuracy": acc}


def hand_rows():
    rows = []
    for seed, (w, g, obj_w, obj_g) in enumerate(
        [(0.80, 0.85, 10.0, 11.0), (0.90, 0.9004, 10.0, 10.0), (0.70, 0.60, 10.0, 9.0)]
    ):
        rows += [
            row("ensemble", "one-shot", seed, 0.95),
            row("weight", "one-shot", seed, w, objective=obj_w, objective_inner=obj_w),
            row("gamf[inner]", "one-shot", seed, g, objective=obj_g, objective_inner=obj_g),
            row("weight", "repair", seed, 0.5),
            row("gamf[inner]", "repair", seed, 0.4),
            row(SPREAD, "std", seed, 0.01 * seed),
        ]
    rows.append(row("weight", "one-shot", 3, 0.1))  # seed 3 never finished: left out
    return rows


def test_summary_means_wins_ties_losses_and_noise_floor():
    out = {(r["method"], r["variant"]): r for r in summarise(hand_rows(), tie=0.0005)}
    gamf = out[("gamf[inner]", "one-shot")]
    assert gamf["wtl"] == "1/1/1" and gamf["seeds"] == 3
    assert gamf["mean"] == pytest.approx(100 * (0.85 + 0.9004 + 0.60) / 3)
    assert gamf["std"] == pytest.approx(100 * statistics.pstdev([0.85, 0.9004, 0.60]))
    assert gamf["diff"] == pytest.approx(100 * (0.05 + 0.0004 - 0.10) / 3)
    assert out[("gamf[inner]", "repair")]["wtl"] == "0/0/3"  # against weight's repair rows
    assert out[("weight", "one-shot")]["wtl"] == "-"
    assert out[("weight", "one-shot")]["seeds"] == 3  # the unfinished seed 3 is not counted
    assert gamf["noise"] == pytest.approx(100 * 0.01)  # mean of 0, 0.01, 0.02
    assert out[("ensemble", "one-shot")]["mean"] == pytest.approx(95.0)


def test_targets_say_met_not_met_and_not_run():
    lines = "\n".join(targets(hand_rows(), [("digits", "mlp", 2, "same"),
                                           ("mnist", "cnn", 4, "same")]))  # fmt: skip
    # objectives: 11 >= 10, 10 >= 10, 9 < 10 -> 2 of 3
    assert "`weight`'s objective on every pair: **not met**: on 2 of 3 seeds" in lines
    # one-shot: gamf mean 78.35 vs weight 80.00, floor 1.00 -> not met
    assert "| 3 | gamf[inner] | 78.35 | 80.00 | -1.65 | 1.00 | **not met** |" in lines
    assert "below on digits mlp K=2 same seed 2: 9 < 10)" in lines
    assert "mnist cnn K=4 same: not run" in lines
    assert "best one-shot method, digits mlp K=2 same: `weight` (80.00)" in lines
