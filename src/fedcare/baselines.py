"""Non-federated baselines that tell whether a federation was worth it.

Two references bracket a federated run of the same plan:

``pooled``
    One model trained on every site's training data put together, as if the
    records could be centralised. It is the ceiling federation tries to reach.
``local``
    Each site trains alone on its own data and is judged on its own test
    split. It is what a hospital gets without collaborating.

Both use the plan's task, recipe (``plan.local``), initial weights, number of
rounds and normalization, and are scored exactly like federated evaluation:
each site's metrics on its own test split, then the unweighted mean over
sites and the mean weighted by test examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedcare.data.catalog import DatasetCatalog
from fedcare.data.normalization import Standardization, combine_feature_stats, feature_stats
from fedcare.errors import ConfigError
from fedcare.federation.coordinator import round_seed
from fedcare.metrics import aggregate_site_metrics
from fedcare.params import Parameters
from fedcare.plan import Plan
from fedcare.simulation import initial_parameters
from fedcare.tasks.base import DataSpec, SiteData, Split, Task
from fedcare.tasks.registry import TaskRegistry

__all__ = ["BaselineMode", "BaselineResult", "run_baseline"]

logger = logging.getLogger(__name__)

BaselineMode = Literal["pooled", "local"]
_MODES: tuple[str, ...] = ("pooled", "local")


@dataclass(frozen=True)
class BaselineResult:
    """Evaluation of a pooled or local baseline, shaped like ``EvaluationSummary``.

    Attributes
    ----------
    mode : {"pooled", "local"}
        Which baseline was trained.
    rounds : int
        Calls to the task's ``train`` per model (``plan.rounds``).
    sites : dict
        Each site's metrics on its own test split (its validation split when
        ``plan.dataset.validation_fraction > 0``). In ``local`` mode these are
        the metrics of that site's own model.
    examples : dict
        Test examples per site.
    mean : dict
        Unweighted mean over sites (FLamby's metric).
    pooled : dict
        Mean weighted by test examples.
    train_examples : dict
        Training examples each site contributed.
    parameters : dict
        The model evaluated at each site. In ``pooled`` mode every site maps
        to the same single model; in ``local`` mode each to its own.
    """

    mode: BaselineMode
    rounds: int
    sites: dict[str, dict[str, float]]
    examples: dict[str, int]
    mean: dict[str, float]
    pooled: dict[str, float]
    train_examples: dict[str, int]
    parameters: dict[str, Parameters]


def run_baseline(
    plan: Plan,
    *,
    mode: BaselineMode,
    registry: TaskRegistry | None = None,
    catalog: DatasetCatalog | None = None,
) -> BaselineResult:
    """Train the pooled or the local baseline of a plan and evaluate it at every site.

    ``pooled`` trains one model on the concatenation of every site's training
    split; ``local`` trains one model per site on that site's training split
    only. Either way a model gets ``plan.rounds`` calls to the task's
    ``train`` with the recipe ``plan.local``, starting from the same initial
    weights as the federation, with per-round seeds derived from
    ``plan.seed`` as the coordinator derives them (:func:`round_seed`; the
    pooled model uses index 0). That is the same local work one site does
    over a whole federated run.

    Normalization follows ``plan.dataset.normalization``: ``federated`` uses
    one global standardization from all sites' training features (the same
    statistics the coordinator combines), ``per-site`` standardizes each site
    with its own training statistics, ``none`` leaves features as they are.

    Parameters
    ----------
    plan : Plan
        The plan whose federated run the baseline is compared with.
    mode : {"pooled", "local"}
        Which baseline to train.
    registry : TaskRegistry, optional
        Installed tasks; defaults to the ``fedcare.tasks`` entry points.
    catalog : DatasetCatalog, optional
        Datasets; defaults to the bundled ones.

    Returns
    -------
    BaselineResult
        Per-site metrics on each site's own test split (validation split when
        ``plan.dataset.validation_fraction > 0``), and their mean and pooled
        summaries.

    Raises
    ------
    ConfigError
        If ``mode`` is not ``"pooled"`` or ``"local"``; if the plan names an
        unknown task, dataset or node; or if training produced non-finite
        weights (lower ``plan.local.learning_rate``).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 2,
    ...                    "dataset": {"name": "breast-cancer", "num_nodes": 3}})
    >>> result = run_baseline(plan, mode="local")
    >>> sorted(result.sites), result.rounds
    (['site-0', 'site-1', 'site-2'], 2)
    >>> 0.0 <= result.mean["accuracy"] <= 1.0
    True
    >>> run_baseline(plan, mode="central")
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: mode: must be 'pooled' or 'local', got 'central'
    """
    if mode not in _MODES:
        raise ConfigError(f"must be 'pooled' or 'local', got {mode!r}", field="mode")
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    task = registry.get(plan.task)
    dataset = catalog.get(plan.dataset.name)
    spec = dataset.spec(plan.dataset)
    sites = _select_sites(dataset.load_sites(plan.dataset), plan)
    prepared = normalize_sites(sites, mode=plan.dataset.normalization)
    start = initial_parameters(task, spec, plan)
    logger.info("baseline started", extra={"mode": mode, "sites": len(prepared), "rounds": plan.rounds})

    parameters: dict[str, Parameters]
    if mode == "pooled":
        pooled_train = Split(
            x=np.concatenate([data.train.x for data in prepared.values()]),
            y=np.concatenate([data.train.y for data in prepared.values()]),
            time=_pooled_time([data.train for data in prepared.values()]),
        )
        model = _train_rounds(task, start, pooled_train, plan, spec=spec, index=0, node_id=None)
        trained = task.get_parameters(model).freeze()
        parameters = dict.fromkeys(prepared, trained)
        models = dict.fromkeys(prepared, model)
    else:
        models = {}
        parameters = {}
        for index, (site, data) in enumerate(prepared.items()):
            model = _train_rounds(task, start, data.train, plan, spec=spec, index=index, node_id=site)
            models[site] = model
            parameters[site] = task.get_parameters(model).freeze()

    metrics = {
        site: {name: float(value) for name, value in task.evaluate(models[site], data.test).items()}
        for site, data in prepared.items()
    }
    examples = {site: len(data.test) for site, data in prepared.items()}
    summary = aggregate_site_metrics(metrics, examples)
    logger.info("baseline finished", extra={"mode": mode, "sites": len(prepared)})
    return BaselineResult(
        mode=mode,
        rounds=plan.rounds,
        sites=metrics,
        examples=examples,
        mean=summary["mean"],
        pooled=summary["pooled"],
        train_examples={site: len(data.train) for site, data in prepared.items()},
        parameters=parameters,
    )


def normalize_sites(
    sites: dict[str, SiteData], *, mode: Literal["federated", "per-site", "none"]
) -> dict[str, SiteData]:
    """Standardize every site's splits as ``plan.dataset.normalization`` asks.

    Parameters
    ----------
    sites : dict of str to SiteData
        Each site's raw data; not modified.
    mode : {"federated", "per-site", "none"}
        ``federated``: one mean and scale from every site's training features
        combined (what the coordinator computes from counts, sums and sums of
        squares); ``per-site``: each site's own training statistics;
        ``none``: the data unchanged.

    Returns
    -------
    dict of str to SiteData
        New site data in the same order (the same objects for ``none``).

    Raises
    ------
    ConfigError
        If ``mode`` is not one of the three.

    Examples
    --------
    >>> from fedcare.tasks.base import DataSpec
    >>> spec = DataSpec(num_features=1, num_classes=2)
    >>> def site(name, values):
    ...     x = np.array(values, dtype=np.float32).reshape(-1, 1)
    ...     split = Split(x=x, y=np.zeros(len(values), dtype=np.int64))
    ...     return SiteData(site=name, spec=spec, train=split, test=split)
    >>> sites = {"a": site("a", [1.0, 3.0]), "b": site("b", [5.0, 7.0])}
    >>> round(float(normalize_sites(sites, mode="federated")["a"].train.x.mean()), 3)
    -0.894
    >>> float(normalize_sites(sites, mode="per-site")["a"].train.x.mean())
    0.0
    """
    if mode == "none":
        return dict(sites)
    if mode == "per-site":
        return {name: Standardization.fit(data.train.x).apply_site(data) for name, data in sites.items()}
    if mode == "federated":
        standardization = combine_feature_stats([feature_stats(data.train.x) for data in sites.values()])
        return {name: standardization.apply_site(data) for name, data in sites.items()}
    raise ConfigError(
        f"must be 'federated', 'per-site' or 'none', got {mode!r}", field="plan.dataset.normalization"
    )


def _pooled_time(splits: list[Split]) -> np.ndarray | None:
    """The splits' survival times end to end, or ``None`` unless every split has them."""
    times = [split.time for split in splits]
    return None if any(t is None for t in times) else np.concatenate([t for t in times if t is not None])


