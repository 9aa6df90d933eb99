"""Membership inference audit of a trained run: does the model give away who trained it?

Two attacks are run at every site of a finished run directory. *Members* are
the site's training records (the ones the federated model was trained on);
*non-members* are the site's test records (its validation records when
``plan.dataset.validation_fraction > 0``), which the model never trained on.

``loss_threshold``
    Yeom et al. (2018): score each record by minus its loss under the model;
    members tend to have lower loss.
``lira``
    The online likelihood-ratio attack of Carlini et al. (2022). Each shadow
    model replays the run as a federation: the same rounds and sites per
    round, the plan's task, local recipe and strategy, but every site trains
    on a random half of its members and non-members, so that every record is
    in the training set of half of the shadows. For each record the
    logit-scaled confidence of its true label, ``phi = log(p / (1 - p))``, is
    collected under the shadows that trained on it (IN) and those that did not
    (OUT); Gaussians fitted to both give a likelihood ratio for the target
    model's ``phi``.

Each attack is summarised by its ROC AUC (0.5: no better than guessing) and
its true-positive rate at 1% and 0.1% false-positive rate.

The audit runs where the data is: it reads every site's records, so it is a
tool for a data owner or a simulation, not something the coordinator can run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedcare.data.catalog import DatasetCatalog
from fedcare.errors import ConfigError, DataError, ProtocolError
from fedcare.federation.rundir import atomic_write
from fedcare.params import Parameters
from fedcare.plan import Plan, load_plan
from fedcare.tasks.base import DataSpec, SiteData, Split
from fedcare.tasks.registry import TaskRegistry
from fedcare.tasks.torch_task import TorchClassificationTask

if TYPE_CHECKING:
    import torch

__all__ = [
    "AUDIT_FILENAME",
    "PER_EXAMPLE_VARIANCE_MIN_SHADOWS",
    "AttackResult",
    "NormalizationSource",
    "PrivacyAudit",
    "SiteAudit",
    "attack_result",
    "audit_run",
    "lira_scores",
    "logit_confidence",
]

logger = logging.getLogger(__name__)

#: Name of the report :func:`audit_run` writes into the run directory.
AUDIT_FILENAME = "privacy_audit.json"

#: From this many shadow models on, LiRA fits a variance per record; below it one
#: global variance per arm (IN, OUT), as Carlini et al. recommend for few shadows.
PER_EXAMPLE_VARIANCE_MIN_SHADOWS = 64

#: Where the audit's feature standardization came from: the plan's ``none`` or ``per-site``;
#: for ``federated``, statistics the run recorded, recomputed from the sites' training
#: features as the coordinator combines them, or recomputed without the differential privacy
#: noise the run's released statistics carried (then the features only approximate the run's).
NormalizationSource = Literal["none", "per-site", "recorded", "recomputed", "recomputed-without-noise"]

_VARIANCE_FLOOR = 1e-8
_ATTACKS = ("loss_threshold", "lira")


@dataclass(frozen=True)
class AttackResult:
    """How well one attack tells a site's members from its non-members.

    Attributes
    ----------
    auc : float
        ROC AUC of the attack's scores, members as positives; 0.5 is chance,
        1.0 a perfect attack. NaN if the site has no members or no non-members.
    tpr_at_1pct_fpr : float
        Fraction of members caught while at most 1% of non-members are
        flagged, linearly interpolated between the ROC curve's points. Read at
        ``max(0.01, min_fpr)``.
    tpr_at_0_1pct_fpr : float
        The same at 0.1% false-positive rate, read at ``max(0.001, min_fpr)``.
    min_fpr : float
        The smallest non-zero false-positive rate the site's non-members can
        resolve, ``1 / non_members``. Where it exceeds 0.01 or 0.001, that
        rate is below the resolution and the TPR reported for it is the TPR
        at ``min_fpr``.

    Examples
    --------
    >>> AttackResult(auc=0.5, tpr_at_1pct_fpr=0.01, tpr_at_0_1pct_fpr=0.0, min_fpr=0.01).to_dict()["auc"]
    0.5
    """

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    min_fpr: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-able form (NaN becomes ``None``)."""
        return {
            "auc": _finite_or_none(self.auc),
            "tpr_at_1pct_fpr": _finite_or_none(self.tpr_at_1pct_fpr),
            "tpr_at_0_1pct_fpr": _finite_or_none(self.tpr_at_0_1pct_fpr),
            "min_fpr": _finite_or_none(self.min_fpr),
        }


