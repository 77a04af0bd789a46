"""Flower integration: a graph-matching strategy, a ClientApp/ServerApp pair, the simulation engine.

:class:`MatchingFedAvg` is a ``flwr.serverapp.strategy.FedAvg`` (Message API, flwr >= 1.22)
whose ``aggregate_train`` runs :func:`qapfuse.fusion.federated.aggregate`: the clients'
``ArrayRecord``\\ s are checked (keys, shapes, NaN/inf, ``num-examples``), aligned with any
qapfuse method and averaged with sample-count weights. :func:`client_app` and
:func:`server_app` build the apps for the built-in models and datasets from a run config
(``DEFAULT_CONFIG``; a Flower App's ``[tool.flwr.app.config]`` overrides it), the same seeds
and splits as the in-process loop. :func:`simulate` runs them on Flower's simulation engine (Ray
backend); :mod:`qapfuse.fusion.deployment` on a localhost SuperLink and SuperNodes.

Needs Flower: ``pip install "qapfuse[flower]"``.
"""

from __future__ import annotations

try:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ModuleNotFoundError as exc:  # Flower is an optional dependency
    if not (exc.name or "").startswith("flwr"):
        raise
    raise ModuleNotFoundError(
        "qapfuse.fusion.flower needs Flower (flwr >= 1.22), which is not installed: "
        'pip install "qapfuse[flower]".',
        name="flwr",
    ) from None

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .._validation import check_choice
from .data import load_dataset
from .federated import (
    AGGREGATORS,
    METRICS,
    FederatedResult,
    aggregate,
    build_model,
    client_splits,
    train_seed,
)
from .spec import PermutationSpec
from .tracing import trace
from .training import evaluate, seeded, train

__all__ = [
    "DEFAULT_CONFIG",
    "FLOWER_ENV",
    "MatchingFedAvg",
    "app_files",
    "client_app",
    "flower_env",
    "read_metrics",
    "server_app",
    "simulate",
    "write_app",
]

log = logging.getLogger(__name__)

