"""Site-level DP: DP-FedAvg clips, noises and accounts; adaptive clipping; distributed mode over SecAgg."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedcare.errors import ConfigError, ProtocolError
from fedcare.params import Parameters, ParameterSpec
from fedcare.plan import Plan, PrivacyWarning, SiteLevelPrivacy, StrategyConfig, parse_plan
from fedcare.strategies import DPFedAvg, FedAvg, make_strategy
from fedcare.strategies.dp_fedavg import adaptive_noise_multiplier, site_level_epsilon
from fedcare.strategies.kernels import add_gaussian_noise, clip_fold, l2_norm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart_disease.yaml"
SPEC: ParameterSpec = (("w", (8,)), ("b", (2,)))
SIZE = 10


def _params(vector: np.ndarray, spec: ParameterSpec = SPEC) -> Parameters:
    return Parameters.from_flat(np.ascontiguousarray(vector, dtype=np.float32), spec)


def _run_round(strategy: DPFedAvg, global_vector: np.ndarray, updates: list[np.ndarray], spec: ParameterSpec = SPEC) -> np.ndarray:
    strategy.begin_round(1, _params(global_vector, spec))
    for index, update in enumerate(updates):
        strategy.accumulate(_params(update, spec), weight=1 + index, node_id=f"site-{index}")
    return strategy.finalize().flatten().astype(np.float64)


# --- clipping ------------------------------------------------------------------------


def test_update_longer_than_clip_norm_is_scaled_to_exactly_clip_norm() -> None:
    update = np.random.default_rng(0).standard_normal(SIZE) * 3.0
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=0.5, num_sampled=1, rng=np.random.default_rng(1))

    step = _run_round(strategy, np.zeros(SIZE), [update])

    assert np.linalg.norm(update) > 0.5
    assert np.linalg.norm(step) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(step, update * 0.5 / np.linalg.norm(update), rtol=1e-5)
    assert strategy.last_round_metrics()["updates_clipped"] == 1


def test_update_within_clip_norm_is_folded_in_unchanged() -> None:
    update = np.random.default_rng(2).standard_normal(SIZE) * 0.01
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=1.0, num_sampled=1, rng=np.random.default_rng(3))

    step = _run_round(strategy, np.zeros(SIZE), [update])

    np.testing.assert_allclose(step, update, rtol=1e-6)
    assert strategy.last_round_metrics()["updates_clipped"] == 0


def test_clip_fold_kernel_returns_the_norm_and_writes_only_to_out() -> None:
    update = np.array([3.0, 4.0], dtype=np.float32)
    before = update.copy()
    out = np.ones(2)
    assert clip_fold(out, update, 2.5) == pytest.approx(5.0)
    np.testing.assert_allclose(out, [1.0 + 1.5, 1.0 + 2.0])
    np.testing.assert_array_equal(update, before)
    assert l2_norm(np.zeros(3, dtype=np.float32)) == 0.0


# --- noise and averaging ----------------------------------------------------------------


def test_noise_on_the_average_has_stddev_noise_multiplier_times_clip_over_num_sampled() -> None:
    size = 200_000  # each coordinate is one draw of the noise
    spec: ParameterSpec = (("w", (size,)),)
    strategy = DPFedAvg(noise_multiplier=1.5, clip_norm=0.7, num_sampled=5, rng=np.random.default_rng(4))

    step = _run_round(strategy, np.zeros(size), [np.zeros(size)] * 3, spec)

    expected = 1.5 * 0.7 / 5
    assert step.std() == pytest.approx(expected, rel=0.02)
    assert abs(step.mean()) < 5 * expected / math.sqrt(size)
    assert strategy.last_round_metrics()["noise_stddev"] == pytest.approx(expected)


def test_zero_noise_dp_fedavg_with_large_clip_equals_unweighted_fedavg() -> None:
    rng = np.random.default_rng(5)
    global_vector = rng.standard_normal(SIZE)
    updates = [rng.standard_normal(SIZE) for _ in range(6)]
    fedavg = FedAvg()
    fedavg.begin_round(1, _params(global_vector))
    for index, update in enumerate(updates):
        fedavg.accumulate(_params(update), weight=1.0, node_id=f"site-{index}")
    expected = fedavg.finalize().flatten()

    result = _run_round(DPFedAvg(noise_multiplier=0.0, clip_norm=1e6, num_sampled=6), global_vector, updates)

    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


def test_average_divides_by_the_expected_sites_per_round_not_by_those_that_answered() -> None:
    updates = [np.full(SIZE, 0.1), np.full(SIZE, 0.3)]
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=10.0, num_sampled=4, server_learning_rate=2.0)

    step = _run_round(strategy, np.zeros(SIZE), updates)

    np.testing.assert_allclose(step, 2.0 * 0.4 / 4, rtol=1e-6)
    assert strategy.last_round_metrics()["updates_received"] == 2


def test_seeded_noise_is_reproducible_and_os_seeded_noise_is_not() -> None:
    def once(rng: np.random.Generator | None) -> np.ndarray:
        return _run_round(DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=2, rng=rng), np.zeros(SIZE), [np.ones(SIZE)])

    np.testing.assert_array_equal(once(np.random.default_rng(6)), once(np.random.default_rng(6)))
    assert not np.array_equal(once(None), once(None))


def test_gaussian_noise_kernel_refuses_a_negative_stddev() -> None:
    with pytest.raises(ValueError, match="stddev"):
        add_gaussian_noise(np.zeros(3), stddev=-1.0, rng=np.random.default_rng(0))


# --- adaptive clipping --------------------------------------------------------------------


@pytest.mark.parametrize("target_quantile", [0.5, 0.8])
def test_adaptive_clipping_moves_clip_norm_to_the_target_quantile_of_update_norms(target_quantile: float) -> None:
    rng = np.random.default_rng(7)
    sites, dimension = 100, 4
    mu, sigma = math.log(2.0), 0.5  # update norms are log-normal: median 2.0
    strategy = DPFedAvg(
        noise_multiplier=1.0,
        clip_norm=0.5,
        num_sampled=sites,
        adaptive_clipping=True,
        target_quantile=target_quantile,
        clip_learning_rate=0.2,
        rng=np.random.default_rng(8),
    )
    spec: ParameterSpec = (("w", (dimension,)),)
    for _ in range(50):
        directions = rng.standard_normal((sites, dimension))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        norms = rng.lognormal(mu, sigma, sites)
        _run_round(strategy, np.zeros(dimension), list(directions * norms[:, None]), spec)

    from statistics import NormalDist

    quantile = math.exp(mu + sigma * NormalDist().inv_cdf(target_quantile))
    assert strategy.clip_norm == pytest.approx(quantile, rel=0.2)
    assert strategy.last_round_metrics()["next_clip_norm"] == strategy.clip_norm


def test_adaptive_clipping_raises_the_update_noise_so_total_privacy_stays_nominal() -> None:
    strategy = DPFedAvg(noise_multiplier=1.2, clip_norm=1.0, num_sampled=40, adaptive_clipping=True)

    sigma_b = 40 / 20  # the default: sites per round / 20
    assert strategy.clipped_count_stddev == sigma_b
    # Two Gaussian mechanisms compose as one with z^-2 = z_update^-2 + (2 sigma_b)^-2 (Andrew et al., Thm 1).
    assert strategy.update_noise_multiplier**-2 + (2 * sigma_b) ** -2 == pytest.approx(1.2**-2)
    assert strategy.update_noise_multiplier > 1.2


def test_adaptive_clipping_refuses_count_noise_too_small_for_the_noise_multiplier() -> None:
    # Four sites: the default sigma_b = 0.2, and 2 * 0.2 <= 1.0 leaves no budget for the update.
    with pytest.raises(ConfigError) as caught:
        DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=4, adaptive_clipping=True)
    assert caught.value.field == "plan.privacy.site_level.clipped_count_stddev"
    assert adaptive_noise_multiplier(1.0, clipped_count_stddev=0.6) > 1.0


def test_adaptive_clipping_is_refused_in_distributed_mode() -> None:
    with pytest.raises(ConfigError) as caught:
        DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=40, adaptive_clipping=True, distributed=True)
    assert caught.value.field == "plan.privacy.site_level.adaptive_clipping"


# --- distributed mode, strategy side ------------------------------------------------------------


def test_distributed_strategy_folds_the_secure_sum_without_clipping_or_noise() -> None:
    rng = np.random.default_rng(9)
    global_vector, mean = rng.standard_normal(SIZE), rng.standard_normal(SIZE) * 5  # far above the clip
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=0.1, num_sampled=4, distributed=True, rng=rng)
    strategy.begin_round(1, _params(global_vector))
    strategy.accumulate(_params(mean), weight=3.0, node_id="secure-sum")  # mean of 3 sites, weight 1 each

    result = strategy.finalize().flatten()

    np.testing.assert_allclose(result, global_vector + 3.0 * mean / 4, rtol=1e-5, atol=1e-5)


# --- accounting ---------------------------------------------------------------------------


def test_reported_epsilon_equals_the_accountant_for_the_same_mechanism() -> None:
    from fedcare.privacy.dp.accountant import Mechanism, epsilon_spent

    strategy = DPFedAvg(noise_multiplier=1.1, clip_norm=1.0, num_sampled=10, sample_rate=0.1, delta=1e-5, accountant="rdp")
    expected = epsilon_spent([Mechanism(noise_multiplier=1.1, sample_rate=0.1, steps=20, label="dp-fedavg")], delta=1e-5, accountant="rdp")

    assert strategy.epsilon(20) == pytest.approx(expected, rel=1e-9)
    assert strategy.epsilon(20, sample_rate=0.1, delta=1e-5, accountant="rdp") == pytest.approx(expected, rel=1e-9)


def test_epsilon_grows_with_rounds() -> None:
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=10, sample_rate=0.1, accountant="rdp")
    values = [strategy.epsilon(rounds) for rounds in (0, 1, 10, 100)]
    assert values[0] == 0.0
    assert values == sorted(values) and len(set(values)) == 4


def test_round_metrics_carry_the_epsilon_spent_up_to_the_round() -> None:
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=2, sample_rate=0.5, accountant="rdp", rng=np.random.default_rng(0))
    assert strategy.round_metrics() == {}
    strategy.begin_round(3, _params(np.zeros(SIZE)))
    strategy.accumulate(_params(np.ones(SIZE)), weight=1.0, node_id="a")
    strategy.finalize()

    metrics = strategy.round_metrics()

    assert metrics["epsilon"] == pytest.approx(strategy.epsilon(3))
    assert {"clip_norm", "updates_clipped", "noise_stddev", "delta"} <= set(metrics)


# --- plans and wiring ---------------------------------------------------------------------


def _heart_plan(*, rounds: int, secure: bool = False, **site_level: Any) -> Plan:
    data = yaml.safe_load(EXAMPLE.read_text())
    data = copy.deepcopy(data)
    data["rounds"] = rounds
    data["evaluation"] = {"every_rounds": rounds}
    data["secure_aggregation"] = {**data["secure_aggregation"], "enabled": secure}
    data["privacy"] = {"site_level": {"enabled": True, "accountant": "rdp", **site_level}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        return parse_plan(data)


def test_make_strategy_builds_dp_fedavg_when_site_level_dp_is_enabled() -> None:
    privacy = SiteLevelPrivacy(enabled=True, noise_multiplier=0.8, clip_norm=0.3, delta=1e-6)
    strategy = make_strategy(StrategyConfig(server_learning_rate=0.5), privacy=privacy, num_sampled=3, num_nodes=12)
    assert isinstance(strategy, DPFedAvg)
    assert (strategy.noise_multiplier, strategy.clip_norm, strategy.sample_rate, strategy.delta) == (0.8, 0.3, 0.25, 1e-6)
    assert strategy.server_learning_rate == 0.5
    assert type(make_strategy(StrategyConfig(), privacy=SiteLevelPrivacy(), num_sampled=3)) is FedAvg


def test_plan_whose_site_level_epsilon_exceeds_ten_warns() -> None:
    from fedcare.simulation import check_plan

    weak = _heart_plan(rounds=30, noise_multiplier=0.5)
    assert site_level_epsilon(weak, 4) > 10
    with pytest.warns(PrivacyWarning, match="site-level epsilon"):
        check_plan(weak)

    strong = _heart_plan(rounds=2, noise_multiplier=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyWarning)
        check_plan(strong)


def test_central_site_level_dp_under_secure_aggregation_is_refused() -> None:
    from fedcare.simulation import check_plan

    plan = _heart_plan(rounds=1, secure=True, mode="central")
    with pytest.raises(ConfigError) as caught:
        check_plan(plan)
    assert caught.value.field == "plan.privacy.site_level.mode"


# --- whole simulations ----------------------------------------------------------------------


def _simulate(plan: Plan, events: list[dict[str, Any]] | None = None) -> Any:
    from fedcare.simulation import simulate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        return simulate(plan, on_event=None if events is None else events.append)


def test_heart_disease_simulation_with_site_level_dp_reports_epsilon_every_round() -> None:
    # Heart-disease updates have L2 norms of about 0.01-0.08: a clip of 0.05 clips some of them.
    events: list[dict[str, Any]] = []
    light = _simulate(_heart_plan(rounds=10, noise_multiplier=1.0, clip_norm=0.05), events)
    heavy = _simulate(_heart_plan(rounds=10, noise_multiplier=20.0, clip_norm=0.05))

    ends = [e for e in events if e["event"] == "round_end"]
    epsilons = [e["site_level_dp"]["epsilon"] for e in ends]
    assert len(ends) == 10 and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert ends[-1]["site_level_dp"]["clip_norm"] == 0.05
    assert ends[-1]["site_level_dp"]["updates_received"] == 4
    assert light.final_evaluation is not None and 0.0 <= light.final_evaluation.mean["accuracy"] <= 1.0
    # Noise of 20 * 0.05 / 4 = 0.25 per coordinate per round moves the model far more than 1.0's 0.0125.
    difference = np.abs(light.parameters.flatten() - heavy.parameters.flatten())
    assert difference.max() > 0.3


def test_site_level_dp_simulation_is_repeatable_from_the_plan_seed() -> None:
    plan = _heart_plan(rounds=3, noise_multiplier=1.0, clip_norm=0.05)
    first, second = _simulate(plan), _simulate(plan)
    np.testing.assert_array_equal(first.parameters.flatten(), second.parameters.flatten())


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")  # RDP of the near-noiseless reference run
def test_distributed_site_level_dp_over_secure_aggregation_noises_by_the_expected_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedcare.federation import secure_aggregation
    from fedcare.messages import JobKind
    from fedcare.transport.inproc import InProcTransport

    seen: list[Any] = []
    original = InProcTransport.results

    def recording(self: InProcTransport, job_ids: Any, *, timeout_s: float | None) -> Any:
        for answer in original(self, job_ids, timeout_s=timeout_s):
            seen.append(answer)
            yield answer

    monkeypatch.setattr(InProcTransport, "results", recording)
    common: dict[str, Any] = {"rounds": 1, "secure": True, "mode": "distributed", "clip_norm": 0.05}
    events: list[dict[str, Any]] = []
    seen_quiet = 0
    differences = []
    # Simulated noise shares are seeded by the plan's seed: each seed gives independent draws.
    for seed in range(8):
        quiet = _simulate(_heart_plan(noise_multiplier=1e-6, **common).model_copy(update={"seed": seed}))
        seen_quiet = seen_quiet or len(seen)
        noisy = _simulate(_heart_plan(noise_multiplier=2.0, **common).model_copy(update={"seed": seed}), events)
        differences.append(noisy.parameters.flatten().astype(np.float64) - quiet.parameters.flatten())

    # Four sites, all in the sum: noise z C on the sum, z C / 4 on the average, per coordinate
    # (8 runs x 14 parameters = 112 draws: the sample stddev is within 20 % with probability > 0.99).
    expected = 2.0 * 0.05 / 4
    assert np.std(differences) == pytest.approx(expected, rel=0.2)
    [end, *_] = [e for e in events if e["event"] == "round_end"]
    assert end["site_level_dp"]["mode"] == "distributed" and end["site_level_dp"]["epsilon"] > 0
    assert end["secure_aggregation"]["clipped"] == 0
    # The coordinator never held an update in the clear: training answers carry keys, masked inputs are words.
    assert seen_quiet > 0 and len(seen) > seen_quiet
    for answer in seen:
        if answer.kind is JobKind.TRAIN:
            assert answer.update is None
        elif answer.update is not None:
            assert [name for name, _ in answer.update.spec] == [secure_aggregation.MASKED_TENSOR]


# --- distributed mode, node side ------------------------------------------------------------


def _node_config(**extra: Any) -> tuple[dict[str, Any], Any]:
    from fedcare.federation.secure_aggregation import SecureRound
    from fedcare.plan import SecureAggregationConfig

    secure = SecureRound(
        config=SecureAggregationConfig(enabled=True, clip=50.0),
        run_id="run",
        round_number=1,
        nodes=["a", "b", "c", "d"],
        model_size=100_000,
        site_level=SiteLevelPrivacy(enabled=True, mode="distributed", noise_multiplier=1.0, clip_norm=2.0),
    )
    return {**secure.train_config("a"), **extra}, secure


def test_round_sends_distributed_dp_settings_to_the_nodes() -> None:
    config, _ = _node_config()
    assert (config["dp_clip_norm"], config["dp_noise_multiplier"]) == (2.0, 1.0)


def test_node_clips_its_update_and_adds_its_share_of_the_noise() -> None:
    from fedcare.federation.secure_aggregation import NodeSecureAggregation

    config, _ = _node_config()
    update = np.random.default_rng(10).standard_normal(100_000).astype(np.float32)  # norm ~316, clip 2
    node = NodeSecureAggregation(noise_rng=np.random.default_rng(11))

    node.start(config=config, run_id="run", round_number=1, update=update, num_examples=7)

    [session] = node._sessions.values()
    vector = session.values
    share = vector[:-1] - update * (2.0 / np.linalg.norm(update.astype(np.float64)))
    assert share.std() == pytest.approx(1.0 * 2.0 / math.sqrt(4), rel=0.02)
    assert vector[-1] == 1.0  # weight 1, not the example count


def test_node_refuses_a_round_with_less_noise_than_its_approved_plan() -> None:
    from fedcare.federation.secure_aggregation import NodeSecureAggregation

    approved = SiteLevelPrivacy(enabled=True, mode="distributed", noise_multiplier=1.5, clip_norm=2.0)
    node = NodeSecureAggregation(site_level=approved)
    update = np.zeros(100_000, dtype=np.float32)
    config, _ = _node_config()
    with pytest.raises(ProtocolError) as caught:
        node.start(config=config, run_id="run", round_number=1, update=update, num_examples=7)
    assert caught.value.field == "secagg.dp_noise_multiplier"
    plain = {k: v for k, v in config.items() if not k.startswith("dp_")}
    with pytest.raises(ProtocolError, match="carries no DP settings"):
        node.start(config=plain, run_id="run", round_number=1, update=update, num_examples=7)


def test_node_refuses_malformed_distributed_dp_settings() -> None:
    from fedcare.federation.secure_aggregation import NodeSecureAggregation

    config, _ = _node_config(dp_clip_norm="lots")
    with pytest.raises(ProtocolError) as caught:
        NodeSecureAggregation.context_from(config, run_id="run", round_number=1)
    assert caught.value.field == "secagg.dp_clip_norm"