@dataclass(frozen=True)
class SiteAudit:
    """Both attacks at one site.

    Attributes
    ----------
    site : str
        The site's name.
    members : int
        Training records of the site (the model trained on them).
    non_members : int
        Test (or validation) records of the site.
    rounds_trained : int
        Rounds in which the site trained the federated model; each shadow
        model gets as many calls to the task's ``train``.
    loss_threshold : AttackResult
        The loss-threshold attack (Yeom et al. 2018).
    lira : AttackResult
        The online likelihood-ratio attack (Carlini et al. 2022).

    Examples
    --------
    >>> chance = AttackResult(auc=0.5, tpr_at_1pct_fpr=0.01, tpr_at_0_1pct_fpr=0.001, min_fpr=0.001)
    >>> SiteAudit(site="a", members=10, non_members=5, rounds_trained=1,
    ...           loss_threshold=chance, lira=chance).to_dict()["members"]
    10
    """

    site: str
    members: int
    non_members: int
    rounds_trained: int
    loss_threshold: AttackResult
    lira: AttackResult

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "members": self.members,
            "non_members": self.non_members,
            "rounds_trained": self.rounds_trained,
            "loss_threshold": self.loss_threshold.to_dict(),
            "lira": self.lira.to_dict(),
        }


@dataclass(frozen=True)
class PrivacyAudit:
    """The membership inference audit of one run.

    Attributes
    ----------
    task : str
        The plan's task.
    dataset : str
        The plan's dataset.
    shadow_models : int
        Shadow models trained per site for LiRA.
    seed : int
        Seed of the shadow models' data halves, initial weights and batches.
    normalization : NormalizationSource
        Where the feature standardization the attacks used came from.
    sites : Mapping[str, SiteAudit]
        Each site's result, in the coordinator's order (sorted names).
    wall_s : float
        Seconds the audit took.

    Examples
    --------
    >>> chance = AttackResult(auc=0.5, tpr_at_1pct_fpr=0.01, tpr_at_0_1pct_fpr=0.001, min_fpr=0.001)
    >>> site = SiteAudit(site="a", members=10, non_members=5, rounds_trained=1,
    ...                  loss_threshold=chance, lira=chance)
    >>> audit = PrivacyAudit(task="tabular-logistic", dataset="heart-disease", shadow_models=8,
    ...                      seed=0, normalization="recomputed", sites={"a": site}, wall_s=1.0)
    >>> audit.mean_auc()
    {'loss_threshold': 0.5, 'lira': 0.5}
    """

    task: str
    dataset: str
    shadow_models: int
    seed: int
    normalization: NormalizationSource
    sites: Mapping[str, SiteAudit]
    wall_s: float

    def mean_auc(self) -> dict[str, float]:
        """Each attack's AUC averaged over the sites that have one (NaN if none)."""
        means = {}
        for attack in _ATTACKS:
            values = [getattr(site, attack).auc for site in self.sites.values()]
            finite = [v for v in values if math.isfinite(v)]
            means[attack] = float(np.mean(finite)) if finite else math.nan
        return means

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as written to ``privacy_audit.json``."""
        return {
            "task": self.task,
            "dataset": self.dataset,
            "shadow_models": self.shadow_models,
            "seed": self.seed,
            "normalization": self.normalization,
            "sites": {name: site.to_dict() for name, site in self.sites.items()},
            "mean_auc": {k: _finite_or_none(v) for k, v in self.mean_auc().items()},
            "wall_s": self.wall_s,
        }


# -- pure kernels ---------------------------------------------------------------


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logit-scaled confidence of the true label and the cross-entropy loss, per record.

    ``phi = log(p / (1 - p))`` with ``p`` the softmax probability of the true
    label, computed in log space (``logit_y - logsumexp(other logits)``), so it
    stays finite where ``p`` rounds to 0 or 1 and needs no clamping.

    Parameters
    ----------
    logits : numpy.ndarray
        ``(n, classes)`` logits, or ``(n,)`` / ``(n, 1)`` for a binary model
        whose one output is the logit of class 1.
    labels : numpy.ndarray
        ``(n,)`` integer labels.

    Returns
    -------
    phi : numpy.ndarray
        ``(n,)`` float64 logit-scaled confidences.
    loss : numpy.ndarray
        ``(n,)`` float64 cross-entropy losses, in nats.

    Examples
    --------
    >>> phi, loss = logit_confidence(np.array([2.0, -1.0]), np.array([1, 1]))
    >>> phi.tolist(), [round(v, 4) for v in loss.tolist()]
    ([2.0, -1.0], [0.1269, 1.3133])
    """
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1):
        values = values.reshape(-1, 1)
        values = np.concatenate([np.zeros_like(values), values], axis=1)
    rows = np.arange(values.shape[0])
    labels = np.asarray(labels, dtype=np.int64)
    true = values[rows, labels]
    others = values.copy()
    others[rows, labels] = -np.inf
    phi = true - _logsumexp(others)
    loss = _logsumexp(values) - true
    return phi, loss


