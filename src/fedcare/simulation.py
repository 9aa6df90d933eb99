"""A whole federation in one process: in-process transport, one node per site."""

from __future__ import annotations

import contextlib
import datetime as _dt
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedcare.data.catalog import BundledDataset, DatasetCatalog
from fedcare.data.manifest import ManifestDataset
from fedcare.errors import ConfigError, DataError
from fedcare.federation.coordinator import Coordinator, EventCallback, RunResult, check_participation
from fedcare.federation.node import Node, ProgressCallback, RefusingNode
from fedcare.federation.policy import NodePolicy
from fedcare.federation.rundir import RunDirectory
from fedcare.params import Parameters
from fedcare.plan import EPSILON_WARNING, Plan, PrivacyWarning
from fedcare.simulation_attacks import Attack, attacked_runner
from fedcare.strategies import make_strategy
from fedcare.strategies.base import Strategy
from fedcare.tasks.base import DataSpec, SiteData, Task
from fedcare.tasks.registry import TaskRegistry
from fedcare.tracking import chain_events, check_tracking, make_tracker, run_tracked
from fedcare.transport.inproc import InProcTransport

__all__ = [
    "check_plan", "default_run_dir", "initial_parameters", "ledger_root", "load_sites", "simulate", "simulation_strategy",
]  # fmt: skip

#: Spawn key of the site-level DP noise stream, apart from every training seed.
_SITE_LEVEL_NOISE = 0x44504641


