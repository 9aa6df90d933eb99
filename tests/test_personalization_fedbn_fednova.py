"""FedBN keeps normalization local, FedNova normalizes unequal local steps, fine-tuning and Ditto personalize."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedcare.errors import ConfigError, ProtocolError
from fedcare.federation.node import Node
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters
from fedcare.personalization import fine_tune
from fedcare.plan import Plan, StrategyConfig, parse_plan, plan_hash
from fedcare.simulation import initial_parameters, simulate
from fedcare.strategies import Ditto, FedAvg, FedNova, make_strategy
from fedcare.tasks.base import DataSpec, SiteData, Split, Task
from fedcare.tasks.tabular import LogisticTask, MLPTask


def _sites(seed: int, *, rows: tuple[int, ...] = (64, 64, 64), features: int = 4) -> dict[str, SiteData]:
    """Sites whose features are shifted and scaled differently (feature shift, FedBN's setting)."""
    rng = np.random.default_rng(seed)
    spec = DataSpec(num_features=features, num_classes=2)
    weights = rng.normal(size=features)
    sites = {}
    for index, n in enumerate(rows):
        shift, scale = rng.normal(size=features) * 3, np.exp(rng.normal(size=features))
        z = rng.normal(size=(n, features))
        y = (z @ weights + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
        x = (z * scale + shift).astype(np.float32)
        sites[f"site-{index}"] = SiteData(f"site-{index}", spec, Split(x, y), Split(x, y))
    return sites


def _plan(strategy: dict[str, Any], *, task: str = "tabular-logistic", rounds: int = 3, **extra: Any) -> Plan:
    return parse_plan({"task": task, "rounds": rounds, "strategy": strategy,
                       "dataset": {"name": "synthetic", "normalization": "none"}, **extra})  # fmt: skip


def _job(plan: Plan, kind: JobKind, round_number: int, site: str, parameters: Parameters, **config: Any) -> Job:
    return Job("run", round_number, f"{round_number}-{kind.value}-{site}", kind, plan_hash=plan_hash(plan),
               parameters=parameters, config=config)  # fmt: skip


def _federate(
    plan: Plan, task: Task, sites: dict[str, SiteData]
) -> tuple[dict[str, Node], Parameters, list[list[JobResult]]]:
    """Train ``plan.rounds`` rounds with real nodes (as the coordinator does, without threads)."""
    nodes = {site: Node(site, task=task, data=data, plan=plan) for site, data in sites.items()}
    strategy = make_strategy(plan.strategy, num_sampled=len(nodes), num_nodes=len(nodes))
    parameters = initial_parameters(task, next(iter(sites.values())).spec, plan).freeze()
    rounds: list[list[JobResult]] = []
    for round_number in range(1, plan.rounds + 1):
        extra = strategy.configure_train(round_number, list(nodes))
        strategy.begin_round(round_number, parameters)
        answers = []
        for index, (site, node) in enumerate(nodes.items()):
            answer = node.handle(_job(plan, JobKind.TRAIN, round_number, site, parameters,
                                      seed=100 * round_number + index, **extra[site]))  # fmt: skip
            assert answer.ok and answer.update is not None, answer.error
            strategy.receive_data(answer.data, node_id=site)
            strategy.accumulate(answer.update, weight=answer.num_examples, node_id=site)
            answers.append(answer)
        rounds.append(answers)
        parameters = strategy.finalize().freeze()
    return nodes, parameters, rounds


def _evaluate(plan: Plan, nodes: dict[str, Node], parameters: Parameters) -> dict[str, dict[str, float]]:
    out = {}
    for site, node in nodes.items():
        answer = node.handle(_job(plan, JobKind.EVALUATE, plan.rounds, site, parameters))
        assert answer.ok, answer.error
        out[site] = dict(answer.metrics)
    return out


# --- FedBN --------------------------------------------------------------------------------------

_MLP = {"task": "tabular-mlp", "model": {"hidden_units": 8, "batch_norm": True},
        "local": {"epochs": 1, "batch_size": 16, "learning_rate": 0.05}}  # fmt: skip


def test_fedbn_keeps_each_sites_batch_norm_statistics_and_takes_the_global_shared_weights() -> None:
    plan = _plan({"name": "fedbn"}, **_MLP)
    task = MLPTask()
    nodes, parameters, _ = _federate(plan, task, _sites(0))
    _evaluate(plan, nodes, parameters)  # loads the final global model at every site
    loaded = {site: task.get_parameters(node._model) for site, node in nodes.items()}
    local = set(task.local_parameter_names(node_model := nodes["site-0"]._model))
    assert local == {"1.weight", "1.bias", "1.running_mean", "1.running_var"}, node_model
    for name in parameters:
        values = [loaded[site][name] for site in nodes]
        if name in local:
            assert all(not np.allclose(values[0], v) for v in values[1:]), name  # site-specific
            assert all(not np.allclose(parameters[name], v) for v in values), name  # not the averaged one
        else:
            assert all(np.array_equal(parameters[name], v) for v in values), name


def test_fedavg_with_batch_norm_overwrites_the_sites_statistics_with_the_global_ones() -> None:
    plan = _plan({"name": "fedavg"}, **_MLP)
    task = MLPTask()
    nodes, parameters, _ = _federate(plan, task, _sites(0))
    _evaluate(plan, nodes, parameters)
    for node in nodes.values():
        np.testing.assert_array_equal(task.get_parameters(node._model)["1.running_mean"], parameters["1.running_mean"])


def test_fedbn_without_normalization_layers_is_fedavg() -> None:
    sites = _sites(1)
    _, fedbn, _ = _federate(_plan({"name": "fedbn"}), LogisticTask(), sites)
    _, fedavg, _ = _federate(_plan({"name": "fedavg"}), LogisticTask(), sites)
    for name in fedavg:
        np.testing.assert_array_equal(fedbn[name], fedavg[name])


# --- FedNova ------------------------------------------------------------------------------------


def test_fednova_equals_fedavg_when_every_site_runs_the_same_number_of_steps() -> None:
    sites = _sites(2, rows=(32, 64, 128))
    local = {"steps": 6, "batch_size": 16, "learning_rate": 0.1}
    _, nova, rounds = _federate(_plan({"name": "fednova"}, local=local), LogisticTask(), sites)
    _, avg, _ = _federate(_plan({"name": "fedavg"}, local=local), LogisticTask(), sites)
    assert {answer.data["local_steps"] for answer in rounds[0]} == {6}
    for name in avg:
        np.testing.assert_allclose(nova[name], avg[name], rtol=1e-5, atol=1e-7)


def test_fednova_normalizes_unequal_local_steps_as_a_hand_computation_does() -> None:
    sites = _sites(3, rows=(32, 64, 128))  # one epoch of batches of 16: tau = 2, 4, 8 steps
    plan = _plan({"name": "fednova"}, rounds=1, local={"epochs": 1, "batch_size": 16, "learning_rate": 0.1})
    _, nova, rounds = _federate(plan, LogisticTask(), sites)
    start = initial_parameters(LogisticTask(), sites["site-0"].spec, plan).flatten().astype(np.float64)
    tau = np.array([answer.data["local_steps"] for answer in rounds[0]], dtype=np.float64)
    assert tau.tolist() == [2.0, 4.0, 8.0]
    n = np.array([answer.num_examples for answer in rounds[0]], dtype=np.float64)
    updates = np.stack([answer.update.flatten() for answer in rounds[0] if answer.update is not None])
    p = n / n.sum()
    expected = start + (p @ tau) * (p / tau) @ updates  # tau_eff * sum_i p_i update_i / tau_i
    np.testing.assert_allclose(nova.flatten(), expected, rtol=1e-5, atol=1e-7)
    fedavg = start + p @ updates
    assert np.abs(expected - fedavg).max() > 1e-3  # the normalization matters here


def test_fednova_strategy_refuses_an_answer_without_its_local_steps() -> None:
    strategy = FedNova()
    strategy.begin_round(1, Parameters({"w": np.zeros(2, dtype=np.float32)}))
    with pytest.raises(ProtocolError, match="local steps"):
        strategy.receive_data({}, node_id="a")
    with pytest.raises(ProtocolError, match="local steps"):
        strategy.receive_data({"local_steps": 0}, node_id="a")
    with pytest.raises(ProtocolError, match="must carry"):
        strategy.accumulate(Parameters({"w": [1.0, 1.0]}), weight=1, node_id="a")


def test_make_strategy_builds_the_personalization_strategies_by_name() -> None:
    assert type(make_strategy(StrategyConfig(name="fedbn"))) is FedAvg
    assert type(make_strategy(StrategyConfig(name="fednova"))) is FedNova
    ditto = make_strategy(StrategyConfig(name="ditto", ditto_lambda=0.5))
    assert type(ditto) is Ditto and ditto.configure_train(1, ["a"]) == {"a": {"ditto_lambda": 0.5}}


# --- fine-tuning --------------------------------------------------------------------------------


def test_fine_tuning_lowers_the_local_training_loss_and_reports_both_models() -> None:
    sites = _sites(4)
    plan = _plan({"name": "fedavg"}, rounds=2, evaluation={"fine_tune_epochs": 5},
                 local={"epochs": 1, "batch_size": 16, "learning_rate": 0.1})  # fmt: skip
    nodes, parameters, _ = _federate(plan, LogisticTask(), sites)
    metrics = _evaluate(plan, nodes, parameters)
    for site in sites:
        names = {"accuracy", "personalized_accuracy", "train_log_loss", "personalized_train_log_loss"}
        assert names <= set(metrics[site])
        assert metrics[site]["personalized_train_log_loss"] < metrics[site]["train_log_loss"], metrics[site]
    direct = fine_tune(plan, parameters, sites["site-0"], task=LogisticTask(), epochs=5, seed=plan.seed)
    assert direct == metrics["site-0"]  # the node reports exactly what fine_tune computes


def test_fine_tuning_runs_only_at_the_evaluation_after_the_last_round() -> None:
    sites = _sites(4)
    plan = _plan({"name": "fedavg"}, rounds=2, evaluation={"fine_tune_epochs": 2})
    nodes, parameters, _ = _federate(plan, LogisticTask(), sites)
    answer = nodes["site-0"].handle(_job(plan, JobKind.EVALUATE, 1, "site-0", parameters))
    assert answer.ok and not any(name.startswith("personalized_") for name in answer.metrics)


def test_fine_tuning_reaches_the_federated_evaluation_summary() -> None:
    plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 2,
                       "local": {"epochs": 1, "learning_rate": 0.05},
                       "evaluation": {"fine_tune_epochs": 2}})  # fmt: skip
    final = simulate(plan, max_concurrency=2).evaluations[-1]
    assert "personalized_accuracy" in final.mean and "accuracy" in final.mean
    assert all("personalized_accuracy" in metrics for metrics in final.sites.values())