def lira_scores(
    target_phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray, *, per_example_variance: bool
) -> np.ndarray:
    """Online LiRA: log likelihood ratio of each record's target ``phi`` under IN vs OUT Gaussians.

    Parameters
    ----------
    target_phi : numpy.ndarray
        ``(n,)`` logit-scaled confidences under the target model.
    shadow_phi : numpy.ndarray
        ``(shadows, n)`` the same under each shadow model.
    shadow_in : numpy.ndarray
        ``(shadows, n)`` booleans: whether the shadow trained on the record.
        Every record needs at least one IN and one OUT shadow.
    per_example_variance : bool
        Fit a variance per record and arm; otherwise one pooled within-record
        variance per arm (IN, OUT), which is steadier with few shadows. An arm
        with a single observation per record falls back to the variance of all
        its values.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` scores; larger means more likely a member.

    Raises
    ------
    ConfigError
        If some record has no IN or no OUT shadow.

    Examples
    --------
    >>> shadow_phi = np.array([[3.0, 0.0], [2.0, 1.0], [0.0, 3.0], [1.0, 2.0]])
    >>> shadow_in = np.array([[True, False], [True, False], [False, True], [False, True]])
    >>> scores = lira_scores(np.array([2.5, 0.5]), shadow_phi, shadow_in, per_example_variance=False)
    >>> bool(scores[0] > 0 > scores[1])
    True
    """
    phi = np.asarray(shadow_phi, dtype=np.float64)
    keep = np.asarray(shadow_in, dtype=bool)
    counts_in = keep.sum(axis=0)
    counts_out = (~keep).sum(axis=0)
    if (counts_in == 0).any() or (counts_out == 0).any():
        raise ConfigError(
            "every record needs at least one IN and one OUT shadow model; use at least 2 shadow models",
            field="shadow_in",
        )
    target = np.asarray(target_phi, dtype=np.float64)
    log_in = _gaussian_log_pdf(target, *_arm_moments(phi, keep, counts_in, per_example_variance))
    log_out = _gaussian_log_pdf(target, *_arm_moments(phi, ~keep, counts_out, per_example_variance))
    return np.asarray(log_in - log_out)


