"""FedNova (Wang et al. 2020): average updates normalized by each site's local steps, streaming."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcare.errors import FederationError, ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.base import Strategy
from fedcare.strategies.kernels import weighted_fold

__all__ = ["STEPS_KEY", "FedNova"]

#: Key of a site's local optimizer steps in a fednova training result's JSON ``data``.
STEPS_KEY = "local_steps"


class FedNova(Strategy):
    """Normalized averaging for sites that ran different numbers of local steps.

    With ``p_i = n_i / n`` (example weights), ``tau_i`` the local optimizer
    steps of site ``i`` and ``d_i = update_i / tau_i``:
    ``new = global + server_learning_rate * tau_eff * sum(p_i d_i)`` where
    ``tau_eff = sum(p_i tau_i)`` (Wang et al. 2020, eq. 6 for plain SGD
    without momentum). When all ``tau_i`` are equal it is FedAvg. Two
    accumulators, ``sum(n_i d_i)`` and ``sum(n_i tau_i)``, are folded as
    updates arrive: memory O(model).

    Each site reports ``tau_i`` in its result's ``data`` under
    :data:`STEPS_KEY`; an answer without it is refused.

    Parameters
    ----------
    server_learning_rate : float
        Step size applied to the normalized average (1.0 is the paper's).

    Examples
    --------
    >>> s = FedNova()
    >>> s.begin_round(1, Parameters({"w": np.zeros(1)}))
    >>> s.receive_data({"local_steps": 1}, node_id="a")
    >>> s.accumulate(Parameters({"w": [1.0]}), weight=1, node_id="a")
    >>> s.receive_data({"local_steps": 4}, node_id="b")
    >>> s.accumulate(Parameters({"w": [2.0]}), weight=1, node_id="b")
    >>> s.finalize()["w"].tolist()  # tau_eff 2.5 * mean(1/1, 2/4)
    [1.875]
    """

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = server_learning_rate
        self._global: Parameters | None = None
        self._sum: np.ndarray | None = None
        self._total_weight = 0.0
        self._weighted_steps = 0.0
        self._pending: dict[str, float] = {}

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        self._global = global_parameters
        self._sum = np.zeros(global_parameters.num_elements, dtype=np.float64)
        self._total_weight = 0.0
        self._weighted_steps = 0.0
        self._pending = {}

    def receive_data(self, data: Mapping[str, Any], *, node_id: str) -> None:
        steps = data.get(STEPS_KEY)
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not (math.isfinite(steps) and steps >= 1):
            raise ProtocolError(
                f"a fednova training result must carry its local steps (a number >= 1) as {STEPS_KEY!r}, "
                f"got {steps!r}",
                node_id=node_id,
            )
        self._pending[node_id] = float(steps)

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        if self._global is None or self._sum is None:
            raise FederationError("accumulate() called before begin_round()")
        if update.spec != self._global.spec:
            raise ProtocolError("update does not match the model's tensors", node_id=node_id)
        if not weight > 0:
            raise ProtocolError(f"update weight must be > 0, got {weight}", node_id=node_id)
        steps = self._pending.pop(node_id, None)
        if steps is None:
            raise ProtocolError(f"a fednova training result must carry {STEPS_KEY!r}", node_id=node_id)
        weighted_fold(self._sum, update.flatten(), float(weight) / steps)
        self._total_weight += float(weight)
        self._weighted_steps += float(weight) * steps

    def finalize(self) -> Parameters:
        if self._global is None or self._sum is None:
            raise FederationError("finalize() called before begin_round()")
        if self._total_weight <= 0:
            raise FederationError("no update was accumulated this round")
        tau_eff = self._weighted_steps / self._total_weight
        step = self._sum
        step *= self.server_learning_rate * tau_eff / self._total_weight
        step += self._global.flatten()
        new = Parameters.from_flat(step.astype(np.float32), self._global.spec)
        self._global, self._sum, self._total_weight, self._weighted_steps = None, None, 0.0, 0.0
        self._pending = {}
        return new
