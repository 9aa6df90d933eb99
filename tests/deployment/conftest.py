"""Fixtures for the deployment tests: real processes, real certificates, gRPC on 127.0.0.1.

Every process a test starts goes through a :class:`ProcessGroup`, whose
fixture stops whatever is still running when the test ends, pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from fedcare.demo import DemoLayout, prepare_deployment

FEDCARE = [sys.executable, "-m", "fedcare.cli"]
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")


def child_env() -> dict[str, str]:
    """The environment of every child: unbuffered output, gRPC logging at its defaults.

    ``fedcare serve`` reads gRPC's own log lines to report TLS handshake
    refusals, so a GRPC_VERBOSITY or GRPC_TRACE inherited from the caller's
    shell must not change what it sees.
    """
    env = {key: value for key, value in os.environ.items() if key not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_plan(path: Path, **changes: Any) -> Path:
    """A small heart-disease plan over the four hospitals; ``changes`` replace top-level keys."""
    plan: dict[str, Any] = {
        "name": "deploy-test",
        "task": "tabular-logistic",
        "dataset": {"name": "heart-disease", "normalization": "federated"},
        "nodes": list(SITES),
        "rounds": 3,
        "min_nodes": 2,
        "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.01},
        "evaluation": {"every_rounds": 3},
        "seed": 0,
    }
    plan.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def deploy(directory: Path, **changes: Any) -> DemoLayout:
    """Write a plan with ``changes``, then issue a fresh CA and certificates for it in ``directory``."""
    return prepare_deployment(write_plan(directory / "plan.yaml", **changes), directory / "run")


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events in ``run_dir/metrics.jsonl`` so far (a line still being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


@dataclass
class Launched:
    """One started process and the files its output goes to."""

    label: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    _files: tuple[IO[bytes], IO[bytes]]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit; fail the test (showing its stderr) if it does not."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.label} still running after {timeout_s:.0f} s; its stderr ends:\n{self.stderr()[-3000:]}")

    def running(self) -> bool:
        return self.process.poll() is None


def _default_sigint() -> None:
    """In the child, before it runs: SIGINT back to its default (Python then raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ProcessGroup:
    """Starts ``fedcare`` commands as child processes and stops all of them at the end.

    Parameters
    ----------
    log_dir : Path
        Each process writes ``LABEL.out`` and ``LABEL.err`` here.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.launched: list[Launched] = []

    def start(
        self, label: str, *args: str | Path, program: list[str] = FEDCARE, interruptible: bool = False
    ) -> Launched:
        """Start ``program`` (default: the ``fedcare`` command) with ``args``.

        With ``interruptible``, the child takes SIGINT as Ctrl-C even when this
        suite was started in the background (a shell without job control starts
        background commands ignoring SIGINT, and children inherit that).
        """
        stdout_path = self.log_dir / f"{label}.out"
        stderr_path = self.log_dir / f"{label}.err"
        stdout = stdout_path.open("wb")
        stderr = stderr_path.open("wb")
        process = subprocess.Popen(
            [*program, *map(str, args)],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            cwd=self.log_dir,
            preexec_fn=_default_sigint if interruptible else None,
        )
        launched = Launched(label, process, stdout_path, stderr_path, (stdout, stderr))
        self.launched.append(launched)
        return launched

    def serve(self, label: str, layout: DemoLayout, *, listen: str = "127.0.0.1:0", out: Path | None = None,
              wait_for_nodes_s: float = 120.0, interruptible: bool = False) -> Launched:
        """``fedcare serve`` for ``layout``'s plan, writing to ``out`` (default: the layout's run directory)."""
        return self.start(
            label, "serve", layout.plan_path, "--listen", listen, "--certs", layout.certs_dir,
            "--out", out or layout.run_dir, "--wait-for-nodes-s", str(wait_for_nodes_s), "--json",
            interruptible=interruptible,
        )

    def node(self, label: str, config: Path, *, port: int, certs_dir: Path, give_up_after_s: float | None = None) -> Launched:
        """``fedcare node`` with ``config``, dialling 127.0.0.1:``port``."""
        extra = () if give_up_after_s is None else ("--give-up-after-s", str(give_up_after_s))
        return self.start(
            label, "node", "--config", config, "--coordinator", f"127.0.0.1:{port}", "--certs", certs_dir, *extra
        )

    def stop_all(self) -> None:
        """Terminate every process still running (SIGKILL after 5 s), then close the log files."""
        for launched in self.launched:
            if launched.running():
                launched.process.send_signal(signal.SIGTERM)
        for launched in self.launched:
            try:
                launched.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                launched.process.kill()
                launched.process.wait(timeout=10)
            for handle in launched._files:
                handle.close()


def endpoint_port(launched: Launched, run_dir: Path, *, timeout_s: float = 60.0) -> int:
    """The port ``fedcare serve`` wrote to ``run_dir/endpoint.json``."""
    endpoint = run_dir / "endpoint.json"

    def written() -> bool:
        if not launched.running() and not endpoint.exists():
            pytest.fail(f"the coordinator exited with {launched.process.returncode}:\n{launched.stderr()[-3000:]}")
        return endpoint.exists() and endpoint.stat().st_size > 0

    wait_for(written, timeout_s=timeout_s, what="the coordinator's endpoint.json")
    return int(json.loads(endpoint.read_text())["port"])


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Start processes through this; all of them are stopped when the test ends."""
    group = ProcessGroup(tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop_all()


@dataclass
class RefusingCoordinator:
    """A coordinator that waits for nodes for ever, for the refusal tests to knock at."""

    layout: DemoLayout
    process: Launched
    port: int
    group: ProcessGroup

    def events_since(self, seen: int) -> list[dict[str, Any]]:
        return read_events(self.layout.run_dir)[seen:]

    def event_count(self) -> int:
        return len(read_events(self.layout.run_dir))


@pytest.fixture(scope="module")
def refusing_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefusingCoordinator]:
    """One ``fedcare serve`` for all refusal tests; it is still waiting for nodes when they end."""
    directory = tmp_path_factory.mktemp("refusals")
    layout = deploy(directory, rounds=1, evaluation={"every_rounds": 1})
    group = ProcessGroup(directory / "logs")
    try:
        coordinator = group.serve("coordinator", layout, wait_for_nodes_s=600)
        port = endpoint_port(coordinator, layout.run_dir)
        yield RefusingCoordinator(layout=layout, process=coordinator, port=port, group=group)
    finally:
        group.stop_all()
