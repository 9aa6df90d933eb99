"""Buffered asynchronous aggregation (FedBuff): staleness weights, dropped stale updates, a slow site, plan refusals."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedcare.errors import ConfigError, FederationError
from fedcare.federation import Coordinator, RunDirectory
from fedcare.federation.buffered import staleness_weight
from fedcare.federation.differential_privacy import ledger_file
from fedcare.messages import JobKind, JobResult
from fedcare.params import Parameters
from fedcare.plan import Plan, parse_plan
from fedcare.strategies import FedAvg
from fedcare.simulation import simulate
from fedcare.transport.base import NodeChannel
from fedcare.transport.inproc import InProcTransport

from .slow_sites import HEART, run_heart

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
            if self.silent:  # a site behind a link that is down: it never answers
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


def test_no_answer_for_round_timeout_aggregates_what_the_buffer_holds():
    # K = 3 of three sites, one silent: each round's buffer holds two updates (>= min_nodes) when the deadline passes.
    runners = {
        "a": ScriptedNode("a", 1.0, None),
        "b": ScriptedNode("b", 3.0, None),
        "c": ScriptedNode("c", 0.0, None, silent=True),
    }
    result, events = run_scripted(scripted_plan(rounds=2, buffer_size=3, round_timeout_s=0.3), runners)
    assert result.rounds_completed == 2
    assert result.parameters["w"].tolist() == pytest.approx([4.0, 4.0])  # 2 + 2
    assert result.participation == {1: ["a", "b"], 2: ["a", "b"]}
    assert [e["node_id"] for e in events if e["event"] == "node_late"][:1] == ["c"]


def test_no_answer_for_round_timeout_with_fewer_than_min_nodes_stops_the_run():
    runners = {
        "a": ScriptedNode("a", 1.0, None),
        "b": ScriptedNode("b", 0.0, None, silent=True),
        "c": ScriptedNode("c", 0.0, None, silent=True),
    }
    expected = "round_timeout_s=0.3 s.*holds 1 of buffer_size=3 updates, fewer than min_nodes=2"
    with pytest.raises(FederationError, match=expected):
        run_scripted(scripted_plan(rounds=2, buffer_size=3, round_timeout_s=0.3), runners)


def test_resumed_buffered_run_continues_from_the_last_aggregation(tmp_path):
    run_dir = RunDirectory(tmp_path / "run")
    first = {"a": ScriptedNode("a", 1.0, None), "b": ScriptedNode("b", 3.0, None), "c": ScriptedNode("c", 5.0, None)}
    two = scripted_plan(rounds=2, buffer_size=3)
    run_scripted(two, first, coordinator={"run_dir": run_dir, "run_id": "run-1"})
    assert run_dir.load_checkpoint()[0] == 2
    again = {name: ScriptedNode(name, 1.0, None) for name in "abc"}
    result, events = run_scripted(
        scripted_plan(rounds=4, buffer_size=3), again, coordinator={"run_dir": run_dir, "run_id": "run-1"}, resume=True
    )
    assert result.rounds_completed == 4
    assert result.parameters["w"].tolist() == pytest.approx([8.0, 8.0])  # 3 + 3 from the checkpoint, then 1 + 1
    assert [e["first_round"] for e in events if e["event"] == "run_start"] == [3]
    assert all(runner.rounds[0] == 3 for runner in again.values())  # first jobs on the checkpoint's model: round 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"secure_aggregation": {"enabled": True}}, "secure aggregation reveals only the sum of a fixed set of sites"),
        ({"strategy": {"name": "median"}}, "median is unweighted"),
        ({"strategy": {"name": "krum"}}, "krum is unweighted"),
        ({"strategy": {"name": "cyclic"}, "min_nodes": 1}, "cyclic trains one site at a time"),
        ({"strategy": {"name": "scaffold"}}, "scaffold's control variates"),
        ({"privacy": {"site_level": {"enabled": True}}}, "site-level DP accounts for rounds that sample sites at random"),
        ({"nodes_per_round": 2}, "buffer_size 3 is larger than the 2 sites per round"),
        ({"min_nodes": 4, "nodes_per_round": 4}, "buffer_size 3 is smaller than min_nodes"),
    ],
)
def test_plan_refuses_buffered_aggregation_it_cannot_run(extra, message):
    data = {**HEART, **extra}
    data["strategy"] = {**HEART["strategy"], **extra.get("strategy", {}), "buffered": {"buffer_size": 3}}
    with pytest.raises(ConfigError, match=message) as refused:
        parse_plan(data)
    assert refused.value.field is not None and refused.value.field.startswith("plan.strategy.buffered")


def test_plan_takes_buffered_aggregation_with_fedprox_and_record_level_dp():
    data = {**HEART, "strategy": {"name": "fedprox", "buffered": {"buffer_size": 3}}}
    assert parse_plan(data).strategy.buffered.buffer_size == 3
    dp = {
        **HEART,
        "strategy": {"name": "fedavg", "buffered": {"buffer_size": 3}},
        "privacy": {"record_level": {"enabled": True, "epsilon": 5.0}},
    }
    assert parse_plan(dp).privacy.record_level.enabled


def test_buffer_larger_than_the_sites_is_refused_when_the_run_starts():
    runners = {name: ScriptedNode(name, 1.0, None) for name in "ab"}
    with pytest.raises(ConfigError, match="buffer_size 3 is larger than the 2 sites") as refused:
        run_scripted(scripted_plan(rounds=1, buffer_size=3), runners)
    assert refused.value.field == "plan.strategy.buffered.buffer_size"


# -- the must-show: one site five times slower ---------------------------------------------------------


def test_buffered_run_with_one_site_five_times_slower_takes_at_most_40_percent_of_synchronous_time():
    # Each local round sleeps 20 ms after training; va-long-beach's takes five times as long as that in all.
    slow = {"delay_s": 0.02, "slowdowns": {"va-long-beach": 5.0}}
    run_heart(parse_plan({**HEART, "rounds": 1}))  # the process's first run pays one-off costs: neither timed run does
    buffered_plan = {**HEART, "strategy": {"name": "fedavg", "buffered": {"buffer_size": 3, "max_staleness": 8}}}
    buffered, events = run_heart(parse_plan(buffered_plan), **slow)
    synchronous, _ = run_heart(parse_plan(HEART), **slow)
    assert buffered.rounds_completed == synchronous.rounds_completed == 30
    assert buffered.wall_s <= 0.4 * synchronous.wall_s, (buffered.wall_s, synchronous.wall_s)
    accuracy = {"sync": synchronous.final_evaluation.mean["accuracy"], "buffered": buffered.final_evaluation.mean["accuracy"]}
    assert abs(accuracy["buffered"] - accuracy["sync"]) <= 0.01, accuracy
    # The slow site's updates do count, weighted down by their staleness.
    ends = [e for e in events if e["event"] == "round_end"]
    staleness = [e["buffered"]["staleness"]["va-long-beach"] for e in ends if "va-long-beach" in e["nodes_ok"]]
    assert len(staleness) >= 4 and max(staleness) >= 2
    assert not buffered.failures


def test_buffered_run_with_record_level_dp_spends_each_round_once_per_site(tmp_path):
    data = {
        **HEART,
        "rounds": 4,
        "dataset": {"name": "heart-disease", "normalization": "per-site"},  # no noisy feature statistics: faster
        "evaluation": {"every_rounds": 4},
        "strategy": {"name": "fedavg", "buffered": {"buffer_size": 3, "max_staleness": 8}},
        "privacy": {"record_level": {"enabled": True, "epsilon": 5.0, "delta": 1e-3, "noise_multiplier": 4.0}},
    }
    result = simulate(parse_plan(data), ledger_dir=tmp_path / "ledgers")
    assert result.rounds_completed == 4
    assert not result.failures  # a ledger refuses a round it has already spent: that would be a failure here
    for site in ("cleveland", "hungary", "switzerland", "va-long-beach"):
        ledger = json.loads(ledger_file(tmp_path / "ledgers" / site, "heart-disease").read_text())
        rounds = [entry["round"] for entry in ledger["entries"]]
        assert rounds == sorted(set(rounds)) and 1 <= len(rounds) <= 4, (site, rounds)  # each round spent once
        assert 0 < result.epsilon_spent[site] <= 5.0
