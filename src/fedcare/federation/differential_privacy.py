"""Record-level differential privacy at a site: noise, budget checks and the ledger.

With ``plan.privacy.record_level.enabled`` every site trains with DP-SGD
(:class:`~fedcare.privacy.dp.dpsgd.DPSGD`) and, with federated normalization,
releases its feature statistics through the Gaussian mechanism. Before each
release the site checks its ledger: work that would take the dataset past the
site's lifetime budget is refused with
:class:`~fedcare.errors.BudgetExceeded`, before any training. After each
release the ledger records it, so what was spent survives a crash.

The noise multiplier of a run is the plan's, or the smallest one with which
the feature statistics and all the planned rounds together stay within the
plan's epsilon, for this site's number of records.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedcare.data.normalization import FeatureStats, private_feature_stats
from fedcare.errors import ConfigError
from fedcare.federation.policy import NodePolicy, PrivacyBudget
from fedcare.plan import Plan
from fedcare.privacy.dp.accountant import Mechanism, noise_multiplier_for
from fedcare.privacy.dp.dpsgd import DPSGD, round_mechanism
from fedcare.privacy.dp.ledger import PrivacyLedger
from fedcare.tasks.base import DataSpec

__all__ = ["NodePrivacy", "ledger_file"]

logger = logging.getLogger(__name__)

_STATS_ROUND = 0  # the feature statistics are released before round 1


def ledger_file(ledger_dir: Path, dataset: str) -> Path:
    """Where a site keeps the ledger of one dataset.

    Examples
    --------
    >>> ledger_file(Path("/var/lib/fedcare"), "heart-disease").name
    'heart-disease.ledger.json'
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
    return ledger_dir / f"{safe}.ledger.json"


