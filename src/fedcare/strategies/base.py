"""The Strategy interface: how the coordinator turns updates into a new global model."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedcare.errors import DataError
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

    def select(self, round: int, candidates: Sequence[str]) -> list[str] | None:  # noqa: A002
        """The nodes to train this round, or ``None`` for the coordinator's seeded random choice (default).

        Parameters
        ----------
        round : int
            The round number, from 1.
        candidates : sequence of str
            The admitted, reachable nodes, in admitted order.

        Returns
        -------
        list of str or None
            A subset of ``candidates``; ``None`` lets the coordinator draw
            ``plan.nodes_per_round`` of them.

        Examples
        --------
        >>> from fedcare.strategies.fedavg import FedAvg
        >>> FedAvg().select(1, ["a", "b"]) is None
        True
        """
        return None

    def configure_train(self, round: int, nodes: Sequence[str]) -> dict[str, Mapping[str, Any]]:  # noqa: A002
        """Per-node, JSON-able extra configuration for this round's training jobs."""
        return {node: {} for node in nodes}

    @abc.abstractmethod
    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        """Start aggregating a round whose jobs carried ``global_parameters``."""

    def receive_data(self, data: Mapping[str, Any], *, node_id: str) -> None:
        """Take a training result's JSON ``data`` before its update is accumulated; ignored by default.

        The coordinator calls this just before :meth:`accumulate` for the same
        node. A strategy that needs side information from the sites (SCAFFOLD's
        control-variate change) checks it here and raises ``ProtocolError`` to
        refuse the whole answer.

        Examples
        --------
        >>> from fedcare.strategies.fedavg import FedAvg
        >>> FedAvg().receive_data({"anything": 1}, node_id="a") is None
        True
        """

    @abc.abstractmethod
    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        """Fold one node's update (new - global) in, as soon as it arrives."""

    @abc.abstractmethod
    def finalize(self) -> Parameters:
        """Return the new global parameters and release the round's buffers."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Buffers kept across rounds (float64 arrays) to save with the checkpoint; ``{}`` by default.

        Examples
        --------
        >>> from fedcare.strategies.fedavg import FedAvg
        >>> FedAvg().state_dict()
        {}
        """
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned, on resume; by default only ``{}`` is accepted.

        Raises
        ------
        DataError
            If ``state`` holds buffers this strategy does not keep.

        Examples
        --------
        >>> from fedcare.strategies.fedavg import FedAvg
        >>> FedAvg().load_state_dict({})
        """
        if state:
            raise DataError(
                f"the checkpoint holds strategy state ({', '.join(sorted(state))}) that "
                f"{type(self).__name__} does not keep; resume with the strategy the run was started with"
            )

    def round_metrics(self) -> dict[str, Any]:
        """JSON-able facts about the round just finalized, for the round_end event; ``{}`` by default.

        Examples
        --------
        >>> from fedcare.strategies.fedavg import FedAvg
        >>> FedAvg().round_metrics()
        {}
        """
        return {}
