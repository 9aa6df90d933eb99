"""The node: one site's side of the federation."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.compression import ErrorFeedback, compress, decompress, topk_dense, topk_dense_mask
from fedcare.data.normalization import Standardization, checked_bounds, feature_stats, unit_moments
from fedcare.errors import ConfigError, FedcareError, ProtocolError
from fedcare.federation.control_variates import NodeControlVariate
from fedcare.federation.differential_privacy import NodePrivacy
from fedcare.federation.policy import NodePolicy
from fedcare.federation.secure_aggregation import NodeSecureAggregation, secure_ring_bits
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.personalization import fine_tune, personalized
from fedcare.plan import Plan, plan_hash
from fedcare.strategies.ditto import DITTO_KEY
from fedcare.strategies.fednova import STEPS_KEY
from fedcare.strategies.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY
from fedcare.tasks.base import SiteData, Task, TrainHook
from fedcare.tasks.compute import ComputeSettings, TimeBudget, resolve_device, time_budget_seconds
from fedcare.tasks.hooks import ProximalTerm, trainable_only
from fedcare.transport.base import NodeChannel

__all__ = ["Node", "ProgressCallback", "RefusingNode", "TrainingProgress"]

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 500

#: Mixed into the job seed for int8's stochastic rounding, apart from the task's own use of the seed.
_COMPRESSION_STREAM = 0x636F6D70

#: Receives ``(node_id, round, steps_done, steps_planned)`` during local training.
ProgressCallback = Callable[[str, int, int, int], None]


class TrainingProgress(TrainHook):
    """Reports local training's optimizer steps to a callback, at most every ``min_interval_s`` seconds.

    It only counts: the loss goes back unchanged and it wraps nothing, so
    training with it gives exactly the weights training without it gives.
    The first and the last planned step are always reported.

    Parameters
    ----------
    callback : callable
        Called as ``callback(node_id, round, steps_done, steps_planned)``.
    node_id : str
        The site training.
    round : int
        The federation round.
    steps_planned : int
        Optimizer steps the round plans (see
        :func:`fedcare.tasks.torch_task.planned_steps`).
    min_interval_s : float
        Least time between two calls, in seconds (default 0.1: about 10 a second).

    Examples
    --------
    >>> calls = []
    >>> hook = TrainingProgress(lambda *a: calls.append(a), node_id="site-0", round=1, steps_planned=3,
    ...                         min_interval_s=3600)
    >>> [hook.on_loss(None, loss) for loss in (0.5, 0.4, 0.3)]
    [0.5, 0.4, 0.3]
    >>> calls
    [('site-0', 1, 1, 3), ('site-0', 1, 3, 3)]
    """

    def __init__(
        self,
        callback: ProgressCallback,
        *,
        node_id: str,
        round: int,  # noqa: A002 - the federation's own word
        steps_planned: int,
        min_interval_s: float = 0.1,
    ) -> None:
        self.callback = callback
        self.node_id = node_id
        self.round = round
        self.steps_planned = steps_planned
        self.min_interval_s = min_interval_s
        self.steps_done = 0
        self._last_call_s = -float("inf")

    def on_loss(self, model: Any, loss: Any) -> Any:
        self.steps_done += 1
        now = time.monotonic()
        if self.steps_done == self.steps_planned or now - self._last_call_s >= self.min_interval_s:
            self._last_call_s = now
            self._report()
        return loss

    def close(self) -> None:
        if self.steps_done and self.steps_done != self.steps_planned:
            self._report()  # a round that stopped early (or ran over) still shows where it ended

    def _report(self) -> None:
        try:
            self.callback(self.node_id, self.round, self.steps_done, self.steps_planned)
        except Exception as exc:  # a display must not fail training
            logger.warning("progress callback raised", extra={"node_id": self.node_id, "error_type": type(exc).__name__})


class Node:
    """A site: runs registered tasks on its own data and returns only updates and numbers.

    Parameters
    ----------
    node_id : str
        The site's identifier (in deployment, its certificate's subject).
    task : Task
        The locally installed task the plan names.
    data : SiteData
        The site's local data; it never leaves this object.
    plan : Plan
        The plan the site approved; jobs made for another plan are refused.
    policy : NodePolicy, optional
        What the site requires of every round (default: nothing beyond the plan).
    ledger_dir : Path, optional
        Where the site's privacy ledgers live; needed when the plan enables
        record-level DP.
    state_dir : Path, optional
        Where the site keeps strategy state across restarts (SCAFFOLD's
        control variate); without it such state lives in memory only.
    secure_noise : bool
        Seed DP noise from the operating system (default). Simulations pass
        ``False`` to derive it from the job seeds, so a study can be repeated.
    on_progress : callable, optional
        Called as ``on_progress(node_id, round, steps_done, steps_planned)``
        during local training, at most about 10 times a second (see
        :class:`TrainingProgress`); it does not change what training computes.
    compute : ComputeSettings, optional
        The site's machine (``compute:`` in node.yaml): models train on the
        device it resolves to (:func:`~fedcare.tasks.compute.resolve_device`),
        and its ``max_local_seconds`` caps each round's local training below
        the plan's ``local.max_local_seconds``. ``None`` (simulations, tests):
        the CPU, and the plan's budget only. CPU threads are not set here:
        they are process-wide (:func:`~fedcare.tasks.compute.configure_threads`).

    Raises
    ------
    ConfigError
        If the plan enables record-level DP without ``ledger_dir``, or
        ``compute`` asks for CUDA on a machine without it (``node.compute.device``).

    Examples
    --------
    >>> from fedcare.data import DatasetCatalog
    >>> from fedcare.plan import parse_plan
    >>> from fedcare.tasks.tabular import LogisticTask
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 1,
    ...                    "dataset": {"name": "breast-cancer", "normalization": "per-site"}})
    >>> data = DatasetCatalog.bundled().get("breast-cancer").load_site(plan.dataset, "site-0")
    >>> node = Node("site-0", task=LogisticTask(), data=data, plan=plan)
    >>> job = Job("run", 0, "j0", JobKind.FEATURE_STATS, plan_hash=plan_hash(plan))
    >>> node.handle(job).num_examples == len(data.train)
    True
    """

    def __init__(
        self,
        node_id: str,
        *,
        task: Task,
        data: SiteData,
        plan: Plan,
        policy: NodePolicy | None = None,
        ledger_dir: Path | None = None,
        state_dir: Path | None = None,
        secure_noise: bool = True,
        on_progress: ProgressCallback | None = None,
        compute: ComputeSettings | None = None,
    ) -> None:
        self.node_id = node_id
        self.device = resolve_device(compute)
        #: One round's local training budget in seconds: the lower of the plan's and the site's.
        self.max_local_seconds = time_budget_seconds(
            plan.local.max_local_seconds, None if compute is None else compute.max_local_seconds
        )
        self.on_progress = on_progress
        self.task = task
        self.plan = plan
        self.policy = policy or NodePolicy()
        self._privacy: NodePrivacy | None = None
        if plan.privacy.record_level.enabled:
            if ledger_dir is None:
                raise ConfigError(
                    "the plan enables record-level DP, so the site needs a privacy ledger directory",
                    node_id=node_id,
                    field="ledger_dir",
                )
            self._privacy = NodePrivacy(
                plan,
                policy=self.policy,
                ledger_dir=ledger_dir,
                num_examples=len(data.train),
                spec=data.spec,
                secure_noise=secure_noise,
            )
        self._secure = NodeSecureAggregation(
            min_participants=self.policy.min_participants,
            site_level=plan.privacy.site_level,
            # Distributed-DP noise shares: from the OS in deployments, repeatable in simulations.
            noise_rng=None if secure_noise else np.random.default_rng([plan.seed, *node_id.encode()]),
            # The ring of the secure sum follows the approved plan's compression; rounds in another are refused.
            ring_bits=secure_ring_bits(plan.compression) if plan.secure_aggregation.enabled else 32,
        )
        self._data = data
        self._plan_hash = plan_hash(plan)
        self._model: Any = None
        self._prepared: tuple[Any, SiteData] | None = None
        # SCAFFOLD's c_i: saved in state_dir, so a restarted node of the same run keeps it.
        self._control = NodeControlVariate(None if state_dir is None else state_dir / "scaffold-control.safetensors")
        # FedBN: this site's own normalization tensors, kept in memory from its last training round.
        self._local_tensors: dict[str, np.ndarray] | None = None
        self._personal: Any = None  # Ditto's personal model v_i, in memory only
        # Top-k's error feedback: what was left out of the last upload, saved in state_dir like c_i.
        self._feedback = ErrorFeedback(None if state_dir is None else state_dir / "compression-residual.safetensors")
        # The latest TRAIN and FEATURE_STATS releases, answered again if the same job comes again.
        self._released: dict[JobKind, _Release] = {}
        self._secure_release: tuple[np.ndarray, int, bool] | None = None

    # -- serving ---------------------------------------------------------------

    def serve(self, channel: NodeChannel, *, poll_s: float = 0.5) -> None:
        """Pull jobs and push results until the channel closes."""
        while not channel.closed:
            job = channel.pull_job(timeout_s=poll_s)
            if job is None:
                continue
            channel.push_result(self.handle(job))

    def handle(self, job: Job) -> JobResult:
        """Do one job; failures become a result with ``error`` set, never an exception."""
        started = time.perf_counter()
        context = {"node_id": self.node_id, "round": job.round}
        try:
            if job.plan_hash != self._plan_hash:
                raise ProtocolError(
                    "job was made for a different plan than the one this site approved",
                    node_id=self.node_id,
                    round=job.round,
                )
            if job.parameters is not None:
                _check_finite(job.parameters)  # before any training: a refused job reads no record, spends no budget
            if job.kind in (JobKind.TRAIN, JobKind.FEATURE_STATS):
                result = self._release_once(job)
            elif job.kind is JobKind.EVALUATE:
                result = self._evaluate(job)
            elif job.kind is JobKind.SECAGG:
                result = self._secure_step(job)
            else:  # pragma: no cover - JobKind is closed
                raise ProtocolError(f"unknown job kind {job.kind!r}")
        except FedcareError as exc:
            logger.warning("job refused or failed", extra={**context, "error_type": type(exc).__name__})
            # The field names the rule (policy.allowed_statistics, ...): the coordinator learns which.
            result = self._failure(job, f"{exc.field}: {exc.message}" if exc.field else exc.message)
        except Exception as exc:  # a task's own failure: report it, keep serving
            logger.warning("task raised", extra={**context, "error_type": type(exc).__name__})
            result = self._failure(job, f"task raised {type(exc).__name__}: {exc}")
        return _with_duration(result, time.perf_counter() - started)

    # -- jobs ------------------------------------------------------------------

    def _release_once(self, job: Job) -> JobResult:
        """Do a TRAIN or FEATURE_STATS job, or answer again what this node already released for it.

        A coordinator that restarts (``fedcare serve --resume``) sends the
        interrupted round's jobs again: same run, round, global parameters and
        settings, new job ids. Training again would release a second, different
        update from the same records and spend the privacy budget twice; the
        node instead sends the same values again (under secure aggregation,
        masked afresh for the new session), trains nothing and spends nothing.
        Only the latest round's release of each kind is kept (O(model) memory).
        """
        fingerprint = _fingerprint(job)
        kept = self._released.get(job.kind)
        if kept is not None and kept.fingerprint == fingerprint:
            logger.info("the same job again: answering with what was released", extra={"node_id": self.node_id, "round": job.round})
            if kept.secure is None:
                return dataclasses.replace(kept.result, job_id=job.job_id)
            vector, num_examples, statistics = kept.secure
            keys = self._secure.start(
                config=job.config["secagg"], run_id=job.run_id, round_number=job.round, update=vector.copy(),
                num_examples=num_examples, statistics=statistics,
            )  # fmt: skip
            return dataclasses.replace(kept.result, job_id=job.job_id, data={**kept.result.data, "keys": keys})
        self._secure_release = None
        result = self._train(job) if job.kind is JobKind.TRAIN else self._feature_stats(job)
        if result.ok:
            self._released[job.kind] = _Release(fingerprint, result, self._secure_release)
        return result

    def _start_secure(self, job: Job, secure: Any, vector: np.ndarray, *, num_examples: int, statistics: bool = False) -> Any:
        """Start this round's secure sum of ``vector``, keeping a copy in case the job comes again."""
        self._secure_release = (vector.copy(), num_examples, statistics)
        return self._secure.start(
            config=secure, run_id=job.run_id, round_number=job.round, update=vector,
            num_examples=num_examples, statistics=statistics,
        )  # fmt: skip

    def _train(self, job: Job) -> JobResult:
        if job.parameters is None:
            raise ProtocolError("a training job must carry the global parameters")
        secure = job.config.get("secagg")
        self.policy.check_secure_aggregation(enabled=secure is not None)
        self.policy.check_record_level_dp(enabled=self._privacy is not None)
        if secure is not None:
            # Check the round's settings (and the policy) before spending time on training.
            context, _, _ = NodeSecureAggregation.context_from(secure, run_id=job.run_id, round_number=job.round)
            self._secure.check_ring(context)
            self.policy.check_participants(context.params.num_nodes, stage="announced")
        seed = job.config.get("seed", 0)
        if type(seed) is not int:
            raise ProtocolError(f"the job's seed must be an integer, got {type(seed).__name__}")
        hooks: list[TrainHook] = []
        if self._privacy is not None:
            # Refused here, before any training, if the round would overspend the site's budget.
            hook, mechanism = self._privacy.training_hook(run_id=job.run_id, round_number=job.round, seed=seed)
            hooks.append(hook)
        model = self._model_with(job.parameters)
        # The strategy's own training terms; both capture the global weights now, before training.
        for key, name in (("proximal_mu", "fedprox"), (CONTROL_KEY, "scaffold"), (DITTO_KEY, "ditto")):
            if key in job.config and self.plan.strategy.name != name:
                raise ProtocolError(f"the job asks for {name} training, but the approved plan names another strategy")
        if "proximal_mu" in job.config:
            hooks.append(ProximalTerm(model, mu=float(job.config["proximal_mu"])))
        if CONTROL_KEY in job.config:
            hooks.append(self._control.training_hook(model, job.config[CONTROL_KEY], job.parameters, run_id=job.run_id))
        data = self._prepare(job.config)
        personal_metrics: dict[str, float] = {}
        if DITTO_KEY in job.config:
            personal_metrics = self._train_personal(job.parameters, float(job.config[DITTO_KEY]), data, seed=seed)
        if self.on_progress is not None:
            # Last, so it counts the steps after every other hook shaped the loss; it changes nothing.
            from fedcare.tasks.torch_task import planned_steps

            planned = planned_steps(len(data.train), self.plan.local) if len(data.train) else 0
            hooks.append(TrainingProgress(self.on_progress, node_id=self.node_id, round=job.round, steps_planned=planned))
        budget = None if self.max_local_seconds is None else TimeBudget(self.max_local_seconds)  # its clock starts now
        if budget is not None:
            hooks.append(budget)
        outcome = self.task.train(model, data.train, self.plan, seed=seed, hooks=hooks)
        compute_metrics = {"steps": float(outcome.steps)}
        if budget is not None:
            compute_metrics["budget_stopped"] = float(budget.stopped)
        privacy_metrics: dict[str, float] = {}
        if self._privacy is not None:
            if outcome.steps != mechanism.steps and outcome.steps >= 1:
                # Account exactly the steps that ran: more than planned, or fewer when the time budget cut them.
                mechanism = dataclasses.replace(mechanism, steps=outcome.steps)
            self._privacy.record(mechanism, run_id=job.run_id, round_number=job.round)
            privacy_metrics = dict(self._privacy.summary())
        new = self.task.get_parameters(model)
        if new.spec != job.parameters.spec:
            raise ProtocolError("the task changed the model's tensors during training")
        if self.plan.strategy.name == "fedbn":
            self._local_tensors = {name: new[name].copy() for name in self.task.local_parameter_names(model)}
        delta = new.flatten()
        np.subtract(delta, job.parameters.flatten(), out=delta)
        # A float32 sum is finite only if every value is (NaN and Inf propagate) and costs a
        # third of the float64 one, which decides only when the float32 sum overflows.
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(np.add.reduce(delta)))
        if not (finite or np.isfinite(np.add.reduce(delta, dtype=np.float64))):
            raise ProtocolError("local training produced non-finite weights (NaN or Inf); lower the learning rate")
        side: dict[str, Any] = {}
        if CONTROL_KEY in job.config:
            side[CONTROL_DELTA_KEY] = self._control.finish(
                delta, steps=outcome.steps, learning_rate=self.plan.local.learning_rate
            )
        if self.plan.strategy.name == "fednova":
            side[STEPS_KEY] = outcome.steps
        if secure is not None:
            # The update stays here; only public keys leave now, and later the masked sum's share.
            keys = self._start_secure(job, secure, delta, num_examples=outcome.num_examples)
            return self._answer(job, data={"keys": keys}, metrics={**compute_metrics, **privacy_metrics})
        training_metrics = (
            {**outcome.metrics, **personal_metrics} if "training_metrics" in self.policy.allowed_statistics else {}
        )
        refit: Callable[[np.ndarray], np.ndarray] | None = None
        if self.plan.compression.refits(record_level_dp=self.plan.privacy.record_level.enabled) and not (
            budget is not None and budget.stopped  # out of time: the dense tensors go as trained
        ):
            refit = functools.partial(self._refit_dense, job.parameters, data, seed=seed, budget=budget)

        return self._answer(
            job,
            update=self._compressed(delta, new.spec, run_id=job.run_id, seed=seed, refit=refit),
            num_examples=outcome.num_examples,
            metrics={**training_metrics, **compute_metrics, **privacy_metrics},
            data=side,
        )

    def _compressed(
        self,
        delta: np.ndarray,
        spec: Any,
        *,
        run_id: str,
        seed: int,
        refit: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Parameters:
        """The update as the plan's ``compression`` packs it (DP noise, if any, is already in ``delta``).

        ``refit`` (top-k only) takes the decoded update as selected and returns
        it with its dense tensors refitted; the sparse part, and so the
        residual of error feedback, stay as selected.
        """
        config = self.plan.compression
        if config.method == "none":
            return Parameters.from_flat(delta, spec)
        rng = np.random.default_rng([seed, _COMPRESSION_STREAM])  # int8's rounding: repeatable from the job
        if config.method == "topk" and config.error_feedback:
            packed = self._feedback.compress(
                delta, spec, run_id=run_id, method=config.method, topk_fraction=config.topk_fraction, rng=rng
            )
        else:
            packed = compress(delta, spec, method=config.method, topk_fraction=config.topk_fraction, rng=rng)
        if refit is None or config.method != "topk":
            return packed
        sent = decompress(packed, spec, method="topk", topk_fraction=config.topk_fraction).flatten()
        # At most k non-zero sparse values, all of them the ones selected: top-k picks the same again.
        return compress(refit(sent), spec, method="topk", topk_fraction=config.topk_fraction)

    def _refit_dense(
        self, start: Parameters, data: SiteData, sent: np.ndarray, *, seed: int, budget: TimeBudget | None
    ) -> np.ndarray:
        """``sent`` with its dense tensors retrained on the model the coordinator will see of this update.

        The model is set to the round's global weights plus the sparse part of
        ``sent`` (the dense tensors back where training started), then the
        plan's local schedule runs again with only the dense tensors trainable
        (no strategy terms; the round's time budget still applies). Their
        change is the dense part of the result; the sparse part is ``sent``'s.
        """
        spec = start.spec
        fraction = self.plan.compression.topk_fraction
        mask = topk_dense_mask(spec, fraction=fraction)
        base = start.flatten()
        # Through _model_with, so FedBN's site-kept normalization starts from the site's values, as in training.
        model = self._model_with(Parameters.from_flat(np.where(mask, base, base + sent).astype(np.float32), spec))
        if not hasattr(model, "named_parameters"):
            raise ConfigError(
                "compression.refit_dense retrains the dense tensors of a torch model; this task's model is not "
                "one, set compression.refit_dense: false",
                field="plan.compression.refit_dense",
            )
        dense_names = [name for (name, _), dense in zip(spec, topk_dense(spec, fraction=fraction), strict=True) if dense]
        with trainable_only(model, dense_names):
            self.task.train(model, data.train, self.plan, seed=seed, hooks=[] if budget is None else [budget])
        refitted = self.task.get_parameters(model)
        if self.plan.strategy.name == "fedbn":  # the site's own normalization, fitted to the body it sends
            self._local_tensors = {name: refitted[name].copy() for name in self.task.local_parameter_names(model)}
        delta = refitted.flatten()
        np.subtract(delta, base, out=delta)
        if not np.isfinite(delta[mask]).all():
            raise ProtocolError("refitting the dense tensors produced non-finite weights; lower the learning rate")
        return np.where(mask, delta, sent).astype(np.float32)

    def _evaluate(self, job: Job) -> JobResult:
        if job.parameters is None:
            raise ProtocolError("an evaluation job must carry the global parameters")
        self.policy.check_statistic("evaluation_metrics")
        model = self._model_with(job.parameters)
        data = self._prepare(job.config)
        epochs = self.plan.evaluation.fine_tune_epochs
        if epochs > 0 and job.round == self.plan.rounds:  # the evaluation after the last round
            parameters = self.task.get_parameters(model)  # a FedBN site's own normalization included
            metrics = fine_tune(self.plan, parameters, data, task=self.task, epochs=epochs, seed=self.plan.seed)
        else:
            metrics = self.task.evaluate(model, data.test)
        if self._personal is not None:
            metrics = {**metrics, **personalized(self.task.evaluate(self._personal, data.test))}
        return self._answer(
            job,
            num_examples=len(data.test),
            metrics=metrics,
        )

    def _secure_step(self, job: Job) -> JobResult:
        data, masked, num_clipped = self._secure.step(config=job.config, run_id=job.run_id, round_number=job.round)
        if masked is None:
            return self._answer(job, data=data)
        return self._answer(job, update=masked, metrics={"secagg_clipped": float(num_clipped)})

    def _feature_stats(self, job: Job) -> JobResult:
        self.policy.check_statistic("feature_statistics")
        secure = job.config.get("secagg")
        self.policy.check_secure_aggregation(enabled=secure is not None)
        if secure is not None:
            return self._secure_feature_stats(job, secure)
        if self._privacy is not None:
            private, _ = self._privacy.feature_stats(self._data.train.x, run_id=job.run_id, node_id=self.node_id)
            assert private.bounds is not None
            return self._answer(
                job,
                statistics={
                    "count": (private.count,),
                    "sum": tuple(private.sum.tolist()),
                    "sum_of_squares": tuple(private.sum_of_squares.tolist()),
                    "bounds_low": tuple(private.bounds[:, 0].tolist()),
                    "bounds_high": tuple(private.bounds[:, 1].tolist()),
                },
                metrics=dict(self._privacy.summary()),
            )
        stats = feature_stats(self._data.train.x)
        return self._answer(
            job,
            num_examples=stats.count,
            statistics={"sum": tuple(stats.sum.tolist()), "sum_of_squares": tuple(stats.sum_of_squares.tolist())},
        )

    def _secure_feature_stats(self, job: Job, secure: Any) -> JobResult:
        """Start a secure sum of ``[count, sum u, sum u**2] / max_examples`` (``u`` in [-1/2, 1/2]).

        Each site weighs 1, so the coordinator learns only the sums over all
        sites, and maps them back to the original units with the public bounds.
        """
        spec = self._data.spec
        if len(spec.feature_bounds) != spec.channels:
            raise ConfigError(
                "federated normalization with secure aggregation needs public bounds for every feature, and this "
                "dataset declares none; use normalization: per-site or none",
                field="plan.dataset.normalization",
            )
        low, high = checked_bounds(spec.feature_bounds, width=spec.channels)
        x = self._data.train.x
        max_examples = int(secure.get("max_examples", 0))
        if len(x) > max_examples:
            raise ConfigError(
                f"this site trains on more examples than secure_aggregation.max_examples ({max_examples}); "
                "raise it in the plan",
                field="plan.secure_aggregation.max_examples",
            )
        metrics: dict[str, float] = {}
        if self._privacy is not None:
            private, _ = self._privacy.feature_stats(x, run_id=job.run_id, node_id=self.node_id)
            width, middle = high - low, (high + low) / 2
            count = float(private.count)
            sum_u = (private.sum - middle * count) / width
            squares_u = (private.sum_of_squares - middle**2 * count - 2 * middle * width * sum_u) / width**2
            metrics = dict(self._privacy.summary())
        else:
            count, sum_u, squares_u = unit_moments(x, low=low, high=high)
        vector = np.concatenate([[count], sum_u, squares_u]) / max_examples
        keys = self._start_secure(job, secure, vector, num_examples=max_examples, statistics=True)
        return self._answer(
            job,
            data={"keys": keys, "bounds_low": low.tolist(), "bounds_high": high.tolist()},
            metrics=metrics,
        )

    # -- helpers ---------------------------------------------------------------

    def _model_with(self, parameters: Parameters) -> Any:
        if self._model is None:
            self._model = self.task.to_device(self.task.build_model(self._data.spec, self.plan), self.device)
        if self._local_tensors is not None:  # FedBN: the global values of local tensors are ignored
            local = self._local_tensors
            parameters = Parameters({name: local.get(name, value) for name, value in parameters.items()})
        self.task.set_parameters(self._model, parameters)
        return self._model

    def _train_personal(
        self, global_parameters: Parameters, ditto_lambda: float, data: SiteData, *, seed: int
    ) -> dict[str, float]:
        """Ditto: train the personal model ``v`` with ``lambda / 2 ||v - w_global||^2``, from its last state."""
        if self._personal is None:
            self._personal = self.task.to_device(self.task.build_model(self._data.spec, self.plan), self.device)
            state = global_parameters  # v starts from the first global model this site receives
        else:
            state = self.task.get_parameters(self._personal)
        self.task.set_parameters(self._personal, global_parameters)
        hook = ProximalTerm(self._personal, mu=ditto_lambda)  # anchors a copy of w_global now
        self.task.set_parameters(self._personal, state)
        outcome = self.task.train(self._personal, data.train, self.plan, seed=seed, hooks=[hook])
        return personalized({k: v for k, v in outcome.metrics.items() if k == "train_loss"})

    def _prepare(self, config: Any) -> SiteData:
        """The local data as the plan's normalization asks, cached between rounds."""
        mode = self.plan.dataset.normalization
        if mode == "none":
            return self._data
        if mode == "per-site":
            key: Any = "per-site"
        else:
            if "normalization" not in config:
                raise ProtocolError("federated normalization was planned but the job carries no statistics")
            value = config["normalization"]
            key = (tuple(value["mean"]), tuple(value["scale"]))
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        if mode == "per-site":
            standardization = Standardization.fit(self._data.train.x)
        else:
            standardization = Standardization.from_config(value, num_features=self._data.spec.channels)
        prepared = standardization.apply_site(self._data)
        self._prepared = (key, prepared)
        return prepared

    def _answer(self, job: Job, **fields: Any) -> JobResult:
        """A result echoing ``job``'s identifiers, from this node."""
        return JobResult(
            run_id=job.run_id, round=job.round, job_id=job.job_id, kind=job.kind, node_id=self.node_id, **fields
        )

    def _failure(self, job: Job, message: str) -> JobResult:
        return self._answer(
            job,
            error=message[:_MAX_ERROR_CHARS],
        )


class RefusingNode:
    """A site that has refused the plan: it answers every job with the same reason, and trains nothing.

    A site whose data cannot serve the plan (local labels it has not mapped
    onto the plan's vocabulary, no readable records) still answers, so that
    the coordinator records the specific reason instead of a silent absence.

    Examples
    --------
    >>> from fedcare.messages import Job, JobKind
    >>> node = RefusingNode("st-mary", reason="local labels not mapped: 'Effusion' (12)")
    >>> node.handle(Job("run", 1, "j1", JobKind.TRAIN, plan_hash="0" * 64)).error
    "st-mary refuses the plan: local labels not mapped: 'Effusion' (12)"
    """

    def __init__(self, node_id: str, *, reason: str) -> None:
        self.node_id = node_id
        self.reason = reason

    def serve(self, channel: NodeChannel, *, poll_s: float = 0.5) -> None:
        """Answer jobs with the refusal until the channel closes."""
        while not channel.closed:
            job = channel.pull_job(timeout_s=poll_s)
            if job is not None:
                channel.push_result(self.handle(job))

    def handle(self, job: Job) -> JobResult:
        """The refusal, as the result of ``job``."""
        message = f"{self.node_id} refuses the plan: {self.reason}"
        return JobResult(
            run_id=job.run_id, round=job.round, job_id=job.job_id, kind=job.kind, node_id=self.node_id,
            error=message[:_MAX_ERROR_CHARS],
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Release:
    """What a node released for one job: its result and, under secure aggregation, the vector it summed."""

    fingerprint: str
    result: JobResult
    secure: tuple[np.ndarray, int, bool] | None


def _fingerprint(job: Job) -> str:
    """SHA-256 of what decides a job's release: run, round, kind, global parameters, settings (secure session aside)."""
    digest = hashlib.sha256()
    config = {key: value for key, value in job.config.items() if key != "secagg"}
    digest.update(json.dumps([job.run_id, job.round, job.kind.value, config], sort_keys=True, default=str).encode())
    if job.parameters is not None:
        digest.update(json.dumps(job.parameters.spec).encode())
        digest.update(np.ascontiguousarray(job.parameters.flatten()).data)
    return digest.hexdigest()


def _check_finite(parameters: Parameters) -> None:
    """Refuse global parameters holding NaN or Inf (a float32 sum is finite only if every value is)."""
    values = parameters.flatten()
    with np.errstate(over="ignore", invalid="ignore"):
        finite = bool(np.isfinite(np.add.reduce(values)))
    if not (finite or np.isfinite(np.add.reduce(values, dtype=np.float64))):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ProtocolError(f"the global parameters hold {bad} non-finite values (NaN or Inf); the job is refused")


def _with_duration(result: JobResult, duration_s: float) -> JobResult:
    from dataclasses import replace

    return replace(result, duration_s=duration_s)
