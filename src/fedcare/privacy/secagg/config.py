"""The parameters of a SecAgg+ round: how many nodes, how many neighbours, what threshold.

Every node's two secrets (its self-mask seed and its masking private key) are
Shamir-shared among its ``neighbours`` neighbours and itself, ``neighbours + 1``
holders in all, with threshold ``threshold``:

* The server can unmask a node only with ``threshold`` shares, so up to
  ``neighbours + 1 - threshold`` of the holders may drop out.
* Holders reveal one of the two secrets of a node, never both. Two disjoint
  groups of holders, each with ``threshold`` shares, could still hand the server
  the seed of a node and its key; ``2 * threshold > neighbours + 1`` rules that
  out, and :func:`validate_params` refuses anything lower.

With ``neighbours = num_nodes - 1`` the graph is complete, which is the original
SecAgg (Bonawitz et al., 2017); the condition is then ``threshold > num_nodes / 2``.
With fewer neighbours it is SecAgg+ (Bell et al., 2020): a node's cost grows
with ``neighbours`` rather than ``num_nodes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcare.errors import ConfigError

__all__ = ["SecAggParams", "default_neighbours", "default_threshold", "resolve_params", "validate_params"]


@dataclass(frozen=True)
class SecAggParams:
    """The validated parameters of a round; build them with :func:`resolve_params`.

    Attributes
    ----------
    num_nodes : int
        Nodes invited to the round; their indices are ``1 .. num_nodes``.
    neighbours : int
        Neighbours per node in the masking graph (``num_nodes - 1``: complete graph).
    threshold : int
        Shares needed to rebuild a node's secret, out of ``neighbours + 1``;
        also the fewest nodes that may be left at any phase.
    vector_length : int
        Length of the ``uint32`` vectors summed.
    """

    num_nodes: int
    neighbours: int
    threshold: int
    vector_length: int

    @property
    def complete_graph(self) -> bool:
        """Whether every node neighbours every other (plain SecAgg)."""
        return self.neighbours >= self.num_nodes - 1


def default_neighbours(num_nodes: int) -> int:
    """A neighbour count for ``num_nodes`` nodes: the complete graph up to about 30 nodes.

    Beyond that, ``2 * ceil(3 * log2(num_nodes))`` (even, so that a regular
    graph exists): 34 for 50 nodes, 40 for 100, 60 for 1,000. With the default
    threshold, a neighbourhood of 41 then survives 13 dropouts; 10%
    independent dropout exceeds that with probability about 3e-5 per node. This is a
    heuristic for honest-but-curious servers and random dropouts; for an active
    adversary pick the degree from Bell et al. (2020), Table 2.

    Examples
    --------
    >>> default_neighbours(10), default_neighbours(50), default_neighbours(100)
    (9, 34, 40)
    """
    if num_nodes < 2:
        return 0
    sparse = 2 * math.ceil(3 * math.log2(num_nodes))
    return num_nodes - 1 if sparse >= num_nodes - 1 else sparse


def default_threshold(neighbours: int) -> int:
    """Two thirds of a neighbourhood, at least 2: ``max(2, ceil(2 * (neighbours + 1) / 3))``.

    Examples
    --------
    >>> default_threshold(2), default_threshold(9), default_threshold(40)
    (2, 7, 28)
    """
    return max(2, math.ceil(2 * (neighbours + 1) / 3))


def validate_params(params: SecAggParams) -> SecAggParams:
    """Refuse parameters under which SecAgg+ would not protect the inputs.

    Parameters
    ----------
    params : SecAggParams

    Returns
    -------
    SecAggParams
        ``params`` itself, so the call can be chained.

    Raises
    ------
    ConfigError
        Naming the field: fewer than 3 nodes (the sum of two reveals the other's
        input), a neighbour count outside ``[2, num_nodes - 1]`` or odd in a
        sparse graph, a threshold with ``2 * threshold <= neighbours + 1`` (two
        disjoint groups could each rebuild a secret) or above ``neighbours + 1``,
        or a vector length below 1.

    Examples
    --------
    >>> validate_params(SecAggParams(num_nodes=5, neighbours=4, threshold=3, vector_length=10)).threshold
    3
    >>> validate_params(SecAggParams(num_nodes=6, neighbours=5, threshold=3, vector_length=10))
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: secagg.threshold: must be > (neighbours + 1) / 2 = 3.0 so that two disjoint groups of holders cannot each rebuild a secret, got 3
    """
    if params.num_nodes < 3:
        raise ConfigError(
            f"must be >= 3: with fewer, the sum reveals the other node's input; got {params.num_nodes}",
            field="secagg.num_nodes",
        )
    if not 2 <= params.neighbours <= params.num_nodes - 1:
        raise ConfigError(
            f"must be between 2 and num_nodes - 1 = {params.num_nodes - 1}, got {params.neighbours}",
            field="secagg.neighbours",
        )
    if not params.complete_graph and params.neighbours % 2:
        raise ConfigError(
            f"must be even when below num_nodes - 1 (the graph is a ring of neighbourhoods), got {params.neighbours}",
            field="secagg.neighbours",
        )
    holders = params.neighbours + 1
    if 2 * params.threshold <= holders:
        raise ConfigError(
            f"must be > (neighbours + 1) / 2 = {holders / 2} so that two disjoint groups of holders "
            f"cannot each rebuild a secret, got {params.threshold}",
            field="secagg.threshold",
        )
    if params.threshold > holders:
        raise ConfigError(
            f"must be <= neighbours + 1 = {holders} (the holders of each secret), got {params.threshold}",
            field="secagg.threshold",
        )
    if params.vector_length < 1:
        raise ConfigError(f"must be >= 1, got {params.vector_length}", field="secagg.vector_length")
    return params


def resolve_params(
    *,
    num_nodes: int,
    vector_length: int,
    neighbours: int | None = None,
    threshold: int | None = None,
) -> SecAggParams:
    """Fill in default neighbours and threshold, then validate.

    Parameters
    ----------
    num_nodes : int
        Nodes invited to the round (>= 3).
    vector_length : int
        Length of the ``uint32`` vectors summed (>= 1).
    neighbours : int, optional
        Defaults to :func:`default_neighbours`.
    threshold : int, optional
        Defaults to :func:`default_threshold` of the neighbour count.

    Returns
    -------
    SecAggParams

    Raises
    ------
    ConfigError
        As :func:`validate_params`.

    Examples
    --------
    >>> resolve_params(num_nodes=10, vector_length=100)
    SecAggParams(num_nodes=10, neighbours=9, threshold=7, vector_length=100)
    >>> resolve_params(num_nodes=100, vector_length=100)
    SecAggParams(num_nodes=100, neighbours=40, threshold=28, vector_length=100)
    """
    k = default_neighbours(num_nodes) if neighbours is None else neighbours
    t = default_threshold(k) if threshold is None else threshold
    return validate_params(
        SecAggParams(num_nodes=num_nodes, neighbours=k, threshold=t, vector_length=vector_length)
    )
