"""Deployment: a coordinator process that listens, node processes that dial out.

``serve`` runs the same :class:`~fedcare.federation.Coordinator` as a
simulation over a :class:`~fedcare.transport.grpc_server.GrpcTransport`;
``run_node`` runs the same :class:`~fedcare.federation.Node` over a
:class:`~fedcare.transport.grpc_client.GrpcNodeChannel`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from fedcare.data.catalog import DatasetCatalog
from fedcare.data.manifest import DatasetManifest, ManifestDataset, load_manifest_site
from fedcare.errors import ConfigError, DataError, FedcareError, FederationError, PolicyViolation
from fedcare.federation.coordinator import Coordinator, EventCallback, RunResult
from fedcare.federation.node import Node, ProgressCallback
from fedcare.federation.policy import NodePolicy
from fedcare.federation.rundir import RunDirectory
from fedcare.messages import Job, JobResult
from fedcare.params import update_digest
from fedcare.plan import Plan, _format_validation_error, load_plan, plan_hash, read_yaml
from fedcare.simulation import check_plan, initial_parameters
from fedcare.strategies import make_strategy
from fedcare.tasks.base import SiteData
from fedcare.tasks.compute import ComputeSettings, configure_threads, resolve_device
from fedcare.tasks.registry import TaskRegistry
from fedcare.tracking import chain_events, make_tracker, run_tracked
from fedcare.transport.base import NodeChannel

if TYPE_CHECKING:
    from fedcare.transport.grpc_server import GrpcTransport

__all__ = [
    "ComputeSettings",
    "DatasetBinding",
    "NodeConfig",
    "SiteDataset",
    "load_node_config",
    "load_site_data",
    "manifest_catalog",
    "run_node",
    "serve",
]

logger = logging.getLogger(__name__)


class DatasetBinding(BaseModel):
    """A bundled dataset at this site: which of its sites this one is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str


def _binding_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "bundled" if "site" in value else "manifest"
    return "bundled" if isinstance(value, DatasetBinding) else "manifest"


#: A ``datasets:`` entry of node.yaml: ``{site: NAME}`` for a bundled dataset, or the manifest of
#: the site's own files (``format``, ``path``, ``labels``, ``label_map``, ...).
SiteDataset = Annotated[
    Annotated[DatasetBinding, Tag("bundled")] | Annotated[DatasetManifest, Tag("manifest")],
    Discriminator(_binding_kind),
]


class NodeConfig(BaseModel):
    """A site's ``node.yaml``.

    Examples
    --------
    >>> cfg = NodeConfig.model_validate({"name": "cleveland",
    ...                                  "datasets": {"heart-disease": {"site": "cleveland"}}})
    >>> cfg.datasets["heart-disease"].site
    'cleveland'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The node's name: its certificate's common name.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    #: Datasets this site holds, by the name plans use: bundled ones (``site:``) or the site's own
    #: files described by a manifest (see docs/data.md).
    datasets: dict[str, SiteDataset]
    #: When set, the site runs only the plan with this SHA-256, and approves it without asking.
    approved_plan_hash: str | None = None
    #: What the site requires of every round (secure aggregation, participants, privacy budgets).
    policy: NodePolicy = NodePolicy()
    #: The site's machine: device, CPU threads, its own time budget per round.
    compute: ComputeSettings = ComputeSettings()
    #: Where the site keeps its privacy ledgers, one file per dataset, across runs (relative paths
    #: are relative to node.yaml). Default: ``NAME-privacy-ledger/`` beside node.yaml.
    ledger_dir: Path | None = None
    #: Where the site keeps strategy state across restarts (SCAFFOLD's control variate).
    #: Default: ``NAME-state/`` beside node.yaml.
    state_dir: Path | None = None
    #: The site's tamper-evident audit log (JSON lines). Default: ``NAME-audit.jsonl`` beside node.yaml.
    audit_log: Path | None = None
    #: The plans this site received and its decisions on them. Default: ``NAME-approvals/`` beside node.yaml.
    approvals_dir: Path | None = None
    #: ``HOST:PORT`` of the coordinator: what ``fedcare node`` and ``fedcare node doctor`` dial when
    #: not given ``--coordinator``.
    coordinator: str | None = Field(default=None, pattern=r"^.+:[0-9]{1,5}$")
    #: The folder holding ``ca.pem``, ``NAME.pem`` and ``NAME.key`` (relative to node.yaml), used when
    #: ``fedcare node`` is not given ``--certs``.
    certs_dir: Path | None = None


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a ``node.yaml``.

    Raises
    ------
    ConfigError
        Naming the field (``node.name``, ``node.datasets``, ...) and the value received.
    """
    data = read_yaml(path, what="node config", field="node")
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(exc, root="node") from None
    base = Path(path).resolve().parent
    ledger_dir = base / (config.ledger_dir or f"{config.name}-privacy-ledger")
    state_dir = base / (config.state_dir or f"{config.name}-state")
    audit_log = base / (config.audit_log or f"{config.name}-audit.jsonl")
    approvals_dir = base / (config.approvals_dir or f"{config.name}-approvals")
    datasets = {
        name: binding.resolved(base) if isinstance(binding, DatasetManifest) else binding
        for name, binding in config.datasets.items()
    }
    return config.model_copy(
        update={
            "certs_dir": base / config.certs_dir if config.certs_dir is not None else None,
            "ledger_dir": ledger_dir,
            "state_dir": state_dir,
            "audit_log": audit_log,
            "approvals_dir": approvals_dir,
            "datasets": datasets,
        }
    )


