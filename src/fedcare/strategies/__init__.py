"""Aggregation strategies, built by name from the plan."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import numpy as np

from fedcare.errors import ConfigError
from fedcare.plan import SiteLevelPrivacy, StrategyConfig
from fedcare.strategies.base import Strategy
from fedcare.strategies.cyclic import Cyclic
from fedcare.strategies.ditto import Ditto
from fedcare.strategies.dp_fedavg import DPFedAvg
from fedcare.strategies.fedavg import FedAvg
from fedcare.strategies.fednova import FedNova
from fedcare.strategies.fedopt import FedOpt
from fedcare.strategies.fedprox import FedProx
from fedcare.strategies.kernels import weighted_fold
from fedcare.strategies.robust import CoordinateMedian, GeometricMedian, MultiKrum, NormBounding, TrimmedMean
from fedcare.strategies.scaffold import Scaffold

__all__ = [
    "CoordinateMedian",
    "Cyclic",
    "DPFedAvg",
    "Ditto",
    "FedAvg",
    "FedNova",
    "FedOpt",
    "FedProx",
    "GeometricMedian",
    "MultiKrum",
    "NormBounding",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "make_strategy",
    "weighted_fold",
]

_FEDOPT_RULES: Mapping[str, Literal["adam", "yogi", "adagrad"]] = MappingProxyType(
    {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
)


def make_strategy(
    config: StrategyConfig,
    *,
    privacy: SiteLevelPrivacy | None = None,
    num_sampled: int | None = None,
    num_nodes: int | None = None,
    rng: np.random.Generator | None = None,
) -> Strategy:
    """Build the strategy a plan names; DP-FedAvg when site-level DP is enabled.

    ``plan.strategy.name`` maps to ``fedavg`` :class:`FedAvg`, ``median``
    :class:`CoordinateMedian`, ``trimmed-mean`` :class:`TrimmedMean`, ``krum``
    :class:`MultiKrum`, ``geometric-median`` :class:`GeometricMedian`,
    ``norm-bounding`` :class:`NormBounding`, ``fedprox`` :class:`FedProx`,
    ``fedadam``, ``fedyogi`` and ``fedadagrad`` :class:`FedOpt` and
    ``scaffold`` :class:`Scaffold` (with ``num_nodes`` as its ``N``) and
    ``cyclic`` :class:`Cyclic`; ``fedbn`` :class:`FedAvg` (the sites keep
    their normalization tensors), ``fednova`` :class:`FedNova` and ``ditto``
    :class:`Ditto`.

    Parameters
    ----------
    config : StrategyConfig
        ``plan.strategy``.
    privacy : SiteLevelPrivacy, optional
        ``plan.privacy.site_level``; when enabled, the result is a
        :class:`DPFedAvg` with the strategy's server learning rate.
    num_sampled : int, optional
        Sites per round (``plan.nodes_per_round`` or all); needed with site-level DP.
    num_nodes : int, optional
        Sites in the federation, for the sampling rate ``num_sampled / num_nodes``
        (default: ``num_sampled``, i.e. rate 1, no amplification claimed).
    rng : numpy.random.Generator, optional
        Source of DP-FedAvg's noise; ``None`` (deployments) seeds one from
        ``os.urandom``. Simulations pass one seeded by the plan, so a study can be repeated.

    Raises
    ------
    ConfigError
        If site-level DP is enabled without ``num_sampled``, or its settings are
        inconsistent (see :class:`DPFedAvg`), or site-level DP is asked for
        together with a robust rule.

    Examples
    --------
    >>> type(make_strategy(StrategyConfig(name="fedavg"))).__name__
    'FedAvg'
    >>> type(make_strategy(StrategyConfig(name="krum", byzantine_nodes=2))).__name__
    'MultiKrum'
    >>> type(make_strategy(StrategyConfig(name="fedyogi"))).__name__
    'FedOpt'
    >>> dp = make_strategy(StrategyConfig(), privacy=SiteLevelPrivacy(enabled=True), num_sampled=5, num_nodes=20)
    >>> type(dp).__name__, dp.sample_rate
    ('DPFedAvg', 0.25)
    """
    if privacy is not None and privacy.enabled:
        if config.name != "fedavg":
            raise ConfigError(
                f"site-level DP runs DP-FedAvg and cannot be combined with {config.name!r}; "
                "use name: fedavg or turn site-level DP off",
                field="plan.strategy.name",
            )
        if num_sampled is None:
            raise ConfigError("site-level DP needs the number of sites per round", field="plan.nodes_per_round")
        total = num_nodes if num_nodes is not None else num_sampled
        return DPFedAvg(
            noise_multiplier=privacy.noise_multiplier,
            clip_norm=privacy.clip_norm,
            num_sampled=num_sampled,
            adaptive_clipping=privacy.adaptive_clipping,
            target_quantile=privacy.target_quantile,
            clip_learning_rate=privacy.clip_learning_rate,
            clipped_count_stddev=privacy.clipped_count_stddev,
            server_learning_rate=config.server_learning_rate,
            distributed=privacy.mode == "distributed",
            sample_rate=min(1.0, num_sampled / total),
            delta=privacy.delta,
            accountant=privacy.accountant,
            rng=rng,
        )
    if config.name == "fedavg":
        return FedAvg(server_learning_rate=config.server_learning_rate)
    rate = config.server_learning_rate
    if config.name == "median":
        return CoordinateMedian(server_learning_rate=rate)
    if config.name == "trimmed-mean":
        return TrimmedMean(trim_fraction=config.trim_fraction, server_learning_rate=rate)
    if config.name == "krum":
        return MultiKrum(
            num_byzantine=config.byzantine_nodes, num_selected=config.krum_selected, server_learning_rate=rate
        )
    if config.name == "geometric-median":
        return GeometricMedian(max_iterations=config.geometric_median_iterations, server_learning_rate=rate)
    if config.name == "norm-bounding":
        return NormBounding(max_norm=config.max_norm, server_learning_rate=rate)
    if config.name == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, server_learning_rate=rate)
    if config.name in _FEDOPT_RULES:
        return FedOpt(
            rule=_FEDOPT_RULES[config.name],
            server_learning_rate=rate,
            beta1=config.beta1,
            beta2=config.beta2,
            tau=config.tau,
        )
    if config.name == "scaffold":
        return Scaffold(num_nodes=num_nodes if num_nodes is not None else num_sampled, server_learning_rate=rate)
    if config.name == "cyclic":
        return Cyclic(server_learning_rate=rate)
    if config.name == "fedbn":
        return FedAvg(server_learning_rate=rate)  # local tensors are averaged too, and ignored by the sites
    if config.name == "fednova":
        return FedNova(server_learning_rate=rate)
    if config.name == "ditto":
        return Ditto(ditto_lambda=config.ditto_lambda, server_learning_rate=rate)
    raise AssertionError(f"unhandled strategy {config.name!r}")  # the plan's Literal forbids it
