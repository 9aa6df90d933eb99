"""Update compression: round trips, error bounds, unbiased int8, error feedback, refusals, and a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zlib

import numpy as np
import pytest
import yaml

from fedcare.cli import demo_plan_path
from fedcare.compression import (
    COMPRESSED_TENSOR,
    ErrorFeedback,
    compress,
    compressed_bytes,
    decompress,
    topk_dense,
)
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


def test_topk_sends_small_tensors_dense_and_the_largest_coordinates_of_the_rest() -> None:
    values = update()
    decoded = decompress(compress(values, SPEC, method="topk", topk_fraction=0.01), SPEC, method="topk").flatten()
    # k = ceil(0.01 * 1028) = 11: "scale" (3 values) is at most k, so dense; 11 of the other 1025 are sent.
    np.testing.assert_array_equal(decoded[-3:], values[-3:])
    largest = np.argsort(np.abs(values[:-3]))[-11:]
    assert set(np.flatnonzero(decoded[:-3])) == set(largest)
    np.testing.assert_array_equal(decoded[largest], values[largest])


def test_topk_dense_tensors_are_those_no_larger_than_the_whole_updates_budget() -> None:
    assert topk_dense(SPEC, fraction=0.01) == (False, False, True)  # k = 11
    assert topk_dense(SPEC, fraction=0.05) == (False, True, True)  # k = 52: the 25 biases too


def test_payload_sizes_are_at_most_a_half_a_quarter_plus_scales_and_six_bytes_per_topk_coordinate() -> None:
    assert compress(update(), SPEC, method="float16").nbytes == 2 * SIZE
    assert compressed_bytes(SPEC, method="int8") == 4 * 3 + 4 + SIZE  # scales, the section's length, codes
    # The 3 dense values, 11 values of the rest, the section's length, 11 uint16 gaps.
    assert compressed_bytes(SPEC, method="topk", topk_fraction=0.01) == 4 * 3 + 11 * 4 + 4 + 11 * 2
    big = (("w", (70_000,)),)
    assert compressed_bytes(big, method="topk", topk_fraction=0.01) == 700 * 4 + 4 + 700 * 4  # uint32 beyond 65,536


def test_int8_codes_are_deflated_when_that_makes_them_shorter() -> None:
    # Heavy-tailed, as updates are: a few large values set the scale, most codes are near 0.
    values = (0.01 * np.random.default_rng(0).standard_t(3, SIZE)).astype(np.float32)
    packed = compress(values, SPEC, method="int8", rng=np.random.default_rng(0))
    assert packed.nbytes < 0.9 * compressed_bytes(SPEC, method="int8")
    decoded = decompress(packed, SPEC, method="int8").flatten()
    np.testing.assert_allclose(decoded, values, atol=np.abs(values).max() / 127)


def test_topk_positions_are_deflated_as_gaps() -> None:
    spec = (("w", (100_000,)),)
    values = np.random.default_rng(0).normal(0.0, 1.0, 100_000).astype(np.float32)
    packed = compress(values, spec, method="topk", topk_fraction=0.01)
    assert packed.nbytes < 0.85 * compressed_bytes(spec, method="topk", topk_fraction=0.01)
    decoded = decompress(packed, spec, method="topk", topk_fraction=0.01).flatten()
    assert np.count_nonzero(decoded) == 1000


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


def test_error_feedback_keeps_no_residual_for_dense_tensors() -> None:
    feedback = ErrorFeedback()
    feedback.compress(update(), SPEC, run_id="r", method="topk", topk_fraction=0.01)
    assert feedback.residual is not None
    assert not feedback.residual[-3:].any() and feedback.residual[:-3].any()


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


def int8_payload(codes_section: bytes, *, stored: int | None = None, scales: Any = (0.01, 0.01, 1.0)) -> Parameters:
    """An int8 payload for ``SPEC``: scales, then a packed section of ``stored`` bytes (its length if not given)."""
    length = np.array([len(codes_section) if stored is None else stored], dtype="<u4")
    raw = np.asarray(scales, dtype="<f4").tobytes() + length.tobytes() + codes_section
    return payload(np.frombuffer(raw, dtype=np.uint8))


def topk_payload(gaps: np.ndarray) -> Parameters:
    """A topk 1 % payload for ``SPEC``: 3 dense values, 11 values, 11 uint16 gaps stored raw."""
    head = np.ones(3 + 11, dtype="<f4").tobytes()
    section = gaps.astype("<u2").tobytes()
    return payload(np.frombuffer(head + np.array([len(section)], "<u4").tobytes() + section, dtype=np.uint8))


def test_decode_refuses_a_payload_longer_than_its_layouts_most() -> None:
    words = -(-compressed_bytes(SPEC, method="int8") // 4)
    long = Parameters.from_flat(np.zeros(words + 1, np.float32), ((COMPRESSED_TENSOR, (words + 1,)),))
    with pytest.raises(ProtocolError, match=rf"one tensor {COMPRESSED_TENSOR} of at most {words} words, got"):
        decompress(long, SPEC, method="int8")


def test_decode_refuses_a_payload_shorter_than_its_section_says() -> None:
    packed = compress(update(), SPEC, method="int8", rng=np.random.default_rng(0))
    short = Parameters.from_flat(packed.flatten()[:-1].copy(), ((COMPRESSED_TENSOR, (packed.num_elements - 1,)),))
    with pytest.raises(ProtocolError, match="int8 codes section says it is .* bytes long"):
        decompress(short, SPEC, method="int8")


def test_decode_refuses_a_section_longer_than_its_raw_length() -> None:
    packed = int8_payload(np.zeros(SIZE, np.int8).tobytes(), stored=SIZE + 1)
    with pytest.raises(ProtocolError, match="section says it is 1029 bytes long; it is at most 1028"):
        decompress(packed, SPEC, method="int8")


def test_decode_refuses_a_payload_longer_than_its_section_says() -> None:
    section = zlib.compress(np.zeros(SIZE, np.int8).tobytes())
    packed = int8_payload(section + b"\0" * 8, stored=len(section))  # two more words of zeros
    end = 4 * 3 + 4 + len(section)
    with pytest.raises(ProtocolError, match=rf"layout takes {end} bytes \({-(-end // 4)} words\), got"):
        decompress(packed, SPEC, method="int8")


def test_decode_refuses_an_uncompressed_update_by_its_tensor_names() -> None:
    plain = Parameters.from_flat(update(), SPEC)
    with pytest.raises(ProtocolError, match=r"got weight\[40, 25\], bias\[25\], scale\[3\]"):
        decompress(plain, SPEC, method="float16")


def test_decode_refuses_a_truncated_deflate_stream() -> None:
    stream = zlib.compress(np.zeros(SIZE, np.int8).tobytes())
    with pytest.raises(ProtocolError, match="zlib stream is truncated after"):
        decompress(int8_payload(stream[:-4]), SPEC, method="int8")  # the checksum cut off


def test_decode_refuses_a_deflate_stream_inflating_past_its_length_without_inflating_it_all() -> None:
    bomb = zlib.compress(bytes(10_000_000), 9)  # 10 MB of zeros in about 10 kB: longer than the payload may be
    with pytest.raises(ProtocolError, match="of at most 261 words"):
        decompress(int8_payload(bomb), SPEC, method="int8")
    small_bomb = zlib.compress(bytes(100_000), 9)  # 100 kB in about 100 bytes
    with pytest.raises(ProtocolError, match="inflates to more than its 1028 bytes"):
        decompress(int8_payload(small_bomb), SPEC, method="int8")


def test_decode_refuses_a_deflate_stream_inflating_short_of_its_length() -> None:
    with pytest.raises(ProtocolError, match="inflates to 1000 bytes, not its 1028"):
        decompress(int8_payload(zlib.compress(bytes(1000))), SPEC, method="int8")


def test_decode_refuses_bytes_after_the_deflate_stream() -> None:
    stream = zlib.compress(np.zeros(SIZE, np.int8).tobytes()) + b"tail"
    with pytest.raises(ProtocolError, match="4 bytes after its zlib stream"):
        decompress(int8_payload(stream), SPEC, method="int8")


def test_decode_refuses_a_section_that_is_not_a_zlib_stream() -> None:
    with pytest.raises(ProtocolError, match="not a valid zlib stream"):
        decompress(int8_payload(b"\xff" * 100), SPEC, method="int8")


def test_decode_refuses_topk_positions_out_of_range() -> None:
    gaps = np.ones(11, dtype=np.int64)
    gaps[-1] = 1025 - 10 + 1  # the last position one past the sparse part's 1025 values
    with pytest.raises(ProtocolError, match="below 1025 .*1 are out of range"):
        decompress(topk_payload(gaps), SPEC, method="topk", topk_fraction=0.01)


def test_decode_refuses_repeated_topk_positions() -> None:
    gaps = np.ones(11, dtype=np.int64)
    gaps[5] = 0
    with pytest.raises(ProtocolError, match="or they repeat"):
        decompress(topk_payload(gaps), SPEC, method="topk", topk_fraction=0.01)


def test_decode_refuses_a_nan_int8_scale() -> None:
    bad = int8_payload(np.zeros(SIZE, np.int8).tobytes(), scales=(0.01, np.nan, 1.0))
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
    canonical = yaml.safe_load(demo_plan_path(private=False).read_text(encoding="utf-8"))
    return parse_plan(
        {
            **canonical,
            "name": "heart-disease-compressed",
            "secure_aggregation": {"enabled": False},
            "evaluation": {"every_rounds": 30},
            "compression": {"method": method},
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
    # 14 weights in 2 tensors, 56 bytes as float32; int8: 2 scales, the section's length and 14 codes (too
    # few for deflate to shorten) = 26 bytes, padded to 28; topk 1 %: k = 1, so the one-value bias is dense,
    # then one coordinate of the 13 weights: 2 float32 values, the section's length, a uint16 gap, padded to 16.
    for method, ratio in (("int8", 56 / 28), ("topk", 56 / 16)):
        ends = [e for e in heart_runs[method][1] if e["event"] == "round_end"]
        for plain, event in zip(plain_ends, ends, strict=True):
            assert event["compression"]["method"] == method
            assert set(event["compression"]["ratio"]) == set(event["nodes_ok"])
            assert all(r == pytest.approx(ratio, abs=0.01) for r in event["compression"]["ratio"].values())
            assert all(event["bytes"][n]["up"] < plain["bytes"][n]["up"] for n in event["nodes_ok"])
