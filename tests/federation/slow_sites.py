"""Heart disease on in-process nodes whose local rounds sleep: a federation with a slow site.

:data:`HEART` is the canonical heart-disease plan without secure aggregation,
:class:`SleepingTask` a logistic regression whose local round takes a set
multiple of (a sleep + its training time), and :func:`run_heart` runs a plan
on the bundled four hospitals with one such task per site.

Used by ``tests/federation/test_buffered.py`` and ``benchmarks/buffered.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import yaml

from fedcare.cli import demo_plan_path
from fedcare.data.catalog import DatasetCatalog
from fedcare.federation import Coordinator, Node
from fedcare.federation.coordinator import RunResult
from fedcare.plan import Plan
from fedcare.simulation import initial_parameters, load_sites, simulation_strategy
from fedcare.tasks.base import Split, TrainResult
from fedcare.tasks.tabular import LogisticTask
from fedcare.transport.inproc import InProcTransport

#: The canonical heart-disease plan (src/fedcare/plans/heart_disease.yaml) without secure aggregation,
#: which buffered rounds cannot use.
HEART: dict[str, Any] = {
    **yaml.safe_load(demo_plan_path(private=False).read_text(encoding="utf-8")),
    "name": "heart-buffered",
    "secure_aggregation": {"enabled": False},
    "evaluation": {"every_rounds": 10},
}


class SleepingTask(LogisticTask):
    """Logistic regression whose local round takes ``slowdown`` times (``delay_s`` + its training time).

    A site with little compute: with ``slowdown`` 1 it sleeps ``delay_s`` after
    training; with 5 it sleeps until five times what a site with ``slowdown`` 1
    takes for the same training has passed.
    """

    def __init__(self, delay_s: float, *, slowdown: float = 1.0) -> None:
        self.delay_s = delay_s
        self.slowdown = slowdown

    def train(self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Any = ()) -> TrainResult:
        started = time.perf_counter()
        outcome = super().train(model, data, plan, seed=seed, hooks=hooks)
        compute_s = time.perf_counter() - started
        time.sleep(max(0.0, self.slowdown * (self.delay_s + compute_s) - compute_s))
        return outcome


def run_heart(
    plan: Plan, *, delay_s: float = 0.0, slowdowns: Mapping[str, float] | None = None
) -> tuple[RunResult, list[dict[str, Any]]]:
    """Run ``plan`` on heart disease, in-process nodes whose local rounds sleep (see ``SleepingTask``); (result, events)."""
    catalog = DatasetCatalog.bundled()
    sites, _ = load_sites(catalog.get(plan.dataset.name), plan)
    spec = catalog.spec(plan.dataset)
    events: list[dict[str, Any]] = []
    # One compute slot per site: a sleeping site must not hold up the others' slots.
    with InProcTransport(max_concurrency=len(sites)) as transport:
        for site, data in sites.items():
            task = SleepingTask(delay_s, slowdown=(slowdowns or {}).get(site, 1.0))
            node = Node(site, task=task, data=data, plan=plan)
            transport.add_node(site, node.serve)
        result = Coordinator(
            plan,
            strategy=simulation_strategy(plan, list(sites)),
            transport=transport,
            initial_parameters=initial_parameters(LogisticTask(), spec, plan),
            statistics_width=spec.channels,
            on_event=events.append,
        ).run()
    return result, events