# The run config of the apps (keys as in a Flower App's [tool.flwr.app.config]).
DEFAULT_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "data-root": "",
    "model": "mlp",
    "hidden": "128,64",
    "split": "dirichlet",
    "alpha": 0.5,
    "num-clients": 3,
    "num-server-rounds": 2,
    "local-epochs": 1,
    "fraction-train": 1.0,
    "aggregator": "gamf",
    "one-shot": False,
    "lr": 0.001,
    "batch-size": 32,
    "seed": 0,
    "metrics-file": "",
}
# Every Flower process: no telemetry, no update check (nothing may leave the machine).
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class MatchingFedAvg(FedAvg):
    """FedAvg whose aggregation aligns the client models first (any qapfuse method).

    Parameters
    ----------
    method : {"fedavg", "gamf", "weight", "merge_many", "c2m3"}
        See :func:`qapfuse.fusion.federated.aggregate`.
    spec : PermutationSpec, optional
        The model's spec; needed by every method except ``"fedavg"``.
    rng : int, optional
        Seed of the alignment (combined with the round number).
    align_options : mapping, optional
        Options of the alignment method.
    one_shot : bool
        The clients of round 1 start from their own initialisations: `method` fuses them
        (``"weight"`` matches them to the first accepted client, not to the unrelated global
        model), and later rounds (fine-tuning from the fused model) use plain FedAvg.
    **kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``,
        ``min_available_nodes``, ...). Weights come from ``weighted_by_key``
        (``"num-examples"``).

    Attributes
    ----------
    rounds : dict of int to dict
        Per round: ``clients``, ``rejected``, ``non_identity``, ``aggregation_time``.

    Notes
    -----
    A reply that carries an error, not exactly one ``ArrayRecord`` and one ``MetricRecord``,
    other keys or shapes than the global model, NaN/inf, or no positive ``num-examples`` is
    rejected with a logged reason and counted; if all are, the previous global model is kept.
    """

    def __init__(
        self,
        *,
        method: str = "gamf",
        spec: PermutationSpec | None = None,
        rng: int | None = None,
        align_options: Mapping[str, Any] | None = None,
        one_shot: bool = False,
        **kwargs: Any,
    ) -> None:
        check_choice(method, "method", "MatchingFedAvg", AGGREGATORS)
        if method != "fedavg" and not isinstance(spec, PermutationSpec):
            raise ValueError(f"MatchingFedAvg(method={method!r}) needs `spec` (a PermutationSpec).")
        super().__init__(**kwargs)
        self.method = method
        self.spec = spec
        self.seed = rng
        self.align_options = dict(align_options or {})
        self.one_shot = bool(one_shot)
        self.global_state: dict[str, torch.Tensor] | None = None
        self.rounds: dict[int, dict[str, Any]] = {}
        self._round_start: dict[int, float] = {}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Any:
        """Keep the initial global model (the reference of the checks); run FedAvg's loop."""
        self.global_state = initial_arrays.to_torch_state_dict()
        return super().start(grid, initial_arrays, *args, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Grid):
        """FedAvg's sampling; stamps the round's start time."""
        self._round_start[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, align the accepted models, average them by ``num-examples``."""
        if self.global_state is None:
            raise RuntimeError("MatchingFedAvg.aggregate_train called before start().")
        replies = list(replies)
        updates: list[Any] = []
        counts: list[Any] = []
        contents: list[RecordDict] = []
        early_rejects = 0
        for msg in replies:
            reason, state, count = self._unpack(msg)
            if reason is not None:
                early_rejects += 1
                log.warning(
                    "round %d: reply from node %s rejected: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    reason,
                )
                continue
            updates.append(state)
            counts.append(count)
            contents.append(msg.content)
        seed = None if self.seed is None else train_seed(self.seed, server_round, 0)
        method = "fedavg" if self.one_shot and server_round > 1 else self.method
        out = aggregate(
            self.global_state,
            updates,
            counts,
            method=method,
            spec=self.spec,
            from_global=not (self.one_shot and server_round == 1),
            rng=seed,
            **self.align_options,
        )
        self.global_state = out.state_dict
        rejected = early_rejects + len(out.rejected)
        if out.kept_previous:
            log.warning(
                "round %d: every reply was rejected; the global model is unchanged", server_round
            )
        accepted = [contents[k] for k in out.accepted]
        metrics = (
            self.train_metrics_aggr_fn(accepted, self.weighted_by_key)
            if accepted
            else MetricRecord()
        )
        metrics["rejected"] = rejected
        metrics["aggregation-time"] = out.time
        metrics["non-identity"] = out.non_identity
        self.rounds[server_round] = {
            "clients": len(replies),
            "rejected": rejected,
            "non_identity": out.non_identity,
            "aggregation_time": out.time,
            "start": self._round_start.get(server_round, time.perf_counter()),
        }
        return ArrayRecord(out.state_dict), metrics

    def _unpack(self, msg: Message) -> tuple[str | None, Any, Any]:
        if msg.has_error():
            return f"error reply ({msg.error.reason})", None, None
        arrays = list(msg.content.array_records.values())
        metrics = list(msg.content.metric_records.values())
        if len(arrays) != 1 or len(metrics) != 1:
            return (
                f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and "
                f"{len(metrics)}",
                None,
                None,
            )
        try:
            state = arrays[0].to_torch_state_dict()
        except Exception as exc:  # a malformed record must not end the round
            return f"unreadable ArrayRecord ({exc})", None, None
        count = metrics[0].get(self.weighted_by_key)
        if count is None:
            return f"no {self.weighted_by_key!r} in the MetricRecord", None, None
        return None, state, count


# -- the apps ------------------------------------------------------------------------------------


def _config(base: Mapping[str, Any] | None, run_config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**DEFAULT_CONFIG, **dict(base or {}), **dict(run_config)}
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    return cfg


def _hidden(text: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


@functools.lru_cache(maxsize=4)
def _setup(dataset: str, root: str, model: str, hidden: str, seed: int) -> tuple[Any, ...]:
    data = load_dataset(dataset, root or None, seed=seed)
    factory, x_train, x_test = build_model(model, data, hidden=_hidden(hidden))
    return data, factory, x_train, x_test


def _setup_of(cfg: Mapping[str, Any]) -> tuple[Any, ...]:
    return _setup(
        cfg["dataset"], str(cfg["data-root"]), cfg["model"], str(cfg["hidden"]), int(cfg["seed"])
    )


def client_app(config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp that trains the built-in model on its partition of the built-in dataset.

    Parameters
    ----------
    config : mapping, optional
        Run-config defaults (keys of ``DEFAULT_CONFIG``); the run's own config overrides them.

    Notes
    -----
    The partition comes from ``context.node_config`` (``partition-id``, ``num-partitions``):
    set by the simulation engine, and given to each SuperNode with ``--node-config``. Splits and
    training seeds are those of :func:`qapfuse.fusion.federated.run_federated`. The reply holds
    the trained state dict (``"arrays"``) and ``{"num-examples", "train-loss"}``.
    """
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        cfg = _config(config, context.run_config)
        pid = int(context.node_config["partition-id"])
        n_parts = int(context.node_config["num-partitions"])
        data, factory, x_train, _ = _setup_of(cfg)
        seed = int(cfg["seed"])
        parts = client_splits(data.y_train, n_parts, cfg["split"], float(cfg["alpha"]), seed)
        idx = torch.from_numpy(parts[pid])
        server_round = int(msg.content["config"]["server-round"])
        if cfg["one-shot"] and server_round == 1:
            net = seeded(factory, seed + 1 + pid)
        else:
            net = factory()
            net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        if len(idx):
            train(
                net,
                (x_train[idx], data.y_train[idx]),
                epochs=int(cfg["local-epochs"]),
                lr=float(cfg["lr"]),
                batch_size=int(cfg["batch-size"]),
                seed=train_seed(seed, server_round, pid),
                progress=False,
            )
        content = RecordDict(
            {
                "arrays": ArrayRecord(net.state_dict()),
                "metrics": MetricRecord({"num-examples": len(idx)}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def server_app(config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running :class:`MatchingFedAvg` with central evaluation on the test set.

    Parameters
    ----------
    config : mapping, optional
        Run-config defaults (keys of ``DEFAULT_CONFIG``); the run's own config overrides them.
        ``metrics-file``: where to write the per-round metrics (JSON lines, the rows of
        :func:`qapfuse.fusion.federated.run_federated`); empty: not written.
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = _config(config, context.run_config)
        data, factory, x_train, x_test = _setup_of(cfg)
        seed = int(cfg["seed"])
        init = seeded(factory, seed)
        clients = int(cfg["num-clients"])
        rounds = int(cfg["num-server-rounds"])
        fraction = float(cfg["fraction-train"])
        strategy = MatchingFedAvg(
            method=cfg["aggregator"],
            spec=trace(init, x_train[:2]),
            rng=seed,
            one_shot=bool(cfg["one-shot"]),
            fraction_train=fraction,
            fraction_evaluate=0.0,
            min_train_nodes=max(1, math.ceil(fraction * clients)),
            min_available_nodes=clients,
        )
        evaluator = factory()
        rows: list[dict[str, Any]] = []

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            evaluator.load_state_dict(arrays.to_torch_state_dict())
            acc, loss = evaluate(evaluator, (x_test, data.y_test))
            info = strategy.rounds.get(server_round, {})
            start = info.get("start")
            rows.append(
                {
                    "aggregator": cfg["aggregator"],
                    "round": server_round,
                    "accuracy": acc,
                    "loss": loss,
                    "clients": info.get("clients", 0),
                    "rejected": info.get("rejected", 0),
                    "non_identity": info.get("non_identity", math.nan),
                    "aggregation_time": info.get("aggregation_time", 0.0),
                    "round_time": 0.0 if start is None else time.perf_counter() - start,
                }
            )
            log.info("%s round %d: accuracy %.4f", cfg["aggregator"], server_round, acc)
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy.start(grid, ArrayRecord(init.state_dict()), num_rounds=rounds, evaluate_fn=central)
        if cfg["metrics-file"]:
            with open(cfg["metrics-file"], "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")

    return app


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows a ServerApp wrote to its ``metrics-file``."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: row.get(k) for k in METRICS})
    return rows


@contextlib.contextmanager
def flower_env(home: str | Path | None = None) -> Iterator[dict[str, str]]:
    """Set ``FLOWER_ENV`` and a private ``FLWR_HOME`` in ``os.environ``; restore them after."""
    with contextlib.ExitStack() as stack:
        if home is None:
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="qapfuse-flwr-home-"))
        values = {**FLOWER_ENV, "FLWR_HOME": str(home)}
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield values
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def simulate(
    config: Mapping[str, Any],
    *,
    aggregators: Iterable[str] = ("gamf",),
    num_cpus: int | None = None,
) -> FederatedResult:
    """Run the apps on Flower's simulation engine (Ray backend), once per aggregator.

    Parameters
    ----------
    config : mapping
        Run config (keys of ``DEFAULT_CONFIG``; ``num-clients`` is the number of SuperNodes).
    aggregators : iterable of str
    num_cpus : int, optional
        CPUs given to Ray (default: all); each client takes one.

    Returns
    -------
    FederatedResult
        Rows as in :func:`~qapfuse.fusion.federated.run_federated` (no final states: the
        global model lives in the ServerApp).
    """
    from flwr.simulation import run_simulation

    cfg = _config(None, config)
    names = [check_choice(a, "aggregators", "simulate", AGGREGATORS) for a in aggregators]
    result = FederatedResult(config={**cfg, "engine": "flower"})
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False},
    }
    with tempfile.TemporaryDirectory(prefix="qapfuse-flwr-") as tmp, flower_env():
        for name in names:
            metrics = Path(tmp) / f"{name}.jsonl"
            run_cfg = {**cfg, "aggregator": name, "metrics-file": str(metrics)}
            run_simulation(
                server_app=server_app(run_cfg),
                client_app=client_app(run_cfg),
                num_supernodes=int(cfg["num-clients"]),
                backend_config=backend,
            )
            if not metrics.exists():
                raise RuntimeError(f"the Flower simulation of {name!r} wrote no metrics")
            result.records += read_metrics(metrics)
    return result


# -- the Flower App's files ----------------------------------------------------------------------

_APP_PACKAGE = "qapfuse_flower_app"
_CLIENT = '''"""ClientApp of the qapfuse Flower App (see qapfuse.fusion.flower.client_app)."""

from qapfuse.fusion.flower import client_app

app = client_app()
'''
_SERVER = '''"""ServerApp of the qapfuse Flower App (see qapfuse.fusion.flower.server_app)."""

from qapfuse.fusion.flower import server_app

app = server_app()
'''


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def app_files(config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The files of a Flower App running qapfuse's apps: relative path -> text.

    Parameters
    ----------
    config : mapping, optional
        Values of ``[tool.flwr.app.config]`` (default: ``DEFAULT_CONFIG``).

    Examples
    --------
    >>> sorted(app_files())  # doctest: +NORMALIZE_WHITESPACE
    ['pyproject.toml', 'qapfuse_flower_app/__init__.py',
     'qapfuse_flower_app/client_app.py', 'qapfuse_flower_app/server_app.py']
    """
    cfg = _config(None, config or {})
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in cfg.items())
    pyproject = f'''# A Flower App (flwr >= 1.22) running qapfuse's graph-matching aggregation.
# Written by qapfuse.fusion.flower.app_files(); see docs/federated.md.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "qapfuse-flower-app"
version = "0.1.0"
description = "Federated learning with graph-matching aggregation (qapfuse)"
license = "MIT"
dependencies = ["qapfuse[fusion,flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "qapfuse"

[tool.flwr.app.components]
serverapp = "{_APP_PACKAGE}.server_app:app"
clientapp = "{_APP_PACKAGE}.client_app:app"

[tool.flwr.app.config]
{lines}
'''
    return {
        "pyproject.toml": pyproject,
        f"{_APP_PACKAGE}/__init__.py": '"""qapfuse Flower App."""\n',
        f"{_APP_PACKAGE}/client_app.py": _CLIENT,
        f"{_APP_PACKAGE}/server_app.py": _SERVER,
    }


def write_app(folder: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`app_files` into `folder` (created if needed); return it."""
    folder = Path(folder)
    for rel, text in app_files(config).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder
