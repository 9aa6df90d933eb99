"""Privacy accounting: the epsilon a sequence of Gaussian releases spends, and the noise that fits a budget.

A :class:`Mechanism` is one Poisson-subsampled Gaussian release repeated
``steps`` times (DP-SGD's steps, a feature-statistics release, a DP-FedAvg
round). :func:`epsilon_spent` composes any number of them, with different noise
and sampling rates, through a maintained accountant; nothing here re-derives a
privacy bound:

* ``"prv"``: Opacus's :class:`~opacus.accountants.PRVAccountant` (Gopi et al.,
  2021), numerical composition of privacy loss random variables. Tight; it
  returns an upper bound that includes its own discretization error of 0.01,
  so one release costs at least about 0.01.
* ``"rdp"``: Opacus's :class:`~opacus.accountants.RDPAccountant` (Rényi DP,
  Mironov 2017), evaluated at Opacus's orders plus larger ones so that large
  noise multipliers are not limited by the largest order. Looser, the fastest,
  and its cost does not grow with the number of steps.
* ``"pld"``: dp-accounting's privacy loss distribution accountant (Google),
  as tight as PRV and faster for long compositions.

With noise multiplier 1.0, sample rate 0.1 and 100 steps at delta 1e-5 they
give epsilon 7.06 (PRV), 7.05 (PLD) and 7.90 (RDP), the figures Opacus and
dp-accounting publish.

Cost per call: RDP up to about 0.08 s (microseconds without sampling) and
independent of the steps; PLD 0.01-1.5 s, nearly independent of the steps
(most of it builds one subsampled Gaussian's distribution, which is kept for
the next call with the same noise and rate: a site's next ledger check);
PRV about 0.15 s for 100 steps, but its time and memory grow with epsilon
times the square root of the steps (10,000 steps at epsilon 128: 6 s and
2 GB). A PRV composition that would need more than 10 million grid points is
refused with a :class:`~fedcare.errors.ConfigError` that suggests PLD or RDP.
PRV and PLD are slowest at small noise multipliers (below about 0.3), which
:func:`noise_multiplier_for` never tries far from its answer.

Opacus (which brings torch, about 2 s) and dp-accounting are imported when an
epsilon is first computed, not with :mod:`fedcare`. Opacus may warn that the
optimal RDP order is the largest one when PRV sizes its grid for noise
multipliers above about 15 without sampling; that bound only sizes the grid
(larger than needed), so the epsilon is still right.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcare.errors import BudgetExceeded, ConfigError, FedcareError

__all__ = ["ACCOUNTANTS", "Mechanism", "epsilon_spent", "noise_multiplier_for"]

logger = logging.getLogger(__name__)

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "pld")
"""The accountants :func:`epsilon_spent` knows, by name."""

# Opacus's default RDP orders (1.1 .. 10.9, 12 .. 63) plus larger ones: for a
# noise multiplier above about 15 the best order is beyond 63, and Opacus would
# warn and return a loose epsilon (0.115 instead of 0.066 at 50, one step).
# Orders only tighten the bound (it is a minimum over them), so the published
# figures do not change.
_RDP_ORDERS: tuple[float, ...] = (
    *(1.0 + x / 10.0 for x in range(1, 100)),
    *(float(order) for order in range(12, 64)),
    *(64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0),
)

# PRV discretizes the privacy loss on a grid whose size grows with epsilon and
# the square root of the steps; about 200 bytes and 0.6 microseconds per point.
_PRV_MAX_POINTS = 10_000_000

# The noise multiplier search: what "huge" noise is, how far apart the first
# bracket's ends are, and the relative tolerance of the answer.
_SIGMA_MIN = 1e-2
_SIGMA_MAX = 1e4
_RELATIVE_TOLERANCE = 1e-3
_GUESS_TOLERANCE = 2e-2
_SIGNIFICANT_DIGITS = 4

# PLD's grid of privacy loss values: dp-accounting's default, and a grid ten
# times coarser that is about ten times faster. A coarser grid only rounds the
# losses further up (pessimistic estimates), so its epsilon is never below the
# fine one's; in the plans here they agree to 1e-5 relative, but over tens of
# thousands of steps at small epsilon the coarse one can be 10 % higher. The
# noise search runs on the coarse grid and the fine one certifies the answer.
_PLD_INTERVAL = 1e-4
_PLD_SEARCH_INTERVAL = 1e-3
_PLD_GRID_AGREEMENT = 1e-4


@dataclass(frozen=True)
class Mechanism:
    """One Poisson-subsampled Gaussian release, repeated ``steps`` times.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over the sensitivity (clipping norm); > 0.
    sample_rate : float
        Probability that a record takes part in one step, in (0, 1]; 1 means
        every record, every step (no amplification by sampling).
    steps : int
        How many times the release is repeated (>= 1).
    label : str
        What the release is, e.g. ``"dp-sgd"`` or ``"feature-stats"``.

    Raises
    ------
    ConfigError
        If a value is out of range; the field is ``mechanism.<name>``.

    Examples
    --------
    >>> Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=100, label='dp-sgd')
    >>> Mechanism(noise_multiplier=0.0, sample_rate=0.1, steps=100)
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: mechanism.noise_multiplier: must be a finite number > 0, got 0.0
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    label: str = "dp-sgd"

    def __post_init__(self) -> None:
        sigma = _as_float(self.noise_multiplier)
        if sigma is None or not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(
                f"must be a finite number > 0, got {self.noise_multiplier!r}", field="mechanism.noise_multiplier"
            )
        rate = _as_float(self.sample_rate)
        if rate is None or not (0.0 < rate <= 1.0):
            raise ConfigError(f"must be in (0, 1], got {self.sample_rate!r}", field="mechanism.sample_rate")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ConfigError(f"must be an integer >= 1, got {self.steps!r}", field="mechanism.steps")
        if not isinstance(self.label, str) or not self.label:
            raise ConfigError(f"must be a non-empty string, got {self.label!r}", field="mechanism.label")
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", rate)
        object.__setattr__(self, "steps", int(self.steps))


