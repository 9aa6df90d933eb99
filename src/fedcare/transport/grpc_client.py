"""The node's end of the gRPC transport: it dials out, pulls jobs, pushes results.

Every call retries transient failures (coordinator not up yet, link dropped)
with exponential backoff and jitter; parameter downloads and result uploads
resume from the last byte acknowledged, and the SHA-256 of each transfer is
checked before use.

The channel counts what the link cost it (:class:`TransportCounters`:
retried calls, resumed uploads and downloads, reconnects) and reports the
counts since its previous result with every result, as numbers in the
result's ``metrics`` under the ``transport_`` prefix; the coordinator takes
them out of the metrics and logs them per node in its ``round_end`` and
``evaluation`` events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from fedcare import __version__
from fedcare.errors import FedcareError, PolicyViolation, ProtocolError, TransportError
from fedcare.messages import Job, JobResult
from fedcare.params import Parameters
from fedcare.plan import Plan, parse_plan, plan_hash
from fedcare.transport import pki
from fedcare.transport.base import NodeChannel
from fedcare.transport.grpc_server import grpc_options
from fedcare.transport.proto import fedcare_pb2 as pb
from fedcare.transport.proto import fedcare_pb2_grpc as pb_grpc
from fedcare.transport.wire import DEFAULT_CHUNK_BYTES, Payload, job_from_header, receive_buffer, result_header

__all__ = ["Backoff", "GrpcNodeChannel", "TransportCounters"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

#: gRPC waits between its own connection attempts after a link drops, up to 120 s by default: a
#: node that retries every few seconds would still find the coordinator up to two minutes late.
#: These keep gRPC's waits within the node's own backoff (milliseconds).
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 10_000)]


@dataclass(frozen=True)
class TransportCounters:
    """What an unreliable link cost a node's channel: counts since the channel opened.

    Attributes
    ----------
    retries : int
        Calls that failed with a transient status (link down, deadline passed,
        connection cut) and were tried again.
    resumed_uploads : int
        Result uploads that went on from a nonzero offset the coordinator
        acknowledged, instead of from the start.
    resumed_downloads : int
        Parameter downloads that went on from a nonzero offset.
    reconnects : int
        Times the channel's connection became ready again after it had been ready.

    Examples
    --------
    >>> later = TransportCounters(retries=3, resumed_uploads=1)
    >>> (later - TransportCounters(retries=1)).as_metrics()["transport_retries"]
    2.0
    >>> TransportCounters.from_metrics(later.as_metrics()) == later
    True
    """

    retries: int = 0
    resumed_uploads: int = 0
    resumed_downloads: int = 0
    reconnects: int = 0

    #: Prefix of the counters' names in a result's metrics.
    PREFIX = "transport_"

    def __sub__(self, other: TransportCounters) -> TransportCounters:
        return TransportCounters(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)}
        )

    def as_metrics(self) -> dict[str, float]:
        """The counters as result metrics: ``transport_retries`` and so on (numbers only)."""
        return {f"{self.PREFIX}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> TransportCounters:
        """The counters in ``metrics`` (missing ones count 0; other metrics are ignored)."""
        return cls(**{f.name: int(metrics.get(f"{cls.PREFIX}{f.name}", 0)) for f in dataclasses.fields(cls)})


class Backoff:
    """Exponential backoff with full jitter.

    Parameters
    ----------
    initial_s, maximum_s : float
        First and largest wait, in seconds.
    rng : random.Random, optional
        Source of jitter.

    Examples
    --------
    >>> b = Backoff(initial_s=0.1, maximum_s=1.0, rng=random.Random(0))
    >>> waits = [b.next_wait_s() for _ in range(6)]
    >>> all(0 <= w <= 1.0 for w in waits)
    True
    """

    def __init__(self, *, initial_s: float = 0.2, maximum_s: float = 10.0, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_wait_s(self) -> float:
        """The next wait: uniform in [0, min(maximum, initial * 2**attempt)]."""
        ceiling = min(self.maximum_s, self.initial_s * (2**self._attempt))
        self._attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Start again from the initial wait (after a success)."""
        self._attempt = 0


