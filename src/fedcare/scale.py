"""Scale-out simulation: the same Coordinator and Nodes, with the sites packed into Ray worker actors.

:func:`simulate_on_ray` is :func:`fedcare.simulation.simulate` with the
in-process transport replaced by :class:`~fedcare.transport.ray_transport.RayTransport`.
Sites are dealt round-robin to a few worker actors (default: one per CPU
Ray reports); each worker loads its own sites' data and builds their
:class:`~fedcare.federation.Node` objects itself, so no record travels
through the driver, and runs ``node.handle(job)`` for the jobs sent to it.
Only plain data crosses: the plan as JSON, job and result headers of JSON
values, parameters and updates as safetensors bytes.

Ray pickles its own containers (and a ``registry`` or ``catalog`` passed in),
so this backend is for simulation inside one trusted cluster; federations
across organisations use the gRPC transport with mutual TLS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


from fedcare import errors as fedcare_errors
from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError, FedcareError
from fedcare.federation.coordinator import (
    Coordinator,
    EventCallback,
    RunResult,
)
from fedcare.federation.node import Node, RefusingNode
from fedcare.federation.rundir import RunDirectory
from fedcare.plan import Plan, parse_plan, plan_hash
from fedcare.simulation import check_plan, initial_parameters, ledger_root, load_sites, simulation_strategy
from fedcare.tasks.registry import TaskRegistry
from fedcare.tracking import chain_events, make_tracker, run_tracked
from fedcare.transport.ray_transport import (
    DEFAULT_IN_FLIGHT_PER_WORKER,
    RayTransport,
    WireResult,
    job_from_wire,
    require_ray,
    result_to_wire,
)

__all__ = ["SiteWorker", "pack_sites", "ray_session", "simulate_on_ray"]

logger = logging.getLogger(__name__)


def pack_sites(sites: Sequence[str], *, num_workers: int) -> list[list[str]]:
    """Deal ``sites`` round-robin to ``num_workers`` workers (fewer when there are fewer sites).

    Parameters
    ----------
    sites : sequence of str
        Site names, in order.
    num_workers : int
        Workers wanted; at least 1.

    Returns
    -------
    list of list of str
        Each worker's sites; none is empty.

    Raises
    ------
    ConfigError
        If ``num_workers`` is below 1.

    Examples
    --------
    >>> pack_sites(["a", "b", "c", "d", "e"], num_workers=2)
    [['a', 'c', 'e'], ['b', 'd']]
    >>> pack_sites(["a"], num_workers=4)
    [['a']]
    """
    if num_workers < 1:
        raise ConfigError(f"must be >= 1, got {num_workers}", field="num_workers")
    count = min(num_workers, len(sites))
    return [list(sites[i::count]) for i in range(count)]


@contextlib.contextmanager
def ray_session(*, address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the duration of a ``with`` block; shut down only what was started here.

    Parameters
    ----------
    address : str, optional
        ``HOST:PORT`` of a running cluster's head (``ray start --head``);
        ``None`` starts a local instance, unless this process is already
        connected to one, which is then used as it is.
    num_cpus : int, optional
        CPUs of a local instance (default: all of this machine's).

    Yields
    ------
    module
        The ``ray`` module, connected.

    Raises
    ------
    ConfigError
        If Ray is not installed.

    Examples
    --------
    >>> with ray_session(num_cpus=1) as ray:  # doctest: +SKIP
    ...     ray.cluster_resources()["CPU"]
    1.0
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()  # a local instance stops; a cluster only loses this driver


class SiteWorker:
    """One Ray worker actor's share of the sites: loads their data and serves their jobs.

    Created by :func:`simulate_on_ray` through ``ray.remote``; usable
    directly in one process, as the example shows. Everything passed in is
    plain data except ``registry`` and ``catalog``, which default to the
    installed tasks and the bundled datasets built here in the worker.

    Parameters
    ----------
    plan_json : str
        The plan as JSON (``Plan.model_dump_json``); its hash is checked.
    expected_plan_hash : str
        The coordinator's plan hash.
    sites : sequence of str
        The sites this worker holds.
    registry : TaskRegistry, optional
        Installed tasks; defaults to the ``fedcare.tasks`` entry points.
    catalog : DatasetCatalog, optional
        Datasets; defaults to the bundled ones.
    ledger_root : str, optional
        With record-level DP, the directory of the sites' privacy ledgers
        (``ledger_root/SITE/``); a shared file system on a multi-machine cluster.
    state_root : str, optional
        The directory of the sites' strategy state (``state_root/SITE/``).

    Notes
    -----
    A fedcare error while setting up (the plan's hash differs from
    ``expected_plan_hash``, a site's data cannot load) does not escape the
    constructor, where Ray would report only that the actor died: it is
    kept, as plain data, for :meth:`setup_error`, and the driver raises it.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> from fedcare.messages import Job, JobKind
    >>> from fedcare.transport.ray_transport import job_to_wire, result_from_wire
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 1,
    ...                    "dataset": {"name": "breast-cancer", "num_nodes": 4}})
    >>> worker = SiteWorker(plan.model_dump_json(), plan_hash(plan), ["site-1", "site-3"])
    >>> worker.sites()
    ['site-1', 'site-3']
    >>> job = Job("run", 0, "j0", JobKind.FEATURE_STATS, plan_hash=plan_hash(plan))
    >>> result_from_wire(*worker.run("site-3", *job_to_wire(job))).num_examples > 0
    True
    """

    def __init__(
        self,
        plan_json: str,
        expected_plan_hash: str,
        sites: Sequence[str],
        *,
        registry: TaskRegistry | None = None,
        catalog: DatasetCatalog | None = None,
        ledger_root: str | None = None,
        state_root: str | None = None,
    ) -> None:
        self._nodes: dict[str, Node | RefusingNode] = {}
        self._refusals: dict[str, str] = {}
        self._setup_error: dict[str, str | None] | None = None
        try:
            self._set_up(plan_json, expected_plan_hash, sites, registry, catalog, ledger_root, state_root)
        except FedcareError as exc:
            # Kept as plain data for the driver to raise: Ray would only say that the actor died.
            self._setup_error = {"kind": type(exc).__name__, "message": exc.message, "field": exc.field}

    def _set_up(
        self,
        plan_json: str,
        expected_plan_hash: str,
        sites: Sequence[str],
        registry: TaskRegistry | None,
        catalog: DatasetCatalog | None,
        ledger_root: str | None,
        state_root: str | None,
    ) -> None:
        plan = parse_plan(json.loads(plan_json))
        if plan_hash(plan) != expected_plan_hash:
            raise ConfigError("the plan a Ray worker received does not match the coordinator's plan hash", field="plan")
        registry = registry or TaskRegistry.from_entry_points()
        catalog = catalog or DatasetCatalog.bundled()
        dataset = catalog.get(plan.dataset.name)
        # Loaded here, in the worker: only this worker's sites, and no record passes through the driver.
        loaded, refusals = load_sites(dataset, plan.model_copy(update={"nodes": tuple(sites)}))
        for site in sites:
            if site in refusals:
                self._nodes[site] = RefusingNode(site, reason=refusals[site])
                continue
            self._nodes[site] = Node(
                site,
                task=registry.get(plan.task),
                data=loaded[site],
                plan=plan,
                ledger_dir=None if ledger_root is None else Path(ledger_root) / site,
                state_dir=None if state_root is None else Path(state_root) / site,
                secure_noise=False,  # a simulated study can be repeated; deployments draw noise from the OS
            )
        self._refusals = dict(refusals)

    def setup_error(self) -> dict[str, str | None] | None:
        """The fedcare error that stopped this worker loading its sites (kind, message, field), if any."""
        return self._setup_error

    def sites(self) -> list[str]:
        """The sites this worker holds, in the order given."""
        return list(self._nodes)

    def refusals(self) -> dict[str, str]:
        """Sites whose own files cannot serve the plan, with the reason."""
        return dict(self._refusals)

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def run(self, node_id: str, header: Mapping[str, Any], parameters: bytes | None) -> WireResult:
        """Do one job on one of this worker's sites; failures come back as a result with ``error`` set.

        Parameters
        ----------
        node_id : str
            The site.
        header : Mapping[str, Any]
            The job header (:func:`~fedcare.transport.ray_transport.job_to_wire`).
        parameters : bytes, optional
            The global parameters as safetensors bytes.

        Returns
        -------
        tuple of (dict, bytes or None)
            The result (:func:`~fedcare.transport.ray_transport.result_to_wire`).
        """
        node = self._nodes.get(node_id)
        job = job_from_wire(header, parameters)
        if node is None:
            return result_to_wire(
                RefusingNode(node_id, reason="this Ray worker does not hold the site").handle(job)
            )
        return result_to_wire(node.handle(job))


def _worker_resources(ray: Any, num_workers: int | None) -> tuple[int, float]:
    """How many workers to start, and the CPUs each reserves (fractional when there are more workers than CPUs)."""
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    count = num_workers if num_workers is not None else max(1, int(cpus))
    if count < 1:
        raise ConfigError(f"must be >= 1, got {count}", field="num_workers")
    return count, min(1.0, cpus / count)


def simulate_on_ray(
    plan: Plan,
    *,
    out_dir: str | Path | None = None,
    address: str | None = None,
    catalog: DatasetCatalog | None = None,
    registry: TaskRegistry | None = None,
    on_event: EventCallback | None = None,
    num_workers: int | None = None,
    resume: bool = False,
) -> RunResult:
    """Run the plan with its sites as nodes inside Ray worker actors, on one machine or a cluster.

    The Coordinator, Nodes, strategy, seeds and run directory are those of
    :func:`fedcare.simulation.simulate`, so the same plan gives the same
    model (up to float64 rounding of the order updates arrive in).

    Parameters
    ----------
    plan : Plan
        The validated plan.
    out_dir : str or Path, optional
        Run directory; ``None`` keeps nothing on disk. On a multi-machine
        cluster, node state and DP ledgers live under it, so it must be on a
        file system every machine shares when the plan needs them.
    address : str, optional
        ``HOST:PORT`` of a Ray cluster's head; ``None`` starts a local Ray
        instance for the run (or uses the one this process is connected to).
    catalog : DatasetCatalog, optional
        Datasets; defaults to the bundled ones (built in each worker).
    registry : TaskRegistry, optional
        Installed tasks; defaults to the ``fedcare.tasks`` entry points
        (read in each worker). A registry or catalog passed in is pickled
        to the workers by Ray.
    on_event : callable, optional
        Receives each run event as it happens (in this process).
    num_workers : int, optional
        Worker actors to pack the sites into; defaults to the number of
        CPUs Ray reports. Each reserves one CPU (a share of one when there
        are more workers than CPUs).
    resume : bool
        Continue from the checkpoint in ``out_dir``.

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError
        If Ray is not installed (``pip install 'fedcare[ray]'``), ``num_workers``
        is below 1, or the plan names an unknown task, dataset or node.
    FederationError
        If a round ends with fewer than ``plan.min_nodes`` nodes.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 2,
    ...                    "dataset": {"name": "breast-cancer", "num_nodes": 3}})
    >>> result = simulate_on_ray(plan, num_workers=2)  # doctest: +SKIP
    >>> result.rounds_completed, sorted(result.final_evaluation.sites)  # doctest: +SKIP
    (2, ['site-0', 'site-1', 'site-2'])
    """
    require_ray()  # before anything slow: a missing extra is the first thing to say
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"must be >= 1, got {num_workers}", field="num_workers")
    shipped_registry, shipped_catalog = registry, catalog  # None: each worker builds its own
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    check_plan(plan, registry=registry, catalog=catalog)
    task = registry.get(plan.task)
    dataset = catalog.get(plan.dataset.name)
    spec = catalog.spec(plan.dataset)
    site_names = list(plan.nodes) if plan.nodes is not None else list(dataset.site_names(plan.dataset))
    run_dir = RunDirectory(out_dir) if out_dir is not None else None
    tracker = make_tracker(plan, run_dir.path if run_dir is not None else None)
    with contextlib.ExitStack() as stack:
        ray = stack.enter_context(ray_session(address=address))
        ledgers = ledger_root(plan, run_dir, None, stack)
        count, cpus_each = _worker_resources(ray, num_workers)
        actor_class = ray.remote(SiteWorker).options(num_cpus=cpus_each, max_concurrency=1)
        digest = plan_hash(plan)
        plan_json = plan.model_dump_json()
        workers = [
            actor_class.remote(
                plan_json,
                digest,
                share,
                registry=shipped_registry,
                catalog=shipped_catalog,
                ledger_root=None if ledgers is None else str(ledgers),
                state_root=None if run_dir is None else str(run_dir.path / "node-state"),
            )
            for share in pack_sites(site_names, num_workers=count)
        ]
        stack.callback(_kill_all, ray, workers)
        placement: dict[str, Any] = {}
        refused: set[str] = set()
        for worker, (held, refusals) in zip(workers, _describe_workers(ray, workers), strict=True):
            placement.update({site: worker for site in held})
            refused.update(refusals)
        logger.info("started Ray workers", extra={"workers": len(workers), "sites": len(placement)})
        serving = [site for site in site_names if site not in refused]
        transport = stack.enter_context(RayTransport(placement, max_in_flight_per_worker=DEFAULT_IN_FLIGHT_PER_WORKER))
        coordinator = Coordinator(
            plan,
            strategy=simulation_strategy(plan, serving),
            transport=transport,
            initial_parameters=initial_parameters(task, spec, plan),
            statistics_width=spec.channels,
            run_dir=run_dir,
            on_event=chain_events(on_event, tracker.on_event if tracker is not None else None),
        )
        return run_tracked(tracker, lambda: coordinator.run(resume=resume))


def _describe_workers(ray: Any, workers: Sequence[Any]) -> list[tuple[list[str], dict[str, str]]]:
    """Each worker's sites and refusals, once every worker has loaded its data (a load error is raised here)."""
    for error in ray.get([worker.setup_error.remote() for worker in workers]):
        if error is not None:
            # The worker's own ConfigError or DataError, as simulate() would raise it.
            kind = getattr(fedcare_errors, str(error["kind"]), FedcareError)
            if not (isinstance(kind, type) and issubclass(kind, FedcareError)):
                kind = FedcareError
            raise kind(str(error["message"]), field=error["field"])
    held = ray.get([worker.sites.remote() for worker in workers])
    refusals = ray.get([worker.refusals.remote() for worker in workers])
    return list(zip(held, refusals, strict=True))


def _kill_all(ray: Any, workers: Sequence[Any]) -> None:
    for worker in workers:
        with contextlib.suppress(Exception):
            ray.kill(worker)
