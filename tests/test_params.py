"""Parameters: ordered float32 tensors, one contiguous buffer, safetensors on the wire."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from safetensors.numpy import save

from fedcare.errors import ProtocolError
from fedcare.params import Parameters


def _model(seed: int = 0) -> Parameters:
    rng = np.random.default_rng(seed)
    # Names deliberately not in alphabetical order: order must survive the wire.
    return Parameters(
        {
            "layer2.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "layer1.bias": rng.standard_normal(5).astype(np.float32),
            "a.scale": rng.standard_normal((2, 1, 3)).astype(np.float32),
            "layer1.weight": rng.standard_normal((5, 4)).astype(np.float32),
        }
    )


# --- construction ---------------------------------------------------------------------


def test_parameters_convert_float64_arrays_to_float32() -> None:
    p = Parameters({"w": np.ones((2, 2), dtype=np.float64)})

    assert p["w"].dtype == np.float32


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_parameters_refuse_non_floating_arrays(dtype: type) -> None:
    with pytest.raises(ProtocolError, match="'counter'"):
        Parameters({"w": np.ones(3, dtype=np.float32), "counter": np.zeros(3, dtype=dtype)})


def test_parameters_refuse_an_empty_tensor_name() -> None:
    with pytest.raises(ProtocolError):
        Parameters({"": np.ones(3, dtype=np.float32)})


def test_parameters_keep_insertion_order() -> None:
    assert list(_model()) == ["layer2.weight", "layer1.bias", "a.scale", "layer1.weight"]


def test_spec_lists_names_and_shapes_in_order() -> None:
    assert _model().spec == (
        ("layer2.weight", (4, 3)),
        ("layer1.bias", (5,)),
        ("a.scale", (2, 1, 3)),
        ("layer1.weight", (5, 4)),
    )


def test_parameters_keep_the_shape_of_a_scalar_tensor() -> None:
    p = Parameters({"temperature": np.array(1.5, dtype=np.float32)})

    assert p.spec == (("temperature", ()),)


# --- flat buffer ----------------------------------------------------------------------


def test_flatten_returns_one_contiguous_float32_vector_in_tensor_order() -> None:
    p = _model()
    expected = np.concatenate([p[name].reshape(-1) for name in p])

    flat = p.flatten()

    assert flat.ndim == 1 and flat.dtype == np.float32 and flat.flags.c_contiguous
    np.testing.assert_array_equal(flat, expected)


def test_from_flat_tensors_are_views_into_the_vector() -> None:
    vector = np.arange(12 + 5 + 6 + 20, dtype=np.float32)

    p = Parameters.from_flat(vector, _model().spec)

    assert all(np.shares_memory(p[name], vector) for name in p)


def test_from_flat_tensors_follow_the_spec_layout() -> None:
    vector = np.arange(12 + 5 + 6 + 20, dtype=np.float32)

    p = Parameters.from_flat(vector, _model().spec)

    np.testing.assert_array_equal(p["layer1.bias"], np.arange(12, 17, dtype=np.float32))


def test_flatten_of_from_flat_parameters_returns_the_same_buffer() -> None:
    vector = np.arange(12 + 5 + 6 + 20, dtype=np.float32)

    p = Parameters.from_flat(vector, _model().spec)

    assert p.flatten() is vector


def test_flatten_does_not_copy_a_second_time() -> None:
    p = _model()

    assert p.flatten() is p.flatten()


def test_flatten_repoints_tensors_into_the_flat_buffer() -> None:
    p = _model()

    flat = p.flatten()

    assert all(np.shares_memory(p[name], flat) for name in p)


@pytest.mark.parametrize(
    "vector",
    [
        np.zeros(43, dtype=np.float64),
        np.zeros((43, 1), dtype=np.float32),
        np.zeros(42, dtype=np.float32),
        np.zeros(44, dtype=np.float32),
    ],
    ids=["float64", "two-dimensional", "too-short", "too-long"],
)
def test_from_flat_refuses_a_vector_that_does_not_fit_the_spec(vector: np.ndarray) -> None:
    with pytest.raises(ProtocolError):
        Parameters.from_flat(vector, _model().spec)


def test_copy_does_not_share_memory_with_the_original() -> None:
    p = _model()

    assert not np.shares_memory(p.copy().flatten(), p.flatten())


# --- freeze ---------------------------------------------------------------------------


def test_freeze_makes_every_tensor_read_only() -> None:
    p = _model().freeze()

    assert not any(p[name].flags.writeable for name in p)


def test_frozen_tensor_refuses_writes() -> None:
    p = _model().freeze()

    with pytest.raises(ValueError, match="read-only"):
        p["layer1.bias"][0] = 1.0


def test_freeze_makes_the_flat_buffer_read_only() -> None:
    p = _model().freeze()

    assert not p.flatten().flags.writeable


def test_copy_of_frozen_parameters_is_writeable() -> None:
    q = _model().freeze().copy()

    assert all(q[name].flags.writeable for name in q)


# --- safetensors wire format ----------------------------------------------------------


def test_round_trip_keeps_tensor_order() -> None:
    p = _model()

    assert list(Parameters.from_bytes(p.to_bytes())) == list(p)


def test_round_trip_keeps_names_and_shapes() -> None:
    p = _model()

    assert Parameters.from_bytes(p.to_bytes()).spec == p.spec


def test_round_trip_keeps_values_exactly() -> None:
    p = _model()

    q = Parameters.from_bytes(p.to_bytes())

    np.testing.assert_array_equal(q.flatten(), p.flatten())


def test_round_trip_of_frozen_from_flat_parameters_keeps_values() -> None:
    vector = np.random.default_rng(1).standard_normal(43).astype(np.float32)
    p = Parameters.from_flat(vector, _model().spec).freeze()

    q = Parameters.from_bytes(p.to_bytes())

    np.testing.assert_array_equal(q.flatten(), vector)


def test_payload_starts_with_the_safetensors_header_length() -> None:
    payload = _model().to_bytes()

    header_length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_length])

    assert header["layer1.bias"]["dtype"] == "F32"


def test_payload_is_not_a_pickle() -> None:
    payload = _model().to_bytes()

    # Every pickle protocol >= 2 starts with the PROTO opcode 0x80.
    assert payload[:1] != b"\x80"


def test_from_bytes_refuses_a_pickle_payload() -> None:
    payload = pickle.dumps({"w": np.ones(3, dtype=np.float32)})

    with pytest.raises(ProtocolError, match="not valid safetensors"):
        Parameters.from_bytes(payload)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00" * 4, b"not safetensors at all, just text", np.ones(64, np.float32).tobytes()],
    ids=["empty", "short", "text", "raw-floats"],
)
def test_from_bytes_refuses_garbage(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid safetensors"):
        Parameters.from_bytes(payload)


def test_from_bytes_refuses_a_truncated_payload() -> None:
    payload = _model().to_bytes()

    with pytest.raises(ProtocolError):
        Parameters.from_bytes(payload[:-4])


def test_from_bytes_refuses_a_payload_over_max_bytes() -> None:
    payload = _model().to_bytes()

    with pytest.raises(ProtocolError, match="above the limit"):
        Parameters.from_bytes(payload, max_bytes=len(payload) - 1)


def test_from_bytes_checks_max_bytes_before_parsing() -> None:
    # Garbage that is too large must be refused for its size, not for its content.
    with pytest.raises(ProtocolError, match=r"1000 bytes, above the limit of 100 bytes"):
        Parameters.from_bytes(b"\xff" * 1000, max_bytes=100)


def test_from_bytes_accepts_a_payload_exactly_at_max_bytes() -> None:
    payload = _model().to_bytes()

    assert Parameters.from_bytes(payload, max_bytes=len(payload)).spec == _model().spec


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64])
def test_from_bytes_refuses_tensors_that_are_not_float32(dtype: type) -> None:
    payload = save({"w": np.ones(3, dtype=np.float32), "v": np.ones(3, dtype=dtype)})

    with pytest.raises(ProtocolError, match="expected float32"):
        Parameters.from_bytes(payload)


def test_from_bytes_refuses_an_order_that_does_not_name_the_tensors() -> None:
    payload = save(
        {"w": np.ones(3, dtype=np.float32)}, metadata={"fedcare.order": json.dumps(["w", "extra"])}
    )

    with pytest.raises(ProtocolError, match="order"):
        Parameters.from_bytes(payload)


def test_from_bytes_refuses_malformed_order_metadata_with_protocol_error() -> None:
    payload = save({"w": np.ones(3, dtype=np.float32)}, metadata={"fedcare.order": "not json"})

    with pytest.raises(ProtocolError):
        Parameters.from_bytes(payload)


def test_from_bytes_without_order_metadata_sorts_tensor_names() -> None:
    payload = save({"b": np.ones(2, dtype=np.float32), "a": np.ones(1, dtype=np.float32)})

    assert list(Parameters.from_bytes(payload)) == ["a", "b"]