def epsilon_spent(mechanisms: Sequence[Mechanism], *, delta: float, accountant: str = "prv") -> float:
    """The epsilon that all ``mechanisms`` together spend, at ``delta``.

    The mechanisms may differ in noise and sampling rate; releases with the
    same noise multiplier and sample rate are pooled (composition does not
    depend on order) before the accountant composes them.

    Parameters
    ----------
    mechanisms : sequence of Mechanism
        The releases on one dataset; empty: nothing spent.
    delta : float
        The delta of the guarantee, in (0, 1).
    accountant : {"prv", "rdp", "pld"}
        Opacus PRV, Opacus RDP or dp-accounting PLD (see the module notes).

    Returns
    -------
    float
        Epsilon (>= 0; ``inf`` when the accountant finds no finite bound).

    Raises
    ------
    ConfigError
        If the accountant is unknown (field ``privacy.accountant``), ``delta`` is
        out of range (``privacy.delta``), or the accountant cannot compute this
        composition (``privacy.accountant``; the message names one that can).

    Examples
    --------
    >>> sgd = Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    >>> round(epsilon_spent([sgd], delta=1e-5, accountant="rdp"), 2)
    7.9
    >>> round(epsilon_spent([sgd], delta=1e-5, accountant="prv"), 2)
    7.06
    >>> epsilon_spent([], delta=1e-5)
    0.0
    """
    _check_accountant(accountant)
    _check_delta(delta)
    history = _pooled(mechanisms)
    if not history:
        return 0.0
    try:
        return _epsilon(accountant, history, delta)
    except FedcareError:
        raise
    except _PRVGridTooLarge as exc:
        raise ConfigError(
            f"the PRV accountant would need {exc.points:,} grid points for this composition "
            f"({_describe(history)} at delta {delta:g}), more than {_PRV_MAX_POINTS:,} (minutes and gigabytes); "
            "use accountant: pld (as tight, fast for long compositions) or accountant: rdp",
            field="privacy.accountant",
        ) from None
    except (ArithmeticError, MemoryError, RuntimeError, ValueError) as exc:
        other = "rdp" if accountant != "rdp" else "pld"
        raise ConfigError(
            f"the {accountant} accountant cannot compute epsilon for {_describe(history)} at delta {delta:g} "
            f"({type(exc).__name__}: {exc}); use accountant: {other}",
            field="privacy.accountant",
        ) from exc


