"""Unequal compute: the device a site trains on, its CPU threads, and a time budget per round."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcare.data import DatasetCatalog
from fedcare.deployment import NodeConfig
from fedcare.errors import ConfigError
from fedcare.federation.differential_privacy import ledger_file
from fedcare.federation.node import Node
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.plan import Plan, parse_plan, plan_hash
from fedcare.privacy.dp.accountant import Mechanism, epsilon_spent
from fedcare.privacy.dp.dpsgd import round_mechanism
from fedcare.privacy.dp.ledger import PrivacyLedger
from fedcare.simulation import initial_parameters, simulate
from fedcare.strategies import make_strategy
from fedcare.tasks.base import DataSpec, SiteData, Split, TrainHook
from fedcare.tasks.compute import (
    ComputeSettings,
    TimeBudget,
    configure_threads,
    resolve_device,
    time_budget_seconds,
    usable_cores,
)
from fedcare.tasks.registry import TaskRegistry
from fedcare.tasks.tabular import LogisticTask
from fedcare.tasks.torch_task import planned_steps

CUDA = torch.cuda.is_available()


class SlowLogisticTask(LogisticTask):
    """Logistic regression on a slow machine: each training batch takes ``delay_s`` longer (a real sleep).

    It counts the batches it was asked to train on, so a test can check the
    steps a node reports against the steps that really ran.
    """

    def __init__(self, delay_s: float = 0.004) -> None:
        self.delay_s = delay_s
        self.batches = 0

    def augment(self, x: torch.Tensor, plan: Plan, *, generator: torch.Generator) -> torch.Tensor:
        time.sleep(self.delay_s)
        self.batches += 1
        return x


class _CountSteps(TrainHook):
    def __init__(self) -> None:
        self.steps = 0

    def on_loss(self, model: Any, loss: Any) -> Any:
        self.steps += 1
        return loss


def _ticking_clock(seconds_per_call: float = 1.0) -> Any:
    """A clock that moves ``seconds_per_call`` on every reading: training's timing, made exact."""
    now = [0.0]

    def clock() -> float:
        value = now[0]
        now[0] += seconds_per_call
        return value

    return clock


def _sites(seed: int, rows: tuple[int, ...] = (96, 96, 96), features: int = 4) -> dict[str, SiteData]:
    rng = np.random.default_rng(seed)
    spec = DataSpec(num_features=features, num_classes=2)
    weights = rng.normal(size=features)
    sites = {}
    for index, n in enumerate(rows):
        x = rng.normal(size=(n, features)).astype(np.float32)
        y = (x @ weights + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
        sites[f"site-{index}"] = SiteData(f"site-{index}", spec, Split(x, y), Split(x, y))
    return sites


def _plan(**extra: Any) -> Plan:
    base: dict[str, Any] = {"task": "tabular-logistic", "rounds": 1, "dataset": {"name": "synthetic", "normalization": "none"},
                            "local": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}}  # fmt: skip
    return parse_plan({**base, **extra})


def _train_job(plan: Plan, round_number: int, site: str, parameters: Parameters, seed: int) -> Job:
    return Job("run", round_number, f"{round_number}-{site}", JobKind.TRAIN, plan_hash=plan_hash(plan),
               parameters=parameters, config={"seed": seed})  # fmt: skip


# --- device and threads -------------------------------------------------------------------------


def test_auto_device_is_cuda_when_present_and_the_cpu_otherwise() -> None:
    assert resolve_device(ComputeSettings()) == ("cuda" if CUDA else "cpu")
    assert resolve_device(ComputeSettings(device="cpu")) == "cpu"
    assert resolve_device(None) == "cpu"  # simulations and tests: the same results on every machine


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_asked_for_on_a_machine_without_it_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="no usable CUDA device") as caught:
        resolve_device(ComputeSettings(device="cuda"))
    assert caught.value.field == "node.compute.device"


def test_a_cuda_device_number_the_machine_lacks_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="cuda:99") as caught:
        resolve_device(ComputeSettings(device="cuda:99"))
    assert caught.value.field == "node.compute.device"


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_a_node_asked_to_train_on_cuda_without_it_refuses_to_start() -> None:
    plan = _plan()
    with pytest.raises(ConfigError) as caught:
        Node("site-0", task=LogisticTask(), data=_sites(0)["site-0"], plan=plan, compute=ComputeSettings(device="cuda"))
    assert caught.value.field == "node.compute.device"


def test_node_yaml_compute_section_is_the_tasks_compute_settings() -> None:
    config = NodeConfig.model_validate({"name": "a", "datasets": {"heart-disease": {"site": "cleveland"}},
                                        "compute": {"device": "cpu", "threads": 2, "max_local_seconds": 30}})  # fmt: skip
    assert config.compute == ComputeSettings(device="cpu", threads=2, max_local_seconds=30.0)
    with pytest.raises(ValueError, match="device"):
        ComputeSettings(device="gpu")


