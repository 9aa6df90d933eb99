"""Update compression: round trips, error bounds, unbiased int8, error feedback, refusals, and a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.compression import COMPRESSED_TENSOR, ErrorFeedback, compress, compressed_bytes, decompress
from fedcare.errors import ProtocolError
from fedcare.params import Parameters
from fedcare.plan import parse_plan
from fedcare.simulation import simulate

SPEC = (("weight", (40, 25)), ("bias", (25,)), ("scale", (3,)))
SIZE = 40 * 25 + 25 + 3


def update(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 0.01, SIZE).astype(np.float32)
    values[-3:] = [5.0, -3.0, 0.0]  # a tensor of another magnitude: int8's scales are per tensor
    return values


def payload(values: np.ndarray) -> Parameters:
    """Raw bytes as the one tensor a compressed update travels in (padded to 4 bytes)."""
    raw = values.tobytes()
    raw += b"\0" * (-len(raw) % 4)
    words = np.frombuffer(raw, dtype=np.float32).copy()
    return Parameters.from_flat(words, ((COMPRESSED_TENSOR, (words.size,)),))


# ---------------------------------------------------------------- round trips and sizes


def test_float16_round_trip_is_within_half_precision_rounding() -> None:
    values = update()
    decoded = decompress(compress(values, SPEC, method="float16"), SPEC, method="float16").flatten()
    np.testing.assert_allclose(decoded, values, rtol=2**-11, atol=2**-24)


def test_bfloat16_rounds_to_nearest_even_within_eight_bits_of_precision() -> None:
    values = update()
    decoded = decompress(compress(values, SPEC, method="bfloat16"), SPEC, method="bfloat16").flatten()
    np.testing.assert_allclose(decoded, values, rtol=2**-8, atol=0)
    # 1 + 2**-8 lies halfway between 1 and the next bfloat16 (1 + 2**-7): ties go to the even one, 1.
    # 1 + 3 * 2**-8 lies halfway between 1 + 2**-7 (odd) and 1 + 2**-6 (even): up.
    spec = (("w", (3,)),)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], dtype=np.float32)
    decoded = decompress(compress(ties, spec, method="bfloat16"), spec, method="bfloat16").flatten()
    assert decoded.tolist() == [1.0, 1 + 2**-6, 1 + 2**-7]


def test_int8_error_is_below_one_step_of_each_tensors_own_scale() -> None:
    values = update()
    packed = compress(values, SPEC, method="int8", rng=np.random.default_rng(1))
    decoded = decompress(packed, SPEC, method="int8").flatten()
    small = np.abs(values[:-3]).max() / 127
    assert np.abs(decoded[:-3] - values[:-3]).max() < small  # not 5.0 / 127: the large tensor has its own scale
    assert np.abs(decoded[-3:] - values[-3:]).max() < 5.0 / 127
    assert decoded[-3:][np.argmax(np.abs(values[-3:]))] == pytest.approx(5.0)  # the largest value is exact


def test_int8_is_unbiased_over_many_draws() -> None:
    values = update()
    rng = np.random.default_rng(2)
    draws = 2000
    total = np.zeros(SIZE)
    for _ in range(draws):
        total += decompress(compress(values, SPEC, method="int8", rng=rng), SPEC, method="int8").flatten()
    step = np.abs(values[:-3]).max() / 127
    # One draw is off by up to one step; the mean of 2000 by about step / sqrt(4 * 2000) at most (1 sd).
    error = np.abs(total[:-3] / draws - values[:-3])
    assert error.max() < 6 * step / np.sqrt(4 * draws)
    assert error.mean() < 0.25 * step  # deterministic rounding would be off by about step / 4 on average


def test_int8_draws_repeat_with_the_same_seed() -> None:
    first = compress(update(), SPEC, method="int8", rng=np.random.default_rng(5)).flatten()
    second = compress(update(), SPEC, method="int8", rng=np.random.default_rng(5)).flatten()
    assert first.tobytes() == second.tobytes()


def test_topk_sends_exactly_the_largest_coordinates_of_the_whole_update() -> None:
    values = update()
    decoded = decompress(compress(values, SPEC, method="topk", topk_fraction=0.01), SPEC, method="topk").flatten()
    k = 11  # ceil(0.01 * 1028)
    largest = np.argsort(np.abs(values))[-k:]
    assert set(np.flatnonzero(decoded)) == set(largest) - {SIZE - 1}  # the exact 0.0 is "sent" as a zero
    np.testing.assert_array_equal(decoded[largest], values[largest])


def test_payload_sizes_are_a_half_a_quarter_plus_scales_and_six_bytes_per_topk_coordinate() -> None:
    assert compress(update(), SPEC, method="float16").nbytes == 2 * SIZE
    assert compress(update(), SPEC, method="int8", rng=np.random.default_rng(0)).nbytes == 4 * 3 + SIZE
    assert compressed_bytes(SPEC, method="topk", topk_fraction=0.01) == 11 * (2 + 4)  # uint16 positions
    big = (("w", (70_000,)),)
    assert compressed_bytes(big, method="topk", topk_fraction=0.01) == 700 * (4 + 4)  # uint32 beyond 65,536


def test_float16_refuses_values_beyond_its_range_and_names_bfloat16() -> None:
    values = update()
    values[0] = 70_000.0
    with pytest.raises(ProtocolError, match="bfloat16"):
        compress(values, SPEC, method="float16")
    decoded = decompress(compress(values, SPEC, method="bfloat16"), SPEC, method="bfloat16").flatten()
    assert decoded[0] == pytest.approx(70_000.0, rel=2**-8)


# ---------------------------------------------------------------- error feedback


def test_error_feedback_makes_the_sum_sent_converge_to_the_sum_of_true_updates() -> None:
    rng = np.random.default_rng(3)
    feedback = ErrorFeedback()
    true_total = np.zeros(SIZE)
    sent_total = np.zeros(SIZE)
    without_total = np.zeros(SIZE)
    for _ in range(200):
        values = (rng.normal(0.0, 0.01, SIZE) + 0.005).astype(np.float32)  # a steady drift plus noise
        true_total += values
        packed = feedback.compress(values, SPEC, run_id="r", method="topk", topk_fraction=0.05)
        sent_total += decompress(packed, SPEC, method="topk", topk_fraction=0.05).flatten()
        plain = compress(values, SPEC, method="topk", topk_fraction=0.05)
        without_total += decompress(plain, SPEC, method="topk", topk_fraction=0.05).flatten()
    assert feedback.residual is not None
    # Nothing is lost: what was sent plus what is kept is exactly what was computed.
    np.testing.assert_allclose(sent_total + feedback.residual, true_total, rtol=0, atol=1e-4)
    gap = np.linalg.norm(sent_total - true_total) / np.linalg.norm(true_total)
    gap_without = np.linalg.norm(without_total - true_total) / np.linalg.norm(true_total)
    assert gap < 0.2 and gap_without > 0.5  # without feedback most of the small, steady drift is never sent


def test_error_feedback_residual_survives_a_restart_of_the_same_run_only(tmp_path: Path) -> None:
    path = tmp_path / "compression-residual.safetensors"
    first = ErrorFeedback(path)
    first.compress(update(), SPEC, run_id="run-a", method="topk", topk_fraction=0.01)
    kept = first.residual
    assert kept is not None and np.abs(kept).sum() > 0

    restarted = ErrorFeedback(path)
    sent = restarted.compress(np.zeros(SIZE, np.float32), SPEC, run_id="run-a", method="topk", topk_fraction=0.01)
    decoded = decompress(sent, SPEC, method="topk", topk_fraction=0.01).flatten()
    assert np.abs(decoded).max() == pytest.approx(np.abs(kept).max())  # it sent what the first one kept

    other_run = ErrorFeedback(path)
    sent = other_run.compress(np.zeros(SIZE, np.float32), SPEC, run_id="run-b", method="topk", topk_fraction=0.01)
    assert not decompress(sent, SPEC, method="topk", topk_fraction=0.01).flatten().any()


# ---------------------------------------------------------------- malformed payloads


def test_decode_refuses_a_payload_of_the_wrong_length() -> None:
    packed = compress(update(), SPEC, method="int8", rng=np.random.default_rng(0))
    short = Parameters.from_flat(packed.flatten()[:-1].copy(), ((COMPRESSED_TENSOR, (packed.num_elements - 1,)),))
    with pytest.raises(ProtocolError, match=rf"one tensor {COMPRESSED_TENSOR}\[260\], got {COMPRESSED_TENSOR}\[259\]"):
        decompress(short, SPEC, method="int8")


def test_decode_refuses_an_uncompressed_update_by_its_tensor_names() -> None:
    plain = Parameters.from_flat(update(), SPEC)
    with pytest.raises(ProtocolError, match=r"got weight\[40, 25\], bias\[25\], scale\[3\]"):
        decompress(plain, SPEC, method="float16")


def test_decode_refuses_topk_positions_out_of_range() -> None:
    positions = np.arange(11, dtype="<u2")
    positions[-1] = SIZE  # one past the end
    bad = payload(np.frombuffer(positions.tobytes() + np.ones(11, "<f4").tobytes(), dtype=np.uint8))
    with pytest.raises(ProtocolError, match="below 1028 .*1 are out of range"):
        decompress(bad, SPEC, method="topk", topk_fraction=0.01)


def test_decode_refuses_repeated_topk_positions() -> None:
    positions = np.arange(11, dtype="<u2")
    positions[5] = positions[4]
    bad = payload(np.frombuffer(positions.tobytes() + np.ones(11, "<f4").tobytes(), dtype=np.uint8))
    with pytest.raises(ProtocolError, match="repeat or are out of order"):
        decompress(bad, SPEC, method="topk", topk_fraction=0.01)


def test_decode_refuses_a_nan_int8_scale() -> None:
    scales = np.array([0.01, np.nan, 1.0], dtype="<f4")
    bad = payload(np.frombuffer(scales.tobytes() + np.zeros(SIZE, np.int8).tobytes(), dtype=np.uint8))
    with pytest.raises(ProtocolError, match=r"scales must be finite and >= 0, got \[nan\]"):
        decompress(bad, SPEC, method="int8")


def test_decode_refuses_float16_values_that_decode_to_infinity() -> None:
    halves = np.zeros(SIZE, dtype="<f2")
    halves[7] = np.inf
    with pytest.raises(ProtocolError, match="decodes to 1 non-finite values"):
        decompress(payload(halves), SPEC, method="float16")


def test_decode_refuses_nonzero_padding() -> None:
    spec = (("w", (3,)),)  # 6 bytes of float16, 2 of padding
    raw = np.zeros(8, dtype=np.uint8)
    raw[7] = 1
    with pytest.raises(ProtocolError, match="padding after byte 6 is not zero"):
        decompress(payload(raw), spec, method="float16")


# ---------------------------------------------------------------- in a federation


def heart_plan(method: str) -> Any:
    """``plans/heart_disease.yaml`` without secure aggregation (compression is for plain updates)."""
    return parse_plan(
        {
            "name": "heart-disease-compressed",
            "task": "tabular-logistic",
            "dataset": {"name": "heart-disease", "normalization": "federated"},
            "rounds": 30,
            "min_nodes": 2,
            "local": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.01},
            "strategy": {"name": "fedavg"},
            "evaluation": {"every_rounds": 30},
            "compression": {"method": method},
            "seed": 0,
        }
    )


@pytest.fixture(scope="module")
def heart_runs() -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    runs = {}
    for method in ("none", "int8", "topk"):
        events: list[dict[str, Any]] = []
        runs[method] = (simulate(heart_plan(method), on_event=events.append), events)
    return runs


def test_heart_disease_with_int8_or_topk_is_as_accurate_as_uncompressed(heart_runs: dict[str, Any]) -> None:
    plain = heart_runs["none"][0].final_evaluation.pooled
    assert plain["accuracy"] > 0.75
    for method in ("int8", "topk"):
        result = heart_runs[method][0]
        assert result.failures == [], method
        scores = result.final_evaluation.pooled
        assert abs(scores["accuracy"] - plain["accuracy"]) <= 0.02, method
        assert abs(scores["roc_auc"] - plain["roc_auc"]) <= 0.02, method


def test_round_events_report_each_sites_compression_ratio_and_smaller_uploads(heart_runs: dict[str, Any]) -> None:
    plain_ends = [e for e in heart_runs["none"][1] if e["event"] == "round_end"]
    assert all("compression" not in e for e in plain_ends)
    # 14 weights in 2 tensors, 56 bytes as float32; int8: 2 scales + 14 codes = 22 bytes, padded to 24;
    # topk 1 %: one coordinate, a uint16 position and a float32 value, padded to 8.
    for method, ratio in (("int8", 56 / 24), ("topk", 56 / 8)):
        ends = [e for e in heart_runs[method][1] if e["event"] == "round_end"]
        for plain, event in zip(plain_ends, ends, strict=True):
            assert event["compression"]["method"] == method
            assert set(event["compression"]["ratio"]) == set(event["nodes_ok"])
            assert all(r == pytest.approx(ratio, abs=0.01) for r in event["compression"]["ratio"].values())
            assert all(event["bytes"][n]["up"] < plain["bytes"][n]["up"] for n in event["nodes_ok"])
