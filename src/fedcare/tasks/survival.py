"""Survival analysis: a linear Cox proportional hazards model trained by partial likelihood."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcare.errors import ConfigError, DataError
from fedcare.metrics import concordance_index
from fedcare.plan import Plan
from fedcare.tasks.base import DataSpec, Split, TrainHook, TrainResult
from fedcare.tasks.torch_task import (
    TorchClassificationTask, make_optimizer, model_device, planned_steps, shuffled_batches, stop_requested,
)  # fmt: skip

if TYPE_CHECKING:
    import torch

__all__ = ["CoxTask", "cox_partial_likelihood_loss"]


def cox_partial_likelihood_loss(risk: torch.Tensor, time: np.ndarray, event: np.ndarray) -> torch.Tensor:
    """Negative Breslow partial log-likelihood of one batch, divided by the batch size.

    For each patient ``i`` with an event, the term is
    ``risk_i - log(sum over j with time_j >= time_i of exp(risk_j))``; the
    risk set of tied times is the same for all of them (Breslow). The sum of
    the terms is negated and divided by the batch size, as FLamby's
    Fed-TCGA-BRCA loss is, so a batch without events gives 0 (with a zero
    gradient, not NaN).

    Parameters
    ----------
    risk : torch.Tensor
        ``(n,)`` log relative hazards (the model's outputs).
    time : numpy.ndarray
        ``(n,)`` follow-up times.
    event : numpy.ndarray
        ``(n,)`` 1 where the event was observed, 0 where censored.

    Returns
    -------
    torch.Tensor
        A scalar.

    Examples
    --------
    >>> import torch
    >>> loss = cox_partial_likelihood_loss(torch.zeros(3), np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1]))
    >>> round(float(loss), 4)  # (log 3 + log 1) / 3
    0.3662
    """
    import torch

    order = np.argsort(-np.asarray(time, dtype=np.float64), kind="stable")  # latest first
    sorted_time = np.asarray(time, dtype=np.float64)[order]
    # The last position holding each time: the cumulative sum there covers every j with time_j >= time_i.
    last = np.searchsorted(-sorted_time, -sorted_time, side="right") - 1
    sorted_risk = risk[torch.from_numpy(order).to(risk.device)]
    log_risk_set = torch.logcumsumexp(sorted_risk, dim=0)[torch.from_numpy(last).to(risk.device)]
    events = torch.from_numpy(np.asarray(event, dtype=np.float64)[order]).to(device=risk.device, dtype=risk.dtype)
    return -((sorted_risk - log_risk_set) * events).sum() / max(risk.shape[0], 1)


class CoxTask(TorchClassificationTask):
    """Linear Cox proportional hazards model, ``risk = x . w`` (no intercept: it cancels).

    Registered as ``tabular-cox``. The data's ``y`` is the event indicator
    and ``time`` the follow-up time (:class:`~fedcare.tasks.base.Split`).
    Each batch's loss is :func:`cox_partial_likelihood_loss`; batches,
    optimizer, learning rate and epochs follow ``plan.local`` and are drawn
    as in :class:`~fedcare.tasks.torch_task.TorchClassificationTask`, from a
    ``numpy.random.Generator`` seeded by the coordinator. Hooks'
    ``on_loss`` run on every batch (proximal terms), and training stops
    early when one asks (:class:`~fedcare.tasks.compute.TimeBudget`). Record-level
    differential privacy (DP-SGD) is refused: the partial likelihood couples
    every patient of a batch to the others' risk sets, so per-sample
    gradient clipping does not bound one record's influence. ``evaluate``
    returns the C-index (:func:`~fedcare.metrics.concordance_index`) and
    the loss over the whole split.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-cox", "dataset": {"name": "x"}, "rounds": 1})
    >>> task = CoxTask()
    >>> model = task.build_model(DataSpec(num_features=39, num_classes=2), plan, seed=0)
    >>> task.get_parameters(model).spec
    (('linear.weight', (1, 39)),)
    """

    name = "tabular-cox"

    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        import torch

        module = torch.nn.Module()
        module.linear = torch.nn.Linear(spec.num_features, 1, bias=False)
        module.forward = module.linear.__call__  # through __call__, so hooks on the layer run
        return module

    def train(
        self,
        model: Any,
        data: Split,
        plan: Plan,
        *,
        seed: int,
        hooks: Sequence[TrainHook] = (),
    ) -> TrainResult:
        """Train on ``data`` in place, following ``plan.local``.

        Raises
        ------
        ConfigError
            If a hook needs a data loader (DP-SGD), which this task does not support.
        DataError
            If ``data`` has no survival times.
        """
        import torch

        if any(hook.needs_data_loader for hook in hooks):
            raise ConfigError(
                "the tabular-cox task does not support record-level differential privacy (DP-SGD): "
                "the Cox partial likelihood couples patients within a batch, so per-sample clipping "
                "does not bound one record's influence; disable it or use a classification task",
                field="plan.privacy.record_level.enabled",
            )
        time = _survival_time(data)
        n = len(data)
        if n == 0:
            return TrainResult(num_examples=0, steps=0, metrics={})
        x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
        event = np.asarray(data.y)
        optimizer = make_optimizer(model, plan)
        batch = min(plan.local.batch_size, n)
        total_steps = planned_steps(n, plan.local)
        device = model_device(model)
        model.train()
        steps, loss_sum, seen = 0, 0.0, 0
        for index in shuffled_batches(n, batch=batch, steps=total_steps, seed=seed):
            optimizer.zero_grad(set_to_none=True)
            risk = model(x[torch.from_numpy(index)].to(device)).reshape(-1)
            loss: Any = cox_partial_likelihood_loss(risk, time[index], event[index])
            for hook in hooks:
                loss = hook.on_loss(model, loss)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            if steps < total_steps and stop_requested(hooks):
                break
        return TrainResult(num_examples=n, steps=steps, metrics={"train_loss": loss_sum / seen})

    def evaluate(self, model: Any, data: Split) -> dict[str, float]:
        """``c_index`` (NaN without comparable pairs) and ``loss`` of the model on ``data``.

        Raises
        ------
        DataError
            If ``data`` has no survival times.
        """
        import torch

        time = _survival_time(data)
        if len(data) == 0:
            return {}
        model.eval()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)).to(model_device(model))
            risk = model(x).reshape(-1)
            loss = float(cox_partial_likelihood_loss(risk, time, data.y))
        return {"c_index": concordance_index(time, data.y, risk.cpu().numpy()), "loss": loss}


def _survival_time(data: Split) -> np.ndarray:
    if data.time is None:
        raise DataError(
            "the tabular-cox task needs survival data (a split with time); "
            "this dataset has labels only; use a survival dataset such as tcga-brca"
        )
    return np.asarray(data.time, dtype=np.float64)
