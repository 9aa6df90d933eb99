"""Runs over links that delay, cut and go down still complete, with the fault-free model.

Everything is real and on 127.0.0.1: a coordinator (``Coordinator`` over
``GrpcTransport``, mutual TLS with certificates from ``fedcare.transport.pki``)
in the test's thread, and three heart-disease sites (``Node`` over
``GrpcNodeChannel``) in threads, all dialling through one :class:`FaultProxy`.
The model (a 13-16000-1 perceptron, about 1 MB) crosses in 128 KiB chunks, so
the proxy's cuts land in the middle of transfers. Each faulted run is compared
with the same plan and seed run through the proxy without faults.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("grpc")  # grpcio is not a core dependency

from fedcare.errors import FedcareError  # noqa: E402
from fedcare.federation.coordinator import RunResult  # noqa: E402
from fedcare.federation.rundir import RunDirectory  # noqa: E402
from fedcare.messages import Job, JobKind  # noqa: E402
from fedcare.plan import Plan, parse_plan  # noqa: E402
from fedcare.transport import pki  # noqa: E402
from fedcare.transport.grpc_client import Backoff, GrpcNodeChannel, TransportCounters  # noqa: E402
from fedcare.transport.grpc_server import GrpcTransport  # noqa: E402
from tests.faults.harness import OnJob, run_over_proxy  # noqa: E402
from tests.faults.proxy import FaultProxy, ProxyCounters  # noqa: E402

SITES = ("cleveland", "hungary", "switzerland")
CHUNK_BYTES = 128 * 1024
#: 13 * 16000 + 16000 + 16000 + 1 float32 values: about 1 MB, 8 chunks each way per job.
HIDDEN_UNITS = 16_000
#: Cut every connection after this many bytes each way: twice or so per model transfer.
CUT_AFTER_BYTES = 400_000
#: A node silent for three intervals plus one second is taken as gone: 7 s, longer than the link is down.
HEARTBEAT_INTERVAL_S = 2.0
LINK_DOWN_S = 2.5

def fault_plan() -> Plan:
    return parse_plan(
        {
            "name": "network-faults",
            "task": "tabular-mlp",
            "dataset": {"name": "heart-disease", "normalization": "per-site"},
            "model": {"hidden_units": HIDDEN_UNITS},
            "nodes": list(SITES),
            "rounds": 2,
            "min_nodes": len(SITES),  # a site lost to a fault fails the run instead of changing the model
            "round_timeout_s": 45,
            "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.01},
            "evaluation": {"every_rounds": 2},
            "seed": 0,
        }
    )


@dataclass
class FederationRun:
    result: RunResult
    events: list[dict[str, Any]]
    proxy: ProxyCounters
    channels: dict[str, TransportCounters]

    def transport(self) -> dict[str, dict[str, int]]:
        """Each node's counters summed over the events of metrics.jsonl that carry them."""
        totals: dict[str, dict[str, int]] = {}
        for event in self.events:
            for node, counts in event.get("transport", {}).items():
                node_totals = totals.setdefault(node, {})
                for name, value in counts.items():
                    node_totals[name] = node_totals.get(name, 0) + value
        return totals

    def total(self, name: str) -> int:
        return sum(counts[name] for counts in self.transport().values())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    pki.init_ca(directory, federation="faults")
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=("127.0.0.1",))
    for site in SITES:
        pki.issue_certificate(directory, role="node", name=site)
    return directory


def quick_backoff() -> Backoff:
    return Backoff(initial_s=0.05, maximum_s=0.5)


def run_federation(
    workdir: Path, certs: Path, *, arrange: Callable[[FaultProxy], None] | None = None, on_job: OnJob | None = None
) -> FederationRun:
    """Run the plan through a proxy set up by ``arrange``; ``on_job`` sees each job a site pulls."""
    run = run_over_proxy(
        fault_plan(),
        certs,
        SITES,
        proxy_seed=7,
        arrange=arrange,
        on_job=on_job,
        transport_options={"chunk_bytes": CHUNK_BYTES, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S},
        channel_options={"chunk_bytes": CHUNK_BYTES, "give_up_after_s": 30, "backoff": quick_backoff},
        run_dir=RunDirectory(workdir / "run"),
    )
    events = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines() if line]
    channels = {site: channel.counters() for site, channel in run.channels.items()}
    return FederationRun(run.result, events, run.proxy.counters(), channels)


