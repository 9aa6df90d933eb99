"""What lets one coordinator serve hundreds of nodes: idle waits cost nothing, and waiting is not dying.

Real mutual TLS on 127.0.0.1 with raw protocol clients (no heartbeat thread),
so each test sees exactly what the server does on its own.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.plan import parse_plan
from fedcare.transport import pki, wire
from fedcare.transport.grpc_server import GrpcTransport, grpc_options
from fedcare.transport.proto import fedcare_pb2 as pb
from fedcare.transport.proto import fedcare_pb2_grpc as pb_grpc

NODES = ("site-a", "site-b")
RUN_ID = "run-scaling"


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    pki.init_ca(directory, federation="scaling")
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=("127.0.0.1",))
    for name in NODES:
        pki.issue_certificate(directory, role="node", name=name)
    return directory


def serve(certs: Path, *, heartbeat_interval_s: float, max_concurrent_uploads: int = 2, admitted: int = 2) -> GrpcTransport:
    """A coordinator admitting ``NODES`` and, to size its thread pool, ``admitted - 2`` more names."""
    names = [*NODES, *(f"site-{i}" for i in range(admitted - len(NODES)))]
    plan = parse_plan({"task": "t", "dataset": {"name": "d", "normalization": "none"}, "rounds": 1, "nodes": names})
    transport = GrpcTransport(plan, listen="127.0.0.1:0", certs_dir=certs, heartbeat_interval_s=heartbeat_interval_s,
                              max_concurrent_uploads=max_concurrent_uploads)  # fmt: skip
    transport.set_run(RUN_ID)
    return transport


def stub_for(transport: GrpcTransport, certs: Path, name: str) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read_pem(certs / "ca.pem"),
        private_key=pki.read_pem(certs / f"{name}.key"),
        certificate_chain=pki.read_pem(certs / f"{name}.pem"),
    )
    channel = grpc.secure_channel(f"127.0.0.1:{transport.port}", credentials, options=grpc_options(wire.DEFAULT_CHUNK_BYTES))
    return channel, pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]


def voluntary_switches() -> int:
    """Voluntary context switches of every thread of this process so far (each wake of a sleeping thread is one)."""
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def test_idle_long_polls_do_not_wake_the_coordinator(certs: Path) -> None:
    transport = serve(certs, heartbeat_interval_s=5.0, admitted=20)
    channel, stub = stub_for(transport, certs, "site-a")
    polls = 60
    try:
        stub.Join(pb.JoinRequest(), timeout=10)
        waiting = [stub.PullJob.future(pb.PullRequest(run_id=RUN_ID, wait_s=8.0), timeout=20) for _ in range(polls)]
        deadline = time.monotonic() + 10
        while transport._nodes["site-a"].polls < polls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert transport._nodes["site-a"].polls == polls
        before = voluntary_switches()
        time.sleep(2.0)
        woken = voluntary_switches() - before
    finally:
        transport.close()
        channel.close()
    # Waking each waiting call every 0.25 s would be 60 x 4 x 2 = 480 wakes; an idle wait is close to none.
    assert woken < 120, f"{woken} thread wakes in 2 s with {polls} idle long polls"
    assert all(f.result().shutdown for f in waiting)  # close() answered every waiting poll at once


def _upload(job: Job, update: Parameters, *, hold: threading.Event | None = None) -> Iterator[pb.UploadRequest]:
    payload = wire.Payload.of(update)
    result = JobResult(job.run_id, job.round, job.job_id, job.kind, node_id="x", num_examples=1, update=update)
    yield pb.UploadRequest(header=wire.result_header(result, payload))
    if hold is not None:
        hold.wait(30)
    for offset, data in payload.chunks(0):
        yield pb.UploadRequest(chunk=pb.Chunk(offset=offset, data=data))


def test_a_node_waiting_for_an_upload_slot_is_not_taken_for_gone(certs: Path) -> None:
    # One slot, and a heartbeat timeout of 3 x 0.2 + 1 = 1.6 s: site-b waits for site-a's slot longer than that.
    transport = serve(certs, heartbeat_interval_s=0.2, max_concurrent_uploads=1)
    parameters = Parameters({"w": np.zeros(1000, dtype=np.float32)}).freeze()
    update = Parameters({"w": np.ones(1000, dtype=np.float32)}).freeze()
    jobs = {name: Job(RUN_ID, 1, uuid.uuid4().hex, JobKind.TRAIN, plan_hash="h", parameters=parameters) for name in NODES}
    links = {name: stub_for(transport, certs, name) for name in NODES}
    hold = threading.Event()
    try:
        for name, (_, stub) in links.items():
            stub.Join(pb.JoinRequest(), timeout=10)
            transport.submit(name, jobs[name])
        holder = links["site-a"][1].PushResult.future(_upload(jobs["site-a"], update, hold=hold), timeout=30)
        time.sleep(0.5)  # site-a holds the only slot
        waiter = links["site-b"][1].PushResult.future(_upload(jobs["site-b"], update), timeout=30)
        time.sleep(2.5)
        reachable = transport.nodes()
        hold.set()
        assert holder.result().complete and waiter.result().complete
        late = list(transport.results([jobs["site-b"].job_id], timeout_s=10))
    finally:
        hold.set()
        transport.close()
        for channel, _ in links.values():
            channel.close()
    assert "site-b" in reachable  # not taken for gone (and its job failed) while it waited its turn
    assert [(r.node_id, r.ok) for r in late] == [("site-b", True)]
