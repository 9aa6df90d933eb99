"""A base class for tasks whose model is a ``torch.nn.Module``."""

from __future__ import annotations

import abc
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcare.errors import ProtocolError
from fedcare.metrics import binary_metrics, multiclass_metrics
from fedcare.params import Parameters
from fedcare.plan import LocalTraining, Plan
from fedcare.tasks.base import DataSpec, Split, Task, TrainHook, TrainResult

if TYPE_CHECKING:
    import torch

__all__ = [
    "TorchClassificationTask", "balanced_class_weights", "dropout", "model_device", "planned_steps", "seed_dropout",
    "shuffled_batches", "stop_requested",
]  # fmt: skip


class TorchClassificationTask(Task):
    """Supervised classification with a PyTorch module on in-memory arrays.

    Subclasses only implement :meth:`make_module`. Binary tasks use one logit
    and binary cross-entropy; multi-class tasks use cross-entropy. Batches are
    drawn from a ``numpy.random.Generator`` seeded by the coordinator, so a
    run is reproducible whatever the transport and thread schedule.

    The model trains and evaluates on the device it sits on
    (:meth:`to_device`); batches are drawn, augmented and dropout masks
    drawn on the CPU, then moved there, so the randomness is the same on
    every device, and on the CPU training is exactly what it always was.

    Subclasses may override :meth:`augment` to change each training batch
    (imaging tasks flip and shift images); by default batches are used as
    they are. With ``plan.local.class_weighting: balanced`` each example's
    loss is weighted by :func:`balanced_class_weights` of the site's labels.
    """

    def augment(self, x: torch.Tensor, plan: Plan, *, generator: torch.Generator) -> torch.Tensor:
        """Return the training batch ``x`` to train on; the default returns it unchanged.

        Called on every training batch, in both training loops (plain and
        DP-SGD), never in :meth:`evaluate`. ``generator`` is seeded from the
        round's training seed, so an override that draws only from it is
        reproducible. An override must not modify ``x`` in place.

        Parameters
        ----------
        x : torch.Tensor
            ``(batch, *input_shape)`` float32 examples.
        plan : Plan
            The run's plan (augmentation options live in ``plan.model``).
        generator : torch.Generator
            The only source of randomness to draw from.

        Returns
        -------
        torch.Tensor
            A batch of the same shape.

        Examples
        --------
        >>> import torch
        >>> from fedcare.plan import parse_plan
        >>> from fedcare.tasks.tabular import MLPTask
        >>> plan = parse_plan({"task": "tabular-mlp", "dataset": {"name": "x"}, "rounds": 1})
        >>> x = torch.ones(2, 3)
        >>> MLPTask().augment(x, plan, generator=torch.Generator()) is x
        True
        """
        return x

    @abc.abstractmethod
    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        """Return a new, randomly initialised module."""

    def build_model(self, spec: DataSpec, plan: Plan, *, seed: int | None = None) -> Any:
        import torch

        if seed is None:
            return self.make_module(spec, plan)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_module(spec, plan)

    def get_parameters(self, model: Any) -> Parameters:
        state = model.state_dict()
        parameters = Parameters(
            {name: t.detach().cpu().numpy() for name, t in state.items() if t.is_floating_point()}
        )
        parameters.flatten()  # copies into one fresh buffer: detached from the live model
        return parameters

    def to_device(self, model: Any, device: str) -> Any:
        """Move the module's parameters and buffers to ``device``, in place; return it.

        Examples
        --------
        >>> import torch
        >>> from fedcare.tasks.tabular import MLPTask
        >>> MLPTask().to_device(torch.nn.Linear(2, 1), "cpu").weight.device.type
        'cpu'
        """
        return model.to(device)

    def set_parameters(self, model: Any, parameters: Parameters) -> None:
        state = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
        if list(state) != list(parameters):
            raise ProtocolError(
                f"parameters name {len(parameters)} tensors, the model has {len(state)} "
                "with other names; is the node running the same task version?"
            )
        for name, tensor in state.items():
            incoming = parameters[name]
            if tuple(tensor.shape) != incoming.shape:
                raise ProtocolError(
                    f"tensor {name!r} has shape {incoming.shape}, the model expects "
                    f"{tuple(tensor.shape)}"
                )
            if tensor.device.type == "cpu":
                np.copyto(tensor.detach().numpy(), incoming)
            else:
                import torch

                with torch.no_grad():
                    tensor.copy_(torch.tensor(incoming))  # a copy: the incoming array may be read-only

    def local_parameter_names(self, model: Any) -> tuple[str, ...]:
        """Floating tensors (weights, biases, running statistics) of the model's BatchNorm layers.

        These are the tensors ``fedbn`` keeps local; a model without BatchNorm
        has none, and ``fedbn`` is then FedAvg.

        Examples
        --------
        >>> import torch
        >>> from fedcare.tasks.tabular import MLPTask
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> MLPTask().local_parameter_names(model)
        ('1.weight', '1.bias', '1.running_mean', '1.running_var')
        """
        import torch

        names: list[str] = []
        for prefix, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for name, tensor in module.state_dict().items():
                    if tensor.is_floating_point():
                        names.append(f"{prefix}.{name}" if prefix else name)
        return tuple(names)

    def train(
        self,
        model: Any,
        data: Split,
        plan: Plan,
        *,
        seed: int,
        hooks: Sequence[TrainHook] = (),
    ) -> TrainResult:
        import torch

        local = plan.local
        n = len(data)
        if n == 0:
            return TrainResult(num_examples=0, steps=0, metrics={})
        x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
        binary = model_outputs(model) == 1
        y = torch.from_numpy(data.y.astype(np.float32 if binary else np.int64, copy=False))
        loss_fn: Any = (
            torch.nn.functional.binary_cross_entropy_with_logits
            if binary
            else torch.nn.functional.cross_entropy
        )
        optimizer = make_optimizer(model, plan)
        batch = min(local.batch_size, n)
        total_steps = planned_steps(n, local)
        device = model_device(model)
        weights: torch.Tensor | None = None
        if local.class_weighting == "balanced":
            classes = 2 if binary else model_outputs(model)
            weights = torch.from_numpy(balanced_class_weights(data.y, num_classes=classes)).to(device)
        augmentation = torch.Generator()
        augmentation.manual_seed(_augmentation_seed(seed))
        seed_dropout(model, seed)

        def augment(xb: torch.Tensor) -> torch.Tensor:
            return self.augment(xb, plan, generator=augmentation)

        model.train()
        if any(hook.needs_data_loader for hook in hooks):
            return _train_from_loader(
                model, optimizer, x, y, loss_fn, binary=binary, batch=batch, seed=seed, total_steps=total_steps,
                hooks=hooks, augment=augment, weights=weights, device=device,
            )  # fmt: skip
        steps = 0
        loss_sum = 0.0
        seen = 0
        for rows in shuffled_batches(n, batch=batch, steps=total_steps, seed=seed):
            index = torch.from_numpy(rows)
            xb, yb = augment(x[index]).to(device), y[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            output = model(xb)
            if binary:
                output = output.reshape(-1)
            if weights is None:
                loss = loss_fn(output, yb)
            else:
                loss = (loss_fn(output, yb, reduction="none") * weights[yb.long()]).mean()
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
        import torch

        if len(data) == 0:
            return {}
        model.eval()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)).to(model_device(model))
            output = model(x).cpu()
        if model_outputs(model) == 1:
            probability = torch.sigmoid(output.reshape(-1)).numpy()
            return binary_metrics(data.y, probability)
        return multiclass_metrics(data.y, torch.softmax(output, dim=1).numpy())


