"""A whole federation in one process: in-process transport, one node per site."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path

from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError
from fedcare.federation.coordinator import Coordinator, EventCallback, RunResult, check_participation
from fedcare.federation.node import Node
from fedcare.federation.policy import NodePolicy
from fedcare.federation.rundir import RunDirectory
from fedcare.params import Parameters
from fedcare.plan import Plan
from fedcare.strategies import make_strategy
from fedcare.tasks.base import DataSpec, Task
from fedcare.tasks.registry import TaskRegistry
from fedcare.transport.inproc import InProcTransport

__all__ = ["check_plan", "default_run_dir", "initial_parameters", "simulate"]


def default_run_dir(plan: Plan, root: str | Path = "runs") -> Path:
    """``runs/<plan name>-<UTC timestamp>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return Path(root) / f"{plan.name}-{stamp}"


def initial_parameters(task: Task, spec: DataSpec, plan: Plan) -> Parameters:
    """The global model before round 1, seeded by ``plan.seed``."""
    return task.get_parameters(task.build_model(spec, plan, seed=plan.seed))


def check_plan(
    plan: Plan, *, registry: TaskRegistry | None = None, catalog: DatasetCatalog | None = None
) -> None:
    """Check that the plan's task, dataset and nodes exist, without loading any data.

    Raises
    ------
    ConfigError
        Naming the field (``plan.task``, ``plan.dataset.name``, ``plan.nodes``,
        ``plan.nodes_per_round``, ``plan.min_nodes``) and the value received.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> check_plan(parse_plan({"task": "tabular-logistic", "rounds": 1, "nodes_per_round": 9,
    ...                        "dataset": {"name": "heart-disease"}}))
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.nodes_per_round: asks for 9 nodes per round but only 4 nodes exist (cleveland, hungary, switzerland, va-long-beach)
    """
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    if plan.task not in registry:
        registry.get(plan.task)  # raises, listing the installed tasks
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

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError
        If the plan names an unknown task, dataset or node.
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
    sites = dataset.load_sites(plan.dataset)
    if plan.nodes is not None:
        sites = {name: sites[name] for name in plan.nodes}
    run_dir = RunDirectory(out_dir) if out_dir is not None else None
    with InProcTransport(max_concurrency=max_concurrency) as transport:
        for site, data in sites.items():
            policy = (policies or {}).get(site)
            node = Node(site, task=registry.get(plan.task), data=data, plan=plan, policy=policy)
            transport.add_node(site, node.serve)
        coordinator = Coordinator(
            plan,
            strategy=make_strategy(plan.strategy),
            transport=transport,
            initial_parameters=initial_parameters(task, dataset.spec(plan.dataset), plan),
            run_dir=run_dir,
            on_event=on_event,
        )
        return coordinator.run(resume=resume)
