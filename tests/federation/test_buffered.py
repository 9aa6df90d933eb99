"""Buffered asynchronous aggregation (FedBuff): staleness weights, dropped stale updates, a slow site, plan refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

import pytest

from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError, FederationError
from fedcare.federation import Coordinator, Node, RunDirectory
from fedcare.federation.buffered import staleness_weight
from fedcare.messages import JobKind, JobResult
from fedcare.params import Parameters
from fedcare.strategies import FedAvg
from fedcare.plan import Plan, parse_plan
from fedcare.simulation import initial_parameters, load_sites, simulation_strategy
from fedcare.tasks.base import Split, TrainResult
from fedcare.tasks.tabular import LogisticTask
from fedcare.transport.base import NodeChannel
from fedcare.transport.inproc import InProcTransport

#: The canonical heart-disease plan (src/fedcare/plans/heart_disease.yaml) without secure aggregation,
#: which buffered rounds cannot use.
HEART: dict[str, Any] = {
    "name": "heart-buffered",
    "task": "tabular-logistic",
    "dataset": {"name": "heart-disease", "normalization": "federated"},
    "rounds": 30,
    "min_nodes": 2,
    "local": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.01},
    "strategy": {"name": "fedavg"},
    "evaluation": {"every_rounds": 10},
    "seed": 0,
}


class SleepingTask(LogisticTask):
    """Logistic regression whose every local round first sleeps ``delay_s`` seconds: a site with little compute."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def train(self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Any = ()) -> TrainResult:
        time.sleep(self.delay_s)
        return super().train(model, data, plan, seed=seed, hooks=hooks)


def run_heart(plan: Plan, delays_s: Mapping[str, float], **coordinator: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``plan`` on heart disease with in-process nodes whose local rounds sleep ``delays_s``; (result, events)."""
    catalog = DatasetCatalog.bundled()
    sites, _ = load_sites(catalog.get(plan.dataset.name), plan)
    spec = catalog.spec(plan.dataset)
    events: list[dict[str, Any]] = []
    # One compute slot per site: a sleeping site must not hold up the others' slots.
    with InProcTransport(max_concurrency=len(sites)) as transport:
        for site, data in sites.items():
            node = Node(site, task=SleepingTask(delays_s.get(site, 0.0)), data=data, plan=plan)
            transport.add_node(site, node.serve)
        result = Coordinator(
            plan,
            strategy=simulation_strategy(plan, list(sites)),
            transport=transport,
            initial_parameters=initial_parameters(LogisticTask(), spec, plan),
            statistics_width=spec.channels,
            on_event=events.append,
            **coordinator,
        ).run()
    return result, events


# -- a scripted federation: every answer comes in an order fixed in advance ---------------------------


class Script:
    """Lets scripted nodes answer their TRAIN jobs only in the order of ``turns`` (node ids), one at a time.

    The in-process transport hands results to the coordinator in the order
    they are pushed, so what the coordinator sees is fixed: no timing is
    involved. Once every turn is taken, nodes answer freely.
    """

    def __init__(self, turns: list[str]) -> None:
        self.turns = turns
        self.position = 0
        self.condition = threading.Condition()

    def wait_turn(self, node_id: str, channel: NodeChannel) -> bool:
        """Block until it is ``node_id``'s turn (True) or the script is done (False) or the channel closed."""
        with self.condition:
            while not channel.closed:
                if self.position >= len(self.turns):
                    return False
                if self.turns[self.position] == node_id:
                    return True
                self.condition.wait(timeout=0.05)
            return False

    def done(self, node_id: str) -> None:
        with self.condition:
            if self.position < len(self.turns) and self.turns[self.position] == node_id:
                self.position += 1
            self.condition.notify_all()


class ScriptedNode:
    """Answers every TRAIN job with the update ``value`` (both weights) from one example, in its script's turns."""

    def __init__(self, node_id: str, value: float, script: Script | None, *, silent: bool = False) -> None:
        self.node_id, self.value, self.script, self.silent = node_id, value, script, silent
        self.rounds: list[int] = []  # the rounds of the TRAIN jobs it received

    def __call__(self, channel: NodeChannel) -> None:
        while not channel.closed:
            job = channel.pull_job(timeout_s=0.05)
            if job is None:
                continue
            if job.kind is JobKind.EVALUATE:
                channel.push_result(self._answer(job, metrics={"accuracy": 1.0}))
                continue
            self.rounds.append(job.round)
            if self.silent:
                channel.push_result(self._answer(job, error="never answers in time")) if channel.closed else None
                while not channel.closed:
                    time.sleep(0.02)
                return
            in_turn = self.script is not None and self.script.wait_turn(self.node_id, channel)
            channel.push_result(self._answer(job, update=Parameters({"w": np.full(2, self.value)})))
            if in_turn and self.script is not None:
                self.script.done(self.node_id)

    def _answer(self, job: Any, **fields: Any) -> JobResult:
        return JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=self.node_id, num_examples=1, **fields)


