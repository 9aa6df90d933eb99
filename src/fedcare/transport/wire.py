"""Conversions between fedcare messages and their protobuf form, with bounds.

Shared by the coordinator's gRPC server and the node's gRPC channel. Nothing
here unpickles anything: parameters are safetensors, numbers are protobuf
fields, the per-round config is JSON of numbers and strings.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedcare.errors import ProtocolError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import _ORDER_KEY, Parameters
from fedcare.transport.proto import fedcare_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CONFIG_BYTES",
    "TIME_METADATA_KEY",
    "Payload",
    "job_header",
    "job_from_header",
    "kind_from_proto",
    "kind_to_proto",
    "receive_buffer",
    "result_from_header",
    "result_header",
]

#: Parameters move in chunks of this size (bytes).
DEFAULT_CHUNK_BYTES = 1 << 20
#: Upper bound on a job's JSON config (bytes); checked before parsing.
MAX_CONFIG_BYTES = 1 << 20
#: Trailing metadata of every heartbeat reply, refusals included: the coordinator's clock as seconds
#: since the epoch (UTC), which ``fedcare node doctor`` compares this machine's clock with.
TIME_METADATA_KEY = "fedcare-time"
#: Upper bound on a safetensors header (bytes), as the safetensors library sets it.
_MAX_HEADER_BYTES = 100_000_000
_FLOAT32_LE = np.dtype("<f4")

_KINDS: dict[JobKind, Any] = {
    JobKind.TRAIN: pb.JOB_KIND_TRAIN,
    JobKind.EVALUATE: pb.JOB_KIND_EVALUATE,
    JobKind.FEATURE_STATS: pb.JOB_KIND_FEATURE_STATS,
    JobKind.SECAGG: pb.JOB_KIND_SECAGG,
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
    """Serialized parameters with their SHA-256, served in chunks.

    The serialized form is kept as its parts (the safetensors header, then the
    model's own vector), never joined: sending a model makes no model-sized copy.

    Parameters
    ----------
    *parts : bytes-like
        The serialized bytes, in order; they must not change while the payload is in use.

    Examples
    --------
    >>> import numpy as np
    >>> payload = Payload.of(Parameters({"w": np.arange(3.0)}))
    >>> restored = Payload.assemble(b"".join(c for _, c in payload.chunks(0, chunk_bytes=7)),
    ...                             payload.blob(), max_bytes=10_000)
    >>> restored["w"].tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, *parts: Any) -> None:
        self._parts = [memoryview(part).cast("B") for part in parts]
        self.total_bytes = sum(part.nbytes for part in self._parts)
        digest = hashlib.sha256()
        for part in self._parts:
            digest.update(part)
        self.sha256 = digest.digest()

    @classmethod
    def of(cls, parameters: Parameters) -> Payload:
        """Serialize ``parameters`` (safetensors, tensors laid out in their own order)."""
        return cls(*_encode(parameters))

    def blob(self) -> pb.Blob:
        """The length-and-hash descriptor sent ahead of the chunks."""
        return pb.Blob(total_bytes=self.total_bytes, sha256=self.sha256)

    def chunks(self, offset: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """``(offset, data)`` pieces from ``offset`` to the end.

        Raises
        ------
        ProtocolError
            If ``offset`` is outside the payload.
        """
        if not 0 <= offset <= self.total_bytes:
            raise ProtocolError(f"offset {offset} is outside a payload of {self.total_bytes} bytes")
        for start in range(offset, self.total_bytes, chunk_bytes):
            yield start, self._read(start, min(start + chunk_bytes, self.total_bytes))

    def _read(self, start: int, stop: int) -> bytes:
        pieces = []
        base = 0
        for part in self._parts:
            low, high = max(start, base), min(stop, base + part.nbytes)
            if low < high:
                pieces.append(part[low - base : high - base])
            base += part.nbytes
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

    @staticmethod
    def assemble(data: Any, blob: pb.Blob, *, max_bytes: int) -> Parameters:
        """Check length and hash, then parse.

        Parameters
        ----------
        data : bytes-like
            The received bytes, e.g. a :func:`receive_buffer`. Parameters laid out as
            :meth:`of` writes them are views of it, so it must not change afterwards.

        Raises
        ------
        ProtocolError
            If the length or SHA-256 differ from ``blob`` or the bytes are not parameters.
        """
        view = memoryview(data).cast("B")
        if view.nbytes != blob.total_bytes:
            raise ProtocolError(f"received {view.nbytes} bytes, the sender announced {blob.total_bytes}")
        if hashlib.sha256(view).digest() != blob.sha256:
            raise ProtocolError("SHA-256 of the received parameters does not match; the transfer was corrupted")
        return _decode(view, max_bytes=max_bytes)


def receive_buffer(total_bytes: int) -> memoryview:
    """A writable buffer of ``total_bytes`` for an incoming payload; bound the size first.

    Its pages are not cleared up front: every byte is written by the chunks
    before :meth:`Payload.assemble` reads it.
    """
    return memoryview(bytearray(total_bytes))


# Parameters cross the wire as safetensors. The library's writer copies a model twice and
# orders tensors by name, and its reader copies every tensor, after which the coordinator
# copies them again into one vector: for a 44 MB model, four model-sized copies per transfer.
# Here the writer lays the tensors out in their own order behind the header without
# copying them, and the reader takes such a file as a read-only view of the received
# bytes; any other layout goes through the library's reader (Parameters.from_bytes),
# which checks it in full.


def _encode(parameters: Parameters) -> tuple[Any, ...]:
    """The safetensors serialization of ``parameters`` as (header, data) parts."""
    names = list(parameters)
    if "__metadata__" in names or sys.byteorder != "little":
        return (parameters.to_bytes(),)
    entries: dict[str, Any] = {"__metadata__": {_ORDER_KEY: json.dumps(names)}}
    offset = 0
    for name, shape in parameters.spec:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    flat = parameters.flatten()  # contiguous native float32; no copy for parameters built from one vector
    return len(header).to_bytes(8, "little") + header, flat


def _decode(view: memoryview, *, max_bytes: int) -> Parameters:
    if view.nbytes > max_bytes:
        raise ProtocolError(f"parameter payload is {view.nbytes} bytes, above the limit of {max_bytes} bytes")
    layout = _own_layout(view)
    if layout is not None:
        start, spec = layout
        flat = np.frombuffer(view, dtype=_FLOAT32_LE, count=(view.nbytes - start) // 4, offset=start)
        if flat.dtype == np.float32 and flat.ctypes.data % flat.dtype.alignment == 0:
            flat.flags.writeable = False
            return Parameters.from_flat(flat, spec)
    return Parameters.from_bytes(view.tobytes(), max_bytes=max_bytes)


def _own_layout(data: memoryview) -> tuple[int, tuple[tuple[str, tuple[int, ...]], ...]] | None:
    """Where the data starts and the tensors' spec, if ``data`` is laid out as :func:`_encode` writes.

    That is: float32 tensors only, stored back to back in the order the metadata lists,
    filling the file to its end. None for anything else (the full reader decides).
    """
    if data.nbytes < 8:
        return None
    header_bytes = int.from_bytes(data[:8], "little")
    start = 8 + header_bytes
    if header_bytes > _MAX_HEADER_BYTES or start > data.nbytes or start % 4:
        return None
    try:
        header = json.loads(data[8:start].tobytes())
        order = json.loads(header.pop("__metadata__")[_ORDER_KEY])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    if (
        not isinstance(order, list)
        or not all(isinstance(name, str) and name for name in order)
        or len(set(order)) != len(order)
        or set(order) != set(header)
    ):
        return None
    spec = []
    cursor = 0
    for name in order:
        entry = header[name]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"} or entry["dtype"] != "F32":
            return None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
        ):
            return None
        size = 4 * int(np.prod(shape, dtype=object))
        if offsets != [cursor, cursor + size]:
            return None
        cursor += size
        spec.append((name, tuple(shape)))
    if start + cursor != data.nbytes:
        return None
    return start, tuple(spec)


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
        data_json=_config_json(result.data) if result.data else "",
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
        data=_config_from_json(header.data_json) if header.data_json else {},
        error=header.error or None,
        duration_s=float(header.duration_s),
    )
