"""SCAFFOLD (Karimireddy et al. 2020), option II control variates, streaming.

The server control variate ``c`` travels to the sites in the training job's
JSON config and each site's change ``delta_c_i`` comes back in its result's
JSON ``data``. Both are model-sized, and a job's JSON config (like a result's
data) is limited to 1 MiB on the gRPC transport, so SCAFFOLD is limited to
models of at most :data:`MAX_CONTROL_VALUES` values; a binary side channel
(safetensors, like the weights) for larger models is future work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcare.errors import ConfigError, DataError, FederationError, ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.base import Strategy
from fedcare.strategies.kernels import weighted_fold

__all__ = ["CONTROL_DELTA_KEY", "CONTROL_KEY", "MAX_CONTROL_VALUES", "Scaffold", "decode_control", "encode_control"]

#: Largest model (number of values) whose control variates fit in a 1 MiB JSON config
#: (at most 17 bytes per value as written by :func:`encode_control`).
MAX_CONTROL_VALUES = 40_000
#: Training-job config key carrying ``c`` (``None``: all zeros, before the first round ends).
CONTROL_KEY = "scaffold_control"
#: Training-result data key carrying ``delta_c_i``.
CONTROL_DELTA_KEY = "scaffold_control_delta"


def encode_control(vector: np.ndarray) -> list[float]:
    """A control variate as a JSON list, each value rounded to float32 (its shortest exact decimal).

    Examples
    --------
    >>> encode_control(np.array([0.1, -2.0, 1e-12]))
    [0.1, -2.0, 1e-12]
    """
    return [float(str(value)) for value in vector.astype(np.float32)]


def decode_control(value: Any, *, size: int, node_id: str | None = None) -> np.ndarray:
    """Check and read a control variate sent as a JSON list; float64, ``size`` values.

    Raises
    ------
    ProtocolError
        If ``value`` is not a list of ``size`` finite numbers.

    Examples
    --------
    >>> decode_control([0.5, -1.0], size=2).tolist()
    [0.5, -1.0]
    >>> decode_control([0.5], size=2)
    Traceback (most recent call last):
    ...
    fedcare.errors.ProtocolError: control variate must be a list of 2 numbers, got 1 values
    """
    if not isinstance(value, (list, tuple)) or len(value) != size:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ProtocolError(f"control variate must be a list of {size} numbers, got {got}", node_id=node_id)
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProtocolError("control variate holds values that are not numbers", node_id=node_id) from None
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise ProtocolError("control variate holds non-finite values (NaN or Inf)", node_id=node_id)
    return vector


class Scaffold(Strategy):
    """Stochastic controlled averaging: corrects each site's drift with control variates.

    The server keeps ``c`` (float64, from 0) across rounds and sends it with
    every training job; a site trains with gradients ``g - c_i + c`` and
    returns its update ``delta_y_i`` and ``delta_c_i``. Then
    ``x += server_learning_rate * mean(delta_y)`` and
    ``c += (|S| / N) * mean(delta_c) = sum(delta_c) / N``, each site counting
    once as in the paper (not by examples). Memory: three model-sized float64
    vectors and one pending ``delta_c``. ``c`` is saved with the run's
    checkpoint (:meth:`state_dict`); the sites' ``c_i`` live in their memory
    only, so restarted sites (every site of a resumed simulation) start again
    from ``c_i = 0``, which SCAFFOLD tolerates (it is its initialization).

    Parameters
    ----------
    num_nodes : int, optional
        ``N``, the sites in the federation; default: the sites that answered
        each round (full participation).
    server_learning_rate : float
        ``eta_g``, applied to the mean update.

    Raises
    ------
    ConfigError
        In :meth:`begin_round`, when the model has more than
        :data:`MAX_CONTROL_VALUES` values (naming ``plan.strategy.name``).

    Examples
    --------
    >>> s = Scaffold(num_nodes=2)
    >>> s.configure_train(1, ["a"])
    {'a': {'scaffold_control': None}}
    >>> s.begin_round(1, Parameters({"w": np.zeros(2)}))
    >>> s.receive_data({"scaffold_control_delta": [1.0, 2.0]}, node_id="a")
    >>> s.accumulate(Parameters({"w": [0.5, 0.5]}), weight=10, node_id="a")
    >>> s.finalize()["w"].tolist(), s.configure_train(2, ["a"])["a"]["scaffold_control"]
    ([0.5, 0.5], [0.5, 1.0])
    """

    def __init__(self, *, num_nodes: int | None = None, server_learning_rate: float = 1.0) -> None:
        if num_nodes is not None and num_nodes < 1:
            raise ConfigError(f"the federation must have at least 1 site, got {num_nodes}", field="plan.nodes")
        self.num_nodes = num_nodes
        self.server_learning_rate = server_learning_rate
        self._control: np.ndarray | None = None
        self._global: Parameters | None = None
        self._sum_update: np.ndarray | None = None
        self._sum_control: np.ndarray | None = None
        self._count = 0
        self._pending: dict[str, np.ndarray] = {}

    @property
    def control(self) -> np.ndarray | None:
        """The server control variate ``c`` (float64; ``None`` before the first round); read only."""
        if self._control is None:
            return None
        view = self._control.view()
        view.flags.writeable = False
        return view

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self._control is None else {"control": self._control.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            return
        if set(state) != {"control"}:
            raise DataError(f"SCAFFOLD state must hold control, got {', '.join(sorted(state))}")
        control = np.array(state["control"], dtype=np.float64)
        if control.ndim != 1 or not np.isfinite(control).all():
            raise DataError("SCAFFOLD state holds a control variate that is not a finite vector")
        self._control = control

    def configure_train(self, round: int, nodes: Sequence[str]) -> dict[str, Mapping[str, Any]]:  # noqa: A002
        control = None if self._control is None else encode_control(self._control)
        return {node: {CONTROL_KEY: control} for node in nodes}

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        size = global_parameters.num_elements
        if size > MAX_CONTROL_VALUES:
            raise ConfigError(
                f"scaffold sends its control variates in the jobs' JSON config, limited to models of "
                f"{MAX_CONTROL_VALUES} values, and this model has {size}; use fedprox or a FedOpt rule "
                "(a binary channel for larger models is future work)",
                field="plan.strategy.name",
                round=round,
            )
        if self._control is None:
            self._control = np.zeros(size, dtype=np.float64)
        elif self._control.size != size:
            raise FederationError(f"the server control variate has {self._control.size} values, the model {size}")
        self._global = global_parameters
        self._sum_update = np.zeros(size, dtype=np.float64)
        self._sum_control = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._pending = {}

    def receive_data(self, data: Mapping[str, Any], *, node_id: str) -> None:
        if self._global is None:
            raise FederationError("receive_data() called before begin_round()")
        if CONTROL_DELTA_KEY not in data:
            raise ProtocolError("a scaffold training result must carry its control-variate change", node_id=node_id)
        size = self._global.num_elements
        self._pending[node_id] = decode_control(data[CONTROL_DELTA_KEY], size=size, node_id=node_id)

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        if self._global is None or self._sum_update is None or self._sum_control is None:
            raise FederationError("accumulate() called before begin_round()")
        if update.spec != self._global.spec:
            raise ProtocolError("update does not match the model's tensors", node_id=node_id)
        delta_control = self._pending.pop(node_id, None)
        if delta_control is None:
            raise ProtocolError("a scaffold training result must carry its control-variate change", node_id=node_id)
        weighted_fold(self._sum_update, update.flatten(), 1.0)
        weighted_fold(self._sum_control, delta_control, 1.0)
        self._count += 1

    def finalize(self) -> Parameters:
        if self._global is None or self._sum_update is None or self._sum_control is None:
            raise FederationError("finalize() called before begin_round()")
        if self._count == 0:
            raise FederationError("no update was accumulated this round")
        assert self._control is not None
        step = self._sum_update
        step *= self.server_learning_rate / self._count
        step += self._global.flatten()
        total = self.num_nodes if self.num_nodes is not None else self._count
        weighted_fold(self._control, self._sum_control, 1.0 / max(total, self._count))
        new = Parameters.from_flat(step.astype(np.float32), self._global.spec)
        self._global, self._sum_update, self._sum_control, self._count = None, None, None, 0
        self._pending = {}
        return new