def load_site_data(
    binding: DatasetBinding | DatasetManifest, plan: Plan, *, site: str, catalog: DatasetCatalog
) -> SiteData:
    """The site's data for the plan: a bundled dataset's share, or the site's own files read by their manifest.

    Raises
    ------
    DataError
        If the site's files cannot serve the plan: local labels not mapped
        onto the plan's vocabulary, no readable records, an empty split.
    ConfigError
        If the plan does not declare what a manifest dataset needs (labels, input_shape).
    """
    if isinstance(binding, DatasetBinding):
        return catalog.get(plan.dataset.name).load_site(plan.dataset, binding.site)
    data, report = load_manifest_site(binding, plan.dataset, site=site)
    logger.info("site data read", extra={"node_id": site, **report.log_counts()})
    return data


def manifest_catalog(plan: Plan, node_configs: Sequence[NodeConfig], *, catalog: DatasetCatalog | None = None) -> DatasetCatalog:
    """The bundled catalog plus the plan's dataset as the listed sites describe it in their node.yaml.

    Lets ``fedcare simulate --site A/node.yaml --site B/node.yaml`` run sites
    from their own files in one process, exactly as they would deployed.

    Raises
    ------
    ConfigError
        If a node.yaml does not describe the plan's dataset with a manifest.
    """
    catalog = catalog or DatasetCatalog.bundled()
    manifests: dict[str, DatasetManifest] = {}
    for config in node_configs:
        binding = config.datasets.get(plan.dataset.name)
        if not isinstance(binding, DatasetManifest):
            raise ConfigError(
                f"site {config.name!r} does not describe dataset {plan.dataset.name!r} with a manifest "
                f"(its node.yaml lists: {', '.join(config.datasets) or 'none'})",
                field="node.datasets",
            )
        if config.name in manifests:
            raise ConfigError(f"two node.yaml files name the site {config.name!r}", field="node.name")
        manifests[config.name] = binding
    return DatasetCatalog([*(catalog.get(name) for name in catalog.names()), ManifestDataset(plan.dataset.name, manifests)])