def attack_result(scores: np.ndarray, is_member: np.ndarray) -> AttackResult:
    """ROC AUC and TPR at 1% and 0.1% FPR of membership scores (larger: more likely a member).

    Parameters
    ----------
    scores : numpy.ndarray
        ``(n,)`` attack scores.
    is_member : numpy.ndarray
        ``(n,)`` booleans, True for members.

    Returns
    -------
    AttackResult
        All NaN but ``min_fpr`` if either class is empty.

    Examples
    --------
    >>> result = attack_result(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, True, False, False]))
    >>> result.auc, result.tpr_at_1pct_fpr, result.min_fpr
    (1.0, 1.0, 0.5)
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    member = np.asarray(is_member, dtype=bool)
    non_members = int((~member).sum())
    min_fpr = 1.0 / non_members if non_members else math.nan
    if non_members == 0 or not member.any():
        return AttackResult(auc=math.nan, tpr_at_1pct_fpr=math.nan, tpr_at_0_1pct_fpr=math.nan, min_fpr=min_fpr)
    values = np.asarray(scores, dtype=np.float64)
    fpr, tpr, _ = roc_curve(member, values, drop_intermediate=False)
    return AttackResult(
        auc=float(roc_auc_score(member, values)),
        tpr_at_1pct_fpr=_tpr_at(fpr, tpr, max(0.01, min_fpr)),
        tpr_at_0_1pct_fpr=_tpr_at(fpr, tpr, max(0.001, min_fpr)),
        min_fpr=min_fpr,
    )


# -- the audit --------------------------------------------------------------------


def audit_run(
    run_dir: str | Path,
    *,
    shadow_models: int = 16,
    seed: int = 0,
    catalog: DatasetCatalog | None = None,
    registry: TaskRegistry | None = None,
) -> PrivacyAudit:
    """Run both membership inference attacks against a run's final model, at every site.

    Reads ``plan.yaml`` and ``model.safetensors`` from the run directory,
    loads each admitted site's data and prepares its features exactly as the
    nodes did (``plan.dataset.normalization``; federated statistics are the
    ones the run recorded, if it did, or else recomputed from the sites'
    training features as the coordinator combines them and checked against
    the row count the run logged). Then, per site:
    the loss-threshold attack on the target model, and LiRA with
    ``shadow_models`` shadow federations that replay the run (its rounds, the
    sites selected in each, the plan's task, ``plan.local`` recipe and
    strategy) with every site training on a random half of its members and
    non-members; each record is IN for half of the shadows. Secure
    aggregation's per-coordinate clip is replayed, differential privacy noise
    is not. Writes ``privacy_audit.json`` into the run directory (atomically).

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by ``fedcare simulate`` (or a deployed run's
        coordinator, if the data is available here).
    shadow_models : int
        Shadow federations, at least 2; each serves every site. More shadows
        give a sharper LiRA; from 64 on it fits a variance per record. Time
        grows linearly: each costs about half the local training of the run.
    seed : int
        Seeds the shadows' data halves, initial weights and batch order.
    catalog : DatasetCatalog, optional
        Datasets; defaults to the bundled ones.
    registry : TaskRegistry, optional
        Installed tasks; defaults to the ``fedcare.tasks`` entry points.

    Returns
    -------
    PrivacyAudit

    Raises
    ------
    ConfigError
        If ``shadow_models`` is below 2, ``seed`` is negative, the plan is
        invalid, or its task does not expose a PyTorch classifier (the attacks
        need per-record outputs).
    DataError
        If the run directory lacks ``plan.yaml`` or ``model.safetensors``, the
        model does not fit the plan's task, or the sites' data is not the data
        the run trained on.

    Examples
    --------
    >>> import tempfile
    >>> from fedcare.plan import parse_plan
    >>> from fedcare.simulation import simulate
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 1,
    ...                    "dataset": {"name": "breast-cancer", "num_nodes": 2}})
    >>> run = tempfile.mkdtemp()
    >>> _ = simulate(plan, out_dir=run)
    >>> audit = audit_run(run, shadow_models=2)
    >>> sorted(audit.sites), 0.0 <= audit.sites["site-0"].lira.auc <= 1.0
    (['site-0', 'site-1'], True)
    >>> audit_run(run, shadow_models=1)
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: shadow_models: must be at least 2 (LiRA needs shadows with and without each record), got 1
    """
    started = time.perf_counter()
    if isinstance(shadow_models, bool) or not isinstance(shadow_models, int) or shadow_models < 2:
        raise ConfigError(
            f"must be at least 2 (LiRA needs shadows with and without each record), got {shadow_models!r}",
            field="shadow_models",
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"must be a non-negative integer, got {seed!r}", field="seed")
    path = Path(run_dir)
    plan_path, model_path = path / "plan.yaml", path / "model.safetensors"
    missing = [p.name for p in (plan_path, model_path) if not p.is_file()]
    if missing:
        raise DataError(
            f"run directory {path.name!r} has no {' and no '.join(missing)}; "
            "run `fedcare simulate PLAN --out RUN` first, then audit RUN",
            field="run_dir",
        )
    plan = load_plan(plan_path)
    registry = registry or TaskRegistry.from_entry_points()
    catalog = catalog or DatasetCatalog.bundled()
    task = registry.get(plan.task)
    if not isinstance(task, TorchClassificationTask):
        raise ConfigError(
            f"task {plan.task!r} is not a PyTorch classifier; the audit needs each record's outputs",
            field="plan.task",
        )
    dataset = catalog.get(plan.dataset.name)
    spec = dataset.spec(plan.dataset)
    events = _events(path / "metrics.jsonl")
    sites, normalization = _prepared_sites(
        dataset.load_sites(plan.dataset),
        plan,
        card=_read_json(path / "model_card.json"),
        events=events,
        checkpoint=_read_json(path / "checkpoints" / "latest.json"),
    )
    target = _load_target(task, spec, plan, model_path)
    schedule = _round_schedule(events, plan, list(sites))
    logger.info("privacy audit started", extra={"sites": len(sites), "shadow_models": shadow_models})

    candidates: dict[str, Split] = {}
    shadow_in: dict[str, np.ndarray] = {}
    for index, (name, data) in enumerate(sites.items()):
        candidates[name] = Split(
            x=np.concatenate([data.train.x, data.test.x]), y=np.concatenate([data.train.y, data.test.y])
        )
        # Each record is IN for exactly half of the shadows (Carlini et al.'s balanced halves).
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0, index]))
        order = rng.random((shadow_models, len(candidates[name]))).argsort(axis=0)
        shadow_in[name] = order < shadow_models // 2
    # Shadows train in one worker thread, as the in-process transport's nodes do, so that its
    # thread setting stays out of the caller's thread; one worker keeps torch's global
    # generator, seeded per shadow, reproducible.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcare-audit") as worker:
        shadow_phi = worker.submit(
            _shadow_federations, task, spec, plan, candidates, shadow_in, schedule=schedule, seed=seed
        ).result()

    results: dict[str, SiteAudit] = {}
    per_example_variance = shadow_models >= PER_EXAMPLE_VARIANCE_MIN_SHADOWS
    for name, data in sites.items():
        is_member = np.zeros(len(candidates[name]), dtype=bool)
        is_member[: len(data.train)] = True
        target_phi, target_loss = logit_confidence(_logits(target, candidates[name].x), candidates[name].y)
        scores = lira_scores(target_phi, shadow_phi[name], shadow_in[name], per_example_variance=per_example_variance)
        results[name] = SiteAudit(
            site=name,
            members=len(data.train),
            non_members=len(data.test),
            rounds_trained=sum(name in selected for selected in schedule),
            loss_threshold=attack_result(-target_loss, is_member),
            lira=attack_result(scores, is_member),
        )
        logger.info(
            "site audited",
            extra={"node_id": name, "members": len(data.train), "non_members": len(data.test)},
        )
    audit = PrivacyAudit(
        task=plan.task,
        dataset=plan.dataset.name,
        shadow_models=shadow_models,
        seed=seed,
        normalization=normalization,
        sites=results,
        wall_s=time.perf_counter() - started,
    )
    atomic_write(path / AUDIT_FILENAME, json.dumps(audit.to_dict(), indent=2).encode())
    logger.info("privacy audit finished", extra={"sites": len(results)})
    return audit


def _shadow_federations(
    task: TorchClassificationTask,
    spec: DataSpec,
    plan: Plan,
    candidates: Mapping[str, Split],
    shadow_in: Mapping[str, np.ndarray],
    *,
    schedule: list[list[str]],
    seed: int,
) -> dict[str, np.ndarray]:
    """Each site's ``(shadows, records)`` confidences under shadow federations.

    Shadow ``m`` replays the run: the same rounds, the same sites per round,
    the plan's task, local recipe and strategy, but each site trains on its
    records with ``shadow_in[site][m]`` set (secure aggregation's
    per-coordinate clip and weights are applied; quantization and
    differential privacy noise are not).
    """
    import torch

    halves = {
        name: [Split(x=split.x[keep], y=split.y[keep]) for keep in (np.flatnonzero(row) for row in shadow_in[name])]
        for name, split in candidates.items()
    }
    shadow_phi = {name: np.empty(shadow_in[name].shape, dtype=np.float64) for name in candidates}
    # Models this small train several times faster on one intra-op thread: a parallel region
    # costs more than the work it splits, and far more on a busy machine (measured 6 ms instead
    # of 0.3 ms a step on 2 shared cores). Set in this worker thread, restored before returning.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in range(len(next(iter(shadow_in.values())))):
            training = {name: parts[m] for name, parts in halves.items()}
            model = _replay_run(task, spec, plan, training, schedule=schedule, seed=seed, shadow=m)
            for name, split in candidates.items():
                shadow_phi[name][m], _ = logit_confidence(_logits(model, split.x), split.y)
    finally:
        torch.set_num_threads(previous_threads)
    return shadow_phi


def _replay_run(
    task: TorchClassificationTask,
    spec: DataSpec,
    plan: Plan,
    training: Mapping[str, Split],
    *,
    schedule: list[list[str]],
    seed: int,
    shadow: int,
) -> Any:
    """One shadow federation: FedAvg over the run's rounds with each site training on ``training[site]``."""
    import torch

    from fedcare.strategies import make_strategy

    names = list(training)
    secure = plan.secure_aggregation
    strategy = make_strategy(plan.strategy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, 1, shadow))  # initial weights, dropout
        model = task.build_model(spec, plan)
        global_parameters = task.get_parameters(model)
        for round_number, selected in enumerate(schedule, 1):
            strategy.begin_round(round_number, global_parameters)
            accumulated = False
            for name in selected:
                split = training[name]
                if len(split) == 0:
                    continue
                task.set_parameters(model, global_parameters)
                task.train(model, split, plan, seed=_seed(seed, 2, shadow, round_number, names.index(name)))
                update = task.get_parameters(model).flatten()
                np.subtract(update, global_parameters.flatten(), out=update)
                weight = float(len(split))
                if secure.enabled:
                    np.clip(update, -secure.clip, secure.clip, out=update)
                    weight = min(weight, secure.max_examples) / secure.max_examples
                strategy.accumulate(Parameters.from_flat(update, global_parameters.spec), weight=weight, node_id=name)
                accumulated = True
            if accumulated:
                global_parameters = strategy.finalize()
        task.set_parameters(model, global_parameters)
    return model


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def _logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        output: torch.Tensor = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return np.asarray(output.numpy(), dtype=np.float64).reshape(len(x), -1)


