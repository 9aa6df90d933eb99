"""Secure aggregation through the coordinator and nodes, in one process, on real data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fedcare.data import DatasetCatalog
from fedcare.errors import ConfigError, FederationError
from fedcare.federation.coordinator import Coordinator
from fedcare.federation.node import Node
from fedcare.federation.policy import NodePolicy
from fedcare.federation.rundir import RunDirectory
from fedcare.messages import Job, JobKind
from fedcare.plan import Plan, load_plan, parse_plan, plan_hash
from fedcare.simulation import initial_parameters, simulate
from fedcare.strategies.fedavg import FedAvg
from fedcare.tasks.tabular import LogisticTask
from fedcare.transport.inproc import InProcTransport

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart_disease.yaml"
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")


def heart_plan(*, rounds: int | None = None, **secure: Any) -> Plan:
    """The canonical heart-disease plan with secure aggregation settings replaced."""
    plan = load_plan(EXAMPLE)
    section = plan.secure_aggregation.model_copy(update=secure)
    update: dict[str, Any] = {"secure_aggregation": section}
    if rounds is not None:
        update["rounds"] = rounds
        update["evaluation"] = plan.evaluation.model_copy(update={"every_rounds": rounds})
    return plan.model_copy(update=update)


def round_ends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "round_end"]


def test_canonical_plan_turns_secure_aggregation_on() -> None:
    assert load_plan(EXAMPLE).secure_aggregation.enabled


def test_secure_aggregation_reaches_the_accuracy_of_plain_fedavg_on_heart_disease() -> None:
    secure = simulate(heart_plan(enabled=True))
    plain = simulate(heart_plan(enabled=False))
    assert secure.final_evaluation is not None and plain.final_evaluation is not None
    assert abs(secure.final_evaluation.mean["accuracy"] - plain.final_evaluation.mean["accuracy"]) <= 0.01
    assert secure.final_evaluation.mean["accuracy"] >= 0.78
    # The same model up to quantization: the weighted mean is exact to about 1e-8 per round.
    difference = np.abs(secure.parameters.flatten() - plain.parameters.flatten()).max()
    assert difference < 1e-3


def test_coordinator_learns_no_site_example_counts_under_secure_aggregation(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    result = simulate(heart_plan(enabled=True, rounds=2), out_dir=tmp_path / "run", on_event=events.append)
    assert result.train_examples == {}
    ends = round_ends(events)
    assert [e["num_examples"] for e in ends] == [0, 0]
    assert all(e["nodes_ok"] == list(SITES) for e in ends)
    assert ends[0]["secure_aggregation"]["phases"] == {"u1": 4, "u2": 4, "u3": 4, "u4": 4, "u5": 4}
    assert result.privacy["secure_aggregation"] is True
    assert "only their weighted sum" in result.privacy["data_leaving_sites"]


def test_coordinates_outside_the_clip_range_are_clipped_and_counted() -> None:
    events: list[dict[str, Any]] = []
    simulate(heart_plan(enabled=True, rounds=2, clip=1e-4), on_event=events.append)
    clipped = [e["secure_aggregation"]["clipped"] for e in round_ends(events)]
    assert all(count > 0 for count in clipped), clipped
    events.clear()
    simulate(heart_plan(enabled=True, rounds=2, clip=10.0), on_event=events.append)
    assert [e["secure_aggregation"]["clipped"] for e in round_ends(events)] == [0, 0]


def test_site_requiring_secure_aggregation_refuses_a_plain_round() -> None:
    policies = {"hungary": NodePolicy(require_secure_aggregation=True)}
    result = simulate(heart_plan(enabled=False, rounds=1), policies=policies)
    refused = [f for f in result.failures if f["node_id"] == "hungary" and f.get("kind") == "train"]
    assert refused and "requires secure aggregation" in refused[0]["error"]
    assert "hungary" not in result.train_examples


def test_site_requiring_secure_aggregation_takes_part_in_a_secure_round() -> None:
    policies = {site: NodePolicy(require_secure_aggregation=True, min_participants=4) for site in SITES}
    result = simulate(heart_plan(enabled=True, rounds=1), policies=policies)
    assert result.failures == []


def test_site_refuses_a_round_with_fewer_participants_than_its_policy_allows() -> None:
    policies = {"cleveland": NodePolicy(min_participants=5)}
    result = simulate(heart_plan(enabled=True, rounds=1), policies=policies)
    refusals = [f for f in result.failures if f["node_id"] == "cleveland"]
    # Refused twice: the secure sum of normalization statistics (round 0), then the training round.
    assert [f["round"] for f in refusals] == [0, 1]
    assert all("requires at least 5 sites per sum; 4 announced" in f["error"] for f in refusals)


def test_round_below_the_threshold_fails_and_releases_no_sum(tmp_path: Path) -> None:
    # Two of four sites refuse: 2 survivors < threshold 3, so nothing may be unmasked.
    policies = {site: NodePolicy(min_participants=5) for site in ("cleveland", "hungary")}
    events: list[dict[str, Any]] = []
    with pytest.raises(FederationError, match=r"secure aggregation failed: .*2.*threshold.*3") as caught:
        simulate(heart_plan(enabled=True, rounds=2), out_dir=tmp_path / "run", on_event=events.append, policies=policies)
    assert "no partial sum was released" in str(caught.value)
    assert not any(e["event"] == "round_end" for e in events)
    assert RunDirectory(tmp_path / "run").load_checkpoint() is None


def _plan_with(**secure: Any) -> dict[str, Any]:
    return {
        "task": "tabular-logistic",
        "dataset": {"name": "heart-disease"},
        "rounds": 1,
        "nodes": list(SITES),
        "secure_aggregation": {"enabled": True, **secure},
    }


@pytest.mark.parametrize(
    ("secure", "field", "phrase"),
    [
        ({"threshold": 2}, "plan.secure_aggregation.threshold", "two disjoint groups"),
        ({"threshold": 5}, "plan.secure_aggregation.threshold", "must be <= neighbours + 1 = 4"),
        ({"scale": 1e12}, "plan.secure_aggregation.scale", "wrap the 32-bit ring"),
        ({"clip": -1.0}, "plan.secure_aggregation.clip", "greater than 0"),
    ],
)
def test_plan_validation_refuses_unsafe_secure_aggregation_settings(secure: dict[str, Any], field: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_plan(_plan_with(**secure))
    assert caught.value.field == field
    assert phrase in str(caught.value)


def test_plan_validation_refuses_secure_aggregation_over_two_sites() -> None:
    with pytest.raises(ConfigError, match="sum reveals the other node's input") as caught:
        parse_plan({**_plan_with(), "nodes": ["cleveland", "hungary"]})
    assert caught.value.field == "plan.secure_aggregation.num_nodes"


def test_simulation_checks_secure_aggregation_against_the_dataset_sites() -> None:
    plan = parse_plan({**_plan_with(threshold=2), "nodes": None})
    with pytest.raises(ConfigError) as caught:
        simulate(plan)
    assert caught.value.field == "plan.secure_aggregation.threshold"


class _NeedsEveryUpdate(FedAvg):
    needs_all_updates: ClassVar[bool] = True


def test_strategy_that_needs_every_update_is_refused_with_secure_aggregation() -> None:
    plan = heart_plan(enabled=True, rounds=1)
    catalog = DatasetCatalog.bundled()
    dataset = catalog.get("heart-disease")
    with InProcTransport() as transport:
        coordinator = Coordinator(
            plan,
            strategy=_NeedsEveryUpdate(),
            transport=transport,
            initial_parameters=initial_parameters(LogisticTask(), dataset.spec(plan.dataset), plan),
        )
        with pytest.raises(ConfigError, match="needs every update on its own") as caught:
            coordinator.run()
    assert caught.value.field == "plan.secure_aggregation.enabled"


def test_node_refuses_secure_settings_made_for_another_round() -> None:
    plan = heart_plan(enabled=True, rounds=1)
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset.model_copy(update={"normalization": "per-site"}), "cleveland")
    plan = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"normalization": "per-site"})})
    task = LogisticTask()
    node = Node("cleveland", task=task, data=data, plan=plan)
    model = task.build_model(data.spec, plan)
    config = {
        "seed": 1,
        "secagg": {
            "session": "00" * 32,
            "index": 1,
            "num_nodes": 4,
            "neighbours": 3,
            "threshold": 3,
            "vector_length": task.get_parameters(model).num_elements + 1,
            "clip": 1.0,
            "scale": 1000.0,
            "max_examples": 1000,
        },
    }
    job = Job("run", 1, "j1", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=task.get_parameters(model), config=config)
    answer = node.handle(job)
    assert answer.error is not None and "not this run's and round's" in answer.error
    assert answer.update is None and not answer.data


def test_node_refuses_a_secure_phase_without_an_open_session() -> None:
    plan = heart_plan(enabled=True, rounds=1)
    plan = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"normalization": "per-site"})})
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "hungary")
    node = Node("hungary", task=LogisticTask(), data=data, plan=plan)
    job = Job("run", 1, "j2", JobKind.SECAGG, plan_hash=plan_hash(plan), config={"secagg_phase": "unmask", "survivors": [1, 2, 3], "signatures": {}})
    answer = node.handle(job)
    assert answer.error is not None and "no secure aggregation session" in answer.error