def run_node(
    config: NodeConfig,
    *,
    coordinator: str,
    certs_dir: str | Path,
    registry: TaskRegistry | None = None,
    catalog: DatasetCatalog | None = None,
    give_up_after_s: float | None = None,
    approval_poll_s: float = 1.0,
    on_progress: ProgressCallback | None = None,
) -> None:
    """Join the federation at ``coordinator`` and serve jobs until the run ends, once the site approved the plan.

    The node checks the coordinator's certificate against the policy's pin,
    then the plan against the policy (task name, version and code hash,
    strategy, privacy floor, participants, rounds, statistics), records the
    plan in the site's approvals, and waits for ``fedcare node approve`` (or
    approves at once under ``auto_approve``). Every step goes into the site's
    audit log, and the site's answer (pending, approved, rejected, refused
    with the reason) goes to the coordinator.

    ``on_progress`` receives ``(node_id, round, steps_done, steps_planned)``
    during each local training job (see :class:`~fedcare.federation.node.Node`).

    Before dialing out, the node resolves ``config.compute.device`` and sets
    torch's CPU threads for the process, once (``compute.threads``, or the
    usable cores when training on the CPU; see
    :func:`~fedcare.tasks.compute.configure_threads`).

    Raises
    ------
    ConfigError
        If ``compute.device`` asks for CUDA and this machine has none (``node.compute.device``).
    PolicyViolation
        If the coordinator refuses this node, the plan breaks the site's
        policy, the site rejected it, or it asks for a dataset or task this
        site does not have.
    DataError
        If the site's files cannot serve the plan (unmapped labels, ...).
    TransportError
        If the coordinator stays unreachable past ``give_up_after_s``.
    """
    from fedcare.federation.approvals import PlanApprovals
    from fedcare.federation.audit_log import AuditLog
    from fedcare.transport.grpc_client import GrpcNodeChannel

    device = resolve_device(config.compute)  # a machine that cannot train as asked fails before dialing out
    threads = configure_threads(config.compute, device=device)  # process-wide: once, at start
    logger.info("compute", extra={"node_id": config.name, "device": device, "threads": threads})
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    audit = AuditLog(config.audit_log or Path(f"{config.name}-audit.jsonl"), actor=config.name)
    approvals = PlanApprovals(config.approvals_dir or Path(f"{config.name}-approvals"))
    channel = GrpcNodeChannel(coordinator, certs_dir=certs_dir, name=config.name, give_up_after_s=give_up_after_s)
    try:
        plan = channel.join()
        digest = plan_hash(plan)
        fingerprint = channel.coordinator_certificate_sha256()
        audit.peer_identity(subject="coordinator", fingerprint=fingerprint)
        audit.plan_received(run_id=channel.run_id, plan_sha256=digest)

        def refuse(exc: FedcareError) -> None:
            audit.refusal(reason=exc.message, field=exc.field)
            channel.report_status("refused", str(exc))
            logger.warning("refused the plan", extra={"node_id": config.name, "field": exc.field})

        try:
            config.policy.check_coordinator(fingerprint)
            binding = config.datasets.get(plan.dataset.name)
            if binding is None:
                raise PolicyViolation(
                    f"the plan asks for dataset {plan.dataset.name!r}, which this site does not hold "
                    f"(node.yaml lists: {', '.join(config.datasets) or 'none'})",
                    field="node.datasets",
                )
            if plan.task not in registry:
                raise PolicyViolation(f"the plan asks for task {plan.task!r}, which is not installed here", field="plan.task")
            config.policy.check_plan(plan, task=registry.info(plan.task))
            if config.approved_plan_hash is not None and digest != config.approved_plan_hash:
                raise PolicyViolation("the coordinator's plan is not the one this site approved", field="node.approved_plan_hash")
        except PolicyViolation as exc:
            refuse(exc)
            raise
        record = approvals.receive(plan, auto_approve=config.policy.auto_approve or config.approved_plan_hash == digest)
        if record.status == "pending":
            audit.append("plan_pending", run_id=channel.run_id, plan_sha256=digest)
            channel.report_status("pending")
            logger.info(
                "plan waiting for approval: fedcare node approve %s", digest[:16], extra={"node_id": config.name}
            )
            record = _wait_for_decision(approvals, digest, channel=channel, poll_s=approval_poll_s)
        if record.status == "rejected":
            audit.append("plan_rejected", run_id=channel.run_id, plan_sha256=digest, reason=record.reason[:500])
            reason = f"the site rejected the plan{': ' + record.reason if record.reason else ''}"
            channel.report_status("rejected", reason)
            raise PolicyViolation(reason, node_id=config.name)
        audit.append("plan_approved", run_id=channel.run_id, plan_sha256=digest, by=record.decided_by)
        try:
            data = load_site_data(binding, plan, site=config.name, catalog=catalog)
        except DataError as exc:
            refuse(exc)
            raise
        channel.report_status("approved")
        logger.info("serving", extra={"node_id": config.name, "train_examples": len(data.train)})
        Node(
            config.name,
            task=registry.get(plan.task),
            data=data,
            plan=plan,
            policy=config.policy,
            ledger_dir=config.ledger_dir or Path(f"{config.name}-privacy-ledger"),
            state_dir=config.state_dir or Path(f"{config.name}-state"),
            on_progress=on_progress,
            compute=config.compute,
        ).serve(AuditedChannel(channel, audit=audit, plan=plan))
        audit.append("run_finished", run_id=channel.run_id)
    finally:
        channel.close()


