"""FedOpt's server optimizers follow the paper, FedProx pulls sites to the global model, SCAFFOLD corrects drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.errors import ConfigError, DataError, ProtocolError
from fedcare.federation.node import Node
from fedcare.messages import Job, JobKind
from fedcare.params import Parameters
from fedcare.plan import Plan, StrategyConfig, parse_plan, plan_hash
from fedcare.simulation import initial_parameters, simulate
from fedcare.strategies import FedAvg, FedOpt, FedProx, Scaffold, Strategy, make_strategy
from fedcare.strategies.kernels import adaptive_server_step
from fedcare.strategies.scaffold import MAX_CONTROL_VALUES
from fedcare.tasks.base import DataSpec, SiteData, Split
from fedcare.tasks.tabular import LogisticTask

NEW_STRATEGIES = ["fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold"]


# --- FedOpt -------------------------------------------------------------------------------------


def _reference_step(x: list[float], m: list[float], v: list[float], d: list[float], rule: str, **h: float) -> None:
    """Algorithm 2 of Reddi et al. (2021), one coordinate at a time, in plain Python."""
    for i, di in enumerate(d):
        m[i] = h["beta1"] * m[i] + (1 - h["beta1"]) * di
        if rule == "adagrad":
            v[i] = v[i] + di * di
        elif rule == "yogi":
            sign = 1.0 if v[i] - di * di > 0 else (-1.0 if v[i] - di * di < 0 else 0.0)
            v[i] = v[i] - (1 - h["beta2"]) * di * di * sign
        else:
            v[i] = h["beta2"] * v[i] + (1 - h["beta2"]) * di * di
        x[i] = x[i] + h["learning_rate"] * m[i] / (v[i] ** 0.5 + h["tau"])


@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
def test_fedopt_kernel_matches_the_papers_update_over_several_rounds(rule: str) -> None:
    rng = np.random.default_rng(7)
    hyper = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    x, m, v = rng.normal(size=6), np.zeros(6), np.full(6, hyper["tau"] ** 2)
    rx, rm, rv = x.tolist(), m.tolist(), v.tolist()
    for _ in range(5):
        d = rng.normal(size=6) * rng.choice([0.01, 1.0, 10.0], size=6)
        adaptive_server_step(x, m, v, d, rule=rule, **hyper)
        _reference_step(rx, rm, rv, d.tolist(), rule, **hyper)
    np.testing.assert_allclose(x, rx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v, rv, rtol=1e-12, atol=1e-15)


def test_fedopt_strategy_steps_on_the_example_weighted_mean_and_keeps_moments_across_rounds() -> None:
    hyper = {"learning_rate": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    strategy = FedOpt(rule="yogi", server_learning_rate=0.1)
    params = Parameters({"w": np.zeros(3, dtype=np.float32)})
    rx, rm, rv = [0.0] * 3, [0.0] * 3, [hyper["tau"] ** 2] * 3
    rng = np.random.default_rng(3)
    for round_number in (1, 2, 3):
        a, b = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
        strategy.begin_round(round_number, params)
        strategy.accumulate(Parameters({"w": a}), weight=3, node_id="a")
        strategy.accumulate(Parameters({"w": b}), weight=1, node_id="b")
        params = strategy.finalize()
        mean = (3 * a.astype(np.float64) + b) / 4
        _reference_step(rx, rm, rv, mean.tolist(), "yogi", **hyper)
    np.testing.assert_allclose(params["w"], rx, rtol=1e-5)


def test_fedopt_refuses_bad_settings_naming_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        FedOpt(rule="adam", tau=0.0)
    assert caught.value.field == "plan.strategy.tau"
    with pytest.raises(ConfigError, match=r"plan.strategy.beta1: .*got 1.0"):
        parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 1,
                    "strategy": {"name": "fedadam", "beta1": 1.0}})  # fmt: skip


def test_make_strategy_builds_every_new_strategy_the_plan_names() -> None:
    built = {name: make_strategy(StrategyConfig(name=name), num_nodes=4) for name in NEW_STRATEGIES}  # type: ignore[arg-type]
    assert type(built["fedprox"]) is FedProx
    assert [built[n].rule for n in ("fedadam", "fedyogi", "fedadagrad")] == ["adam", "yogi", "adagrad"]  # type: ignore[attr-defined]
    assert type(built["scaffold"]) is Scaffold and built["scaffold"].num_nodes == 4  # type: ignore[attr-defined]


# --- FedProx ------------------------------------------------------------------------------------


def _heart_plan(strategy: dict[str, Any], *, rounds: int = 3, **extra: Any) -> Plan:
    return parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": rounds,
                       "local": {"epochs": 1, "learning_rate": 0.05}, "strategy": strategy, **extra})  # fmt: skip


def test_fedprox_with_mu_zero_gives_exactly_the_fedavg_model() -> None:
    fedavg = simulate(_heart_plan({"name": "fedavg"}), max_concurrency=2)
    fedprox = simulate(_heart_plan({"name": "fedprox", "proximal_mu": 0.0}), max_concurrency=2)
    np.testing.assert_array_equal(fedprox.parameters.flatten(), fedavg.parameters.flatten())


def _one_site_update_norm(mu: float) -> float:
    from fedcare.data import DatasetCatalog

    plan = parse_plan({"task": "tabular-logistic", "rounds": 1, "local": {"epochs": 5, "learning_rate": 0.1},
                       "dataset": {"name": "heart-disease", "normalization": "per-site"},
                       "strategy": {"name": "fedprox", "proximal_mu": mu}})  # fmt: skip
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "cleveland")
    node = Node("cleveland", task=LogisticTask(), data=data, plan=plan)
    start = initial_parameters(LogisticTask(), data.spec, plan).freeze()
    config = {"seed": 5, **FedProx(proximal_mu=mu).configure_train(1, ["cleveland"])["cleveland"]}
    answer = node.handle(Job("run", 1, "j", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=start, config=config))
    assert answer.ok and answer.update is not None, answer.error
    return float(np.linalg.norm(answer.update.flatten()))


def test_node_refuses_a_proximal_term_its_approved_plan_does_not_name() -> None:
    from fedcare.data import DatasetCatalog

    plan = parse_plan({"task": "tabular-logistic", "rounds": 1,
                       "dataset": {"name": "heart-disease", "normalization": "per-site"}})  # fmt: skip
    data = DatasetCatalog.bundled().get("heart-disease").load_site(plan.dataset, "cleveland")
    node = Node("cleveland", task=LogisticTask(), data=data, plan=plan)
    start = initial_parameters(LogisticTask(), data.spec, plan).freeze()
    job = Job("run", 1, "j", JobKind.TRAIN, plan_hash=plan_hash(plan), parameters=start,
              config={"seed": 1, "proximal_mu": 100.0})  # fmt: skip
    answer = node.handle(job)
    assert not answer.ok and "asks for fedprox training" in (answer.error or "")


def test_fedprox_with_a_large_mu_keeps_the_local_model_close_to_the_global_one() -> None:
    free, held = _one_site_update_norm(0.0), _one_site_update_norm(5.0)
    assert held < 0.5 * free, (held, free)


# --- SCAFFOLD -----------------------------------------------------------------------------------


def _heterogeneous_sites(seed: int, *, num_sites: int = 4, rows: int = 64, features: int = 5) -> dict[str, SiteData]:
    """Sites whose features and decision boundaries differ a lot: FedAvg drifts, SCAFFOLD corrects."""
    rng = np.random.default_rng(seed)
    spec = DataSpec(num_features=features, num_classes=2)
    sites = {}
    for index in range(num_sites):
        weights = rng.normal(size=features) * 3
        x = (rng.normal(size=(rows, features)) + rng.normal(size=features) * 2).astype(np.float32)
        y = (x @ weights + rng.normal(size=rows) > 0).astype(np.int64)
        sites[f"site-{index}"] = SiteData(f"site-{index}", spec, Split(x, y), Split(x, y))
    return sites


def _global_training_loss(parameters: Parameters, sites: dict[str, SiteData]) -> float:
    weights = parameters["linear.weight"].astype(np.float64).reshape(-1)
    bias = float(parameters["linear.bias"][0])
    total, count = 0.0, 0
    for site in sites.values():
        z = site.train.x.astype(np.float64) @ weights + bias
        total += float(np.sum(np.logaddexp(0.0, z) - site.train.y * z))
        count += len(site.train)
    return total / count


def _rounds_to_loss(name: str, sites: dict[str, SiteData], *, target: float, max_rounds: int) -> int:
    """Run the strategy with real nodes (as the coordinator does, without threads); rounds until the loss <= target."""
    plan = parse_plan({"task": "tabular-logistic", "rounds": max_rounds, "strategy": {"name": name},
                       "dataset": {"name": "synthetic", "normalization": "none"},
                       "local": {"steps": 20, "batch_size": 16, "learning_rate": 0.1}})  # fmt: skip
    nodes = {site: Node(site, task=LogisticTask(), data=data, plan=plan) for site, data in sites.items()}
    strategy = make_strategy(plan.strategy, num_sampled=len(nodes), num_nodes=len(nodes))
    spec = next(iter(sites.values())).spec
    parameters = initial_parameters(LogisticTask(), spec, plan).freeze()
    for round_number in range(1, max_rounds + 1):
        extra = strategy.configure_train(round_number, list(nodes))
        strategy.begin_round(round_number, parameters)
        for index, (site, node) in enumerate(nodes.items()):
            config = {"seed": 100 * round_number + index, **extra[site]}
            job = Job("run", round_number, f"{round_number}-{site}", JobKind.TRAIN, plan_hash=plan_hash(plan),
                      parameters=parameters, config=config)  # fmt: skip
            answer = node.handle(job)
            assert answer.ok and answer.update is not None, answer.error
            strategy.receive_data(answer.data, node_id=site)
            strategy.accumulate(answer.update, weight=answer.num_examples, node_id=site)
        parameters = strategy.finalize().freeze()
        if _global_training_loss(parameters, sites) <= target:
            return round_number
    return max_rounds + 1


def test_scaffold_reaches_a_training_loss_in_far_fewer_rounds_than_fedavg_on_heterogeneous_sites() -> None:
    sites = _heterogeneous_sites(0)
    # Measured: SCAFFOLD reaches 0.412 in 6 rounds and settles at 0.3996; FedAvg's drift holds it at 0.413 after 40.
    scaffold = _rounds_to_loss("scaffold", sites, target=0.412, max_rounds=20)
    fedavg = _rounds_to_loss("fedavg", sites, target=0.412, max_rounds=20)
    assert scaffold <= 8
    assert fedavg >= 2 * scaffold, (scaffold, fedavg)


def test_scaffold_server_control_is_the_sum_of_site_changes_over_the_federation_size() -> None:
    strategy = Scaffold(num_nodes=4)
    strategy.begin_round(1, Parameters({"w": np.zeros(2, dtype=np.float32)}))
    for site, change in (("a", [1.0, 2.0]), ("b", [3.0, -2.0])):
        strategy.receive_data({"scaffold_control_delta": change}, node_id=site)
        strategy.accumulate(Parameters({"w": [1.0, 0.0]}), weight=1, node_id=site)
    assert strategy.finalize()["w"].tolist() == [1.0, 0.0]
    assert strategy.control is not None and strategy.control.tolist() == [1.0, 0.0]


def test_scaffold_refuses_a_result_without_its_control_change() -> None:
    strategy = Scaffold()
    strategy.begin_round(1, Parameters({"w": np.zeros(2, dtype=np.float32)}))
    with pytest.raises(ProtocolError, match="control-variate change"):
        strategy.receive_data({}, node_id="a")
    with pytest.raises(ProtocolError, match="list of 2 numbers"):
        strategy.receive_data({"scaffold_control_delta": [1.0]}, node_id="a")


def test_scaffold_refuses_a_model_too_large_for_the_json_config_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="limited to models of") as caught:
        Scaffold().begin_round(1, Parameters({"w": np.zeros(MAX_CONTROL_VALUES + 1, dtype=np.float32)}))
    assert caught.value.field == "plan.strategy.name"


def test_scaffold_control_of_the_largest_allowed_model_fits_the_grpc_config_limit_exactly() -> None:
    from fedcare.strategies.scaffold import encode_control
    from fedcare.transport.wire import MAX_CONFIG_BYTES, _config_from_json, _config_json

    values = -np.abs(np.random.default_rng(1).normal(size=MAX_CONTROL_VALUES)) * 1.2345e-30  # long decimals
    text = _config_json({"seed": 2**31, "scaffold_control": encode_control(values)})
    assert len(text) < MAX_CONFIG_BYTES
    decoded = np.asarray(_config_from_json(text)["scaffold_control"], dtype=np.float32)
    np.testing.assert_array_equal(decoded, values.astype(np.float32))


def _base_plan(strategy: str, **extra: Any) -> dict[str, Any]:
    return {"task": "tabular-logistic", "dataset": {"name": "breast-cancer", "num_nodes": 10}, "rounds": 1,
            "strategy": {"name": strategy}, **extra}  # fmt: skip


def test_plan_refuses_scaffold_with_secure_aggregation_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="secure aggregation does not carry") as caught:
        parse_plan(_base_plan("scaffold", secure_aggregation={"enabled": True}))
    assert caught.value.field == "plan.strategy.name"
    assert parse_plan(_base_plan("fedprox", secure_aggregation={"enabled": True})).strategy.name == "fedprox"


@pytest.mark.parametrize("name", ["fedprox", "scaffold"])
def test_plan_refuses_a_strategy_that_changes_the_local_loss_with_record_level_dp(name: str) -> None:
    record_level = {"record_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-4}}
    with pytest.raises(ConfigError, match="DP-SGD's per-example gradients do not see") as caught:
        parse_plan(_base_plan(name, privacy=record_level))
    assert caught.value.field == "plan.strategy.name"


# --- end to end ---------------------------------------------------------------------------------


def _settings(name: str) -> dict[str, Any]:
    return {"name": name, **({"server_learning_rate": 0.1} if name in ("fedadam", "fedyogi", "fedadagrad") else {})}


@pytest.mark.parametrize("name", NEW_STRATEGIES)
def test_new_strategy_completes_a_heart_disease_run(name: str) -> None:
    result = simulate(_heart_plan(_settings(name)), max_concurrency=2)
    assert result.rounds_completed == 3 and not result.failures
    summary = result.final_evaluation
    assert summary is not None and summary.pooled["accuracy"] > 0.6


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_resumed_run_matches_the_uninterrupted_one_because_server_state_is_checkpointed(
    name: str, tmp_path: Path
) -> None:
    uninterrupted = simulate(_heart_plan(_settings(name), rounds=4), max_concurrency=2)
    simulate(_heart_plan(_settings(name), rounds=2), out_dir=tmp_path, max_concurrency=2)
    resumed = simulate(_heart_plan(_settings(name), rounds=4), out_dir=tmp_path, max_concurrency=2, resume=True)
    assert resumed.rounds_completed == 4 and not resumed.failures
    np.testing.assert_allclose(resumed.parameters.flatten(), uninterrupted.parameters.flatten(), atol=1e-6)


def test_scaffold_resumes_with_the_server_control_from_the_checkpoint(tmp_path: Path) -> None:
    from fedcare.federation.rundir import RunDirectory

    first = simulate(_heart_plan({"name": "scaffold"}, rounds=2), out_dir=tmp_path, max_concurrency=2)
    saved = RunDirectory(tmp_path).load_strategy_state(round=2)
    assert set(saved) == {"control"} and np.abs(saved["control"]).sum() > 0
    resumed = simulate(_heart_plan({"name": "scaffold"}, rounds=4), out_dir=tmp_path, max_concurrency=2, resume=True)
    assert first.rounds_completed == 2 and resumed.rounds_completed == 4 and not resumed.failures


def test_fedopt_state_round_trips_and_a_plain_strategy_refuses_foreign_state() -> None:
    strategy = FedOpt(rule="adam", server_learning_rate=0.1)
    strategy.begin_round(1, Parameters({"w": np.zeros(2, dtype=np.float32)}))
    strategy.accumulate(Parameters({"w": [1.0, -1.0]}), weight=1, node_id="a")
    strategy.finalize()
    restored = FedOpt(rule="adam", server_learning_rate=0.1)
    restored.load_state_dict(strategy.state_dict())
    assert {k: v.tolist() for k, v in restored.state_dict().items()} == {
        k: v.tolist() for k, v in strategy.state_dict().items()
    }
    with pytest.raises(DataError, match="does not keep"):
        FedAvg().load_state_dict(strategy.state_dict())


def test_checkpoint_drops_stale_strategy_state_and_refuses_state_from_another_round(tmp_path: Path) -> None:
    from fedcare.federation.rundir import RunDirectory

    run_dir = RunDirectory(tmp_path)
    parameters = Parameters({"w": np.zeros(2, dtype=np.float32)})
    run_dir.save_checkpoint(round=1, parameters=parameters, state={}, strategy_state={"control": np.ones(2)})
    assert run_dir.load_strategy_state(round=1)["control"].tolist() == [1.0, 1.0]
    with pytest.raises(DataError, match="from round 1, the checkpoint from round 2"):
        run_dir.load_strategy_state(round=2)
    run_dir.save_checkpoint(round=2, parameters=parameters, state={})
    assert run_dir.load_strategy_state(round=2) == {}


def test_strategies_share_the_streaming_interface() -> None:
    for strategy in (FedProx(), FedOpt(rule="adam"), Scaffold()):
        assert isinstance(strategy, Strategy) and not strategy.needs_all_updates
    assert isinstance(FedProx(), FedAvg)


def test_scaffold_site_control_is_saved_and_read_back_by_a_restarted_node_of_the_same_run(tmp_path: Path) -> None:
    import torch

    from fedcare.federation.control_variates import NodeControlVariate

    model = torch.nn.Linear(3, 1)
    spec = Parameters({"weight": np.zeros((1, 3), dtype=np.float32), "bias": np.zeros(1, dtype=np.float32)})
    path = tmp_path / "state" / "scaffold-control.safetensors"
    first = NodeControlVariate(path)
    first.training_hook(model, None, spec, run_id="run-a")
    first.finish(np.array([0.1, -0.2, 0.3, 0.4], dtype=np.float32), steps=2, learning_rate=0.5)

    restarted = NodeControlVariate(path)
    restarted.training_hook(model, None, spec, run_id="run-a")
    change = restarted.finish(np.zeros(4, dtype=np.float32), steps=2, learning_rate=0.5)
    other_run = NodeControlVariate(path)
    other_run.training_hook(model, None, spec, run_id="run-b")

    assert path.exists()
    # The restarted node continued from the saved c_i (its change with a zero update and c = 0 is 0) ...
    assert change == [0.0, 0.0, 0.0, 0.0]
    assert restarted._own is not None and np.allclose(restarted._own, [-0.1, 0.2, -0.3, -0.4])
    # ... and a node of another run starts from zero.
    assert other_run._own is not None and not other_run._own.any()
