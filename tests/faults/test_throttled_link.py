"""A site on a 1 Mbit/s link with delays and dropped connections still completes, and compression shrinks its upload.

Everything is real and on 127.0.0.1: a coordinator (``Coordinator`` over
``GrpcTransport``, mutual TLS) in the test's thread and three heart-disease
sites (``Node`` over ``GrpcNodeChannel``) in threads. Only the first site dials
through a :class:`FaultProxy`: 125,000 bytes/s each way, 50-150 ms of delay
per chunk, and every connection cut once while it trains its first round. The
others dial the coordinator directly. The same plan runs with int8 and with
top-k 1 %; the throttled site's upload bytes per round come from the
coordinator's events (those ``metrics.jsonl`` holds) and are compared with the
update's float32 size (an uncompressed run would only add its metrics to it).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")  # grpcio is not a core dependency

from fedcare.messages import Job, JobKind  # noqa: E402
from fedcare.plan import Plan, parse_plan  # noqa: E402
from fedcare.transport import pki  # noqa: E402
from fedcare.transport.grpc_client import Backoff  # noqa: E402
from tests.faults.harness import run_over_proxy  # noqa: E402
from tests.faults.proxy import FaultProxy  # noqa: E402

SITES = ("cleveland", "hungary", "switzerland")
SLOW_SITE = SITES[0]
#: 1 Mbit/s.
LINK_BYTES_PER_S = 125_000
#: 13 * 256 + 256 + 256 + 1 = 3,841 float32 values: 15 kB uncompressed.
HIDDEN_UNITS = 256
FLOAT32_UPDATE_BYTES = 4 * (13 * HIDDEN_UNITS + HIDDEN_UNITS + HIDDEN_UNITS + 1)
ROUNDS = 2


def throttled_plan(method: str) -> Plan:
    return parse_plan(
        {
            "name": "throttled-link",
            "task": "tabular-mlp",
            "dataset": {"name": "heart-disease", "normalization": "per-site"},
            "model": {"hidden_units": HIDDEN_UNITS},
            "nodes": list(SITES),
            "rounds": ROUNDS,
            "min_nodes": len(SITES),  # the slow site must be in every round
            "round_timeout_s": 45,
            "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.01},
            "evaluation": {"every_rounds": ROUNDS},
            "compression": {"method": method, "topk_fraction": 0.01},
            "seed": 0,
        }
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    pki.init_ca(directory, federation="throttled")
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=("127.0.0.1",))
    for site in SITES:
        pki.issue_certificate(directory, role="node", name=site)
    return directory


def run_throttled(certs: Path, method: str) -> tuple[Any, list[dict[str, Any]], int]:
    """Run the plan with ``method``; return the result, the events of metrics.jsonl and the proxy's cuts."""

    def throttle(proxy: FaultProxy) -> None:
        for direction in (proxy.up, proxy.down):
            direction.bytes_per_s = LINK_BYTES_PER_S
            direction.latency_s = (0.05, 0.15)

    cut = threading.Event()

    def cut_while_training(site: str, job: Job, proxy: FaultProxy) -> None:
        if site == SLOW_SITE and job.kind is JobKind.TRAIN and not cut.is_set():
            cut.set()
            proxy.cut_all()  # the connection drops while the site trains; it reconnects to upload

    events: list[dict[str, Any]] = []
    run = run_over_proxy(
        throttled_plan(method),
        certs,
        SITES,
        proxy_seed=3,
        proxied=(SLOW_SITE,),
        arrange=throttle,
        on_job=cut_while_training,
        transport_options={"heartbeat_interval_s": 2.0},
        channel_options={"give_up_after_s": 30, "backoff": lambda: Backoff(initial_s=0.05, maximum_s=0.5)},
        # The events metrics.jsonl would hold, as they are logged; no run directory, so no
        # report.html to render (seconds of matplotlib per run, tested elsewhere).
        on_event=events.append,
    )
    return run.result, events, run.proxy.counters().cuts


def upload_per_round(events: list[dict[str, Any]], site: str) -> list[int]:
    return [e["bytes"][site]["up"] for e in events if e["event"] == "round_end"]


@pytest.fixture(scope="module")
def runs(certs: Path) -> dict[str, tuple[Any, list[dict[str, Any]], int]]:
    return {method: run_throttled(certs, method) for method in ("int8", "topk")}


def test_runs_over_a_1_mbit_link_with_delays_and_a_dropped_connection_complete(runs: dict[str, Any]) -> None:
    for method, (result, events, cuts) in runs.items():
        assert result.rounds_completed == ROUNDS, method
        assert result.failures == [], method
        assert cuts >= 1, method  # the slow site's connection really dropped
        assert [sorted(e["nodes_ok"]) for e in events if e["event"] == "round_end"] == [sorted(SITES)] * ROUNDS
        assert result.final_evaluation is not None and set(result.final_evaluation.sites) == set(SITES), method


def test_int8_shrinks_the_throttled_sites_upload_at_least_4_times(runs: dict[str, Any]) -> None:
    int8 = upload_per_round(runs["int8"][1], SLOW_SITE)
    assert all(FLOAT32_UPDATE_BYTES / c >= 4 for c in int8), int8  # metrics included; deflate pays for them
    ratios = [e["compression"]["ratio"][SLOW_SITE] for e in runs["int8"][1] if e["event"] == "round_end"]
    assert all(r >= 4.0 for r in ratios), ratios


def test_topk_one_percent_shrinks_the_throttled_sites_upload_at_least_20_times(runs: dict[str, Any]) -> None:
    topk = upload_per_round(runs["topk"][1], SLOW_SITE)
    assert all(FLOAT32_UPDATE_BYTES / c >= 20 for c in topk), topk
