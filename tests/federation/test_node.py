"""A node answers jobs with numbers only and refuses what it did not approve."""

from __future__ import annotations

import numpy as np

from fedcare.data.catalog import DatasetCatalog
from fedcare.federation import Node
from fedcare.messages import Job, JobKind
from fedcare.plan import parse_plan, plan_hash
from fedcare.simulation import initial_parameters
from fedcare.tasks.tabular import LogisticTask

PLAN = parse_plan({"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "heart-disease"}})


def make_node() -> Node:
    data = DatasetCatalog.bundled().get("heart-disease").load_site(PLAN.dataset, "hungary")
    return Node("hungary", task=LogisticTask(), data=data, plan=PLAN)


def test_node_refuses_job_made_for_another_plan():
    other = parse_plan({"task": "tabular-logistic", "rounds": 2, "dataset": {"name": "heart-disease"}})
    result = make_node().handle(Job("run", 0, "j", JobKind.FEATURE_STATS, plan_hash=plan_hash(other)))
    assert not result.ok
    assert "different plan" in result.error


def test_feature_stats_return_only_per_feature_aggregates():
    node = make_node()
    result = node.handle(Job("run", 0, "j", JobKind.FEATURE_STATS, plan_hash=plan_hash(PLAN)))
    assert result.ok and result.num_examples == 172
    assert set(result.statistics) == {"sum", "sum_of_squares"}
    assert all(len(v) == 13 for v in result.statistics.values())
    assert result.update is None


def test_training_job_without_normalization_statistics_is_refused():
    node = make_node()
    spec = DatasetCatalog.bundled().get("heart-disease").spec(PLAN.dataset)
    params = initial_parameters(LogisticTask(), spec, PLAN).freeze()
    result = node.handle(Job("run", 1, "j", JobKind.TRAIN, plan_hash=plan_hash(PLAN), parameters=params, config={"seed": 1}))
    assert not result.ok and "no statistics" in result.error


def test_training_returns_update_as_difference_from_global_weights():
    plan = parse_plan({"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "heart-disease", "normalization": "per-site"}})
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "hungary")
    node = Node("hungary", task=LogisticTask(), data=data, plan=plan)
    params = initial_parameters(LogisticTask(), data.spec, plan).freeze()
    result = node.handle(Job("run", 1, "j", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=params, config={"seed": 1}))
    assert result.ok, result.error
    assert result.num_examples == 172
    assert result.update.spec == params.spec
    assert np.abs(result.update.flatten()).max() > 0
    # global weights were not touched by training
    np.testing.assert_array_equal(params.flatten(), initial_parameters(LogisticTask(), data.spec, plan).flatten())
