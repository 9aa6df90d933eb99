"""Experiment tracking: the coordinator's run events, logged to MLflow.

The plan's ``tracking`` section turns it on (``tracking: mlflow``). The
tracker receives the same events as ``metrics.jsonl`` and logs the plan's
settings as parameters and the aggregate metrics of each round with
``step = round``; at the end of the run it attaches ``plan.yaml``,
``model_card.json`` and ``report.html`` when they exist. Only plan settings
and aggregate numbers leave the run directory: no records, no data paths.

MLflow failures during a run become warnings; tracking never fails a run.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedcare.errors import ConfigError
from fedcare.plan import Plan, plan_hash

__all__ = ["MlflowTracker", "chain_events", "check_tracking", "flatten_plan", "make_tracker", "run_tracked"]

logger = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]
_Result = TypeVar("_Result")

#: Longest parameter value logged, in characters (longer values are cut).
MAX_PARAM_CHARS = 500
#: Plan settings never logged: a tracking URI may carry credentials.
_SECRET_PARAMS = frozenset({"tracking.uri"})
#: MLflow accepts letters, digits and ``_ - . : / space`` in metric and parameter names.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.:/ ]")
_BATCH = 100  # MLflow's limit of parameters per batch


def check_tracking(plan: Plan) -> None:
    """Check that the plan's tracking backend can be imported here.

    Called when a run starts (``simulate``, ``fedcare serve``), not when a
    plan is parsed, so a site without MLflow still reads a plan that asks the
    coordinator to track.

    Raises
    ------
    ConfigError
        At ``plan.tracking`` if the backend is ``mlflow`` and MLflow is not installed.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> check_tracking(parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 1}))
    """
    if plan.tracking is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tracking with mlflow needs MLflow where the run starts, and it is not installed: "
            "pip install 'fedcare[mlflow]'",
            field="plan.tracking",
        ) from None


def flatten_plan(plan: Plan) -> dict[str, str]:
    """The plan's settings as ``{"local.learning_rate": "0.01", ...}``, each value at most 500 characters.

    ``tracking.uri`` is left out (it may carry credentials).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> flat = flatten_plan(parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 2}))
    >>> flat["rounds"], flat["local.learning_rate"], flat["dataset.name"]
    ('2', '0.1', 'x')
    """

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                yield from walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            yield prefix, str(value)[:MAX_PARAM_CHARS]

    return {key: text for key, text in walk("", plan.model_dump(mode="json")) if key not in _SECRET_PARAMS}


def chain_events(*callbacks: EventCallback | None) -> EventCallback | None:
    """One event callback calling each of ``callbacks`` in turn (``None`` entries skipped).

    Examples
    --------
    >>> seen = []
    >>> both = chain_events(lambda e: seen.append(1), None, lambda e: seen.append(2))
    >>> both({"event": "run_end"}); seen
    [1, 2]
    >>> chain_events(None) is None
    True
    """
    present = [callback for callback in callbacks if callback is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def chained(event: dict[str, Any]) -> None:
        for callback in present:
            callback(event)

    return chained


def _name(key: str) -> str:
    return _UNSAFE.sub("_", key)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class MlflowTracker:
    """Logs one fedcare run to MLflow: parameters, per-round metrics, tags and artifacts.

    Parameters
    ----------
    plan : Plan
        The run's plan; ``plan.tracking`` says where to log.
    run_dir : str or Path
        The run directory. The default tracking URI is
        ``sqlite:///RUN_DIR/mlflow.db``, with artifacts in ``RUN_DIR/mlruns``;
        the MLflow run is named after this directory.

    Notes
    -----
    Metrics, each with ``step`` the round: ``train_loss``, ``duration_s``,
    ``num_examples``, ``bytes_up`` and ``bytes_down`` (payload bytes of the
    round's training, summed over sites), ``epsilon.SITE`` (record-level DP
    spent so far), and from each evaluation ``mean.METRIC``,
    ``pooled.METRIC`` and ``site.SITE.METRIC`` (scalars; ROC curve points
    stay in ``metrics.jsonl``). Tags: ``fedcare.version``,
    ``fedcare.plan_hash``, ``fedcare.run_id``.

    Examples
    --------
    >>> import tempfile
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 1,
    ...                    "tracking": "mlflow"})
    >>> tracker = MlflowTracker(plan, tempfile.mkdtemp())
    >>> tracker.tracking_uri.startswith("sqlite:///"), tracker.experiment
    (True, 'fedcare-run')
    """

    def __init__(self, plan: Plan, run_dir: str | Path) -> None:
        self.plan = plan
        self.run_dir = Path(run_dir)
        config = plan.tracking
        self.tracking_uri = (config.uri if config is not None else None) or f"sqlite:///{self.run_dir.resolve() / 'mlflow.db'}"
        self.experiment = (config.experiment if config is not None else None) or plan.name
        self._client: Any = None
        self._run_id: str | None = None
        self._broken = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id, once the run started (``None`` before, or if MLflow failed)."""
        return self._run_id

    def on_event(self, event: dict[str, Any]) -> None:
        """Log what one run event carries; MLflow errors become a warning."""
        if self._broken:
            return
        try:
            kind = event.get("event")
            if kind == "run_start":
                self._start(event)
            elif self._run_id is None:
                return
            elif kind == "round_end":
                self._log_round(event)
            elif kind == "evaluation":
                self._log_evaluation(event)
            elif kind == "normalization":
                self._log_bytes(event, step=0, prefix="normalization.")
        except Exception as exc:  # tracking must never fail the run
            self._broken = True
            logger.warning("MLflow tracking failed; the run goes on untracked", extra={"error_type": type(exc).__name__, "error": str(exc)[:200]})

    def close(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Attach the run's files and end the MLflow run with ``status``; MLflow errors become a warning."""
        if self._run_id is None or self._broken:
            return
        try:
            for name in ("plan.yaml", "model_card.json", "report.html"):
                path = self.run_dir / name
                if path.is_file():
                    self._client.log_artifact(self._run_id, str(path))
            self._client.set_terminated(self._run_id, status=status)
        except Exception as exc:
            logger.warning("MLflow tracking failed at the end of the run", extra={"error_type": type(exc).__name__, "error": str(exc)[:200]})
        finally:
            self._run_id = None

    # -- internals -------------------------------------------------------------

    def _start(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from fedcare import __version__

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            remote = self.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks")
            # Without an artifact location MLflow would write ./mlruns in the current directory.
            location = None if remote else (self.run_dir.resolve() / "mlruns").as_uri()
            experiment_id = client.create_experiment(self.experiment, artifact_location=location)
        tags = {
            "fedcare.version": __version__,
            "fedcare.plan_hash": str(event.get("plan_hash") or plan_hash(self.plan)),
            "fedcare.run_id": str(event.get("run_id", "")),
        }
        run = client.create_run(experiment_id, tags=tags, run_name=self.run_dir.name)
        self._client, self._run_id = client, run.info.run_id
        params = [Param(_name(key), value) for key, value in flatten_plan(self.plan).items()]
        for start in range(0, len(params), _BATCH):
            client.log_batch(self._run_id, params=params[start : start + _BATCH])

    def _log(self, values: Mapping[str, Any], *, step: int, time_s: float) -> None:
        from mlflow.entities import Metric

        timestamp = int(time_s * 1000)
        metrics = [
            Metric(_name(key), number, timestamp, step)
            for key, value in values.items()
            if (number := _finite(value)) is not None
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's limit of metrics per batch
            self._client.log_batch(self._run_id, metrics=metrics[start : start + 1000])

    def _log_round(self, event: dict[str, Any]) -> None:
        values: dict[str, Any] = {name: event.get(name) for name in ("train_loss", "duration_s", "num_examples")}
        values.update({f"epsilon.{site}": spent for site, spent in (event.get("dp_epsilon") or {}).items()})
        values.update(_bytes(event, prefix=""))
        self._log(values, step=int(event["round"]), time_s=float(event.get("time", 0.0)))

    def _log_evaluation(self, event: dict[str, Any]) -> None:
        from fedcare.metrics import split_curves

        values: dict[str, Any] = {}
        for group in ("mean", "pooled"):
            scalars, _ = split_curves(event.get(group) or {})
            values.update({f"{group}.{name}": value for name, value in scalars.items()})
        for site, metrics in (event.get("sites") or {}).items():
            scalars, _ = split_curves(metrics)
            values.update({f"site.{site}.{name}": value for name, value in scalars.items()})
        values.update(_bytes(event, prefix="evaluation."))
        self._log(values, step=int(event["round"]), time_s=float(event.get("time", 0.0)))

    def _log_bytes(self, event: dict[str, Any], *, step: int, prefix: str) -> None:
        self._log(_bytes(event, prefix=prefix), step=step, time_s=float(event.get("time", 0.0)))


def _bytes(event: Mapping[str, Any], *, prefix: str) -> dict[str, int]:
    """Payload bytes an event reports, summed over sites: ``{prefix}bytes_up``, ``{prefix}bytes_down``."""
    traffic = event.get("bytes")
    if not isinstance(traffic, Mapping) or not traffic:
        return {}
    return {
        f"{prefix}bytes_up": sum(int(counts.get("up", 0)) for counts in traffic.values()),
        f"{prefix}bytes_down": sum(int(counts.get("down", 0)) for counts in traffic.values()),
    }


def make_tracker(plan: Plan, run_dir: str | Path | None) -> MlflowTracker | None:
    """The tracker ``plan.tracking`` asks for, or ``None`` when the plan tracks nothing.

    Raises
    ------
    ConfigError
        At ``plan.tracking`` if MLflow is missing, or there is neither a run
        directory nor ``plan.tracking.uri`` to track to.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> make_tracker(parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 1}), None) is None
    True
    """
    if plan.tracking is None:
        return None
    check_tracking(plan)
    if run_dir is None:
        if plan.tracking.uri is None:
            raise ConfigError(
                "the default tracking store lives in the run directory; give the run a directory or set "
                "plan.tracking.uri",
                field="plan.tracking",
            )
        import tempfile

        run_dir = tempfile.mkdtemp(prefix="fedcare-tracking-")  # for the artifacts it uploads; none are written
    return MlflowTracker(plan, run_dir)


def run_tracked(tracker: MlflowTracker | None, run: Callable[[], _Result]) -> _Result:
    """``run()``, then end the tracker's run: ``FINISHED``, ``FAILED`` (an error) or ``KILLED`` (Ctrl-C).

    The tracker must already receive the run's events (chain its
    :meth:`MlflowTracker.on_event` into the coordinator's). Without a
    tracker this is ``run()``.

    Examples
    --------
    >>> run_tracked(None, lambda: 42)
    42
    """
    if tracker is None:
        return run()
    try:
        result = run()
    except KeyboardInterrupt:
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
    return result
