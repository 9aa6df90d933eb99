"""The SecAgg+ engine in the 16-bit ring: exact sums under dropouts, masks that still hide, headroom."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.secagg import (
    PHASES,
    RoundContext,
    SecAggClient,
    SecAggServer,
    check_headroom,
    dequantize_sum,
    max_scale,
    quantization_error_bound,
    resolve_params,
    run_round,
)

LENGTH = 64
SCALE = 2.0**10  # 7 nodes * (1024 + 1) steps fit in 2**15 - 1; a power of two, so grid inputs quantize exactly
CLIP = 1.0


def _context(num_nodes: int, *, vector_length: int = LENGTH, scale: float = SCALE) -> RoundContext:
    params = resolve_params(num_nodes=num_nodes, vector_length=vector_length)
    session = hashlib.sha256(f"narrow-ring/{num_nodes}/{vector_length}".encode()).digest()
    return RoundContext(session=session, params=params, clip=CLIP, scale=scale, ring_bits=16)


def _grid_inputs(num_nodes: int, *, seed: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    steps = int(CLIP * SCALE)
    integers = {i: rng.integers(-steps, steps + 1, size=LENGTH) for i in range(1, num_nodes + 1)}
    return {i: v / SCALE for i, v in integers.items()}, integers


def _masked_inputs(context: RoundContext, inputs: dict[int, np.ndarray]) -> tuple[SecAggServer, dict[int, np.ndarray]]:
    clients = {i: SecAggClient(i, context) for i in sorted(inputs)}
    server = SecAggServer(context)
    rosters = server.receive_keys({i: c.advertise_keys() for i, c in clients.items()})
    boxes = server.receive_shares({i: c.share_keys(rosters[i]) for i, c in clients.items()})
    return server, {i: c.masked_input(inputs[i], boxes[i]).values for i, c in clients.items()}


@pytest.mark.parametrize("phase", [None, *PHASES])
@pytest.mark.parametrize("num_nodes", [3, 4, 7])
def test_secure_sum_in_the_16_bit_ring_is_exact_with_dropouts_down_to_threshold(num_nodes, phase):
    context = _context(num_nodes)
    threshold = context.params.threshold
    inputs, integers = _grid_inputs(num_nodes, seed=num_nodes)
    rng = np.random.default_rng(7)
    dropped = sorted(int(i) for i in rng.choice(np.arange(1, num_nodes + 1), size=num_nodes - threshold, replace=False))

    total, _ = run_round(context, inputs, drop_after={phase: dropped} if phase else {})

    everyone = set(range(1, num_nodes + 1))
    summed = everyone - set(dropped) if phase in ("advertise_keys", "share_keys") else everyone
    assert total.dtype == np.uint32 and int(total.max()) < 2**16
    expected = np.sum([integers[i] for i in sorted(summed)], axis=0)
    assert np.array_equal(total.astype(np.uint16).view(np.int16), expected)
    assert np.array_equal(dequantize_sum(total, scale=SCALE, ring_bits=16), expected / SCALE)


def test_sum_of_the_largest_inputs_the_16_bit_ring_allows_keeps_its_sign():
    num_nodes = 5
    scale = float(np.floor(max_scale(clip=CLIP, max_nodes=num_nodes, ring_bits=16)))
    context = _context(num_nodes, scale=scale)
    extremes = np.array([CLIP, -CLIP] * (LENGTH // 2))

    total, _ = run_round(context, {i: extremes for i in range(1, num_nodes + 1)})

    recovered = dequantize_sum(total, scale=scale, ring_bits=16)
    assert np.array_equal(np.sign(recovered), np.sign(extremes))
    assert np.abs(recovered - num_nodes * extremes).max() <= quantization_error_bound(scale=scale, num_summed=num_nodes)


def test_masked_input_in_the_16_bit_ring_is_uniform_over_its_16_bits():
    length = 1 << 14
    context = _context(3, vector_length=length)
    _, masked = _masked_inputs(context, {i: np.zeros(length) for i in (1, 2, 3)})

    words = masked[1]
    assert int(words.max()) < 2**16
    # 64 equal bins over [0, 2**16): the low 16 bits of the AES keystream are uniform, so zeros are hidden.
    counts = np.bincount(words >> 10, minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-6  # masks come from os.urandom: a false alarm once in 10**6 runs
    assert np.mean(words & 1) == pytest.approx(0.5, abs=0.03)


def test_server_in_the_16_bit_ring_refuses_a_word_above_16_bits():
    context = _context(3)
    server, masked = _masked_inputs(context, {i: np.zeros(LENGTH) for i in (1, 2, 3)})
    wide = masked[1].copy()
    wide[5] |= np.uint32(1 << 20)

    with pytest.raises(ProtocolError, match="16-bit ring") as caught:
        server.add_masked_input(1, wide)
    assert caught.value.node_id == "1"
    server.add_masked_input(1, masked[1])  # the refused input was not added; the genuine one still is


def test_headroom_of_the_16_bit_ring_refuses_a_scale_that_could_wrap():
    # 4 nodes: floor(32767 / 4) - 2 = 8189 steps per clip fit, 8191 could wrap.
    assert max_scale(clip=1.0, max_nodes=4, ring_bits=16) == 8189.0
    check_headroom(clip=1.0, scale=8189.0, max_nodes=4, ring_bits=16)
    with pytest.raises(ConfigError, match="wrap the 16-bit ring") as caught:
        check_headroom(clip=1.0, scale=8191.0, max_nodes=4, ring_bits=16)
    assert caught.value.field == "secagg.scale"
    with pytest.raises(ConfigError, match="wrap the 16-bit ring"):
        _context(4, scale=8191.0)


def test_round_context_refuses_a_ring_other_than_16_or_32_bits():
    params = resolve_params(num_nodes=3, vector_length=4)
    with pytest.raises(ConfigError) as caught:
        RoundContext(session=bytes(32), params=params, clip=1.0, scale=4.0, ring_bits=24)
    assert caught.value.field == "secagg.ring_bits"


def test_dequantize_sum_in_the_16_bit_ring_reads_only_the_low_16_bits_as_signed():
    total = np.array([0, 1, 2**16 - 1, 2**15, 2**15 - 1, (7 << 16) | 3], dtype=np.uint32)
    assert dequantize_sum(total, scale=1.0, ring_bits=16).tolist() == [0.0, 1.0, -1.0, -(2.0**15), 2.0**15 - 1, 3.0]
