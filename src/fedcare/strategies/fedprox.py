"""FedProx (Li et al. 2020): FedAvg at the server, a proximal term at the sites."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedcare.errors import ConfigError
from fedcare.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg whose training jobs ask each site to add ``mu / 2 * ||w - w_global||^2`` to its loss.

    The server side is :class:`FedAvg` unchanged; :meth:`configure_train`
    sends ``{"proximal_mu": mu}`` and the node trains with a
    :class:`fedcare.tasks.hooks.ProximalTerm`. With ``mu = 0`` it is FedAvg.

    Parameters
    ----------
    proximal_mu : float
        Weight of the proximal term (>= 0), in loss units per squared weight unit.
    server_learning_rate : float
        Step size applied to the averaged update.

    Raises
    ------
    ConfigError
        If ``proximal_mu`` is negative.

    Examples
    --------
    >>> FedProx(proximal_mu=0.1).configure_train(1, ["a", "b"])
    {'a': {'proximal_mu': 0.1}, 'b': {'proximal_mu': 0.1}}
    """

    def __init__(self, *, proximal_mu: float = 0.01, server_learning_rate: float = 1.0) -> None:
        if not proximal_mu >= 0:
            raise ConfigError(f"must be >= 0, got {proximal_mu}", field="plan.strategy.proximal_mu")
        super().__init__(server_learning_rate=server_learning_rate)
        self.proximal_mu = float(proximal_mu)

    def configure_train(self, round: int, nodes: Sequence[str]) -> dict[str, Mapping[str, Any]]:  # noqa: A002
        return {node: {"proximal_mu": self.proximal_mu} for node in nodes}
