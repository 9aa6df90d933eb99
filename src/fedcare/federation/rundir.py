"""The run directory: plan, event log, checkpoints, final model and model card.

Layout::

    RUN/
      plan.yaml                 the plan, as validated
      metrics.jsonl             one JSON event per line, appended and flushed
      checkpoints/latest.safetensors + latest.json   the last completed round
      model.safetensors         the final global model
      model_card.json           sites, example counts, metrics, privacy settings

Files are written atomically (temporary file, then rename), so a crash never
leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcare.errors import DataError
from fedcare.params import Parameters
from fedcare.plan import Plan

__all__ = ["RunDirectory", "atomic_write"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDirectory:
    """Where one run keeps its record.

    Parameters
    ----------
    path : str or Path
        Created if missing.

    Examples
    --------
    >>> import tempfile
    >>> run = RunDirectory(tempfile.mkdtemp())
    >>> run.log_event({"event": "round_end", "round": 1, "loss": float("nan")})
    >>> run.events()[0]["loss"] is None
    True
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "latest.safetensors"

    @property
    def strategy_state_path(self) -> Path:
        return self.path / "checkpoints" / "strategy.safetensors"

    @property
    def model_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def model_card_path(self) -> Path:
        return self.path / "model_card.json"

    def write_plan(self, plan: Plan) -> None:
        """Save the validated plan as ``plan.yaml``."""
        import yaml

        text = yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)
        atomic_write(self.path / "plan.yaml", text.encode())

    def log_event(self, event: dict[str, Any]) -> None:
        """Append one event to ``metrics.jsonl`` (NaN and Inf become null)."""
        line = json.dumps(_jsonable(event), sort_keys=False) + "\n"
        with self._lock, self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line)

    def events(self) -> list[dict[str, Any]]:
        """Every event logged so far."""
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def recorded_run_id(self) -> str | None:
        """The run id this directory belongs to: the checkpoint's, else the first ``run_start`` event's; None if new.

        Examples
        --------
        >>> import tempfile
        >>> run = RunDirectory(tempfile.mkdtemp())
        >>> run.recorded_run_id() is None
        True
        >>> run.log_event({"event": "run_start", "run_id": "abc"})
        >>> run.recorded_run_id()
        'abc'
        """
        meta_path = self.checkpoint_path.with_suffix(".json")
        if meta_path.exists():
            try:
                saved = json.loads(meta_path.read_text()).get("run_id")
            except (OSError, ValueError) as exc:
                raise DataError(f"checkpoint in {self.path.name} cannot be read: {exc}") from exc
            if isinstance(saved, str) and saved:
                return saved
        for event in self.events():
            if event.get("event") == "run_start" and isinstance(event.get("run_id"), str):
                return str(event["run_id"])
        return None

    def trim_partial_event(self) -> bool:
        """Drop a last line of ``metrics.jsonl`` cut short by a crash, so appending goes on cleanly.

        Returns
        -------
        bool
            True if a partial line was dropped.

        Examples
        --------
        >>> import tempfile
        >>> run = RunDirectory(tempfile.mkdtemp())
        >>> run.log_event({"event": "round_end", "round": 1})
        >>> with run.metrics_path.open("a") as f:
        ...     _ = f.write('{"event": "round_st')
        >>> run.trim_partial_event(), [e["event"] for e in run.events()]
        (True, ['round_end'])
        """
        path = self.metrics_path
        if not path.exists():
            return False
        with self._lock, path.open("rb+") as handle:
            data = handle.read()
            if not data or data.endswith(b"\n"):
                return False
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def save_checkpoint(
        self,
        *,
        round: int,  # noqa: A002
        parameters: Parameters,
        state: dict[str, Any],
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Replace the checkpoint with the state after ``round``.

        ``strategy_state`` (the strategy's own float64 buffers, e.g. FedOpt's
        moments) goes to its own safetensors file, written first and stamped
        with ``round``, so :meth:`load_strategy_state` can tell a stale one.
        """
        if strategy_state:
            from safetensors.numpy import save

            atomic_write(
                self.strategy_state_path,
                save({name: np.ascontiguousarray(v) for name, v in strategy_state.items()}, metadata={"round": str(round)}),
            )
        else:
            self.strategy_state_path.unlink(missing_ok=True)  # a stale one from an earlier run must not be resumed
        atomic_write(self.checkpoint_path, parameters.to_bytes())
        meta = {"round": round, **state}
        atomic_write(self.checkpoint_path.with_suffix(".json"), json.dumps(_jsonable(meta)).encode())

    def load_checkpoint(self) -> tuple[int, Parameters, dict[str, Any]] | None:
        """The last completed round, its parameters and state; None if there is none.

        Raises
        ------
        DataError
            If a checkpoint exists but cannot be read.
        """
        meta_path = self.checkpoint_path.with_suffix(".json")
        if not meta_path.exists() or not self.checkpoint_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            parameters = Parameters.from_bytes(self.checkpoint_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise DataError(f"checkpoint in {self.path.name} cannot be read: {exc}") from exc
        return int(meta.pop("round")), parameters, meta

    def load_strategy_state(self, *, round: int) -> dict[str, np.ndarray]:  # noqa: A002
        """The strategy's buffers saved with the checkpoint of ``round``; ``{}`` if it saved none.

        Raises
        ------
        DataError
            If the file cannot be read or belongs to another round.
        """
        path = self.strategy_state_path
        if not path.exists():
            return {}
        from safetensors import safe_open

        try:
            # safetensors never unpickles; the header is checked before any array is read.
            with safe_open(str(path), framework="numpy") as reader:
                saved_round = (reader.metadata() or {}).get("round")
                arrays = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise DataError(f"strategy state in {self.path.name} cannot be read: {exc}") from exc
        if saved_round != str(round):
            raise DataError(
                f"strategy state in {self.path.name} is from round {saved_round}, the checkpoint from round {round}; "
                "delete the run directory's checkpoints to start again"
            )
        return arrays

    def save_model(self, parameters: Parameters, card: dict[str, Any]) -> None:
        """Write the final model and its model card."""
        atomic_write(self.model_path, parameters.to_bytes())
        atomic_write(self.model_card_path, json.dumps(_jsonable(card), indent=2).encode())
