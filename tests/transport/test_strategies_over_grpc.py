"""Every strategy runs the same over gRPC with mutual TLS as in one process, and resumes from a checkpoint.

The gRPC runs use the real deployment code (``fedcare.deployment.serve`` and
``run_node``) on 127.0.0.1 with freshly issued certificates; the nodes run in
threads of this process to keep the test fast.
"""

from __future__ import annotations

import threading
import typing
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare import deployment
from fedcare.errors import TransportError
from fedcare.plan import BufferedAggregation, Plan, PrivacyWarning, StrategyConfig, parse_plan
from fedcare.simulation import simulate
from fedcare.transport import pki

SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")
STRATEGIES = typing.get_args(StrategyConfig.model_fields["name"].annotation)
#: Strategies whose plans need other settings than the base plan's.
MIN_NODES = {"cyclic": 1}


def strategy_plan(name: str, *, rounds: int = 2) -> Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        return parse_plan(
            {
                "name": f"grpc-{name}",
                "task": "tabular-logistic",
                "dataset": {"name": "heart-disease", "normalization": "federated"},
                "nodes": list(SITES),
                "rounds": rounds,
                "min_nodes": MIN_NODES.get(name, 2),
                "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.05},
                "strategy": {"name": name, "byzantine_nodes": 0},
                "evaluation": {"every_rounds": rounds},
                "seed": 0,
            }
        )


def serve_over_grpc(plan: Plan, workdir: Path) -> Any:
    certs = workdir / "certs"
    pki.init_ca(certs, federation="strategies")
    pki.issue_certificate(certs, role="server", name="coordinator", hosts=("127.0.0.1",))
    for site in SITES:
        pki.issue_certificate(certs, role="node", name=site)
    port: list[int] = []
    listening = threading.Event()
    errors: list[BaseException] = []

    def on_listening(value: int) -> None:
        port.append(value)
        listening.set()

    def node(site: str) -> None:
        config = deployment.NodeConfig.model_validate(
            {"name": site, "datasets": {"heart-disease": {"site": site}}, "ledger_dir": str(workdir / site),
             "audit_log": str(workdir / site / "audit.jsonl"), "approvals_dir": str(workdir / site / "approvals"),
             "state_dir": str(workdir / site / "state"),
             "policy": {"auto_approve": True, "allowed_tasks": [{"name": "tabular-logistic"}]}}
        )
        try:
            deployment.run_node(config, coordinator=f"127.0.0.1:{port[0]}", certs_dir=certs, give_up_after_s=30)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    result: list[Any] = []

    def coordinator() -> None:
        try:
            result.append(
                deployment.serve(plan, listen="127.0.0.1:0", certs_dir=certs, on_listening=on_listening,
                                 wait_for_nodes_s=30, heartbeat_interval_s=1.0)
            )  # fmt: skip
        except BaseException as exc:
            errors.append(exc)
            listening.set()

    server = threading.Thread(target=coordinator)
    server.start()
    assert listening.wait(30), "the coordinator did not start listening"
    nodes = [threading.Thread(target=node, args=(site,)) for site in SITES]
    for thread in nodes:
        thread.start()
    server.join(120)
    finished = bool(result)
    for thread in nodes:
        thread.join(40)
    assert finished, f"the coordinator returned no result: {errors}"
    # A node still dialling when the run ends finds no coordinator: that is the normal ending.
    unexpected = [e for e in errors if not (isinstance(e, TransportError) and "unreachable" in str(e))]
    assert not unexpected, unexpected
    return result[0]


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_over_grpc_with_mtls_ends_with_the_in_process_model(name: str, tmp_path: Path) -> None:
    plan = strategy_plan(name)
    deployed = serve_over_grpc(plan, tmp_path)
    local = simulate(plan)

    assert deployed.rounds_completed == local.rounds_completed == plan.rounds
    np.testing.assert_allclose(deployed.parameters.flatten(), local.parameters.flatten(), atol=1e-6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_resumed_from_a_checkpoint_completes_every_round(name: str, tmp_path: Path) -> None:
    simulate(strategy_plan(name, rounds=1), out_dir=tmp_path / "run")
    resumed = simulate(strategy_plan(name, rounds=3), out_dir=tmp_path / "run", resume=True)

    assert resumed.rounds_completed == 3
    assert resumed.final_evaluation is not None and resumed.final_evaluation.round == 3


def test_buffered_aggregation_over_grpc_with_mtls_completes_every_round(tmp_path: Path) -> None:
    plan = strategy_plan("fedavg", rounds=3)
    plan = plan.model_copy(
        update={"strategy": plan.strategy.model_copy(update={"buffered": BufferedAggregation(buffer_size=3, max_staleness=8)})}
    )
    deployed = serve_over_grpc(plan, tmp_path)

    assert deployed.rounds_completed == 3
    assert [len(sites) for sites in deployed.participation.values()] == [3, 3, 3]
    assert not deployed.failures
    assert deployed.final_evaluation is not None and sorted(deployed.final_evaluation.sites) == sorted(SITES)
