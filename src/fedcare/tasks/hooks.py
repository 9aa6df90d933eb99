"""Training hooks that change the local objective: FedProx's proximal term, SCAFFOLD's correction.

Both work on any ``torch.nn.Module``: they capture the module's trainable
parameters when they are created (before training) and add a term to each
batch's loss in :meth:`~fedcare.tasks.base.TrainHook.on_loss`. They keep the
captured parameter objects, so a wrapper around the model (Opacus's
``GradSampleModule``) does not hide them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np

from fedcare.errors import ConfigError
from fedcare.params import Parameters
from fedcare.tasks.base import TrainHook

__all__ = ["ControlVariateCorrection", "ProximalTerm", "trainable_only"]


def _trainable(model: Any) -> list[tuple[str, Any]]:
    named = getattr(model, "named_parameters", None)
    if named is None:
        raise ConfigError("this hook needs a torch.nn.Module model", field="task")
    return [(name, p) for name, p in named() if p.requires_grad]


@contextlib.contextmanager
def trainable_only(model: Any, names: Collection[str]) -> Iterator[None]:
    """Within the block, only the parameters named in ``names`` get gradients; the others stay as they are.

    The others' ``requires_grad`` is off, so they get no gradient and
    torch's optimizers skip them entirely (no weight decay, no momentum step).
    Names of buffers (BatchNorm's running statistics) may be in ``names``;
    buffers have no gradient and change only as the module itself changes
    them. Every flag is restored on exit, even when the block fails.

    Raises
    ------
    ConfigError
        If ``model`` is not a torch module.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> with trainable_only(model, {"1.weight", "1.bias"}):
    ...     [name for name, p in model.named_parameters() if p.requires_grad]
    ['1.weight', '1.bias']
    >>> all(p.requires_grad for p in model.parameters())
    True
    """
    named = _trainable(model)
    keep = set(names)
    try:
        for name, parameter in named:
            if name not in keep:
                parameter.requires_grad_(False)
        yield
    finally:
        for _, parameter in named:
            parameter.requires_grad_(True)


class ProximalTerm(TrainHook):
    """FedProx (Li et al. 2020): add ``mu / 2 * ||w - w_global||^2`` to every batch's loss.

    ``w_global`` is the model's weights when the hook is created, so create it
    after loading the global weights and before training.

    Parameters
    ----------
    model : torch.nn.Module
        The model about to be trained, holding the global weights.
    mu : float
        Weight of the term (>= 0); 0 leaves training unchanged.

    Raises
    ------
    ConfigError
        If ``mu`` is negative or not finite, or ``model`` is not a torch module.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> hook = ProximalTerm(model, mu=2.0)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> round(float(hook.on_loss(model, torch.tensor(0.0)).detach()), 4)
    2.0
    """

    def __init__(self, model: Any, *, mu: float) -> None:
        if not (np.isfinite(mu) and mu >= 0):
            raise ConfigError(f"proximal_mu must be >= 0 and finite, got {mu}", field="plan.strategy.proximal_mu")
        self.mu = float(mu)
        self._pairs = [(p, p.detach().clone()) for _, p in _trainable(model)]

    def on_loss(self, model: Any, loss: Any) -> Any:
        if self.mu == 0:
            return loss
        term = sum(((p - anchor) ** 2).sum() for p, anchor in self._pairs)
        return loss + 0.5 * self.mu * term


class ControlVariateCorrection(TrainHook):
    """SCAFFOLD's corrected gradient: add ``<w, c - c_i>`` to every batch's loss.

    The gradient of that linear term is ``c - c_i``, so each optimizer step uses
    ``g(w) - c_i + c`` (Karimireddy et al. 2020, Algorithm 1, line 10).

    Parameters
    ----------
    model : torch.nn.Module
        The model about to be trained.
    correction : Parameters
        ``c - c_i``, with the task's tensor names; tensors that are not
        trainable parameters of ``model`` (buffers) are ignored.

    Raises
    ------
    ConfigError
        If ``model`` is not a torch module or a tensor's shape differs.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> hook = ControlVariateCorrection(model, Parameters({"weight": [[1.0, 0.0]], "bias": [0.5]}))
    >>> loss = hook.on_loss(model, torch.tensor(0.0))
    >>> loss.backward()
    >>> model.weight.grad.tolist(), model.bias.grad.tolist()
    ([[1.0, 0.0]], [0.5])
    """

    def __init__(self, model: Any, correction: Parameters) -> None:
        import torch

        names = dict(correction.spec)
        self._pairs: list[tuple[Any, Any]] = []
        for name, p in _trainable(model):
            if name not in names:
                continue
            value = correction[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ConfigError(
                    f"control variate {name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}",
                    field="plan.strategy.name",
                )
            self._pairs.append((p, torch.as_tensor(np.array(value, dtype=np.float32)).to(p.device)))

    def on_loss(self, model: Any, loss: Any) -> Any:
        term = sum((p * direction).sum() for p, direction in self._pairs)
        return loss + term
