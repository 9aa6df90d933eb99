"""Bad results from a node, seen by the coordinator: each refused by name, logged, and without effect.

Three honest in-process nodes answer every training job with ``global + 1``;
a fourth answers with the bad result of the case. Each case checks the event
that names the node and the problem, the coordinator's warning, and that the
run finished with exactly the model the honest nodes alone would give
(``initial + rounds``): the bad input changed nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedcare.federation import Coordinator
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.plan import parse_plan
from fedcare.strategies import FedAvg
from fedcare.transport.base import NodeChannel
from fedcare.transport.inproc import InProcTransport

ROUNDS = 2
HONEST = ("site-a", "site-b", "site-c")
INITIAL = Parameters({"layer.weight": np.zeros((3, 2), np.float32), "layer.bias": np.zeros(3, np.float32)}).freeze()

BadAnswer = Callable[[Job, JobResult], list[JobResult]]


def good_answer(job: Job, node_id: str) -> JobResult:
    if job.kind is JobKind.EVALUATE:
        return JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=node_id, num_examples=5, metrics={"accuracy": 1.0})
    assert job.parameters is not None
    update = Parameters.from_flat(np.ones(job.parameters.num_elements, np.float32), job.parameters.spec)
    return JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=node_id, update=update, num_examples=10)


def runner(node_id: str, bad: BadAnswer | None) -> Callable[[NodeChannel], None]:
    def serve(channel: NodeChannel) -> None:
        while not channel.closed:
            job = channel.pull_job(timeout_s=0.05)
            if job is None:
                continue
            answer = good_answer(job, node_id)
            for result in bad(job, answer) if bad is not None and job.kind is JobKind.TRAIN else [answer]:
                channel.push_result(result)

    return serve


def with_update(arrays: dict[str, np.ndarray]) -> BadAnswer:
    return lambda job, good: [replace(good, update=Parameters(arrays))]


def poisoned(value: float) -> BadAnswer:
    def answer(job: Job, good: JobResult) -> list[JobResult]:
        assert good.update is not None
        flat = good.update.flatten().copy()
        flat[4] = value
        return [replace(good, update=Parameters.from_flat(flat, good.update.spec))]

    return answer


CASES: list[tuple[str, BadAnswer, str]] = [
    ("wrong shape", with_update({"layer.weight": np.ones((2, 3), np.float32), "layer.bias": np.ones(3, np.float32)}), "update has tensors"),
    ("wrong tensor names", with_update({"fc.weight": np.ones((3, 2), np.float32), "fc.bias": np.ones(3, np.float32)}), "update has tensors"),
    ("a tensor missing", with_update({"layer.weight": np.ones((3, 2), np.float32)}), "update has tensors"),
    ("an extra tensor", with_update({"layer.weight": np.ones((3, 2), np.float32), "layer.bias": np.ones(3, np.float32), "x": np.ones(1, np.float32)}), "update has tensors"),
    ("NaN in the update", poisoned(float("nan")), "non-finite values"),
    ("Inf in the update", poisoned(float("inf")), "non-finite values"),
    ("zero training examples", lambda job, good: [replace(good, num_examples=0)], "reports 0 training examples"),
    ("negative training examples", lambda job, good: [replace(good, num_examples=-5)], "reports -5 training examples"),
    ("a training result without an update", lambda job, good: [replace(good, update=None)], "carries no update"),
]


def run_with(
    bad: BadAnswer, *, round_timeout_s: float | None = None, max_update_norm: float | None = None
) -> tuple[Any, list[dict[str, Any]]]:
    plan = parse_plan(
        {
            "task": "plus-one",
            "dataset": {"name": "none", "normalization": "none"},
            "rounds": ROUNDS,
            "min_nodes": 3,
            "evaluation": {"every_rounds": ROUNDS},
            "round_timeout_s": round_timeout_s,
            "max_update_norm": max_update_norm,
        }
    )
    events: list[dict[str, Any]] = []
    with InProcTransport() as transport:
        for node in HONEST:
            transport.add_node(node, runner(node, None))
        transport.add_node("hostile", runner("hostile", bad))
        result = Coordinator(plan, strategy=FedAvg(), transport=transport, initial_parameters=INITIAL, on_event=events.append).run()
    return result, events


def assert_only_the_honest_updates_count(result: Any) -> None:
    assert result.rounds_completed == ROUNDS
    np.testing.assert_array_equal(result.parameters.flatten(), np.full(INITIAL.num_elements, ROUNDS, np.float32))
    assert all(sorted(nodes) == list(HONEST) for nodes in result.participation.values())


@pytest.mark.parametrize(("name", "bad", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_training_result_is_refused_by_name_and_changes_nothing(
    name: str, bad: BadAnswer, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedcare.federation.coordinator"):
        result, events = run_with(bad)

    failures = [e for e in events if e["event"] == "node_failed"]
    assert [(f["round"], f["node_id"]) for f in failures] == [(r, "hostile") for r in range(1, ROUNDS + 1)]
    assert all(message in f["error"] for f in failures), failures
    assert sum("node failed a job" in r.getMessage() for r in caplog.records) == ROUNDS
    assert_only_the_honest_updates_count(result)


def test_an_update_above_the_norm_bound_is_refused_not_clipped(caplog: pytest.LogCaptureFixture) -> None:
    def scaled(job: Job, good: JobResult) -> list[JobResult]:
        assert good.update is not None
        return [replace(good, update=Parameters.from_flat(good.update.flatten() * np.float32(100), good.update.spec))]

    with caplog.at_level(logging.WARNING, logger="fedcare.federation.coordinator"):
        result, events = run_with(scaled, max_update_norm=10.0)  # honest updates have norm sqrt(9) = 3

    failures = [e for e in events if e["event"] == "node_failed"]
    assert [f["node_id"] for f in failures] == ["hostile"] * ROUNDS
    assert all("above the plan's max_update_norm of 10" in f["error"] for f in failures), failures
    assert_only_the_honest_updates_count(result)


def test_a_result_naming_another_run_is_refused_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedcare.federation.coordinator"):
        result, events = run_with(lambda job, good: [replace(good, run_id="another-run")])

    failures = [e for e in events if e["event"] == "node_failed"]
    assert [(e["round"], e["node_id"]) for e in failures] == [(r, "hostile") for r in range(1, ROUNDS + 1)]
    assert all("names another run" in f["error"] for f in failures)
    assert "node failed a job" in caplog.text
    assert_only_the_honest_updates_count(result)


def test_a_result_for_a_round_that_has_ended_is_dropped() -> None:
    """The hostile node answers each job only after the round's deadline: the late answer is stale and ignored."""
    held: list[JobResult] = []

    def late(job: Job, good: JobResult) -> list[JobResult]:
        stale = held[:]  # last round's answer, sent now
        held[:] = [good]
        return stale

    result, events = run_with(late, round_timeout_s=1.0)

    assert [e["node_id"] for e in events if e["event"] == "node_late"] == ["hostile"] * ROUNDS
    assert_only_the_honest_updates_count(result)
