"""``qapfuse demo`` and ``qapfuse ensemble`` end to end, in-process, on the embedded digits."""

from __future__ import annotations

import csv
import re

import pytest
import torch

from qapfuse.cli import main
from qapfuse.fusion.align import METHODS
from qapfuse.fusion.checkpoints import save_state_dict
from qapfuse.fusion.data import load_digits
from qapfuse.fusion.ensemble import build_model, model_inputs
from qapfuse.fusion.models import MLP
from qapfuse.fusion.training import evaluate, train

EXECUTED: list[str] = []


def _record_execution(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_record_execution, ("payload ran",))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, digits):
    """Two MLPs trained briefly on the digits, saved as weights-only .pt and as safetensors."""
    folder = tmp_path_factory.mktemp("ckpt")
    x, y = model_inputs("mlp", digits.x_train), digits.y_train
    models, paths = [], []
    for k, name in enumerate(["a.pt", "b.safetensors"]):
        model = build_model("mlp", digits.input_shape, 10, seed=k)
        train(model, (x, y), epochs=2, batch_size=64, seed=k, progress=False)
        models.append(model)
        paths.append(save_state_dict(model, folder / name))
    return models, paths


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 3 and re.fullmatch(r"\d+\.\d\d", cells[1]):
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_quick_prints_the_table_and_writes_what_it_says(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    rows = _table_rows(out)
    assert {"model 0", "model 1", "ensemble (2 models)"} <= rows.keys()
    assert {f"fused: {m}" for m in METHODS} <= rows.keys()
    plot = re.search(r"^interpolation plot: (.+)$", out, re.M).group(1)
    assert plot == str(out_dir / "demo-interpolation.png")
    assert (out_dir / "demo-interpolation.png").read_bytes()[:4] == b"\x89PNG"
    assert f"report written to {out_dir}/" in out
    with open(out_dir / "demo.csv", newline="") as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    assert set(METHODS) <= table.keys()
    for m in METHODS:  # the printed table is the CSV's
        assert rows[f"fused: {m}"][0] == f"{100 * float(table[m]['accuracy']):.2f}"
    assert "training model 1/2" in err  # progress on stderr

    # The same folder again: refused, nothing changed; --force overwrites.
    before = (out_dir / "demo.csv").read_bytes()
    argv = ["demo", "--quick", "--out", str(out_dir), "--methods", "none"]
    line = _one_line_error(capsys, argv)
    assert "exist already" in line and "--force" in line
    assert (out_dir / "demo.csv").read_bytes() == before
    assert main([*argv, "--force", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # -q: no progress
    assert set(_table_rows(out)) == {"model 0", "model 1", "ensemble (2 models)", "fused: none"}


def test_demo_without_out_makes_a_new_folder_in_the_working_directory(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--methods", "none", "-q"]) == 0
    out = capsys.readouterr().out
    (folder,) = tmp_path.glob("qapfuse-demo-*")
    assert f"report written to {folder.name}/" in out
    assert (folder / "demo.csv").is_file() and (folder / "demo-interpolation.png").is_file()


def test_ensemble_on_saved_checkpoints(tmp_path, capsys, digits, checkpoints):
    models, paths = checkpoints
    out_dir = tmp_path / "ens"
    argv = ["ensemble", "--model", "mlp", "--checkpoints", *map(str, paths), "-q"]
    argv += ["--finetune-epochs", "0", "--methods", "none,weight", "--out", str(out_dir)]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    rows = _table_rows(out)
    test = (model_inputs("mlp", digits.x_test), digits.y_test)
    for k, model in enumerate(models):  # the loaded weights are the saved ones
        assert rows[f"model {k}"][0] == f"{100 * evaluate(model, test)[0]:.2f}"
    assert {"fused: none", "fused: weight"} <= rows.keys()
    assert (out_dir / "ensemble.json").is_file() and (out_dir / "ensemble.csv").is_file()


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qapfuse: error: ")
    return lines[0]


def _bad_checkpoint(folder, kind: str):
    if kind == "cnn":
        return save_state_dict(build_model("cnn", (1, 8, 8), 10), folder / "cnn.pt")
    if kind == "narrow":
        return save_state_dict(MLP(64, (32, 32), 10), folder / "narrow.safetensors")
    path = folder / "evil.pt"
    torch.save({"layers.0.weight": torch.zeros(2), "x": _Payload()}, path)
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "resnet"], r"unknown model 'resnet'"),
        (["--dataset", "imagenet"], r"unknown dataset 'imagenet'"),
        (["--dataset", "mnist"], r"--data-root DIR.*train-images-idx3-ubyte"),
        (["--dataset", "mnist", "--data-root", "{tmp}"], r"lacks train-images-idx3-ubyte"),
        (["--finetune-epochs", "-1"], r"--finetune-epochs must be an integer >= 0; got -1"),
        (["--num-models", "1"], r"--num-models must be an integer >= 2"),
        (["--num-models", "3", "--checkpoints", "{a}", "{b}"], r"--num-models .* not both"),
        (["--checkpoints", "{a}"], r"--checkpoints needs at least 2 files"),
        (["--methods", "gamf", "bogus"], r"unknown method in --methods 'bogus'"),
        (
            ["--model", "mlp", "--checkpoints", "{a}", "{cnn}"],
            r"another architecture.*lacks the key",
        ),
        (["--model", "mlp", "--checkpoints", "{a}", "{narrow}"], r"another width.*\(32, 64\)"),
        (
            ["--model", "cnn", "--checkpoints", "{a}", "{b}"],
            r"another architecture than --model cnn",
        ),
        (["--model", "mlp", "--checkpoints", "{a}", "{evil}"], r"refuses.*_record_execution"),
        (["--model", "mlp", "--checkpoints", "{a}", "{tmp}/none.pt"], r"no such checkpoint"),
    ],
)
def test_ensemble_bad_input_exits_2_and_writes_nothing(
    tmp_path, capsys, checkpoints, args, expected
):
    _, (a, b) = checkpoints
    names = {"tmp": tmp_path, "a": a, "b": b}
    for kind in ("cnn", "narrow", "evil"):
        names[kind] = _bad_checkpoint(tmp_path, kind)
    out_dir = tmp_path / "out"
    EXECUTED.clear()
    argv = ["ensemble", *(arg.format(**names) for arg in args), "--out", str(out_dir)]
    line = _one_line_error(capsys, argv)
    assert re.search(expected, line), line
    if "--data-root" in args:
        assert str(tmp_path) in line  # says where the files must be
    assert not out_dir.exists()
    assert EXECUTED == []