def default_run_dir(plan: Plan, root: str | Path = "runs") -> Path:
    """``runs/<plan name>-<UTC timestamp>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return Path(root) / f"{plan.name}-{stamp}"


def initial_parameters(task: Task, spec: DataSpec, plan: Plan) -> Parameters:
    """The global model before round 1, seeded by ``plan.seed``."""
    return task.get_parameters(task.build_model(spec, plan, seed=plan.seed))


def check_plan(
    plan: Plan, *, registry: TaskRegistry | None = None, catalog: DatasetCatalog | None = None, deployed: bool = False
) -> None:
    """Check that the plan's task, dataset and nodes exist, without loading any data.

    Raises
    ------
    ConfigError
        Naming the field (``plan.task``, ``plan.dataset.name``, ``plan.nodes``,
        ``plan.nodes_per_round``, ``plan.min_nodes``) and the value received;
        at ``plan.tracking`` if the plan tracks with MLflow and MLflow is not
        installed here.
        With ``deployed=True`` the plan's nodes are certificate names and are
        not checked against a bundled dataset's sites.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> check_plan(parse_plan({"task": "tabular-logistic", "rounds": 1, "nodes_per_round": 9,
    ...                        "dataset": {"name": "heart-disease"}}))
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.nodes_per_round: asks for 9 nodes per round but only 4 nodes exist (cleveland, hungary, switzerland, va-long-beach)
    """
    check_tracking(plan)
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    if plan.task not in registry:
        registry.get(plan.task)  # raises, listing the installed tasks
    spec = catalog.spec(plan.dataset)  # a dataset the sites describe needs the plan's labels and input_shape
    if plan.dataset.name not in catalog or deployed:
        # Deployed, the plan's nodes are certificate names; each site's node.yaml binds its own data.
        if plan.nodes is None:
            raise ConfigError(
                f"dataset {plan.dataset.name!r} is described by the sites' own manifests, so the plan must list "
                "its nodes",
                field="plan.nodes",
            )
        sites = list(plan.nodes)
        check_participation(plan, sites)
        _check_site_level_privacy(plan, num_nodes=len(sites))
        _check_secure_normalization(plan, spec)
        return
    dataset = catalog.get(plan.dataset.name)
    sites = list(dataset.site_names(plan.dataset))
    if plan.nodes is not None:
        unknown = sorted(set(plan.nodes) - set(sites))
        if unknown:
            raise ConfigError(
                f"names {', '.join(unknown)}, which the dataset {plan.dataset.name!r} does not have "
                f"(sites: {', '.join(sites)})",
                field="plan.nodes",
            )
        sites = list(plan.nodes)
    check_participation(plan, sites)
    _check_site_level_privacy(plan, num_nodes=len(sites))
    _check_secure_normalization(plan, spec)


def load_sites(dataset: BundledDataset, plan: Plan) -> tuple[dict[str, SiteData], dict[str, str]]:
    """The plan's sites' data, and the reasons of sites whose own files cannot serve the plan.

    Bundled sites always load; a site described by its manifest refuses the
    plan (as it would deployed) when, for instance, it has local labels it
    has not mapped onto the plan's vocabulary.
    """
    names = list(plan.nodes) if plan.nodes is not None else list(dataset.site_names(plan.dataset))
    if not isinstance(dataset, ManifestDataset):
        sites = dataset.load_sites(plan.dataset)
        return {name: sites[name] for name in names}, {}
    loaded: dict[str, SiteData] = {}
    refusals: dict[str, str] = {}
    for name in names:
        try:
            loaded[name] = dataset.load_site(plan.dataset, name)
        except DataError as exc:
            refusals[name] = exc.message
    return loaded, refusals


def _check_secure_normalization(plan: Plan, spec: DataSpec) -> None:
    """Refuse federated normalization under secure aggregation for data without public bounds."""
    if (
        plan.secure_aggregation.enabled
        and plan.dataset.normalization == "federated"
        and len(spec.feature_bounds) != spec.channels
    ):
        raise ConfigError(
            f"federated normalization under secure aggregation sums each site's statistics in the masked ring, "
            f"which needs public bounds for every feature; dataset {plan.dataset.name!r} declares none: use "
            "normalization: per-site or none",
            field="plan.dataset.normalization",
        )


def _check_site_level_privacy(plan: Plan, *, num_nodes: int) -> None:
    """Refuse central site-level DP under secure aggregation; warn when the planned epsilon is weak."""
    site_level = plan.privacy.site_level
    if not site_level.enabled:
        return
    if site_level.mode == "central" and plan.secure_aggregation.enabled:
        raise ConfigError(
            "central site-level DP clips each site's update at the coordinator, which secure aggregation hides; "
            "use mode: distributed (the sites clip and noise) or turn secure aggregation off",
            field="plan.privacy.site_level.mode",
        )
    from fedcare.strategies.dp_fedavg import site_level_epsilon

    try:
        epsilon = site_level_epsilon(plan, num_nodes)
    except ConfigError as exc:  # the accountant cannot compose it: far beyond any useful epsilon
        warnings.warn(f"plan.privacy.site_level: {exc.message}", PrivacyWarning, stacklevel=3)
        return
    if epsilon > EPSILON_WARNING:
        warnings.warn(
            f"plan.privacy.site_level: {plan.rounds} rounds at noise_multiplier {site_level.noise_multiplier:g} "
            f"with {plan.nodes_per_round or num_nodes} of {num_nodes} sites per round spend a site-level epsilon of "
            f"{epsilon:.3g} (delta {site_level.delta:g}); above {EPSILON_WARNING:g} differential privacy gives little "
            "protection: raise the noise multiplier, run fewer rounds or sample fewer sites per round",
            PrivacyWarning,
            stacklevel=3,
        )


def _check_attacks(plan: Plan, attacks: Mapping[str, Attack], *, sites: list[str]) -> None:
    """Refuse research attacks on sites that do not take part, or on updates secure aggregation keeps at the site."""
    unknown = sorted(set(attacks) - set(sites))
    if unknown:
        raise ConfigError(
            f"names {', '.join(unknown)}, which are not sites of this run (sites: {', '.join(sites)})", field="attacks"
        )
    if plan.secure_aggregation.enabled and any(attack.poisons_updates for attack in attacks.values()):
        raise ConfigError(
            "a simulated attack on updates cannot run under secure aggregation, where the update never leaves the "
            "site; turn secure aggregation off or use a data attack such as LabelFlip",
            field="attacks",
        )
    if plan.compression.method != "none" and any(attack.poisons_updates for attack in attacks.values()):
        raise ConfigError(
            f"a simulated attack on updates rewrites the float32 update, but with compression.method "
            f"{plan.compression.method} the site sends a packed one; set compression.method: none to study attacks",
            field="attacks",
        )


def simulation_strategy(plan: Plan, sites: Sequence[str]) -> Strategy:
    """The plan's strategy for a simulation over ``sites``.

    Site-level DP noise is seeded by the plan, so a simulated study can be
    repeated; deployments draw it from the operating system.
    """
    return make_strategy(
        plan.strategy,
        privacy=plan.privacy.site_level,
        num_sampled=check_participation(plan, list(sites)),
        num_nodes=len(sites),
        rng=np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(_SITE_LEVEL_NOISE,))),
    )


def ledger_root(
    plan: Plan, run_dir: RunDirectory | None, ledger_dir: str | Path | None, stack: contextlib.ExitStack
) -> Path | None:
    """Where simulated sites keep their privacy ledgers (one folder per site under it); None without record-level DP."""
    if not plan.privacy.record_level.enabled:
        return None
    if ledger_dir is not None:
        return Path(ledger_dir)
    if run_dir is not None:
        return run_dir.path / "ledgers"
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedcare-ledgers-")))


def simulate(
    plan: Plan,
    *,
    out_dir: str | Path | None = None,
    registry: TaskRegistry | None = None,
    catalog: DatasetCatalog | None = None,
    on_event: EventCallback | None = None,
    max_concurrency: int | None = None,
    resume: bool = False,
    policies: Mapping[str, NodePolicy] | None = None,
    ledger_dir: str | Path | None = None,
    attacks: Mapping[str, Attack] | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Run the plan with every site of its dataset as an in-process node.

    Parameters
    ----------
    plan : Plan
        The validated plan.
    out_dir : str or Path, optional
        Run directory; ``None`` keeps nothing on disk.
    registry : TaskRegistry, optional
        Installed tasks; defaults to the ``fedcare.tasks`` entry points.
    catalog : DatasetCatalog, optional
        Datasets; defaults to the bundled ones.
    on_event : callable, optional
        Receives each run event as it happens.
    max_concurrency : int, optional
        Nodes computing at once; defaults to the number of cores.
    resume : bool
        Continue from the checkpoint in ``out_dir``.
    policies : mapping of str to NodePolicy, optional
        Each site's policy, by site name; sites not named have the default.
    ledger_dir : str or Path, optional
        With record-level DP, where each site keeps its privacy ledger
        (``ledger_dir/SITE/``), so budgets carry over between simulated runs.
        Default: ``out_dir/ledgers``, or a temporary directory without ``out_dir``.
    attacks : mapping of str to Attack, optional
        **Research only**: sites that misbehave, by site name (see
        :mod:`fedcare.simulation_attacks`), to study robust aggregation. Never
        available outside simulation.
    on_progress : callable, optional
        Receives ``(node_id, round, steps_done, steps_planned)`` from each
        site during local training, at most about 10 times a second per site
        (see :class:`~fedcare.federation.node.Node`).

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError
        If the plan names an unknown task, dataset or node, ``attacks`` names a
        site that does not take part, or an attack that rewrites updates is asked
        for under secure aggregation (the update never leaves the site); or the
        plan tracks with MLflow and MLflow is missing, or there is neither
        ``out_dir`` nor ``plan.tracking.uri`` to track to.
    FederationError
        If a round ends with fewer than ``plan.min_nodes`` nodes.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 2,
    ...                    "dataset": {"name": "breast-cancer", "num_nodes": 3}})
    >>> result = simulate(plan)
    >>> result.rounds_completed, sorted(result.final_evaluation.sites)
    (2, ['site-0', 'site-1', 'site-2'])
    """
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    check_plan(plan, registry=registry, catalog=catalog)
    task = registry.get(plan.task)
    dataset = catalog.get(plan.dataset.name)
    spec = catalog.spec(plan.dataset)
    sites, refusals = load_sites(dataset, plan)
    attacks = dict(attacks or {})
    _check_attacks(plan, attacks, sites=list(sites))
    run_dir = RunDirectory(out_dir) if out_dir is not None else None
    tracker = make_tracker(plan, run_dir.path if run_dir is not None else None)
    with contextlib.ExitStack() as stack, InProcTransport(max_concurrency=max_concurrency) as transport:
        ledgers = ledger_root(plan, run_dir, ledger_dir, stack)
        for site, data in sites.items():
            attack = attacks.get(site)
            node = Node(
                site,
                task=registry.get(plan.task),
                data=data if attack is None else attack.poison_data(data),
                plan=plan,
                policy=(policies or {}).get(site),
                ledger_dir=None if ledgers is None else ledgers / site,
                state_dir=None if run_dir is None else run_dir.path / "node-state" / site,
                secure_noise=False,  # a simulated study can be repeated; deployments draw noise from the OS
                on_progress=on_progress,
            )
            runner = node.serve if attack is None else attacked_runner(node.serve, attack, node_id=site)
            transport.add_node(site, runner)
        for site, reason in refusals.items():
            transport.add_node(site, RefusingNode(site, reason=reason).serve)
        coordinator = Coordinator(
            plan,
            strategy=simulation_strategy(plan, list(sites)),
            transport=transport,
            initial_parameters=initial_parameters(task, spec, plan),
            statistics_width=spec.channels,
            run_dir=run_dir,
            on_event=chain_events(on_event, tracker.on_event if tracker is not None else None),
        )
        return run_tracked(tracker, lambda: coordinator.run(resume=resume))