def _wait_for_decision(approvals: Any, digest: str, *, channel: Any, poll_s: float) -> Any:
    """Wait until the site approves or rejects the plan (``fedcare node approve`` / ``reject``)."""
    import time

    while True:
        record = approvals.get(digest)
        if record is not None and record.status != "pending":
            return record
        if channel.closed:
            raise FederationError("the run ended before this site decided on the plan")
        time.sleep(poll_s)


class AuditedChannel(NodeChannel):
    """A node's channel that writes what leaves the site into its audit log.

    Each job started and finished, the size and SHA-256 of every update sent
    (masked secure-aggregation vectors included), the epsilon spent as the
    node reports it, and every job the node refused or failed, with the reason.
    """

    def __init__(self, channel: NodeChannel, *, audit: Any, plan: Plan) -> None:
        self.channel = channel
        self.audit = audit
        self.plan = plan

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def pull_job(self, *, timeout_s: float) -> Job | None:
        job = self.channel.pull_job(timeout_s=timeout_s)
        if job is not None:
            self.audit.append("task_started", run_id=job.run_id, round=job.round, kind=job.kind.value, job_id=job.job_id)
        return job

    def push_result(self, result: JobResult) -> None:
        run_id, round_number = result.run_id, result.round
        if result.update is not None:
            size, digest = update_digest(result.update)
            self.audit.update_sent(run_id=run_id, round=round_number, size_bytes=size, sha256=digest)
        if result.error is not None:
            self.audit.refusal(reason=f"round {round_number} {result.kind.value}: {result.error}"[:1000])
        if "dp_epsilon" in result.metrics:
            self.audit.epsilon_spent(
                run_id=run_id, round=round_number, epsilon=float(result.metrics["dp_epsilon"]),
                delta=self.plan.privacy.record_level.delta,
            )  # fmt: skip
        self.audit.append(
            "task_finished", run_id=run_id, round=round_number, kind=result.kind.value, job_id=result.job_id, ok=result.ok
        )
        self.channel.push_result(result)


def _resumed_run_id(plan: Plan, run_dir: RunDirectory | None) -> str:
    """The id of the run to continue in ``run_dir``, after checking it is this plan's.

    Raises
    ------
    ConfigError
        If there is no run directory, it holds no run, or its run has another plan.
    """
    if run_dir is None:
        raise ConfigError("resuming needs the run directory of the run to continue", field="--out")
    saved = run_dir.path / "plan.yaml"
    recorded = run_dir.recorded_run_id()
    if recorded is None or not saved.exists():
        raise ConfigError(f"{run_dir.path} holds no run to resume (no plan.yaml and run id)", field="--out")
    if plan_hash(load_plan(saved)) != plan_hash(plan):
        raise ConfigError(
            f"the run in {run_dir.path} was made with another plan; resume it with that plan, or start a new run",
            field="--resume",
        )
    if run_dir.trim_partial_event():
        logger.warning("dropped the last event of metrics.jsonl, cut short when the coordinator stopped")
    return recorded


