"""A deployed federation as separate processes: ``fedcare serve`` and ``fedcare node`` over mutual TLS.

Every test starts real processes (``python -m fedcare.cli``) that talk gRPC
on 127.0.0.1 with certificates issued for the test, and stops them all when
it ends (see ``conftest.ProcessGroup``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from fedcare import __version__
from fedcare.cli import demo_plan_path
from fedcare.params import Parameters
from fedcare.plan import load_plan
from fedcare.simulation import simulate
from fedcare.transport import pki
from fedcare.transport.proto import fedcare_pb2 as pb

from .conftest import (
    FEDCARE,
    SITES,
    Launched,
    ProcessGroup,
    RefusingCoordinator,
    child_env,
    deploy,
    endpoint_port,
    free_port,
    read_events,
    wait_for,
)

UTC = dt.timezone.utc


def refusals(events: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "node_refused" and e["reason"] == reason]


def wait_for_refusal(coordinator: RefusingCoordinator, seen: int, reason: str) -> list[dict[str, Any]]:
    return wait_for(
        lambda: refusals(coordinator.events_since(seen), reason),
        timeout_s=30,
        what=f"a node_refused event with reason {reason}",
    )


def test_deployed_run_over_mtls_matches_in_process_run(tmp_path: Path, processes: ProcessGroup) -> None:
    layout = deploy(tmp_path, rounds=3, evaluation={"every_rounds": 3})
    in_process = simulate(load_plan(layout.plan_path))

    coordinator = processes.serve("coordinator", layout)
    port = endpoint_port(coordinator, layout.run_dir)
    for site, config in layout.node_configs.items():
        processes.node(site, config, port=port, certs_dir=layout.certs_dir)

    assert coordinator.wait(timeout_s=120) == 0, coordinator.stderr()[-3000:]
    failures = [e for e in read_events(layout.run_dir) if e["event"] in ("node_failed", "node_late")]
    assert not failures, f"a node dropped out, so the runs cannot match: {failures}"
    deployed = Parameters.from_bytes((layout.run_dir / "model.safetensors").read_bytes())
    np.testing.assert_allclose(deployed.flatten(), in_process.parameters.flatten(), rtol=0, atol=1e-6)


# -- refusals: one coordinator waits for nodes while refused ones knock ------------------------


def test_coordinator_refuses_client_without_certificate(refusing_coordinator: RefusingCoordinator) -> None:
    seen = refusing_coordinator.event_count()
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.read_pem(refusing_coordinator.layout.certs_dir / "ca.pem"))
    with grpc.secure_channel(f"127.0.0.1:{refusing_coordinator.port}", credentials) as channel:
        join = channel.unary_unary(
            "/fedcare.v1.Federation/Join",
            request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            join(pb.JoinRequest(fedcare_version=__version__), timeout=10)

    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # the handshake fails; no call is answered
    wait_for_refusal(refusing_coordinator, seen, "NO_CERTIFICATE")
    assert "refused a connection: no client certificate" in refusing_coordinator.process.stderr()


def test_coordinator_refuses_node_certified_by_another_ca(
    refusing_coordinator: RefusingCoordinator, processes: ProcessGroup, tmp_path: Path
) -> None:
    layout = refusing_coordinator.layout
    impostor_ca = tmp_path / "impostor-ca"
    pki.init_ca(impostor_ca, federation="impostor")
    pki.issue_certificate(impostor_ca, role="node", name="cleveland", lifetime_days=1)
    node_certs = tmp_path / "node-certs"  # the federation's CA (to trust the server), the impostor's node cert
    node_certs.mkdir()
    shutil.copy(layout.certs_dir / "ca.pem", node_certs / "ca.pem")
    for suffix in ("pem", "key"):
        shutil.copy(impostor_ca / f"cleveland.{suffix}", node_certs / f"cleveland.{suffix}")
    seen = refusing_coordinator.event_count()

    node = processes.node(
        "cleveland", layout.node_configs["cleveland"], port=refusing_coordinator.port, certs_dir=node_certs,
        give_up_after_s=3,
    )

    assert node.wait(timeout_s=60) == 5  # TransportError
    assert "unreachable for 3 s: UNAVAILABLE" in node.stderr()  # TLS refusals reach the node only as a dropped link
    wait_for_refusal(refusing_coordinator, seen, "UNKNOWN_CA")
    assert "refused a connection: certificate not signed by the federation CA" in refusing_coordinator.process.stderr()


def test_coordinator_refuses_node_with_expired_certificate(
    refusing_coordinator: RefusingCoordinator, processes: ProcessGroup
) -> None:
    layout = refusing_coordinator.layout
    now = dt.datetime.now(UTC)
    pki.issue_certificate(
        layout.certs_dir, role="node", name="switzerland",
        not_valid_before=now - dt.timedelta(days=3), not_valid_after=now - dt.timedelta(days=1),
    )
    seen = refusing_coordinator.event_count()

    node = processes.node(
        "switzerland", layout.node_configs["switzerland"], port=refusing_coordinator.port,
        certs_dir=layout.certs_dir, give_up_after_s=3,
    )

    assert node.wait(timeout_s=60) == 5  # TransportError
    assert "unreachable for 3 s: UNAVAILABLE" in node.stderr()
    wait_for_refusal(refusing_coordinator, seen, "EXPIRED")
    assert "refused a connection: certificate expired or not yet valid" in refusing_coordinator.process.stderr()


def test_coordinator_refuses_node_whose_certificate_was_revoked_while_it_waited(
    refusing_coordinator: RefusingCoordinator, processes: ProcessGroup
) -> None:
    layout = refusing_coordinator.layout
    pki.revoke_certificate(layout.certs_dir, "hungary")  # the running coordinator reloads crl.pem
    seen = refusing_coordinator.event_count()

    node = processes.node(
        "hungary", layout.node_configs["hungary"], port=refusing_coordinator.port,
        certs_dir=layout.certs_dir, give_up_after_s=5,
    )

    assert node.wait(timeout_s=60) == 6  # PolicyViolation
    assert "the coordinator refused this node: refused: certificate revoked" in node.stderr()
    [event, *_] = wait_for_refusal(refusing_coordinator, seen, "REVOKED")
    assert event["node_id"] == "hungary"
    assert "refused a connection: certificate revoked (node hungary)" in refusing_coordinator.process.stderr()


def test_coordinator_refuses_valid_node_the_plan_does_not_name(
    refusing_coordinator: RefusingCoordinator, processes: ProcessGroup, tmp_path: Path
) -> None:
    layout = refusing_coordinator.layout
    pki.issue_certificate(layout.certs_dir, role="node", name="st-elsewhere", lifetime_days=1)
    config = tmp_path / "st-elsewhere.yaml"
    config.write_text(yaml.safe_dump({"name": "st-elsewhere", "datasets": {"heart-disease": {"site": "cleveland"}}}))
    seen = refusing_coordinator.event_count()

    node = processes.node(
        "st-elsewhere", config, port=refusing_coordinator.port, certs_dir=layout.certs_dir, give_up_after_s=5
    )

    assert node.wait(timeout_s=60) == 6  # PolicyViolation
    assert "the coordinator refused this node: refused: node not admitted by the plan" in node.stderr()
    [event, *_] = wait_for_refusal(refusing_coordinator, seen, "NOT_IN_PLAN")
    assert event["node_id"] == "st-elsewhere"
    assert "refused a connection: node not admitted by the plan (node st-elsewhere)" in refusing_coordinator.process.stderr()


# -- failures and ordering -----------------------------------------------------------------------

#: Many quick rounds: the run outlasts the restart of a killed node by a wide margin (a restarted
#: node is back within about 100 rounds here); the test stops it once the node has trained again.
KILL_TEST_ROUNDS = 2000


def kill_after_first_round(coordinator: Launched, run_dir: Path, victim: Launched) -> None:
    """Wait for round 1 to end, then SIGKILL ``victim``."""

    def round_ended() -> bool:
        assert coordinator.running(), coordinator.stderr()[-3000:]
        return any(e["event"] == "round_end" and e["round"] >= 1 for e in read_events(run_dir))

    wait_for(round_ended, timeout_s=90, what="round 1 to end")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout_s=10)


def test_node_killed_mid_round_is_left_out_and_rejoins_after_restart(tmp_path: Path, processes: ProcessGroup) -> None:
    layout = deploy(tmp_path, rounds=KILL_TEST_ROUNDS, min_nodes=2, evaluation={"every_rounds": KILL_TEST_ROUNDS})
    coordinator = processes.serve("coordinator", layout, interruptible=True)  # stopped with Ctrl-C below
    port = endpoint_port(coordinator, layout.run_dir)
    nodes = {site: processes.node(site, config, port=port, certs_dir=layout.certs_dir)
             for site, config in layout.node_configs.items()}
    victim = "hungary"

    kill_after_first_round(coordinator, layout.run_dir, nodes[victim])

    def victim_left_out() -> tuple[int, ...]:
        """(index of the first event that leaves the victim out,) or () before there is one."""
        events = read_events(layout.run_dir)
        return next(((i,) for i, e in enumerate(events)
                     if e["event"] in ("node_failed", "node_late") and e["node_id"] == victim), ())

    [left_out_at] = wait_for(victim_left_out, timeout_s=30, what=f"{victim} to be left out")
    processes.node(f"{victim}-restarted", layout.node_configs[victim], port=port, certs_dir=layout.certs_dir)

    def rounds_back() -> list[int]:
        """The rounds the victim completed after it was left out (fails the test if the run ends first)."""
        assert coordinator.running(), f"the run ended first:\n{coordinator.stderr()[-3000:]}"
        events = read_events(layout.run_dir)
        return [e["round"] for e in events[left_out_at:] if e["event"] == "round_end" and victim in e["nodes_ok"]]

    back = wait_for(rounds_back, timeout_s=180, what=f"{victim} to complete a round after it was left out")
    assert back and min(back) > 2, back
    # The rest of the run proves nothing more: stop it as an operator would, with Ctrl-C.
    coordinator.process.send_signal(signal.SIGINT)
    assert coordinator.wait(timeout_s=60) == 130, coordinator.stderr()[-3000:]
    assert "interrupted" in coordinator.stderr()


def test_node_started_before_coordinator_waits_and_joins(tmp_path: Path, processes: ProcessGroup) -> None:
    layout = deploy(tmp_path, rounds=3, evaluation={"every_rounds": 3})
    port = free_port()
    nodes = [processes.node(site, config, port=port, certs_dir=layout.certs_dir)
             for site, config in layout.node_configs.items()]
    time.sleep(2)
    assert all(node.running() for node in nodes), "a node gave up before its coordinator started"

    coordinator = processes.serve("coordinator", layout, listen=f"127.0.0.1:{port}")

    assert coordinator.wait(timeout_s=120) == 0, coordinator.stderr()[-3000:]
    assert json.loads(coordinator.stdout())["rounds"] == 3


# -- the deployed demo ---------------------------------------------------------------------------


def run_demo(out: Path, *options: str) -> dict[str, Any]:
    """``fedcare demo --json --out OUT [options]``: its JSON summary."""
    # Its own session, so that the demo and the coordinator and nodes it starts can be killed together.
    demo = subprocess.Popen(
        [*FEDCARE, "demo", "--json", "--out", str(out), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=child_env(), cwd=out.parent, start_new_session=True,
    )
    try:
        stdout, stderr = demo.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("fedcare demo did not finish within 240 s")
    finally:
        try:
            os.killpg(demo.pid, signal.SIGKILL)  # whatever of the group is left, normally nothing
        except ProcessLookupError:
            pass
        if demo.poll() is None:
            demo.communicate(timeout=10)
    assert demo.returncode == 0, stderr.decode(errors="replace")[-3000:]
    summary: dict[str, Any] = json.loads(stdout)
    return summary


@pytest.fixture(scope="module")
def deployed_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """``fedcare demo --json --out DIR`` run once (record-level DP on): its JSON summary and DIR."""
    out = tmp_path_factory.mktemp("demo") / "run"
    return run_demo(out), out


def test_deployed_demo_prints_a_json_summary_of_four_hospitals(deployed_demo: tuple[dict[str, Any], Path]) -> None:
    summary, out = deployed_demo
    assert Path(summary["run_dir"]) == out
    assert summary["rounds"] == load_plan(demo_plan_path()).rounds
    assert sorted(summary["sites"]) == sorted(SITES)
    assert 0.7 < summary["mean_site_accuracy"] <= 1.0
    assert summary["wall_s"] > 0


def test_deployed_demo_spends_each_hospitals_epsilon_within_its_budget(deployed_demo: tuple[dict[str, Any], Path]) -> None:
    summary, out = deployed_demo
    assert sorted(summary["epsilon_spent"]) == sorted(SITES)
    for site, spent in summary["epsilon_spent"].items():
        assert 0.9 <= spent <= 1.0 + 1e-9, site
        ledger = json.loads((out / "nodes" / f"{site}-privacy-ledger" / "heart-disease.ledger.json").read_text())
        assert ledger["entries"][-1]["epsilon_after"] == pytest.approx(spent)


def test_deployed_demo_keeps_one_log_per_process(deployed_demo: tuple[dict[str, Any], Path]) -> None:
    _, out = deployed_demo
    logs = {path.name for path in (out / "logs").iterdir()}
    assert logs == {"coordinator.log", *(f"{site}.log" for site in SITES)}
    assert "listening on 127.0.0.1:" in (out / "logs" / "coordinator.log").read_text()


def test_deployed_demo_with_secure_aggregation_matches_plain_in_process_accuracy(tmp_path: Path) -> None:
    # The demo without DP runs SecAgg+ over gRPC and mTLS; plain FedAvg in one process is the reference.
    summary = run_demo(tmp_path / "run", "--no-dp")
    assert summary["privacy"]["secure_aggregation"] is True
    plan = load_plan(demo_plan_path(private=False))
    plain = simulate(plan.model_copy(update={"secure_aggregation": plan.secure_aggregation.model_copy(update={"enabled": False})}))
    assert plain.final_evaluation is not None
    assert abs(summary["mean_site_accuracy"] - plain.final_evaluation.mean["accuracy"]) <= 0.01


# -- record-level differential privacy --------------------------------------------------------


def test_privacy_ledger_survives_sigkill_between_rounds_and_never_goes_down(tmp_path: Path, processes: ProcessGroup) -> None:
    # Enough rounds that the restarted node is back before the run ends.
    layout = deploy(
        tmp_path,
        rounds=40,
        min_nodes=2,
        evaluation={"every_rounds": 40},
        privacy={"record_level": {"enabled": True, "epsilon": 2.0, "delta": 1e-3, "accountant": "rdp"}},
    )
    coordinator = processes.serve("coordinator", layout)
    port = endpoint_port(coordinator, layout.run_dir)
    nodes = {site: processes.node(site, config, port=port, certs_dir=layout.certs_dir)
             for site, config in layout.node_configs.items()}  # fmt: skip
    victim = "hungary"
    ledger_path = layout.node_configs[victim].parent / f"{victim}-privacy-ledger" / "heart-disease.ledger.json"

    kill_after_first_round(coordinator, layout.run_dir, nodes[victim])
    before = json.loads(ledger_path.read_text())["entries"]
    assert [e["label"] for e in before[:2]] == ["feature-stats", "dp-sgd"]

    processes.node(f"{victim}-restarted", layout.node_configs[victim], port=port, certs_dir=layout.certs_dir)
    assert coordinator.wait(timeout_s=180) == 0, coordinator.stderr()[-3000:]

    after = json.loads(ledger_path.read_text())["entries"]
    assert after[: len(before)] == before  # nothing recorded was lost or changed
    spent = [e["epsilon_after"] for e in after]
    assert spent == sorted(spent) and len(after) > len(before)  # it trained again after the restart
    assert spent[-1] <= 2.0 + 1e-9
    summary = json.loads(coordinator.stdout().strip().splitlines()[-1])
    assert summary["epsilon_spent"][victim] == pytest.approx(spent[-1])
