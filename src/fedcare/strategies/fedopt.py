"""FedOpt (Reddi et al. 2021): FedAdam, FedYogi and FedAdagrad, streaming."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from fedcare.errors import ConfigError, DataError, FederationError
from fedcare.params import Parameters
from fedcare.strategies.fedavg import FedAvg
from fedcare.strategies.kernels import adaptive_server_step

__all__ = ["FedOpt"]


class FedOpt(FedAvg):
    """An adaptive server optimizer applied to the example-weighted mean update.

    Each round folds the updates into one float64 accumulator as they arrive
    (like :class:`~fedcare.strategies.fedavg.FedAvg`), then treats the mean
    ``d`` as a pseudo-gradient and runs one step of Algorithm 2 of Reddi et al.
    (2021) with :func:`~fedcare.strategies.kernels.adaptive_server_step`. The
    moments ``m`` (from 0) and ``v`` (from ``tau**2``) are float64 and kept
    across rounds and saved with the run's checkpoint (:meth:`state_dict`), so
    a resumed run continues them; memory is three model-sized float64 vectors.

    Parameters
    ----------
    rule : {"adam", "yogi", "adagrad"}
        ``fedadam``, ``fedyogi`` or ``fedadagrad``.
    server_learning_rate : float
        The server step size ``eta`` (> 0).
    beta1, beta2 : float
        Moment decay rates in [0, 1) (``beta2`` is unused by Adagrad).
    tau : float
        Adaptivity (> 0).

    Raises
    ------
    ConfigError
        If a setting is out of range, naming ``plan.strategy.<field>``.

    Examples
    --------
    >>> s = FedOpt(rule="adam", server_learning_rate=0.1)
    >>> s.begin_round(1, Parameters({"w": np.zeros(2)}))
    >>> s.accumulate(Parameters({"w": [1.0, -1.0]}), weight=2, node_id="a")
    >>> [round(value, 3) for value in s.finalize()["w"].tolist()]
    [0.099, -0.099]
    """

    def __init__(
        self,
        *,
        rule: Literal["adam", "yogi", "adagrad"],
        server_learning_rate: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        for field, value, low, high in (
            ("beta1", beta1, 0.0, 1.0),
            ("beta2", beta2, 0.0, 1.0),
        ):
            if not low <= value < high:
                raise ConfigError(f"must be in [0, 1), got {value}", field=f"plan.strategy.{field}")
        if not (np.isfinite(tau) and tau > 0):
            raise ConfigError(f"must be > 0, got {tau}", field="plan.strategy.tau")
        if not (np.isfinite(server_learning_rate) and server_learning_rate > 0):
            raise ConfigError(f"must be > 0, got {server_learning_rate}", field="plan.strategy.server_learning_rate")
        if rule not in ("adam", "yogi", "adagrad"):
            raise ConfigError(f"rule must be adam, yogi or adagrad, got {rule!r}", field="plan.strategy.name")
        super().__init__(server_learning_rate=server_learning_rate)
        self.rule = rule
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._first_moment: np.ndarray | None = None
        self._second_moment: np.ndarray | None = None

    def state_dict(self) -> dict[str, np.ndarray]:
        if self._first_moment is None or self._second_moment is None:
            return {}
        return {"first_moment": self._first_moment.copy(), "second_moment": self._second_moment.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            return
        if set(state) != {"first_moment", "second_moment"}:
            raise DataError(f"FedOpt state must hold first_moment and second_moment, got {', '.join(sorted(state))}")
        first, second = (np.array(state[k], dtype=np.float64) for k in ("first_moment", "second_moment"))
        if first.ndim != 1 or first.shape != second.shape or not (np.isfinite(first).all() and (second >= 0).all()):
            raise DataError("FedOpt state holds moments of different sizes, or non-finite or negative values")
        self._first_moment, self._second_moment = first, second

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        size = global_parameters.num_elements
        if self._first_moment is None:
            self._first_moment = np.zeros(size, dtype=np.float64)
            self._second_moment = np.full(size, self.tau**2, dtype=np.float64)
        elif self._first_moment.size != size:
            raise FederationError(f"the server moments have {self._first_moment.size} values, the model {size}")
        super().begin_round(round, global_parameters)

    def finalize(self) -> Parameters:
        delta, global_parameters = self._take_mean()
        assert self._first_moment is not None and self._second_moment is not None
        weights = global_parameters.flatten().astype(np.float64)
        adaptive_server_step(
            weights,
            self._first_moment,
            self._second_moment,
            delta,
            rule=self.rule,
            learning_rate=self.server_learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return Parameters.from_flat(weights.astype(np.float32), global_parameters.spec)