class NodePrivacy:
    """One site's record-level DP for one plan: derives the noise, checks and records the budget.

    Parameters
    ----------
    plan : Plan
        The approved plan (``privacy.record_level`` enabled).
    policy : NodePolicy
        The site's budget per dataset; a dataset it does not list gets the
        plan's epsilon and delta.
    ledger_dir : Path
        Where the site's ledgers live (one file per dataset, kept across runs).
    num_examples : int
        Records the site trains on.
    spec : DataSpec
        The dataset schema (public feature bounds for the statistics).
    secure_noise : bool
        Draw noise seeds from the operating system (deployments). ``False``
        derives them from the job seeds, so a simulated study can be repeated.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        policy: NodePolicy,
        ledger_dir: Path,
        num_examples: int,
        spec: DataSpec,
        secure_noise: bool = True,
    ) -> None:
        settings = plan.privacy.record_level
        self.plan = plan
        self.settings = settings
        self.num_examples = num_examples
        self.spec = spec
        self.secure_noise = secure_noise
        dataset = plan.dataset.name
        budget = policy.privacy.get(dataset) or PrivacyBudget(
            epsilon=settings.epsilon, delta=settings.delta, accountant=settings.accountant
        )
        self.ledger = PrivacyLedger(
            ledger_file(ledger_dir, dataset),
            dataset=dataset,
            epsilon_budget=budget.epsilon,
            delta=budget.delta,
            accountant=budget.accountant,
        )
        self._noise_multiplier: float | None = settings.noise_multiplier
        self._spent: float | None = None
        self._lock = threading.Lock()

    @property
    def releases_feature_stats(self) -> bool:
        """Whether this plan releases feature statistics (federated normalization)."""
        return self.plan.dataset.normalization == "federated"

    def stats_mechanism(self) -> Mechanism:
        """The Gaussian mechanism of the feature statistics release.

        Its noise multiplier is the plan's, or the one with which the release
        alone spends ``feature_stats_epsilon_share`` of the run's epsilon.
        """
        settings = self.settings
        noise_multiplier = settings.feature_stats_noise_multiplier or _derived_noise_multiplier(
            epsilon=settings.feature_stats_epsilon_share * settings.epsilon,
            delta=settings.delta,
            sample_rate=1.0,
            steps=1,
            accountant=settings.accountant,
            prior=(),
        )
        return Mechanism(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, label="feature-stats")

    def noise_multiplier(self) -> float:
        """The run's DP-SGD noise multiplier (derived once, then kept).

        Raises
        ------
        BudgetExceeded
            If no noise multiplier fits the plan's epsilon.
        """
        with self._lock:
            if self._noise_multiplier is None:
                planned = round_mechanism(self.num_examples, self.plan.local, noise_multiplier=1.0)
                self._noise_multiplier = _derived_noise_multiplier(
                    epsilon=self.settings.epsilon,
                    delta=self.settings.delta,
                    sample_rate=planned.sample_rate,
                    steps=planned.steps * self.plan.rounds,
                    accountant=self.settings.accountant,
                    prior=(self.stats_mechanism(),) if self.releases_feature_stats else (),
                )
            return self._noise_multiplier

    def training_hook(self, *, run_id: str, round_number: int, seed: int) -> tuple[DPSGD, Mechanism]:
        """Check the budget for one round; return its DP-SGD hook and mechanism.

        Raises
        ------
        BudgetExceeded
            If the round would take the site past its budget; nothing is trained.
        """
        mechanism = round_mechanism(self.num_examples, self.plan.local, noise_multiplier=self.noise_multiplier())
        self.ledger.check([mechanism])
        hook = DPSGD(
            noise_multiplier=mechanism.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            noise_seed=None if self.secure_noise else _noise_seed("dp-sgd", round_number, seed),
        )
        return hook, mechanism

    def record(self, mechanism: Mechanism, *, run_id: str, round_number: int) -> float:
        """Write one release into the ledger; return the epsilon spent on the dataset so far."""
        spent = self.ledger.record([mechanism], run_id=run_id, round=round_number)
        self._spent = spent
        logger.info("privacy spent", extra={"round": round_number, "epsilon": spent})
        return spent

    def feature_stats(self, x: np.ndarray, *, run_id: str, node_id: str) -> tuple[FeatureStats, float]:
        """Release the training features' count, sums and sums of squares with noise, and record it.

        Raises
        ------
        ConfigError
            If the dataset has no public feature bounds.
        BudgetExceeded
            If the release would take the site past its budget.
        """
        if len(self.spec.feature_bounds) != self.spec.channels:
            raise ConfigError(
                "federated normalization with record-level DP needs public bounds for every feature, and this "
                "dataset declares none; use normalization: none or per-site",
                field="plan.dataset.normalization",
            )
        mechanism = self.stats_mechanism()
        self.ledger.check([mechanism])
        seed = None if self.secure_noise else _noise_seed(f"feature-stats\x00{node_id}", _STATS_ROUND, self.plan.seed)
        rng = np.random.default_rng(seed)  # None: fresh entropy from the OS
        stats = private_feature_stats(
            x, bounds=self.spec.feature_bounds, noise_multiplier=mechanism.noise_multiplier, rng=rng
        )
        return stats, self.record(mechanism, run_id=run_id, round_number=_STATS_ROUND)

    def summary(self) -> Mapping[str, float]:
        """Numbers safe to report: epsilon spent on the dataset, the budget and the noise multiplier."""
        return {
            "dp_epsilon": self.ledger.spent() if self._spent is None else self._spent,
            "dp_epsilon_budget": self.ledger.epsilon_budget,
            "dp_noise_multiplier": self.noise_multiplier(),
        }


@functools.lru_cache(maxsize=256)
def _derived_noise_multiplier(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, prior: tuple[Mechanism, ...]
) -> float:
    """:func:`noise_multiplier_for`, memoized: a pure function that takes seconds with PLD."""
    return noise_multiplier_for(
        epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant, prior=prior
    )


def _noise_seed(label: str, round_number: int, seed: int) -> int:
    """A reproducible noise seed for simulations (deployments draw from the OS instead)."""
    digest = hashlib.sha256(f"fedcare-dp\x00{label}\x00{round_number}\x00{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