def noise_multiplier_for(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior: Sequence[Mechanism] = (),
    label: str = "dp-sgd",
) -> float:
    """The smallest noise multiplier with which ``steps`` more steps stay within ``epsilon``.

    Finds the smallest ``sigma`` such that ``prior`` plus
    ``Mechanism(sigma, sample_rate, steps)`` spends at most ``epsilon`` at
    ``delta``: a bracket, Brent's method on ``log(sigma)`` to a relative
    tolerance of 1e-3, then the result rounded up to 4 significant digits and
    checked once more with the accountant, so the answer never exceeds the
    target (it is at most about 0.2% above the smallest fitting multiplier).
    PRV starts from RDP's answer, which is cheap and near; PLD searches on a
    grid ten times coarser (about ten times faster, and never below the fine
    grid's epsilon) and certifies the answer on its usual grid.

    Parameters
    ----------
    epsilon : float
        The target epsilon for everything, ``prior`` included (> 0).
    delta : float
        The delta of the guarantee, in (0, 1).
    sample_rate : float
        Sampling rate of the new release, in (0, 1].
    steps : int
        Steps of the new release (>= 1).
    accountant : {"prv", "rdp", "pld"}
        The accountant that must certify the answer.
    prior : sequence of Mechanism
        Releases already spent (or planned) on the same dataset.
    label : str
        The new release's label (checked like :class:`Mechanism`'s).

    Returns
    -------
    float
        The noise multiplier (noise standard deviation over the sensitivity).

    Raises
    ------
    BudgetExceeded
        If even a noise multiplier of 1e4 does not fit: ``prior`` spends (nearly)
        all of ``epsilon`` (field ``privacy.epsilon``). The message says how much
        is spent and what is left.
    ConfigError
        If an argument is out of range or the accountant unknown.

    Examples
    --------
    >>> sigma = noise_multiplier_for(epsilon=7.9, delta=1e-5, sample_rate=0.1, steps=100, accountant="rdp")
    >>> sigma
    1.0
    >>> later = noise_multiplier_for(epsilon=7.9, delta=1e-5, sample_rate=0.1, steps=100, accountant="rdp",
    ...                              prior=[Mechanism(noise_multiplier=8.0, sample_rate=1.0, steps=1)])
    >>> later > sigma
    True
    """
    if _as_float(epsilon) is None or not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"must be a finite number > 0, got {epsilon!r}", field="privacy.epsilon")
    _check_accountant(accountant)
    _check_delta(delta)
    Mechanism(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps, label=label)  # validates the rest
    prior = tuple(prior)
    target = float(epsilon)

    def epsilon_with(sigma: float) -> float:
        new = Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, label=label)
        return epsilon_spent((*prior, new), delta=delta, accountant=accountant)

    spent = epsilon_spent(prior, delta=delta, accountant=accountant)
    if spent >= target:
        raise BudgetExceeded(
            f"the prior releases already spend epsilon {spent:.4g} (delta {delta:g}, accountant {accountant}), "
            f"at or above the target {target:.4g}: nothing is left for {steps} more steps; "
            "plan fewer releases or a larger budget",
            field="privacy.epsilon",
        )
    if accountant == "pld":
        sigma = _pld_noise_search(epsilon_with, prior=prior, sample_rate=sample_rate, steps=steps, label=label,
                                  delta=delta, target=target)  # fmt: skip
    elif accountant == "rdp":
        sigma = _smallest_fitting(epsilon_with, target=target, start=1.0, factor=2.0, tol=_RELATIVE_TOLERANCE)
    else:
        # PRV: a cheap start from RDP for the new release alone against what is left. RDP is
        # looser, so its answer is usually a few percent above the one we want, and PRV is
        # only ever asked about nearby noise (at small noise multipliers it takes seconds to minutes).
        def rdp_alone(sigma: float) -> float:
            new = Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, label=label)
            return epsilon_spent([new], delta=delta, accountant="rdp")

        guess = _smallest_fitting(rdp_alone, target=target - spent, start=1.0, factor=2.0, tol=_GUESS_TOLERANCE)
        start = _SIGMA_MAX if guess is None else guess
        sigma = _smallest_fitting(epsilon_with, target=target, start=start, factor=1.1, tol=_RELATIVE_TOLERANCE)
    if sigma is not None:
        logger.debug("noise multiplier derived", extra={"noise_multiplier": sigma, "epsilon": target})
        return sigma
    at_max = epsilon_with(_SIGMA_MAX)
    hint = ""
    if accountant == "prv":
        hint = "; PRV adds its error bound of 0.01 to every epsilon, and pld resolves smaller ones"
    raise BudgetExceeded(
        f"the prior releases spend epsilon {spent:.4g} of the target {target:.4g} (delta {delta:g}, accountant "
        f"{accountant}), leaving {target - spent:.4g}, and even noise multiplier {_SIGMA_MAX:g} over {steps} more "
        f"steps would bring it to {at_max:.4g}{hint}; plan fewer releases or a larger budget",
        field="privacy.epsilon",
    )


