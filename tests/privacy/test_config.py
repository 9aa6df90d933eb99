"""SecAgg+ round parameters: defaults, and refusals that name the field at fault."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError
from fedcare.privacy.secagg.config import (
    SecAggParams,
    default_neighbours,
    default_threshold,
    resolve_params,
    validate_params,
)

# -- defaults ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_nodes", "neighbours"),
    [(3, 2), (4, 3), (10, 9), (20, 19), (30, 29), (32, 30), (50, 34), (100, 40), (1000, 60)],
)
def test_default_neighbours_is_complete_for_small_federations_and_logarithmic_beyond(num_nodes, neighbours):
    assert default_neighbours(num_nodes) == neighbours


@pytest.mark.parametrize("num_nodes", [0, 1])
def test_default_neighbours_of_fewer_than_two_nodes_is_zero(num_nodes):
    assert default_neighbours(num_nodes) == 0


@pytest.mark.parametrize(("neighbours", "threshold"), [(1, 2), (2, 2), (3, 3), (9, 7), (29, 20), (40, 28), (60, 41)])
def test_default_threshold_is_two_thirds_of_the_neighbourhood_and_at_least_two(neighbours, threshold):
    assert default_threshold(neighbours) == threshold


@settings(max_examples=200, deadline=None)
@given(num_nodes=st.integers(min_value=3, max_value=100_000))
def test_default_parameters_are_always_valid(num_nodes):
    params = resolve_params(num_nodes=num_nodes, vector_length=1)
    assert params.num_nodes == num_nodes
    assert 2 * params.threshold > params.neighbours + 1
    assert params.threshold <= params.neighbours + 1
    assert params.complete_graph or params.neighbours % 2 == 0


@pytest.mark.parametrize(
    ("num_nodes", "expected"),
    [
        (3, SecAggParams(num_nodes=3, neighbours=2, threshold=2, vector_length=5)),
        (10, SecAggParams(num_nodes=10, neighbours=9, threshold=7, vector_length=5)),
        (100, SecAggParams(num_nodes=100, neighbours=40, threshold=28, vector_length=5)),
    ],
)
def test_resolve_params_fills_in_default_neighbours_and_threshold(num_nodes, expected):
    assert resolve_params(num_nodes=num_nodes, vector_length=5) == expected


def test_resolve_params_keeps_explicit_neighbours_and_threshold():
    params = resolve_params(num_nodes=100, vector_length=5, neighbours=20, threshold=15)
    assert (params.neighbours, params.threshold) == (20, 15)


def test_resolve_params_derives_the_threshold_from_explicit_neighbours():
    assert resolve_params(num_nodes=100, vector_length=5, neighbours=20).threshold == default_threshold(20)


def test_complete_graph_flag_follows_the_neighbour_count():
    assert resolve_params(num_nodes=10, vector_length=1).complete_graph
    assert not resolve_params(num_nodes=100, vector_length=1).complete_graph


def test_validate_params_returns_its_argument():
    params = SecAggParams(num_nodes=5, neighbours=4, threshold=3, vector_length=10)
    assert validate_params(params) is params


# -- refusals ------------------------------------------------------------------------


def _refusal(**kwargs: int) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        resolve_params(**kwargs)
    return error.value


@pytest.mark.parametrize("num_nodes", [-1, 0, 1, 2])
def test_fewer_than_three_nodes_is_refused(num_nodes):
    error = _refusal(num_nodes=num_nodes, vector_length=1, neighbours=2, threshold=2)
    assert error.field == "secagg.num_nodes"
    assert f"got {num_nodes}" in str(error)


@pytest.mark.parametrize(("num_nodes", "neighbours", "threshold"), [(6, 5, 3), (10, 9, 5), (100, 40, 20), (100, 40, 1)])
def test_threshold_at_or_below_half_the_holders_is_refused(num_nodes, neighbours, threshold):
    error = _refusal(num_nodes=num_nodes, vector_length=1, neighbours=neighbours, threshold=threshold)
    assert error.field == "secagg.threshold"
    assert "two disjoint groups" in str(error) and f"got {threshold}" in str(error)


@pytest.mark.parametrize(("num_nodes", "neighbours", "threshold"), [(6, 5, 4), (10, 9, 6), (100, 40, 21)])
def test_smallest_threshold_above_half_the_holders_is_accepted(num_nodes, neighbours, threshold):
    params = resolve_params(num_nodes=num_nodes, vector_length=1, neighbours=neighbours, threshold=threshold)
    assert params.threshold == threshold


@pytest.mark.parametrize(("num_nodes", "neighbours", "threshold"), [(5, 4, 6), (10, 9, 11), (100, 40, 42)])
def test_threshold_above_the_number_of_holders_is_refused(num_nodes, neighbours, threshold):
    error = _refusal(num_nodes=num_nodes, vector_length=1, neighbours=neighbours, threshold=threshold)
    assert error.field == "secagg.threshold"
    assert f"neighbours + 1 = {neighbours + 1}" in str(error)


def test_threshold_equal_to_the_number_of_holders_is_accepted():
    assert resolve_params(num_nodes=5, vector_length=1, neighbours=4, threshold=5).threshold == 5


@pytest.mark.parametrize("neighbours", [3, 5, 41])
def test_odd_neighbour_count_in_a_sparse_graph_is_refused(neighbours):
    error = _refusal(num_nodes=100, vector_length=1, neighbours=neighbours)
    assert error.field == "secagg.neighbours"
    assert "even" in str(error) and f"got {neighbours}" in str(error)


def test_odd_neighbour_count_in_a_complete_graph_is_accepted():
    assert resolve_params(num_nodes=10, vector_length=1, neighbours=9).complete_graph


@pytest.mark.parametrize("neighbours", [0, 1, 10, 11])
def test_neighbour_count_outside_two_to_nodes_minus_one_is_refused(neighbours):
    error = _refusal(num_nodes=10, vector_length=1, neighbours=neighbours, threshold=2)
    assert error.field == "secagg.neighbours"
    assert "num_nodes - 1 = 9" in str(error)


@pytest.mark.parametrize("vector_length", [0, -5])
def test_vector_length_below_one_is_refused(vector_length):
    error = _refusal(num_nodes=10, vector_length=vector_length)
    assert error.field == "secagg.vector_length"


def test_refusals_are_value_errors_with_the_field_first_in_the_message():
    with pytest.raises(ValueError, match=r"^secagg\.threshold: "):
        validate_params(SecAggParams(num_nodes=6, neighbours=5, threshold=3, vector_length=10))