def scripted_plan(**buffered: Any) -> Plan:
    return parse_plan(
        {
            "task": "scripted",
            "dataset": {"name": "none", "normalization": "none"},
            "rounds": buffered.pop("rounds", 4),
            "min_nodes": buffered.pop("min_nodes", 2),
            "round_timeout_s": buffered.pop("round_timeout_s", None),
            "evaluation": {"every_rounds": 100},
            "strategy": {"name": "fedavg", "buffered": buffered},
        }
    )


def run_scripted(plan: Plan, runners: Mapping[str, ScriptedNode], **run: Any) -> tuple[Any, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    with InProcTransport(max_concurrency=len(runners)) as transport:
        for node_id, runner in runners.items():
            transport.add_node(node_id, runner)
        coordinator = Coordinator(
            plan,
            strategy=FedAvg(),
            transport=transport,
            initial_parameters=Parameters({"w": np.zeros(2)}),
            on_event=events.append,
            **run.pop("coordinator", {}),
        )
        return coordinator.run(**run), events


def test_staleness_weight_is_one_over_one_plus_staleness_to_the_exponent():
    assert [staleness_weight(s, exponent=1.0) for s in (0, 1, 3)] == [1.0, 0.5, 0.25]
    assert staleness_weight(8, exponent=0.5) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1, exponent=0.5)


def test_stale_updates_are_weighted_down_and_too_stale_ones_dropped():
    # K = 2, max_staleness 1, weight 1 / (1 + staleness); updates a: +1, b: +3, s: +10, one example each.
    # v1 = mean(a, b) = 2; v2 = 2 + (a + s/2 (trained on v0)) / 1.5 = 6; v3 = 6 + mean(a, s) = 11.5;
    # b's update trained on v1 arrives at staleness 2 > 1: dropped; v4 = 11.5 + mean(a, b) = 13.5.
    script = Script(["a", "b", "a", "s", "a", "s", "b", "a", "b"])
    runners = {name: ScriptedNode(name, value, script) for name, value in (("a", 1.0), ("b", 3.0), ("s", 10.0))}
    result, events = run_scripted(scripted_plan(buffer_size=2, max_staleness=1, staleness_exponent=1.0), runners)
    assert result.rounds_completed == 4
    assert result.parameters["w"].tolist() == pytest.approx([13.5, 13.5])
    ends = [e for e in events if e["event"] == "round_end"]
    assert [e["buffered"]["staleness"] for e in ends] == [
        {"a": 0, "b": 0}, {"a": 0, "s": 1}, {"a": 0, "s": 0}, {"a": 0, "b": 0}
    ]
    assert [e["buffered"]["dropped_stale"] for e in ends] == [0, 0, 0, 1]
    stale = [e for e in events if e["event"] == "node_stale"]
    assert [(e["node_id"], e["round"], e["staleness"]) for e in stale] == [("b", 4, 2)]
    # Each node trains at most once per global model: its rounds strictly increase (a DP ledger never sees one twice).
    assert runners["a"].rounds == [1, 2, 3, 4] and runners["b"].rounds == [1, 2, 4] and runners["s"].rounds == [1, 3, 4]
    assert result.participation == {1: ["a", "b"], 2: ["a", "s"], 3: ["a", "s"], 4: ["a", "b"]}
