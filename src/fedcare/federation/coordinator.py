"""The coordinator: the round loop, the same for every transport."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcare import __version__
from fedcare.compression import decompress
from fedcare.data.normalization import FeatureStats, Standardization, combine_feature_stats, from_unit_moments
from fedcare.errors import ConfigError, FedcareError, FederationError, ProtocolError, TransportError
from fedcare.federation.participation import ApprovalGate
from fedcare.federation.rundir import RunDirectory
from fedcare.federation.secure_aggregation import SecureRound, round_settings
from fedcare.messages import Job, JobKind, JobResult
from fedcare.metrics import aggregate_site_metrics
from fedcare.params import Parameters, update_digest
from fedcare.plan import Plan, plan_hash
from fedcare.strategies.base import Strategy
from fedcare.transport.base import Transport

if TYPE_CHECKING:
    from fedcare.federation.audit_log import AuditLog

__all__ = ["Coordinator", "EvaluationSummary", "RunResult", "check_participation", "round_seed"]

logger = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]

#: A node's transport counters travel as result metrics with this prefix (numbers only).
_TRANSPORT_PREFIX = "transport_"


@dataclass(frozen=True)
class EvaluationSummary:
    """Federated evaluation of one global model.

    Attributes
    ----------
    round : int
        The round after which the model was evaluated.
    sites : dict
        Each site's metrics on its own test split.
    examples : dict
        Test examples per site.
    mean : dict
        Unweighted mean over sites (FLamby's metric).
    pooled : dict
        Mean weighted by test examples.
    """

    round: int
    sites: dict[str, dict[str, float]]
    examples: dict[str, int]
    mean: dict[str, float]
    pooled: dict[str, float]


@dataclass
class RunResult:
    """What a completed run returns."""

    run_id: str
    run_dir: str | None
    rounds_completed: int
    parameters: Parameters
    evaluations: list[EvaluationSummary] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    train_examples: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    #: What protected the updates and what left the sites (as in the model card).
    privacy: dict[str, Any] = field(default_factory=dict)
    #: With record-level DP: the epsilon each site reports spent on the dataset (its ledger), latest.
    epsilon_spent: dict[str, float] = field(default_factory=dict)
    #: The sites whose updates each round's aggregate holds, by round.
    participation: dict[int, list[str]] = field(default_factory=dict)

    @property
    def final_evaluation(self) -> EvaluationSummary | None:
        """The last federated evaluation, if any ran."""
        return self.evaluations[-1] if self.evaluations else None


def round_seed(seed: int, round_number: int, index: int) -> int:
    """The training seed of one model in one round, derived from the plan seed.

    Parameters
    ----------
    seed : int
        ``plan.seed``.
    round_number : int
        1-based round.
    index : int
        Position of the node among the admitted nodes (sorted names).

    Returns
    -------
    int
        A 32-bit seed for the task's batch order.

    Examples
    --------
    >>> round_seed(0, 1, 0) == round_seed(0, 1, 0), round_seed(0, 1, 0) == round_seed(0, 2, 0)
    (True, False)
    """
    return int(np.random.SeedSequence([seed, round_number, index]).generate_state(1)[0])


def check_participation(plan: Plan, nodes: list[str]) -> int:
    """Check the plan's per-round numbers against the nodes that exist; return nodes per round.

    Raises
    ------
    ConfigError
        If ``plan.nodes_per_round`` exceeds the nodes or ``plan.min_nodes`` exceeds
        the nodes per round, or the secure aggregation settings do not fit the
        nodes per round (with a narrowing ``plan.compression``: too many nodes
        for the 16-bit ring).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "t", "dataset": {"name": "d"}, "rounds": 1, "nodes_per_round": 3})
    >>> check_participation(plan, ["a", "b", "c", "d"])
    3
    >>> check_participation(plan, ["a", "b"])
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.nodes_per_round: asks for 3 nodes per round but only 2 nodes exist (a, b)
    """
    per_round = plan.nodes_per_round or len(nodes)
    if per_round > len(nodes):
        raise ConfigError(
            f"asks for {per_round} nodes per round but only {len(nodes)} nodes exist ({', '.join(nodes)})",
            field="plan.nodes_per_round",
        )
    if plan.min_nodes > per_round:
        raise ConfigError(
            f"needs {plan.min_nodes} nodes per round but only {per_round} take part", field="plan.min_nodes"
        )
    if plan.secure_aggregation.enabled:
        try:
            round_settings(
                plan.secure_aggregation, num_nodes=per_round, vector_length=1, compression=plan.compression
            )
        except ConfigError as exc:
            field = exc.field or ""
            location = field if field.startswith("compression.") else f"secure_aggregation.{field.removeprefix('secagg.')}"
            raise ConfigError(f"{exc.message} (for {per_round} nodes per round)", field=f"plan.{location}") from None
    return per_round


class Coordinator:
    """Runs the plan's rounds over whatever transport it is given.

    Parameters
    ----------
    plan : Plan
        The validated plan.
    strategy : Strategy
        Aggregation rule.
    transport : Transport
        Links to the nodes; the coordinator never knows which kind.
    initial_parameters : Parameters
        The global model before round 1.
    run_dir : RunDirectory, optional
        Where the plan, events, checkpoints and final model go.
    on_event : callable, optional
        Called with each event dict as it is logged (progress bars, dashboards).
    statistics_width : int, optional
        The width of the normalization statistics (features of a table,
        channels of an image: ``DataSpec.channels``); needed for federated
        normalization under secure aggregation, whose vector length is fixed
        before any site answers.
    audit : AuditLog, optional
        The coordinator's tamper-evident audit log (deployments): the run, the
        sites' approvals and refusals, and the size and SHA-256 of every
        update received.

    Examples
    --------
    See :func:`fedcare.simulation.simulate`, which wires a coordinator to
    in-process nodes.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        strategy: Strategy,
        transport: Transport,
        initial_parameters: Parameters,
        run_dir: RunDirectory | None = None,
        on_event: EventCallback | None = None,
        run_id: str | None = None,
        statistics_width: int | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.plan = plan
        self.statistics_width = statistics_width
        self.audit = audit
        self.strategy = strategy
        self.transport = transport
        self.initial_parameters = initial_parameters
        self.run_dir = run_dir
        self.on_event = on_event
        self._plan_hash = plan_hash(plan)
        self._run_id = run_id or uuid.uuid4().hex
        self._normalization: Standardization | None = None
        self._gate = ApprovalGate(plan, transport=transport, emit=self._emit, audit=audit)
        # Payload bytes sent to (down) and received from (up) each node since the last event that reported them.
        self._traffic: dict[str, list[int]] = {}
        # What unreliable links cost each node (retries, resumed transfers) since the last event that reported it.
        self._transport: dict[str, dict[str, int]] = {}
        # With compression: float32 update bytes / bytes sent, per node, since the last round_end.
        self._compression: dict[str, float] = {}

    # -- public ----------------------------------------------------------------

    def run(self, *, resume: bool = False) -> RunResult:
        """Run every round of the plan, then evaluate and save the final model.

        With ``plan.strategy.buffered``, a round is one buffered asynchronous
        aggregation (:mod:`fedcare.federation.buffered`). With a run directory, ``report.html`` is written there when the run
        ends, completed or not (see :mod:`fedcare.report`).

        Parameters
        ----------
        resume : bool
            Continue from the run directory's checkpoint, if one exists.

        Returns
        -------
        RunResult

        Raises
        ------
        ConfigError
            If the plan asks for more nodes per round than are admitted.
        FederationError
            If fewer than ``plan.min_nodes`` nodes complete a round; the last
            checkpoint is left intact.
        """
        try:
            return self._run(resume=resume)
        finally:
            if self.run_dir is not None:
                self._write_report()

    def _run(self, *, resume: bool) -> RunResult:
        started = time.perf_counter()
        plan = self.plan
        if plan.secure_aggregation.enabled and self.strategy.needs_all_updates:
            raise ConfigError(
                f"{type(self.strategy).__name__} needs every update on its own, which secure aggregation hides; "
                "use a streaming strategy such as FedAvg or turn secure aggregation off",
                field="plan.secure_aggregation.enabled",
            )
        nodes = self._admitted_nodes()
        per_round = check_participation(plan, nodes)
        result = RunResult(
            run_id=self._run_id,
            run_dir=str(self.run_dir.path) if self.run_dir else None,
            rounds_completed=0,
            parameters=self.initial_parameters.copy().freeze(),
        )
        first_round = 1
        if resume and self.run_dir is not None:
            checkpoint = self.run_dir.load_checkpoint()
            if checkpoint is not None:
                done, parameters, state = checkpoint
                if "normalization" in state and plan.dataset.normalization == "federated":
                    # Released once: under differential privacy a second release would spend budget again.
                    self._normalization = Standardization.from_config(
                        state["normalization"], num_features=len(state["normalization"]["mean"])
                    )
                self.strategy.load_state_dict(self.run_dir.load_strategy_state(round=done))
                result.parameters = parameters.freeze()
                result.rounds_completed = done
                first_round = done + 1
        if self.run_dir is not None:
            self.run_dir.write_plan(plan)
        self._emit(
            {
                "event": "run_start",
                "run_id": self._run_id,
                "plan_hash": self._plan_hash,
                "nodes": nodes,
                "rounds": plan.rounds,
                "first_round": first_round,
            }
        )
        if self.audit is not None:
            self.audit.append("run_started", run_id=self._run_id, plan_sha256=self._plan_hash, rounds=plan.rounds, first_round=first_round)
        self._gate.wait(nodes)
        if plan.dataset.normalization == "federated" and self._normalization is None:
            self._normalization = self._federated_normalization(nodes, result)

        if plan.strategy.buffered is not None:
            from fedcare.federation.buffered import run_buffered  # asynchronous rounds: see that module

            run_buffered(self, nodes=nodes, per_round=per_round, result=result, first_round=first_round)
        else:
            for round_number in range(first_round, plan.rounds + 1):
                result.parameters = self._train_round(round_number, nodes, per_round, result)
                result.rounds_completed = round_number
                self._save_checkpoint(round_number, result)
                if round_number % plan.evaluation.every_rounds == 0 or round_number == plan.rounds:
                    result.evaluations.append(self._evaluate(round_number, nodes, result))

        result.wall_s = time.perf_counter() - started
        card = self._model_card(result)
        result.privacy = card["privacy"]
        if self.run_dir is not None:
            self.run_dir.save_model(result.parameters, card)
        self._emit({"event": "run_end", "rounds_completed": result.rounds_completed, "wall_s": result.wall_s})
        if self.audit is not None:
            self.audit.append("run_finished", run_id=self._run_id, rounds_completed=result.rounds_completed)
        return result

    # -- phases ----------------------------------------------------------------

    def _available(self, nodes: list[str], round_number: int) -> list[str]:
        """Admitted nodes the transport can reach now, in admitted order.

        Raises
        ------
        FederationError
            If fewer than ``plan.min_nodes`` are reachable.
        """
        reachable = set(self.transport.nodes())
        approved = set(self._gate.taking_part(nodes))
        available = [node for node in nodes if node in reachable and node in approved]
        if len(available) < self.plan.min_nodes:
            missing = ", ".join(node for node in nodes if node not in reachable)
            unapproved = ", ".join(node for node in nodes if node in reachable and node not in approved)
            raise FederationError(
                f"only {len(available)} nodes are reachable and approved the plan, fewer than "
                f"min_nodes={self.plan.min_nodes} (unreachable: {missing or 'none'}; not approved: {unapproved or 'none'})",
                round=round_number,
            )
        return available

    def _admitted_nodes(self) -> list[str]:
        reachable = self.transport.nodes()
        if self.plan.nodes is None:
            return reachable
        return sorted(self.plan.nodes)

    def _federated_normalization(self, nodes: list[str], result: RunResult) -> Standardization:
        if self.plan.secure_aggregation.enabled:
            return self._secure_normalization(nodes, result)
        jobs = {node: self._job(0, node, JobKind.FEATURE_STATS) for node in self._available(nodes, 0)}
        stats: list[FeatureStats] = []
        for answer in self._exchange(jobs, result):
            try:
                low, high = answer.statistics.get("bounds_low"), answer.statistics.get("bounds_high")
                stats.append(
                    FeatureStats(
                        # With differential privacy the count is noisy and travels as a statistic.
                        count=float(answer.statistics.get("count", (answer.num_examples,))[0]),
                        sum=np.asarray(answer.statistics["sum"], dtype=np.float64),
                        sum_of_squares=np.asarray(answer.statistics["sum_of_squares"], dtype=np.float64),
                        bounds=None if low is None or high is None else np.stack([low, high], axis=1).astype(np.float64),
                    )
                )
            except KeyError:
                self._record_failure(result, answer, "feature statistics are missing")
        widths = {s.sum.shape for s in stats} | {s.sum_of_squares.shape for s in stats}
        if len(stats) < self.plan.min_nodes or len(widths) != 1:
            reasons = "; ".join(f"{f['node_id']}: {f['error']}" for f in result.failures if f["round"] == 0)
            raise FederationError(
                f"federated normalization needs statistics of one width from at least "
                f"{self.plan.min_nodes} nodes, got {len(stats)}" + (f" ({reasons})" if reasons else ""),
                round=0,
            )
        standardization = combine_feature_stats(stats)
        self._emit(
            {
                "event": "normalization",
                "nodes": len(stats),
                "num_examples": round(sum(s.count for s in stats)),
                "bytes": self._take_traffic(),
            }
        )
        return standardization

    def _secure_normalization(self, nodes: list[str], result: RunResult) -> Standardization:
        """Federated normalization through secure aggregation: only the sums over all sites are revealed.

        Each site sends ``[count, sum u, sum u**2] / max_examples`` with ``u``
        its values mapped into ``[-1/2, 1/2]`` by the public bounds, and weight
        1; the total weight is the number of sites summed.
        """
        available = self._available(nodes, 0)
        if len(available) < self.plan.min_nodes:
            raise FederationError(
                f"federated normalization needs at least {self.plan.min_nodes} nodes, {len(available)} are available",
                round=0,
            )
        if self.statistics_width is None:
            raise ConfigError(
                "federated normalization under secure aggregation needs the coordinator's statistics_width",
                field="plan.dataset.normalization",
            )
        length = 1 + 2 * self.statistics_width
        secure = SecureRound(
            config=self.plan.secure_aggregation, run_id=self._run_id, round_number=0, nodes=available, model_size=length
        )
        jobs = {node: self._job(0, node, JobKind.FEATURE_STATS, config={"secagg": secure.train_config(node)}) for node in available}
        public: dict[str, Mapping[str, Any]] = {}
        mean, weight, survivors = self._secure_total(secure, jobs, result, first_answers=public)
        summed = [secure.node(i) for i in survivors]
        bounds = {
            (tuple(public[node].get("bounds_low", ())), tuple(public[node].get("bounds_high", ()))) for node in summed if node in public
        }
        if len(summed) < self.plan.min_nodes or len(bounds) != 1:
            raise FederationError(
                f"federated normalization needs one set of public bounds from at least {self.plan.min_nodes} nodes; "
                f"{len(summed)} nodes were summed with {len(bounds)} different bounds",
                round=0,
            )
        (low_values, high_values), = bounds
        low, high = np.asarray(low_values, dtype=np.float64), np.asarray(high_values, dtype=np.float64)
        width = (length - 1) // 2
        if low.shape != (width,) or high.shape != (width,) or not (high > low).all():
            raise FederationError("the sites' public bounds do not match the statistics' width", round=0)
        total = mean * weight * self.plan.secure_aggregation.max_examples
        stats = from_unit_moments(float(total[0]), total[1 : 1 + width], total[1 + width :], low=low, high=high)
        standardization = combine_feature_stats([stats])
        self._emit(
            {
                "event": "normalization",
                "nodes": len(summed),
                "num_examples": round(stats.count),
                "secure_aggregation": {"phases": secure.server.phase_sizes(), "clipped": secure.num_clipped},
                "bytes": self._take_traffic(),
            }
        )
        return standardization

    def _train_round(
        self, round_number: int, nodes: list[str], per_round: int, result: RunResult
    ) -> Parameters:
        plan = self.plan
        round_started = time.perf_counter()
        candidates = self._available(nodes, round_number)
        chosen = self.strategy.select(round_number, candidates)
        if chosen is None:
            count = min(per_round, len(candidates))
            selection = np.random.default_rng([plan.seed, round_number]).choice(len(candidates), count, replace=False)
            chosen = [candidates[i] for i in sorted(selection)]
        selected = chosen
        self._emit({"event": "round_start", "round": round_number, "nodes": selected})
        extra = self.strategy.configure_train(round_number, selected)
        global_parameters = result.parameters
        self.strategy.begin_round(round_number, global_parameters)
        secure = (
            SecureRound(
                config=plan.secure_aggregation,
                run_id=self._run_id,
                round_number=round_number,
                nodes=selected,
                model_size=global_parameters.num_elements,
                site_level=plan.privacy.site_level,
                compression=plan.compression,
            )
            if plan.secure_aggregation.enabled
            else None
        )
        jobs = {}
        for node in selected:
            seed = round_seed(plan.seed, round_number, nodes.index(node))
            config = {"seed": seed, **extra.get(node, {})}
            if secure is not None:
                config["secagg"] = secure.train_config(node)
            jobs[node] = self._job(round_number, node, JobKind.TRAIN, global_parameters, config)
        accepted: dict[str, int] = {}
        losses: list[tuple[float, int]] = []
        short_sites: list[str] = []
        steps: dict[str, float] = {}
        secure_metrics: dict[str, Any] = {}
        if secure is not None:
            accepted, secure_metrics = self._secure_sum(secure, jobs, global_parameters, result)
        answers = self._exchange(jobs, result) if secure is None else iter(())
        for answer in answers:
            try:
                update = self._check_update(answer, global_parameters)
                self.strategy.receive_data(answer.data, node_id=answer.node_id)
                self.strategy.accumulate(update, weight=answer.num_examples, node_id=answer.node_id)
            except ProtocolError as exc:
                self._record_failure(result, answer, exc.message)
                continue
            accepted[answer.node_id] = answer.num_examples
            result.train_examples[answer.node_id] = answer.num_examples
            if self.audit is not None and answer.update is not None:
                size, digest = update_digest(answer.update)
                self.audit.update_received(
                    run_id=self._run_id, round=round_number, peer=answer.node_id, size_bytes=size, sha256=digest
                )
            if "train_loss" in answer.metrics:
                losses.append((float(answer.metrics["train_loss"]), answer.num_examples))
            if answer.metrics.get("budget_stopped"):
                short_sites.append(answer.node_id)  # its time budget cut its local steps short
            steps[answer.node_id] = float(answer.metrics.get("steps", 0.0))
        if len(accepted) < plan.min_nodes:
            failed = [f for f in result.failures if f["round"] == round_number]
            reasons = "; ".join(f"{f['node_id']}: {f['error']}" for f in failed) or "no answers"
            self._emit({"event": "round_failed", "round": round_number, "nodes_ok": sorted(accepted)})
            raise FederationError(
                f"only {len(accepted)} of {len(selected)} nodes completed the round, fewer than "
                f"min_nodes={plan.min_nodes} ({reasons}); the checkpoint of round "
                f"{result.rounds_completed} is intact",
                round=round_number,
            )
        new_parameters = self.strategy.finalize().freeze()
        if short_sites and plan.strategy.name == "fedavg" and max(steps.values()) > 2 * max(min(steps.values()), 1):
            logger.warning(
                "time budgets left sites with unequal local steps; fedavg weighs them as equal, fednova normalizes them",
                extra={"run_id": self._run_id, "round": round_number, "short_sites": len(short_sites)},
            )
        result.participation[round_number] = sorted(accepted)
        total = sum(n for _, n in losses)
        self._emit(
            {
                "event": "round_end",
                "round": round_number,
                "nodes_ok": sorted(accepted),
                "nodes_failed": sorted(set(selected) - set(accepted)),
                "num_examples": sum(accepted.values()),
                "train_loss": sum(l * n for l, n in losses) / total if total else None,
                "duration_s": time.perf_counter() - round_started,
                "bytes": self._take_traffic(),
                **self._take_transport(),
                **self._take_compression(),
                **secure_metrics,
                **self._epsilon_metrics(selected, result),
                **({"site_level_dp": m} if (m := self.strategy.round_metrics()) else {}),
                **({"short_sites": sorted(short_sites)} if short_sites else {}),
            }
        )
        return new_parameters

    def _epsilon_metrics(self, nodes: Sequence[str], result: RunResult) -> dict[str, Any]:
        """The epsilon the round's sites report spent so far, for the round's event."""
        if not self.plan.privacy.record_level.enabled:
            return {}
        return {"dp_epsilon": {node: result.epsilon_spent[node] for node in nodes if node in result.epsilon_spent}}

    def _secure_sum(
        self, secure: SecureRound, train_jobs: Mapping[str, Job], global_parameters: Parameters, result: RunResult
    ) -> tuple[dict[str, int], dict[str, Any]]:
        """Run the SecAgg+ phases of one round and fold the weighted mean into the strategy.

        Returns the nodes whose masked updates are in the sum (with 0 examples:
        the coordinator does not learn counts) and the round's secure
        aggregation metrics.

        Raises
        ------
        FederationError
            If the protocol cannot complete (fewer than the threshold remain at
            some phase); no partial sum is released.
        """
        mean, weight, survivors = self._secure_total(secure, train_jobs, result)
        self.strategy.accumulate(
            Parameters.from_flat(mean.astype(np.float32), global_parameters.spec), weight=weight, node_id="secure-sum"
        )
        sizes = secure.server.phase_sizes()
        accepted = {secure.node(i): 0 for i in survivors}
        return accepted, {"secure_aggregation": {"phases": sizes, "clipped": secure.num_clipped}}

    def _secure_total(
        self,
        secure: SecureRound,
        first_jobs: Mapping[str, Job],
        result: RunResult,
        *,
        first_answers: dict[str, Mapping[str, Any]] | None = None,
    ) -> tuple[np.ndarray, float, list[int]]:
        """Run the SecAgg+ phases after ``first_jobs`` (which return public keys): (weighted mean, weight, survivors).

        With ``first_answers`` given, the data of each first answer is stored
        in it by node (public values sent beside the keys).

        Raises
        ------
        FederationError
            If the protocol cannot complete; no partial sum is released.
        """
        round_number = secure.round_number
        server = secure.server
        try:
            keys = {}
            for answer in self._exchange(first_jobs, result):
                key = self._field(answer, "keys", result)
                if key is not None:
                    keys[secure.index(answer.node_id)] = key
                    if first_answers is not None:
                        first_answers[answer.node_id] = answer.data
            rosters = server.receive_keys(keys)
            shares = self._secure_phase(
                secure, result, "share_keys", {i: {"roster": {str(j): a for j, a in r.items()}} for i, r in rosters.items()}
            )
            routed = server.receive_shares({i: {int(j): c for j, c in s["shares"].items()} for i, s in shares.items()})
            self._secure_phase(
                secure,
                result,
                "masked_input",
                {i: {"ciphertexts": {str(j): c for j, c in r.items()}, "vector_length": secure.context.params.vector_length} for i, r in routed.items()},
            )
            survivors = server.survivors()
            signed = self._secure_phase(
                secure, result, "consistency_check", {i: {"survivors": survivors} for i in survivors}
            )
            broadcast = server.receive_signatures({i: s["signature"] for i, s in signed.items()})
            signatures = {str(i): signature for i, signature in broadcast.items()}
            reveals = self._secure_phase(
                secure, result, "unmask", {i: {"survivors": survivors, "signatures": signatures} for i in map(int, signatures)}
            )
            total = server.finish({i: {int(j): v for j, v in r["shares"].items()} for i, r in reveals.items()})
            mean, weight = secure.weighted_mean(total)
        except (FedcareError, KeyError, TypeError, ValueError, AttributeError) as exc:
            message = exc.message if isinstance(exc, FedcareError) else f"malformed message ({type(exc).__name__}: {exc})"
            self._emit({"event": "round_failed", "round": round_number, "secure_aggregation": message})
            raise FederationError(
                f"secure aggregation failed: {message}; no partial sum was released and the checkpoint of round "
                f"{result.rounds_completed} is intact",
                round=round_number,
            ) from None
        return mean, weight, list(survivors)

    def _secure_phase(
        self, secure: SecureRound, result: RunResult, phase: str, messages: Mapping[int, Mapping[str, Any]]
    ) -> dict[int, Mapping[str, Any]]:
        """Send one SecAgg phase's messages; return the answers' data (masked inputs go to the server)."""
        jobs = {
            secure.node(i): self._job(secure.round_number, secure.node(i), JobKind.SECAGG, config={"secagg_phase": phase, **m})
            for i, m in messages.items()
        }
        answers: dict[int, Mapping[str, Any]] = {}
        for answer in self._exchange(jobs, result):
            index = secure.index(answer.node_id)
            if phase == "masked_input":
                if answer.update is None:
                    self._record_failure(result, answer, "masked input carries no vector")
                    continue
                try:
                    words = secure.masked_words(answer.update)
                    secure.server.add_masked_input(index, words)
                except ProtocolError as exc:
                    self._record_failure(result, answer, exc.message)
                    continue
                secure.num_clipped += int(answer.metrics.get("secagg_clipped", 0))
            answers[index] = answer.data
        return answers

    def _field(self, answer: JobResult, name: str, result: RunResult) -> Any:
        value = answer.data.get(name)
        if value is None:
            self._record_failure(result, answer, f"the answer carries no {name!r}")
        return value

    def _privacy_card(self, result: RunResult) -> dict[str, Any] | None:
        record_level = self.plan.privacy.record_level
        if not record_level.enabled:
            return None
        return {
            "record_level": {
                "mechanism": "DP-SGD (Opacus: per-example clipping, Gaussian noise, Poisson sampling)",
                "planned_epsilon": record_level.epsilon,
                "delta": record_level.delta,
                "max_grad_norm": record_level.max_grad_norm,
                "accountant": record_level.accountant,
                "feature_stats_epsilon_share": record_level.feature_stats_epsilon_share
                if self.plan.dataset.normalization == "federated" and record_level.feature_stats_noise_multiplier is None
                else None,
                "feature_stats_noise_multiplier": record_level.feature_stats_noise_multiplier,
                "epsilon_spent": dict(sorted(result.epsilon_spent.items())),
            }
        }

    def _evaluate(self, round_number: int, nodes: list[str], result: RunResult) -> EvaluationSummary:
        self._emit({"event": "phase", "round": round_number, "phase": "evaluation"})
        jobs = {
            node: self._job(round_number, node, JobKind.EVALUATE, result.parameters)
            for node in self._available(nodes, round_number)
        }
        sites: dict[str, dict[str, float]] = {}
        examples: dict[str, int] = {}
        for answer in self._exchange(jobs, result):
            sites[answer.node_id] = {k: float(v) for k, v in answer.metrics.items()}
            examples[answer.node_id] = answer.num_examples
        return self._evaluation_summary(round_number, sites, examples)

    def _evaluation_summary(
        self, round_number: int, sites: Mapping[str, Mapping[str, float]], examples: Mapping[str, int]
    ) -> EvaluationSummary:
        """Combine the sites' evaluation answers of one global model and emit the ``evaluation`` event."""
        by_site = {node: dict(metrics) for node, metrics in sorted(sites.items())}
        summary = aggregate_site_metrics(by_site, examples)
        evaluation = EvaluationSummary(
            round=round_number, sites=by_site, examples=dict(sorted(examples.items())), mean=summary["mean"], pooled=summary["pooled"]
        )
        self._emit(
            {
                "event": "evaluation",
                "round": round_number,
                "sites": evaluation.sites,
                "examples": evaluation.examples,
                "mean": evaluation.mean,
                "pooled": evaluation.pooled,
                "bytes": self._take_traffic(),
                **self._take_transport(),
            }
        )
        return evaluation

    # -- plumbing --------------------------------------------------------------

    def _job(
        self,
        round_number: int,
        node: str,
        kind: JobKind,
        parameters: Parameters | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Job:
        full_config = dict(config or {})
        if self._normalization is not None:
            full_config["normalization"] = self._normalization.to_config()
        return Job(
            run_id=self._run_id,
            round=round_number,
            job_id=f"{round_number}-{kind.value}-{node}-{uuid.uuid4().hex[:8]}",
            kind=kind,
            plan_hash=self._plan_hash,
            parameters=parameters,
            config=full_config,
        )

    def _exchange(self, jobs: Mapping[str, Job], result: RunResult) -> Iterator[JobResult]:
        """Submit ``jobs`` and yield the successful answers; record failures and stragglers."""
        pending: dict[str, str] = {}
        for node, job in jobs.items():
            if self._submit(node, job, result):
                pending[job.job_id] = node
        for raw in self.transport.results(list(pending), timeout_s=self.plan.round_timeout_s):
            answer = self._receive(raw, pending, result)
            if answer is not None:
                yield answer
        for job_id, node in pending.items():
            self._record_late(result, round_number=jobs[node].round, node=node, job_id=job_id)

    def _submit(self, node: str, job: Job, result: RunResult) -> bool:
        """Hand ``job`` to the transport and count its bytes; False (failure recorded) if it cannot be sent."""
        try:
            self.transport.submit(node, job)
        except TransportError as exc:
            failure = {"round": job.round, "node_id": node, "kind": job.kind.value, "error": exc.message}
            result.failures.append(failure)
            self._emit({"event": "node_failed", **failure})
            return False
        self._count(node, down=job.payload_bytes)
        return True

    def _receive(self, answer: JobResult, pending: dict[str, str], result: RunResult) -> JobResult | None:
        """Take one answer out of ``pending`` (job id to node); the answer if it is a success, else None (recorded)."""
        answer = self._count_transport(answer)
        expected = pending.pop(answer.job_id, None)
        if expected is None:
            logger.warning("refused a result for a job that is not outstanding", extra={"node_id": answer.node_id})
            return None
        if expected != answer.node_id or answer.run_id != self._run_id:
            mismatch = "another node" if expected != answer.node_id else "another run"
            self._record_failure(
                result, dataclasses.replace(answer, node_id=expected), f"result does not match its job (it names {mismatch})"
            )
            return None
        self._count(answer.node_id, up=answer.payload_bytes)
        if not answer.ok:
            self._record_failure(result, answer, answer.error or "unknown error")
            return None
        if "dp_epsilon" in answer.metrics:
            result.epsilon_spent[answer.node_id] = float(answer.metrics["dp_epsilon"])
        return answer

    def _record_late(self, result: RunResult, *, round_number: int, node: str, job_id: str) -> None:
        result.failures.append({"round": round_number, "node_id": node, "error": "no answer before the round deadline"})
        self._emit({"event": "node_late", "round": round_number, "node_id": node, "job_id": job_id})

    def _save_checkpoint(self, round_number: int, result: RunResult) -> None:
        """Save the global model after ``round_number`` with the strategy's state (no-op without a run directory)."""
        if self.run_dir is None:
            return
        saved: dict[str, Any] = {"run_id": self._run_id}
        if self._normalization is not None:
            saved["normalization"] = self._normalization.to_config()
        self.run_dir.save_checkpoint(
            round=round_number, parameters=result.parameters, state=saved, strategy_state=self.strategy.state_dict()
        )

    def _check_update(self, answer: JobResult, global_parameters: Parameters) -> Parameters:
        update = answer.update
        if update is None:
            raise ProtocolError("training result carries no update")
        update = self._decompressed(answer.node_id, update, global_parameters)
        if update.spec != global_parameters.spec:
            raise ProtocolError(
                f"update has tensors {_describe(update)}, the model has {_describe(global_parameters)}"
            )
        values = update.flatten()
        # A float32 sum is finite only if every value is (NaN and Inf propagate) and costs a
        # third of the float64 one, which decides only when the float32 sum overflows.
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(np.add.reduce(values)))
        if not (finite or np.isfinite(np.add.reduce(values, dtype=np.float64))):
            bad = int(np.count_nonzero(~np.isfinite(update.flatten())))
            raise ProtocolError(f"update contains {bad} non-finite values (NaN or Inf)")
        if answer.num_examples <= 0:
            raise ProtocolError(f"update reports {answer.num_examples} training examples")
        limit = self.plan.max_update_norm
        if limit is not None:
            norm = float(np.linalg.norm(values.astype(np.float64, copy=False)))
            if norm > limit:
                raise ProtocolError(f"update has L2 norm {norm:.4g}, above the plan's max_update_norm of {limit:g}")
        return update

    def _decompressed(self, node: str, update: Parameters, global_parameters: Parameters) -> Parameters:
        """Undo the plan's compression (see :mod:`fedcare.compression`), before any other check."""
        config = self.plan.compression
        if config.method == "none":
            return update
        decoded = decompress(update, global_parameters.spec, method=config.method, topk_fraction=config.topk_fraction)
        self._compression[node] = round(global_parameters.nbytes / max(update.nbytes, 1), 2)
        return decoded

    def _take_compression(self) -> dict[str, Any]:
        """``{"compression": {"method": ..., "ratio": {node: x}}}`` since the last call, then reset; empty without compression."""
        if self.plan.compression.method == "none" or not self._compression:
            return {}
        taken = dict(sorted(self._compression.items()))
        self._compression = {}
        return {"compression": {"method": self.plan.compression.method, "ratio": taken}}

    def _record_failure(self, result: RunResult, answer: JobResult, message: str) -> None:
        failure = {"round": answer.round, "node_id": answer.node_id, "kind": answer.kind.value, "error": message}
        result.failures.append(failure)
        logger.warning("node failed a job", extra={"node_id": answer.node_id, "round": answer.round})
        self._emit({"event": "node_failed", **failure})
        if self.audit is not None:
            self.audit.refusal(reason=f"round {answer.round} {answer.kind.value}: {message}"[:1000], peer=answer.node_id)

    def _write_report(self) -> None:
        assert self.run_dir is not None
        try:
            from fedcare.report import write_report

            write_report(self.run_dir.path)
        except Exception as exc:  # noqa: BLE001 - the run's record is saved; a failed report must not lose it
            logger.warning("report.html was not written: %s", exc)

    def _count(self, node: str, *, down: int = 0, up: int = 0) -> None:
        counts = self._traffic.setdefault(node, [0, 0])
        counts[0] += down
        counts[1] += up

    def _take_traffic(self) -> dict[str, dict[str, int]]:
        """Payload bytes down to and up from each node since the last call, then reset."""
        taken = {node: {"down": down, "up": up} for node, (down, up) in sorted(self._traffic.items())}
        self._traffic = {}
        return taken

    def _count_transport(self, answer: JobResult) -> JobResult:
        """Take a node's transport counters (``transport_*`` metrics, see ``GrpcNodeChannel``) out of its answer."""
        counters = {name: value for name, value in answer.metrics.items() if name.startswith(_TRANSPORT_PREFIX)}
        if not counters:
            return answer
        totals = self._transport.setdefault(answer.node_id, {})
        for name, value in counters.items():
            key = name.removeprefix(_TRANSPORT_PREFIX)
            totals[key] = totals.get(key, 0) + int(value)
        return dataclasses.replace(answer, metrics={k: v for k, v in answer.metrics.items() if k not in counters})

    def _take_transport(self) -> dict[str, Any]:
        """``{"transport": {node: {"retries": n, ...}}}`` since the last call, then reset; empty when no node reported."""
        taken = {node: dict(sorted(counts.items())) for node, counts in sorted(self._transport.items())}
        self._transport = {}
        return {"transport": taken} if taken else {}

    def _emit(self, event: dict[str, Any]) -> None:
        event = {"time": time.time(), **event}
        if self.run_dir is not None:
            self.run_dir.log_event(event)
        if self.on_event is not None:
            self.on_event(event)

    def _model_card(self, result: RunResult) -> dict[str, Any]:
        plan = self.plan
        final = result.final_evaluation
        return {
            "fedcare_version": __version__,
            "run_id": result.run_id,
            "plan_hash": self._plan_hash,
            "task": plan.task,
            "dataset": plan.dataset.model_dump(mode="json"),
            "strategy": plan.strategy.model_dump(mode="json"),
            "rounds_completed": result.rounds_completed,
            "sites": sorted(result.train_examples) or (sorted(final.sites) if final else []),
            "train_examples": dict(sorted(result.train_examples.items())),
            "test_examples": final.examples if final else {},
            "metrics": {"sites": final.sites, "mean": final.mean, "pooled": final.pooled} if final else {},
            "privacy": {
                "differential_privacy": self._privacy_card(result),
                "secure_aggregation": plan.secure_aggregation.enabled,
                "data_leaving_sites": (
                    "masked model updates (only their weighted sum is revealed), evaluation metrics"
                    if plan.secure_aggregation.enabled
                    else "model updates, metrics, example counts"
                )
                + (
                    (
                        ", per-feature counts, sums and sums of squares with DP noise"
                        if plan.privacy.record_level.enabled
                        else ", per-feature sums and sums of squares"
                    )
                    + (" (masked: only their sum over the sites is revealed)" if plan.secure_aggregation.enabled else "")
                    if plan.dataset.normalization == "federated"
                    else ""
                )
                + (", epsilon spent" if plan.privacy.record_level.enabled else ""),
            },
            "parameters": {name: list(shape) for name, shape in result.parameters.spec},
        }


def _describe(parameters: Parameters) -> str:
    return ", ".join(f"{name}{list(shape)}" for name, shape in parameters.spec[:4]) + (
        ", ..." if len(parameters) > 4 else ""
    )