def _load_target(task: TorchClassificationTask, spec: DataSpec, plan: Plan, model_path: Path) -> Any:
    try:
        parameters = Parameters.from_bytes(model_path.read_bytes())
        model = task.build_model(spec, plan)
        task.set_parameters(model, parameters)
    except (OSError, ProtocolError) as exc:
        message = exc.message if isinstance(exc, ProtocolError) else (exc.strerror or type(exc).__name__)
        raise DataError(
            f"model.safetensors cannot be loaded into task {plan.task!r}: {message}", field="run_dir"
        ) from exc
    return model


def _prepared_sites(
    sites: dict[str, SiteData], plan: Plan, *, card: Any, events: list[dict[str, Any]], checkpoint: Any
) -> tuple[dict[str, SiteData], NormalizationSource]:
    """The admitted sites (sorted, as the coordinator orders them), standardized as the nodes did."""
    from fedcare.baselines import normalize_sites
    from fedcare.data.normalization import Standardization

    names = sorted(plan.nodes) if plan.nodes is not None else sorted(sites)
    unknown = [name for name in names if name not in sites]
    if unknown:
        raise DataError(
            f"the run trained sites {', '.join(unknown)}, which the dataset {plan.dataset.name!r} does not have",
            field="plan.nodes",
        )
    selected = {name: sites[name] for name in names}
    recorded = card.get("train_examples") if isinstance(card, dict) else None
    for name, data in selected.items():
        if isinstance(recorded, dict) and name in recorded and int(recorded[name]) != len(data.train):
            raise DataError(
                f"the run trained on {recorded[name]} records, the dataset now gives {len(data.train)}; "
                "audit with the data the run used",
                node_id=name,
                field="train_examples",
            )
    mode = plan.dataset.normalization
    if mode != "federated":
        return normalize_sites(selected, mode=mode), mode
    statistics = checkpoint.get("normalization") if isinstance(checkpoint, dict) else None
    if isinstance(statistics, dict):
        spec = next(iter(selected.values())).spec
        try:
            standardization = Standardization.from_config(statistics, num_features=spec.num_features)
        except ProtocolError as exc:
            raise DataError(f"the run's recorded normalization is unusable: {exc.message}", field="run_dir") from exc
        return {name: standardization.apply_site(data) for name, data in selected.items()}, "recorded"
    # A run that did not record its statistics logged only the row count behind them: recompute
    # them as the coordinator combined them. With noisy (differentially private) statistics that
    # count is noisy too, and the noise-free recomputation only approximates what the model saw.
    privacy = card.get("privacy") if isinstance(card, dict) else None
    dp = privacy.get("differential_privacy") if isinstance(privacy, dict) else None
    record_level = dp.get("record_level") if isinstance(dp, dict) else None
    if isinstance(record_level, dict):  # record-level DP released the statistics with noise
        logger.warning("normalization recomputed without the run's noise; features only approximate the run's")
        return normalize_sites(selected, mode=mode), "recomputed-without-noise"
    logged = [e for e in events if e.get("event") == "normalization"]
    rows = sum(len(data.train) for data in selected.values())
    if logged and int(logged[-1].get("num_examples", rows)) != rows:
        raise DataError(
            f"the run's federated normalization covered {logged[-1]['num_examples']} training records, "
            f"the sites now hold {rows}; the audit cannot reproduce the features the model saw",
            field="plan.dataset.normalization",
        )
    return normalize_sites(selected, mode=mode), "recomputed"