def test_cpu_threads_default_to_the_usable_cores_and_an_explicit_count_wins() -> None:
    before = torch.get_num_threads()
    try:
        expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert usable_cores() == expected
        assert configure_threads(ComputeSettings(), device="cpu") == expected
        assert torch.get_num_threads() == expected
        assert configure_threads(ComputeSettings(threads=1), device="cpu") == 1
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        assert configure_threads(ComputeSettings(), device="cuda") is None  # torch's default left alone on a GPU
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


# --- the time budget ----------------------------------------------------------------------------


def test_effective_budget_is_the_lower_of_the_plans_and_the_sites() -> None:
    assert time_budget_seconds(10.0, 3.0) == time_budget_seconds(3.0, 10.0) == 3.0
    assert time_budget_seconds(None, 3.0) == 3.0 and time_budget_seconds(10.0, None) == 10.0
    node = Node("site-0", task=LogisticTask(), data=_sites(0)["site-0"], plan=_plan(local={"max_local_seconds": 10}),
                compute=ComputeSettings(device="cpu", max_local_seconds=3))  # fmt: skip
    assert node.max_local_seconds == 3.0


def test_budget_stops_after_the_step_it_ran_out_in_and_the_model_is_those_first_steps_exactly() -> None:
    data = _sites(1)["site-0"]
    plan = _plan()  # 12 planned steps
    task = LogisticTask()
    counted = _CountSteps()
    budget = TimeBudget(2.5, clock=_ticking_clock())  # reads 0 at start, then 1, 2, 3 after steps 1, 2, 3
    model = task.build_model(data.spec, plan, seed=0)
    result = task.train(model, data.train, plan, seed=7, hooks=[counted, budget])
    assert planned_steps(len(data.train), plan.local) == 12
    assert (result.steps, counted.steps, budget.stopped) == (3, 3, True)
    reference = task.build_model(data.spec, plan, seed=0)
    task.train(reference, data.train, _plan(local={"steps": 3, "batch_size": 8, "learning_rate": 0.1}), seed=7)
    np.testing.assert_array_equal(task.get_parameters(model).flatten(), task.get_parameters(reference).flatten())


def test_budget_that_runs_out_before_the_first_step_still_trains_one() -> None:
    data = _sites(1)["site-0"]
    task = LogisticTask()
    budget = TimeBudget(1e-9)
    time.sleep(0.001)  # spent before training starts
    result = task.train(task.build_model(data.spec, _plan(), seed=0), data.train, _plan(), seed=0, hooks=[budget])
    assert result.steps == 1 and budget.stopped


def test_training_within_its_budget_is_exactly_training_without_one() -> None:
    data = _sites(1)["site-0"]
    task, plan = LogisticTask(), _plan()
    budget = TimeBudget(3600.0)
    with_budget = task.build_model(data.spec, plan, seed=0)
    without = task.build_model(data.spec, plan, seed=0)
    assert task.train(with_budget, data.train, plan, seed=3, hooks=[budget]).steps == 12
    task.train(without, data.train, plan, seed=3)
    assert not budget.stopped
    np.testing.assert_array_equal(task.get_parameters(with_budget).flatten(), task.get_parameters(without).flatten())


def test_a_slow_site_reports_the_steps_it_really_ran_and_that_its_budget_stopped_it() -> None:
    data = _sites(2)["site-0"]
    plan = _plan(local={"epochs": 4, "batch_size": 8, "learning_rate": 0.1})  # 48 planned steps, >= 0.19 s here
    task = SlowLogisticTask(delay_s=0.004)
    node = Node("site-0", task=task, data=data, plan=plan, compute=ComputeSettings(device="cpu", max_local_seconds=0.03))
    start = initial_parameters(task, data.spec, plan).freeze()
    answer = node.handle(_train_job(plan, 1, "site-0", start, seed=0))
    assert answer.ok, answer.error
    assert 1 <= answer.metrics["steps"] < 48
    assert answer.metrics["steps"] == task.batches  # exactly the steps that ran
    assert answer.metrics["budget_stopped"] == 1.0


def test_a_site_without_a_budget_reports_no_budget_stop() -> None:
    plan = _plan()
    data = _sites(2)["site-0"]
    node = Node("site-0", task=LogisticTask(), data=data, plan=plan)
    answer = node.handle(_train_job(plan, 1, "site-0", initial_parameters(LogisticTask(), data.spec, plan), seed=0))
    assert answer.metrics["steps"] == 12.0 and "budget_stopped" not in answer.metrics


