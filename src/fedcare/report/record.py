"""A run folded from its event log: what the report and the dashboard show.

:class:`RunRecord` reads the events a run appended to ``metrics.jsonl`` (see
:class:`fedcare.federation.rundir.RunDirectory`), the validated plan and, once
the run completed, the model card. Unknown events are ignored, so newer runs
still fold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcare.errors import DataError
from fedcare.report._values import as_float, as_mapping

__all__ = [
    "PARTICIPATION_STATES",
    "FinalEvaluation",
    "Participation",
    "Problem",
    "RunRecord",
    "RunStatus",
    "Traffic",
    "read_events",
]

#: What a site did in one round.
Participation = Literal["trained", "failed", "late", "not selected", "refused", "pending"]

#: Every participation state, in the order the report's legend lists them.
PARTICIPATION_STATES: tuple[Participation, ...] = ("trained", "failed", "late", "not selected", "refused", "pending")

#: ``completed``: the run ended after its last round; ``failed``: a round ended short;
#: ``incomplete``: the log stops early (still running, or stopped without a word).
RunStatus = Literal["completed", "incomplete", "failed"]


@dataclass(frozen=True)
class Traffic:
    """Payload bytes sent to (``down``) and received from (``up``) one site.

    Examples
    --------
    >>> Traffic(down=10, up=4) + Traffic(down=1, up=1)
    Traffic(down=11, up=5)
    """

    down: int = 0
    up: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(down=self.down + other.down, up=self.up + other.up)

    @property
    def total(self) -> int:
        """Bytes both ways."""
        return self.down + self.up


@dataclass(frozen=True)
class Problem:
    """A site that did not do what was asked: failed, late, refused, rejected or pending.

    Attributes
    ----------
    round : int or None
        The round (1-based; 0 for the feature statistics); None before any round.
    node_id : str or None
        The site; None when the coordinator refused a connection it could not name.
    state : str
        ``failed``, ``late``, ``refused``, ``rejected`` or ``pending``.
    reason : str
        What the coordinator or the site said (network text: escape before showing it).
    kind : str or None
        The job kind that failed (``train``, ``evaluate``, ...), when known.

    Examples
    --------
    >>> Problem(round=2, node_id="hungary", state="late", reason="no answer before the round deadline").state
    'late'
    """

    round: int | None
    node_id: str | None
    state: str
    reason: str
    kind: str | None = None


@dataclass(frozen=True)
class FinalEvaluation:
    """The last evaluation of the run.

    Attributes
    ----------
    round : int
    sites : dict of str to dict of str to float
        Each site's scalar metrics (NaN where a site reported none).
    examples : dict of str to int
        Each site's number of test examples.
    mean : dict of str to float
        The unweighted mean of the sites' scalar metrics.
    pooled : dict of str to float
        The example-weighted (pooled) scalar metrics.
    roc : dict of str to list of float
        Each site's ROC curve: the TPR at each point of
        :data:`fedcare.metrics.ROC_FPR_GRID` (binary tasks only).

    Examples
    --------
    >>> final = FinalEvaluation(round=3, sites={"a": {"accuracy": 0.5}}, examples={"a": 10}, mean={}, pooled={}, roc={})
    >>> final.sites["a"]["accuracy"]
    0.5
    """

    round: int
    sites: dict[str, dict[str, float]]
    examples: dict[str, int]
    mean: dict[str, float]
    pooled: dict[str, float]
    roc: dict[str, list[float]]


def read_events(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The events of a ``metrics.jsonl`` file, and notes on what was skipped.

    A last line cut short (the run stopped while writing it) is skipped and
    noted; a malformed line anywhere else is an error.

    Parameters
    ----------
    path : Path
        The ``metrics.jsonl`` file.

    Returns
    -------
    (list of dict, list of str)
        The events in file order, and notes for the report.

    Raises
    ------
    DataError
        If the file is missing or unreadable, or a line before the last one is
        not a JSON object; the message names the file and the line number.

    Examples
    --------
    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> _ = log.write_text('{"event": "round_start", "round": 1}\\n{"event": "round_e')
    >>> events, notes = read_events(log)
    >>> [e["event"] for e in events], len(notes)
    (['round_start'], 1)
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"the run directory {path.parent.name!r} has no {path.name}: it is not a fedcare run directory, "
            "or the run has not started"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} in {path.parent.name!r} cannot be read: {exc}") from None
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    events: list[dict[str, Any]] = []
    notes: list[str] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if index == last:
                notes.append(
                    f"the last line of {path.name} (line {index + 1}) is incomplete, as when a run stops while "
                    "writing it; it was skipped"
                )
                continue
            raise DataError(
                f"{path.name} line {index + 1} is not valid JSON ({exc.msg}); only the last line may be cut "
                "short: repair or remove that line"
            ) from None
        if not isinstance(event, dict):
            raise DataError(
                f"{path.name} line {index + 1} holds a JSON {type(event).__name__}, not an event object; "
                "repair or remove that line"
            )
        events.append(event)
    return events, notes


@dataclass(frozen=True)
class RunRecord:
    """One run as the report shows it, folded from its events.

    Build it with :meth:`from_events` or :meth:`from_run_dir`; treat its
    mappings as read-only. Rounds are 1-based; round 0 is the federated feature
    statistics (normalization).

    Attributes
    ----------
    run_id : str or None
    plan_name, task, dataset, strategy : str or None
        From the plan (or the model card when there is no plan).
    rounds_planned : int or None
    rounds_completed : int
    status : {"completed", "incomplete", "failed"}
    wall_s : float or None
        Wall time in seconds: from ``run_end``, else from the first to the last event.
    started_at : float or None
        Unix time of the first event.
    sites : tuple of str
        Every site the log names, in the order the coordinator listed them.
    resumed_at : tuple of int
        The first round of each resumption (a second ``run_start``).
    train_loss : dict of int to float
        The global (example-weighted) training loss per round; NaN when not
        reported (under secure aggregation the sites' losses stay hidden).
    duration_s : dict of int to float
        Each round's training time in seconds.
    evaluations : dict of int to dict of str to dict of str to float
        Per evaluated round, each site's scalar metrics.
    evaluation_mean : dict of int to dict of str to float
        Per evaluated round, the mean of the sites' scalar metrics.
    final : FinalEvaluation or None
        The last evaluation.
    epsilon : dict of str to dict of int to float
        Per site, the record-level epsilon spent so far after each round.
    site_level_epsilon : dict of int to float
        With site-level DP, the epsilon of the whole federation after each round.
    participation : dict of int to dict of str to Participation
        Per round, what each site did.
    problems : tuple of Problem
        Failures, stragglers, refusals, rejections and pending approvals, in log order.
    traffic : dict of int to dict of str to Traffic
        Payload bytes per round (0: feature statistics; a round's evaluation
        counts toward it) and site. Bytes of a round redone after a resumption
        are added to the first attempt's.
    plan_summary : tuple of (str, str)
        The plan in plain words: (label, sentence) pairs.
    plan : dict or None
        The validated plan as read.
    privacy : dict or None
        The model card's ``privacy`` block.
    data_leaving_sites : str
        What left the sites, in plain words.
    notes : tuple of str
        What the reader should know about the log (a skipped last line, a resumption).

    Examples
    --------
    >>> record = RunRecord.from_events([
    ...     {"time": 0.0, "event": "run_start", "run_id": "r1", "nodes": ["a", "b"], "rounds": 1, "first_round": 1},
    ...     {"time": 0.1, "event": "round_start", "round": 1, "nodes": ["a", "b"]},
    ...     {"time": 0.9, "event": "node_failed", "round": 1, "node_id": "b", "kind": "train", "error": "out of memory"},
    ...     {"time": 1.0, "event": "round_end", "round": 1, "nodes_ok": ["a"], "nodes_failed": ["b"],
    ...      "train_loss": 0.5, "duration_s": 0.9, "bytes": {"a": {"down": 10, "up": 8}, "b": {"down": 10, "up": 0}}},
    ...     {"time": 1.1, "event": "run_end", "rounds_completed": 1, "wall_s": 1.1},
    ... ])
    >>> record.status, record.participation[1]
    ('completed', {'a': 'trained', 'b': 'failed'})
    >>> record.total_traffic()["b"]
    Traffic(down=10, up=0)
    """

    run_id: str | None
    plan_name: str | None
    task: str | None
    dataset: str | None
    strategy: str | None
    rounds_planned: int | None
    rounds_completed: int
    status: RunStatus
    wall_s: float | None
    started_at: float | None
    sites: tuple[str, ...]
    resumed_at: tuple[int, ...]
    train_loss: dict[int, float]
    duration_s: dict[int, float]
    evaluations: dict[int, dict[str, dict[str, float]]]
    evaluation_mean: dict[int, dict[str, float]]
    final: FinalEvaluation | None
    epsilon: dict[str, dict[int, float]]
    site_level_epsilon: dict[int, float]
    participation: dict[int, dict[str, Participation]]
    problems: tuple[Problem, ...]
    traffic: dict[int, dict[str, Traffic]]
    plan_summary: tuple[tuple[str, str], ...]
    plan: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    data_leaving_sites: str = ""
    notes: tuple[str, ...] = field(default=())

    # -- derived views ------------------------------------------------------------

    @property
    def main_metric(self) -> str:
        """``c_index`` for survival tasks, else ``accuracy``.

        Examples
        --------
        >>> RunRecord.from_events([], plan={"task": "tabular-cox", "rounds": 1}).main_metric
        'c_index'
        """
        if self.task == "tabular-cox":
            return "c_index"
        for sites in self.evaluations.values():
            if any("c_index" in metrics for metrics in sites.values()):
                return "c_index"
        return "accuracy"

    @property
    def secure_aggregation(self) -> bool:
        """Whether the plan turned secure aggregation on."""
        return bool(as_mapping(as_mapping(self.plan).get("secure_aggregation")).get("enabled", False)) or bool(
            as_mapping(self.privacy).get("secure_aggregation", False)
        )

    @property
    def planned_epsilon(self) -> float | None:
        """The record-level epsilon each site may spend on the run, when record-level DP is on."""
        record_level = as_mapping(as_mapping(as_mapping(self.plan).get("privacy")).get("record_level"))
        if record_level.get("enabled"):
            value = as_float(record_level.get("epsilon"))
            return value if math.isfinite(value) else None
        return None

    def final_epsilon(self) -> dict[str, float]:
        """Each site's record-level epsilon spent by the end of the log.

        Returns
        -------
        dict of str to float
            Empty when record-level DP is off. The model card's figure wins
            over the last round's when both exist.

        Examples
        --------
        >>> RunRecord.from_events([]).final_epsilon()
        {}
        """
        spent = {site: rounds[max(rounds)] for site, rounds in self.epsilon.items() if rounds}
        card = as_mapping(as_mapping(as_mapping(as_mapping(self.privacy).get("differential_privacy")).get("record_level")))
        for site, value in as_mapping(card.get("epsilon_spent")).items():
            number = as_float(value)
            if math.isfinite(number):
                spent[str(site)] = number
        return {site: spent[site] for site in self._ordered(spent)}

    def total_traffic(self) -> dict[str, Traffic]:
        """Payload bytes to and from each site over the whole run, feature statistics included.

        Examples
        --------
        >>> RunRecord.from_events([]).total_traffic()
        {}
        """
        totals: dict[str, Traffic] = {}
        for sites in self.traffic.values():
            for site, traffic in sites.items():
                totals[site] = totals.get(site, Traffic()) + traffic
        return {site: totals[site] for site in self._ordered(totals)}

    def _ordered(self, names: Iterable[str]) -> list[str]:
        position = {site: i for i, site in enumerate(self.sites)}
        return sorted(names, key=lambda s: (position.get(s, len(position)), s))

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_run_dir(cls, path: str | Path) -> RunRecord:
        """Fold a run directory: ``metrics.jsonl``, ``plan.yaml`` and ``model_card.json`` when present.

        Parameters
        ----------
        path : str or Path
            The run directory.

        Returns
        -------
        RunRecord

        Raises
        ------
        DataError
            If the directory or its ``metrics.jsonl`` is missing, a line of the
            log before the last is malformed (the message gives its number), or
            ``plan.yaml`` / ``model_card.json`` cannot be parsed.

        Examples
        --------
        >>> import tempfile
        >>> RunRecord.from_run_dir(Path(tempfile.mkdtemp()) / "nowhere")
        Traceback (most recent call last):
        ...
        fedcare.errors.DataError: there is no run directory 'nowhere'; give the directory a run wrote (its --out)
        """
        run_dir = Path(path)
        if not run_dir.is_dir():
            raise DataError(f"there is no run directory {run_dir.name!r}; give the directory a run wrote (its --out)")
        events, notes = read_events(run_dir / "metrics.jsonl")
        plan: dict[str, Any] | None = None
        plan_path = run_dir / "plan.yaml"
        if plan_path.exists():
            import yaml

            try:
                loaded = yaml.safe_load(plan_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise DataError(f"plan.yaml in {run_dir.name!r} cannot be read: {exc}") from None
            if not isinstance(loaded, dict):
                raise DataError(f"plan.yaml in {run_dir.name!r} holds a {type(loaded).__name__}, not a plan mapping")
            plan = loaded
        card: dict[str, Any] | None = None
        card_path = run_dir / "model_card.json"
        if card_path.exists():
            try:
                loaded_card = json.loads(card_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"model_card.json in {run_dir.name!r} cannot be read: {exc}") from None
            card = loaded_card if isinstance(loaded_card, dict) else None
        return cls.from_events(events, plan=plan, card=card, notes=notes)

    @classmethod
    def from_events(
        cls,
        events: Iterable[Mapping[str, Any]],
        *,
        plan: Mapping[str, Any] | None = None,
        card: Mapping[str, Any] | None = None,
        notes: Sequence[str] = (),
    ) -> RunRecord:
        """Fold run events (as logged in ``metrics.jsonl``) into a record.

        Parameters
        ----------
        events : iterable of mapping
            The events in log order; unknown events are ignored.
        plan : mapping, optional
            The validated plan as a mapping (``plan.yaml``).
        card : mapping, optional
            The model card (``model_card.json``), present once the run completed.
        notes : sequence of str
            Notes to carry into the report, e.g. from :func:`read_events`.

        Returns
        -------
        RunRecord

        Examples
        --------
        >>> record = RunRecord.from_events(
        ...     [{"time": 5.0, "event": "run_start", "run_id": "r", "nodes": ["a"], "rounds": 3, "first_round": 1},
        ...      {"time": 6.0, "event": "round_start", "round": 1, "nodes": ["a"]}],
        ...     plan={"name": "demo", "task": "tabular-logistic", "rounds": 3})
        >>> record.status, record.rounds_completed, record.participation[1]
        ('incomplete', 0, {'a': 'pending'})
        """
        from fedcare.report._fold import _Folder

        folder = _Folder()
        for event in events:
            folder.fold(event)
        return folder.record(dict(plan) if plan is not None else None, dict(card) if card is not None else None, notes)
