"""Site-level differential privacy at the coordinator: DP-FedAvg, fixed or adaptive clipping.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent
Language Models") protects a *whole site's* contribution to a round: each
update is clipped to an L2 bound ``C``, the clipped updates are summed with
weight 1, Gaussian noise of standard deviation ``z * C`` is added to the sum,
and the sum is divided by the expected number of sites per round ``m``. The
rounds compose as a subsampled Gaussian mechanism with noise multiplier ``z``
and sampling rate ``q = m / N`` (``N`` sites in the federation), which the
accountant of :mod:`fedcare.privacy.dp.accountant` turns into ``(epsilon,
delta)``.

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with
Adaptive Clipping") moves ``C`` geometrically towards the ``gamma``-quantile of
the update norms, using a noised count of the updates that were not clipped.
The count is a second Gaussian mechanism on the same sites, so the noise
multiplier of the update sum is raised to keep the total at the nominal ``z``
(the paper's Theorem 1): the two mechanisms compose like one with
``z**-2 = z_update**-2 + (2 * sigma_b)**-2``, the count having sensitivity 1/2
(each site adds ``indicator - 1/2``), hence

    ``z_update = (z**-2 - (2 * sigma_b)**-2) ** -1/2``,

which exists only if ``2 * sigma_b > z``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcare.errors import ConfigError, FederationError, ProtocolError
from fedcare.params import Parameters
from fedcare.strategies.base import Strategy
from fedcare.strategies.kernels import add_gaussian_noise, clip_fold, weighted_fold

if TYPE_CHECKING:
    from fedcare.plan import Plan

__all__ = ["DPFedAvg", "adaptive_noise_multiplier", "site_level_epsilon"]

logger = logging.getLogger(__name__)

_FIELD = "plan.privacy.site_level"


def adaptive_noise_multiplier(noise_multiplier: float, *, clipped_count_stddev: float) -> float:
    """The noise multiplier of the update sum that keeps adaptive clipping at the nominal one.

    With the count of unclipped updates released with Gaussian noise of
    standard deviation ``clipped_count_stddev`` (``sigma_b``, sensitivity 1/2),
    the round is as private as one Gaussian mechanism of multiplier
    ``noise_multiplier`` (``z``) when the update sum gets
    ``(z**-2 - (2 * sigma_b)**-2) ** -1/2`` (Andrew et al., 2021, Theorem 1).

    Parameters
    ----------
    noise_multiplier : float
        The nominal (total) noise multiplier ``z`` (>= 0); 0 gives 0.
    clipped_count_stddev : float
        ``sigma_b``, in units of sites.

    Returns
    -------
    float
        The noise multiplier for the update sum (>= ``noise_multiplier``).

    Raises
    ------
    ConfigError
        Naming ``plan.privacy.site_level.clipped_count_stddev`` when
        ``2 * sigma_b <= z``: the count alone would spend the whole budget.

    Examples
    --------
    >>> round(adaptive_noise_multiplier(1.0, clipped_count_stddev=5.0), 4)
    1.005
    >>> adaptive_noise_multiplier(1.0, clipped_count_stddev=0.2)
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.privacy.site_level.clipped_count_stddev: must exceed noise_multiplier / 2 = 0.5 for adaptive clipping (the noised count alone would spend the whole budget), got 0.2; raise it, lower the noise multiplier or sample more sites per round
    """
    if noise_multiplier == 0:
        return 0.0
    if not 2 * clipped_count_stddev > noise_multiplier:
        raise ConfigError(
            f"must exceed noise_multiplier / 2 = {noise_multiplier / 2:g} for adaptive clipping (the noised count "
            f"alone would spend the whole budget), got {clipped_count_stddev:g}; raise it, lower the noise "
            "multiplier or sample more sites per round",
            field=f"{_FIELD}.clipped_count_stddev",
        )
    return float((noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5)


def _os_generator() -> np.random.Generator:
    """A generator seeded from the operating system: DP noise nobody can predict."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


