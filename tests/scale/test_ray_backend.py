"""The Ray backend: the same federation as in-process, with the sites packed into Ray worker actors.

One local Ray instance (2 CPUs) serves every test in this module. The first
tests check :class:`RayTransport` against the transport conformance
behaviours (``tests/transport/test_conformance.py``) with echo workers; the
rest run whole federations through :func:`fedcare.scale.simulate_on_ray`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from fedcare.errors import ConfigError, TransportError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.plan import Plan, load_plan, parse_plan
from fedcare.simulation import simulate
from fedcare.tasks.base import Split, TrainResult
from fedcare.tasks.registry import TaskRegistry
from fedcare.tasks.tabular import LogisticTask
from fedcare.transport.ray_transport import RayTransport, job_from_wire, result_to_wire

ray = pytest.importorskip("ray")

from fedcare.scale import simulate_on_ray

HEART_PLAN = "src/fedcare/plans/heart_disease.yaml"

# The workers cannot import this test module: send its classes (echo worker, test tasks) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (starting Ray takes seconds)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


class EchoWorker:
    """A worker actor that answers each job after its node's delay, speaking the transport's wire format."""

    def __init__(self, delays: Mapping[str, float]) -> None:
        self.delays = dict(delays)

    def run(self, node_id: str, header: Mapping[str, Any], parameters: bytes | None) -> Any:
        job = job_from_wire(header, parameters)
        time.sleep(self.delays[node_id])
        return result_to_wire(
            JobResult(job.run_id, job.round, job.job_id, job.kind, node_id=node_id, num_examples=job.round)
        )


@pytest.fixture
def make_transport() -> Iterator[Any]:
    """Call with ``{node: delay_s}``; each node gets its own echo worker actor."""
    actors: list[Any] = []

    def make(delays: Mapping[str, float]) -> RayTransport:
        placement = {}
        for node_id, delay in delays.items():
            actor = ray.remote(EchoWorker).options(num_cpus=0).remote({node_id: delay})
            actors.append(actor)
            placement[node_id] = actor
        return RayTransport(placement)

    yield make
    for actor in actors:
        ray.kill(actor)


def job(job_id: str, round_number: int = 1) -> Job:
    return Job("run", round_number, job_id, JobKind.EVALUATE, plan_hash="h")


def short_heart_plan(*, secure: bool) -> Plan:
    plan = load_plan(HEART_PLAN)
    return plan.model_copy(
        update={"rounds": 3, "secure_aggregation": plan.secure_aggregation.model_copy(update={"enabled": secure})}
    )


# -- the transport's conformance behaviours --------------------------------------------------


def test_transport_lists_attached_nodes(make_transport):
    with make_transport({"b": 0.0, "a": 0.0}) as transport:
        assert transport.nodes() == ["a", "b"]


def test_every_submitted_job_gets_its_result(make_transport):
    with make_transport({"a": 0.0, "b": 0.0}) as transport:
        transport.submit("a", job("ja"))
        transport.submit("b", job("jb"))
        results = {r.job_id: r.node_id for r in transport.results(["ja", "jb"], timeout_s=30)}
    assert results == {"ja": "a", "jb": "b"}


def test_results_arrive_as_they_complete(make_transport):
    with make_transport({"slow": 0.5, "fast": 0.0}) as transport:
        transport.submit("slow", job("js"))
        transport.submit("fast", job("jf"))
        order = [r.node_id for r in transport.results(["js", "jf"], timeout_s=30)]
    assert order == ["fast", "slow"]


def test_results_stop_at_the_deadline_without_the_straggler(make_transport):
    with make_transport({"slow": 2.0, "fast": 0.0}) as transport:
        transport.submit("fast", job("warm"))  # the actors' first call includes their start
        transport.submit("slow", job("warm-slow"))
        list(transport.results(["warm"], timeout_s=30))
        transport.submit("fast", job("jf"))
        started = time.monotonic()
        got = [r.job_id for r in transport.results(["warm-slow", "jf"], timeout_s=0.5)]
        elapsed = time.monotonic() - started
    assert got == ["jf"]
    assert elapsed < 1.5


def test_jobs_left_outstanding_by_an_early_stop_answer_a_later_call():
    # Buffered aggregation takes one answer and stops iterating: a job still queued for the worker must stay.
    actor = ray.remote(EchoWorker).options(num_cpus=0).remote({"a": 0.05})
    try:
        with RayTransport({"a": actor}, max_in_flight_per_worker=1) as transport:
            for job_id in ("j1", "j2", "j3"):
                transport.submit("a", job(job_id))
            answers = transport.results(["j1", "j2", "j3"], timeout_s=30)
            first = next(iter(answers))
            answers.close()  # j2 is with the worker, j3 still queued here
            later = [r.job_id for r in transport.results(["j2", "j3"], timeout_s=30)]
    finally:
        ray.kill(actor)
    assert first.job_id == "j1"
    assert later == ["j2", "j3"]


def test_stale_results_of_earlier_jobs_are_dropped(make_transport):
    with make_transport({"slow": 0.6, "fast": 0.0}) as transport:
        transport.submit("slow", job("old", 1))
        assert [r.job_id for r in transport.results(["old"], timeout_s=0.1)] == []
        time.sleep(0.8)  # the late answer to "old" is now waiting
        transport.submit("fast", job("new", 2))
        assert [r.job_id for r in transport.results(["new"], timeout_s=30)] == ["new"]


def test_node_that_answered_late_keeps_serving(make_transport):
    with make_transport({"slow": 0.6}) as transport:
        transport.submit("slow", job("old", 1))
        assert [r.job_id for r in transport.results(["old"], timeout_s=0.1)] == []
        time.sleep(0.8)
        transport.submit("slow", job("next", 2))
        assert [r.job_id for r in transport.results(["next"], timeout_s=30)] == ["next"]


def test_submit_to_unknown_node_raises_transport_error(make_transport):
    with make_transport({"a": 0.0}) as transport, pytest.raises(TransportError, match="'ghost'"):
        transport.submit("ghost", job("j"))


def test_closed_transport_refuses_submit(make_transport):
    transport = make_transport({"a": 0.0})
    transport.close()
    with pytest.raises(TransportError, match="closed"):
        transport.submit("a", job("j"))


def test_in_flight_jobs_per_worker_are_bounded(make_transport):
    with make_transport({"a": 0.2}) as transport:
        for index in range(6):
            transport.submit("a", job(f"j{index}"))
        assert len(transport._in_flight) == 2  # the rest wait in the driver, not in the worker's mailbox
        got = [r.job_id for r in transport.results([f"j{i}" for i in range(6)], timeout_s=30)]
    assert got == [f"j{i}" for i in range(6)]


# -- whole federations ------------------------------------------------------------------------


def test_ray_run_of_heart_disease_equals_the_in_process_run():
    plan = short_heart_plan(secure=False)
    expected = simulate(plan)
    result = simulate_on_ray(plan)
    assert result.rounds_completed == 3 and result.failures == []
    np.testing.assert_allclose(result.parameters.flatten(), expected.parameters.flatten(), rtol=0, atol=1e-6)
    for site, metrics in expected.final_evaluation.sites.items():
        assert result.final_evaluation.sites[site]["accuracy"] == pytest.approx(metrics["accuracy"])


class PidTask(LogisticTask):
    """Logistic regression that also reports the process it evaluated in."""

    def evaluate(self, model: Any, data: Split) -> dict[str, float]:
        return {**super().evaluate(model, data), "worker_pid": float(os.getpid())}


def test_nodes_run_in_worker_processes_not_in_the_driver():
    plan = parse_plan(
        {"task": "pid-logistic", "rounds": 1, "dataset": {"name": "breast-cancer", "num_nodes": 4}, "seed": 1}
    )
    result = simulate_on_ray(plan, registry=TaskRegistry([("pid-logistic", PidTask)]), num_workers=2)
    pids = {int(metrics["worker_pid"]) for metrics in result.final_evaluation.sites.values()}
    assert os.getpid() not in pids
    assert len(pids) == 2  # four sites packed into two workers


class FailingTask(LogisticTask):
    """Raises in training on the site whose training split has ``rows`` rows."""

    rows = -1

    def train(self, model: Any, data: Split, plan: Plan, *, seed: int, hooks: Any = ()) -> TrainResult:
        if len(data) == self.rows:
            raise RuntimeError("scanner export corrupted")
        return super().train(model, data, plan, seed=seed, hooks=hooks)


def test_node_whose_task_raises_is_reported_by_name_and_the_round_goes_on():
    from fedcare.data.catalog import DatasetCatalog

    plan = parse_plan(
        {"task": "failing", "rounds": 2, "min_nodes": 2, "seed": 3,
         "dataset": {"name": "breast-cancer", "num_nodes": 4, "normalization": "per-site"}}
    )  # fmt: skip
    sites = DatasetCatalog.bundled().get("breast-cancer").load_sites(plan.dataset)
    sizes = {name: len(data.train) for name, data in sites.items()}
    target = next(name for name, size in sizes.items() if list(sizes.values()).count(size) == 1)
    failing = type("FailingOnOneSite", (FailingTask,), {"rows": sizes[target]})
    result = simulate_on_ray(plan, registry=TaskRegistry([("failing", failing)]), num_workers=2)
    assert result.rounds_completed == 2
    assert {f["node_id"] for f in result.failures} == {target}
    assert [f["round"] for f in result.failures] == [1, 2]
    assert all("RuntimeError" in f["error"] and "scanner export corrupted" in f["error"] for f in result.failures)


def test_two_hundred_sites_of_a_split_dataset_complete_two_rounds():
    plan = parse_plan(
        {"task": "image-cnn", "rounds": 2, "seed": 0, "min_nodes": 100,
         "dataset": {"name": "pneumonia", "num_nodes": 200},
         "model": {"width": 4}, "local": {"epochs": 1, "batch_size": 32},
         "evaluation": {"every_rounds": 2}}
    )  # fmt: skip
    result = simulate_on_ray(plan)
    assert result.rounds_completed == 2
    assert result.failures == []
    assert len(result.participation[2]) == 200


def test_missing_ray_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedcare\[ray\]'"):
        simulate_on_ray(short_heart_plan(secure=False))


def test_site_data_that_cannot_load_raises_the_datasets_own_error_from_the_worker():
    plan = parse_plan(
        {"task": "image-cnn", "rounds": 1,
         "dataset": {"name": "pneumonia", "num_nodes": 1000, "partition": "dirichlet"}}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="cannot give 1000 sites") as caught:
        simulate_on_ray(plan)
    assert caught.value.field == "num_nodes"  # as the in-process loader says it


def test_the_simulate_command_runs_on_ray_with_backend_ray(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from fedcare.cli import app, demo_plan_path

    raw = yaml.safe_load(demo_plan_path(private=False).read_text())
    raw.update(rounds=2, secure_aggregation={"enabled": False})
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(raw))

    result = CliRunner().invoke(app, ["simulate", str(plan_path), "--out", str(tmp_path / "run"), "--backend", "ray", "--json"])

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    assert (tmp_path / "run" / "report.html").exists()


def test_an_address_without_the_ray_backend_is_refused(tmp_path):
    from typer.testing import CliRunner

    from fedcare.cli import app, demo_plan_path

    result = CliRunner().invoke(app, ["simulate", str(demo_plan_path()), "--address", "10.0.0.1:6379", "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "--backend ray" in result.output
