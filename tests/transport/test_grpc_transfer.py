"""Large parameter transfers over the gRPC transport: chunked, resumable, checked.

Everything runs for real on 127.0.0.1: a coordinator (GrpcTransport) with
mutual TLS, nodes over GrpcNodeChannel in threads, and, for the cut-link
tests, a TCP proxy that forwards bytes and drops the connection once.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # grpcio is not a core dependency

from fedcare.messages import Job, JobKind, JobResult  # noqa: E402
from fedcare.params import Parameters  # noqa: E402
from fedcare.plan import parse_plan  # noqa: E402
from fedcare.transport import pki  # noqa: E402
from fedcare.transport import wire  # noqa: E402
from fedcare.transport.base import NodeChannel  # noqa: E402
from fedcare.transport.grpc_client import GrpcNodeChannel  # noqa: E402
from fedcare.transport.grpc_server import GrpcTransport, grpc_options  # noqa: E402
from fedcare.transport.proto import fedcare_pb2 as pb  # noqa: E402
from fedcare.transport.proto import fedcare_pb2_grpc as pb_grpc  # noqa: E402

NODES = ("site-a", "site-b")
RUN_ID = "run-transfer"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def certs(federation_certs) -> Path:
    return federation_certs(NODES)


@pytest.fixture
def coordinator(certs) -> Iterator[GrpcTransport]:
    plan = parse_plan({"task": "plus-one", "dataset": {"name": "none"}, "rounds": 1, "nodes": list(NODES)})
    transport = GrpcTransport(plan, listen="127.0.0.1:0", certs_dir=certs, heartbeat_interval_s=0.5)
    transport.set_run(RUN_ID)
    yield transport
    transport.close()
    gc.collect()  # the big tests leave model-sized buffers behind; give them back before the next test


def model(num_values: int, *, tensors: int = 4, seed: int = 0) -> Parameters:
    """Frozen float32 parameters of ``num_values`` values in ``tensors`` tensors, fixed seed."""
    flat = np.random.default_rng(seed).random(num_values, dtype=np.float32)
    sizes = [num_values // tensors] * (tensors - 1)
    sizes.append(num_values - sum(sizes))
    spec = tuple((f"layer{i}.weight", (size,)) for i, size in enumerate(sizes))
    return Parameters.from_flat(flat, spec).freeze()


def train_job(parameters: Parameters | None, *, round_number: int = 1) -> Job:
    return Job(RUN_ID, round_number, uuid.uuid4().hex, JobKind.TRAIN, plan_hash="h", parameters=parameters)


def plus_one(channel: NodeChannel) -> None:
    """A node whose update is the global parameters plus one."""
    while not channel.closed:
        job = channel.pull_job(timeout_s=0.2)
        if job is None:
            continue
        assert job.parameters is not None
        updated = job.parameters.flatten() + np.float32(1)
        channel.push_result(
            JobResult(
                job.run_id, job.round, job.job_id, job.kind, node_id="ignored", num_examples=1,
                update=Parameters.from_flat(updated, job.parameters.spec),
            )
        )
        del job, updated


@contextlib.contextmanager
def node_in_thread(address: str, certs: Path, name: str, runner: Callable[[NodeChannel], None]) -> Iterator[GrpcNodeChannel]:
    """Join as ``name`` through ``address`` and serve with ``runner`` until the block ends."""
    channel = GrpcNodeChannel(address, certs_dir=certs, name=name, give_up_after_s=30)
    channel.join()
    errors: list[BaseException] = []
    stopping = threading.Event()

    def serve() -> None:
        try:
            runner(channel)
        except BaseException as exc:  # reported to the test below, unless we closed the channel under it
            if not stopping.is_set():
                errors.append(exc)

    thread = threading.Thread(target=serve, name=f"node-{name}", daemon=True)
    thread.start()
    try:
        yield channel
    finally:
        stopping.set()
        channel.close()
        thread.join(timeout=10)
    assert not errors, errors


def stub_for(coordinator: GrpcTransport, certs: Path, name: str) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    """A raw protocol client holding ``name``'s certificate, to send what a real node would not."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read_pem(certs / "ca.pem"),
        private_key=pki.read_pem(certs / f"{name}.key"),
        certificate_chain=pki.read_pem(certs / f"{name}.pem"),
    )
    channel = grpc.secure_channel(f"127.0.0.1:{coordinator.port}", credentials, options=grpc_options(wire.DEFAULT_CHUNK_BYTES))
    return channel, pb_grpc.FederationStub(channel)


def upload(job: Job, update: Parameters | None, *, tamper: Callable[[pb.ResultHeader], None] | None = None) -> Iterator[pb.UploadRequest]:
    """The messages of a result upload for ``job``, optionally with the header changed."""
    payload = wire.Payload.of(update) if update is not None else None
    result = JobResult(job.run_id, job.round, job.job_id, job.kind, node_id="x", num_examples=1, update=update)
    header = wire.result_header(result, payload)
    if tamper is not None:
        tamper(header)
    yield pb.UploadRequest(header=header)
    if payload is not None:
        for offset, data in payload.chunks(0):
            yield pb.UploadRequest(chunk=pb.Chunk(offset=offset, data=data))


