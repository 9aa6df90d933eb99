"""The masking graph: regular, symmetric, loop-free, k-connected, a function of the seed alone."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError
from fedcare.privacy.secagg.graph import neighbour_graph

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def sparse_graphs(draw: st.DrawFn) -> tuple[list[int], int, bytes]:
    """Distinct node indices, an even degree below len(nodes) - 1, and a seed."""
    size = draw(st.integers(min_value=4, max_value=80))
    nodes = draw(st.lists(st.integers(min_value=0, max_value=10_000), min_size=size, max_size=size, unique=True))
    neighbours = 2 * draw(st.integers(min_value=1, max_value=(size - 2) // 2))
    seed = draw(st.binary(min_size=0, max_size=40))
    return nodes, neighbours, seed


def _connected(graph: dict[int, frozenset[int]], removed: set[int]) -> bool:
    alive = [i for i in graph if i not in removed]
    if not alive:
        return True
    seen = {alive[0]}
    frontier = [alive[0]]
    while frontier:
        node = frontier.pop()
        for other in graph[node]:
            if other not in removed and other not in seen:
                seen.add(other)
                frontier.append(other)
    return len(seen) == len(alive)


# -- shape of the graph --------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=sparse_graphs())
def test_sparse_graph_is_regular_with_the_requested_degree(case):
    nodes, neighbours, seed = case
    graph = neighbour_graph(nodes, neighbours=neighbours, seed=seed)
    assert set(graph) == set(nodes)
    assert {len(adjacent) for adjacent in graph.values()} == {neighbours}


@PROPERTY_SETTINGS
@given(case=sparse_graphs())
def test_graph_is_symmetric(case):
    nodes, neighbours, seed = case
    graph = neighbour_graph(nodes, neighbours=neighbours, seed=seed)
    assert all(i in graph[j] for i in graph for j in graph[i])


@PROPERTY_SETTINGS
@given(case=sparse_graphs())
def test_no_node_is_its_own_neighbour_and_neighbours_are_members(case):
    nodes, neighbours, seed = case
    graph = neighbour_graph(nodes, neighbours=neighbours, seed=seed)
    members = set(nodes)
    assert all(i not in adjacent and adjacent <= members for i, adjacent in graph.items())


@PROPERTY_SETTINGS
@given(case=sparse_graphs(), data=st.data())
def test_graph_stays_connected_after_fewer_than_degree_dropouts(case, data):
    nodes, neighbours, seed = case
    graph = neighbour_graph(nodes, neighbours=neighbours, seed=seed)
    dropped = data.draw(st.sets(st.sampled_from(nodes), max_size=neighbours - 1))
    assert _connected(graph, dropped)


@PROPERTY_SETTINGS
@given(case=sparse_graphs(), data=st.data())
def test_graph_does_not_depend_on_the_order_nodes_are_listed_in(case, data):
    nodes, neighbours, seed = case
    shuffled = data.draw(st.permutations(nodes))
    assert neighbour_graph(shuffled, neighbours=neighbours, seed=seed) == neighbour_graph(
        nodes, neighbours=neighbours, seed=seed
    )


def test_harary_ring_of_eight_nodes_and_degree_four_has_sixteen_edges():
    graph = neighbour_graph(range(1, 9), neighbours=4, seed=b"round-1")
    edges = {frozenset((i, j)) for i in graph for j in graph[i]}
    assert len(edges) == 8 * 4 // 2


# -- seeds ---------------------------------------------------------------------------


def test_same_seed_gives_the_same_graph():
    first = neighbour_graph(range(1, 101), neighbours=40, seed=b"roster-digest")
    second = neighbour_graph(list(range(1, 101)), neighbours=40, seed=b"roster-digest")
    assert first == second


def test_different_seeds_give_different_graphs():
    graphs = [neighbour_graph(range(1, 101), neighbours=40, seed=bytes([i]) * 32) for i in range(5)]
    assert all(graphs[i] != graphs[j] for i in range(5) for j in range(i + 1, 5))


def test_graph_for_a_fixed_seed_matches_the_recorded_ring():
    # Pins the hashlib-based ordering, so that nodes on old and new versions agree. The ring
    # is the nodes sorted by SHA-256(b"pin" || index as 8 big-endian bytes).
    ring = [1, 4, 5, 7, 3, 8, 2, 6]
    assert ring == sorted(range(1, 9), key=lambda i: hashlib.sha256(b"pin" + i.to_bytes(8, "big")).digest())
    graph = neighbour_graph(range(1, 9), neighbours=2, seed=b"pin")
    assert graph == {
        1: frozenset({4, 6}), 2: frozenset({6, 8}), 3: frozenset({7, 8}), 4: frozenset({1, 5}),
        5: frozenset({4, 7}), 6: frozenset({1, 2}), 7: frozenset({3, 5}), 8: frozenset({2, 3}),
    }


def test_sparse_neighbours_are_not_simply_the_nearest_indices():
    graph = neighbour_graph(range(1, 101), neighbours=4, seed=b"s")
    index_neighbours = sum(graph[i] == frozenset({i - 2, i - 1, i + 1, i + 2}) for i in range(3, 99))
    assert index_neighbours < 5


# -- complete graph ------------------------------------------------------------------


@pytest.mark.parametrize(("size", "neighbours"), [(3, 2), (3, 5), (4, 3), (10, 9), (10, 100), (2, 1)])
def test_degree_of_at_least_nodes_minus_one_gives_the_complete_graph(size, neighbours):
    nodes = list(range(1, size + 1))
    graph = neighbour_graph(nodes, neighbours=neighbours, seed=b"any")
    assert graph == {i: frozenset(nodes) - {i} for i in nodes}


def test_complete_graph_does_not_depend_on_the_seed():
    assert neighbour_graph(range(10), neighbours=9, seed=b"a") == neighbour_graph(range(10), neighbours=9, seed=b"b")


def test_single_node_and_empty_graph():
    assert neighbour_graph([7], neighbours=0, seed=b"") == {7: frozenset()}
    assert neighbour_graph([], neighbours=0, seed=b"") == {}


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [[1, 2, 2, 3], [-1, 0, 1, 2]])
def test_graph_refuses_repeated_or_negative_nodes(nodes):
    with pytest.raises(ConfigError) as error:
        neighbour_graph(nodes, neighbours=2, seed=b"s")
    assert error.value.field == "nodes"


def test_graph_refuses_negative_degree():
    with pytest.raises(ConfigError, match="got -2") as error:
        neighbour_graph(range(10), neighbours=-2, seed=b"s")
    assert error.value.field == "secagg.neighbours"


@pytest.mark.parametrize("neighbours", [1, 3, 7])
def test_graph_refuses_odd_degree_below_nodes_minus_one(neighbours):
    with pytest.raises(ConfigError, match=f"even.*got {neighbours}") as error:
        neighbour_graph(range(10), neighbours=neighbours, seed=b"s")
    assert error.value.field == "secagg.neighbours"


def test_graph_accepts_a_generator_of_nodes():
    graph = neighbour_graph((i for i in range(1, 7)), neighbours=2, seed=b"s")
    assert sorted(graph) == [1, 2, 3, 4, 5, 6]
    assert all(len(adjacent) == 2 for adjacent in graph.values())
