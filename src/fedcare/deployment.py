"""Deployment: a coordinator process that listens, node processes that dial out.

``serve`` runs the same :class:`~fedcare.federation.Coordinator` as a
simulation over a :class:`~fedcare.transport.grpc_server.GrpcTransport`;
``run_node`` runs the same :class:`~fedcare.federation.Node` over a
:class:`~fedcare.transport.grpc_client.GrpcNodeChannel`.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError, FederationError, PolicyViolation
from fedcare.federation.coordinator import Coordinator, EventCallback, RunResult
from fedcare.federation.node import Node
from fedcare.federation.policy import NodePolicy
from fedcare.federation.rundir import RunDirectory
from fedcare.plan import Plan, _format_validation_error
from fedcare.simulation import check_plan, initial_parameters
from fedcare.strategies import make_strategy
from fedcare.tasks.registry import TaskRegistry

__all__ = ["DatasetBinding", "NodeConfig", "load_node_config", "run_node", "serve"]

logger = logging.getLogger(__name__)


class DatasetBinding(BaseModel):
    """Where a site's copy of a dataset is. For bundled datasets: which site it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str


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
    #: Datasets this site holds, by the name plans use.
    datasets: dict[str, DatasetBinding]
    #: When set, the site runs only the plan with this SHA-256.
    approved_plan_hash: str | None = None
    #: What the site requires of every round (secure aggregation, participants, privacy budgets).
    policy: NodePolicy = NodePolicy()
    #: Where the site keeps its privacy ledgers, one file per dataset, across runs (relative paths
    #: are relative to node.yaml). Default: ``NAME-privacy-ledger/`` beside node.yaml.
    ledger_dir: Path | None = None
    #: Where the site keeps strategy state across restarts (SCAFFOLD's control variate).
    #: Default: ``NAME-state/`` beside node.yaml.
    state_dir: Path | None = None


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a ``node.yaml``.

    Raises
    ------
    ConfigError
        Naming the field (``node.name``, ``node.datasets``, ...) and the value received.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read node config: {exc.strerror}", field="node") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"node config is not valid YAML: {exc}", field="node") from None
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(exc, root="node") from None
    base = Path(path).resolve().parent
    ledger_dir = base / (config.ledger_dir or f"{config.name}-privacy-ledger")
    state_dir = base / (config.state_dir or f"{config.name}-state")
    return config.model_copy(update={"ledger_dir": ledger_dir, "state_dir": state_dir})


def run_node(
    config: NodeConfig,
    *,
    coordinator: str,
    certs_dir: str | Path,
    registry: TaskRegistry | None = None,
    catalog: DatasetCatalog | None = None,
    give_up_after_s: float | None = None,
) -> None:
    """Join the federation at ``coordinator`` and serve jobs until the run ends.

    Raises
    ------
    PolicyViolation
        If the coordinator refuses this node, or the plan asks for a dataset
        or task this site does not have or a plan it did not approve.
    TransportError
        If the coordinator stays unreachable past ``give_up_after_s``.
    """
    from fedcare.transport.grpc_client import GrpcNodeChannel

    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    channel = GrpcNodeChannel(coordinator, certs_dir=certs_dir, name=config.name, give_up_after_s=give_up_after_s)
    try:
        plan = channel.join(expected_plan_hash=config.approved_plan_hash)
        binding = config.datasets.get(plan.dataset.name)
        if binding is None:
            raise PolicyViolation(
                f"the plan asks for dataset {plan.dataset.name!r}, which this site does not hold "
                f"(node.yaml lists: {', '.join(config.datasets) or 'none'})",
                node_id=config.name,
            )
        if plan.task not in registry:
            raise PolicyViolation(
                f"the plan asks for task {plan.task!r}, which is not installed here", node_id=config.name
            )
        data = catalog.get(plan.dataset.name).load_site(plan.dataset, binding.site)
        logger.info("serving", extra={"node_id": config.name, "train_examples": len(data.train)})
        config.policy.check_secure_aggregation(enabled=plan.secure_aggregation.enabled)
        config.policy.check_record_level_dp(enabled=plan.privacy.record_level.enabled)
        Node(
            config.name,
            task=registry.get(plan.task),
            data=data,
            plan=plan,
            policy=config.policy,
            ledger_dir=config.ledger_dir or Path(f"{config.name}-privacy-ledger"),
            state_dir=config.state_dir or Path(f"{config.name}-state"),
        ).serve(channel)
    finally:
        channel.close()


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
        If the plan lists no nodes or is otherwise invalid.
    FederationError
        If fewer than ``plan.min_nodes`` nodes join in time or a round ends short.
    """
    from fedcare.transport import pki
    from fedcare.transport.grpc_server import GrpcTransport, HandshakeLogMonitor

    if plan.nodes is None:
        raise ConfigError("a deployed plan must list the admitted nodes (their certificate names)", field="plan.nodes")
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    check_plan(plan, registry=registry, catalog=catalog)
    run_dir = RunDirectory(out_dir) if out_dir is not None else None

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
    run_id = uuid.uuid4().hex
    task = registry.get(plan.task)
    dataset = catalog.get(plan.dataset.name)
    transport = GrpcTransport(
        plan, listen=listen, certs_dir=certs_dir, on_refusal=refused, heartbeat_interval_s=heartbeat_interval_s
    )
    try:
        transport.set_run(run_id)
        if on_listening is not None:
            on_listening(transport.port)
        joined = transport.wait_for_nodes(len(plan.nodes), timeout_s=wait_for_nodes_s)
        if len(joined) < plan.min_nodes:
            raise FederationError(
                f"only {len(joined)} of {len(plan.nodes)} admitted nodes joined within {wait_for_nodes_s:.0f} s, "
                f"fewer than min_nodes={plan.min_nodes}"
            )
        coordinator = Coordinator(
            plan,
            strategy=make_strategy(
                plan.strategy,
                privacy=plan.privacy.site_level,
                num_sampled=plan.nodes_per_round or len(plan.nodes),
                num_nodes=len(plan.nodes),
            ),
            transport=transport,
            initial_parameters=initial_parameters(task, dataset.spec(plan.dataset), plan),
            run_dir=run_dir,
            on_event=on_event,
            run_id=run_id,
        )
        return coordinator.run()
    finally:
        transport.close()