def results_of(coordinator: GrpcTransport, job: Job, *, timeout_s: float) -> list[JobResult]:
    return list(coordinator.results([job.job_id], timeout_s=timeout_s))


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that drops its connection once, midway through a transfer.

    Bytes from the node to the coordinator go "up", the others "down". Once
    ``cut_after_bytes`` have gone in ``cut_direction`` on a connection, both of
    its sockets are shut; later connections are forwarded untouched.
    """

    def __init__(self, target_port: int, *, cut_direction: str, cut_after_bytes: int) -> None:
        self._target_port = target_port
        self._cut_direction = cut_direction
        self._cut_after_bytes = cut_after_bytes
        self._lock = threading.Lock()
        self.forwarded = {"up": 0, "down": 0}
        self.cuts = 0
        self.connections = 0
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(("127.0.0.1", self._target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            pair = (client, server)
            counted = {"up": 0, "down": 0}
            for source, target, direction in ((client, server, "up"), (server, client, "down")):
                thread = threading.Thread(
                    target=self._pump, args=(source, target, direction, pair, counted), name=f"proxy-{direction}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, target: socket.socket, direction: str,
              pair: tuple[socket.socket, socket.socket], counted: dict[str, int]) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    cut = (
                        self.cuts == 0
                        and direction == self._cut_direction
                        and counted[direction] + len(data) >= self._cut_after_bytes
                    )
                    if cut:
                        self.cuts += 1
                if cut:
                    _shut(*pair)  # the link drops midway: neither side gets the rest
                    return
                target.sendall(data)
                with self._lock:
                    counted[direction] += len(data)
                    self.forwarded[direction] += len(data)
        except OSError:
            pass
        finally:
            _shut(*pair)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            _shut(*self._sockets)
        for thread in self._threads:
            thread.join(timeout=5)


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


@pytest.fixture
def count_chunks(monkeypatch) -> list[tuple[int, int]]:
    """Record ``(offset, size)`` of every chunk either side sends."""
    sent: list[tuple[int, int]] = []
    original = wire.Payload.chunks

    def chunks(self: wire.Payload, offset: int, **kwargs: int) -> Iterator[tuple[int, bytes]]:
        for start, data in original(self, offset, **kwargs):
            sent.append((start, len(data)))
            yield start, data

    monkeypatch.setattr(wire.Payload, "chunks", chunks)
    return sent


# ---------------------------------------------------------------- large transfers


def test_200_megabyte_model_crosses_both_ways_in_chunks_unchanged(coordinator, certs, count_chunks):
    parameters = model(50_000_000)  # 200 MB of float32 in four tensors
    total_bytes = len(parameters.to_bytes())
    job = train_job(parameters)
    with node_in_thread(f"127.0.0.1:{coordinator.port}", certs, "site-a", plus_one):
        coordinator.submit("site-a", job)
        (result,) = results_of(coordinator, job, timeout_s=120)
    assert result.ok and result.node_id == "site-a"
    assert result.update.spec == parameters.spec
    expected = parameters.flatten() + np.float32(1)
    assert np.array_equal(result.update.flatten(), expected)
    # Both directions moved the whole payload, in more than 100 chunks of at most 1 MiB each.
    assert sum(size for _, size in count_chunks) == 2 * total_bytes
    assert len(count_chunks) > 2 * 100
    assert max(size for _, size in count_chunks) <= wire.DEFAULT_CHUNK_BYTES


def test_upload_cut_midway_resumes_from_the_acknowledged_offset(coordinator, certs):
    parameters = model(10_000_000, seed=1)  # 40 MB
    payload_bytes = len(parameters.to_bytes())
    cut_after = 20_000_000  # halfway: what is in flight when the link drops (the flow-control window) is far less
    proxy = CuttingProxy(coordinator.port, cut_direction="up", cut_after_bytes=cut_after)
    job = train_job(parameters)
    try:
        with node_in_thread(f"127.0.0.1:{proxy.port}", certs, "site-a", plus_one) as channel:
            coordinator.submit("site-a", job)
            (result,) = results_of(coordinator, job, timeout_s=60)
            resumed = channel.resumed_transfers
    finally:
        proxy.close()
    assert proxy.cuts == 1 and proxy.connections >= 2
    assert resumed >= 1  # the coordinator acknowledged a non-zero offset and the node went on from there
    # Starting over would have sent the cut-off bytes again on top of the whole update.
    assert proxy.forwarded["up"] < payload_bytes + cut_after
    assert np.array_equal(result.update.flatten(), parameters.flatten() + np.float32(1))


def test_download_cut_midway_resumes_and_the_hash_verifies(coordinator, certs):
    parameters = model(10_000_000, seed=2)  # 40 MB
    payload_bytes = len(parameters.to_bytes())
    cut_after = 20_000_000  # halfway: what is in flight when the link drops (the flow-control window) is far less
    proxy = CuttingProxy(coordinator.port, cut_direction="down", cut_after_bytes=cut_after)
    job = train_job(parameters)
    try:
        with node_in_thread(f"127.0.0.1:{proxy.port}", certs, "site-a", plus_one) as channel:
            coordinator.submit("site-a", job)
            (result,) = results_of(coordinator, job, timeout_s=60)
            resumed = channel.resumed_transfers
    finally:
        proxy.close()
    assert proxy.cuts == 1 and proxy.connections >= 2
    assert resumed >= 1
    assert proxy.forwarded["down"] < payload_bytes + cut_after
    assert np.array_equal(result.update.flatten(), parameters.flatten() + np.float32(1))


# ---------------------------------------------------------------- refusals


def test_upload_whose_hash_does_not_match_is_refused_with_data_loss(coordinator, certs):
    parameters = model(1000)
    job = train_job(parameters)
    coordinator.submit("site-a", job)
    channel, stub = stub_for(coordinator, certs, "site-a")
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(upload(job, parameters, tamper=lambda header: setattr(header.update, "sha256", bytes(32))), timeout=10)
    assert refused.value.code() is grpc.StatusCode.DATA_LOSS
    assert results_of(coordinator, job, timeout_s=0.5) == []


def test_update_larger_than_the_model_is_refused_before_allocation(coordinator, certs):
    parameters = model(1000)
    job = train_job(parameters)
    coordinator.submit("site-a", job)

    def one_terabyte(header: pb.ResultHeader) -> None:
        header.update.total_bytes = 1 << 40  # allocating this would fail with MemoryError, not a refusal

    channel, stub = stub_for(coordinator, certs, "site-a")
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(upload(job, None, tamper=one_terabyte), timeout=10)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert results_of(coordinator, job, timeout_s=0.5) == []


def test_result_pushed_twice_is_delivered_once_and_the_replay_refused(coordinator, certs):
    parameters = model(1000)
    job = train_job(parameters)
    coordinator.submit("site-a", job)
    update = Parameters.from_flat(parameters.flatten() + np.float32(1), parameters.spec)
    channel, stub = stub_for(coordinator, certs, "site-a")
    with channel:
        assert stub.PushResult(upload(job, update), timeout=10).complete
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushResult(upload(job, update), timeout=10)
    assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert [r.node_id for r in results_of(coordinator, job, timeout_s=5)] == ["site-a"]
    assert results_of(coordinator, job, timeout_s=0.5) == []  # no second copy is waiting


def test_result_for_another_nodes_job_is_refused(coordinator, certs):
    parameters = model(1000)
    job = train_job(parameters)
    coordinator.submit("site-b", job)
    update = Parameters.from_flat(parameters.flatten() + np.float32(1), parameters.spec)
    channel, stub = stub_for(coordinator, certs, "site-a")
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(upload(job, update), timeout=10)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert results_of(coordinator, job, timeout_s=0.5) == []


# ---------------------------------------------------------------- the serialized form


def serialized(parameters: Parameters) -> tuple[wire.Payload, bytes]:
    payload = wire.Payload.of(parameters)
    return payload, b"".join(data for _, data in payload.chunks(0, chunk_bytes=1000))


def test_payload_is_safetensors_that_the_library_reads_back_in_tensor_order():
    from safetensors.numpy import load

    parameters = Parameters({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)})
    payload, data = serialized(parameters)
    assert len(data) == payload.total_bytes
    assert {name: array.tolist() for name, array in load(data).items()} == {"w": [[0, 1, 2], [3, 4, 5]], "b": [1, 1, 1]}
    assert Parameters.from_bytes(data).spec == parameters.spec == (("w", (2, 3)), ("b", (3,)))


def test_received_parameters_are_read_only():
    parameters = model(1000)
    payload, data = serialized(parameters)
    received = wire.Payload.assemble(data, payload.blob(), max_bytes=len(data))
    assert np.array_equal(received.flatten(), parameters.flatten())
    with pytest.raises(ValueError, match="read-only"):
        received.flatten()[0] = 1.0


def test_payload_written_by_the_safetensors_library_is_received_in_tensor_order():
    parameters = Parameters({"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float32)})
    data = parameters.to_bytes()  # the library orders the data by tensor name
    received = wire.Payload.assemble(data, wire.Payload(data).blob(), max_bytes=len(data))
    assert received.spec == parameters.spec
    assert np.array_equal(received.flatten(), parameters.flatten())


@pytest.mark.parametrize(
    ("field", "value"),
    [("data_offsets", [0, 20]), ("shape", [7]), ("dtype", "F64")],
    ids=["offsets-overlap", "shape-larger-than-data", "not-float32"],
)
def test_payload_whose_header_does_not_describe_its_data_is_refused(field, value):
    import json

    from fedcare.errors import ProtocolError

    _, data = serialized(Parameters({"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float32)}))
    header_bytes = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_bytes])
    header["w"][field] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    forged = len(text).to_bytes(8, "little") + text + data[8 + header_bytes :]
    with pytest.raises(ProtocolError, match="not valid safetensors"):
        wire.Payload.assemble(forged, wire.Payload(forged).blob(), max_bytes=len(forged))
