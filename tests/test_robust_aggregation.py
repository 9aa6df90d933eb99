"""Robust aggregation rules resist outliers and simulated attackers; research attacks touch only attackers."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedcare.errors import ConfigError, FederationError
from fedcare.messages import Job, JobKind, JobResult
from fedcare.params import Parameters, ParameterSpec
from fedcare.plan import StrategyConfig, parse_plan
from fedcare.simulation import simulate
from fedcare.simulation_attacks import Attack, GaussianNoise, LabelFlip, SignFlip, attacked_runner
from fedcare.strategies import (
    CoordinateMedian,
    FedAvg,
    GeometricMedian,
    MultiKrum,
    NormBounding,
    Strategy,
    TrimmedMean,
    make_strategy,
)
from fedcare.strategies.kernels import coordinate_median, krum_scores, trimmed_mean, weiszfeld
from fedcare.transport.base import NodeChannel

SPEC: ParameterSpec = (("w", (4, 3)), ("b", (3,)))
SIZE = 15


def _honest_and_outlier(seed: int, *, honest: int = 9) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = [(1.0 + 0.1 * rng.standard_normal(SIZE)).astype(np.float32) for _ in range(honest)]
    vectors.append(np.full(SIZE, 1e6, dtype=np.float32))
    return vectors


def _aggregate(strategy: Strategy, vectors: list[np.ndarray], *, weights: list[float] | None = None) -> np.ndarray:
    strategy.begin_round(1, Parameters.from_flat(np.zeros(SIZE, dtype=np.float32), SPEC))
    for i, vector in enumerate(vectors):
        weight = 1.0 if weights is None else weights[i]
        strategy.accumulate(Parameters.from_flat(vector, SPEC), weight=weight, node_id=f"site-{i}")
    return strategy.finalize().flatten()


# --- kernels ---------------------------------------------------------------------------------


def test_coordinate_median_matches_numpy_for_odd_and_even_counts() -> None:
    rng = np.random.default_rng(0)
    for count in (7, 8):
        updates = rng.standard_normal((count, 50)).astype(np.float32)
        out = np.empty(50)
        coordinate_median(updates, out)
        np.testing.assert_allclose(out, np.median(updates.astype(np.float64), axis=0), rtol=0, atol=1e-12)


def test_trimmed_mean_matches_hand_computed_values_and_a_sorted_reference() -> None:
    out = np.empty(2)
    trimmed_mean(np.array([[1.0, 4.0], [2.0, -50.0], [3.0, 5.0], [100.0, 6.0]]), 1, out)
    assert out.tolist() == [2.5, 4.5]
    rng = np.random.default_rng(1)
    updates = rng.standard_normal((11, 40))
    trimmed_mean(updates, 3, out := np.empty(40))
    np.testing.assert_allclose(out, np.sort(updates, axis=0)[3:8].mean(axis=0), rtol=0, atol=1e-12)


def test_trimmed_mean_refuses_a_trim_that_leaves_no_value() -> None:
    with pytest.raises(ValueError, match="2 \\* trim < 4"):
        trimmed_mean(np.zeros((4, 3)), 2, np.empty(3))


def test_krum_scores_match_hand_computed_distances_and_a_pairwise_reference() -> None:
    assert krum_scores(np.array([[0.0], [1.0], [2.0], [3.0], [50.0]]), 1).tolist() == [5.0, 2.0, 2.0, 5.0, 4513.0]
    rng = np.random.default_rng(2)
    updates = rng.standard_normal((9, 20))
    f = 2
    squared = ((updates[:, None, :] - updates[None, :, :]) ** 2).sum(axis=2)
    expected = [np.sort(np.delete(squared[i], i))[: 9 - f - 2].sum() for i in range(9)]
    np.testing.assert_allclose(krum_scores(updates, f), expected, rtol=1e-12)


def test_krum_scores_refuse_too_few_updates_for_the_attackers_tolerated() -> None:
    with pytest.raises(ValueError, match="more than 2 \\* f \\+ 2"):
        krum_scores(np.zeros((4, 2)), 1)


def test_weiszfeld_finds_the_centre_of_a_square_and_beats_the_mean_with_an_outlier() -> None:
    out = np.empty(2)
    square = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    weiszfeld(square, out, max_iterations=100, tolerance=1e-12)
    np.testing.assert_allclose(out, [1.0, 1.0], atol=1e-9)

    points = np.vstack([np.random.default_rng(3).standard_normal((9, 2)), [[1e4, 1e4]]])
    weiszfeld(points, out, max_iterations=1000, tolerance=1e-12)

    def objective(v: np.ndarray) -> float:
        return float(np.linalg.norm(points - v, axis=1).sum())

    assert np.linalg.norm(out) < 3.0
    assert objective(out) < objective(points.mean(axis=0))
    for step in itertools.product((-1e-3, 1e-3), repeat=2):  # a local (hence global, convex) minimum
        assert objective(out) <= objective(out + np.array(step)) + 1e-9


def test_kernels_leave_their_input_unchanged() -> None:
    updates = np.random.default_rng(4).standard_normal((7, 30))
    before = updates.copy()
    out = np.empty(30)
    coordinate_median(updates, out)
    trimmed_mean(updates, 2, out)
    krum_scores(updates, 1)
    weiszfeld(updates, out)
    np.testing.assert_array_equal(updates, before)


# --- strategies --------------------------------------------------------------------------------

ROBUST: dict[str, Callable[[], Strategy]] = {
    "median": CoordinateMedian,
    "trimmed-mean": lambda: TrimmedMean(trim_fraction=0.1),
    "krum": lambda: MultiKrum(num_byzantine=1),
    "geometric-median": lambda: GeometricMedian(max_iterations=200),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rule_ignores_one_huge_outlier_among_ten_updates(name: str) -> None:
    vectors = _honest_and_outlier(5)
    result = _aggregate(ROBUST[name](), vectors)
    assert np.all(np.abs(result - 1.0) < 0.3), result
    assert np.all(_aggregate(FedAvg(), vectors) > 1e4)  # the outlier does move the plain mean


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rule_ignores_a_huge_claimed_example_count(name: str) -> None:
    vectors = _honest_and_outlier(6)
    result = _aggregate(ROBUST[name](), vectors, weights=[10.0] * 9 + [1e9])
    assert np.all(np.abs(result - 1.0) < 0.3)


def test_robust_rules_need_all_updates_and_norm_bounding_streams() -> None:
    assert all(factory().needs_all_updates for factory in ROBUST.values())
    assert not NormBounding().needs_all_updates


def test_robust_rule_applies_the_server_learning_rate() -> None:
    vectors = [np.full(SIZE, v, dtype=np.float32) for v in (1.0, 2.0, 3.0)]
    np.testing.assert_allclose(_aggregate(CoordinateMedian(server_learning_rate=0.5), vectors), 1.0)


def test_multi_krum_averages_the_updates_with_the_best_scores() -> None:
    strategy = MultiKrum(num_byzantine=1, num_selected=2)
    vectors = [np.full(SIZE, v, dtype=np.float32) for v in (0.0, 1.0, 2.0, 3.0, 50.0)]
    np.testing.assert_allclose(_aggregate(strategy, vectors), 1.5)
    assert strategy.round_metrics() == {"krum_selected": ["site-1", "site-2"]}


def test_krum_refuses_a_round_with_too_few_updates_naming_the_bound() -> None:
    with pytest.raises(FederationError, match="needs more than 2 \\* 1 \\+ 2 = 4 updates, but only 4 arrived"):
        _aggregate(MultiKrum(num_byzantine=1), [np.ones(SIZE, dtype=np.float32)] * 4)


def test_trimmed_mean_refuses_a_round_with_too_few_updates_naming_the_bound() -> None:
    with pytest.raises(FederationError, match="needs more than 2 updates, but only 2 arrived"):
        _aggregate(TrimmedMean(trim_fraction=0.4), [np.ones(SIZE, dtype=np.float32)] * 2)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: TrimmedMean(trim_fraction=0.5), "plan.strategy.trim_fraction"),
        (lambda: MultiKrum(num_byzantine=-1), "plan.strategy.byzantine_nodes"),
        (lambda: MultiKrum(num_selected=0), "plan.strategy.krum_selected"),
        (lambda: GeometricMedian(max_iterations=0), "plan.strategy.geometric_median_iterations"),
        (lambda: NormBounding(max_norm=0.0), "plan.strategy.max_norm"),
        (lambda: CoordinateMedian(server_learning_rate=-1.0), "plan.strategy.server_learning_rate"),
    ],
)
def test_robust_rule_refuses_bad_parameters_naming_the_field(factory: Callable[[], Strategy], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        factory()
    assert caught.value.field == field


def test_norm_bounding_clips_each_update_to_the_bound_before_averaging() -> None:
    strategy = NormBounding(max_norm=1.0)
    big = np.zeros(SIZE, dtype=np.float32)
    big[0] = 100.0
    small = np.zeros(SIZE, dtype=np.float32)
    small[1] = 0.5
    result = _aggregate(strategy, [big, small])
    assert result[0] == pytest.approx(0.5) and result[1] == pytest.approx(0.25)
    assert strategy.round_metrics() == {"norm_bounding_clipped": 1}


def test_make_strategy_builds_every_robust_rule_the_plan_names() -> None:
    expected = {
        "median": CoordinateMedian,
        "trimmed-mean": TrimmedMean,
        "krum": MultiKrum,
        "geometric-median": GeometricMedian,
        "norm-bounding": NormBounding,
    }
    for name, cls in expected.items():
        assert type(make_strategy(StrategyConfig(name=name))) is cls  # type: ignore[arg-type]
    krum = make_strategy(StrategyConfig(name="krum", byzantine_nodes=2, krum_selected=3))
    assert isinstance(krum, MultiKrum) and (krum.num_byzantine, krum.num_selected) == (2, 3)


# --- plan --------------------------------------------------------------------------------------


def _plan_data(strategy: dict[str, Any], *, secure: bool) -> dict[str, Any]:
    return {
        "task": "tabular-logistic",
        "dataset": {"name": "breast-cancer", "num_nodes": 10},
        "rounds": 1,
        "strategy": strategy,
        "secure_aggregation": {"enabled": secure},
    }


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "geometric-median"])
def test_plan_refuses_a_rule_that_needs_every_update_with_secure_aggregation(name: str) -> None:
    with pytest.raises(ConfigError, match="needs every update on its own, which secure aggregation hides") as caught:
        parse_plan(_plan_data({"name": name}, secure=True))
    assert caught.value.field == "plan.strategy.name"


def test_plan_refuses_norm_bounding_with_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="clips each update at the coordinator") as caught:
        parse_plan(_plan_data({"name": "norm-bounding"}, secure=True))
    assert caught.value.field == "plan.strategy.name"


def test_plan_accepts_a_robust_rule_without_secure_aggregation() -> None:
    assert parse_plan(_plan_data({"name": "krum", "byzantine_nodes": 2}, secure=False)).strategy.byzantine_nodes == 2


def test_plan_refuses_a_trim_fraction_of_one_half() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_plan(_plan_data({"name": "trimmed-mean", "trim_fraction": 0.5}, secure=False))
    assert caught.value.field == "plan.strategy.trim_fraction"


# --- research-only attacks in simulation -----------------------------------------------------

ROUNDS = 20
ATTACKER = "site-9"


def _sim_plan(strategy: dict[str, Any], *, rounds: int = ROUNDS) -> Any:
    return parse_plan(
        {
            "task": "tabular-logistic",
            "dataset": {"name": "breast-cancer", "num_nodes": 10},
            "rounds": rounds,
            "local": {"learning_rate": 0.1},
            "strategy": strategy,
            "evaluation": {"every_rounds": rounds},
        }
    )


def _accuracy(strategy: dict[str, Any], attacks: dict[str, Attack]) -> float:
    evaluation = simulate(_sim_plan(strategy), attacks=attacks).final_evaluation
    assert evaluation is not None
    return float(evaluation.mean["accuracy"])


@pytest.fixture(scope="module")
def accuracies() -> dict[str, float]:
    sign_flip: dict[str, Attack] = {ATTACKER: SignFlip(scale=10.0)}
    return {
        "clean fedavg": _accuracy({"name": "fedavg"}, {}),
        "attacked fedavg": _accuracy({"name": "fedavg"}, sign_flip),
        "attacked median": _accuracy({"name": "median"}, sign_flip),
        "attacked trimmed-mean": _accuracy({"name": "trimmed-mean", "trim_fraction": 0.1}, sign_flip),
        "attacked krum": _accuracy({"name": "krum", "byzantine_nodes": 1}, sign_flip),
    }


def test_clean_fedavg_learns_breast_cancer(accuracies: dict[str, float]) -> None:
    assert accuracies["clean fedavg"] > 0.92


def test_one_sign_flip_attacker_collapses_fedavg(accuracies: dict[str, float]) -> None:
    assert accuracies["attacked fedavg"] < accuracies["clean fedavg"] - 0.20


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum"])
def test_robust_rule_stays_near_clean_fedavg_with_one_sign_flip_attacker(
    name: str, accuracies: dict[str, float]
) -> None:
    assert accuracies[f"attacked {name}"] > accuracies["clean fedavg"] - 0.03


class _Recording(FedAvg):
    def __init__(self, seen: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.seen = seen

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        self.seen[node_id] = update.flatten().copy()
        super().accumulate(update, weight=weight, node_id=node_id)


def _round_one_updates(monkeypatch: pytest.MonkeyPatch, attacks: dict[str, Attack]) -> dict[str, np.ndarray]:
    seen: dict[str, np.ndarray] = {}
    monkeypatch.setattr("fedcare.simulation.make_strategy", lambda *args, **kwargs: _Recording(seen))
    simulate(_sim_plan({"name": "fedavg"}, rounds=1), attacks=attacks)
    return seen


def test_attack_rewrites_only_the_attackers_update(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = _round_one_updates(monkeypatch, {})
    attacked = _round_one_updates(monkeypatch, {ATTACKER: SignFlip(scale=10.0)})
    assert sorted(clean) == sorted(attacked) and len(clean) == 10
    for site in clean:
        if site != ATTACKER:
            np.testing.assert_array_equal(attacked[site], clean[site])
    np.testing.assert_allclose(attacked[ATTACKER], -10.0 * clean[ATTACKER], rtol=1e-6)


class _FakeChannel(NodeChannel):
    def __init__(self) -> None:
        self.pushed: list[JobResult] = []

    def pull_job(self, *, timeout_s: float) -> Job | None:
        return None

    def push_result(self, result: JobResult) -> None:
        self.pushed.append(result)

    @property
    def closed(self) -> bool:
        return True


def test_model_poisoning_sends_a_fresh_update_and_leaves_the_nodes_own_unchanged() -> None:
    update = Parameters({"w": np.ones(5, dtype=np.float32)}).freeze()
    train = JobResult("run", 1, "j1", JobKind.TRAIN, "site-0", update=update, num_examples=3)
    evaluate = JobResult("run", 1, "j2", JobKind.EVALUATE, "site-0", num_examples=3, metrics={"accuracy": 1.0})
    channel = _FakeChannel()

    def serve(node_channel: NodeChannel) -> None:
        node_channel.push_result(train)
        node_channel.push_result(evaluate)

    attacked_runner(serve, GaussianNoise(stddev=1.0, seed=0), node_id="site-0")(channel)
    sent_train, sent_evaluate = channel.pushed
    assert sent_train.update is not None and sent_train.update is not update
    assert not np.allclose(sent_train.update["w"], 1.0)
    np.testing.assert_array_equal(update["w"], np.ones(5))
    assert sent_evaluate is evaluate


def test_data_attack_leaves_the_channel_alone() -> None:
    def serve(node_channel: NodeChannel) -> None:
        return None

    assert attacked_runner(serve, LabelFlip(), node_id="site-0") is serve


def test_simulation_refuses_an_attack_on_a_site_that_does_not_take_part() -> None:
    with pytest.raises(ConfigError, match="site-42") as caught:
        simulate(_sim_plan({"name": "fedavg"}, rounds=1), attacks={"site-42": SignFlip()})
    assert caught.value.field == "attacks"


def test_simulation_refuses_an_update_attack_on_compressed_updates() -> None:
    plan = _sim_plan({"name": "fedavg"}, rounds=1).model_copy(
        update={"compression": parse_plan({"task": "t", "dataset": {"name": "d"}, "rounds": 1, "compression": {"method": "int8"}}).compression}
    )
    with pytest.raises(ConfigError, match="compression.method int8") as caught:
        simulate(plan, attacks={"site-0": SignFlip()})
    assert caught.value.field == "attacks"
    simulate(plan, attacks={"site-0": LabelFlip()})  # a data attack leaves the update to the site


def test_make_strategy_refuses_site_level_dp_with_a_robust_rule() -> None:
    from fedcare.plan import SiteLevelPrivacy

    with pytest.raises(ConfigError, match="cannot be combined with 'median'") as caught:
        make_strategy(StrategyConfig(name="median"), privacy=SiteLevelPrivacy(enabled=True), num_sampled=5)
    assert caught.value.field == "plan.strategy.name"
