"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): the coordinator's loop.

With ``plan.strategy.buffered`` set, :meth:`Coordinator.run
<fedcare.federation.coordinator.Coordinator.run>` calls :func:`run_buffered`
instead of its synchronous rounds. Sites never wait for one another:

* every available site gets a TRAIN job on the current global model;
* each answer is checked (``Coordinator._check_update``), weighted by its
  examples times :func:`staleness_weight` and folded into the strategy at once;
* after ``buffer_size`` (K) accepted updates the strategy makes a new global
  model: one round of the plan (checkpoint, ``round_end`` event, evaluation
  every ``evaluation.every_rounds``, as in synchronous rounds);
* a site that answered gets its next job as soon as a global model exists
  that it has not trained on.

Versions and rounds. The global model after ``v`` aggregations is version
``v``; a TRAIN job on version ``v`` carries ``round = v + 1``, the round its
update is meant for, as a synchronous job would. A site gets at most one job
per version, and never a second while one is outstanding, so each site's
rounds strictly increase: its privacy ledger (record-level DP) never sees a
round twice, a site trains at most ``plan.rounds`` times (the budget the
plan calibrated DP-SGD for), and a resumed coordinator that sends the job on
its checkpoint again (same run, round, model, seed) is answered with what
the site already released (``Node._release_once``), not trained twice.

Staleness. An update trained on version ``v`` that arrives when version
``w`` is current has staleness ``w - v``; updates staler than
``max_staleness`` are dropped (event ``node_stale``, counted in the next
``round_end`` as ``dropped_stale``). Each update is applied to the current
model as computed (FedBuff's rule), whatever model it started from.

Deadlines. With ``plan.round_timeout_s``, a wait of that long with no answer
at all (counted from the last answer or the last new global model) declares
every outstanding job late (``node_late``, as synchronous
rounds do); the buffer is then aggregated if it holds at least
``plan.min_nodes`` updates, otherwise the run stops with
:class:`~fedcare.errors.FederationError` and the last checkpoint intact. The
same holds when no site can deliver any more (every site has answered or
failed on the current model) before the buffer is full.

The end. After ``plan.rounds`` aggregations no job is sent; answers to
training jobs still outstanding are counted and dropped (their sites' event
``jobs_abandoned``) while the last evaluation completes; the transport's
close stops the sites.

Transports need nothing new: the loop asks
:meth:`Transport.results <fedcare.transport.base.Transport.results>` for
every outstanding job id, takes the first answer and stops iterating, so
jobs sent later are included in the next call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fedcare.errors import ConfigError, FederationError, ProtocolError
from fedcare.federation.coordinator import Coordinator, RunResult, round_seed
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import update_digest

__all__ = ["run_buffered", "staleness_weight"]

logger = logging.getLogger(__name__)


def staleness_weight(staleness: int, *, exponent: float) -> float:
    """FedBuff's down-weighting of a stale update: ``1 / (1 + staleness) ** exponent``.

    Parameters
    ----------
    staleness : int
        Global-model versions made since the one the update was trained on (>= 0).
    exponent : float
        ``plan.strategy.buffered.staleness_exponent`` (>= 0; 0 weighs every update the same).

    Returns
    -------
    float
        The factor, in ``(0, 1]``, that multiplies the update's example weight.

    Raises
    ------
    ValueError
        If ``staleness`` or ``exponent`` is negative.

    Examples
    --------
    >>> staleness_weight(0, exponent=0.5), staleness_weight(3, exponent=0.5), staleness_weight(3, exponent=0.0)
    (1.0, 0.5, 1.0)
    """
    if staleness < 0 or exponent < 0:
        raise ValueError(f"staleness and exponent must be >= 0, got staleness={staleness}, exponent={exponent}")
    return float((1.0 + staleness) ** -exponent)


def run_buffered(
    coordinator: Coordinator, *, nodes: list[str], per_round: int, result: RunResult, first_round: int
) -> None:
    """Run rounds ``first_round`` to ``plan.rounds`` as buffered asynchronous aggregations.

    ``result`` is updated in place as :meth:`Coordinator.run` expects
    (parameters, rounds completed, evaluations, participation, failures).

    Parameters
    ----------
    coordinator : Coordinator
        The coordinator whose plan sets ``strategy.buffered``.
    nodes : list of str
        The admitted nodes, sorted.
    per_round : int
        Sites training at once (``plan.nodes_per_round`` or all).
    result : RunResult
        The run so far; ``result.parameters`` is the model to start from.
    first_round : int
        The first aggregation to make (1, or the checkpoint's round + 1 on resume).

    Raises
    ------
    ConfigError
        If the buffer is larger than the sites training at once.
    FederationError
        If the buffer cannot be filled with at least ``plan.min_nodes``
        updates (no answer for ``plan.round_timeout_s``, or no site left that
        can deliver); the last checkpoint is intact.

    Examples
    --------
    See ``tests/federation/test_buffered.py``, which runs heart disease with
    one site five times slower than the others.
    """
    _BufferedLoop(coordinator, nodes=nodes, per_round=per_round, result=result).run(first_round)


@dataclass
class _Evaluation:
    """One global model's evaluation in flight: its jobs still out, and the answers so far."""

    waiting: set[str]
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)


