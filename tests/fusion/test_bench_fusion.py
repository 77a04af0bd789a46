"""The fusion benchmark's pieces: its architectures trace, and the summary counts correctly."""

from __future__ import annotations

import statistics

import pytest
import torch

from qapfuse.bench.fusion import build_parser, model_factory, summarise
from qapfuse.fusion import trace


@pytest.mark.parametrize("arch", ["mlp", "cnn", "vgg-bn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_benchmark_architectures_run_and_trace(arch, shape):
    model = model_factory(arch, shape, 10)()
    x = torch.zeros(2, *shape)
    assert model(x).shape == (2, 10)
    assert len(trace(model.eval(), x[:1]).free_groups) >= 2


def row(method, variant, seed, acc, **kw):
    base = {"dataset": "digits", "arch": "mlp", "n_models": 2, "split": "same",
            "best_model": 0.9, "ensemble": 0.95}  # fmt: skip
    return {**base, **kw, "method": method, "variant": variant, "seed": seed, "accuracy": acc}


def test_summary_means_wins_ties_losses_and_noise_floor():
    rows = [
        row("weight", "one-shot", 0, 0.80),
        row("weight", "one-shot", 1, 0.90),
        row("weight", "one-shot", 2, 0.70),
        row("gamf", "one-shot", 0, 0.85),  # win
        row("gamf", "one-shot", 1, 0.9005),  # tie (within 0.001)
        row("gamf", "one-shot", 2, 0.60),  # loss
        row("weight", "restart 1", 0, 0.82),
        row("weight", "restart 1", 1, 0.90),
        row("weight", "repair", 0, 0.50),
        row("gamf", "repair", 0, 0.40),  # compared with weight's repair row: a loss
    ]
    out = {(r["method"], r["variant"]): r for r in summarise(rows, tie=0.001)}
    gamf = out[("gamf", "one-shot")]
    assert gamf["w/t/l vs weight"] == "1/1/1" and gamf["seeds"] == 3
    assert gamf["mean"] == pytest.approx(100 * (0.85 + 0.9005 + 0.60) / 3)
    assert gamf["std"] == pytest.approx(100 * statistics.pstdev([0.85, 0.9005, 0.60]))
    assert out[("gamf", "repair")]["w/t/l vs weight"] == "0/0/1"
    assert out[("weight", "one-shot")]["w/t/l vs weight"] == "-"
    # seed 0: pstdev(0.80, 0.82) = 0.01; seed 1: 0
    assert gamf["weight restart std"] == pytest.approx(100 * 0.005)
    assert out[("ensemble", "")]["mean"] == pytest.approx(95.0)


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert args.dataset == "digits" and args.seeds == 5 and "gamf" in args.methods
