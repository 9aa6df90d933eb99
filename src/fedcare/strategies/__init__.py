"""Aggregation strategies, built by name from the plan."""

from __future__ import annotations

from fedcare.plan import StrategyConfig
from fedcare.strategies.base import Strategy
from fedcare.strategies.fedavg import FedAvg
from fedcare.strategies.kernels import weighted_fold

__all__ = ["FedAvg", "Strategy", "make_strategy", "weighted_fold"]


def make_strategy(config: StrategyConfig) -> Strategy:
    """Build the strategy a plan names.

    Examples
    --------
    >>> type(make_strategy(StrategyConfig(name="fedavg"))).__name__
    'FedAvg'
    """
    if config.name == "fedavg":
        return FedAvg(server_learning_rate=config.server_learning_rate)
    raise AssertionError(f"unhandled strategy {config.name!r}")  # the plan's Literal forbids it
