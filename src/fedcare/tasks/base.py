"""The Task interface: what a site runs, and the data types it runs on.

A task is installed at the site and registered by name; the coordinator only
names it in the plan. The node holds an opaque ``model`` object built by the
task and moves weights in and out of it through :class:`Parameters`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedcare.params import Parameters
from fedcare.plan import Plan

__all__ = ["DataSpec", "SiteData", "Split", "Task", "TrainHook", "TrainResult"]


@dataclass(frozen=True)
class DataSpec:
    """The schema of a dataset, known without reading any site's records.

    Attributes
    ----------
    num_features : int
        Width of a feature vector.
    num_classes : int
        Number of label classes (2 for binary tasks).
    feature_names : tuple of str
        Names of the features, in column order.
    class_names : tuple of str
        Names of the classes, by label index.
    feature_bounds : tuple of (float, float)
        Public lower and upper bounds of each feature (from the dataset's
        documentation or clinical ranges, never from its records); needed to
        release feature statistics with differential privacy. Empty if unknown.
        For images and volumes, the bounds of each channel's intensity.
    input_shape : tuple of int
        The shape of one example: ``(num_features,)`` for tables (the default
        when empty), ``(channels, height, width)`` for images and
        ``(channels, depth, height, width)`` for volumes; ``num_features`` is
        then the product of the shape.

    Examples
    --------
    >>> DataSpec(num_features=13, num_classes=2).shape
    (13,)
    >>> image = DataSpec(num_features=784, num_classes=2, input_shape=(1, 28, 28))
    >>> image.shape, image.channels
    ((1, 28, 28), 1)
    """

    num_features: int
    num_classes: int
    feature_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    feature_bounds: tuple[tuple[float, float], ...] = ()
    input_shape: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example (``(num_features,)`` for tables)."""
        return self.input_shape or (self.num_features,)

    @property
    def channels(self) -> int:
        """What normalization statistics are computed over: features of a table, channels of an image."""
        return self.shape[0]


@dataclass(frozen=True)
class Split:
    """Features and labels of one split of one site.

    Attributes
    ----------
    x : numpy.ndarray
        ``(n, num_features)`` float32 features, or ``(n, *input_shape)`` for
        images and volumes.
    y : numpy.ndarray
        ``(n,)`` int64 labels; for survival data the event indicator
        (1 = event observed, 0 = censored).
    time : numpy.ndarray or None
        ``(n,)`` float64 follow-up times in days for survival data (time to
        the event, or to censoring); ``None`` for classification data.

    Examples
    --------
    >>> split = Split(x=np.zeros((2, 1), np.float32), y=np.array([1, 0]), time=np.array([30.0, 90.0]))
    >>> len(split), split.time.tolist()
    (2, [30.0, 90.0])
    """

    x: np.ndarray
    y: np.ndarray
    time: np.ndarray | None = None

    def take(self, index: np.ndarray) -> Split:
        """The rows ``index`` of every array (``time`` included), as a new split.

        Examples
        --------
        >>> split = Split(x=np.arange(3, dtype=np.float32)[:, None], y=np.array([0, 1, 1]),
        ...               time=np.array([5.0, 6.0, 7.0]))
        >>> split.take(np.array([2, 0])).time.tolist()
        [7.0, 5.0]
        """
        return Split(
            x=self.x[index], y=self.y[index], time=None if self.time is None else self.time[index]
        )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class SiteData:
    """A site's local data: a training and a test split, never sent anywhere."""

    site: str
    spec: DataSpec
    train: Split
    test: Split


@dataclass(frozen=True)
class TrainResult:
    """What local training reports back (numbers only).

    Attributes
    ----------
    num_examples : int
        Training examples seen in this round, the FedAvg weight.
    steps : int
        Optimizer steps taken.
    metrics : Mapping[str, float]
        E.g. the mean training loss.
    """

    num_examples: int
    steps: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class TrainHook:
    """Changes local training without the task knowing (proximal terms, DP-SGD, ...).

    A task calls :meth:`wrap` once before training with its own model,
    optimizer and data loader and trains with what it gets back,
    :meth:`on_loss` on the loss of each batch, :meth:`should_stop` after
    each optimizer step but the last planned one, and :meth:`close` once
    after training, even when training failed. The base class changes nothing.
    """

    #: True when the hook needs the task to train from a ``torch`` data loader
    #: (DP-SGD replaces it with a Poisson-sampling one).
    needs_data_loader: ClassVar[bool] = False

    def wrap(self, model: Any, optimizer: Any, data_loader: Any) -> tuple[Any, Any, Any]:
        """Return the model, optimizer and data loader to train with (by default, the same)."""
        return model, optimizer, data_loader

    def on_loss(self, model: Any, loss: Any) -> Any:
        """Return the (possibly augmented) loss of one batch."""
        return loss

    def should_stop(self) -> bool:
        """Whether training should stop now, before its next step (by default, never).

        The built-in torch tasks stop as soon as one hook says so and report
        the steps they really took in :attr:`TrainResult.steps`; a task that
        never asks trains every planned step (see
        :class:`~fedcare.tasks.compute.TimeBudget`).
        """
        return False

    def close(self) -> None:
        """Undo what :meth:`wrap` attached to the model."""


class Task(abc.ABC):
    """A model and its training recipe, installed at every site.

    Subclasses implement the six methods below; the node calls them in the
    order build, set, train or evaluate, get.
    """

    #: Registered name, used in plans.
    name: str = ""

    @abc.abstractmethod
    def build_model(self, spec: DataSpec, plan: Plan, *, seed: int | None = None) -> Any:
        """Create a fresh model for data of shape ``spec``.

        Parameters
        ----------
        spec : DataSpec
            The dataset schema.
        plan : Plan
            The run's plan (architecture options live in ``plan.model``).
        seed : int, optional
            Seed for the initial weights; ``None`` leaves them unseeded (the
            node overwrites them with the global weights anyway).
        """

    @abc.abstractmethod
    def get_parameters(self, model: Any) -> Parameters:
        """Return a copy of the model's trainable state as parameters."""

    @abc.abstractmethod
    def set_parameters(self, model: Any, parameters: Parameters) -> None:
        """Load ``parameters`` into the model (shapes must match)."""

    @abc.abstractmethod
    def train(
        self,
        model: Any,
        data: Split,
        plan: Plan,
        *,
        seed: int,
        hooks: Sequence[TrainHook] = (),
    ) -> TrainResult:
        """Train the model in place on ``data`` following ``plan.local``."""

    @abc.abstractmethod
    def evaluate(self, model: Any, data: Split) -> dict[str, float]:
        """Return metrics of the model on ``data``."""

    def to_device(self, model: Any, device: str) -> Any:
        """Return ``model`` placed on ``device`` (``cpu``, ``cuda``, ``cuda:N``), to train and evaluate there.

        The node calls it once on each model it builds, with the device its
        ``compute:`` settings resolve to (:func:`~fedcare.tasks.compute.resolve_device`).
        Parameters still come and go as CPU arrays. The default returns the
        model unchanged: a task that does not use torch trains where it is.
        """
        return model

    def local_parameter_names(self, model: Any) -> tuple[str, ...]:
        """Names of the tensors a site keeps for itself under ``fedbn`` (normalization layers).

        The default is none: ``fedbn`` then works exactly like ``fedavg``.
        """
        return ()
