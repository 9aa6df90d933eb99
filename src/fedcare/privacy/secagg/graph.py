"""The masking graph: which nodes share masks and secrets with which.

Both sides build the graph from the same public seed (in SecAgg+, a digest of
the round's key roster), so the server cannot hand different nodes different
graphs without them noticing a mismatch in the shares they receive.

The graph is a Harary graph laid on a pseudorandom ordering of the nodes: the
nodes are sorted by ``SHA-256(seed || index)``, placed on a ring, and each is
joined to the ``neighbours / 2`` nodes on either side. That graph is
``neighbours``-regular and ``neighbours``-connected (no small set of dropouts
cuts it apart), and the ordering only depends on hashlib, so every numpy
version and platform draws the same graph. With ``neighbours >= len(nodes) - 1``
it is the complete graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fedcare.errors import ConfigError

__all__ = ["neighbour_graph"]


def neighbour_graph(nodes: Iterable[int], *, neighbours: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each node's neighbours in a ``neighbours``-regular graph drawn from ``seed``.

    Parameters
    ----------
    nodes : iterable of int
        Distinct node indices (non-negative).
    neighbours : int
        The degree. At least ``len(nodes) - 1`` gives the complete graph;
        otherwise it must be even.
    seed : bytes
        Public seed both sides derive; the same seed gives the same graph.

    Returns
    -------
    dict of int to frozenset of int
        Symmetric: ``j in graph[i]`` exactly when ``i in graph[j]``; no node is its own neighbour.

    Raises
    ------
    ConfigError
        If node indices repeat or are negative, or ``neighbours`` is negative, or odd
        while below ``len(nodes) - 1``.

    Examples
    --------
    >>> g = neighbour_graph(range(1, 9), neighbours=4, seed=b"round-1")
    >>> sorted(len(v) for v in g.values())
    [4, 4, 4, 4, 4, 4, 4, 4]
    >>> all(i in g[j] for i in g for j in g[i])
    True
    >>> neighbour_graph([1, 2, 3], neighbours=4, seed=b"x")[1] == frozenset({2, 3})
    True
    """
    members = list(nodes)
    if len(set(members)) != len(members) or any(i < 0 for i in members):
        raise ConfigError("node indices must be distinct and non-negative", field="nodes")
    if neighbours < 0:
        raise ConfigError(f"must be >= 0, got {neighbours}", field="secagg.neighbours")
    everyone = frozenset(members)
    if neighbours >= len(members) - 1:
        return {i: everyone - {i} for i in members}
    if neighbours % 2:
        raise ConfigError(f"must be even for a sparse graph, got {neighbours}", field="secagg.neighbours")
    ring = sorted(members, key=lambda i: hashlib.sha256(seed + i.to_bytes(8, "big")).digest())
    size = len(ring)
    half = neighbours // 2
    return {
        node: frozenset(ring[(position + offset) % size] for offset in range(-half, half + 1) if offset)
        for position, node in enumerate(ring)
    }
