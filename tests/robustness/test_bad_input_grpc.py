"""Bad input at the coordinator's gRPC endpoint: each refused, named, logged, and nothing changes.

A raw protocol client holding a real node certificate sends what a correct
node never would. For every case the test checks the gRPC status and the
detail that names the problem, that the coordinator logged the refusal, and
that its state did not change: the job is still outstanding and a correct
upload of the same result afterwards is delivered exactly once, intact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from fedcare.messages import Job, JobResult  # noqa: E402
from fedcare.params import Parameters  # noqa: E402
from fedcare.plan import parse_plan  # noqa: E402
from fedcare.transport import pki, wire  # noqa: E402
from fedcare.transport.grpc_server import GrpcTransport  # noqa: E402
from fedcare.transport.proto import fedcare_pb2 as pb  # noqa: E402
from tests.transport.conftest import issue_federation_certs  # noqa: E402
from tests.transport.test_grpc_transfer import model, stub_for, train_job, upload  # noqa: E402

NODES = ("site-a", "site-b")
RUN_ID = "run-transfer"  # the run the shared helpers' jobs belong to
MODEL_VALUES = 4096


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = issue_federation_certs(tmp_path / "certs", NODES)
    pki.issue_certificate(directory, role="node", name="stranger")  # signed by the CA, not in the plan
    return directory


@pytest.fixture
def coordinator(certs: Path) -> Iterator[GrpcTransport]:
    plan = parse_plan({"task": "plus-one", "dataset": {"name": "none"}, "rounds": 1, "nodes": list(NODES)})
    transport = GrpcTransport(plan, listen="127.0.0.1:0", certs_dir=certs, heartbeat_interval_s=0.5)
    transport.set_run(RUN_ID)
    yield transport
    transport.close()


@dataclass(frozen=True)
class Held:
    """A job outstanding at site-a, and the update a correct node would send back."""

    job: Job
    update: Parameters


def chunks_of(update: Parameters) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(chunk=pb.Chunk(offset=o, data=d)) for o, d in wire.Payload.of(update).chunks(0, chunk_bytes=4096)]


def header_of(held: Held, **changes: object) -> pb.ResultHeader:
    result = JobResult(held.job.run_id, held.job.round, held.job.job_id, held.job.kind, node_id="x", num_examples=3, update=held.update)
    header = wire.result_header(result, wire.Payload.of(held.update))
    for name, value in changes.items():
        setattr(header, name, value)
    return header


def _no_header(held: Held) -> list[pb.UploadRequest]:
    return chunks_of(held.update)


def _second_header(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held)), *chunks_of(held.update)[:1], pb.UploadRequest(header=header_of(held))]


def _offset_gap(held: Held) -> list[pb.UploadRequest]:
    first, second, *_ = chunks_of(held.update)
    return [pb.UploadRequest(header=header_of(held)), first, pb.UploadRequest(chunk=pb.Chunk(offset=second.chunk.offset + 8, data=second.chunk.data))]


def _chunk_past_the_end(held: Held) -> list[pb.UploadRequest]:
    *_, last = chunks_of(held.update)
    return [pb.UploadRequest(header=header_of(held)), pb.UploadRequest(chunk=pb.Chunk(offset=0, data=b"\0" * (wire.Payload.of(held.update).total_bytes + 64)))]


def _wrong_hash(held: Held) -> list[pb.UploadRequest]:
    header = header_of(held)
    header.update.sha256 = bytes(32)
    return [pb.UploadRequest(header=header), *chunks_of(held.update)]


def _announced_size_above_the_model(held: Held) -> list[pb.UploadRequest]:
    header = header_of(held)
    header.update.total_bytes = 50 * MODEL_VALUES * 4
    return [pb.UploadRequest(header=header)]


def _another_run(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held, run_id="another-run")), *chunks_of(held.update)]


def _round_that_has_ended(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held, round=held.job.round - 1)), *chunks_of(held.update)]


def _unknown_job(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held, job_id="no-such-job")), *chunks_of(held.update)]


def _unknown_kind(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held, kind=97)), *chunks_of(held.update)]


def _data_not_json(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held, data_json="{'keys': [1, 2")), *chunks_of(held.update)]


def _data_not_an_object(held: Held) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(header=header_of(held, data_json="[1, 2, 3]")), *chunks_of(held.update)]


def _not_parameters(held: Held) -> list[pb.UploadRequest]:
    junk = np.random.default_rng(0).bytes(wire.Payload.of(held.update).total_bytes)
    header = header_of(held)
    header.update.sha256 = __import__("hashlib").sha256(junk).digest()
    return [pb.UploadRequest(header=header), pb.UploadRequest(chunk=pb.Chunk(offset=0, data=junk))]


@dataclass(frozen=True)
class Case:
    name: str
    messages: Callable[[Held], list[pb.UploadRequest]]
    code: str
    detail: str


UPLOAD_CASES = [
    Case("chunk before the header", _no_header, "INVALID_ARGUMENT", "starts with its header"),
    Case("a second header after chunks", _second_header, "INVALID_ARGUMENT", "only chunks may follow the header"),
    Case("chunk offset skips bytes", _offset_gap, "OUT_OF_RANGE", "does not follow"),
    Case("chunk runs past the announced size", _chunk_past_the_end, "OUT_OF_RANGE", "does not follow"),
    Case("wrong SHA-256", _wrong_hash, "DATA_LOSS", "SHA-256"),
    Case("announced size above the model's", _announced_size_above_the_model, "RESOURCE_EXHAUSTED", "refused; at most"),
    Case("result names another run", _another_run, "FAILED_PRECONDITION", "another run or round"),
    Case("result for a round that has ended", _round_that_has_ended, "FAILED_PRECONDITION", "another run or round"),
    Case("result for an unknown job id", _unknown_job, "FAILED_PRECONDITION", "does not hold"),
    Case("unknown job kind", _unknown_kind, "INVALID_ARGUMENT", "unknown job kind"),
    Case("side data is not JSON", _data_not_json, "INVALID_ARGUMENT", "not valid JSON"),
    Case("side data is not a JSON object", _data_not_an_object, "INVALID_ARGUMENT", "must be a JSON object"),
    Case("bytes that are not parameters", _not_parameters, "DATA_LOSS", "parameter"),
]


def hold_a_job(coordinator: GrpcTransport) -> Held:
    parameters = model(MODEL_VALUES)
    job = train_job(parameters, round_number=2)
    coordinator.submit("site-a", job)
    update = Parameters.from_flat(parameters.flatten() + np.float32(1), parameters.spec).freeze()
    return Held(job, update)


def assert_state_unchanged(coordinator: GrpcTransport, certs: Path, held: Held) -> None:
    """The job is still outstanding: a correct node's upload now is delivered once, bit for bit.

    A correct node asks how much of its upload arrived and resumes there (bytes
    that arrived before a refused chunk are kept; nothing else is).
    """
    channel, stub = stub_for(coordinator, certs, "site-a")
    with channel:
        status = stub.UploadStatus(pb.UploadStatusRequest(run_id=RUN_ID, job_id=held.job.job_id), timeout=30)
        assert not status.complete
        payload = wire.Payload.of(held.update)
        messages = [pb.UploadRequest(header=header_of(held))] + [
            pb.UploadRequest(chunk=pb.Chunk(offset=o, data=d)) for o, d in payload.chunks(int(status.received_bytes))
        ]
        reply = stub.PushResult(iter(messages), timeout=30)
    assert reply.complete
    delivered = list(coordinator.results([held.job.job_id], timeout_s=10))
    assert [r.job_id for r in delivered] == [held.job.job_id]
    assert delivered[0].ok and delivered[0].update is not None
    np.testing.assert_array_equal(delivered[0].update.flatten(), held.update.flatten())


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=[c.name for c in UPLOAD_CASES])
def test_bad_upload_is_refused_named_logged_and_changes_nothing(
    case: Case, coordinator: GrpcTransport, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = hold_a_job(coordinator)
    channel, stub = stub_for(coordinator, certs, "site-a")
    with caplog.at_level(logging.WARNING, logger="fedcare.transport.grpc_server"), channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushResult(iter(case.messages(held)), timeout=30)

    assert refused.value.code().name == case.code, refused.value.details()
    assert case.detail in refused.value.details()
    assert any(case.detail in r.getMessage() and case.code in r.getMessage() for r in caplog.records), caplog.text
    assert_state_unchanged(coordinator, certs, held)


def test_replayed_result_is_refused_and_delivered_once(coordinator: GrpcTransport, certs: Path, caplog: pytest.LogCaptureFixture) -> None:
    held = hold_a_job(coordinator)
    assert_state_unchanged(coordinator, certs, held)  # the first, correct, delivery
    channel, stub = stub_for(coordinator, certs, "site-a")
    with caplog.at_level(logging.WARNING, logger="fedcare.transport.grpc_server"), channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushResult(upload(held.job, held.update), timeout=30)

    assert refused.value.code().name == "ALREADY_EXISTS"
    assert "replay refused" in refused.value.details()
    assert "replay refused" in caplog.text
    assert list(coordinator.results([held.job.job_id], timeout_s=0.5)) == []


def test_result_for_another_nodes_job_is_refused(coordinator: GrpcTransport, certs: Path) -> None:
    held = hold_a_job(coordinator)
    channel, stub = stub_for(coordinator, certs, "site-b")
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(upload(held.job, held.update), timeout=30)

    assert refused.value.code().name == "FAILED_PRECONDITION"
    assert_state_unchanged(coordinator, certs, held)


def test_node_the_plan_does_not_admit_is_refused(coordinator: GrpcTransport, certs: Path, caplog: pytest.LogCaptureFixture) -> None:
    held = hold_a_job(coordinator)
    channel, stub = stub_for(coordinator, certs, "stranger")
    with caplog.at_level(logging.WARNING, logger="fedcare.transport.grpc_server"), channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushResult(upload(held.job, held.update), timeout=30)

    assert refused.value.code().name == "PERMISSION_DENIED"
    assert "refused" in refused.value.details()
    assert "PERMISSION_DENIED" in caplog.text
    assert coordinator.nodes() == []
    assert_state_unchanged(coordinator, certs, held)


def test_malformed_protobuf_bytes_are_refused(coordinator: GrpcTransport, certs: Path) -> None:
    held = hold_a_job(coordinator)
    channel, _ = stub_for(coordinator, certs, "site-a")
    raw = channel.stream_unary(
        "/fedcare.v1.Federation/PushResult", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with channel, pytest.raises(grpc.RpcError) as refused:
        raw(iter([b"\xff\xff\xff\xff not a protobuf message"]), timeout=30)

    assert refused.value.code().name in {"INTERNAL", "INVALID_ARGUMENT"}
    assert "deserializ" in refused.value.details().lower()
    assert_state_unchanged(coordinator, certs, held)


def test_message_above_the_size_limit_is_refused(coordinator: GrpcTransport, certs: Path) -> None:
    held = hold_a_job(coordinator)
    channel, stub = stub_for(coordinator, certs, "site-a")
    oversize = pb.UploadRequest(chunk=pb.Chunk(offset=0, data=b"\0" * (wire.DEFAULT_CHUNK_BYTES + 512 * 1024)))
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(iter([pb.UploadRequest(header=header_of(held)), oversize]), timeout=30)

    assert refused.value.code().name == "RESOURCE_EXHAUSTED"
    assert_state_unchanged(coordinator, certs, held)


def test_parameters_fetched_at_an_offset_outside_the_payload_are_refused(coordinator: GrpcTransport, certs: Path) -> None:
    held = hold_a_job(coordinator)
    channel, stub = stub_for(coordinator, certs, "site-a")
    with channel, pytest.raises(grpc.RpcError) as refused:
        list(stub.FetchParameters(pb.FetchRequest(run_id=RUN_ID, job_id=held.job.job_id, offset=10**9), timeout=30))

    assert refused.value.code().name == "OUT_OF_RANGE"
    assert "outside a payload" in refused.value.details()
    assert_state_unchanged(coordinator, certs, held)
