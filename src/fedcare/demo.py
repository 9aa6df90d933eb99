"""The deployed demo: a coordinator and four hospitals as separate processes over mTLS.

Everything a real deployment needs is made fresh inside the run directory:
a federation CA, a server certificate, one certificate per hospital, the
plan with its admitted nodes and each hospital's ``node.yaml``. Then the
coordinator (``fedcare serve``) and the nodes (``fedcare node``) start as
separate processes talking over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedcare.errors import FederationError
from fedcare.plan import Plan, load_plan

__all__ = ["DemoLayout", "prepare_deployment", "run_deployed"]


@dataclass(frozen=True)
class DemoLayout:
    """Files of a local deployment."""

    run_dir: Path
    certs_dir: Path
    plan_path: Path
    node_configs: dict[str, Path]


def prepare_deployment(plan_path: str | Path, run_dir: str | Path) -> DemoLayout:
    """Issue certificates and write the plan and node configs for every site.

    The plan's ``nodes`` become the dataset's sites when the plan lists none.
    """
    from fedcare.data.catalog import DatasetCatalog
    from fedcare.transport import pki

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    plan = load_plan(plan_path)
    sites = list(plan.nodes or DatasetCatalog.bundled().get(plan.dataset.name).site_names(plan.dataset))
    deployed: Plan = plan.model_copy(update={"nodes": tuple(sites)})
    certs = run / "certs"
    pki.init_ca(certs, federation=plan.name, lifetime_days=7)
    pki.issue_certificate(certs, role="server", name="coordinator", lifetime_days=1)
    from fedcare.tasks.registry import TaskRegistry

    task = TaskRegistry.from_entry_points().info(plan.task)
    configs = {}
    for site in sites:
        pki.issue_certificate(certs, role="node", name=site, lifetime_days=1)
        config = run / "nodes" / f"{site}.yaml"
        config.parent.mkdir(exist_ok=True)
        node: dict[str, object] = {"name": site, "datasets": {plan.dataset.name: {"site": site}}}
        # The demo's hospitals approve, unattended, only the installed task's exact code.
        policy: dict[str, object] = {
            "auto_approve": True,
            "allowed_tasks": [{"name": task.name, "version": task.version, "sha256": task.sha256}],
            "coordinator_fingerprint": pki.certificate_sha256(pki.read_pem(certs / "server.pem")),
        }
        record_level = plan.privacy.record_level
        if record_level.enabled:
            # Each hospital's own lifetime budget for the dataset; its ledger lives beside node.yaml.
            budget = {"epsilon": record_level.epsilon, "delta": record_level.delta, "accountant": record_level.accountant}
            policy["privacy"] = {plan.dataset.name: budget}
        node["policy"] = policy
        config.write_text(yaml.safe_dump(node, sort_keys=False))
        configs[site] = config
    deployed_path = run / "deploy-plan.yaml"
    deployed_path.write_text(yaml.safe_dump(deployed.model_dump(mode="json"), sort_keys=False))
    return DemoLayout(run_dir=run, certs_dir=certs, plan_path=deployed_path, node_configs=configs)


def _fedcare(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedcare.cli", *args]


def run_deployed(
    layout: DemoLayout,
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Start the coordinator and one process per node; return the coordinator's JSON summary.

    Raises
    ------
    FederationError
        If the coordinator process fails; its error output is in the message.
    """
    endpoint = layout.run_dir / "endpoint.json"
    endpoint.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = layout.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    coordinator_log = (logs / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(
        _fedcare(
            "serve", str(layout.plan_path), "--listen", "127.0.0.1:0", "--certs", str(layout.certs_dir),
            "--out", str(layout.run_dir), "--json",
        ),
        stdout=subprocess.PIPE,
        stderr=coordinator_log,
        env=env,
    )
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        while not endpoint.exists():
            if coordinator.poll() is not None or time.monotonic() - started > 60:
                raise FederationError("the coordinator did not start; see logs/coordinator.log")
            time.sleep(0.05)
        port = json.loads(endpoint.read_text())["port"]
        for site, config in layout.node_configs.items():
            log = (logs / f"{site}.log").open("wb")
            nodes.append(
                subprocess.Popen(
                    _fedcare("node", "--config", str(config), "--coordinator", f"127.0.0.1:{port}",
                             "--certs", str(layout.certs_dir)),
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )
            )
        seen = 0
        metrics = layout.run_dir / "metrics.jsonl"
        while coordinator.poll() is None:
            if time.monotonic() - started > timeout_s:
                raise FederationError(f"the deployed run did not finish within {timeout_s:.0f} s")
            if on_event is not None and metrics.exists():
                lines = metrics.read_text().splitlines()
                for line in lines[seen:]:
                    on_event(json.loads(line))
                seen = len(lines)
            time.sleep(0.1)
        output = coordinator.stdout.read().decode() if coordinator.stdout else ""
        if on_event is not None and metrics.exists():
            for line in metrics.read_text().splitlines()[seen:]:
                on_event(json.loads(line))
        if coordinator.returncode != 0:
            tail = (logs / "coordinator.log").read_text(errors="replace")[-2000:]
            raise FederationError(f"the coordinator exited with code {coordinator.returncode}: {tail}")
        summary: dict[str, Any] = json.loads(output)
        return summary
    finally:
        for process in [coordinator, *nodes]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        coordinator_log.close()
