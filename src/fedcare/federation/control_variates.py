"""A site's side of SCAFFOLD: its control variate ``c_i``, kept in memory across rounds."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcare.errors import ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.scaffold import decode_control, encode_control
from fedcare.tasks.hooks import ControlVariateCorrection

__all__ = ["NodeControlVariate"]


class NodeControlVariate:
    """``c_i`` of one site, option II of Karimireddy et al. (2020).

    It lives in memory only: a restarted node starts again from ``c_i = 0``,
    SCAFFOLD's own initialization, which it tolerates (the site's next
    correction is just less informed). ``c_i`` is updated when the site
    returns its result, even if the coordinator later refuses it (late or
    malformed), which makes the server's ``c`` drift slightly from the mean of
    the ``c_i``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> state = NodeControlVariate()
    >>> hook = state.training_hook(model, None, Parameters({"weight": [[0.0]], "bias": [0.0]}))
    >>> state.finish(np.array([-0.2, 0.1], dtype=np.float32), steps=2, learning_rate=0.1)
    [1.0, -0.5]
    """

    def __init__(self) -> None:
        self._own: np.ndarray | None = None
        self._server: np.ndarray | None = None

    def training_hook(self, model: Any, control: Any, global_parameters: Parameters) -> ControlVariateCorrection:
        """Read the round's ``c`` (``None``: zeros) and return the hook that adds ``c - c_i`` to the gradient."""
        size = global_parameters.num_elements
        server = np.zeros(size) if control is None else decode_control(control, size=size)
        if self._own is None or self._own.size != size:
            self._own = np.zeros(size, dtype=np.float64)
        self._server = server
        correction = Parameters.from_flat((server - self._own).astype(np.float32), global_parameters.spec)
        return ControlVariateCorrection(model, correction)

    def finish(self, update: np.ndarray, *, steps: int, learning_rate: float) -> list[float]:
        """``c_i+ = c_i - c - update / (steps * learning_rate)``; store it, return ``c_i+ - c_i`` for the server."""
        if self._own is None or self._server is None:
            raise ProtocolError("scaffold finished a round it did not start")
        if steps <= 0:
            change = np.zeros_like(self._own)
        else:
            change = -self._server - update.astype(np.float64) / (steps * learning_rate)
        self._own = self._own + change
        self._server = None
        return encode_control(change)
