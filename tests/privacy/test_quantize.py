"""Clipping and stochastic quantization into Z_2^32: unbiased, bounded error, no wrapping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.secagg.quantize import (
    check_headroom,
    clip_values,
    dequantize_sum,
    max_scale,
    quantization_error_bound,
    quantize,
)

CHUNK = 1 << 18  # the module's chunk length; vectors longer than this cross a chunk boundary


def _modular_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0], dtype=np.uint32)
    for vector in vectors:
        np.add(total, vector, out=total)  # uint32 arithmetic wraps modulo 2**32, as SecAgg's sum does
    return total


# -- stochastic rounding -------------------------------------------------------------


@pytest.mark.parametrize("value", [0.123, -0.377, 0.5, 0.999, -0.001])
def test_stochastic_rounding_is_unbiased(value):
    scale = 10.0
    draws = 400_000
    q = quantize(np.full(draws, value), clip=1.0, scale=scale, rng=np.random.default_rng(0))
    steps = q.values.view(np.int32)
    mean = steps.mean(dtype=np.float64) / scale
    fraction = value * scale - math.floor(value * scale)
    standard_error = math.sqrt(fraction * (1 - fraction) / draws) / scale
    assert abs(mean - value) < 6 * standard_error + 1e-12


@pytest.mark.parametrize("value", [0.123, -0.377])
def test_stochastic_rounding_picks_one_of_the_two_neighbouring_steps(value):
    scale = 10.0
    q = quantize(np.full(10_000, value), clip=1.0, scale=scale, rng=np.random.default_rng(1))
    low = math.floor(value * scale)
    assert set(np.unique(q.values.view(np.int32)).tolist()) == {low, low + 1}


def test_values_on_the_grid_are_quantized_exactly():
    values = np.array([-1.0, -0.25, 0.0, 0.5, 1.0])
    q = quantize(values, clip=1.0, scale=4.0, rng=np.random.default_rng(2))
    assert q.values.view(np.int32).tolist() == [-4, -1, 0, 2, 4]


def test_quantize_is_reproducible_with_the_same_generator():
    values = np.random.default_rng(3).standard_normal(1000)
    first = quantize(values, clip=2.0, scale=1000.0, rng=np.random.default_rng(4))
    second = quantize(values, clip=2.0, scale=1000.0, rng=np.random.default_rng(4))
    assert np.array_equal(first.values, second.values)


def test_quantize_accepts_float32_and_leaves_the_input_unchanged():
    values = np.random.default_rng(5).uniform(-3, 3, size=CHUNK + 17).astype(np.float32)
    before = values.copy()
    q = quantize(values, clip=1.0, scale=100.0, rng=np.random.default_rng(6))
    assert q.values.dtype == np.uint32 and q.values.shape == values.shape
    assert np.array_equal(values, before)


# -- error of the dequantized sum ----------------------------------------------------


@pytest.mark.parametrize(("num_nodes", "scale"), [(10, 1000.0), (3, 7.5), (25, 2**16)])
def test_dequantized_sum_is_within_the_error_bound_of_the_float_sum(num_nodes, scale):
    clip = 1.0
    rng = np.random.default_rng(7)
    vectors = [rng.uniform(-2.0, 2.0, size=CHUNK + 1000) for _ in range(num_nodes)]
    quantized = [quantize(v, clip=clip, scale=scale, rng=rng).values for v in vectors]
    exact = np.sum([np.clip(v, -clip, clip) for v in vectors], axis=0)
    recovered = dequantize_sum(_modular_sum(quantized), scale=scale)
    error = np.abs(recovered - exact).max()
    assert error < quantization_error_bound(scale=scale, num_summed=num_nodes)


def test_error_bound_is_linear_in_nodes_and_inverse_in_scale():
    assert quantization_error_bound(scale=1000.0, num_summed=10) == pytest.approx(0.01)
    assert quantization_error_bound(scale=2000.0, num_summed=10) == pytest.approx(0.005)
    assert quantization_error_bound(scale=1000.0, num_summed=20) == pytest.approx(0.02)


def test_dequantize_sum_reads_the_total_as_signed():
    total = np.array([0, 1, 2**32 - 1, 2**31 - 1, 2**31], dtype=np.uint32)
    assert dequantize_sum(total, scale=2.0).tolist() == [0.0, 0.5, -0.5, (2**31 - 1) / 2, -(2**31) / 2]


def test_dequantize_sum_refuses_a_total_that_is_not_uint32():
    with pytest.raises(ProtocolError) as error:
        dequantize_sum(np.zeros(3, dtype=np.int64), scale=1.0)
    assert error.value.field == "total"


# -- clipping ------------------------------------------------------------------------


def test_clip_values_counts_only_coordinates_strictly_outside_the_bound():
    values = np.array([-3.0, 0.5, 2.0, 1.0, -1.0, 1.0000001, -0.9999])
    out = np.empty_like(values)
    assert clip_values(values, clip=1.0, out=out) == 3
    assert out.tolist() == [-1.0, 0.5, 1.0, 1.0, -1.0, 1.0, -0.9999]


def test_quantize_counts_clipped_coordinates_across_chunks():
    values = np.zeros(2 * CHUNK + 5)
    outside = [0, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 4]
    values[outside] = [5.0, -5.0, 1.5, -1e9, 2.0]
    values[[10, CHUNK + 10]] = [1.0, -1.0]  # on the bound: not clipped
    q = quantize(values, clip=1.0, scale=10.0, rng=np.random.default_rng(8))
    assert q.num_clipped == len(outside)
    assert q.values.view(np.int32)[outside].tolist() == [10, -10, 10, -10, 10]


def test_quantize_with_nothing_outside_the_bound_counts_zero():
    values = np.random.default_rng(9).uniform(-1.0, 1.0, size=1000)
    assert quantize(values, clip=1.0, scale=10.0, rng=np.random.default_rng(9)).num_clipped == 0


# -- headroom: the modular sum must never wrap ---------------------------------------


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 10, 100, 1000])
@pytest.mark.parametrize("clip", [1.0, 0.1, 7.5])
def test_worst_case_sum_at_max_scale_does_not_wrap(num_nodes, clip):
    scale = max_scale(clip=clip, max_nodes=num_nodes)
    rng = np.random.default_rng(10)
    for extreme in (clip, -clip, 10 * clip, -10 * clip):  # beyond the bound too: clipped to it
        # Every node sends the same extreme vector; 64 coordinates so that rounding up happens.
        one = quantize(np.full(64, extreme), clip=clip, scale=scale, rng=rng).values
        exact = np.int64(num_nodes) * one.view(np.int32).astype(np.int64)
        total = np.zeros(64, dtype=np.uint32)
        for _ in range(num_nodes):
            np.add(total, one, out=total)
        assert np.abs(exact).max() <= 2**31 - 1
        assert np.array_equal(total.view(np.int32).astype(np.int64), exact)
        assert np.sign(dequantize_sum(total, scale=scale)).tolist() == [math.copysign(1.0, extreme)] * 64


@pytest.mark.parametrize("num_nodes", [2, 3, 10, 100])
def test_worst_case_sum_of_different_quantizations_at_max_scale_reads_back_exactly(num_nodes):
    clip = 1.0
    scale = max_scale(clip=clip, max_nodes=num_nodes)
    rng = np.random.default_rng(11)
    vectors = [quantize(np.full(256, clip), clip=clip, scale=scale, rng=rng).values for _ in range(num_nodes)]
    exact = np.sum([v.view(np.int32).astype(np.int64) for v in vectors], axis=0)
    assert np.array_equal(_modular_sum(vectors).view(np.int32).astype(np.int64), exact)
    recovered = dequantize_sum(_modular_sum(vectors), scale=scale)
    assert np.allclose(recovered, num_nodes * clip, rtol=0, atol=num_nodes / scale)


def test_max_scale_fills_the_signed_32_bit_range():
    assert max_scale(clip=1.0, max_nodes=100) == pytest.approx((2**31 - 1) / 100 - 1)
    assert max_scale(clip=2.0, max_nodes=100) == pytest.approx(((2**31 - 1) / 100 - 1) / 2)


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 10, 100])
@pytest.mark.parametrize("clip", [1.0, 0.1])
def test_headroom_check_accepts_max_scale(num_nodes, clip):
    check_headroom(clip=clip, scale=max_scale(clip=clip, max_nodes=num_nodes), max_nodes=num_nodes)


@pytest.mark.parametrize("num_nodes", [1, 2, 10, 100])
def test_headroom_check_refuses_a_scale_that_could_wrap(num_nodes):
    clip = 1.0
    scale = 1.01 * (2**31 - 1) / num_nodes / clip  # num_nodes * clip * scale alone is past 2**31 - 1
    with pytest.raises(ConfigError, match="wrap") as error:
        check_headroom(clip=clip, scale=scale, max_nodes=num_nodes)
    assert error.value.field == "secagg.scale"


def test_headroom_check_names_a_scale_that_would_fit():
    with pytest.raises(ConfigError, match=r"use a scale of at most 2\.1474\de\+07"):
        check_headroom(clip=1.0, scale=1e8, max_nodes=100)


def test_quantize_refuses_a_scale_that_overflows_one_int32():
    with pytest.raises(ConfigError) as error:
        quantize(np.zeros(3), clip=1.0, scale=2.0**32, rng=np.random.default_rng(0))
    assert error.value.field == "secagg.scale"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip": 0.0, "scale": 1.0, "max_nodes": 1}, "secagg.clip"),
        ({"clip": -1.0, "scale": 1.0, "max_nodes": 1}, "secagg.clip"),
        ({"clip": math.inf, "scale": 1.0, "max_nodes": 1}, "secagg.clip"),
        ({"clip": 1.0, "scale": 0.0, "max_nodes": 1}, "secagg.scale"),
        ({"clip": 1.0, "scale": math.nan, "max_nodes": 1}, "secagg.scale"),
        ({"clip": 1.0, "scale": 1.0, "max_nodes": 0}, "secagg.max_nodes"),
    ],
)
def test_headroom_check_refuses_invalid_arguments_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as error:
        check_headroom(**kwargs)
    assert error.value.field == field


def test_max_scale_refuses_more_nodes_than_the_ring_can_hold():
    with pytest.raises(ConfigError) as error:
        max_scale(clip=1.0, max_nodes=2**31)
    assert error.value.field == "secagg.max_nodes"


# -- non-finite and malformed input --------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_quantize_refuses_non_finite_values(bad):
    values = np.zeros(CHUNK + 3)
    values[CHUNK + 1] = bad  # in the second chunk: refused, not silently quantized
    with pytest.raises(ProtocolError, match="NaN or infinite") as error:
        quantize(values, clip=1.0, scale=10.0, rng=np.random.default_rng(0))
    assert error.value.field == "update"


def test_clip_values_refuses_nan_and_counts_them_in_the_message():
    values = np.array([0.0, math.nan, math.nan, math.inf])
    with pytest.raises(ProtocolError, match="^update: 3 coordinates"):
        clip_values(values, clip=1.0, out=np.empty(4))


def test_quantize_refuses_a_matrix():
    with pytest.raises(ProtocolError, match="1-D") as error:
        quantize(np.zeros((2, 3)), clip=1.0, scale=10.0, rng=np.random.default_rng(0))
    assert error.value.field == "update"
