"""Record-level DP-SGD through Opacus, as a training hook the task never sees.

:class:`DPSGD` wraps the task's own model, optimizer and data loader with
Opacus's ``PrivacyEngine.make_private``: per-example gradients clipped to
``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm`` on
their sum, and Poisson sampling with rate ``1 / batches per epoch``. What one
round spends is the :class:`~fedcare.privacy.dp.accountant.Mechanism` given by
:func:`round_mechanism`; the node accounts it in the site's ledger, not here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from fedcare.plan import LocalTraining
from fedcare.privacy.dp.accountant import Mechanism
from fedcare.tasks.base import TrainHook

__all__ = ["DPSGD", "round_mechanism"]

# Opacus's per-example gradient hooks fire on layer outputs only: the inputs never need a
# gradient, which torch reports on every backward pass. Benign; this one message is silenced
# (a filter, not ``catch_warnings``, which is not thread-safe and simulated sites train in threads).
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with respect to module outputs",
    category=UserWarning,
)


def round_mechanism(num_examples: int, local: LocalTraining, *, noise_multiplier: float) -> Mechanism:
    """The DP-SGD mechanism one round of ``local`` training on ``num_examples`` records runs.

    Opacus samples each record with probability ``1 / len(data_loader)``, that
    is ``1 / ceil(n / batch)``, and the round takes
    :func:`~fedcare.tasks.torch_task.planned_steps` steps.

    Examples
    --------
    >>> m = round_mechanism(199, LocalTraining(epochs=2, batch_size=32), noise_multiplier=1.5)
    >>> round(m.sample_rate, 4), m.steps
    (0.1429, 14)
    """
    from fedcare.tasks.torch_task import planned_steps

    batch = min(local.batch_size, num_examples)
    batches_per_epoch = -(-num_examples // batch)
    return Mechanism(
        noise_multiplier=noise_multiplier,
        sample_rate=1.0 / batches_per_epoch,
        steps=planned_steps(num_examples, local),
        label="dp-sgd",
    )


class DPSGD(TrainHook):
    """DP-SGD for one round of training (Opacus ``make_private``, Poisson sampling).

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over ``max_grad_norm``.
    max_grad_norm : float
        Per-example L2 clipping bound.
    noise_seed : int, optional
        Seed of the noise generator. ``None`` (deployments) draws it from the
        operating system, so nobody can predict the noise; simulations pass a
        seed so that a study can be repeated.

    Examples
    --------
    >>> hook = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)
    >>> hook.needs_data_loader
    True
    """

    needs_data_loader = True

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, noise_seed: int | None = None) -> None:
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.noise_seed = noise_seed
        self.sample_rate: float | None = None
        self._private_model: Any = None

    def wrap(self, model: Any, optimizer: Any, data_loader: Any) -> tuple[Any, Any, Any]:
        """Return Opacus's private model, optimizer and Poisson-sampling loader."""
        import torch
        from opacus import PrivacyEngine

        from fedcare.tasks.torch_task import model_device

        generator = torch.Generator(device=model_device(model))  # Opacus draws the noise where the gradients are
        seed = self.noise_seed if self.noise_seed is not None else int.from_bytes(os.urandom(8), "big") >> 1
        generator.manual_seed(seed)
        with warnings.catch_warnings():
            # Opacus warns that its secure RNG is off; the seed above comes from the OS when it matters.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")  # unused: the site's ledger does the accounting
            private_model, private_optimizer, private_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=data_loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                noise_generator=generator,
            )
        self._private_model = private_model
        self.sample_rate = float(private_loader.sample_rate)
        return private_model, private_optimizer, private_loader

    def close(self) -> None:
        """Remove Opacus's hooks and per-example gradients from the task's model."""
        if self._private_model is not None:
            self._private_model._close()
            self._private_model = None
