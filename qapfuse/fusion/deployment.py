"""Run the qapfuse Flower App on a real Flower deployment on this machine (localhost only).

:func:`run_deployment` starts one ``flower-superlink`` and ``K`` ``flower-supernode``
processes bound to 127.0.0.1, submits the app with ``flwr run``, checks that the run finished
(``flwr list`` reports ``finished:completed``: ``flwr run --stream`` may exit 0 on a failed
run), reads the ServerApp's metrics and shuts every process it started down by PID (SIGTERM to
each daemon's own process group, SuperNodes first; SIGKILL after a grace period), also when
the run fails.

The processes run in **insecure mode** (``--insecure``: no TLS, no node authentication), which
is acceptable only because everything stays on the loopback interface. A real deployment adds
``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile`` to the SuperLink,
``--root-certificates`` to each SuperNode and ``--enable-supernode-auth`` with registered node
keys (``--auth-supernode-private-key``/``--auth-supernode-public-key``); see
``docs/federated.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from .._validation import check_choice
from .federated import AGGREGATORS, FederatedResult
from .flower import DEFAULT_CONFIG, FLOWER_ENV, read_metrics, write_app

__all__ = ["DeploymentError", "group_members", "run_deployment"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
FEDERATION = "qapfuse-local"


class DeploymentError(RuntimeError):
    """The deployment did not start, or its run did not complete (the message has log tails)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with status {proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.3)
    raise DeploymentError(f"flower-superlink did not listen on {HOST}:{port} within {timeout}s")


def _env(home: Path) -> dict[str, str]:
    """Environment of every Flower process: no telemetry, a private FLWR_HOME, and a PATH and
    PYTHONPATH under which the daemons find ``flower-superexec`` & co. and this qapfuse."""
    import qapfuse

    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    root = str(Path(qapfuse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group `pgid`.

    Reads ``/proc`` where there is one; elsewhere returns ``[pgid]`` while the group can still
    be signalled.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group of `proc` (a daemon we started in its own session), wait for
    it; SIGKILL what is left of the group after `grace` seconds, and wait until it is empty."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop after SIGTERM; killing it", proc.pid)
    deadline = time.monotonic() + grace
    while group_members(proc.pid) and time.monotonic() < deadline:
        # children of the daemon (a flwr-clientapp) may outlive it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.2)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("process %d is still running after SIGKILL", proc.pid)
    left = group_members(proc.pid)
    if left:
        log.warning("processes %s of group %d are still running", left, proc.pid)


def _run_id(text: str) -> int | None:
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', text) or re.search(
        r"run[ -_]?id\D{0,5}(\d+)", text, re.I
    )
    return int(m.group(1)) if m else None


def _run_status(run_id: int, env: Mapping[str, str], cwd: Path, timeout: float) -> str:
    out = subprocess.run(
        ["flwr", "list", FEDERATION, "--run-id", str(run_id), "--format", "json"],
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    try:
        info = json.loads(out.stdout)
    except json.JSONDecodeError:
        printed = (out.stdout + out.stderr).strip()[:300]
        return f"unknown (flwr list printed: {printed!r})"
    runs = info.get("runs") or []
    return str(runs[0].get("status", "unknown")) if runs else "unknown (no such run)"


def run_deployment(
    config: Mapping[str, Any],
    *,
    aggregators: Iterable[str] = ("gamf",),
    timeout: float = 600.0,
    workdir: str | Path | None = None,
    started: list[int] | None = None,
) -> FederatedResult:
    """Run the qapfuse Flower App on a localhost SuperLink and ``num-clients`` SuperNodes.

    Parameters
    ----------
    config : mapping
        Run config (keys of :data:`qapfuse.fusion.flower.DEFAULT_CONFIG`); ``num-clients``
        SuperNodes are started, node ``k`` with ``partition-id=k``.
    aggregators : iterable of str
        One ``flwr run`` per aggregator, on the same SuperLink and SuperNodes.
    timeout : float
        Seconds allowed for each run.
    workdir : str or Path, optional
        Where the app, ``FLWR_HOME``, the metrics and the daemons' logs go (default: a
        temporary folder, removed afterwards).
    started : list, optional
        If given, the PID of every process started is appended (for tests that check that
        none is left running).

    Returns
    -------
    FederatedResult
        The ServerApp's per-round rows (``engine="deployment"``).

    Raises
    ------
    DeploymentError
        A daemon does not start, a run fails or times out (with the tails of the logs).
    FileNotFoundError
        ``flower-superlink`` is not installed (``pip install "qapfuse[flower]"``).
    """
    names = [check_choice(a, "aggregators", "run_deployment", AGGREGATORS) for a in aggregators]
    cfg = {**DEFAULT_CONFIG, **dict(config)}
    clients = int(cfg["num-clients"])
    with tempfile.TemporaryDirectory(prefix="qapfuse-deploy-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _run(cfg, names, clients, work, timeout, started)


def _run(cfg, names, clients, work: Path, timeout: float, started) -> FederatedResult:
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    env = _env(home)
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "{HOST}:{port}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []
    logs: list[IO[str]] = []
    result = FederatedResult(config={**cfg, "engine": "deployment"})

    def spawn(cmd: list[str], name: str) -> subprocess.Popen:
        fh = open(work / f"{name}.log", "w")  # closed in the finally below
        logs.append(fh)
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
        procs.append(proc)
        if started is not None:
            started.append(proc.pid)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    try:
        link = spawn(
            [
                "flower-superlink",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                HOST,
                "--port",
                str(port),
            ],
            "superlink",
        )
        _wait_for_port(port, link, timeout=60)
        log.info("SuperLink up on %s:%d (pid %d)", HOST, port, link.pid)
        for k in range(clients):
            spawn(
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"{HOST}:{port}",
                    "--host",
                    HOST,
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={k} num-partitions={clients}",
                ],
                f"supernode-{k}",
            )
        log.info("%d SuperNodes started", clients)
        for name in names:
            metrics = work / f"metrics-{name}.jsonl"
            app = write_app(
                work / f"app-{name}", {**cfg, "aggregator": name, "metrics-file": str(metrics)}
            )
            log.info("flwr run: aggregator %s", name)
            try:
                out = subprocess.run(
                    ["flwr", "run", str(app), FEDERATION, "--stream"],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=work,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise DeploymentError(f"flwr run ({name}) did not finish in {timeout}s") from exc
            (work / f"flwr-run-{name}.log").write_text(out.stdout + out.stderr)
            run_id = _run_id(out.stdout + out.stderr)
            status = "unknown (no run id)" if run_id is None else _run_status(run_id, env, work, 60)
            if out.returncode != 0 or status != "finished:completed" or not metrics.exists():
                raise DeploymentError(
                    f"the Flower run for {name!r} did not complete (exit {out.returncode}, "
                    f"status {status}).\nflwr run:\n{(out.stdout + out.stderr)[-2000:]}\n"
                    f"superlink log:\n{_tail(work / 'superlink.log')}"
                )
            log.info("run %s finished:completed", run_id)
            result.records += read_metrics(metrics)
    finally:
        for proc in reversed(procs):  # SuperNodes first, then the SuperLink
            _stop(proc)
        for fh in logs:
            fh.close()
    return result
