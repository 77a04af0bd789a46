"""Checkpoints are read as state dicts only: torch.load(weights_only=True) or safetensors."""

from __future__ import annotations

import pickle

import pytest
import torch

from qapfuse.fusion.checkpoints import (
    CheckpointError,
    check_compatible,
    load_state_dict,
    save_state_dict,
)
from qapfuse.fusion.models import MLP, SmallCNN

EXECUTED: list[str] = []


def _record_execution(tag: str) -> str:
    """What a malicious checkpoint would run on unpickling (here: only leaves a trace)."""
    EXECUTED.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_record_execution, ("payload ran",))


def _assert_same(a, b):
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_gives_back_the_same_tensors(tmp_path, suffix):
    model = MLP(5, (4,), 3)
    path = save_state_dict(model, tmp_path / f"m{suffix}")
    _assert_same(load_state_dict(path), model.state_dict())


def test_a_state_dict_nested_under_state_dict_is_found(tmp_path):
    model = MLP(5, (4,), 3)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    _assert_same(load_state_dict(tmp_path / "ckpt.pt"), model.state_dict())


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, path)
    EXECUTED.clear()
    with pytest.raises(CheckpointError, match=r"weights_only=True\)\) refuses.*_record_execution"):
        load_state_dict(path)
    assert EXECUTED == []
    # The payload is real: unsafe unpickling would have run it.
    with open(path, "rb") as fh:
        torch.load(fh, weights_only=False)
    assert EXECUTED == ["payload ran"]


def test_plain_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Payload(), protocol=2))  # the protocol torch.load reads
    EXECUTED.clear()
    with pytest.raises(CheckpointError, match=r"refuses"):
        load_state_dict(path)
    assert EXECUTED == []


@pytest.mark.parametrize(
    ("obj", "what"),
    [
        ([torch.zeros(2)], "a list"),
        ({"w": torch.zeros(2), "lr": 0.1}, "'lr' is a float"),
        ({}, "empty"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, what):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=f"not a state dict.*{what}"):
        load_state_dict(tmp_path / "x.pt")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_state_dict(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_state_dict(tmp_path / "absent.pt")


def test_compatibility_names_the_first_differing_key_or_shape():
    narrow, wide = MLP(64, (8,), 10), MLP(64, (16,), 10)
    cnn = SmallCNN(input_size=8)
    check_compatible([narrow.state_dict(), MLP(64, (8,), 10).state_dict()], narrow)
    with pytest.raises(
        CheckpointError,
        match=r"^b\.pt belongs to another width than a\.pt: 'layers\.0\.weight' has shape "
        r"\(16, 64\) in b\.pt but \(8, 64\) in a\.pt\.$",
    ):
        check_compatible([narrow.state_dict(), wide.state_dict()], narrow, names=["a.pt", "b.pt"])
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint 1 belongs to another architecture than checkpoint 0: it lacks the "
        r"key 'layers\.0\.weight'",
    ):
        check_compatible([narrow.state_dict(), cnn.state_dict()], narrow)
    with pytest.raises(
        CheckpointError, match=r"a\.pt belongs to another width than mlp.*\(16, 64\)"
    ):
        check_compatible([wide.state_dict()], narrow, names=["a.pt"], model_name="mlp")
    with pytest.raises(CheckpointError, match=r"another architecture than cnn.*'conv1\.weight'"):
        check_compatible([narrow.state_dict()], cnn, model_name="cnn")
