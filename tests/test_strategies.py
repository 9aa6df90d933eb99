"""FedAvg folds updates as they arrive; the fold kernel matches numpy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedcare.errors import FederationError, ProtocolError
from fedcare.params import Parameters, ParameterSpec
from fedcare.strategies import kernels
from fedcare.strategies.fedavg import FedAvg
from fedcare.strategies.kernels import weighted_fold

SPEC: ParameterSpec = (("dense.weight", (6, 5)), ("dense.bias", (5,)), ("head.weight", (5, 1)))
SIZE = 30 + 5 + 5


def _params(vector: np.ndarray, spec: ParameterSpec = SPEC) -> Parameters:
    return Parameters.from_flat(np.ascontiguousarray(vector, dtype=np.float32), spec)


def _updates(count: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    vectors = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(count)]
    weights = [float(w) for w in rng.integers(1, 500, count)]
    return vectors, weights


def _fedavg(
    global_vector: np.ndarray,
    vectors: list[np.ndarray],
    weights: list[float],
    *,
    server_learning_rate: float = 1.0,
) -> np.ndarray:
    strategy = FedAvg(server_learning_rate=server_learning_rate)
    strategy.begin_round(1, _params(global_vector))
    for index, (vector, weight) in enumerate(zip(vectors, weights, strict=True)):
        strategy.accumulate(_params(vector), weight=weight, node_id=f"site-{index}")
    return strategy.finalize().flatten()


# --- FedAvg result --------------------------------------------------------------------


def test_fedavg_adds_the_example_weighted_mean_update_to_the_global_model() -> None:
    global_vector = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)
    vectors, weights = _updates(7, seed=2)
    expected = global_vector + np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)

    result = _fedavg(global_vector, vectors, weights)

    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


def test_fedavg_scales_the_mean_update_by_the_server_learning_rate() -> None:
    global_vector = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)
    vectors, weights = _updates(4, seed=3)
    mean_update = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)

    result = _fedavg(global_vector, vectors, weights, server_learning_rate=0.3)

    np.testing.assert_allclose(result, global_vector + 0.3 * mean_update, rtol=1e-6, atol=1e-6)


def test_fedavg_of_one_update_applies_it_whatever_its_weight() -> None:
    vectors, _ = _updates(1, seed=4)

    result = _fedavg(np.zeros(SIZE, np.float32), vectors, [12345.0])

    np.testing.assert_allclose(result, vectors[0], rtol=1e-7)


def test_fedavg_result_keeps_the_model_spec() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    strategy.accumulate(_params(np.ones(SIZE)), weight=2, node_id="a")

    assert strategy.finalize().spec == SPEC


def test_fedavg_result_is_float32() -> None:
    result = _fedavg(np.zeros(SIZE, np.float32), *_updates(3, seed=5))

    assert result.dtype == np.float32


def test_fedavg_result_does_not_depend_on_arrival_order() -> None:
    global_vector = np.random.default_rng(6).standard_normal(SIZE).astype(np.float32)
    vectors, weights = _updates(25, seed=7)
    order = np.random.default_rng(8).permutation(25)

    forward = _fedavg(global_vector, vectors, weights)
    shuffled = _fedavg(global_vector, [vectors[i] for i in order], [weights[i] for i in order])

    np.testing.assert_allclose(shuffled, forward, rtol=0, atol=1e-7)


def test_fedavg_does_not_change_the_global_parameters() -> None:
    global_vector = np.random.default_rng(9).standard_normal(SIZE).astype(np.float32)
    before = global_vector.copy()

    _fedavg(global_vector, *_updates(3, seed=10))

    np.testing.assert_array_equal(global_vector, before)


def test_fedavg_does_not_change_the_updates() -> None:
    vectors, weights = _updates(3, seed=11)
    before = [v.copy() for v in vectors]

    _fedavg(np.zeros(SIZE, np.float32), vectors, weights)

    for vector, original in zip(vectors, before, strict=True):
        np.testing.assert_array_equal(vector, original)


def test_fedavg_accepts_frozen_global_parameters_and_updates() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)).freeze())
    strategy.accumulate(_params(np.full(SIZE, 2.0)).freeze(), weight=1, node_id="a")

    np.testing.assert_array_equal(strategy.finalize().flatten(), np.full(SIZE, 2.0, np.float32))


def test_fedavg_accepts_updates_built_from_named_arrays() -> None:
    rng = np.random.default_rng(12)
    update = Parameters({name: rng.standard_normal(shape) for name, shape in SPEC})
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    strategy.accumulate(update, weight=3, node_id="a")

    np.testing.assert_allclose(strategy.finalize().flatten(), update.flatten(), rtol=1e-7)


def test_fedavg_starts_each_round_from_an_empty_accumulator() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    strategy.accumulate(_params(np.full(SIZE, 5.0)), weight=1, node_id="a")
    strategy.finalize()
    strategy.begin_round(2, _params(np.zeros(SIZE)))
    strategy.accumulate(_params(np.full(SIZE, 1.0)), weight=1, node_id="a")

    np.testing.assert_array_equal(strategy.finalize().flatten(), np.ones(SIZE, np.float32))


# --- memory ---------------------------------------------------------------------------


def test_fedavg_memory_stays_o_model_while_folding_twenty_updates() -> None:
    spec: ParameterSpec = (("w", (1000, 1000)),)
    model_float64_bytes = 1_000_000 * 8
    rng = np.random.default_rng(13)
    global_parameters = Parameters.from_flat(np.zeros(1_000_000, np.float32), spec)
    strategy = FedAvg()
    strategy.begin_round(1, global_parameters)

    tracemalloc.start()
    try:
        for index in range(20):
            # Each update is made inside the traced region: were the strategy to keep
            # any per-update state, the peak would grow with every one of them.
            update = Parameters.from_flat(rng.standard_normal(1_000_000, dtype=np.float32), spec)
            strategy.accumulate(update, weight=index + 1, node_id=f"site-{index}")
            del update
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # One float32 update in flight (0.5x) plus chunked scratch: far below one float64 model per site.
    assert peak < 3 * model_float64_bytes


def test_fedavg_allocates_one_accumulator_per_round() -> None:
    spec: ParameterSpec = (("w", (1000, 1000)),)
    global_parameters = Parameters.from_flat(np.zeros(1_000_000, np.float32), spec)
    update = Parameters.from_flat(np.ones(1_000_000, np.float32), spec)
    strategy = FedAvg()

    tracemalloc.start()
    try:
        strategy.begin_round(1, global_parameters)
        for index in range(20):
            strategy.accumulate(update, weight=1, node_id=f"site-{index}")
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # What is still held after 20 folds: the float64 accumulator, and little else.
    assert retained < 1.5 * 1_000_000 * 8


# --- FedAvg refusals ------------------------------------------------------------------


def test_fedavg_refuses_an_update_with_another_spec() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    other_spec: ParameterSpec = (("dense.weight", (5, 6)), ("dense.bias", (5,)), ("head.weight", (5, 1)))

    with pytest.raises(ProtocolError):
        strategy.accumulate(_params(np.ones(SIZE), other_spec), weight=1, node_id="a")


def test_fedavg_refuses_an_update_with_renamed_tensors() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    renamed: ParameterSpec = (("dense.w", (6, 5)), ("dense.bias", (5,)), ("head.weight", (5, 1)))

    with pytest.raises(ProtocolError):
        strategy.accumulate(_params(np.ones(SIZE), renamed), weight=1, node_id="a")


def test_fedavg_spec_error_names_the_node() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))

    with pytest.raises(ProtocolError) as caught:
        strategy.accumulate(Parameters({"w": np.ones(3)}), weight=1, node_id="hungary")

    assert caught.value.node_id == "hungary"


@pytest.mark.parametrize("weight", [0.0, -3.0, float("nan")])
def test_fedavg_refuses_a_non_positive_weight(weight: float) -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))

    with pytest.raises(ProtocolError, match="weight"):
        strategy.accumulate(_params(np.ones(SIZE)), weight=weight, node_id="a")


def test_fedavg_refused_update_leaves_the_round_unchanged() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    strategy.accumulate(_params(np.full(SIZE, 4.0)), weight=1, node_id="a")
    with pytest.raises(ProtocolError):
        strategy.accumulate(_params(np.full(SIZE, 100.0)), weight=0, node_id="b")

    np.testing.assert_array_equal(strategy.finalize().flatten(), np.full(SIZE, 4.0, np.float32))


def test_fedavg_finalize_before_begin_round_is_a_federation_error() -> None:
    with pytest.raises(FederationError):
        FedAvg().finalize()


def test_fedavg_accumulate_before_begin_round_is_a_federation_error() -> None:
    with pytest.raises(FederationError):
        FedAvg().accumulate(_params(np.ones(SIZE)), weight=1, node_id="a")


def test_fedavg_finalize_without_updates_is_a_federation_error() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))

    with pytest.raises(FederationError, match="no update"):
        strategy.finalize()


def test_fedavg_finalize_twice_is_a_federation_error() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, _params(np.zeros(SIZE)))
    strategy.accumulate(_params(np.ones(SIZE)), weight=1, node_id="a")
    strategy.finalize()

    with pytest.raises(FederationError):
        strategy.finalize()


def test_fedavg_streams_rather_than_collecting_all_updates() -> None:
    assert FedAvg.needs_all_updates is False


# --- weighted_fold --------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [1, 7, kernels._CHUNK - 1, kernels._CHUNK + 1, 2 * kernels._CHUNK + 12345],
)
def test_weighted_fold_matches_numpy(size: int) -> None:
    rng = np.random.default_rng(size)
    accumulator = rng.standard_normal(size)
    update = rng.standard_normal(size).astype(np.float32)
    expected = accumulator + 2.75 * update.astype(np.float64)

    weighted_fold(accumulator, update, 2.75)

    np.testing.assert_allclose(accumulator, expected, rtol=1e-15, atol=1e-15)


def test_weighted_fold_of_an_empty_vector_does_nothing() -> None:
    accumulator = np.zeros(0)

    weighted_fold(accumulator, np.zeros(0, np.float32), 3.0)

    assert accumulator.shape == (0,)


def test_weighted_fold_does_not_change_the_update() -> None:
    update = np.random.default_rng(14).standard_normal(kernels._CHUNK + 3).astype(np.float32)
    before = update.copy()

    weighted_fold(np.zeros(update.size), update, 0.5)

    np.testing.assert_array_equal(update, before)


def test_weighted_fold_accumulates_in_float64() -> None:
    accumulator = np.zeros(1)

    weighted_fold(accumulator, np.array([0.1], dtype=np.float32), 1e8)

    assert accumulator[0] == np.float64(np.float32(0.1)) * 1e8


def test_weighted_fold_refuses_an_update_of_another_length() -> None:
    with pytest.raises(ValueError, match="shape"):
        weighted_fold(np.zeros(10), np.zeros(11, np.float32), 1.0)