def _round_schedule(events: list[dict[str, Any]], plan: Plan, sites: list[str]) -> list[list[str]]:
    """The sites that trained in each round, from the run's events.

    Without events, the coordinator's own selection for ``plan.rounds`` rounds
    with every admitted site available.
    """
    logged: dict[int, list[str]] = {}
    for event in events:
        if event.get("event") == "round_start":
            # A resumed run may log a round twice; its selection is the same (seeded by round).
            logged[int(event["round"])] = [site for site in event.get("nodes", ()) if site in sites]
    if logged:
        return [logged[r] for r in sorted(logged)]
    count = min(plan.nodes_per_round or len(sites), len(sites))
    return [
        [sites[i] for i in sorted(np.random.default_rng([plan.seed, r]).choice(len(sites), count, replace=False))]
        for r in range(1, plan.rounds + 1)
    ]


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash: the rest of the log still counts
            if isinstance(event, dict):
                events.append(event)
    return events


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path.name} is not valid JSON: {exc}", field="run_dir") from exc


# -- numeric helpers ------------------------------------------------------------------


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=1)
    with np.errstate(invalid="ignore"):
        shifted = np.exp(values - top[:, None])
    return np.asarray(top + np.log(shifted.sum(axis=1)))


def _arm_moments(
    phi: np.ndarray, mask: np.ndarray, counts: np.ndarray, per_example_variance: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-record mean and variance of ``phi`` over the shadows in ``mask``."""
    total = np.where(mask, phi, 0.0).sum(axis=0)
    mean = total / counts
    squares = np.where(mask, (phi - mean) ** 2, 0.0).sum(axis=0)
    if per_example_variance:
        variance = squares / np.maximum(counts - 1, 1)
    else:
        dof = int(counts.sum() - counts.size)
        pooled = squares.sum() / dof if dof > 0 else float(np.var(phi[mask]))
        variance = np.full_like(mean, pooled)
    return mean, np.maximum(variance, _VARIANCE_FLOOR)


def _gaussian_log_pdf(x: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return np.asarray(-0.5 * (x - mean) ** 2 / variance - 0.5 * np.log(2 * np.pi * variance))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at ``target`` FPR, interpolating linearly between the ROC curve's operating points."""
    below = int(np.searchsorted(fpr, target, side="right")) - 1  # last point with fpr <= target
    if below >= len(fpr) - 1 or fpr[below] >= target:
        return float(tpr[below])
    step = (target - fpr[below]) / (fpr[below + 1] - fpr[below])
    return float(tpr[below] + step * (tpr[below + 1] - tpr[below]))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