def shuffled_batches(n: int, *, batch: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches of row indices: passes over ``n`` rows, each in a fresh order seeded by ``seed``.

    Examples
    --------
    >>> [b.tolist() for b in shuffled_batches(3, batch=2, steps=3, seed=0)]
    [[2, 0], [1], [2, 1]]
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    position = 0
    for _ in range(steps):
        if position >= n:
            order = rng.permutation(n)
            position = 0
        yield order[position : position + batch]
        position += batch


def planned_steps(num_examples: int, local: LocalTraining) -> int:
    """Optimizer steps of one round: ``local.steps``, or ``epochs`` passes of ``ceil(n / batch)`` batches.

    Examples
    --------
    >>> from fedcare.plan import LocalTraining
    >>> planned_steps(199, LocalTraining(epochs=2, batch_size=32)), planned_steps(30, LocalTraining(steps=5))
    (14, 5)
    """
    if local.steps is not None:
        return local.steps
    batch = min(local.batch_size, num_examples)
    return -(-num_examples // batch) * (local.epochs or 1)


def balanced_class_weights(y: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Loss weight of each class, ``n / (classes present * n_class)`` (scikit-learn's ``balanced``).

    A class absent from ``y`` gets weight 1 (it weighs no example anyway).

    Parameters
    ----------
    y : numpy.ndarray
        ``(n,)`` integer labels of the site's training split.
    num_classes : int
        Number of classes of the task.

    Returns
    -------
    numpy.ndarray
        ``(num_classes,)`` float32 weights.

    Examples
    --------
    >>> balanced_class_weights(np.array([0, 1, 1, 1]), num_classes=2).tolist()
    [2.0, 0.6666666865348816]
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes, dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


@functools.cache
def _seeded_dropout_class() -> Any:
    import torch

    class SeededDropout(torch.nn.Module):
        """Dropout drawing its masks from its own generator (see :func:`dropout`)."""

        def __init__(self, p: float) -> None:
            super().__init__()
            self.p = p
            self.generator = torch.Generator()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            # Drawn on the CPU, whatever the device: the same masks everywhere.
            keep = (torch.rand(x.shape, generator=self.generator, dtype=x.dtype) >= self.p).to(x.device)
            return x * keep / (1 - self.p)

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return SeededDropout


def dropout(p: float) -> torch.nn.Module:
    """A dropout layer whose masks come from its own generator, seeded per round by :func:`seed_dropout`.

    ``torch.nn.Dropout`` draws from torch's one process-wide generator, which
    nodes training in parallel threads share, so its masks — and the model —
    would depend on the thread schedule.

    Examples
    --------
    >>> import torch
    >>> layer = dropout(0.5).train()
    >>> seed_dropout(layer, 7); a = layer(torch.ones(8))
    >>> seed_dropout(layer, 7); b = layer(torch.ones(8))
    >>> bool((a == b).all()), set(a.tolist()) <= {0.0, 2.0}
    (True, True)
    """
    module: torch.nn.Module = _seeded_dropout_class()(p)
    return module


def seed_dropout(model: Any, seed: int) -> None:
    """Seed every :func:`dropout` layer of ``model`` from the round's ``seed``, each layer its own stream."""
    kind = _seeded_dropout_class()
    layers = [module for module in model.modules() if isinstance(module, kind)]
    for index, layer in enumerate(layers):
        layer.generator.manual_seed(int(np.random.SeedSequence(seed, spawn_key=(0x44524F50, index)).generate_state(1)[0]))


def _augmentation_seed(seed: int) -> int:
    """The augmentation generator's seed: derived from the round seed, apart from the batch order's stream."""
    return int(np.random.SeedSequence(seed, spawn_key=(0x41554731,)).generate_state(1)[0])


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _train_from_loader(
    model: Any,
    optimizer: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Any,
    *,
    binary: bool,
    batch: int,
    seed: int,
    total_steps: int,
    hooks: Sequence[TrainHook],
    augment: Callable[[torch.Tensor], torch.Tensor] = _identity,
    weights: torch.Tensor | None = None,
    device: Any = "cpu",
) -> TrainResult:
    """Train from a shuffling ``DataLoader`` that the hooks may replace (DP-SGD's Poisson sampling).

    The loader yields CPU batches; each is augmented there, then moved to ``device``.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator()
    generator.manual_seed(seed)
    loader: Any = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=generator)
    trained, opened = model, []
    try:
        for hook in hooks:
            trained, optimizer, loader = hook.wrap(trained, optimizer, loader)
            opened.append(hook)
        steps, loss_sum, seen = 0, 0.0, 0
        batches = iter(loader)
        while steps < total_steps:
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            xb = (augment(xb) if len(yb) else xb).to(device)
            yb = yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            output = trained(xb)
            if binary:
                output = output.reshape(-1)
            # A Poisson batch may be empty: its step still adds noise, from a zero (not NaN) loss.
            if weights is None:
                loss = loss_fn(output, yb, reduction="sum") / max(len(yb), 1)
            else:
                loss = (loss_fn(output, yb, reduction="none") * weights[yb.long()]).sum() / max(len(yb), 1)
            for hook in hooks:
                loss = hook.on_loss(trained, loss)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(yb)
            seen += len(yb)
            if steps < total_steps and stop_requested(hooks):
                break
    finally:
        for hook in reversed(opened):
            hook.close()
    return TrainResult(num_examples=len(y), steps=steps, metrics={"train_loss": loss_sum / max(seen, 1)})


def stop_requested(hooks: Sequence[TrainHook]) -> bool:
    """Whether any hook asks training to stop now (:meth:`~fedcare.tasks.base.TrainHook.should_stop`).

    Every hook is asked, so each one's own record (a budget's ``stopped``) is current.

    Examples
    --------
    >>> stop_requested([TrainHook()]), stop_requested([])
    (False, False)
    """
    answers = [hook.should_stop() for hook in hooks]
    return any(answers)


def model_device(model: Any) -> torch.device:
    """The device of the module's first parameter (or buffer); the CPU for a module with neither.

    Examples
    --------
    >>> import torch
    >>> model_device(torch.nn.Linear(2, 1)).type, model_device(torch.nn.ReLU()).type
    ('cpu', 'cpu')
    """
    import torch

    for tensor in itertools.chain(model.parameters(), model.buffers()):
        device: torch.device = tensor.device
        return device
    return torch.device("cpu")


def model_outputs(model: Any) -> int:
    """Number of output units of a module whose last layer is ``Linear``."""
    import torch

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return int(last.out_features)


def make_optimizer(model: Any, plan: Plan) -> Any:
    """The optimizer ``plan.local`` names, over the model's parameters."""
    import torch

    local = plan.local
    if local.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=local.learning_rate, weight_decay=local.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=local.learning_rate,
        momentum=local.momentum,
        weight_decay=local.weight_decay,
    )
