"""The federation plan: a declarative description of one training run.

A plan names a registered task and dataset, the strategy and the training
recipe. It carries no code: every site runs only tasks installed locally.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from fedcare.errors import ConfigError

__all__ = [
    "ApprovalConfig",
    "DatasetConfig",
    "EvaluationConfig",
    "LocalTraining",
    "ModelConfig",
    "Plan",
    "PrivacyConfig",
    "PrivacyWarning",
    "RecordLevelPrivacy",
    "SecureAggregationConfig",
    "SiteLevelPrivacy",
    "StrategyConfig",
    "TrackingConfig",
    "load_plan",
    "parse_plan",
    "plan_hash",
    "read_yaml",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    """Which data each site trains on and how features are prepared.

    Attributes
    ----------
    name : str
        A dataset known to the sites (``fedcare datasets`` lists the bundled ones).
    normalization : {"federated", "per-site", "none"}
        ``federated`` standardizes every site with a global mean and standard
        deviation computed by the coordinator from each site's counts, sums and
        sums of squares; ``per-site`` standardizes each site with its own
        training statistics; ``none`` leaves features as they are.
    num_nodes : int, optional
        For datasets that are split into sites (``breast-cancer``): how many.
    partition : {"iid", "dirichlet"}
        How a split dataset is divided among sites.
    dirichlet_alpha : float
        Concentration of the Dirichlet label skew (smaller is more skewed).
    validation_fraction : float
        When above 0, each site carves this share of its training split off as
        a validation split (stratified), trains on the rest and reports
        evaluation on the validation split. Used to choose hyperparameters
        without looking at the test split.
    labels : tuple of str, optional
        The federation's label vocabulary, by class index. Required for a
        dataset the sites describe in their own manifests (``node.yaml``):
        each site maps its local labels onto these, and a site with local
        labels it has not mapped refuses the plan. For a bundled dataset,
        when given, it must equal the dataset's class names.
    input_shape : tuple of int, optional
        The shape of one example: ``[channels, height, width]`` for images,
        ``[channels, depth, height, width]`` for volumes, ``[features]`` for
        tables. Required for a dataset described by site manifests; every
        site resizes its data to it.
    features : tuple of str, optional
        For a ``csv`` dataset described by site manifests: the feature
        columns, in order.
    """

    name: str
    normalization: Literal["federated", "per-site", "none"] = "federated"
    num_nodes: int | None = Field(default=None, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(default=0.5, gt=0)
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    labels: tuple[Annotated[str, StringConstraints(min_length=1)], ...] | None = Field(default=None, min_length=2)
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(default=None, min_length=1, max_length=4)
    features: tuple[Annotated[str, StringConstraints(min_length=1)], ...] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _vocabulary_distinct(self) -> DatasetConfig:
        for name in ("labels", "features"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                repeated = sorted({v for v in values if values.count(v) > 1})
                raise PydanticCustomError(
                    "duplicate_names", "{field} lists {repeated} twice", {"field": name, "repeated": ", ".join(repeated), "loc": name}
                )
        if self.features is not None and self.input_shape is not None and self.input_shape != (len(self.features),):
            raise PydanticCustomError(
                "features_shape",
                "input_shape {shape} does not match the {count} features listed",
                {"shape": list(self.input_shape), "count": len(self.features), "loc": "input_shape"},
            )
        return self


class LocalTraining(_Section):
    """The recipe each site follows in one round.

    Exactly one of ``epochs`` and ``steps`` is set.

    Attributes
    ----------
    class_weighting : {"none", "balanced"}
        ``balanced`` weights each training example's loss by
        ``n / (classes * n_class)``, from the site's own training labels (as
        scikit-learn's ``class_weight="balanced"``), so a site's majority
        class does not dominate its loss. Not with record-level DP (the
        weights depend on the site's label counts). ``none`` (default): every
        example weighs 1.
    """

    epochs: int | None = Field(default=1, ge=1)
    steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    class_weighting: Literal["none", "balanced"] = "none"
    #: A site's time budget for one round's local training, in seconds: a slow site trains the steps
    #: that fit and reports how many it ran (``fednova`` then weighs unequal steps fairly). A site's
    #: ``node.yaml`` may set a lower budget of its own (``compute.max_local_seconds``). None: no budget.
    max_local_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("steps") is not None and "epochs" not in data:
            data = {**data, "epochs": None}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> LocalTraining:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"set exactly one of epochs and steps, got epochs={self.epochs}, steps={self.steps}")
        return self


#: Built-in imaging tasks whose ``model.norm`` chooses BatchNorm (refused with record-level DP).
_BATCH_NORM_IMAGING_TASKS = frozenset({"image-cnn", "image-resnet18", "volume-cnn3d"})

#: Strategies that must see every update on its own (they cannot run under secure aggregation).
_NEEDS_ALL_UPDATES = frozenset({"median", "trimmed-mean", "krum", "geometric-median"})


class StrategyConfig(_Section):
    """How the coordinator combines site updates.

    Attributes
    ----------
    name : {"fedavg", "median", "trimmed-mean", "krum", "geometric-median", "norm-bounding", \
"fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "cyclic", "fedbn", "fednova", "ditto"}
        ``fedavg``: example-weighted mean. The robust rules (see
        ``docs/robust-aggregation.md``): ``median`` (coordinate-wise),
        ``trimmed-mean``, ``krum`` (Multi-Krum), ``geometric-median`` (RFA) are
        unweighted, keep every update of a round (memory O(model x sites)) and
        cannot run under secure aggregation; ``norm-bounding`` clips each
        update's L2 norm to ``max_norm`` and then averages like FedAvg, streaming.
        For heterogeneous sites (see ``docs/strategies.md``): ``fedprox``
        (FedAvg with a proximal term ``proximal_mu / 2 ||w - w_global||^2`` in
        the sites' loss), ``fedadam``, ``fedyogi`` and ``fedadagrad`` (FedOpt:
        an adaptive server optimizer over the averaged update) and ``scaffold``
        (control variates; models up to 40,000 values, not with secure
        aggregation). ``fedprox`` and ``scaffold`` change the sites' loss and
        cannot be combined with record-level DP. ``cyclic``: one site per round,
        in turn (FLamby's Cyclic); needs ``min_nodes: 1`` and no secure aggregation.
    server_learning_rate : float
        Step size applied to the aggregated update (FedOpt: the server
        optimizer's learning rate, typically 0.01 to 1).
    trim_fraction : float
        ``trimmed-mean``: share of the updates dropped at each end of every coordinate.
    byzantine_nodes : int
        ``krum``: the number of attacking sites to tolerate (needs sites per round > 2 f + 2).
    krum_selected : int, optional
        ``krum``: how many of the best-scored updates are averaged; default sites - f.
    max_norm : float
        ``norm-bounding``: the L2 bound of one update.
    geometric_median_iterations : int
        ``geometric-median``: at most this many Weiszfeld steps per round.
    proximal_mu : float
        ``fedprox``: weight of the proximal term (>= 0; 0 is FedAvg).
    beta1 : float
        FedOpt: decay of the server's first moment (momentum), in [0, 1).
    beta2 : float
        ``fedadam``, ``fedyogi``: decay of the server's second moment, in [0, 1).
    tau : float
        FedOpt: adaptivity (> 0), added to the root of the second moment.
    ditto_lambda : float
        ``ditto``: weight of the proximal term ``lambda / 2 ||v - w_global||^2``
        that ties each site's personal model ``v`` to the global one (>= 0).

    Personalization (see ``docs/strategies.md``): ``fedbn`` (FedAvg whose
    normalization layers stay local at each site), ``fednova`` (FedAvg of
    updates normalized by each site's local steps; not with secure
    aggregation) and ``ditto`` (FedAvg plus a personal model per site).
    """

    name: Literal[
        "fedavg",
        "median",
        "trimmed-mean",
        "krum",
        "geometric-median",
        "norm-bounding",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "scaffold",
        "cyclic",
        "fedbn",
        "fednova",
        "ditto",
    ] = "fedavg"
    server_learning_rate: float = Field(default=1.0, gt=0)
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    byzantine_nodes: int = Field(default=1, ge=0)
    krum_selected: int | None = Field(default=None, ge=1)
    max_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    geometric_median_iterations: int = Field(default=100, ge=1)
    proximal_mu: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    ditto_lambda: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    #: Asynchronous buffered aggregation (FedBuff): see :class:`BufferedAggregation`. None: synchronous rounds.
    buffered: BufferedAggregation | None = None


class BufferedAggregation(_Section):
    """Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022), for sites that cannot all be waited for.

    Sites train all the time, each on the latest global model it was sent;
    the coordinator folds every ``buffer_size`` arrivals into a new global
    model (one "round" of the plan), weighting each update by
    ``1 / (1 + staleness) ** staleness_exponent``, where staleness is how many
    global models were made since the one the site trained on. Updates staler
    than ``max_staleness`` are dropped (and counted). Not with secure
    aggregation, site-level DP, the robust rules, ``cyclic`` or ``scaffold``
    (see ``docs/strategies.md``); the loop is :mod:`fedcare.federation.buffered`.

    Attributes
    ----------
    buffer_size : int
        Arrivals per aggregation, K (>= 1; at most the sites per round).
    max_staleness : int
        The stalest update still used, in global-model versions (>= 0).
    staleness_exponent : float
        The exponent of the staleness weight (>= 0; 0: every update weighs the same; 0.5: FedBuff's choice).
    """

    buffer_size: int = Field(default=2, ge=1)
    max_staleness: int = Field(default=4, ge=0)
    staleness_exponent: float = Field(default=0.5, ge=0, allow_inf_nan=False)


StrategyConfig.model_rebuild()


class CompressionConfig(_Section):
    """How each site compresses its update before upload (see ``docs/compression.md``).

    Compression comes after the privacy transforms (DP noise is added to the
    full update, then compressed) and is undone at the coordinator before
    aggregation.

    Attributes
    ----------
    method : {"none", "float16", "bfloat16", "int8", "topk"}
        ``float16``/``bfloat16``: cast to 16 bits (2x smaller). ``int8``:
        8-bit stochastic quantization with one scale per tensor, the codes
        deflated (4x or more, unbiased). ``topk``: tensors of at most
        ``topk_fraction`` of the model's values (biases, normalization) whole,
        and of the others only the ``topk_fraction`` largest coordinates (by
        magnitude) with their positions; what is left out is kept at the site
        and added to its next update (error feedback).
    topk_fraction : float
        ``topk``: the share of coordinates sent, in (0, 1] (default 0.01: 1 %).
    error_feedback : bool
        ``topk``: keep the coordinates left out at the site and send them later (default true).
    refit_dense : bool, optional
        ``topk``: after local training and the top-k selection, train the
        tensors sent whole (biases, normalization, small heads) once more,
        with the other tensors fixed at what is sent of them, so that they
        fit the model the coordinator will see. It costs a second pass of the
        local schedule. Default (unset): on for ``topk``, except with
        record-level DP, where the second pass would train outside DP-SGD's
        accounting and is refused.
    """

    method: Literal["none", "float16", "bfloat16", "int8", "topk"] = "none"
    topk_fraction: float = Field(default=0.01, gt=0, le=1)
    error_feedback: bool = True
    refit_dense: bool | None = None

    @model_validator(mode="after")
    def _refit_needs_topk(self) -> CompressionConfig:
        if self.refit_dense and self.method != "topk":
            raise PydanticCustomError(
                "refit_without_topk",
                "compression.refit_dense refits the tensors top-k sends whole; it applies only to method: topk "
                "(got {method}); remove it or set method: topk",
                {"method": self.method, "loc": "refit_dense"},
            )
        return self

    def refits(self, *, record_level_dp: bool) -> bool:
        """Whether the sites refit the dense tensors: ``refit_dense``, or by default ``topk`` without record-level DP.

        Examples
        --------
        >>> CompressionConfig(method="topk").refits(record_level_dp=False)
        True
        >>> CompressionConfig(method="topk").refits(record_level_dp=True)
        False
        >>> CompressionConfig(method="topk", refit_dense=False).refits(record_level_dp=False)
        False
        >>> CompressionConfig(method="int8").refits(record_level_dp=False)
        False
        """
        if self.method != "topk":
            return False
        return (not record_level_dp) if self.refit_dense is None else self.refit_dense


class SecureAggregationConfig(_Section):
    """Secure aggregation (SecAgg+): the coordinator learns only the sum of the updates.

    Attributes
    ----------
    enabled : bool
        Run every training round through the SecAgg+ protocol.
    clip : float
        Each coordinate of a site's update is clipped to ``[-clip, clip]``
        before it is quantized; clipped coordinates are counted in the round's
        metrics (``secagg_clipped``).
    max_examples : int
        A site's weight in the average is ``min(examples, max_examples) /
        max_examples``; it travels inside the masked vector, so the coordinator
        never learns a site's example count. Set it at or above the largest site.
    neighbours : int, optional
        Masking neighbours per site; default: every other site up to about 30
        sites, then ``2 * ceil(3 * log2(sites))``.
    threshold : int, optional
        Shares needed to recover a dropped site's masks; also the fewest sites
        that may remain at any phase. Default: two thirds of a neighbourhood.
        Must exceed half of ``neighbours + 1``.
    scale : float, optional
        Quantization steps per unit; default: the largest at which the sum of
        the round's sites cannot wrap the ring. A larger one is refused. The
        ring has 32 bits, or 16 under ``compression.method`` int8, float16 or
        bfloat16 (half the upload; at most 254, 15 and 127 sites, see
        ``docs/privacy.md``); ``topk`` is refused with secure aggregation.
    """

    enabled: bool = False
    clip: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    max_examples: int = Field(default=100_000, ge=1)
    neighbours: int | None = Field(default=None, ge=2)
    threshold: int | None = Field(default=None, ge=2)
    scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)


Accountant = Literal["prv", "rdp", "pld"]

#: Above this epsilon a guarantee means little; plan validation warns.
EPSILON_WARNING = 10.0


class PrivacyWarning(UserWarning):
    """A plan's privacy settings are valid but weak (epsilon above 10)."""


class RecordLevelPrivacy(_Section):
    """Record-level differential privacy at every site: DP-SGD through Opacus.

    Each site trains with per-example gradient clipping, Gaussian noise and
    Poisson sampling, and accounts what it spends in its own ledger; the site's
    policy sets its lifetime budget, and a round that would exceed it is refused.

    Attributes
    ----------
    enabled : bool
        Train with DP-SGD at every site.
    epsilon : float
        The epsilon each site spends on this run, all rounds and the feature
        statistics together; the noise multiplier is derived from it for the
        planned rounds unless ``noise_multiplier`` is given.
    delta : float
        The delta of the guarantee; keep it below 1 / (records at a site).
    max_grad_norm : float
        Per-example gradient clipping bound (L2).
    noise_multiplier : float, optional
        Noise standard deviation over ``max_grad_norm``; derived from
        ``epsilon`` when not set.
    accountant : {"pld", "prv", "rdp"}
        dp-accounting PLD (default), Opacus PRV or Opacus RDP (looser).
    feature_stats_epsilon_share : float
        With federated normalization, each site releases its counts, sums and
        sums of squares with Gaussian noise (features clipped to the dataset's
        public bounds), and the release counts in the budget: its noise
        multiplier is the one that spends this share of ``epsilon`` alone.
    feature_stats_noise_multiplier : float, optional
        Fixes the statistics' noise multiplier instead.
    """

    enabled: bool = False
    epsilon: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    accountant: Accountant = "pld"
    feature_stats_epsilon_share: float = Field(default=0.25, gt=0, lt=1)
    feature_stats_noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class SiteLevelPrivacy(_Section):
    """Site-level differential privacy: DP-FedAvg over whole site updates.

    Each update is clipped to ``clip_norm`` (L2) and the sum carries Gaussian
    noise of standard deviation ``noise_multiplier * clip_norm``; the
    guarantee covers everything a site contributes, accounted over rounds with
    the site sampling rate ``nodes_per_round / nodes``.

    Attributes
    ----------
    enabled : bool
    mode : {"central", "distributed"}
        ``central``: the coordinator clips and adds the noise (it sees the
        updates). ``distributed``: each site clips its own update and adds its
        share of the noise before secure aggregation masks it, so the
        coordinator only ever sees the noisy sum; needs
        ``secure_aggregation.enabled``.
    noise_multiplier : float
    clip_norm : float
        The L2 bound of one site's update (the initial one with adaptive clipping).
    adaptive_clipping : bool
        Adapt ``clip_norm`` towards the ``target_quantile`` of update norms
        (Andrew et al., 2021), from a noised count of unclipped updates.
    target_quantile : float
    clip_learning_rate : float
        Step of the geometric update of the clipping bound.
    clipped_count_stddev : float, optional
        Noise on the count of unclipped updates; default: sites per round / 20.
    delta : float
    accountant : {"prv", "rdp", "pld"}
    """

    enabled: bool = False
    mode: Literal["central", "distributed"] = "central"
    noise_multiplier: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    clip_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    adaptive_clipping: bool = False
    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(default=0.2, gt=0, allow_inf_nan=False)
    clipped_count_stddev: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Accountant = "pld"


class PrivacyConfig(_Section):
    """Differential privacy: record level at each site, site level over updates."""

    record_level: RecordLevelPrivacy = RecordLevelPrivacy()
    site_level: SiteLevelPrivacy = SiteLevelPrivacy()


class EvaluationConfig(_Section):
    """When the global model is evaluated at every site.

    Federated evaluation runs after every ``every_rounds`` rounds and always
    after the last round.

    Attributes
    ----------
    every_rounds : int
    fine_tune_epochs : int
        When above 0, the evaluation after the last round also fine-tunes a
        copy of the global model on each site's training split for this many
        epochs and reports its metrics as ``personalized_*`` next to the
        global model's (see :func:`fedcare.personalization.fine_tune`).
    """

    every_rounds: int = Field(default=1, ge=1)
    fine_tune_epochs: int = Field(default=0, ge=0)


class ModelConfig(_Section):
    """Architecture options read by the task (ignored where irrelevant).

    Attributes
    ----------
    hidden_units : int
    dropout : float
        Dropout before the last layer (``tabular-mlp`` and the imaging tasks).
    batch_norm : bool
        ``tabular-mlp``: a ``BatchNorm1d`` after the hidden layer (its running
        statistics travel as parameters; ``fedbn`` keeps them local).
    width : int
        Imaging tasks: channels of the first convolution; each later stage
        doubles it (``image-cnn``, ``volume-cnn3d``: three blocks, ``width``,
        ``2 width``, ``4 width``; ``image-resnet18``: four stages, ``width`` to
        ``8 width``, where 64 is the original ResNet-18). Default 16.
    norm : {"batch", "group", "none"}
        Imaging tasks: the normalization after each convolution. ``batch``
        (BatchNorm; its running statistics travel as parameters and ``fedbn``
        keeps them local; refused with record-level DP), ``group`` (GroupNorm
        with ``gcd(8, channels)`` groups; works with DP-SGD and carries no
        batch statistics) or ``none``. ``image-resnet18`` needs ``batch`` or
        ``group``. Default ``batch``.
    augment : {"none", "flip", "flip-crop"}
        Imaging tasks, training only: ``flip`` mirrors each example along its
        last (width) axis with probability 1/2; ``flip-crop`` also shifts it
        by up to ``crop_padding`` voxels along every spatial axis (zero
        padding, then a random crop back to the input size). Drawn from a
        generator seeded by the round's training seed, so a round is
        reproducible; evaluation never augments. Default ``none``.
    crop_padding : int
        Largest shift of ``flip-crop``, in pixels (voxels). Default 2.
    intensity_jitter : float
        Imaging tasks, training only: when above 0, each example's
        intensities are scaled by a factor drawn uniformly from ``[1 - j, 1 +
        j]`` and offset by one from ``[-j / 2, j / 2]`` (any ``augment``).
        Default 0.
    """

    hidden_units: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    batch_norm: bool = False
    # IMAGING-FIELDS (image-cnn, image-resnet18, volume-cnn3d)
    width: int = Field(default=16, ge=1)
    norm: Literal["batch", "group", "none"] = "batch"
    augment: Literal["none", "flip", "flip-crop"] = "none"
    crop_padding: int = Field(default=2, ge=0)
    intensity_jitter: float = Field(default=0.0, ge=0, lt=1)


class ApprovalConfig(_Section):
    """How the coordinator waits for the sites to approve the plan before round 1.

    Every site runs a plan only once approved there (``fedcare node approve``,
    or its policy's ``auto_approve``); until then it reports ``pending`` and
    is left out of rounds. A site that approves later takes part from the
    next round.

    Attributes
    ----------
    wait_s : float
        How long to wait, before round 1, for every admitted site to answer
        (approve, reject or refuse); ``0`` starts at once with whoever has.
    proceed : {"with-approved", "when-all-approved"}
        After the wait: start with the approved sites (at least
        ``min_nodes``), or only if every admitted site approved.
    """

    wait_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    proceed: Literal["with-approved", "when-all-approved"] = "with-approved"


class TrackingConfig(_Section):
    """Where the coordinator records the run for experiment tracking (MLflow).

    Only the coordinator reads this section: it logs the plan's settings and
    the aggregate metrics of each round, never patient data. ``tracking:
    mlflow`` is short for ``tracking: {backend: mlflow}``.

    Attributes
    ----------
    backend : {"mlflow"}
        The tracking backend; needs ``pip install 'fedcare[mlflow]'`` where
        the run starts (not at the sites).
    uri : str, optional
        The tracking URI. Default: ``sqlite:///RUN_DIR/mlflow.db``, with the
        artifacts in ``RUN_DIR/mlruns``. Put no credentials here: the plan is
        sent to every site; MLflow reads them from its environment variables.
    experiment : str, optional
        The experiment's name. Default: the plan's ``name``.

    Examples
    --------
    >>> parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 1,
    ...             "tracking": "mlflow"}).tracking
    TrackingConfig(backend='mlflow', uri=None, experiment=None)
    """

    backend: Literal["mlflow"]
    uri: str | None = Field(default=None, min_length=1)
    experiment: str | None = Field(default=None, min_length=1)


def _tracking_shorthand(value: Any) -> Any:
    """``tracking: mlflow`` is ``{backend: mlflow}``; ``tracking: none`` is no tracking."""
    if isinstance(value, str):
        return None if value == "none" else {"backend": value}
    return value


class Plan(_Section):
    """One federated training run.

    Examples
    --------
    >>> plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"},
    ...                    "rounds": 3})
    >>> plan.strategy.name, plan.local.batch_size
    ('fedavg', 32)
    >>> parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"},
    ...             "rounds": 0})
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.rounds: Input should be greater than or equal to 1, got 0
    """

    name: str = "fedcare-run"
    task: str
    dataset: DatasetConfig
    nodes: tuple[str, ...] | None = None
    rounds: int = Field(ge=1)
    nodes_per_round: int | None = Field(default=None, ge=1)
    min_nodes: int = Field(default=1, ge=1)
    local: LocalTraining = LocalTraining()
    strategy: StrategyConfig = StrategyConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    model: ModelConfig = ModelConfig()
    seed: int = 0
    round_timeout_s: float | None = Field(default=None, gt=0)
    #: The coordinator refuses (does not clip) an update whose L2 norm is above this: a site that far
    #: off is broken or hostile. Not checked under secure aggregation, where no single update is seen
    #: and the sites clip each coordinate (``secure_aggregation.clip``) instead.
    max_update_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    compression: CompressionConfig = CompressionConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    approval: ApprovalConfig = ApprovalConfig()
    tracking: Annotated[TrackingConfig | None, BeforeValidator(_tracking_shorthand)] = None

    @model_validator(mode="after")
    def _minimum_fits(self) -> Plan:
        if self.nodes_per_round is not None and self.min_nodes > self.nodes_per_round:
            raise PydanticCustomError(
                "min_nodes_too_large",
                "min_nodes ({min_nodes}) is larger than nodes_per_round ({nodes_per_round})",
                {"min_nodes": self.min_nodes, "nodes_per_round": self.nodes_per_round, "loc": "min_nodes"},
            )
        if self.nodes is not None and len(set(self.nodes)) != len(self.nodes):
            repeated = sorted({n for n in self.nodes if self.nodes.count(n) > 1})
            raise PydanticCustomError(
                "duplicate_nodes", "nodes lists {repeated} twice", {"repeated": ", ".join(repeated), "loc": "nodes"}
            )
        secure = self.secure_aggregation
        sites = self.nodes_per_round or (len(self.nodes) if self.nodes is not None else None)
        if secure.enabled:
            from fedcare.federation.secure_aggregation import round_settings, secure_ring_bits

            try:
                secure_ring_bits(self.compression)
            except ConfigError as exc:
                raise PydanticCustomError(
                    "compression_under_secure_aggregation", "{message}", {"message": exc.message, "loc": exc.field}
                ) from None
        if secure.enabled and sites is not None:
            try:
                round_settings(secure, num_nodes=sites, vector_length=1, compression=self.compression)
            except ConfigError as exc:
                field = exc.field or "secure_aggregation"
                location = field if field.startswith("compression.") else f"secure_aggregation.{field.removeprefix('secagg.')}"
                raise PydanticCustomError(
                    "secure_aggregation",
                    "{message} (for {sites} sites per round)",
                    {"message": exc.message, "sites": sites, "loc": location},
                ) from None
        if secure.enabled and self.strategy.name in _NEEDS_ALL_UPDATES:
            raise PydanticCustomError(
                "strategy_needs_all_updates",
                "{name} needs every update on its own, which secure aggregation hides; use fedavg or turn "
                "secure aggregation off",
                {"name": self.strategy.name, "loc": "strategy.name"},
            )
        if secure.enabled and self.strategy.name == "scaffold":
            raise PydanticCustomError(
                "strategy_needs_side_data",
                "scaffold needs each site's control-variate change next to its update, which secure aggregation "
                "does not carry; use fedprox or fedavg with secure aggregation, or turn secure aggregation off",
                {"loc": "strategy.name"},
            )
        if self.strategy.name == "cyclic" and secure.enabled:
            raise PydanticCustomError(
                "strategy_single_site",
                "{name} trains one site per round, so the secure sum would be that site's update; turn secure "
                "aggregation off or use fedavg",
                {"name": self.strategy.name, "loc": "strategy.name"},
            )
        if self.strategy.name == "cyclic" and self.min_nodes != 1:
            raise PydanticCustomError(
                "min_nodes_cyclic",
                "min_nodes must be 1 with {name}, which trains one site per round, got {min_nodes}",
                {"name": self.strategy.name, "min_nodes": self.min_nodes, "loc": "min_nodes"},
            )
        if secure.enabled and self.strategy.name == "fednova":
            raise PydanticCustomError(
                "strategy_needs_side_data",
                "fednova needs each site's number of local steps next to its update, which secure aggregation "
                "hides in the sum; use fedavg or fedprox with secure aggregation, or turn secure aggregation off",
                {"loc": "strategy.name"},
            )
        if self.strategy.name == "ditto" and self.evaluation.fine_tune_epochs > 0:
            raise PydanticCustomError(
                "personalization_twice",
                "ditto already reports each site's personal model as personalized_*; set "
                "evaluation.fine_tune_epochs: 0 with ditto, or use fedavg to fine-tune after federation",
                {"loc": "evaluation.fine_tune_epochs"},
            )
        if self.privacy.record_level.enabled and self.evaluation.fine_tune_epochs > 0:
            raise PydanticCustomError(
                "fine_tune_without_dp",
                "fine-tuning trains without DP-SGD and reports the result's metrics; set "
                "evaluation.fine_tune_epochs: 0 with record-level DP",
                {"loc": "evaluation.fine_tune_epochs"},
            )
        if self.privacy.record_level.enabled and self.model.batch_norm:
            raise PydanticCustomError(
                "batch_norm_with_dp",
                "BatchNorm mixes the examples of a batch, which per-example gradients (DP-SGD) forbid; set "
                "model.batch_norm: false with record-level DP",
                {"loc": "model.batch_norm"},
            )
        if self.privacy.record_level.enabled and self.model.norm == "batch" and self.task in _BATCH_NORM_IMAGING_TASKS:
            raise PydanticCustomError(
                "batch_norm_with_dp",
                "BatchNorm mixes the examples of a batch, which per-example gradients (DP-SGD) forbid; set "
                "model.norm: group (or none) with record-level DP",
                {"loc": "model.norm"},
            )
        if self.privacy.record_level.enabled and self.compression.refit_dense:
            raise PydanticCustomError(
                "refit_with_dp",
                "compression.refit_dense trains the dense tensors a second time on the site's data, outside "
                "DP-SGD's per-example accounting; set compression.refit_dense: false (or leave it unset) with "
                "record-level DP",
                {"loc": "compression.refit_dense"},
            )
        if self.privacy.record_level.enabled and self.local.class_weighting != "none":
            raise PydanticCustomError(
                "class_weighting_with_dp",
                "balanced class weights come from the site's label counts, which DP-SGD's per-example accounting "
                "does not cover; set local.class_weighting: none with record-level DP",
                {"loc": "local.class_weighting"},
            )
        if self.privacy.record_level.enabled and self.strategy.name in ("fedprox", "scaffold", "ditto"):
            raise PydanticCustomError(
                "strategy_changes_local_loss",
                "{name} adds a term to the sites' loss that DP-SGD's per-example gradients do not see; use fedavg "
                "or a FedOpt rule with record-level DP, or turn record-level DP off",
                {"name": self.strategy.name, "loc": "strategy.name"},
            )
        if secure.enabled and self.strategy.name == "norm-bounding":
            raise PydanticCustomError(
                "strategy_clips_each_update",
                "norm-bounding clips each update at the coordinator, which secure aggregation hides (it would clip "
                "the sum); use fedavg, whose secure_aggregation.clip bounds each coordinate at the sites, or turn "
                "secure aggregation off",
                {"loc": "strategy.name"},
            )
        _check_buffered(self, sites=sites)
        site_level = self.privacy.site_level
        if site_level.enabled and site_level.mode == "distributed" and not secure.enabled:
            raise PydanticCustomError(
                "distributed_dp",
                "distributed DP needs secure_aggregation.enabled: true (the sum must hide each noisy share)",
                {"loc": "privacy.site_level.mode"},
            )
        record_level = self.privacy.record_level
        if record_level.enabled and record_level.noise_multiplier is None and record_level.epsilon > EPSILON_WARNING:
            warnings.warn(
                f"plan.privacy.record_level.epsilon is {record_level.epsilon}; above {EPSILON_WARNING:g} "
                "differential privacy gives little protection",
                PrivacyWarning,
                stacklevel=2,
            )
        return self


#: Why buffered (asynchronous) aggregation refuses a strategy, by strategy name.
_NOT_BUFFERED = {
    **{
        name: "{name} is unweighted and compares each round's updates with one another, so it would ignore the "
        "staleness weights and compare updates trained on different global models"
        for name in sorted(_NEEDS_ALL_UPDATES)
    },
    "cyclic": "cyclic trains one site at a time, so there is no one to wait for and nothing to buffer",
    "scaffold": "scaffold's control variates assume that every update of a round starts from the same global "
    "model and that the server variate moves once per round with all of them",
}


def _check_buffered(plan: Plan, *, sites: int | None) -> None:
    """Refuse the combinations that asynchronous buffered aggregation cannot run (see ``docs/strategies.md``)."""
    buffered = plan.strategy.buffered
    if buffered is None:
        return
    if plan.secure_aggregation.enabled:
        raise PydanticCustomError(
            "buffered_secure_aggregation",
            "buffered aggregation folds in each update as it arrives, but secure aggregation reveals only the sum "
            "of a fixed set of sites agreed before the round; turn secure aggregation off or remove "
            "strategy.buffered",
            {"loc": "strategy.buffered"},
        )
    reason = _NOT_BUFFERED.get(plan.strategy.name)
    if reason is not None:
        raise PydanticCustomError(
            "buffered_strategy",
            reason + "; use fedavg, fedprox, a FedOpt rule or norm-bounding with strategy.buffered",
            {"name": plan.strategy.name, "loc": "strategy.buffered"},
        )
    if plan.privacy.site_level.enabled:
        raise PydanticCustomError(
            "buffered_site_level_dp",
            "site-level DP accounts for rounds that sample sites at random, but a buffered round takes whichever "
            "sites answer first; turn site-level DP off or remove strategy.buffered",
            {"loc": "strategy.buffered"},
        )
    if sites is not None and buffered.buffer_size > sites:
        raise PydanticCustomError(
            "buffer_too_large",
            "buffer_size {buffer_size} is larger than the {sites} sites per round, so the buffer could never fill "
            "(each site adds at most one update to it)",
            {"buffer_size": buffered.buffer_size, "sites": sites, "loc": "strategy.buffered.buffer_size"},
        )
    if buffered.buffer_size < plan.min_nodes:
        raise PydanticCustomError(
            "buffer_too_small",
            "buffer_size {buffer_size} is smaller than min_nodes ({min_nodes}): every aggregation must hold at "
            "least min_nodes sites' updates",
            {"buffer_size": buffered.buffer_size, "min_nodes": plan.min_nodes, "loc": "strategy.buffered.buffer_size"},
        )


def _format_validation_error(error: ValidationError, *, root: str) -> ConfigError:
    problems: list[tuple[str, str]] = []
    for item in error.errors():
        context = item.get("ctx") or {}
        location = (*item["loc"], context["loc"]) if "loc" in context else item["loc"]
        path = ".".join(str(part) for part in (root, *location))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("missing", "value_error") and "loc" not in context and "input" in item:
            message = f"{message}, got {item['input']!r}"
        problems.append((path, message))
    if len(problems) == 1:
        field, message = problems[0]
        return ConfigError(message, field=field)
    # several problems: the message names each field; ``field`` is the first one
    error_out = ConfigError("; ".join(f"{path}: {message}" for path, message in problems))
    error_out.field = problems[0][0]
    return error_out


def parse_plan(data: Any) -> Plan:
    """Validate a plan given as a mapping.

    Parameters
    ----------
    data : Mapping
        The plan, as loaded from YAML or JSON.

    Returns
    -------
    Plan

    Raises
    ------
    ConfigError
        Naming the field path and the value received for each problem.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a plan must be a mapping, got {type(data).__name__}", field="plan")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(exc, root="plan") from None


def load_plan(path: str | Path) -> Plan:
    """Read and validate a YAML plan file.

    Parameters
    ----------
    path : str or Path
        The plan file.

    Returns
    -------
    Plan

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or fails validation.
    """
    return parse_plan(read_yaml(path, what="plan file", field="plan"))


def read_yaml(path: str | Path, *, what: str, field: str) -> Any:
    """The YAML document in ``path`` (safe loader), for a plan or a node.yaml.

    Raises
    ------
    ConfigError
        ``cannot read WHAT: ...`` or ``WHAT is not valid YAML: ...``, at ``field``.
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", field=field) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}", field=field) from None


#: ``(section, field, default)`` of the plan fields added after plans were first hashed.
_LATER_FIELDS: tuple[tuple[str | None, str, Any], ...] = (
    (None, "tracking", None),
    (None, "compression", CompressionConfig().model_dump(mode="json")),
    ("local", "max_local_seconds", None),
    ("strategy", "buffered", None),
)


def plan_hash(plan: Plan) -> str:
    """SHA-256 of the plan's canonical JSON form; nodes check tasks against it.

    Examples
    --------
    >>> p = parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"},
    ...                 "rounds": 1})
    >>> len(plan_hash(p))
    64
    """
    # Sections added later are left out while they keep their defaults, so a plan that does not use
    # them hashes as it did before they existed (and the sites' approvals of it still hold).
    dumped = plan.model_dump(mode="json")
    for section, field_name, default in _LATER_FIELDS:
        holder = dumped if section is None else dumped[section]
        if holder.get(field_name) == default:
            del holder[field_name]
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