def _select_sites(sites: dict[str, SiteData], plan: Plan) -> dict[str, SiteData]:
    """The sites the plan admits, in the coordinator's order (sorted names)."""
    if plan.nodes is not None:
        unknown = sorted(set(plan.nodes) - set(sites))
        if unknown:
            raise ConfigError(
                f"names {', '.join(unknown)}, which the dataset {plan.dataset.name!r} does not have "
                f"(sites: {', '.join(sites)})",
                field="plan.nodes",
            )
        names = sorted(plan.nodes)
    else:
        names = sorted(sites)
    return {name: sites[name] for name in names}


def _train_rounds(
    task: Task,
    start: Parameters,
    data: Split,
    plan: Plan,
    *,
    spec: DataSpec,
    index: int,
    node_id: str | None,
) -> Any:
    """A model from ``start`` after ``plan.rounds`` calls to ``task.train`` on ``data``."""
    model = task.build_model(spec, plan)
    task.set_parameters(model, start)
    for round_number in range(1, plan.rounds + 1):
        task.train(model, data, plan, seed=round_seed(plan.seed, round_number, index))
        weights = task.get_parameters(model).flatten()
        if not np.isfinite(np.add.reduce(weights, dtype=np.float64)):
            raise ConfigError(
                "training produced non-finite weights (NaN or Inf); lower the learning rate",
                field="plan.local.learning_rate",
                node_id=node_id,
                round=round_number,
            )
    return model