def _pld_noise_search(
    epsilon_with: Callable[[float], float],
    *,
    prior: tuple[Mechanism, ...],
    sample_rate: float,
    steps: int,
    label: str,
    delta: float,
    target: float,
) -> float | None:
    """PLD's noise search: on the coarse grid, then certified on the fine one (``epsilon_with``).

    The coarse grid's epsilon is never below the fine one's, so its answer
    fits on the fine grid too. It is kept when the two grids agree there to
    :data:`_PLD_GRID_AGREEMENT` of the target, so that it is as near the fine
    grid's own answer as the search's tolerance (about 0.2 % above the smallest
    fitting multiplier at most); where they part (very long compositions at
    small epsilon) the search runs again on the fine grid from there. One fine
    composition in the usual case, against about ten for a fine search.
    """

    @functools.cache
    def coarse(sigma: float) -> float:
        new = Mechanism(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, label=label)
        return _epsilon("pld", _pooled((*prior, new)), delta, interval=_PLD_SEARCH_INTERVAL)

    try:
        # A wide first bracket from 1.0: the coarse grid is cheap enough not to need RDP's guess.
        found = _smallest_fitting(coarse, target=target, start=1.0, factor=2.0, tol=_RELATIVE_TOLERANCE)
    except (ArithmeticError, MemoryError, RuntimeError, ValueError):
        found = None  # the fine grid below reports whatever is wrong, in its own words
    if found is not None:
        fine = epsilon_with(found)
        if fine <= target and coarse(found) - fine <= _PLD_GRID_AGREEMENT * target:
            return found
    return _smallest_fitting(
        epsilon_with, target=target, start=1.0 if found is None else found, factor=1.1, tol=_RELATIVE_TOLERANCE
    )


# -- the accountants -------------------------------------------------------------------

_History = list[tuple[float, float, int]]


class _PRVGridTooLarge(Exception):
    """PRV's discretization grid would exceed :data:`_PRV_MAX_POINTS`."""

    def __init__(self, points: int) -> None:
        super().__init__(points)
        self.points = points


def _prv(history: _History, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    class BoundedPRVAccountant(PRVAccountant):  # type: ignore[misc]  # opacus is untyped
        """Opacus's PRV accountant, refusing grids that would take minutes and gigabytes."""

        def _get_domain(self, **kwargs: Any) -> Any:
            domain = super()._get_domain(**kwargs)
            if int(domain.size) > _PRV_MAX_POINTS:
                raise _PRVGridTooLarge(int(domain.size))
            return domain

    prv = BoundedPRVAccountant()
    prv.history = list(history)
    return float(prv.get_epsilon(delta=delta))


def _rdp(history: _History, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    rdp = RDPAccountant()
    rdp.history = list(history)
    return float(rdp.get_epsilon(delta=delta, alphas=list(_RDP_ORDERS)))


def _pld(history: _History, delta: float, *, interval: float = _PLD_INTERVAL) -> float:
    """dp-accounting's ``PLDAccountant`` composition of ``history``, with its subsampled Gaussians kept.

    The same operations, in the same order, as ``PLDAccountant.compose`` of
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``
    per entry (add-or-remove-one neighbours, pessimistic estimates) and
    ``get_epsilon``, so the figures are the accountant's to the last bit. Building
    one subsampled Gaussian's distribution is most of the cost, and a site's
    ledger asks about the same noise and rate every round with more steps, so
    that distribution is built once (:func:`_subsampled_gaussian_pld`).
    """
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.identity(value_discretization_interval=interval)
    for noise_multiplier, sample_rate, steps in history:
        if sample_rate == 1.0:  # a Gaussian composed with itself is a Gaussian: no self-composition needed
            release = privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=noise_multiplier / math.sqrt(steps), value_discretization_interval=interval
            )
        else:
            release = _subsampled_gaussian_pld(noise_multiplier, sample_rate, interval).self_compose(steps)
        pld = pld.compose(release)
    return float(pld.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=16)
def _subsampled_gaussian_pld(noise_multiplier: float, sample_rate: float, interval: float) -> Any:
    """One step of a Poisson-subsampled Gaussian as a privacy loss distribution (immutable; composing makes new ones)."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval, sampling_prob=sample_rate
    )


def _epsilon(accountant: str, history: _History, delta: float, *, interval: float = _PLD_INTERVAL) -> float:
    """The accountant's epsilon for ``history`` (``interval``: PLD's grid), failing closed: NaN is ``inf``."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        # log(0) in PRV's tails is expected; errstate is local to this thread.
        if accountant == "prv":
            epsilon = _prv(history, delta)
        elif accountant == "rdp":
            epsilon = _rdp(history, delta)
        else:
            epsilon = _pld(history, delta, interval=interval)
    if math.isnan(epsilon):
        return math.inf  # NaN would pass every budget comparison
    return max(0.0, epsilon)