@dataclass
class _Buffer:
    """What the round being filled holds (the strategy holds the sum itself)."""

    started: float
    examples: dict[str, int] = field(default_factory=dict)
    staleness: dict[str, int] = field(default_factory=dict)
    losses: list[tuple[float, int]] = field(default_factory=list)
    dropped_stale: int = 0


class _BufferedLoop:
    def __init__(self, coordinator: Coordinator, *, nodes: list[str], per_round: int, result: RunResult) -> None:
        self.c = coordinator
        self.plan = coordinator.plan
        settings = self.plan.strategy.buffered
        assert settings is not None
        self.settings = settings
        if settings.buffer_size > per_round:
            raise ConfigError(
                f"buffer_size {settings.buffer_size} is larger than the {per_round} sites that train at once, so "
                "the buffer could never fill; lower buffer_size or let more sites take part",
                field="plan.strategy.buffered.buffer_size",
            )
        self.nodes = nodes
        self.per_round = per_round
        self.result = result
        self.version = 0
        self.pending: dict[str, str] = {}  # every outstanding job id -> its node (what Coordinator._receive takes)
        self.training: dict[str, Job] = {}  # outstanding TRAIN jobs by job id
        self.evaluating: dict[str, int] = {}  # outstanding EVALUATE jobs by job id -> the round evaluated
        self.evaluations: dict[int, _Evaluation] = {}
        self.trained_on: dict[str, int] = {}  # the latest version each site was sent a TRAIN job on
        self.last_answer = time.monotonic()
        self.buffer = _Buffer(started=time.perf_counter())

    # -- the loop --------------------------------------------------------------

    def run(self, first_round: int) -> None:
        plan = self.plan
        self.version = first_round - 1
        if self.version < plan.rounds:
            self._begin_round()
        while self.version < plan.rounds:
            if not self.training and len(self.buffer.examples) < self.settings.buffer_size:
                self._aggregate_short("no site can deliver an update on the current model")
                continue
            raw = self._next_answer()
            if raw is None:
                self._expire()
                self._aggregate_short(f"no answer came for round_timeout_s={plan.round_timeout_s:g} s")
                continue
            self._take(raw)
            if len(self.buffer.examples) >= self.settings.buffer_size:
                self._aggregate()  # before the site that answered gets its next job: it trains on the newest model
            else:
                self._dispatch()
        # The last evaluation completes; training answers that come meanwhile are not used.
        while self.evaluating:
            raw = self._next_answer()
            if raw is None:
                self._expire()
                break
            self._take(raw)
        if self.training:
            abandoned = sorted(self.pending[job_id] for job_id in self.training)
            self.c._emit({"event": "jobs_abandoned", "round": self.version, "nodes": abandoned})
        self.result.evaluations.sort(key=lambda evaluation: evaluation.round)

    def _next_answer(self) -> JobResult | None:
        """The first answer to any outstanding job; None when ``round_timeout_s`` passed without one."""
        timeout = self.plan.round_timeout_s
        remaining = None if timeout is None else max(0.0, self.last_answer + timeout - time.monotonic())
        answers = self.c.transport.results(list(self.pending), timeout_s=remaining)
        try:
            for raw in answers:
                self.last_answer = time.monotonic()
                return raw
        finally:
            close = getattr(answers, "close", None)
            if close is not None:
                close()  # stop iterating: the other jobs stay outstanding for the next call
        return None

    def _take(self, raw: JobResult) -> None:
        job = self.training.pop(raw.job_id, None)
        evaluated = self.evaluating.pop(raw.job_id, None)
        answer = self.c._receive(raw, self.pending, self.result)
        if job is not None:
            if answer is not None and self.version < self.plan.rounds:
                self._accumulate(answer, job)
        elif evaluated is not None:
            evaluation = self.evaluations[evaluated]
            evaluation.waiting.discard(raw.job_id)
            if answer is not None:
                evaluation.sites[answer.node_id] = {k: float(v) for k, v in answer.metrics.items()}
                evaluation.examples[answer.node_id] = answer.num_examples
            self._finish_evaluations()

    def _accumulate(self, answer: JobResult, job: Job) -> None:
        node = answer.node_id
        trained_on = job.round - 1
        staleness = self.version - trained_on
        if staleness > self.settings.max_staleness:
            self.buffer.dropped_stale += 1
            self.c._emit(
                {
                    "event": "node_stale",
                    "round": self.version + 1,
                    "node_id": node,
                    "staleness": staleness,
                    "max_staleness": self.settings.max_staleness,
                }
            )
            return
        strategy = self.c.strategy
        try:
            update = self.c._check_update(answer, self.result.parameters)
            strategy.receive_data(answer.data, node_id=node)
            weight = answer.num_examples * staleness_weight(staleness, exponent=self.settings.staleness_exponent)
            strategy.accumulate(update, weight=weight, node_id=node)
        except ProtocolError as exc:
            self.c._record_failure(self.result, answer, exc.message)
            return
        self.buffer.examples[node] = answer.num_examples
        self.buffer.staleness[node] = staleness
        self.result.train_examples[node] = answer.num_examples
        if self.c.audit is not None and answer.update is not None:
            size, digest = update_digest(answer.update)
            self.c.audit.update_received(
                run_id=self.c._run_id, round=self.version + 1, peer=node, size_bytes=size, sha256=digest
            )
        if "train_loss" in answer.metrics:
            self.buffer.losses.append((float(answer.metrics["train_loss"]), answer.num_examples))

    # -- rounds ----------------------------------------------------------------

    def _begin_round(self) -> None:
        """Start filling the buffer of round ``version + 1`` and send jobs on the current model."""
        self.c.strategy.begin_round(self.version + 1, self.result.parameters)
        self.buffer = _Buffer(started=time.perf_counter())
        self.last_answer = time.monotonic()  # the deadline counts from the new model, or any answer after it
        sent = self._dispatch(announce=False)
        self.c._emit({"event": "round_start", "round": self.version + 1, "nodes": sent, "buffered": True})

    def _aggregate(self) -> None:
        plan, result, buffer = self.plan, self.result, self.buffer
        result.parameters = self.c.strategy.finalize().freeze()
        self.version += 1
        result.rounds_completed = self.version
        result.participation[self.version] = sorted(buffer.examples)
        total = sum(n for _, n in buffer.losses)
        self.c._emit(
            {
                "event": "round_end",
                "round": self.version,
                "nodes_ok": sorted(buffer.examples),
                "nodes_failed": [],
                "num_examples": sum(buffer.examples.values()),
                "train_loss": sum(loss * n for loss, n in buffer.losses) / total if total else None,
                "duration_s": time.perf_counter() - buffer.started,
                "buffered": {"staleness": dict(sorted(buffer.staleness.items())), "dropped_stale": buffer.dropped_stale},
                "bytes": self.c._take_traffic(),
                **self.c._take_transport(),
                **self.c._epsilon_metrics(sorted(buffer.examples), result),
                **({"site_level_dp": m} if (m := self.c.strategy.round_metrics()) else {}),
            }
        )
        self.c._save_checkpoint(self.version, result)
        if self.version % plan.evaluation.every_rounds == 0 or self.version == plan.rounds:
            self._start_evaluation()
        if self.version < plan.rounds:
            self._begin_round()

    def _aggregate_short(self, why: str) -> None:
        """Aggregate a buffer that cannot fill, if it holds ``min_nodes`` updates; else stop the run."""
        held = len(self.buffer.examples)
        if held >= max(1, self.plan.min_nodes):
            logger.info("aggregated a buffer that could not fill", extra={"round": self.version + 1})
            self._aggregate()
            return
        round_number = self.version + 1
        self.c._emit({"event": "round_failed", "round": round_number, "nodes_ok": sorted(self.buffer.examples)})
        # The failures of the jobs this buffer could have held (trained on the models it may still use).
        oldest = max(1, round_number - self.settings.max_staleness)
        failed = [f for f in self.result.failures if oldest <= f["round"] <= round_number]
        reasons = "; ".join(f"{f['node_id']}: {f['error']}" for f in failed) or "no answers"
        raise FederationError(
            f"{why}, and the buffer holds {held} of buffer_size={self.settings.buffer_size} updates, fewer than "
            f"min_nodes={self.plan.min_nodes} ({reasons}); the checkpoint of round {self.result.rounds_completed} "
            "is intact",
            round=round_number,
        )

    def _expire(self) -> None:
        """Declare every outstanding job late (the deadline passed with no answer at all)."""
        for job_id, node in list(self.pending.items()):
            job = self.training.pop(job_id, None)
            evaluated = self.evaluating.pop(job_id, None)
            round_number = job.round if job is not None else evaluated if evaluated is not None else self.version
            self.c._record_late(self.result, round_number=round_number, node=node, job_id=job_id)
            if evaluated is not None:
                self.evaluations[evaluated].waiting.discard(job_id)
        self.pending.clear()
        self.last_answer = time.monotonic()  # the jobs sent next get a whole deadline
        self._finish_evaluations()

    # -- jobs ------------------------------------------------------------------

    def _dispatch(self, *, announce: bool = True) -> list[str]:
        """Send TRAIN jobs on the current model to idle sites that have not trained on it; the sites sent to."""
        if self.version >= self.plan.rounds:
            return []
        busy = {self.pending[job_id] for job_id in self.training}
        free = self.per_round - len(busy)
        idle = [n for n in self.nodes if n not in busy and self.trained_on.get(n, -1) < self.version]
        if free <= 0 or not idle:
            return []
        reachable = set(self.c._available(self.nodes, self.version + 1))
        # The sites that trained least recently go first (fair when fewer train at once than exist).
        chosen = sorted((n for n in idle if n in reachable), key=lambda n: (self.trained_on.get(n, -1), self.nodes.index(n)))
        sent = []
        for node in chosen[:free]:
            job = self._train_job(node)
            self.trained_on[node] = self.version  # one job per site and version, sent or not: rounds never repeat
            if self.c._submit(node, job, self.result):
                self.pending[job.job_id] = node
                self.training[job.job_id] = job
                sent.append(node)
        if announce and sent:
            for node in sent:
                self.c._emit({"event": "train_job", "round": self.version + 1, "node_id": node})
        return sent

    def _train_job(self, node: str) -> Job:
        round_number = self.version + 1
        seed = round_seed(self.plan.seed, round_number, self.nodes.index(node))
        extra = self.c.strategy.configure_train(round_number, [node]).get(node, {})
        config: dict[str, Any] = {"seed": seed, **extra}
        return self.c._job(round_number, node, JobKind.TRAIN, self.result.parameters, config)

    def _start_evaluation(self) -> None:
        evaluation = _Evaluation(waiting=set())
        self.evaluations[self.version] = evaluation
        self.c._emit({"event": "phase", "round": self.version, "phase": "evaluation"})
        for node in self.c._available(self.nodes, self.version):
            job = self.c._job(self.version, node, JobKind.EVALUATE, self.result.parameters)
            if self.c._submit(node, job, self.result):
                self.pending[job.job_id] = node
                self.evaluating[job.job_id] = self.version
                evaluation.waiting.add(job.job_id)
        self._finish_evaluations()

    def _finish_evaluations(self) -> None:
        """Summarize, in round order, every evaluation whose answers are all in."""
        for round_number in sorted(self.evaluations):
            evaluation = self.evaluations[round_number]
            if evaluation.waiting:
                break
            del self.evaluations[round_number]
            self.result.evaluations.append(self.c._evaluation_summary(round_number, evaluation.sites, evaluation.examples))
