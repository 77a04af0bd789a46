"""Compact ensembles: the zoo, the comparison table, the interpolation curve, the report."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from qapfuse.fusion import permute, random_permutations, trace
from qapfuse.fusion.data import load_digits, split_dataset
from qapfuse.fusion.ensemble import (
    METHODS,
    build_model,
    compact_ensemble,
    format_table,
    model_inputs,
    train_models,
    write_report,
)
from qapfuse.fusion.models import MLP
from qapfuse.fusion.training import evaluate, seeded, train


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    train = (data.x_train.flatten(1), data.y_train)
    test = (data.x_test.flatten(1), data.y_test)
    return train, test


@pytest.fixture(scope="module")
def model_and_permuted_copy(digits):
    """A small trained MLP and a copy with every hidden group randomly permuted."""
    train_data, _ = digits
    model = train(seeded(lambda: MLP(64, (16, 12), 10), 0), train_data, epochs=3, progress=False)
    spec = trace(model, train_data[0][:1])
    copy = MLP(64, (16, 12), 10)
    copy.load_state_dict(permute(model, spec, random_permutations(spec, rng=1)))
    copy.eval()
    return model, copy


ZOO_CASES = [("mlp", 8), ("cnn", 8), ("vgg11-bn", 8), ("cnn", 28), ("lenet", 28), ("vgg11-bn", 28)]


@pytest.mark.parametrize(("name", "side"), ZOO_CASES)
def test_every_zoo_model_runs_and_traces(name, side):
    model = build_model(name, (1, side, side), 10, seed=0)
    x = model_inputs(name, torch.zeros(2, 1, side, side))
    assert model(x).shape == (2, 10)
    assert trace(model, x[:1]).free_groups  # alignable: it has hidden groups
    again = build_model(name, (1, side, side), 10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values()))  # fmt: skip


def test_zoo_bad_names_and_sizes():
    with pytest.raises(ValueError, match=r"'name' parameter of build_model.*'resnet'"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("lenet", (1, 8, 8), 10)


def test_interpolation_with_a_permuted_copy_is_flat_for_every_alignment(
    digits, model_and_permuted_copy
):
    train_data, test = digits
    model, copy = model_and_permuted_copy
    own = evaluate(model, test)[0]
    assert evaluate(copy, test)[0] == own  # the same function
    res = compact_ensemble([model, copy], test, train_data=train_data, methods=METHODS,
                           alphas=(0.0, 0.25, 0.5, 0.75, 1.0), progress=False)  # fmt: skip
    for method in METHODS:
        curve = res.curves[method]
        assert curve[0] == own and curve[-1] == own  # the endpoints are the two models
        if method != "none":
            assert curve == [own] * 5, method  # aligned: every mixture is the model itself
            assert res.row(method)["accuracy"] == own
    # Without alignment the midpoint mixes unrelated channels and loses accuracy.
    assert res.curves["none"][2] < own - 0.05


def test_table_has_a_row_per_model_the_ensemble_and_each_method(digits):
    train_data, test = digits
    data = load_digits()
    parts = split_dataset(data, 2, "label-skew", rng=0)
    models = train_models("mlp", data, parts, epochs=2, batch_size=64, progress=False)
    res = compact_ensemble(models, test, train_data=train_data, methods=["none", "weight"],
                           finetune_epochs=1, alphas=(0.0, 1.0), progress=False)  # fmt: skip
    names = [r["name"] for r in res.rows]
    assert names == ["model 0", "model 1", "ensemble", "none", "weight"]
    for k, m in enumerate(models):
        assert res.row(f"model {k}")["accuracy"] == evaluate(m, test)[0]
    assert all(r["finetuned_accuracy"] is not None for r in res.rows if r["kind"] == "fused")
    table = format_table(res)
    lines = table.splitlines()
    assert len(lines) == 2 + 5  # header, rule, five rows
    assert "ensemble (2 models)" in table and "fused: weight" in table and "+1 ep. %" in table
    assert f"{100 * res.row('weight')['accuracy']:.2f}" in lines[-1]


def test_report_files(tmp_path, digits, model_and_permuted_copy):
    _, test = digits
    res = compact_ensemble(list(model_and_permuted_copy), test, methods=["none", "weight"],
                           alphas=(0.0, 0.5, 1.0), progress=False)  # fmt: skip
    files = write_report(res, tmp_path / "out", stem="run")
    assert set(files) == {"table", "curves", "json", "plot"}
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(files["table"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["model 0", "model 1", "ensemble", "none", "weight"]
    assert float(rows[3]["accuracy"]) == res.row("none")["accuracy"]
    with open(files["curves"], newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 3
    payload = json.loads(files["json"].read_text())
    assert payload["interpolation"]["curves"]["weight"] == res.curves["weight"]


def test_bad_input(digits, model_and_permuted_copy):
    train_data, test = digits
    models = list(model_and_permuted_copy)
    with pytest.raises(ValueError, match="finetune_epochs"):
        compact_ensemble(models, test, train_data=train_data, finetune_epochs=-1)
    with pytest.raises(ValueError, match=r"'methods'.*'gamf'"):
        compact_ensemble(models, test, methods=["gamff"])
    with pytest.raises(ValueError, match="method 'activation' need `train_data`"):
        compact_ensemble(models, test, methods=["activation"])
    with pytest.raises(ValueError, match="at least 2 models"):
        compact_ensemble(models[:1], test)
    with pytest.raises(ValueError, match=r"alphas.*\[0, 1\]"):
        compact_ensemble(models, test, methods=["none"], alphas=(0.0, 1.5))
