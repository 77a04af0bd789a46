"""The Flower strategy, the Flower App files, and runs on Flower's simulation engine and on a
localhost deployment (both compared with the in-process engine for the same seed)."""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from qapfuse.fusion import permute, random_permutations, trace  # noqa: E402
from qapfuse.fusion.data import load_digits  # noqa: E402
from qapfuse.fusion.federated import run_federated  # noqa: E402
from qapfuse.fusion.flower import MatchingFedAvg, app_files  # noqa: E402
from qapfuse.fusion.models import MLP  # noqa: E402
from qapfuse.fusion.training import seeded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _reply(node: int, content_or_error) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="q",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content_or_error, metadata=meta)


def _content(state, n) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})


@pytest.fixture(scope="module")
def setting():
    model = seeded(lambda: MLP(6, (8,), 3), 0)
    spec = trace(model, torch.zeros(2, 6))
    sd = model.state_dict()
    clients = [permute(sd, spec, random_permutations(spec, rng=k)) for k in (1, 2)]
    return spec, sd, clients


def _strategy(method, spec, sd) -> MatchingFedAvg:
    strategy = MatchingFedAvg(method=method, spec=spec, rng=0)
    strategy.global_state = {k: v.clone() for k, v in sd.items()}  # what start() sets
    return strategy


def test_strategy_recovers_permuted_copies_and_drops_bad_replies(setting):
    spec, sd, clients = setting
    nan = {k: v.clone() for k, v in clients[0].items()}
    nan["layers.0.weight"][0, 0] = float("nan")
    bad_keys = {"other.weight": torch.zeros(2, 2)}
    replies = [
        _reply(1, _content(clients[0], 10)),
        _reply(2, _content(nan, 10)),
        _reply(3, _content(bad_keys, 10)),
        _reply(4, Error(code=1, reason="client crashed")),
        _reply(5, RecordDict({"arrays": ArrayRecord(clients[1])})),  # no MetricRecord
        _reply(6, _content(clients[1], 30)),
    ]
    arrays, metrics = _strategy("weight", spec, sd).aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    for key, value in sd.items():  # matched to the global model: the model comes back
        torch.testing.assert_close(out[key], value)
    assert metrics["rejected"] == 4
    assert metrics["non-identity"] > 0.5


def test_strategy_fedavg_is_not_the_model_and_all_rejected_keeps_global(setting):
    spec, sd, clients = setting
    replies = [_reply(1, _content(clients[0], 1)), _reply(2, _content(clients[1], 1))]
    arrays, _ = _strategy("fedavg", spec, sd).aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    assert not torch.allclose(out["layers.0.weight"], sd["layers.0.weight"])
    strategy = _strategy("gamf", spec, sd)
    arrays, metrics = strategy.aggregate_train(2, [_reply(1, Error(code=1, reason="x"))])
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, sd[key])
    assert metrics["rejected"] == 1 and strategy.rounds[2]["rejected"] == 1


def test_strategy_errors(setting):
    spec = setting[0]
    with pytest.raises(ValueError, match="needs `spec`"):
        MatchingFedAvg(method="gamf")
    with pytest.raises(ValueError, match="'method' parameter"):
        MatchingFedAvg(method="avg", spec=spec)
    with pytest.raises(RuntimeError, match="before start"):
        MatchingFedAvg(method="fedavg").aggregate_train(1, [])


def test_example_app_is_the_generated_one():
    for rel, text in app_files().items():
        assert (ROOT / "examples" / "flower" / rel).read_text() == text, rel
    assert "[tool.flwr.app]" in app_files()["pyproject.toml"]


def test_missing_flower_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    monkeypatch.setitem(sys.modules, "flwr.app", None)
    monkeypatch.delitem(sys.modules, "qapfuse.fusion.flower", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "qapfuse\[flower\]"'):
        importlib.import_module("qapfuse.fusion.flower")


# -- runs: 3 clients, 2 rounds on digits, against the local engine ---------------------------------

CONFIG = {"num-clients": 3, "num-server-rounds": 2, "hidden": "16", "lr": 0.01, "seed": 3}


@pytest.fixture(scope="module")
def local_rows():
    res = run_federated(
        load_digits(seed=3),
        clients=3,
        rounds=2,
        hidden=(16,),
        lr=0.01,
        batch_size=32,
        aggregators=("fedavg", "weight"),
        seed=3,
        progress=False,
    )
    return res.records


def _same_accuracies(rows, local_rows, aggregators):
    for name in aggregators:
        ours = [r["accuracy"] for r in rows if r["aggregator"] == name]
        theirs = [r["accuracy"] for r in local_rows if r["aggregator"] == name]
        assert len(ours) == 3 and ours == pytest.approx(theirs, abs=1e-9), name


@pytest.mark.slow
def test_flower_simulation_engine_matches_the_local_engine(local_rows):
    from qapfuse.fusion.flower import simulate

    res = simulate(CONFIG, aggregators=["weight"])  # one Ray start (~10 s of each run here)
    _same_accuracies(res.records, local_rows, ["weight"])
    weight_rows = [r for r in res.records if r["aggregator"] == "weight" and r["round"] > 0]
    assert all(r["clients"] == 3 and r["rejected"] == 0 for r in weight_rows)
    assert all(not math.isnan(r["non_identity"]) for r in weight_rows)


def _gone(pids):
    from qapfuse.fusion.deployment import group_members

    for pid in pids:  # each daemon leads its own process group: nothing of it may still run
        assert group_members(pid) == [], pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_localhost_deployment_matches_the_local_engine_and_cleans_up(local_rows, tmp_path):
    from qapfuse.fusion.deployment import run_deployment

    pids: list[int] = []
    res = run_deployment(CONFIG, aggregators=["fedavg"], workdir=tmp_path, started=pids)
    assert len(pids) == 1 + CONFIG["num-clients"]
    _gone(pids)
    _same_accuracies(res.records, local_rows, ["fedavg"])
    assert res.config["engine"] == "deployment"


@pytest.mark.slow
def test_failed_deployment_raises_and_cleans_up(tmp_path):
    from qapfuse.fusion.deployment import DeploymentError, run_deployment

    pids: list[int] = []
    bad = {**CONFIG, "num-clients": 2, "dataset": "mnist", "data-root": str(tmp_path / "none")}
    with pytest.raises(DeploymentError, match="did not complete"):
        run_deployment(bad, aggregators=["fedavg"], workdir=tmp_path, started=pids, timeout=300)
    assert len(pids) == 3
    _gone(pids)


def test_one_shot_strategy_fuses_round_one_and_averages_later(setting):
    spec, sd, clients = setting
    replies = [_reply(1, _content(clients[0], 1)), _reply(2, _content(clients[1], 1))]
    strategy = MatchingFedAvg(method="weight", spec=spec, rng=0, one_shot=True)
    strategy.global_state = {k: v.clone() for k, v in sd.items()}
    first, _ = strategy.aggregate_train(1, replies)
    # independent clients: matched to the first client (the global model is unrelated to them)
    torch.testing.assert_close(
        first.to_torch_state_dict()["layers.0.weight"], clients[0]["layers.0.weight"]
    )
    strategy.global_state = {k: v.clone() for k, v in sd.items()}
    later, metrics = strategy.aggregate_train(2, replies)
    assert not torch.allclose(later.to_torch_state_dict()["layers.0.weight"], sd["layers.0.weight"])
    assert math.isnan(metrics["non-identity"])