# -- helpers ---------------------------------------------------------------------------


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}", field="privacy.accountant"
        )


def _check_delta(delta: float) -> None:
    value = _as_float(delta)
    if value is None or not (0.0 < value < 1.0):
        raise ConfigError(f"must be in (0, 1), got {delta!r}", field="privacy.delta")


def _pooled(mechanisms: Sequence[Mechanism]) -> _History:
    """``(noise_multiplier, sample_rate, steps)`` per distinct noise and rate, in order of appearance."""
    steps: dict[tuple[float, float], int] = {}
    for index, mechanism in enumerate(mechanisms):
        if not isinstance(mechanism, Mechanism):
            raise ConfigError(f"must be a Mechanism, got {type(mechanism).__name__}", field=f"mechanisms[{index}]")
        key = (mechanism.noise_multiplier, mechanism.sample_rate)
        steps[key] = steps.get(key, 0) + mechanism.steps
    return [(sigma, rate, count) for (sigma, rate), count in steps.items()]


def _describe(history: _History) -> str:
    total = sum(count for _, _, count in history)
    return f"{len(history)} distinct release(s), {total} steps"


def _round_up(value: float) -> float:
    """``value`` rounded up to :data:`_SIGNIFICANT_DIGITS` significant digits."""
    unit = 10.0 ** (math.floor(math.log10(value)) - (_SIGNIFICANT_DIGITS - 1))
    return float(f"{math.ceil(value / unit) * unit:.{_SIGNIFICANT_DIGITS}g}")


def _smallest_fitting(
    epsilon_of: Callable[[float], float], *, target: float, start: float, factor: float, tol: float
) -> float | None:
    """The smallest noise multiplier in [_SIGMA_MIN, _SIGMA_MAX] whose epsilon is at most ``target``.

    Brackets the answer from ``start`` by steps of ``factor``, narrows it with
    Brent's method on ``log(sigma)`` to a relative width ``tol``, rounds up and
    checks the result. ``None`` if even ``_SIGMA_MAX`` does not fit.
    """
    from scipy.optimize import brentq

    seen: dict[float, float] = {}

    def excess(log_sigma: float) -> float:  # > 0: too little noise
        if log_sigma not in seen:
            seen[log_sigma] = epsilon_of(math.exp(log_sigma)) - target
        return seen[log_sigma]

    step = math.log(factor)
    low = high = math.log(min(max(start, _SIGMA_MIN), _SIGMA_MAX))
    if excess(high) <= 0:
        low = high - step
        while excess(low) <= 0:
            high = low
            if math.exp(low) <= _SIGMA_MIN * (1.0 + 1e-9):
                return _certified(epsilon_of, target=target, sigma=math.exp(high))
            low = max(low - step, math.log(_SIGMA_MIN))
    else:
        top = math.log(_SIGMA_MAX)
        while excess(high) > 0:  # widen upwards, faster and faster
            if high >= top:
                return None
            low = high
            high = min(high + step, top)
            step *= 2.0
    root = float(brentq(excess, low, high, xtol=tol / 2))
    return _certified(epsilon_of, target=target, sigma=math.exp(root))


def _certified(epsilon_of: Callable[[float], float], *, target: float, sigma: float) -> float:
    """``sigma`` rounded up, checked with the accountant, and stepped up by the last digit until it fits."""
    candidate = _round_up(sigma)
    for _ in range(20):
        if epsilon_of(candidate) <= target:
            return candidate
        candidate = _round_up(candidate * (1.0 + 10.0 ** -(_SIGNIFICANT_DIGITS + 1)))
    raise ConfigError(
        f"the accountant's epsilon does not fall as the noise multiplier rises near {sigma:.4g}; "
        "use another accountant",
        field="privacy.accountant",
    )
