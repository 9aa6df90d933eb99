"""Privacy accounting: published figures, composition, and the noise multiplier that fits a budget."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedcare.errors import BudgetExceeded, ConfigError
from fedcare.privacy.dp import ACCOUNTANTS, Mechanism, epsilon_spent, noise_multiplier_for

DELTA = 1e-5
SGD = Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=100)

# -- published figures ---------------------------------------------------------------


@pytest.mark.parametrize(("accountant", "epsilon"), [("prv", 7.057), ("rdp", 7.899), ("pld", 7.047)])
def test_accountants_reproduce_the_published_epsilon_of_dp_sgd(accountant, epsilon):
    # noise multiplier 1.0, sample rate 0.1, 100 steps, delta 1e-5 (Opacus and dp-accounting docs)
    assert epsilon_spent([SGD], delta=DELTA, accountant=accountant) == pytest.approx(epsilon, abs=0.05)


def test_accountant_names_are_prv_rdp_and_pld():
    assert ACCOUNTANTS == ("prv", "rdp", "pld")


# -- composition ---------------------------------------------------------------------


def test_nothing_released_spends_nothing():
    assert epsilon_spent([], delta=DELTA, accountant="prv") == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_grows_with_steps(accountant):
    short = epsilon_spent([Mechanism(1.0, 0.1, 50)], delta=DELTA, accountant=accountant)
    long = epsilon_spent([Mechanism(1.0, 0.1, 200)], delta=DELTA, accountant=accountant)
    assert 0 < short < long


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_shrinks_with_noise(accountant):
    quiet = epsilon_spent([Mechanism(0.8, 0.1, 100)], delta=DELTA, accountant=accountant)
    noisy = epsilon_spent([Mechanism(2.0, 0.1, 100)], delta=DELTA, accountant=accountant)
    assert 0 < noisy < quiet


@pytest.mark.parametrize("accountant", ["prv", "rdp", "pld"])
def test_heterogeneous_composition_spends_at_least_each_part(accountant):
    stats = Mechanism(noise_multiplier=4.0, sample_rate=1.0, steps=1, label="feature-stats")
    alone_sgd = epsilon_spent([SGD], delta=DELTA, accountant=accountant)
    alone_stats = epsilon_spent([stats], delta=DELTA, accountant=accountant)
    both = epsilon_spent([stats, SGD], delta=DELTA, accountant=accountant)
    assert both >= max(alone_sgd, alone_stats)
    assert both > alone_sgd + 0.01  # the statistics really count


def test_releases_with_the_same_noise_and_rate_compose_like_one_longer_release():
    split = [Mechanism(1.0, 0.1, 40), Mechanism(1.0, 0.1, 60)]
    assert epsilon_spent(split, delta=DELTA, accountant="rdp") == epsilon_spent([SGD], delta=DELTA, accountant="rdp")


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_prv_handles_large_noise_without_sampling_and_stays_an_upper_bound():
    # PRV does not fail here (Opacus warns about its RDP orders while sizing the
    # grid); it adds its error bound of 0.01, so it sits just above PLD.
    release = Mechanism(noise_multiplier=50.0, sample_rate=1.0, steps=1)
    prv = epsilon_spent([release], delta=DELTA, accountant="prv")
    pld = epsilon_spent([release], delta=DELTA, accountant="pld")
    assert pld < prv < pld + 0.02


def test_rdp_is_not_limited_by_opacus_largest_order_at_large_noise():
    # With Opacus's orders alone (up to 63) this is 0.115; larger orders give 0.066.
    release = Mechanism(noise_multiplier=50.0, sample_rate=1.0, steps=1)
    assert epsilon_spent([release], delta=DELTA, accountant="rdp") < 0.08


# -- refusals ------------------------------------------------------------------------


def test_unknown_accountant_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError, match="prv, rdp, pld") as caught:
        epsilon_spent([SGD], delta=DELTA, accountant="moments")
    assert caught.value.field == "privacy.accountant"


def test_unknown_accountant_is_refused_when_deriving_noise():
    with pytest.raises(ConfigError) as caught:
        noise_multiplier_for(epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=100, accountant="gdp")
    assert caught.value.field == "privacy.accountant"


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan")])
def test_delta_outside_zero_one_is_refused(delta):
    with pytest.raises(ConfigError) as caught:
        epsilon_spent([SGD], delta=delta, accountant="rdp")
    assert caught.value.field == "privacy.delta"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": 0.0}, "mechanism.noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "mechanism.noise_multiplier"),
        ({"sample_rate": 0.0}, "mechanism.sample_rate"),
        ({"sample_rate": 1.5}, "mechanism.sample_rate"),
        ({"steps": 0}, "mechanism.steps"),
        ({"steps": 2.5}, "mechanism.steps"),
        ({"label": ""}, "mechanism.label"),
    ],
)
def test_mechanism_out_of_range_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as caught:
        Mechanism(**{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, **kwargs})
    assert caught.value.field == field


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
def test_prv_refuses_a_grid_that_would_take_minutes_and_suggests_another_accountant():
    # Tiny noise: PRV would discretize over about 110 million points (~20 GB).
    tiny_noise = Mechanism(noise_multiplier=0.05, sample_rate=0.01, steps=100)
    with pytest.raises(ConfigError, match="accountant: pld") as caught:
        epsilon_spent([tiny_noise], delta=DELTA, accountant="prv")
    assert caught.value.field == "privacy.accountant"


def test_prv_failure_is_reported_as_a_config_error_suggesting_rdp():
    # PRV's floating point cannot reach delta 1e-14; RDP can.
    with pytest.raises(ConfigError, match="accountant: rdp") as caught:
        epsilon_spent([SGD], delta=1e-14, accountant="prv")
    assert caught.value.field == "privacy.accountant"
    assert epsilon_spent([SGD], delta=1e-14, accountant="rdp") == pytest.approx(15.84, abs=0.05)


# -- the noise multiplier for a budget -----------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_noise_multiplier_for_meets_the_target_from_below_and_tightly(accountant):
    sigma = noise_multiplier_for(epsilon=3.0, delta=DELTA, sample_rate=0.1, steps=100, accountant=accountant)

    def spent(noise):
        return epsilon_spent([Mechanism(noise, 0.1, 100)], delta=DELTA, accountant=accountant)

    assert spent(sigma) <= 3.0
    assert spent(sigma * 0.995) > 3.0


@pytest.mark.parametrize(
    ("epsilon", "sample_rate", "steps"),
    [
        (3.0, 0.133, 32),  # a heart-disease site's run: both PLD grids agree to 1e-5
        (0.7, 0.004, 50_000),  # long and private: the coarse search grid is about 10 % pessimistic here
        (0.5, 1.0, 30),  # no sampling
    ],
)
def test_pld_noise_search_on_a_coarse_grid_is_certified_and_tight_on_the_fine_one(epsilon, sample_rate, steps):
    prior = [Mechanism(noise_multiplier=7.071, sample_rate=1.0, steps=1, label="feature-stats")]
    sigma = noise_multiplier_for(
        epsilon=epsilon, delta=DELTA, sample_rate=sample_rate, steps=steps, accountant="pld", prior=prior
    )

    def spent(noise):
        return epsilon_spent([*prior, Mechanism(noise, sample_rate, steps)], delta=DELTA, accountant="pld")

    assert spent(sigma) <= epsilon
    assert spent(sigma * 0.9975) > epsilon  # within 0.25 % of the smallest multiplier that fits


def test_pld_epsilon_is_dp_accountings_own_to_the_last_bit():
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    history = [(7.071, 1.0, 1), (1.11, 0.133, 32), (0.9, 0.05, 400), (1.3, 0.133, 8)]  # distinct: not pooled
    reference = PLDAccountant()
    for sigma, rate, steps in history:
        event = GaussianDpEvent(sigma) if rate == 1.0 else PoissonSampledDpEvent(rate, GaussianDpEvent(sigma))
        reference.compose(SelfComposedDpEvent(event, steps))
    # Twice: the second composition reuses the subsampled Gaussians the first one built.
    for _ in range(2):
        mechanisms = [Mechanism(sigma, rate, steps) for sigma, rate, steps in history]
        assert epsilon_spent(mechanisms, delta=DELTA, accountant="pld") == reference.get_epsilon(DELTA)


def test_noise_multiplier_for_recovers_the_published_noise():
    sigma = noise_multiplier_for(epsilon=7.9, delta=DELTA, sample_rate=0.1, steps=100, accountant="rdp")
    assert sigma == pytest.approx(1.0, abs=2e-3)


def test_noise_multiplier_for_accounts_for_prior_releases():
    prior = [Mechanism(noise_multiplier=2.0, sample_rate=1.0, steps=1, label="feature-stats")]
    alone = noise_multiplier_for(epsilon=3.0, delta=DELTA, sample_rate=1.0, steps=10, accountant="rdp")
    after = noise_multiplier_for(epsilon=3.0, delta=DELTA, sample_rate=1.0, steps=10, accountant="rdp", prior=prior)
    assert after > alone * 1.05
    total = epsilon_spent([*prior, Mechanism(after, 1.0, 10)], delta=DELTA, accountant="rdp")
    assert 2.99 < total <= 3.0


def test_noise_multiplier_for_refuses_when_prior_releases_spend_the_whole_budget():
    prior = [Mechanism(noise_multiplier=0.8, sample_rate=0.1, steps=100)]  # 12.36 at delta 1e-5 (RDP)
    with pytest.raises(BudgetExceeded, match=r"already spend epsilon 12\.36") as caught:
        noise_multiplier_for(epsilon=5.0, delta=DELTA, sample_rate=0.1, steps=100, accountant="rdp", prior=prior)
    assert caught.value.field == "privacy.epsilon"
    assert "nothing is left" in caught.value.message


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_noise_multiplier_for_refuses_a_target_below_what_prv_resolves_saying_what_is_left():
    with pytest.raises(BudgetExceeded, match=r"leaving 0\.005.*error bound of 0\.01"):
        noise_multiplier_for(epsilon=0.005, delta=DELTA, sample_rate=0.1, steps=100, accountant="prv")


def test_importing_the_package_does_not_import_the_accountant_libraries():
    code = (
        "import sys, fedcare, fedcare.privacy.dp; "
        "print(any(m in sys.modules for m in ('opacus', 'dp_accounting', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