def test_dp_accounting_counts_the_steps_that_really_ran_not_the_planned_ones(tmp_path: Path) -> None:
    plan = parse_plan({
        "task": "tabular-logistic", "rounds": 2, "dataset": {"name": "heart-disease", "normalization": "per-site"},
        "local": {"epochs": 4, "batch_size": 16, "learning_rate": 0.05, "max_local_seconds": 0.03},
        "privacy": {"record_level": {"enabled": True, "epsilon": 8.0, "noise_multiplier": 1.2, "accountant": "rdp"}},
    })  # fmt: skip
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "cleveland")
    task = SlowLogisticTask(delay_s=0.004)
    node = Node("cleveland", task=task, data=data, plan=plan, ledger_dir=tmp_path, secure_noise=False)
    answer = node.handle(_train_job(plan, 1, "cleveland", initial_parameters(task, data.spec, plan), seed=0))
    assert answer.ok, answer.error
    planned = round_mechanism(len(data.train), plan.local, noise_multiplier=1.2)
    ran = int(answer.metrics["steps"])
    assert planned.steps == 52 and 1 <= ran < planned.steps and answer.metrics["budget_stopped"] == 1.0
    assert ran == task.batches
    entries = PrivacyLedger(ledger_file(tmp_path, "heart-disease"), dataset="heart-disease", epsilon_budget=8.0,
                            delta=plan.privacy.record_level.delta, accountant="rdp").entries  # fmt: skip
    assert [(entry.label, entry.steps) for entry in entries] == [("dp-sgd", ran)]
    ran_mechanism = Mechanism(noise_multiplier=1.2, sample_rate=planned.sample_rate, steps=ran)
    spent = epsilon_spent([ran_mechanism], delta=plan.privacy.record_level.delta, accountant="rdp")
    assert answer.metrics["dp_epsilon"] == pytest.approx(spent)
    assert spent < epsilon_spent([planned], delta=plan.privacy.record_level.delta, accountant="rdp")


# --- FedNova normalizes the unequal steps -------------------------------------------------------


def _budgeted_round(plan: Plan, sites: dict[str, SiteData]) -> tuple[Parameters, Parameters, list[JobResult]]:
    """One fednova round of real nodes, ``site-0`` slow with a tiny budget of its own."""
    nodes = {
        site: Node(site, task=SlowLogisticTask(0.004), data=data, plan=plan,
                   compute=ComputeSettings(device="cpu", max_local_seconds=0.02))  # fmt: skip
        if site == "site-0"
        else Node(site, task=LogisticTask(), data=data, plan=plan)
        for site, data in sites.items()
    }
    strategy = make_strategy(plan.strategy, num_sampled=len(nodes), num_nodes=len(nodes))
    start = initial_parameters(LogisticTask(), sites["site-0"].spec, plan).freeze()
    strategy.begin_round(1, start)
    answers = []
    for index, (site, node) in enumerate(nodes.items()):
        answer = node.handle(_train_job(plan, 1, site, start, seed=10 + index))
        assert answer.ok, answer.error
        strategy.receive_data(answer.data, node_id=site)
        strategy.accumulate(answer.update, weight=answer.num_examples, node_id=site)
        answers.append(answer)
    return start, strategy.finalize(), answers


def test_fednova_normalizes_the_fewer_steps_of_a_budgeted_site_as_a_hand_computation_does() -> None:
    sites = _sites(3, rows=(96, 64, 128))
    plan = _plan(strategy={"name": "fednova"}, local={"epochs": 3, "batch_size": 8, "learning_rate": 0.1})
    start, nova, answers = _budgeted_round(plan, sites)
    tau = np.array([answer.data["local_steps"] for answer in answers], dtype=np.float64)
    assert tau[1:].tolist() == [24.0, 48.0] and 1 <= tau[0] < 36  # the slow site ran short
    assert [answer.metrics["steps"] for answer in answers] == tau.tolist()
    n = np.array([answer.num_examples for answer in answers], dtype=np.float64)
    updates = np.stack([answer.update.flatten() for answer in answers if answer.update is not None])
    p = n / n.sum()
    expected = start.flatten().astype(np.float64) + (p @ tau) * (p / tau) @ updates
    np.testing.assert_allclose(nova.flatten(), expected, rtol=1e-5, atol=1e-7)


