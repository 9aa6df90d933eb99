"""The Strategy interface: how the coordinator turns updates into a new global model."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedcare.params import Parameters

__all__ = ["Strategy"]


class Strategy(abc.ABC):
    """Coordinator-side aggregation, one round at a time.

    The coordinator calls, each round, :meth:`configure_train` once,
    :meth:`begin_round` once, :meth:`accumulate` for each update as it arrives
    and :meth:`finalize` once. Streaming strategies keep O(model) memory.
    Strategies that must see every update at once (robust rules) set
    ``needs_all_updates``.
    """

    #: True for rules that cannot fold updates one by one.
    needs_all_updates: ClassVar[bool] = False

    def configure_train(self, round: int, nodes: Sequence[str]) -> dict[str, Mapping[str, Any]]:  # noqa: A002
        """Per-node, JSON-able extra configuration for this round's training jobs."""
        return {node: {} for node in nodes}

    @abc.abstractmethod
    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        """Start aggregating a round whose jobs carried ``global_parameters``."""

    @abc.abstractmethod
    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        """Fold one node's update (new - global) in, as soon as it arrives."""

    @abc.abstractmethod
    def finalize(self) -> Parameters:
        """Return the new global parameters and release the round's buffers."""

    def round_metrics(self) -> dict[str, Any]:
        """JSON-able facts about the round just finalized, for the round_end event; ``{}`` by default.

        Examples
        --------
        >>> from fedcare.strategies.fedavg import FedAvg
        >>> FedAvg().round_metrics()
        {}
        """
        return {}
