"""Conversions between fedcare messages and their protobuf form, with bounds.

Shared by the coordinator's gRPC server and the node's gRPC channel. Nothing
here unpickles anything: parameters are safetensors, numbers are protobuf
fields, the per-round config is JSON of numbers and strings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from fedcare.errors import ProtocolError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.transport.proto import fedcare_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CONFIG_BYTES",
    "Payload",
    "job_header",
    "job_from_header",
    "kind_from_proto",
    "kind_to_proto",
    "result_from_header",
    "result_header",
]

#: Parameters move in chunks of this size (bytes).
DEFAULT_CHUNK_BYTES = 1 << 20
#: Upper bound on a job's JSON config (bytes); checked before parsing.
MAX_CONFIG_BYTES = 1 << 20

_KINDS: dict[JobKind, Any] = {
    JobKind.TRAIN: pb.JOB_KIND_TRAIN,
    JobKind.EVALUATE: pb.JOB_KIND_EVALUATE,
    JobKind.FEATURE_STATS: pb.JOB_KIND_FEATURE_STATS,
}
_KINDS_BACK: dict[Any, JobKind] = {v: k for k, v in _KINDS.items()}


def kind_to_proto(kind: JobKind) -> Any:
    """The protobuf enum value of a job kind."""
    return _KINDS[kind]


def kind_from_proto(value: Any) -> JobKind:
    """The job kind of a protobuf enum value.

    Raises
    ------
    ProtocolError
        If the value is not a known kind.
    """
    try:
        return _KINDS_BACK[value]
    except KeyError:
        raise ProtocolError(f"unknown job kind {value}") from None


class Payload:
    """Serialized parameters with their SHA-256, served or received in chunks.

    Examples
    --------
    >>> import numpy as np
    >>> payload = Payload.of(Parameters({"w": np.arange(3.0)}))
    >>> restored = Payload.assemble(b"".join(c for _, c in payload.chunks(0, chunk_bytes=7)),
    ...                             payload.blob(), max_bytes=10_000)
    >>> restored["w"].tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).digest()

    @classmethod
    def of(cls, parameters: Parameters) -> Payload:
        """Serialize ``parameters`` (safetensors)."""
        return cls(parameters.to_bytes())

    def blob(self) -> pb.Blob:
        """The length-and-hash descriptor sent ahead of the chunks."""
        return pb.Blob(total_bytes=len(self.data), sha256=self.sha256)

    def chunks(self, offset: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """``(offset, data)`` pieces from ``offset`` to the end.

        Raises
        ------
        ProtocolError
            If ``offset`` is outside the payload.
        """
        if not 0 <= offset <= len(self.data):
            raise ProtocolError(f"offset {offset} is outside a payload of {len(self.data)} bytes")
        view = memoryview(self.data)
        for start in range(offset, len(self.data), chunk_bytes):
            yield start, bytes(view[start : start + chunk_bytes])

    @staticmethod
    def assemble(data: bytes | bytearray, blob: pb.Blob, *, max_bytes: int) -> Parameters:
        """Check length and hash, then parse.

        Raises
        ------
        ProtocolError
            If the length or SHA-256 differ from ``blob`` or the bytes are not parameters.
        """
        if len(data) != blob.total_bytes:
            raise ProtocolError(f"received {len(data)} bytes, the sender announced {blob.total_bytes}")
        if hashlib.sha256(data).digest() != blob.sha256:
            raise ProtocolError("SHA-256 of the received parameters does not match; the transfer was corrupted")
        return Parameters.from_bytes(bytes(data), max_bytes=max_bytes)


def _config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), separators=(",", ":"), allow_nan=False)


def _config_from_json(text: str) -> dict[str, Any]:
    if len(text) > MAX_CONFIG_BYTES:
        raise ProtocolError(f"job config is {len(text)} bytes, above the limit of {MAX_CONFIG_BYTES}")
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise ProtocolError(f"job config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("job config must be a JSON object")
    return value


def job_header(job: Job, payload: Payload | None) -> pb.JobHeader:
    """The header announcing ``job``; its parameters follow via FetchParameters."""
    return pb.JobHeader(
        has_job=True,
        run_id=job.run_id,
        round=job.round,
        job_id=job.job_id,
        kind=kind_to_proto(job.kind),
        plan_hash=job.plan_hash,
        config_json=_config_json(job.config),
        parameters=payload.blob() if payload is not None else pb.Blob(),
    )


def job_from_header(header: pb.JobHeader, parameters: Parameters | None) -> Job:
    """Rebuild a job from its header and fetched parameters."""
    return Job(
        run_id=header.run_id,
        round=int(header.round),
        job_id=header.job_id,
        kind=kind_from_proto(header.kind),
        plan_hash=header.plan_hash,
        parameters=parameters.freeze() if parameters is not None else None,
        config=_config_from_json(header.config_json),
    )


def result_header(result: JobResult, payload: Payload | None) -> pb.ResultHeader:
    """The header of a result upload."""
    header = pb.ResultHeader(
        run_id=result.run_id,
        round=result.round,
        job_id=result.job_id,
        kind=kind_to_proto(result.kind),
        num_examples=result.num_examples,
        error=result.error or "",
        duration_s=result.duration_s,
        update=payload.blob() if payload is not None else pb.Blob(),
    )
    for name, value in result.metrics.items():
        header.metrics[name] = float(value)
    for name, values in result.statistics.items():
        header.statistics[name].values.extend(float(v) for v in values)
    return header


def result_from_header(header: pb.ResultHeader, node_id: str, update: Parameters | None) -> JobResult:
    """Rebuild a result; ``node_id`` comes from the certificate, never from the message."""
    return JobResult(
        run_id=header.run_id,
        round=int(header.round),
        job_id=header.job_id,
        kind=kind_from_proto(header.kind),
        node_id=node_id,
        update=update,
        num_examples=int(header.num_examples),
        metrics=dict(header.metrics),
        statistics={name: tuple(v.values) for name, v in header.statistics.items()},
        error=header.error or None,
        duration_s=float(header.duration_s),
    )
