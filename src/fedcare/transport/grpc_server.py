"""The coordinator's gRPC transport: it listens; nodes dial out over mutual TLS.

Admission happens twice. The TLS handshake already refuses a client with no
certificate, one from another CA and an expired one (gRPC logs why, and
:class:`HandshakeLogMonitor` turns those lines into structured log records).
Every call is then checked again in Python: the certificate must not be
revoked (the CA's ``crl.pem``, reloaded when it changes) and its subject must
be a node the plan admits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from fedcare import __version__
from fedcare.errors import FedcareError, ProtocolError, TransportError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.plan import Plan, plan_hash
from fedcare.transport import pki
from fedcare.transport.base import Transport
from fedcare.transport.proto import fedcare_pb2 as pb
from fedcare.transport.proto import fedcare_pb2_grpc as pb_grpc
from fedcare.transport.wire import (
    DEFAULT_CHUNK_BYTES,
    TIME_METADATA_KEY,
    Payload,
    job_header,
    receive_buffer,
    result_from_header,
)

__all__ = ["GrpcTransport", "HandshakeLogMonitor", "grpc_options"]

logger = logging.getLogger(__name__)

#: Slack allowed between an update's serialized size and the global model's.
_UPDATE_SLACK_BYTES = 64 * 1024
#: Put in a node's job queue to wake its waiting PullJob calls (shutdown, a call ending); job ids are never empty.
_WAKE = ""


def grpc_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options: bounded messages, keepalive for NAT'd links."""
    limit = chunk_bytes + 256 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ]


@dataclass
class _Outstanding:
    node_id: str
    job: Job
    payload: Payload | None


@dataclass
class _Upload:
    header: pb.ResultHeader
    #: Where the chunks are written; the update's tensors end up as views of it.
    buffer: memoryview
    received: int = 0


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    granted: bool = False


class _UploadSlots:
    """Upload slots handed out first come, first served; a waiter sleeps until it is given one.

    Nothing polls: a released slot goes straight to the oldest waiter, and a
    waiter wakes early only when its call ends or the transport closes. (A
    0.25 s polling loop per waiting upload, with hundreds of nodes, woke the
    coordinator's threads thousands of times a second and starved the
    threads that answer heartbeats.)
    """

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._free = count
        self._waiting: deque[_Waiter] = deque()
        self._closed = False

    def acquire(self, context: grpc.ServicerContext) -> bool:
        """Wait for a slot; False if the call ended or the transport closed first."""
        waiter = _Waiter()
        with self._lock:
            if self._closed:
                return False
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return True
            self._waiting.append(waiter)
        if not context.add_callback(waiter.event.set):  # the call already ended
            waiter.event.set()
        waiter.event.wait()
        with self._lock:
            if waiter.granted:
                return True
            self._waiting.remove(waiter)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                waiter = self._waiting.popleft()
                waiter.granted = True
                waiter.event.set()
            else:
                self._free += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for waiter in self._waiting:
                waiter.event.set()


@dataclass
class _NodeState:
    node_id: str
    jobs: queue.Queue[str] = field(default_factory=queue.Queue)
    last_seen: float = 0.0
    polls: int = 0
    #: Result uploads of this node waiting for an upload slot: the node is alive while one waits.
    queued_uploads: int = 0
    #: The node has been told the run is over (a PullJob or Heartbeat answer after close()).
    told_shutdown: bool = False
    joined: bool = False
    #: The job this node was last handed. Nodes pull one job at a time, so a node that pulls again while it
    #: is still outstanding never received it (the link dropped on the way): it is offered again.
    handed: str | None = None
    #: The site's answer to the plan, from its heartbeats ("pending", "approved", "rejected", "refused").
    status: str = ""
    reason: str = ""
    #: SHA-256 of the node's certificate (DER), for the coordinator's audit log.
    certificate_sha256: str = ""


