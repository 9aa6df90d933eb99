"""Fuzzing what arrives from outside: message decoding and the plan parser.

Whatever bytes or values come in, decoding either succeeds or raises fedcare's
own error naming the problem (``ProtocolError`` for messages, ``ConfigError``
for plans): never another exception, never a crash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError, DataError, ProtocolError
from fedcare.params import Parameters
from fedcare.plan import load_plan, parse_plan
from fedcare.transport import wire
from fedcare.transport.proto import fedcare_pb2 as pb

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = Parameters({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}).freeze()
GOOD_BYTES = b"".join(bytes(part) for part in wire.Payload.of(MODEL)._parts)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_decode_as_anything_but_a_protocol_error(data: bytes) -> None:
    blob = pb.Blob(total_bytes=len(data), sha256=hashlib.sha256(data).digest())
    try:
        parameters = wire.Payload.assemble(bytearray(data), blob, max_bytes=4096)
    except (ProtocolError, DataError):
        return
    assert parameters.num_elements * 4 <= len(data)


@FUZZ
@given(st.integers(0, len(GOOD_BYTES) - 1), st.integers(0, 255), st.integers(0, len(GOOD_BYTES)))
def test_a_flipped_or_truncated_payload_is_refused_or_reads_as_parameters(position: int, value: int, cut: int) -> None:
    mutated = bytearray(GOOD_BYTES)
    mutated[position] = value
    mutated = mutated[: max(cut, 1)]
    blob = pb.Blob(total_bytes=len(mutated), sha256=hashlib.sha256(mutated).digest())
    try:
        parameters = wire.Payload.assemble(mutated, blob, max_bytes=4096)
    except (ProtocolError, DataError):
        return
    assert all(np.asarray(parameters[name]).dtype == np.float32 for name in parameters)


@FUZZ
@given(st.binary(max_size=512))
def test_the_hash_check_refuses_any_change(noise: bytes) -> None:
    blob = wire.Payload.of(MODEL).blob()
    changed = bytearray(GOOD_BYTES)
    for i, byte in enumerate(noise[: len(changed)]):
        changed[i] ^= byte
    if bytes(changed) == GOOD_BYTES:
        return
    try:
        wire.Payload.assemble(changed, blob, max_bytes=4096)
    except ProtocolError as exc:
        assert "SHA-256" in exc.message
    else:  # pragma: no cover - a collision
        raise AssertionError("a changed payload passed the SHA-256 check")


@FUZZ
@given(
    kind=st.integers(-3, 10),
    data_json=st.text(max_size=200) | json_values.map(json.dumps),
    metrics=st.dictionaries(st.text(max_size=12), st.floats(), max_size=5),
    num_examples=st.integers(-(2**40), 2**40),
)
def test_result_headers_decode_or_raise_a_protocol_error(kind: int, data_json: str, metrics: dict[str, float], num_examples: int) -> None:
    header = pb.ResultHeader(run_id="r", round=1, job_id="j", kind=kind, num_examples=num_examples, data_json=data_json)
    for name, value in metrics.items():
        header.metrics[name] = value
    try:
        result = wire.result_from_header(header, "site-a", None)
    except ProtocolError:
        return
    assert result.node_id == "site-a"  # the identity comes from the certificate, never from the message
    assert isinstance(result.data, dict)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_as_a_result_header_never_escape_protobufs_own_error(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    try:
        header = pb.ResultHeader.FromString(data)
    except DecodeError:
        return
    try:
        wire.result_from_header(header, "site-a", None)
    except ProtocolError:
        pass


@FUZZ
@given(config_json=st.text(max_size=300) | json_values.map(json.dumps), kind=st.integers(-2, 8))
def test_job_headers_decode_or_raise_a_protocol_error(config_json: str, kind: int) -> None:
    header = pb.JobHeader(has_job=True, run_id="r", round=1, job_id="j", kind=kind, plan_hash="h", config_json=config_json)
    try:
        job = wire.job_from_header(header, None)
    except ProtocolError:
        return
    assert isinstance(job.config, dict)


VALID_PLAN: dict[str, Any] = {
    "name": "fuzz",
    "task": "tabular-logistic",
    "dataset": {"name": "heart-disease", "normalization": "federated"},
    "rounds": 3,
    "local": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
    "strategy": {"name": "fedavg"},
    "privacy": {"record_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-3}},
}


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(value, dict):
        return [prefix]
    return [prefix] + [p for key, child in value.items() for p in _paths(child, (*prefix, key))]


PLAN_PATHS = [p for p in _paths(VALID_PLAN) if p]


def _set(plan: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(plan))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@FUZZ
@given(st.sampled_from(PLAN_PATHS), json_values)
def test_a_plan_with_any_field_replaced_parses_or_names_the_field(path: tuple[str, ...], value: Any) -> None:
    try:
        parse_plan(_set(VALID_PLAN, path, value))
    except ConfigError as exc:
        assert str(exc)
        assert exc.field is None or exc.field.startswith("plan")


@FUZZ
@given(json_values)
def test_any_json_document_as_a_plan_parses_or_raises_a_config_error(value: Any) -> None:
    try:
        parse_plan(value)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_text_as_a_plan_file_loads_or_raises_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_plan(path)
    except ConfigError:
        pass


def test_yaml_tags_that_would_build_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("!!python/object/apply:os.system ['echo owned']\n")

    try:
        load_plan(path)
    except ConfigError as exc:
        assert "plan" in str(exc).lower()
    else:  # pragma: no cover
        raise AssertionError("a python/object tag was accepted")
    assert yaml.safe_load("a: 1") == {"a": 1}