class GrpcNodeChannel(NodeChannel):
    """A node's link to the coordinator over mutual TLS.

    Parameters
    ----------
    coordinator : str
        ``HOST:PORT`` of the coordinator.
    certs_dir : Path
        Holds ``ca.pem`` (the federation CA) and the node's ``NAME.pem`` and ``NAME.key``.
    name : str
        The node's name; its certificate's common name.
    chunk_bytes : int
        Upload chunk size.
    give_up_after_s : float, optional
        Stop retrying a call after this long; ``None`` retries for ever (a
        node service waits for its coordinator).
    backoff : callable
        Makes the :class:`Backoff` of each call's retries.

    Raises
    ------
    TransportError
        If the coordinator refuses the node (the reason is in the message)
        or stays unreachable past ``give_up_after_s``.
    """

    def __init__(
        self,
        coordinator: str,
        *,
        certs_dir: str | Path,
        name: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        give_up_after_s: float | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        certs = Path(certs_dir)
        self.name = name
        self._certs = certs
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.read_pem(certs / "ca.pem"),
            private_key=pki.read_pem(certs / f"{name}.key"),
            certificate_chain=pki.read_pem(certs / f"{name}.pem"),
        )
        self._target = coordinator
        self._chunk_bytes = chunk_bytes
        self._give_up_after_s = give_up_after_s
        self._backoff = backoff
        self._channel = grpc.secure_channel(
            coordinator, self._credentials, options=grpc_options(chunk_bytes) + _RECONNECT_OPTIONS
        )
        self._stub = pb_grpc.FederationStub(self._channel)  # type: ignore[no-untyped-call]
        self._closed = threading.Event()
        self.run_id = ""
        self.heartbeat_interval_s = 1.0
        self._heartbeat: threading.Thread | None = None
        self._status = ("", "")
        self._counts_lock = threading.Lock()
        self._counts = TransportCounters()
        self._reported = TransportCounters()  # what the last delivered result carried
        self._was_ready = False
        self._channel.subscribe(self._on_connectivity, try_to_connect=False)

    # -- counters ----------------------------------------------------------------

    def counters(self) -> TransportCounters:
        """What the link cost this channel so far.

        Returns
        -------
        TransportCounters
            Counts since the channel opened; each result carries the
            difference from those its previous result carried.
        """
        with self._counts_lock:
            return self._counts

    @property
    def resumed_transfers(self) -> int:
        """Uploads plus downloads that went on from a nonzero offset."""
        counts = self.counters()
        return counts.resumed_uploads + counts.resumed_downloads

    def _add(self, **increments: int) -> None:
        with self._counts_lock:
            counts = self._counts
            self._counts = dataclasses.replace(
                counts, **{name: getattr(counts, name) + value for name, value in increments.items()}
            )

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            if self._was_ready:
                self._add(reconnects=1)
            self._was_ready = True

    # -- joining ---------------------------------------------------------------

    def join(self, *, expected_plan_hash: str | None = None) -> Plan:
        """Join the federation and return its plan, after checking it.

        Parameters
        ----------
        expected_plan_hash : str, optional
            When the site approved a plan beforehand, the coordinator's plan must hash to it.

        Raises
        ------
        PolicyViolation
            If the plan differs from the approved one.
        ProtocolError
            If the plan does not validate or does not match its announced hash.
        """
        reply = self._call(lambda timeout: self._stub.Join(pb.JoinRequest(fedcare_version=__version__), timeout=timeout))
        plan = parse_plan(_json_object(reply.plan_json))
        if plan_hash(plan) != reply.plan_hash:
            raise ProtocolError("the coordinator's plan does not match its announced hash")
        if expected_plan_hash is not None and reply.plan_hash != expected_plan_hash:
            raise PolicyViolation("the coordinator's plan is not the one this site approved", node_id=self.name)
        if reply.node_id != self.name:
            raise ProtocolError(f"the coordinator knows this node as {reply.node_id!r}, not {self.name!r}")
        self.run_id = reply.run_id
        self.heartbeat_interval_s = reply.heartbeat_interval_s or 1.0
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="fedcare-heartbeat", daemon=True)
            self._heartbeat.start()
        logger.info("joined the federation", extra={"node_id": self.name})
        return plan

    def report_status(self, status: str, reason: str = "") -> None:
        """Tell the coordinator this site's answer to the plan; repeated with every heartbeat.

        ``status`` is ``pending`` (waiting for the site's approval),
        ``approved``, ``rejected`` or ``refused`` (the plan breaks the site's
        policy), with ``reason`` for the last two.
        """
        self._status = (status, reason)
        try:
            self._stub.Heartbeat(
                pb.HeartbeatRequest(run_id=self.run_id, status=status, reason=reason), timeout=10
            )
        except grpc.RpcError:
            pass  # the heartbeat thread repeats it

    def coordinator_certificate_sha256(self) -> str:
        """The SHA-256 of the certificate the coordinator presents, from a TLS handshake with this node's certificate.

        Raises
        ------
        TransportError
            If the coordinator cannot be reached or its certificate is not from the federation's CA.
        """
        import socket
        import ssl

        host, _, port = self._target.rpartition(":")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self._certs / "ca.pem"))
        context.load_cert_chain(str(self._certs / f"{self.name}.pem"), str(self._certs / f"{self.name}.key"))
        context.check_hostname = False  # the federation's CA is checked; the pin is the whole certificate
        context.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls:
                    der = tls.getpeercert(binary_form=True)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot read the coordinator's certificate: {exc}") from None
        if der is None:
            raise TransportError("the coordinator presented no certificate")
        return hashlib.sha256(der).hexdigest()

    # -- NodeChannel -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def pull_job(self, *, timeout_s: float) -> Job | None:
        header = self._call(
            lambda timeout: self._stub.PullJob(pb.PullRequest(run_id=self.run_id, wait_s=timeout_s), timeout=timeout),
            call_timeout_s=timeout_s + 10,
        )
        if header.shutdown:
            self._closed.set()
            return None
        if not header.has_job:
            return None
        try:
            parameters = self._fetch(header) if header.parameters.total_bytes else None
        except _StaleJob:
            # The coordinator gave up on the job (round deadline) between handing it out and
            # serving its parameters: there is nothing to do, and the node keeps serving.
            logger.info("job withdrawn by the coordinator", extra={"node_id": self.name, "round": int(header.round)})
            return None
        return job_from_header(header, parameters)

    def push_result(self, result: JobResult) -> None:
        """Upload ``result`` with this channel's counters since the previous result in its metrics.

        Each attempt's header carries the counts as they stand then, so the
        retries and resumptions of this upload travel with it; counts after
        the attempt that completed go with the next result.
        """
        payload = Payload.of(result.update) if result.update is not None else None
        first = True
        backoff = self._backoff()
        started = time.monotonic()
        sent = self._reported
        while True:
            try:
                offset = 0
                if not first:
                    status = self._stub.UploadStatus(
                        pb.UploadStatusRequest(run_id=result.run_id, job_id=result.job_id), timeout=30
                    )
                    if status.complete:
                        self._reported = sent  # the attempt that completed was the last one sent
                        return
                    offset = int(status.received_bytes)
                    if offset:
                        self._add(resumed_uploads=1)
                sent = self.counters()
                header = result_header(
                    dataclasses.replace(result, metrics={**result.metrics, **(sent - self._reported).as_metrics()}), payload
                )
                reply = self._stub.PushResult(self._upload_messages(header, payload, offset), timeout=600)
                if reply.complete:
                    self._reported = sent
                    return
                raise ProtocolError(f"coordinator acknowledged {reply.received_bytes} bytes of an unfinished upload")
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.ALREADY_EXISTS and not first:
                    # An earlier attempt completed while its reply was lost: the coordinator holds the result.
                    self._reported = sent
                    return
                if error.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    # A stale result: the job's deadline passed and the coordinator dropped it.
                    # Like every transport, drop the result and keep serving.
                    logger.info("coordinator dropped a late result", extra={"node_id": self.name, "round": result.round})
                    return
                if error.code() not in _TRANSIENT and error.code() is not grpc.StatusCode.DATA_LOSS:
                    raise _refusal(error) from None
                self._wait_or_give_up(backoff, started, error)
            first = False

    def close(self) -> None:
        """Stop the heartbeat and close the connection."""
        self._closed.set()
        self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()

    # -- internals ---------------------------------------------------------------

    def _upload_messages(self, header: pb.ResultHeader, payload: Payload | None, offset: int) -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        if payload is not None:
            for start, data in payload.chunks(offset, chunk_bytes=self._chunk_bytes):
                yield pb.UploadRequest(chunk=pb.Chunk(offset=start, data=data))

    def _fetch(self, header: pb.JobHeader) -> Parameters:
        total = int(header.parameters.total_bytes)
        buffer = receive_buffer(total)  # the job's tensors end up as views of it
        received = 0
        backoff = self._backoff()
        started = time.monotonic()
        while received < total:
            try:
                request = pb.FetchRequest(run_id=header.run_id, job_id=header.job_id, offset=received)
                if received:
                    self._add(resumed_downloads=1)
                for chunk in self._stub.FetchParameters(request, timeout=600):
                    data = chunk.data  # each read of a bytes field copies it
                    end = chunk.offset + len(data)
                    if chunk.offset != received or end > total:
                        raise ProtocolError(f"chunk at offset {chunk.offset} does not follow byte {received}")
                    buffer[received:end] = data
                    received = end
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    raise _StaleJob from None
                if error.code() not in _TRANSIENT:
                    raise _refusal(error) from None
                self._wait_or_give_up(backoff, started, error)
        return Payload.assemble(buffer, header.parameters, max_bytes=total)

    def _call(self, fn: Callable[[float], T], *, call_timeout_s: float = 30.0) -> T:
        backoff = self._backoff()
        started = time.monotonic()
        while True:
            try:
                return fn(call_timeout_s)
            except grpc.RpcError as error:
                if error.code() not in _TRANSIENT:
                    raise _refusal(error) from None
                self._wait_or_give_up(backoff, started, error)

    def _wait_or_give_up(self, backoff: Backoff, started: float, error: grpc.RpcError) -> None:
        if self._closed.is_set():
            raise TransportError("channel closed")
        if self._give_up_after_s is not None and time.monotonic() - started > self._give_up_after_s:
            raise TransportError(
                f"coordinator at {self._target} unreachable for {self._give_up_after_s:.0f} s: {error.code().name}",
                node_id=self.name,
            )
        wait = backoff.next_wait_s()
        logger.info("coordinator unreachable, retrying", extra={"node_id": self.name, "wait_s": round(wait, 2)})
        self._add(retries=1)
        time.sleep(wait)

    def _beat(self) -> None:
        while not self._closed.wait(self.heartbeat_interval_s):
            try:
                status, reason = self._status
                reply = self._stub.Heartbeat(
                    pb.HeartbeatRequest(run_id=self.run_id, status=status, reason=reason),
                    timeout=self.heartbeat_interval_s * 3,
                )
                if reply.shutdown:
                    self._closed.set()
            except grpc.RpcError:
                continue  # the next pull reconnects with backoff


class _StaleJob(Exception):
    """The coordinator no longer serves the job's parameters (it dropped the job)."""


def _refusal(error: grpc.RpcError) -> FedcareError:
    details = error.details() or error.code().name
    if error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PolicyViolation(f"the coordinator refused this node: {details}")
    return TransportError(f"the coordinator answered {error.code().name}: {details}")


def _json_object(text: str) -> dict[str, object]:
    import json

    value = json.loads(text)
    if not isinstance(value, dict):
        raise ProtocolError("the plan must be a JSON object")
    return value