class GrpcTransport(Transport):
    """Coordinator side of the gRPC transport.

    Parameters
    ----------
    plan : Plan
        The plan; sent to nodes when they join, and its ``nodes`` list is the
        set of admitted identities (certificate common names).
    listen : str
        ``HOST:PORT`` to listen on (port 0 picks a free one; see :attr:`port`).
    certs_dir : Path
        Holds ``ca.pem``, ``server.pem``, ``server.key`` and ``crl.pem``.
    chunk_bytes : int
        Size of parameter chunks.
    heartbeat_interval_s : float
        How often nodes are asked to send a heartbeat; a node silent for three
        intervals is taken as gone and its outstanding jobs fail.
    on_refusal : callable, optional
        Called with ``(reason, node_id or None)`` for each refused connection.
    max_concurrent_uploads : int, optional
        Result uploads received at the same time (default: the number of CPU
        cores); others wait their turn, first come first served, so the
        coordinator holds O(model x this) bytes of updates in flight however
        many nodes there are. A waiting upload's stream may hold one chunk
        (``chunk_bytes``, the server's fixed receive window) until its turn,
        and its node counts as alive while it waits.

    Notes
    -----
    Sized for hundreds of nodes: waiting long polls and uploads sleep until
    they are woken (no polling loop), so idle nodes cost no CPU; each open
    call holds one worker thread. ``tests/load/`` runs 200 nodes and
    ``benchmarks/load.py`` measures join time, round time and memory.

    Examples
    --------
    See ``tests/transport/test_grpc.py`` and ``fedcare serve``.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        listen: str,
        certs_dir: str | Path,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        heartbeat_interval_s: float = 1.0,
        on_refusal: Callable[[pki.AdmissionReason, str | None], None] | None = None,
        max_concurrent_uploads: int | None = None,
    ) -> None:
        if plan.nodes is None:
            raise TransportError("a deployed plan must list its admitted nodes in plan.nodes")
        self.plan = plan
        self._plan_json = plan.model_dump_json()
        self._plan_hash = plan_hash(plan)
        self._admitted = frozenset(plan.nodes)
        self._chunk_bytes = chunk_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_refusal = on_refusal
        certs = Path(certs_dir)
        self._certs = certs
        self._ca = pki.load_certificate(certs / "ca.pem")
        self._crl_path = certs / "crl.pem"
        self._crl_mtime: float | None = None
        self._revoked: frozenset[int] = frozenset()
        self._reload_revocations()
        self.run_id = ""
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeState] = {name: _NodeState(name) for name in sorted(self._admitted)}
        self._outstanding: dict[str, _Outstanding] = {}
        self._uploads: dict[str, _Upload] = {}
        self._finished: set[str] = set()
        self._results: queue.Queue[JobResult] = queue.Queue()
        self._shutdown = threading.Event()
        self._upload_slots = _UploadSlots(max_concurrent_uploads or os.cpu_count() or 1)
        self._payload_cache: tuple[Any, Payload] | None = None
        self.refusals: list[tuple[pki.AdmissionReason, str | None]] = []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8 + 4 * len(self._admitted), thread_name_prefix="fedcare-grpc"),
            # A fixed receive window of one chunk per stream instead of gRPC's bandwidth-delay
            # probing, which on a fast link grows each stream's window to megabytes: then every
            # upload waiting for its slot was buffered whole, O(model x nodes) (1.3 GB more RSS
            # with 200 nodes and a 4 MB model). One chunk per round trip is still
            # 20 MB/s per upload at 50 ms with 1 MiB chunks.
            options=[*grpc_options(chunk_bytes), ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", chunk_bytes)],
            maximum_concurrent_rpcs=None,
        )
        pb_grpc.add_FederationServicer_to_server(_Servicer(self), self._server)  # type: ignore[no-untyped-call]
        credentials = grpc.ssl_server_credentials(
            [(pki.read_pem(certs / "server.key"), pki.read_pem(certs / "server.pem"))],
            root_certificates=pki.read_pem(certs / "ca.pem"),
            require_client_auth=True,
        )
        self.port = self._server.add_secure_port(listen, credentials)
        if self.port == 0:
            raise TransportError(f"cannot listen on {listen}")
        self._server.start()
        logger.info("coordinator listening", extra={"port": self.port, "admitted": len(self._admitted)})

    # -- Transport -------------------------------------------------------------

    def set_run(self, run_id: str) -> None:
        """The run whose jobs this transport carries (messages of other runs are refused)."""
        self.run_id = run_id

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(n for n, state in self._nodes.items() if state.joined and self._alive(state))

    def statuses(self) -> dict[str, tuple[str, str]]:
        """Each joined node's answer to the plan and its reason, as its heartbeats report them.

        A node that joined and has not answered yet is ``unknown``.
        """
        with self._lock:
            return {n: (state.status or "unknown", state.reason) for n, state in self._nodes.items() if state.joined}

    def peer_certificates(self) -> dict[str, str]:
        """The SHA-256 of each joined node's certificate."""
        with self._lock:
            return {n: state.certificate_sha256 for n, state in self._nodes.items() if state.joined}

    def wait_for_nodes(self, count: int, *, timeout_s: float) -> list[str]:
        """Block until ``count`` admitted nodes have joined or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            joined = self.nodes()
            if len(joined) >= count:
                return joined
            time.sleep(0.1)
        return self.nodes()

    def submit(self, node_id: str, job: Job) -> None:
        if self._shutdown.is_set():
            raise TransportError("transport is closed")
        state = self._nodes.get(node_id)
        if state is None:
            raise TransportError(f"node {node_id!r} is not admitted by the plan", node_id=node_id)
        payload = self._payload(job)
        with self._lock:
            self._outstanding[job.job_id] = _Outstanding(node_id, job, payload)
        state.jobs.put(job.job_id)

    def results(self, job_ids: Collection[str], *, timeout_s: float | None) -> Iterator[JobResult]:
        waiting = set(job_ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while waiting:
            for gone in self._fail_jobs_of_lost_nodes(waiting):
                waiting.discard(gone.job_id)
                yield gone
            if not waiting:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                with self._lock:
                    for job_id in waiting:  # late answers to these are now stale
                        self._outstanding.pop(job_id, None)
                        self._uploads.pop(job_id, None)
                return
            try:
                result = self._results.get(timeout=min(0.25, remaining) if remaining is not None else 0.25)
            except queue.Empty:
                continue
            if result.job_id in waiting:
                waiting.discard(result.job_id)
                yield result

    def close(self) -> None:
        """Tell nodes the run is over (on their next call), then stop listening."""
        self._shutdown.set()
        self._upload_slots.close()
        for state in self._nodes.values():
            state.jobs.put(_WAKE)  # waiting PullJob calls answer "shutdown" now
        deadline = time.monotonic() + 3 * self.heartbeat_interval_s + 1
        # Wait for waiting polls to answer, and for every live node to hear the news on its next call
        # (heartbeats come every interval): a node left out would retry a stopped server until it gives up.
        while time.monotonic() < deadline and any(
            s.polls or (s.joined and not s.told_shutdown and self._alive(s)) for s in self._nodes.values()
        ):
            time.sleep(0.05)
        self._server.stop(grace=1.0).wait()

    # -- helpers used by the servicer --------------------------------------------

    def _payload(self, job: Job) -> Payload | None:
        if job.parameters is None:
            return None
        cached = self._payload_cache
        if cached is not None and cached[0] is job.parameters:
            return cached[1]
        payload = Payload.of(job.parameters)
        self._payload_cache = (job.parameters, payload)
        return payload

    def _alive(self, state: _NodeState) -> bool:
        if state.polls > 0 or state.queued_uploads > 0:
            return True
        return time.monotonic() - state.last_seen < 3 * self.heartbeat_interval_s + 1

    def _fail_jobs_of_lost_nodes(self, waiting: set[str]) -> list[JobResult]:
        failed = []
        with self._lock:
            for job_id in list(waiting):
                entry = self._outstanding.get(job_id)
                if entry is None:
                    continue
                state = self._nodes[entry.node_id]
                if state.joined and not self._alive(state):
                    failed.append(self._drop(job_id, "node disconnected (no heartbeat)"))
        return failed

    def _drop(self, job_id: str, reason: str) -> JobResult:
        """Fail an outstanding job (caller holds the lock)."""
        entry = self._outstanding.pop(job_id)
        self._uploads.pop(job_id, None)
        self._finished.add(job_id)
        job = entry.job
        return JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=entry.node_id, error=reason)

    def _reload_revocations(self) -> None:
        try:
            mtime = self._crl_path.stat().st_mtime
        except FileNotFoundError:
            self._revoked = frozenset()
            return
        if mtime != self._crl_mtime:
            self._revoked = pki.load_revoked_serials(self._certs)
            self._crl_mtime = mtime

    def _admit(self, context: grpc.ServicerContext) -> _NodeState:
        """The calling node, or abort the call naming why it is refused."""
        self._reload_revocations()
        certificates = context.auth_context().get("x509_pem_cert")
        pem = certificates[0] if certificates else None
        try:
            node_id = pki.check_peer_certificate(
                pem, ca_certificate=self._ca, revoked=self._revoked, admitted=self._admitted
            )
        except pki.AdmissionRefused as refusal:
            self.refusals.append((refusal.reason, refusal.node_id))
            if self._on_refusal is not None:
                self._on_refusal(refusal.reason, refusal.node_id)
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, f"refused: {refusal.reason.value}")
        state = self._nodes[node_id]
        state.last_seen = time.monotonic()
        if not state.certificate_sha256 and pem is not None:
            state.certificate_sha256 = pki.certificate_sha256(pem)
        return state

    def _carry_on(self, state: _NodeState, run_id: str, context: grpc.ServicerContext) -> None:
        """Take a node that calls with this run's id as joined: it joined an earlier coordinator process of the run.

        After ``fedcare serve --resume`` the nodes, which were not restarted,
        hold the run's plan already and keep polling; they carry on without
        joining again. A node of another run that never joined is refused.
        """
        if state.joined:
            return
        if not run_id or run_id != self.run_id:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "this node has not joined this coordinator's run; restart the node to join it",
            )
        with self._lock:
            state.joined = True
        logger.info("node %s carries on with the resumed run", state.node_id, extra={"node_id": state.node_id})

    def _complete(self, job_id: str, result: JobResult) -> None:
        with self._lock:
            if self._outstanding.pop(job_id, None) is None:
                return
            self._uploads.pop(job_id, None)
            self._finished.add(job_id)
        self._results.put(result)


class _Servicer(pb_grpc.FederationServicer):
    def __init__(self, transport: GrpcTransport) -> None:
        self.t = transport

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:  # noqa: N802
        t = self.t
        state = t._admit(context)
        failed = []
        with t._lock:
            state.joined = True
            # A node that joins again restarted: whatever it held is lost.
            for job_id, entry in list(t._outstanding.items()):
                if entry.node_id == state.node_id:
                    failed.append(t._drop(job_id, "node restarted during the job"))
            while not state.jobs.empty():
                state.jobs.get_nowait()
        for result in failed:
            t._results.put(result)
        logger.info("node %s joined", state.node_id, extra={"node_id": state.node_id})
        return pb.JoinReply(
            run_id=t.run_id,
            plan_json=t._plan_json,
            plan_hash=t._plan_hash,
            node_id=state.node_id,
            heartbeat_interval_s=t.heartbeat_interval_s,
        )

    def PullJob(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.JobHeader:  # noqa: N802
        t = self.t
        state = t._admit(context)
        t._carry_on(state, request.run_id, context)
        wait_s = max(0.0, min(float(request.wait_s), 20.0))
        deadline = time.monotonic() + wait_s
        state.polls += 1
        # The wait sleeps until a job, the deadline, shutdown or the end of the call: no polling,
        # so hundreds of idle long polls cost no CPU. A wake left behind by an ended call only
        # makes a later poll look again.
        context.add_callback(lambda: state.jobs.put(_WAKE))
        try:
            with t._lock:
                lost = t._outstanding.get(state.handed) if state.handed is not None else None
            if lost is not None and not t._shutdown.is_set():
                logger.info("node %s pulled again: its job is offered again", state.node_id, extra={"node_id": state.node_id})
                return job_header(lost.job, lost.payload)
            while not t._shutdown.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return pb.JobHeader(has_job=False)
                try:
                    job_id = state.jobs.get(timeout=remaining)
                except queue.Empty:
                    continue
                if job_id == _WAKE:
                    if t._shutdown.is_set():
                        state.jobs.put(_WAKE)  # pass it on to this node's other waiting polls
                    continue
                with t._lock:
                    entry = t._outstanding.get(job_id)
                if entry is None:  # failed or timed out meanwhile
                    continue
                state.handed = job_id
                return job_header(entry.job, entry.payload)
            state.told_shutdown = True
            return pb.JobHeader(has_job=False, shutdown=True)
        finally:
            state.polls -= 1
            state.last_seen = time.monotonic()

    def FetchParameters(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:  # noqa: N802
        t = self.t
        state = t._admit(context)
        with t._lock:
            entry = t._outstanding.get(request.job_id)
        if entry is None or entry.node_id != state.node_id or entry.payload is None:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no parameters for that job (stale or not yours)")
            return
        try:
            for offset, data in entry.payload.chunks(int(request.offset), chunk_bytes=t._chunk_bytes):
                state.last_seen = time.monotonic()
                yield pb.Chunk(offset=offset, data=data)
        except ProtocolError as exc:
            _abort(context, grpc.StatusCode.OUT_OF_RANGE, exc.message)

    def UploadStatus(self, request: pb.UploadStatusRequest, context: grpc.ServicerContext) -> pb.UploadReply:  # noqa: N802
        t = self.t
        state = t._admit(context)
        with t._lock:
            if request.job_id in t._finished:
                return pb.UploadReply(received_bytes=0, complete=True)
            entry = t._outstanding.get(request.job_id)
            if entry is None or entry.node_id != state.node_id:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no such job for this node (stale or not yours)")
            upload = t._uploads.get(request.job_id)
            return pb.UploadReply(received_bytes=upload.received if upload else 0, complete=False)

    def PushResult(self, request_iterator: Iterator[pb.UploadRequest], context: grpc.ServicerContext) -> pb.UploadReply:  # noqa: N802
        t = self.t
        state = t._admit(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with its header")
        header = first.header
        job_id = header.job_id
        with t._lock:
            if job_id in t._finished:
                _abort(context, grpc.StatusCode.ALREADY_EXISTS, "result already received (replay refused)")
            entry = t._outstanding.get(job_id)
            if entry is None or entry.node_id != state.node_id:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "result for a job this node does not hold (stale)")
            job = entry.job
            if header.run_id != job.run_id or header.round != job.round:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "result names another run or round (stale or replayed)")
            try:
                result_from_header(header, state.node_id, None)  # kind and JSON data parse, before any byte is buffered
            except ProtocolError as exc:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            total = int(header.update.total_bytes)
            limit = _update_limit(job, entry.payload)
            if total < 0 or total > limit:
                _abort(context, 
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"update of {total} bytes refused; at most {limit} expected"
                )
        # Updates wait for an upload slot before their buffer is allocated (the node's
        # stream waits under flow control meanwhile), like the in-process transport's slots.
        # A node waiting its turn is alive (its stream is open): with many nodes and few
        # slots the wait can outlast the heartbeat timeout.
        state.queued_uploads += 1
        try:
            acquired = t._upload_slots.acquire(context)
        finally:
            state.queued_uploads -= 1
            state.last_seen = time.monotonic()
        if not acquired:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "coordinator is shutting down")
        try:
            return self._receive(t, state, header, request_iterator, context, limit=limit)
        finally:
            t._upload_slots.release()

    def _receive(
        self,
        t: GrpcTransport,
        state: _NodeState,
        header: pb.ResultHeader,
        request_iterator: Iterator[pb.UploadRequest],
        context: grpc.ServicerContext,
        *,
        limit: int,
    ) -> pb.UploadReply:
        job_id = header.job_id
        total = int(header.update.total_bytes)
        with t._lock:
            if job_id not in t._outstanding:  # dropped (deadline) while waiting for the slot
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "result for a job this node does not hold (stale)")
            upload = t._uploads.get(job_id)
            if upload is None or upload.header.update != header.update:
                upload = _Upload(header=header, buffer=receive_buffer(total))
                t._uploads[job_id] = upload
        for message in request_iterator:
            if not message.HasField("chunk"):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the header")
            chunk = message.chunk
            data = chunk.data  # each read of a bytes field copies it
            end = chunk.offset + len(data)
            if chunk.offset != upload.received or end > total:
                _abort(context, 
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"chunk at offset {chunk.offset} does not follow the {upload.received} bytes received",
                )
            upload.buffer[chunk.offset : end] = data
            upload.received = end
            state.last_seen = time.monotonic()
        if upload.received < total:
            return pb.UploadReply(received_bytes=upload.received, complete=False)
        update = None
        if total:
            try:
                update = Payload.assemble(upload.buffer, header.update, max_bytes=limit)
            except FedcareError as exc:
                with t._lock:
                    t._uploads.pop(job_id, None)  # start again from zero
                _abort(context, grpc.StatusCode.DATA_LOSS, exc.message)
        t._complete(job_id, result_from_header(header, state.node_id, update))
        return pb.UploadReply(received_bytes=upload.received, complete=True)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:  # noqa: N802
        # The coordinator's clock, in the trailers so that a refusal carries it too: `fedcare node
        # doctor` measures the site's clock against it, both ways (a certificate shows only a clock behind).
        context.set_trailing_metadata(((TIME_METADATA_KEY, f"{time.time():.3f}"),))
        state = self.t._admit(context)
        self.t._carry_on(state, request.run_id, context)
        if request.status:
            changed = (state.status, state.reason) != (request.status, request.reason)
            state.status, state.reason = request.status[:32], request.reason[:500]
            if changed:
                logger.info("node %s: plan %s", state.node_id, state.status, extra={"node_id": state.node_id, "status": state.status})
        shutdown = self.t._shutdown.is_set()
        state.told_shutdown = state.told_shutdown or shutdown
        return pb.HeartbeatReply(shutdown=shutdown)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    # Details name the protocol problem only: never a record, never a secret.
    logger.warning("refused a call with %s: %s", code.name, details, extra={"status": code.name})
    context.abort(code, details)
    raise AssertionError("grpc's abort returned")  # it raises; this keeps type checkers informed


class HandshakeLogMonitor:
    """Reads gRPC's own log lines and reports TLS handshake refusals.

    gRPC refuses a bad client certificate inside the TLS handshake, before any
    Python code runs, and writes the reason to the process's standard error.
    The monitor puts a pipe in place of file descriptor 2, copies every line
    to the original standard error, and calls ``on_refusal`` with the reason
    of each handshake failure. Use it in a coordinator process (``fedcare
    serve``), not in a library caller's process.
    """

    def __init__(self, on_refusal: Callable[[pki.AdmissionReason], None]) -> None:
        self._on_refusal = on_refusal
        self._saved_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._thread = threading.Thread(target=self._pump, name="fedcare-grpc-log", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            data = self._reader.read(65536)
            if not data:
                break
            os.write(self._saved_fd, data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                reason = pki.classify_handshake_failure(line.decode("utf-8", "replace"))
                if reason is not None:
                    self._on_refusal(reason)


def _update_limit(job: Job, payload: Payload | None) -> int:
    """The most bytes a result of ``job`` may upload: updates are model-sized, nothing else uploads."""
    if job.kind is JobKind.TRAIN and payload is not None:
        return payload.total_bytes + _UPDATE_SLACK_BYTES
    if job.kind is JobKind.SECAGG and job.config.get("secagg_phase") == "masked_input":
        return 4 * int(job.config["vector_length"]) + _UPDATE_SLACK_BYTES  # uint32 words
    return 0