# --- Ditto --------------------------------------------------------------------------------------


def _ditto(
    ditto_lambda: float, *, rounds: int = 3
) -> tuple[dict[str, Node], Parameters, dict[str, dict[str, float]]]:
    plan = _plan({"name": "ditto", "ditto_lambda": ditto_lambda}, rounds=rounds,
                 local={"steps": 20, "batch_size": 16, "learning_rate": 0.1})  # fmt: skip
    nodes, parameters, _ = _federate(plan, LogisticTask(), _sites(5))
    return nodes, parameters, _evaluate(plan, nodes, parameters)


def _personal_distance(nodes: dict[str, Node], parameters: Parameters) -> list[float]:
    task = LogisticTask()
    target = parameters.flatten()
    return [float(np.linalg.norm(task.get_parameters(n._personal).flatten() - target)) for n in nodes.values()]


def test_ditto_keeps_personal_models_apart_from_the_global_one_and_reports_their_evaluation() -> None:
    nodes, parameters, metrics = _ditto(0.1)
    assert all(distance > 1e-3 for distance in _personal_distance(nodes, parameters))
    for site_metrics in metrics.values():
        assert {"accuracy", "personalized_accuracy", "personalized_log_loss"} <= set(site_metrics)


def test_ditto_lambda_pulls_personal_models_towards_the_global_one() -> None:
    # After round 3 the personal models were last anchored at the global model that round 3 started from,
    # which is the final model of a 2-round run with the same seeds.
    anchor = _ditto(0.0, rounds=2)[1]
    loose = _personal_distance(_ditto(0.0)[0], anchor)
    tight = _personal_distance(_ditto(5.0)[0], anchor)
    assert all(t < 0.5 * free for t, free in zip(tight, loose)), (tight, loose)