class DPFedAvg(Strategy):
    """Central DP-FedAvg: clip each site's update, sum with weight 1, add Gaussian noise.

    ``new = global + server_learning_rate * (sum_i clip(update_i) + N(0, (z_u C)^2 I)) / m``
    with ``clip(u) = u * min(1, C / ||u||)``, ``m = num_sampled`` and
    ``z_u = noise_multiplier`` (raised slightly with adaptive clipping, see
    :func:`adaptive_noise_multiplier`).

    The average is **unweighted**: every site counts once, whatever its number
    of examples. Example weights would make one site's influence, hence the
    sensitivity and the noise needed, depend on counts the guarantee is meant
    to cover. The denominator is the *fixed* expected number of sites per
    round ``m``, not the number that answered: then one site changes the
    released average by at most ``C / m`` (add/remove-one-site adjacency), the
    sensitivity the accounting assumes (McMahan et al., 2018, the fixed-
    denominator estimator), whereas dividing by the number received would make
    the denominator itself depend on the site's presence. When fewer than ``m``
    sites answer, the step is shrunk by ``received / m`` (biased towards zero
    by that factor, never in direction).

    Updates are folded into one float64 accumulator as they arrive: memory is
    O(model) whatever the number of sites.

    In ``distributed`` mode the sites have already clipped their updates and
    added their share of the noise before secure aggregation (see
    :mod:`fedcare.federation.secure_aggregation`); :meth:`accumulate` then
    receives the secure sum as ``(mean, total weight)``, neither clips nor
    noises, and folds in ``weight * mean``, the noisy sum. Central mode needs
    the individual updates, so it cannot run under secure aggregation (plan
    checks refuse the combination).

    Parameters
    ----------
    noise_multiplier : float
        Nominal noise multiplier ``z`` (>= 0): the noise standard deviation on
        the update sum over the clipping bound. 0 means no privacy.
    clip_norm : float
        L2 bound ``C`` on one site's update (the initial one with adaptive clipping).
    num_sampled : int
        Expected number of sites per round ``m``, the denominator of the average.
    adaptive_clipping : bool
        Move ``C`` towards the ``target_quantile`` of update norms.
    target_quantile : float
        ``gamma`` in (0, 1): the share of updates meant to be left unclipped.
    clip_learning_rate : float
        ``eta``: ``C <- C * exp(-eta * (b - gamma))``, ``b`` the noised share unclipped.
    clipped_count_stddev : float, optional
        ``sigma_b``, noise on the count of unclipped updates, in sites; default
        ``m / 20`` (the paper's choice: the share is then within 0.1 of the
        truth with 95 % probability), or 0 without noise (``z = 0``).
    server_learning_rate : float
        Step size applied to the noisy average.
    distributed : bool
        The sites clip and noise; this strategy only averages the secure sum.
    sample_rate : float
        ``q = m / N``, for the accounting (1.0 claims no amplification by sampling).
    delta : float
        The delta the epsilon of :meth:`round_metrics` is stated at.
    accountant : {"prv", "rdp", "pld"}
        The accountant :meth:`epsilon` uses by default.
    rng : numpy.random.Generator, optional
        Source of the noise. ``None`` (deployments) seeds one from
        ``os.urandom``, so the noise cannot be predicted; tests pass a seeded one.

    Raises
    ------
    ConfigError
        Naming the ``plan.privacy.site_level`` field at fault: a negative noise
        multiplier, a non-positive clip, ``num_sampled < 1``, a
        ``clipped_count_stddev`` too small for the noise multiplier, or adaptive
        clipping in distributed mode.

    Examples
    --------
    >>> g = Parameters({"w": np.zeros(2)})
    >>> s = DPFedAvg(noise_multiplier=0.0, clip_norm=1.0, num_sampled=2)
    >>> s.begin_round(1, g)
    >>> s.accumulate(Parameters({"w": [3.0, 4.0]}), weight=10, node_id="a")  # norm 5: scaled to 1
    >>> s.accumulate(Parameters({"w": [0.2, 0.0]}), weight=1, node_id="b")   # norm 0.2: unchanged
    >>> [round(float(v), 3) for v in s.finalize()["w"]]
    [0.4, 0.4]
    >>> s.last_round_metrics()["updates_clipped"]
    1
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        num_sampled: int,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        server_learning_rate: float = 1.0,
        distributed: bool = False,
        sample_rate: float = 1.0,
        delta: float = 1e-5,
        accountant: str = "prv",
        rng: np.random.Generator | None = None,
    ) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {noise_multiplier}", field=f"{_FIELD}.noise_multiplier")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ConfigError(f"must be a positive finite number, got {clip_norm}", field=f"{_FIELD}.clip_norm")
        if num_sampled < 1:
            raise ConfigError(f"must be >= 1, got {num_sampled}", field="plan.nodes_per_round")
        if not 0 < target_quantile < 1:
            raise ConfigError(f"must be in (0, 1), got {target_quantile}", field=f"{_FIELD}.target_quantile")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"must be in (0, 1], got {sample_rate}", field="plan.nodes_per_round")
        if adaptive_clipping and distributed:
            raise ConfigError(
                "adaptive clipping needs the count of unclipped updates, which distributed DP does not aggregate; "
                "use a fixed clip_norm with mode: distributed, or mode: central",
                field=f"{_FIELD}.adaptive_clipping",
            )
        if clipped_count_stddev is None:
            clipped_count_stddev = num_sampled / 20 if noise_multiplier > 0 else 0.0
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.num_sampled = int(num_sampled)
        self.adaptive_clipping = adaptive_clipping
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = float(clipped_count_stddev)
        self.server_learning_rate = float(server_learning_rate)
        self.distributed = distributed
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.accountant = accountant
        #: Noise multiplier applied to the update sum (z, or z_update with adaptive clipping).
        self.update_noise_multiplier = (
            adaptive_noise_multiplier(self.noise_multiplier, clipped_count_stddev=self.clipped_count_stddev)
            if adaptive_clipping
            else self.noise_multiplier
        )
        if self.noise_multiplier > 0 and self.update_noise_multiplier >= 2 * self.noise_multiplier:
            logger.warning(
                "adaptive clipping more than doubles the update noise; raise clipped_count_stddev",
                extra={"noise_multiplier": self.noise_multiplier, "update_noise_multiplier": self.update_noise_multiplier},
            )
        self._rng = rng if rng is not None else _os_generator()
        self._global: Parameters | None = None
        self._sum: np.ndarray | None = None
        self._round = 0
        self._received = 0
        self._unclipped = 0
        self._last: dict[str, Any] = {}

    # -- the round -------------------------------------------------------------

    def begin_round(self, round: int, global_parameters: Parameters) -> None:  # noqa: A002
        self._global = global_parameters
        self._sum = np.zeros(global_parameters.num_elements, dtype=np.float64)
        self._round = round
        self._received = 0
        self._unclipped = 0

    def accumulate(self, update: Parameters, *, weight: float, node_id: str) -> None:
        """Fold one site's update in: clipped to ``clip_norm``, weight 1 (``weight`` is only checked).

        In distributed mode ``update`` is the secure mean of the sites' clipped,
        noised updates and ``weight`` their total weight: ``weight * update``,
        the noisy sum, is folded in unchanged.

        Raises
        ------
        FederationError
            If called before :meth:`begin_round`.
        ProtocolError
            If the update does not match the model, is not finite, or the weight is not positive.
        """
        if self._global is None or self._sum is None:
            raise FederationError("accumulate() called before begin_round()")
        if update.spec != self._global.spec:
            raise ProtocolError("update does not match the model's tensors", node_id=node_id)
        if not weight > 0:
            raise ProtocolError(f"update weight must be > 0, got {weight}", node_id=node_id)
        if self.distributed:
            weighted_fold(self._sum, update.flatten(), float(weight))
            self._received += 1
            return
        norm = clip_fold(self._sum, update.flatten(), self.clip_norm)
        if not math.isfinite(norm):
            raise ProtocolError("update contains non-finite values (NaN or Inf)", node_id=node_id)
        self._received += 1
        self._unclipped += norm <= self.clip_norm

    def finalize(self) -> Parameters:
        """Noise the sum, divide by ``num_sampled``, step; with adaptive clipping, move ``clip_norm``.

        Raises
        ------
        FederationError
            If called before :meth:`begin_round` or with no update accumulated.
        """
        if self._global is None or self._sum is None:
            raise FederationError("finalize() called before begin_round()")
        if self._received == 0:
            raise FederationError("no update was accumulated this round")
        clip_used = self.clip_norm
        step = self._sum
        sum_stddev = self.update_noise_multiplier * clip_used
        if not self.distributed:
            add_gaussian_noise(step, stddev=sum_stddev, rng=self._rng)
        step *= self.server_learning_rate / self.num_sampled
        step += self._global.flatten()
        new = Parameters.from_flat(step.astype(np.float32), self._global.spec)
        self._last = {
            "mode": "distributed" if self.distributed else "central",
            "clip_norm": clip_used,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier,
            # Per coordinate, on the averaged update (before the server learning rate).
            "noise_stddev": sum_stddev / self.num_sampled,
        }
        if self.distributed:
            self._last["secure_sums"] = self._received
        else:
            self._last["updates_received"] = self._received
            self._last["updates_clipped"] = self._received - self._unclipped
        if self.adaptive_clipping:
            self.clip_norm = self._next_clip_norm()
            self._last["next_clip_norm"] = self.clip_norm
        self._global, self._sum = None, None
        return new

    def _next_clip_norm(self) -> float:
        # Each site contributes (unclipped - 1/2), sensitivity 1/2; the 1/2 per expected site is added back.
        centred = self._unclipped - self._received / 2
        if self.clipped_count_stddev > 0:
            centred += float(self._rng.normal(0.0, self.clipped_count_stddev))
        share_unclipped = centred / self.num_sampled + 0.5
        return self.clip_norm * math.exp(-self.clip_learning_rate * (share_unclipped - self.target_quantile))

    # -- reporting -------------------------------------------------------------

    def last_round_metrics(self) -> dict[str, Any]:
        """What the last finalized round did: clip norm used, updates clipped, noise.

        Returns
        -------
        dict
            ``mode``; ``clip_norm`` used; ``noise_multiplier`` (nominal) and
            ``update_noise_multiplier`` (applied to the sum); ``noise_stddev``
            per coordinate of the averaged update; in central mode
            ``updates_received`` and ``updates_clipped``; with adaptive clipping
            ``next_clip_norm``. Empty before the first round.
        """
        return dict(self._last)

    def epsilon(
        self, rounds: int, *, sample_rate: float | None = None, delta: float | None = None, accountant: str | None = None
    ) -> float:
        """The site-level epsilon spent by ``rounds`` rounds of this strategy.

        Accounts the nominal noise multiplier (the count's noise of adaptive
        clipping is inside it) as a subsampled Gaussian mechanism, one step per round.

        Parameters
        ----------
        rounds : int
            Rounds run so far (>= 0).
        sample_rate, delta, accountant : optional
            Default to the constructor's.

        Returns
        -------
        float
            Epsilon at ``delta``; ``inf`` without noise, 0.0 for 0 rounds.

        Examples
        --------
        >>> s = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=10, sample_rate=0.1)
        >>> 0 < s.epsilon(10, accountant="rdp") < s.epsilon(100, accountant="rdp")
        True
        """
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        from fedcare.privacy.dp.accountant import Mechanism, epsilon_spent

        mechanism = Mechanism(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate if sample_rate is None else sample_rate,
            steps=rounds,
            label="dp-fedavg",
        )
        return float(
            epsilon_spent(
                [mechanism],
                delta=self.delta if delta is None else delta,
                accountant=self.accountant if accountant is None else accountant,
            )
        )

    def round_metrics(self) -> dict[str, Any]:
        """:meth:`last_round_metrics` with the epsilon spent so far (at ``delta``), for the round_end event.

        ``epsilon`` is None, with the reason in ``epsilon_error``, when the
        accountant cannot compute it (PRV refuses compositions that would
        need a huge grid; RDP always answers).

        Examples
        --------
        >>> s = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, num_sampled=1, accountant="rdp")
        >>> s.round_metrics()
        {}
        """
        if not self._last:
            return {}
        accounting: dict[str, Any] = {"delta": self.delta, "sample_rate": self.sample_rate}
        try:
            accounting["epsilon"] = self.epsilon(self._round)
        except ConfigError as exc:  # e.g. PRV refuses a huge grid: report it, do not stop the run
            accounting["epsilon"] = None
            accounting["epsilon_error"] = exc.message
        return {**self._last, **accounting}


def site_level_epsilon(plan: Plan, num_nodes: int) -> float:
    """The site-level epsilon a plan spends over all its rounds, with ``num_nodes`` sites.

    The sampling rate is ``q = nodes_per_round / num_nodes`` (1 when every site
    takes part in every round: no amplification).

    Parameters
    ----------
    plan : Plan
        A plan with ``privacy.site_level.enabled``.
    num_nodes : int
        Sites in the federation.

    Returns
    -------
    float
        Epsilon at ``plan.privacy.site_level.delta``.

    Raises
    ------
    ConfigError
        If site-level DP is off (field ``plan.privacy.site_level.enabled``).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "t", "dataset": {"name": "d"}, "rounds": 10, "nodes_per_round": 10,
    ...                    "privacy": {"site_level": {"enabled": True, "noise_multiplier": 1.0,
    ...                                               "accountant": "rdp"}}})
    >>> site_level_epsilon(plan, 100) < site_level_epsilon(plan, 10)
    True
    """
    site_level = plan.privacy.site_level
    if not site_level.enabled:
        raise ConfigError("site-level DP is off: no epsilon to compute", field=f"{_FIELD}.enabled")
    if num_nodes < 1:
        raise ConfigError(f"needs at least one site, got {num_nodes}", field="plan.nodes")
    from fedcare.privacy.dp.accountant import Mechanism, epsilon_spent

    per_round = min(plan.nodes_per_round or num_nodes, num_nodes)
    mechanism = Mechanism(
        noise_multiplier=site_level.noise_multiplier,
        sample_rate=per_round / num_nodes,
        steps=plan.rounds,
        label="dp-fedavg",
    )
    return float(epsilon_spent([mechanism], delta=site_level.delta, accountant=site_level.accountant))