@pytest.fixture(scope="module")
def clean_run(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> FederationRun:
    return run_federation(tmp_path_factory.mktemp("clean"), certs)


def assert_same_model(faulted: FederationRun, clean: FederationRun) -> None:
    """Every round completed by every site, and the final model of the run without faults."""
    assert faulted.result.rounds_completed == fault_plan().rounds
    assert faulted.result.failures == []
    # Bit for bit in practice; FedAvg folds updates in arrival order in float64, so allow its rounding.
    np.testing.assert_allclose(faulted.result.parameters.flatten(), clean.result.parameters.flatten(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- tests


def test_run_without_faults_logs_zero_transport_counters_for_every_site(clean_run: FederationRun) -> None:
    round_ends = [e for e in clean_run.events if e["event"] == "round_end"]
    assert len(round_ends) == fault_plan().rounds
    for event in round_ends:
        assert sorted(event["transport"]) == sorted(SITES)
        assert all(value == 0 for counts in event["transport"].values() for value in counts.values())
    assert clean_run.proxy.cuts == 0
    # The counters are kept out of the sites' evaluation metrics.
    (evaluation,) = [e for e in clean_run.events if e["event"] == "evaluation"]
    assert not any(name.startswith("transport_") for site in evaluation["sites"].values() for name in site)
    assert not any(name.startswith("transport_") for name in evaluation["mean"])


def test_run_over_a_link_with_100_to_300_ms_latency_ends_with_the_fault_free_model(
    clean_run: FederationRun, certs: Path, tmp_path: Path
) -> None:
    def slow(proxy: FaultProxy) -> None:
        proxy.up.latency_s = proxy.down.latency_s = (0.1, 0.3)

    run = run_federation(tmp_path, certs, arrange=slow)

    assert_same_model(run, clean_run)
    assert run.total("retries") == 0  # a slow link is not a broken one


def test_connections_cut_every_400_kb_resume_downloads_and_uploads_and_end_with_the_fault_free_model(
    clean_run: FederationRun, certs: Path, tmp_path: Path
) -> None:
    def cutting(proxy: FaultProxy) -> None:
        proxy.up.cut_after_bytes = proxy.down.cut_after_bytes = CUT_AFTER_BYTES

    run = run_federation(tmp_path, certs, arrange=cutting)

    assert_same_model(run, clean_run)
    assert run.proxy.cuts >= 6
    assert run.total("resumed_downloads") > 0 and run.total("resumed_uploads") > 0 and run.total("retries") > 0
    # What metrics.jsonl holds came from the channels' own counts (the last upload's retries travel with no result).
    for site, counts in run.transport().items():
        assert counts["resumed_downloads"] <= run.channels[site].resumed_downloads


def test_random_drops_with_a_fixed_seed_are_retried_and_end_with_the_fault_free_model(
    clean_run: FederationRun, certs: Path, tmp_path: Path
) -> None:
    def dropping(proxy: FaultProxy) -> None:
        # Towards the coordinator only: a cut job announcement would be lost (see the next test).
        proxy.up.drop_probability = 0.01

    run = run_federation(tmp_path, certs, arrange=dropping)

    assert_same_model(run, clean_run)
    assert run.proxy.cuts > 0
    assert run.total("retries") > 0


def test_link_down_for_seconds_mid_round_is_retried_with_reconnects_and_ends_with_the_fault_free_model(
    clean_run: FederationRun, certs: Path, tmp_path: Path
) -> None:
    taken_down = threading.Event()

    def down_while_training(site: str, job: Job, proxy: FaultProxy) -> None:
        # Every job of round 2 is out by now, so no announcement is in flight when the link drops.
        if site == SITES[0] and job.kind is JobKind.TRAIN and job.round == 2 and not taken_down.is_set():
            taken_down.set()
            proxy.link_down(LINK_DOWN_S)

    run = run_federation(tmp_path, certs, on_job=down_while_training)

    assert taken_down.is_set()
    assert_same_model(run, clean_run)
    assert run.proxy.refused > 0
    assert run.total("retries") > 0 and run.total("reconnects") > 0


def test_job_announcement_cut_in_flight_is_offered_again(certs: Path) -> None:
    plan = parse_plan({"task": "plus-one", "dataset": {"name": "none"}, "rounds": 1, "nodes": [SITES[0]]})
    transport = GrpcTransport(plan, listen="127.0.0.1:0", certs_dir=certs, heartbeat_interval_s=30)
    transport.set_run("run-announce")
    proxy = FaultProxy(transport.port)
    channel = GrpcNodeChannel(proxy.address, certs_dir=certs, name=SITES[0], give_up_after_s=10, backoff=quick_backoff)
    pulled: list[Job | None] = []
    try:
        channel.join()
        polling = threading.Thread(target=lambda: pulled.append(channel.pull_job(timeout_s=3)))
        polling.start()
        time.sleep(0.5)  # the long poll is waiting at the coordinator
        proxy.down.cut_after_bytes = 1  # the next bytes towards the node, the job's header, cut the link
        job = Job("run-announce", 1, uuid.uuid4().hex, JobKind.FEATURE_STATS, plan_hash="h")
        transport.submit(SITES[0], job)
        deadline = time.monotonic() + 5
        while proxy.counters().cuts == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        proxy.down.cut_after_bytes = None  # the node's new connection goes through
        polling.join(timeout=20)
    finally:
        closing = threading.Thread(target=transport.close)  # it waits for the node to hear that the run is over
        closing.start()
        with contextlib.suppress(FedcareError):
            channel.pull_job(timeout_s=1)
        closing.join(timeout=30)
        channel.close()
        proxy.close()
    assert proxy.counters().cuts >= 1
    assert pulled and pulled[0] is not None and pulled[0].job_id == job.job_id