def serve(
    plan: Plan,
    *,
    listen: str,
    certs_dir: str | Path,
    out_dir: str | Path | None = None,
    wait_for_nodes_s: float = 120.0,
    registry: TaskRegistry | None = None,
    catalog: DatasetCatalog | None = None,
    on_event: EventCallback | None = None,
    on_listening: Any = None,
    capture_handshake_log: bool = False,
    heartbeat_interval_s: float = 3.0,
    on_transport: Callable[[GrpcTransport], None] | None = None,
    resume: bool = False,
) -> RunResult:
    """Listen for nodes over mutual TLS and run the plan.

    Parameters
    ----------
    plan : Plan
        Must list the admitted nodes in ``plan.nodes``.
    listen : str
        ``HOST:PORT`` (port 0 picks a free port; ``on_listening`` receives it).
    certs_dir : Path
        ``ca.pem``, ``server.pem``, ``server.key``, ``crl.pem``.
    out_dir : Path, optional
        Run directory.
    wait_for_nodes_s : float
        How long to wait for every admitted node to join before starting
        with those present (at least ``plan.min_nodes``).
    on_listening : callable, optional
        Called with the port once the server listens.
    on_transport : callable, optional
        Called with the listening transport (a live dashboard asks it who is
        online and what each site answered to the plan).
    resume : bool
        Continue the run in ``out_dir`` (after the coordinator crashed or was
        stopped) from its last completed round, under the same run id, so the
        nodes, still running, carry on: a node asked again for a round it had
        already answered sends the same update and spends no privacy budget
        twice. Refused if ``out_dir`` holds a run of another plan.
    capture_handshake_log : bool
        Turn gRPC's TLS handshake refusals into log records and events
        (replaces this process's standard error with a pipe; for the
        ``fedcare serve`` process).
    heartbeat_interval_s : float
        How often nodes send a heartbeat while they train, in seconds; a node
        silent for three intervals plus one second is taken as gone. Seconds,
        not one: a node's first job imports its task's framework (e.g. torch),
        which holds the GIL, and on a busy machine that silences its heartbeat
        thread for several seconds.

    Raises
    ------
    ConfigError
        If the plan lists no nodes or is otherwise invalid, or it tracks with
        MLflow (``plan.tracking``) and MLflow is not installed here.
    FederationError
        If fewer than ``plan.min_nodes`` nodes join in time or a round ends short.

    Notes
    -----
    With ``plan.tracking``, the coordinator's events also go to MLflow (see
    :class:`~fedcare.tracking.MlflowTracker`), after ``on_event``.
    """
    from fedcare.transport import pki
    from fedcare.transport.grpc_server import GrpcTransport, HandshakeLogMonitor

    if plan.nodes is None:
        raise ConfigError("a deployed plan must list the admitted nodes (their certificate names)", field="plan.nodes")
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    check_plan(plan, registry=registry, catalog=catalog, deployed=True)
    run_dir = RunDirectory(out_dir) if out_dir is not None else None
    run_id = uuid.uuid4().hex
    if resume:
        run_id = _resumed_run_id(plan, run_dir)
    tracker = make_tracker(plan, run_dir.path if run_dir is not None else None)

    def emit(event: dict[str, Any]) -> None:
        if run_dir is not None:
            run_dir.log_event(event)
        if on_event is not None:
            on_event(event)

    def refused(reason: pki.AdmissionReason, node_id: str | None = None) -> None:
        logger.warning(
            "refused a connection: %s (%s)", reason.value, f"node {node_id}" if node_id else "identity unknown",
            extra={"node_id": node_id, "reason": reason.name},
        )
        emit({"event": "node_refused", "reason": reason.name, "detail": reason.value, "node_id": node_id})

    if capture_handshake_log:
        HandshakeLogMonitor(lambda reason: refused(reason))
    task = registry.get(plan.task)
    spec = catalog.spec(plan.dataset)  # a bundled dataset's schema, or the one the plan declares
    transport = GrpcTransport(
        plan, listen=listen, certs_dir=certs_dir, on_refusal=refused, heartbeat_interval_s=heartbeat_interval_s
    )
    try:
        transport.set_run(run_id)
        if on_listening is not None:
            on_listening(transport.port)
        if on_transport is not None:
            on_transport(transport)
        joined = transport.wait_for_nodes(len(plan.nodes), timeout_s=wait_for_nodes_s)
        if len(joined) < plan.min_nodes:
            raise FederationError(
                f"only {len(joined)} of {len(plan.nodes)} admitted nodes joined within {wait_for_nodes_s:.0f} s, "
                f"fewer than min_nodes={plan.min_nodes}"
            )
        audit = None
        if run_dir is not None:
            from fedcare.federation.audit_log import AuditLog

            audit = AuditLog(run_dir.path / "audit.jsonl", actor="coordinator")
            for node_id, fingerprint in sorted(transport.peer_certificates().items()):
                audit.peer_identity(subject=node_id, fingerprint=fingerprint)
        coordinator = Coordinator(
            plan,
            strategy=make_strategy(
                plan.strategy,
                privacy=plan.privacy.site_level,
                num_sampled=plan.nodes_per_round or len(plan.nodes),
                num_nodes=len(plan.nodes),
            ),
            audit=audit,
            transport=transport,
            initial_parameters=initial_parameters(task, spec, plan),
            statistics_width=spec.channels,
            run_dir=run_dir,
            on_event=chain_events(on_event, tracker.on_event if tracker is not None else None),
            run_id=run_id,
        )
        return run_tracked(tracker, lambda: coordinator.run(resume=resume))
    finally:
        transport.close()
