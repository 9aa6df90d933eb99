"""Cyclic (sequential) training: the model visits one site per round, in turn."""

from __future__ import annotations

from collections.abc import Sequence

from fedcare.strategies.fedavg import FedAvg

__all__ = ["Cyclic"]


class Cyclic(FedAvg):
    """One site per round in a fixed cyclic order; the global model becomes its result.

    FLamby's "Cyclic" strategy: round ``r`` trains on site
    ``candidates[(r - 1) % len(candidates)]`` from the current global model,
    and aggregation is FedAvg over that single update (with the default
    ``server_learning_rate`` of 1 the new global model is the site's model).
    The order is the coordinator's candidate order (admitted, reachable
    nodes, sorted when ``plan.nodes`` is given). Plans refuse it with secure
    aggregation (the sum of one update is that update) and with
    ``min_nodes`` other than 1.

    Parameters
    ----------
    server_learning_rate : float
        Step size applied to the site's update (1.0: take the site's model).

    Examples
    --------
    >>> s = Cyclic()
    >>> [s.select(r, ["a", "b", "c"]) for r in (1, 2, 3, 4)]
    [['a'], ['b'], ['c'], ['a']]
    """

    def select(self, round: int, candidates: Sequence[str]) -> list[str] | None:  # noqa: A002
        if not candidates:
            return []
        return [candidates[(round - 1) % len(candidates)]]