# --- refusals -----------------------------------------------------------------------------------


def _base(strategy: str, **extra: Any) -> dict[str, Any]:
    return {"task": "tabular-logistic", "dataset": {"name": "breast-cancer", "num_nodes": 10}, "rounds": 1,
            "strategy": {"name": strategy}, **extra}  # fmt: skip


_RECORD_LEVEL = {"record_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-4}}


def test_plan_refuses_fednova_with_secure_aggregation_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="local steps") as caught:
        parse_plan(_base("fednova", secure_aggregation={"enabled": True}))
    assert caught.value.field == "plan.strategy.name"
    for name in ("fedbn", "ditto"):  # their servers are FedAvg over the sum
        assert parse_plan(_base(name, secure_aggregation={"enabled": True})).strategy.name == name


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"strategy": {"name": "ditto"}, "privacy": _RECORD_LEVEL}, "plan.strategy.name"),
        ({"evaluation": {"fine_tune_epochs": 1}, "privacy": _RECORD_LEVEL}, "plan.evaluation.fine_tune_epochs"),
        ({"model": {"batch_norm": True}, "privacy": _RECORD_LEVEL}, "plan.model.batch_norm"),
        ({"strategy": {"name": "ditto"}, "evaluation": {"fine_tune_epochs": 1}}, "plan.evaluation.fine_tune_epochs"),
    ],
)
def test_plan_refuses_personalization_that_conflicts_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_plan({**_base("fedavg"), **extra})
    assert caught.value.field == field


def test_node_refuses_a_ditto_job_under_another_strategy() -> None:
    sites = _sites(6)
    plan = _plan({"name": "fedavg"})
    node = Node("site-0", task=LogisticTask(), data=sites["site-0"], plan=plan)
    start = initial_parameters(LogisticTask(), sites["site-0"].spec, plan).freeze()
    answer = node.handle(_job(plan, JobKind.TRAIN, 1, "site-0", start, seed=1, ditto_lambda=0.1))
    assert not answer.ok and "ditto" in (answer.error or "")
