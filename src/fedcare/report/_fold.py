"""One pass over a run's events, building a :class:`~fedcare.report.record.RunRecord`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedcare.metrics import split_curves
from fedcare.report._values import as_float, as_int, as_mapping, as_names, event_round
from fedcare.report.record import FinalEvaluation, Participation, Problem, RunRecord, RunStatus, Traffic
from fedcare.report.summary import data_leaving_sites, plan_summary


#: Job kinds whose failure means the site did not train in the round (secagg: a later phase of a secure round).
_TRAINING_KINDS = (None, "train", "secagg")
_JOB_KINDS = ("feature-stats", "train", "evaluate", "secagg")


def _job_kind(job_id: Any, round_number: int | None) -> str | None:
    """The kind in a job id ``ROUND-KIND-NODE-HEX``, or None when the id does not read so."""
    if not isinstance(job_id, str) or round_number is None:
        return None
    rest = job_id.removeprefix(f"{round_number}-")
    return next((kind for kind in _JOB_KINDS if rest.startswith(f"{kind}-")), None)


class _Folder:
    """The mutable state of one pass over the events."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.rounds_planned: int | None = None
        self.sites: list[str] = []
        self.resumed_at: list[int] = []
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.start_time: float | None = None
        self.ended: bool = False
        self.failed: bool = False
        self.wall_s: float | None = None
        self.end_rounds: int | None = None
        self.train_loss: dict[int, float] = {}
        self.duration_s: dict[int, float] = {}
        self.evaluated: dict[int, FinalEvaluation] = {}
        self.epsilon: dict[str, dict[int, float]] = {}
        self.site_level_epsilon: dict[int, float] = {}
        self.selected: dict[int, list[str]] = {}
        self.trained: dict[int, set[str]] = {}
        self.failed_nodes: dict[int, set[str]] = {}
        self.late_nodes: dict[int, set[str]] = {}
        self.ended_rounds: set[int] = set()
        self.standing: dict[str, str] = {}  # approval standing: approved / pending / rejected / refused
        self.standing_at: dict[int, dict[str, str]] = {}
        self.problems: list[Problem] = []
        self.traffic: dict[int, dict[str, Traffic]] = {}

    def _site(self, name: str) -> None:
        if name not in self.sites:
            self.sites.append(name)

    def _add_traffic(self, round_number: int, value: Any) -> None:
        counts = self.traffic.setdefault(round_number, {})
        for node, pair in as_mapping(value).items():
            site = str(node)
            self._site(site)
            pair = as_mapping(pair)
            counts[site] = counts.get(site, Traffic()) + Traffic(down=as_int(pair.get("down")), up=as_int(pair.get("up")))

    def fold(self, event: Mapping[str, Any]) -> None:
        moment = event.get("time")
        if isinstance(moment, (int, float)) and not isinstance(moment, bool):
            self.first_time = float(moment) if self.first_time is None else self.first_time
            self.last_time = float(moment)
        kind = event.get("event")
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        if handler is not None:
            handler(event)

    # -- one method per event ----------------------------------------------------

    def _on_run_start(self, event: Mapping[str, Any]) -> None:
        run_id = event.get("run_id")
        self.run_id = str(run_id) if run_id is not None else self.run_id
        rounds = as_int(event.get("rounds"), default=-1)
        self.rounds_planned = rounds if rounds > 0 else self.rounds_planned
        for node in as_names(event.get("nodes")):
            self._site(node)
        moment = event.get("time")
        self.start_time = float(moment) if isinstance(moment, (int, float)) and self.start_time is None else self.start_time
        first = as_int(event.get("first_round"), default=1)
        self.ended = self.failed = False
        if first > 1:
            self.resumed_at.append(first)
            # the rounds from ``first`` on are redone: what an earlier attempt logged for them is superseded
            per_round: list[dict[int, Any]] = [
                self.train_loss, self.duration_s, self.evaluated, self.selected, self.trained, self.failed_nodes,
                self.late_nodes, self.site_level_epsilon, self.standing_at, *self.epsilon.values(),
            ]  # fmt: skip
            for table in per_round:
                for stale in [r for r in table if r >= first]:
                    del table[stale]
            self.ended_rounds = {r for r in self.ended_rounds if r < first}

    def _on_approval(self, event: Mapping[str, Any]) -> None:
        for node in as_names(event.get("approved")):
            self._site(node)
            self.standing[node] = "approved"
        for node in as_names(event.get("pending")):
            self._site(node)
            if self.standing.get(node) != "pending":
                self.problems.append(Problem(round=None, node_id=node, state="pending", reason="waiting for the site's approval"))
            self.standing[node] = "pending"
        for verdict in ("rejected", "refused"):
            for node, reason in as_mapping(event.get(verdict)).items():
                site = str(node)
                self._site(site)
                if self.standing.get(site) != verdict:
                    self.problems.append(Problem(round=None, node_id=site, state=verdict, reason=str(reason or "")))
                self.standing[site] = verdict

    def _on_node_refused(self, event: Mapping[str, Any]) -> None:
        node = event.get("node_id")
        site = str(node) if node is not None else None
        detail = event.get("detail") or event.get("reason") or ""
        if site is not None:
            self._site(site)
            self.standing[site] = "refused"
        self.problems.append(Problem(round=None, node_id=site, state="refused", reason=str(detail)))

    def _on_normalization(self, event: Mapping[str, Any]) -> None:
        self._add_traffic(0, event.get("bytes"))

    def _on_round_start(self, event: Mapping[str, Any]) -> None:
        number = event_round(event)
        if number is None:
            return
        nodes = as_names(event.get("nodes"))
        for node in nodes:
            self._site(node)
        self.selected[number] = nodes
        self.trained[number] = set()
        self.failed_nodes[number] = set()
        self.late_nodes[number] = set()
        self.ended_rounds.discard(number)
        self.standing_at[number] = dict(self.standing)

    def _on_round_end(self, event: Mapping[str, Any]) -> None:
        number = event_round(event)
        if number is None:
            return
        ok = as_names(event.get("nodes_ok"))
        for node in ok + as_names(event.get("nodes_failed")):
            self._site(node)
        self.selected.setdefault(number, sorted(set(ok) | set(as_names(event.get("nodes_failed")))))
        self.standing_at.setdefault(number, dict(self.standing))
        self.trained[number] = set(ok)
        self.failed_nodes.setdefault(number, set()).update(as_names(event.get("nodes_failed")))
        self.ended_rounds.add(number)
        self.train_loss[number] = as_float(event.get("train_loss"))
        self.duration_s[number] = as_float(event.get("duration_s"))
        self._add_traffic(number, event.get("bytes"))
        for node, spent in as_mapping(event.get("dp_epsilon")).items():
            self._site(str(node))
            self.epsilon.setdefault(str(node), {})[number] = as_float(spent)
        site_level = as_mapping(event.get("site_level_dp"))
        if "epsilon" in site_level:
            self.site_level_epsilon[number] = as_float(site_level.get("epsilon"))

    def _on_round_failed(self, event: Mapping[str, Any]) -> None:
        number = event_round(event)
        if number is None:
            return
        self.failed = True
        self.trained[number] = set(as_names(event.get("nodes_ok")))
        self.ended_rounds.add(number)
        message = event.get("secure_aggregation")
        if isinstance(message, str) and message:
            self.problems.append(Problem(round=number, node_id=None, state="failed", reason=f"secure aggregation: {message}"))

    def _on_node_failed(self, event: Mapping[str, Any]) -> None:
        number = event_round(event)
        node = event.get("node_id")
        site = str(node) if node is not None else None
        kind = event.get("kind")
        if site is not None:
            self._site(site)
            if number is not None and kind in _TRAINING_KINDS:
                self.failed_nodes.setdefault(number, set()).add(site)
        self.problems.append(
            Problem(round=number, node_id=site, state="failed", reason=str(event.get("error") or ""),
                    kind=str(kind) if kind is not None else None)
        )  # fmt: skip

    def _on_node_late(self, event: Mapping[str, Any]) -> None:
        number = event_round(event)
        node = event.get("node_id")
        site = str(node) if node is not None else None
        job = event.get("job_id")
        kind = _job_kind(job, number)
        if site is not None:
            self._site(site)
            if number is not None and kind in _TRAINING_KINDS:
                self.late_nodes.setdefault(number, set()).add(site)
        self.problems.append(
            Problem(round=number, node_id=site, state="late", reason="no answer before the round deadline", kind=kind)
        )

    def _on_evaluation(self, event: Mapping[str, Any]) -> None:
        number = event_round(event)
        if number is None:
            return
        scalars_by_site: dict[str, dict[str, float]] = {}
        roc: dict[str, list[float]] = {}
        for node, metrics in as_mapping(event.get("sites")).items():
            site = str(node)
            self._site(site)
            values = {str(k): as_float(v) for k, v in as_mapping(metrics).items()}
            scalars, curves = split_curves(values)
            scalars_by_site[site] = scalars
            if "roc" in curves:
                roc[site] = curves["roc"]
        mean, _ = split_curves({str(k): as_float(v) for k, v in as_mapping(event.get("mean")).items()})
        pooled, _ = split_curves({str(k): as_float(v) for k, v in as_mapping(event.get("pooled")).items()})
        examples = {str(k): as_int(v) for k, v in as_mapping(event.get("examples")).items()}
        self.evaluated[number] = FinalEvaluation(
            round=number, sites=scalars_by_site, examples=examples, mean=mean, pooled=pooled, roc=roc
        )
        self._add_traffic(number, event.get("bytes"))

    def _on_run_end(self, event: Mapping[str, Any]) -> None:
        self.ended = True
        self.failed = False
        completed = as_int(event.get("rounds_completed"), default=-1)
        self.end_rounds = completed if completed >= 0 else None
        wall = as_float(event.get("wall_s"))
        self.wall_s = wall if math.isfinite(wall) else None

    # -- the result ------------------------------------------------------------------

    def _participation(self) -> dict[int, dict[str, Participation]]:
        rounds = set(self.selected) | set(self.trained)
        table: dict[int, dict[str, Participation]] = {}
        for number in sorted(rounds):
            selected = set(self.selected.get(number, ()))
            standing = self.standing_at.get(number, self.standing)
            row: dict[str, Participation] = {}
            for site in self.sites:
                state: Participation
                if site in self.trained.get(number, ()):
                    state = "trained"
                elif site in self.late_nodes.get(number, ()):
                    state = "late"
                elif site in self.failed_nodes.get(number, ()):
                    state = "failed"
                elif site in selected:
                    state = "failed" if number in self.ended_rounds else "pending"
                elif standing.get(site) in ("rejected", "refused"):
                    state = "refused"
                elif standing.get(site) == "pending":
                    state = "pending"
                else:
                    state = "not selected"
                row[site] = state
            table[number] = row
        return table

    def record(self, plan: dict[str, Any] | None, card: dict[str, Any] | None, notes: Sequence[str]) -> RunRecord:
        plan_map = as_mapping(plan)
        card_map = as_mapping(card)
        rounds_planned = as_int(plan_map.get("rounds"), default=-1)
        planned = rounds_planned if rounds_planned > 0 else self.rounds_planned
        completed = max((r for r in self.train_loss), default=0)
        if self.ended and self.end_rounds is not None:
            completed = self.end_rounds
        card_rounds = as_int(card_map.get("rounds_completed"), default=-1)
        if card_rounds >= 0 and not self.ended:
            completed = max(completed, card_rounds)
        status: RunStatus
        if self.failed:
            status = "failed"
        elif self.ended and (planned is None or completed >= planned):
            status = "completed"
        else:
            status = "incomplete"
        wall_s = self.wall_s
        if wall_s is None and self.first_time is not None and self.last_time is not None:
            wall_s = self.last_time - self.first_time
        all_notes = list(notes)
        for first in self.resumed_at:
            all_notes.append(f"the run was resumed from its checkpoint at round {first}")
        privacy = card_map.get("privacy")
        privacy_block = dict(privacy) if isinstance(privacy, Mapping) else None
        dataset = as_mapping(plan_map.get("dataset")).get("name") or as_mapping(card_map.get("dataset")).get("name")
        strategy = as_mapping(plan_map.get("strategy")).get("name") or as_mapping(card_map.get("strategy")).get("name")
        task = plan_map.get("task") or card_map.get("task")
        return RunRecord(
            run_id=self.run_id or (str(card_map["run_id"]) if card_map.get("run_id") else None),
            plan_name=str(plan_map["name"]) if plan_map.get("name") else None,
            task=str(task) if task else None,
            dataset=str(dataset) if dataset else None,
            strategy=str(strategy) if strategy else None,
            rounds_planned=planned,
            rounds_completed=completed,
            status=status,
            wall_s=wall_s,
            started_at=self.first_time,
            sites=tuple(self.sites),
            resumed_at=tuple(self.resumed_at),
            train_loss=dict(sorted(self.train_loss.items())),
            duration_s=dict(sorted(self.duration_s.items())),
            evaluations={r: self.evaluated[r].sites for r in sorted(self.evaluated)},
            evaluation_mean={r: self.evaluated[r].mean for r in sorted(self.evaluated)},
            final=self.evaluated[max(self.evaluated)] if self.evaluated else None,
            epsilon={site: dict(sorted(rounds.items())) for site, rounds in self.epsilon.items()},
            site_level_epsilon=dict(sorted(self.site_level_epsilon.items())),
            participation=self._participation(),
            problems=tuple(self.problems),
            traffic={r: self.traffic[r] for r in sorted(self.traffic)},
            plan_summary=plan_summary(plan_map) if plan_map else (),
            plan=plan,
            privacy=privacy_block,
            data_leaving_sites=data_leaving_sites(plan_map, privacy_block),
            notes=tuple(all_notes),
        )
