"""Ditto (Li et al. 2021): FedAvg for the global model, a proximal personal model at each site."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedcare.errors import ConfigError
from fedcare.strategies.fedavg import FedAvg

__all__ = ["DITTO_KEY", "Ditto"]

#: Key of the proximal weight in a ditto training job's JSON config.
DITTO_KEY = "ditto_lambda"


class Ditto(FedAvg):
    """FedAvg whose training jobs ask each site to also train its personal model.

    The server is :class:`FedAvg` unchanged. :meth:`configure_train` sends
    ``{"ditto_lambda": lambda}``; each node then, besides the usual local
    training of the global model (whose update it returns), trains its own
    personal model ``v`` (kept in memory, starting from the first global model
    it receives) with ``lambda / 2 * ||v - w_global||^2`` added to the loss,
    and reports ``personalized_*`` metrics of ``v`` at evaluation.

    Parameters
    ----------
    ditto_lambda : float
        Weight of the proximal term (>= 0); 0 trains purely local models.
    server_learning_rate : float
        Step size applied to the averaged update.

    Raises
    ------
    ConfigError
        If ``ditto_lambda`` is negative.

    Examples
    --------
    >>> Ditto(ditto_lambda=0.5).configure_train(1, ["a"])
    {'a': {'ditto_lambda': 0.5}}
    """

    def __init__(self, *, ditto_lambda: float = 0.1, server_learning_rate: float = 1.0) -> None:
        if not ditto_lambda >= 0:
            raise ConfigError(f"must be >= 0, got {ditto_lambda}", field="plan.strategy.ditto_lambda")
        super().__init__(server_learning_rate=server_learning_rate)
        self.ditto_lambda = float(ditto_lambda)

    def configure_train(self, round: int, nodes: Sequence[str]) -> dict[str, Mapping[str, Any]]:  # noqa: A002
        return {node: {DITTO_KEY: self.ditto_lambda} for node in nodes}
