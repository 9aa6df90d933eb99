from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_TRAIN: _ClassVar[JobKind]
    JOB_KIND_EVALUATE: _ClassVar[JobKind]
    JOB_KIND_FEATURE_STATS: _ClassVar[JobKind]
    JOB_KIND_SECAGG: _ClassVar[JobKind]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_TRAIN: JobKind
JOB_KIND_EVALUATE: JobKind
JOB_KIND_FEATURE_STATS: JobKind
JOB_KIND_SECAGG: JobKind

class Blob(_message.Message):
    __slots__ = ("total_bytes", "sha256")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    sha256: bytes
    def __init__(self, total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("fedcare_version",)
    FEDCARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    fedcare_version: str
    def __init__(self, fedcare_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "plan_json", "plan_hash", "node_id", "heartbeat_interval_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    plan_json: str
    plan_hash: str
    node_id: str
    heartbeat_interval_s: float
    def __init__(self, run_id: _Optional[str] = ..., plan_json: _Optional[str] = ..., plan_hash: _Optional[str] = ..., node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("run_id", "wait_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    wait_s: float
    def __init__(self, run_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class JobHeader(_message.Message):
    __slots__ = ("has_job", "shutdown", "run_id", "round", "job_id", "kind", "plan_hash", "config_json", "parameters")
    HAS_JOB_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    has_job: bool
    shutdown: bool
    run_id: str
    round: int
    job_id: str
    kind: JobKind
    plan_hash: str
    config_json: str
    parameters: Blob
    def __init__(self, has_job: _Optional[bool] = ..., shutdown: _Optional[bool] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., job_id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., plan_hash: _Optional[str] = ..., config_json: _Optional[str] = ..., parameters: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("run_id", "job_id", "offset")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    job_id: str
    offset: int
    def __init__(self, run_id: _Optional[str] = ..., job_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Doubles(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("run_id", "round", "job_id", "kind", "num_examples", "metrics", "statistics", "error", "duration_s", "update", "data_json")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class StatisticsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Doubles
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Doubles, _Mapping]] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    job_id: str
    kind: JobKind
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    statistics: _containers.MessageMap[str, Doubles]
    error: str
    duration_s: float
    update: Blob
    data_json: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., job_id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., statistics: _Optional[_Mapping[str, Doubles]] = ..., error: _Optional[str] = ..., duration_s: _Optional[float] = ..., update: _Optional[_Union[Blob, _Mapping]] = ..., data_json: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("received_bytes", "complete")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    complete: bool
    def __init__(self, received_bytes: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("run_id", "job_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    job_id: str
    def __init__(self, run_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "status", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("shutdown",)
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    shutdown: bool
    def __init__(self, shutdown: _Optional[bool] = ...) -> None: ...
