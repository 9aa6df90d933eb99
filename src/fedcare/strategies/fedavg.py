"""Federated averaging (McMahan et al. 2017), streaming."""

from __future__ import annotations

import numpy as np

from fedcare.errors import FederationError, ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.base import Strategy
from fedcare.strategies.kernels import weighted_fold

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Example-weighted mean of the updates, applied with a server learning rate.

    ``new = global + server_learning_rate * sum(w_i * update_i) / sum(w_i)``.
    Updates are folded into one float64 accumulator as they arrive, so memory
    is O(model) whatever the number of sites, and the result does not depend
    on arrival order beyond float64 rounding.

    Parameters
    ----------
    server_learning_rate : float
        Step size applied to the averaged update (1.0 is plain FedAvg).

    Examples
    --------
    >>> g = Parameters({"w": np.zeros(2)})
    >>> s = FedAvg()
    >>> s.begin_round(1, g)
    >>> s.accumulate(Parameters({"w": [1.0, 1.0]}), weight=3, node_id="a")
    >>> s.accumulate(Parameters({"w": [-1.0, 3.0]}), weight=1, node_id="b")
    >>> s.finalize()["w"].tolist()
    [0.5, 1.5]
    """

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = server_learning_rate
        self._global: Parameters | None = None
        self._sum: np.ndarray | None = None
        self._total_weight = 0.0

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        self._global = global_parameters
        self._sum = np.zeros(global_parameters.num_elements, dtype=np.float64)
        self._total_weight = 0.0

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        self._fold(update, weight=weight, node_id=node_id)

    def finalize(self) -> Parameters:
        mean, global_parameters = self._take_mean()
        mean *= self.server_learning_rate
        mean += global_parameters.flatten()
        return Parameters.from_flat(mean.astype(np.float32), global_parameters.spec)

    # -- shared with the strategies built on FedAvg ------------------------------------

    def _fold(self, update: Parameters, *, weight: float, node_id: str, scale: float = 1.0) -> None:
        """Check ``update`` and fold ``scale * update`` in with example weight ``weight``."""
        if self._global is None or self._sum is None:
            raise FederationError("accumulate() called before begin_round()")
        if update.spec != self._global.spec:
            raise ProtocolError("update does not match the model's tensors", node_id=node_id)
        if not weight > 0:
            raise ProtocolError(f"update weight must be > 0, got {weight}", node_id=node_id)
        weighted_fold(self._sum, update.flatten(), float(weight) * scale)
        self._total_weight += float(weight)

    def _take_mean(self) -> tuple[np.ndarray, Parameters]:
        """The round's example-weighted mean update (float64, owned by the caller) and its global model; ends the round."""
        if self._global is None or self._sum is None:
            raise FederationError("finalize() called before begin_round()")
        if self._total_weight <= 0:
            raise FederationError("no update was accumulated this round")
        mean, global_parameters = self._sum, self._global
        mean /= self._total_weight
        self._global, self._sum, self._total_weight = None, None, 0.0
        return mean, global_parameters
