"""A site's side of SCAFFOLD: its control variate ``c_i``, kept across rounds (and restarts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedcare.errors import ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.scaffold import decode_control, encode_control
from fedcare.tasks.hooks import ControlVariateCorrection

__all__ = ["NodeControlVariate"]


class NodeControlVariate:
    """``c_i`` of one site, option II of Karimireddy et al. (2020).

    With a ``path`` it is saved there (safetensors, atomically) after every
    round and read back by a restarted node of the same run; a new run, or a
    node without a path, starts from ``c_i = 0``, SCAFFOLD's own
    initialization. ``c_i`` is updated when the site
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

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._own: np.ndarray | None = None
        self._server: np.ndarray | None = None
        self._run_id = ""

    def training_hook(
        self, model: Any, control: Any, global_parameters: Parameters, *, run_id: str = ""
    ) -> ControlVariateCorrection:
        """Read the round's ``c`` (``None``: zeros) and return the hook that adds ``c - c_i`` to the gradient."""
        size = global_parameters.num_elements
        server = np.zeros(size) if control is None else decode_control(control, size=size)
        if self._own is None or self._run_id != run_id:
            self._own, self._run_id = self._saved(run_id, size), run_id
        if self._own.size != size:
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
        self._save()
        return encode_control(change)

    def _saved(self, run_id: str, size: int) -> np.ndarray:
        """``c_i`` saved by this site for ``run_id``, or zeros."""
        if self.path is None or not self.path.exists():
            return np.zeros(size, dtype=np.float64)
        from safetensors import safe_open

        # safetensors, not pickle: the file is only ever read as plain arrays.
        with safe_open(str(self.path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("run_id") != run_id or "c" not in handle.keys():
                return np.zeros(size, dtype=np.float64)
            saved = np.asarray(handle.get_tensor("c"), dtype=np.float64)
        return saved if saved.size == size else np.zeros(size, dtype=np.float64)

    def _save(self) -> None:
        if self.path is None or self._own is None:
            return
        from safetensors.numpy import save

        from fedcare.federation.rundir import atomic_write

        atomic_write(self.path, save({"c": self._own}, metadata={"run_id": self._run_id}))
