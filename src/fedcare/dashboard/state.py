"""What the dashboard shows: a thread-safe fold of the coordinator's run events.

:class:`LiveState` takes each event the coordinator logs (the dicts of
``metrics.jsonl``) through :meth:`LiveState.on_event` and keeps a small summary
(round, phase, nodes, latest metrics, epsilon, failures, traffic) that
:meth:`LiveState.snapshot` returns as plain JSON-able data. It also keeps the
recent events themselves (bounded) for the plots.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from fedcare.errors import ConfigError
from fedcare.metrics import split_curves
from fedcare.plan import Plan

__all__ = ["MAX_FAILURES", "Phase", "LiveState"]

logger = logging.getLogger(__name__)

#: The phases a run goes through, as the dashboard names them.
Phase = Literal["starting", "waiting for approval", "normalization", "training", "evaluation", "finished", "failed"]

#: How many of the latest failures a snapshot lists.
MAX_FAILURES: Final = 50

_MAX_HISTORY: Final = 10_000


def _jsonable(value: Any) -> Any:
    """A deep copy of ``value`` made of JSON types only; NaN and Inf become None, like ``metrics.jsonl``."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    try:  # numpy scalars and the like
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _scalars(metrics: Any) -> dict[str, float | None]:
    """The scalar metrics of one site's evaluation, curve points left out."""
    if not isinstance(metrics, Mapping):
        return {}
    values: dict[str, float | None] = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[str(name)] = float(value) if math.isfinite(value) else None
        elif value is None:  # NaN, as metrics.jsonl writes it
            values[str(name)] = None
    scalar_names, _ = split_curves({name: 0.0 for name in values})
    return {name: values[name] for name in sorted(scalar_names)}


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _names(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    return []


class LiveState:
    """The live state of one run, folded from the coordinator's events.

    Thread-safe: events may arrive from several threads while HTTP handlers
    read snapshots.

    Parameters
    ----------
    plan : Plan, optional
        The plan being run: its name, task, rounds and privacy settings show
        before the first event arrives.
    nodes_online : callable, optional
        Returns the identifiers of the nodes reachable now (the transport's
        ``nodes``). Without it a node's ``online`` is None (unknown).
    statuses : callable, optional
        Returns each node's answer to the plan, ``{node: (status, reason)}``
        (the transport's ``statuses``). It overrides what the events said.
    max_events : int, default 100_000
        How many of the latest events are kept for :meth:`events` and plots.

    Examples
    --------
    >>> state = LiveState()
    >>> state.on_event({"time": 0.0, "event": "run_start", "run_id": "r1", "nodes": ["a", "b"],
    ...                 "rounds": 3, "first_round": 1})
    >>> state.on_event({"time": 1.0, "event": "round_start", "round": 1, "nodes": ["a", "b"]})
    >>> snap = state.snapshot()
    >>> snap["round"], snap["rounds_planned"], snap["phase"], [n["id"] for n in snap["nodes"]]
    (1, 3, 'training', ['a', 'b'])
    """

    def __init__(
        self,
        plan: Plan | None = None,
        *,
        nodes_online: Callable[[], list[str]] | None = None,
        statuses: Callable[[], dict[str, tuple[str, str]]] | None = None,
        max_events: int = 100_000,
    ) -> None:
        if max_events < 1:
            raise ConfigError(f"must be >= 1, got {max_events}", field="dashboard.max_events")
        self.plan = plan
        self.nodes_online = nodes_online
        self.statuses = statuses
        self._lock = threading.Lock()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self._seen = 0
        self._run_id: str | None = None
        self._plan_hash: str | None = None
        self._rounds: int | None = plan.rounds if plan is not None else None
        self._first_round = 1
        self._round: int | None = None
        self._rounds_completed = 0
        self._phase: Phase = "starting"
        self._failed_reason: str | None = None
        self._normalized = False
        self._approval_pending = False
        self._node_ids: set[str] = set(plan.nodes or ()) if plan is not None else set()
        self._answers: dict[str, tuple[str, str]] = {}
        self._last_trained: dict[str, int] = {}
        self._latest_round: int | None = None
        self._latest_sites: dict[str, dict[str, float | None]] = {}
        self._latest_mean: dict[str, float | None] = {}
        self._latest_pooled: dict[str, float | None] = {}
        self._latest_examples: dict[str, int] = {}
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_HISTORY)
        self._training: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_HISTORY)
        self._epsilon: dict[str, float | None] = {}
        self._site_level_epsilon: float | None = None
        self._failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_FAILURES)
        self._bytes: dict[str, dict[str, int]] = {}
        self._started_at: float | None = None
        self._ended_at: float | None = None

    # -- input -----------------------------------------------------------------

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Fold one run event in; usable directly as the coordinator's ``on_event``.

        Unknown events are kept (for :meth:`events`) but change nothing else.
        The event is copied; the caller's dict is never changed.

        Parameters
        ----------
        event : mapping
            One event as the coordinator logs it, with ``time`` (Unix seconds)
            and ``event`` (its kind).

        Examples
        --------
        >>> state = LiveState()
        >>> state.on_event({"time": 5.0, "event": "something_new"})
        >>> state.snapshot()["events_seen"], state.snapshot()["phase"]
        (1, 'starting')
        """
        copied = _jsonable(event)
        if not isinstance(copied, dict):
            return
        with self._lock:
            self._events.append(copied)
            self._seen += 1
            try:
                self._fold(copied)
            except (TypeError, ValueError, AttributeError, KeyError):
                # A malformed event must not stop the run that reports it.
                logger.warning("dashboard ignored a malformed event", extra={"event_kind": str(copied.get("event"))})

    def mark_failed(self, reason: str) -> None:
        """Show the run as failed, e.g. when the coordinator raised before logging why.

        Parameters
        ----------
        reason : str
            What went wrong, shown to the dashboard's readers (no patient data).

        Examples
        --------
        >>> state = LiveState()
        >>> state.mark_failed("only 1 site approved the plan")
        >>> state.snapshot()["phase"], state.snapshot()["failures"][-1]["error"]
        ('failed', 'only 1 site approved the plan')
        """
        with self._lock:
            self._phase = "failed"
            self._failed_reason = reason
            self._ended_at = time.time()
            self._failures.append({"time": self._ended_at, "round": self._round, "node_id": None, "kind": "run", "error": reason})

    def _fold(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        stamp = event.get("time")
        when = float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else time.time()
        if kind == "run_start":
            self._run_id = str(event["run_id"]) if event.get("run_id") is not None else None
            self._plan_hash = str(event["plan_hash"]) if event.get("plan_hash") is not None else None
            self._rounds = _as_int(event.get("rounds")) or self._rounds
            self._first_round = _as_int(event.get("first_round")) or 1
            self._node_ids.update(_names(event.get("nodes")))
            self._started_at = when
            self._ended_at = None
            self._failed_reason = None
            self._rounds_completed = self._first_round - 1
            self._phase = self._before_rounds()
        elif kind == "approval":
            answers: dict[str, tuple[str, str]] = {}
            for status in ("approved", "pending"):
                answers.update({node: (status, "") for node in _names(event.get(status))})
            for status in ("rejected", "refused"):
                reasons = event.get(status)
                if isinstance(reasons, Mapping):
                    answers.update({str(node): (status, str(reason or "")) for node, reason in reasons.items()})
            self._answers.update(answers)
            self._node_ids.update(answers)
            self._approval_pending = bool(_names(event.get("pending")))
            if self._phase in ("starting", "waiting for approval", "normalization"):
                self._phase = self._before_rounds()
        elif kind == "node_refused":
            node = str(event.get("node_id") or "unknown")
            detail = str(event.get("detail") or event.get("reason") or "refused")
            self._answers[node] = ("refused", detail)
            self._node_ids.add(node)
            self._failure(when, None, node, "admission", detail)
        elif kind == "normalization":
            self._normalized = True
            self._add_bytes(event.get("bytes"))
            if self._phase == "normalization":
                self._phase = "starting"
        elif kind == "round_start":
            self._round = _as_int(event.get("round"))
            self._node_ids.update(_names(event.get("nodes")))
            self._phase = "training"
        elif kind == "round_end":
            number = _as_int(event.get("round"))
            self._round = number if number is not None else self._round
            if number is not None:
                self._rounds_completed = max(self._rounds_completed, number)
                for node in _names(event.get("nodes_ok")):
                    self._last_trained[node] = number
            self._node_ids.update(_names(event.get("nodes_ok")) + _names(event.get("nodes_failed")))
            self._add_bytes(event.get("bytes"))
            epsilon = event.get("dp_epsilon")
            if isinstance(epsilon, Mapping):
                self._epsilon.update(
                    {str(n): (float(e) if isinstance(e, (int, float)) else None) for n, e in epsilon.items()}
                )
            site_level = event.get("site_level_dp")
            if isinstance(site_level, Mapping) and isinstance(site_level.get("epsilon"), (int, float)):
                self._site_level_epsilon = float(site_level["epsilon"])
            loss = event.get("train_loss")
            duration = event.get("duration_s")
            self._training.append(
                {
                    "round": number,
                    "nodes_ok": _names(event.get("nodes_ok")),
                    "nodes_failed": _names(event.get("nodes_failed")),
                    "train_loss": float(loss) if isinstance(loss, (int, float)) else None,
                    "duration_s": float(duration) if isinstance(duration, (int, float)) else None,
                }
            )
        elif kind == "round_failed":
            number = _as_int(event.get("round"))
            secure_detail = event.get("secure_aggregation")
            message = f"round failed: {secure_detail}" if secure_detail else "round failed: too few nodes completed it"
            self._failure(when, number, None, "round", message)
            self._phase = "failed"
            self._failed_reason = message
            self._ended_at = when
        elif kind == "phase":
            if event.get("phase") == "evaluation":
                self._phase = "evaluation"
                self._round = _as_int(event.get("round")) or self._round
        elif kind == "evaluation":
            number = _as_int(event.get("round"))
            sites_in = event.get("sites")
            sites = (
                {str(site): _scalars(metrics) for site, metrics in sorted(sites_in.items())}
                if isinstance(sites_in, Mapping)
                else {}
            )
            self._latest_round = number
            self._latest_sites.update(sites)
            self._latest_mean = _scalars(event.get("mean"))
            self._latest_pooled = _scalars(event.get("pooled"))
            examples = event.get("examples")
            if isinstance(examples, Mapping):
                self._latest_examples.update({str(s): int(n) for s, n in examples.items() if isinstance(n, int)})
            self._node_ids.update(sites)
            self._add_bytes(event.get("bytes"))
            self._history.append({"round": number, "sites": sites, "mean": self._latest_mean})
        elif kind == "node_failed":
            error = str(event.get("error") or "failed")
            job = event.get("kind")
            self._failure(when, _as_int(event.get("round")), event.get("node_id"), str(job) if job else "job", error)
        elif kind == "node_late":
            self._failure(
                when, _as_int(event.get("round")), event.get("node_id"), "late", "no answer before the round deadline"
            )
        elif kind == "run_end":
            completed = _as_int(event.get("rounds_completed"))
            if completed is not None:
                self._rounds_completed = completed
            self._phase = "finished"
            self._ended_at = when

    def _before_rounds(self) -> Phase:
        """The phase between ``run_start`` and round 1's ``round_start``."""
        if self._approval_pending:
            return "waiting for approval"
        federated = self.plan is not None and self.plan.dataset.normalization == "federated"
        if federated and not self._normalized and self._first_round == 1:
            return "normalization"
        return "starting"

    def _failure(self, when: float, round_number: int | None, node: Any, kind: str, error: str) -> None:
        node_id = str(node) if node is not None else None
        if node_id is not None:
            self._node_ids.add(node_id)
        self._failures.append({"time": when, "round": round_number, "node_id": node_id, "kind": kind, "error": error})

    def _add_bytes(self, traffic: Any) -> None:
        if not isinstance(traffic, Mapping):
            return
        for node, counts in traffic.items():
            if not isinstance(counts, Mapping):
                continue
            total = self._bytes.setdefault(str(node), {"down": 0, "up": 0})
            for direction in ("down", "up"):
                value = counts.get(direction)
                if isinstance(value, int) and not isinstance(value, bool):
                    total[direction] += value

    # -- output ----------------------------------------------------------------

    @property
    def events_seen(self) -> int:
        """How many events have arrived since the state was made (including dropped ones)."""
        with self._lock:
            return self._seen

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The events from number ``since`` on (0-based, in arrival order), as JSON-able copies.

        Only the latest ``max_events`` are kept: older ones are gone.

        Parameters
        ----------
        since : int, default 0
            The number of events the caller has already seen.

        Returns
        -------
        list of dict
            The events numbered ``since`` and later that are still kept.

        Examples
        --------
        >>> state = LiveState()
        >>> for second in range(3):
        ...     state.on_event({"time": float(second), "event": "heartbeat"})
        >>> [e["time"] for e in state.events(1)]
        [1.0, 2.0]
        """
        return copy.deepcopy(self._window(since, None)[1])

    def _window(self, since: int, limit: int | None) -> tuple[int, list[dict[str, Any]], int]:
        """The number of the first event returned, up to ``limit`` events from ``since`` on, and the events seen.

        The events are the kept dicts themselves, not copies: never change them.
        """
        with self._lock:
            first_kept = self._seen - len(self._events)
            first = min(max(since, first_kept), self._seen)
            start = first - first_kept
            stop = len(self._events) if limit is None else min(len(self._events), start + limit)
            chosen = list(itertools.islice(self._events, start, stop))
            return first, chosen, self._seen

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's view of the run now, as plain JSON-able data.

        Calls ``nodes_online`` and ``statuses`` (outside the lock); if one
        raises, its answer counts as unknown.

        Returns
        -------
        dict
            See ``docs/dashboard.md`` for every key. Non-finite metrics are
            None; times are Unix seconds.

        Examples
        --------
        >>> state = LiveState(nodes_online=lambda: ["a"], statuses=lambda: {"b": ("pending", "")})
        >>> state.on_event({"time": 0.0, "event": "run_start", "run_id": "r", "nodes": ["a", "b"],
        ...                 "rounds": 2, "first_round": 1})
        >>> [(n["id"], n["online"], n["status"]) for n in state.snapshot()["nodes"]]
        [('a', True, 'approved'), ('b', False, 'pending')]
        """
        online = self._call(self.nodes_online, "nodes_online")
        live_statuses = self._call(self.statuses, "statuses")
        online_set = {str(n) for n in online} if isinstance(online, (list, tuple, set, frozenset)) else None
        status_map: dict[str, tuple[str, str]] = {}
        if isinstance(live_statuses, Mapping):
            for node, answer in live_statuses.items():
                if isinstance(answer, (list, tuple)) and len(answer) == 2:
                    status_map[str(node)] = (str(answer[0]), str(answer[1] or ""))
        plan = self.plan
        with self._lock:
            node_ids = set(self._node_ids) | set(status_map) | (online_set or set())
            nodes = []
            for node in sorted(node_ids):
                status, reason = status_map.get(node) or self._answers.get(node) or ("approved", "")
                nodes.append(
                    {
                        "id": node,
                        "online": (node in online_set) if online_set is not None else None,
                        "status": status,
                        "reason": reason,
                        "last_round_trained": self._last_trained.get(node),
                    }
                )
            end = self._ended_at if self._ended_at is not None else time.time()
            record_level = plan.privacy.record_level if plan is not None else None
            snap: dict[str, Any] = {
                "run_id": self._run_id,
                "plan_name": plan.name if plan is not None else None,
                "plan_hash": self._plan_hash,
                "task": plan.task if plan is not None else None,
                "rounds_planned": self._rounds,
                "round": self._round,
                "rounds_completed": self._rounds_completed,
                "phase": self._phase,
                "failed_reason": self._failed_reason,
                "started_at": self._started_at,
                "elapsed_s": max(0.0, end - self._started_at) if self._started_at is not None else 0.0,
                "nodes": nodes,
                "metrics": {
                    "round": self._latest_round,
                    "sites": {s: dict(m) for s, m in sorted(self._latest_sites.items())},
                    "mean": dict(self._latest_mean),
                    "pooled": dict(self._latest_pooled),
                    "examples": dict(sorted(self._latest_examples.items())),
                },
                "history": [
                    {"round": h["round"], "sites": {s: dict(m) for s, m in h["sites"].items()}, "mean": dict(h["mean"])}
                    for h in self._history
                ],
                "training": [dict(t) for t in self._training],
                "privacy": {
                    "record_level": bool(record_level is not None and record_level.enabled),
                    "epsilon_planned": (
                        record_level.epsilon if record_level is not None and record_level.enabled else None
                    ),
                    "delta": record_level.delta if record_level is not None and record_level.enabled else None,
                    "epsilon_spent": dict(sorted(self._epsilon.items())),
                    "site_level_epsilon": self._site_level_epsilon,
                },
                "failures": [dict(f) for f in self._failures],
                "bytes": {
                    "down": sum(c["down"] for c in self._bytes.values()),
                    "up": sum(c["up"] for c in self._bytes.values()),
                    "nodes": {n: dict(c) for n, c in sorted(self._bytes.items())},
                },
                "events_seen": self._seen,
            }
        result: dict[str, Any] = _jsonable(snap)
        return result

    @staticmethod
    def _call(function: Callable[[], Any] | None, name: str) -> Any:
        if function is None:
            return None
        try:
            return function()
        except Exception:  # a transport that cannot answer must not break the page
            logger.debug("dashboard could not ask the transport", extra={"callable": name})
            return None
