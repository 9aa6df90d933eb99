"""Personalization after federation: fine-tune the global model on one site's own data."""

from __future__ import annotations

from collections.abc import Mapping

from fedcare.errors import ConfigError
from fedcare.params import Parameters
from fedcare.plan import Plan
from fedcare.tasks.base import SiteData, Task

__all__ = ["fine_tune", "personalized"]


def personalized(metrics: Mapping[str, float]) -> dict[str, float]:
    """The same metrics under ``personalized_`` names, to report next to the global model's.

    Examples
    --------
    >>> personalized({"accuracy": 0.9})
    {'personalized_accuracy': 0.9}
    """
    return {f"personalized_{name}": value for name, value in metrics.items()}


def fine_tune(
    plan: Plan,
    global_parameters: Parameters,
    site_data: SiteData,
    *,
    task: Task,
    epochs: int,
    seed: int,
) -> dict[str, float]:
    """Fine-tune a copy of the global model on a site's training split; metrics of both models.

    The global model is evaluated on the site's test split, then a fresh copy
    trains for ``epochs`` epochs on the training split with ``plan.local``'s
    optimizer, batch size and learning rate (its ``epochs``/``steps`` are
    replaced), and is evaluated on the same test split. ``global_parameters``
    is not changed; nothing leaves the site but the returned numbers.

    Parameters
    ----------
    plan : Plan
        The run's plan (architecture and local recipe).
    global_parameters : Parameters
        The federated model (a FedBN site passes it with its own normalization tensors).
    site_data : SiteData
        The site's data, prepared (normalized) as in training.
    task : Task
        The installed task the plan names.
    epochs : int
        Local passes over the training split (>= 1).
    seed : int
        Seed of the batch order.

    Returns
    -------
    dict of str to float
        The global model's test metrics (``accuracy``, ``log_loss``, ...) and
        ``train_log_loss`` (on the training split), and the same for the
        fine-tuned model as ``personalized_accuracy``, ...,
        ``personalized_train_log_loss``.

    Raises
    ------
    ConfigError
        If ``epochs`` is below 1.

    Examples
    --------
    >>> import numpy as np
    >>> from fedcare.plan import parse_plan
    >>> from fedcare.tasks.base import DataSpec, Split
    >>> from fedcare.tasks.tabular import LogisticTask
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int64)
    >>> spec = DataSpec(num_features=3, num_classes=2)
    >>> site = SiteData("a", spec, Split(x, y), Split(x, y))
    >>> plan = parse_plan({"task": "tabular-logistic", "dataset": {"name": "x"}, "rounds": 1})
    >>> task = LogisticTask()
    >>> start = task.get_parameters(task.build_model(spec, plan, seed=0))
    >>> out = fine_tune(plan, start, site, task=task, epochs=5, seed=0)
    >>> out["personalized_train_log_loss"] < out["train_log_loss"]
    True
    """
    if epochs < 1:
        raise ConfigError(f"must be >= 1, got {epochs}", field="plan.evaluation.fine_tune_epochs")
    local = plan.local.model_copy(update={"epochs": epochs, "steps": None})
    tuning_plan = plan.model_copy(update={"local": local})
    model = task.build_model(site_data.spec, plan)
    task.set_parameters(model, global_parameters)
    before = _test_and_train_metrics(task, model, site_data)
    task.train(model, site_data.train, tuning_plan, seed=seed)
    after = _test_and_train_metrics(task, model, site_data)
    return {**before, **personalized(after)}


def _test_and_train_metrics(task: Task, model: object, site_data: SiteData) -> dict[str, float]:
    metrics = dict(task.evaluate(model, site_data.test))
    train = task.evaluate(model, site_data.train)
    if "log_loss" in train:
        metrics["train_log_loss"] = train["log_loss"]
    return metrics