def test_heart_disease_accuracy_with_time_budgets_under_fednova_stays_close_to_an_unbudgeted_run() -> None:
    plan = parse_plan({
        "task": "tabular-logistic", "rounds": 15, "seed": 0, "min_nodes": 4, "strategy": {"name": "fednova"},
        "dataset": {"name": "heart-disease", "normalization": "federated"},
        "local": {"epochs": 2, "batch_size": 32, "learning_rate": 0.05}, "evaluation": {"every_rounds": 15},
    })  # fmt: skip
    # Every site is slow (4 ms a step): the 0.025 s budget cuts the big sites' 12-14 steps, not the small ones'.
    budgeted = plan.model_copy(update={"local": plan.local.model_copy(update={"max_local_seconds": 0.025})})
    events: list[dict[str, Any]] = []
    slow = TaskRegistry([("tabular-logistic", lambda: SlowLogisticTask(0.004))])
    short = simulate(budgeted, registry=slow, on_event=events.append, max_concurrency=2)
    full = simulate(plan, max_concurrency=2)
    ends = [event for event in events if event["event"] == "round_end"]
    assert all("cleveland" in event.get("short_sites", []) for event in ends)
    # Its 2 steps fit the budget (round 1 may still run short, while torch warms up).
    assert sum("switzerland" in event.get("short_sites", []) for event in ends) <= 2
    assert short.final_evaluation is not None and full.final_evaluation is not None
    assert full.final_evaluation.mean["accuracy"] > 0.75
    assert abs(short.final_evaluation.mean["accuracy"] - full.final_evaluation.mean["accuracy"]) <= 0.05


def test_fedavg_warns_in_each_round_where_budgets_leave_local_steps_more_than_2x_apart(caplog: Any) -> None:
    plan = parse_plan({
        "task": "tabular-logistic", "rounds": 2, "seed": 0, "strategy": {"name": "fedavg"},
        "dataset": {"name": "heart-disease", "normalization": "per-site"},
        "local": {"epochs": 1, "batch_size": 32, "learning_rate": 0.05}, "evaluation": {"every_rounds": 2},
    })  # fmt: skip
    # 10 ms a step and 0.035 s: cleveland stops after 3 or 4 of its 7 steps; switzerland plans 1 step.
    budgeted = plan.model_copy(update={"local": plan.local.model_copy(update={"max_local_seconds": 0.035})})
    slow = TaskRegistry([("tabular-logistic", lambda: SlowLogisticTask(0.01))])
    message = "time budgets left sites with unequal local steps; fedavg weighs them as equal, fednova normalizes them"
    with caplog.at_level("WARNING", logger="fedcare.federation.coordinator"):
        simulate(plan, max_concurrency=2)  # steps 7 against 1, but no budget: nothing to warn about
        assert [r.getMessage() for r in caplog.records].count(message) == 0
        simulate(budgeted, registry=slow, max_concurrency=2)
    assert [r.getMessage() for r in caplog.records].count(message) == 2


# --- on a GPU (skipped without CUDA) ------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_cuda_node_trains_the_cpus_model_up_to_float32_rounding_and_sends_cpu_arrays() -> None:
    data = _sites(4)["site-0"]
    plan = _plan(local={"epochs": 2, "batch_size": 8, "learning_rate": 0.1, "class_weighting": "balanced"})
    start = initial_parameters(LogisticTask(), data.spec, plan).freeze()
    answers = {}
    for device in ("cpu", "cuda"):
        node = Node("site-0", task=LogisticTask(), data=data, plan=plan, compute=ComputeSettings(device=device))
        answers[device] = node.handle(_train_job(plan, 1, "site-0", start, seed=5))
        assert answers[device].ok, answers[device].error
        assert node._model.linear.weight.device.type == device
    cuda_update = answers["cuda"].update
    assert cuda_update is not None and answers["cpu"].update is not None
    assert cuda_update.flatten().dtype == np.float32
    np.testing.assert_allclose(cuda_update.flatten(), answers["cpu"].update.flatten(), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_dp_sgd_trains_on_cuda_and_accounts_its_steps(tmp_path: Path) -> None:
    plan = parse_plan({
        "task": "tabular-logistic", "rounds": 2, "dataset": {"name": "heart-disease", "normalization": "per-site"},
        "local": {"epochs": 1, "batch_size": 16, "learning_rate": 0.05},
        "privacy": {"record_level": {"enabled": True, "epsilon": 8.0, "noise_multiplier": 1.2, "accountant": "rdp"}},
    })  # fmt: skip
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "cleveland")
    node = Node("cleveland", task=LogisticTask(), data=data, plan=plan, ledger_dir=tmp_path, secure_noise=False,
                compute=ComputeSettings(device="cuda"))  # fmt: skip
    answer = node.handle(_train_job(plan, 1, "cleveland", initial_parameters(LogisticTask(), data.spec, plan), seed=0))
    assert answer.ok, answer.error
    assert answer.metrics["steps"] == round_mechanism(len(data.train), plan.local, noise_multiplier=1.2).steps
    assert np.isfinite(answer.update.flatten()).all() and answer.metrics["dp_epsilon"] > 0
