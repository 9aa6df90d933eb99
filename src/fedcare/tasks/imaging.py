"""Built-in tasks for images and volumes: a small CNN, ResNet-18 and a small 3D CNN.

Every task reads the example shape and the classes from the :class:`DataSpec`
(``spec.shape``, ``spec.num_classes``; two classes give one logit, as for the
tabular tasks) and its architecture from ``plan.model``: ``width`` (channels of
the first convolution), ``norm`` (``batch``, ``group`` or ``none``) and
``dropout`` (before the last layer). Training batches are augmented as
``plan.model.augment``, ``crop_padding`` and ``intensity_jitter`` ask
(:func:`augment_batch`); evaluation never is.

BatchNorm layers keep running statistics, which travel as parameters and
which ``fedbn`` keeps at each site; GroupNorm has none and is the choice for
record-level DP (DP-SGD refuses BatchNorm).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedcare.errors import ConfigError
from fedcare.plan import Plan
from fedcare.tasks.base import DataSpec
from fedcare.tasks.torch_task import TorchClassificationTask, dropout

__all__ = ["ImageCNNTask", "ImageResNet18Task", "VolumeCNN3DTask", "augment_batch"]


def augment_batch(
    x: torch.Tensor,
    *,
    flip: bool,
    padding: int,
    intensity_jitter: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Randomly flip, shift and rescale the intensities of a batch of images or volumes.

    Each example is drawn on its own: mirrored along its last (width) axis
    with probability 1/2 when ``flip``; shifted by up to ``padding`` voxels
    along every spatial axis (zero padding, then a crop back to the input
    size); and, when ``intensity_jitter`` ``j`` is above 0, scaled by a factor
    from ``U[1 - j, 1 + j]`` and offset by one from ``U[-j / 2, j / 2]``.

    Parameters
    ----------
    x : torch.Tensor
        ``(batch, channels, *spatial)`` float examples; not modified.
    flip : bool
        Random horizontal flips.
    padding : int
        Largest shift, in pixels (voxels); 0 for none.
    intensity_jitter : float
        Half-width of the random intensity scale, in [0, 1).
    generator : torch.Generator
        The only source of randomness: the same seed gives the same batch.

    Returns
    -------
    torch.Tensor
        A new batch of the same shape (``x`` itself when nothing is asked).

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(16.0).reshape(2, 1, 2, 4)
    >>> a = augment_batch(x, flip=True, padding=1, intensity_jitter=0.1, generator=torch.Generator().manual_seed(0))
    >>> b = augment_batch(x, flip=True, padding=1, intensity_jitter=0.1, generator=torch.Generator().manual_seed(0))
    >>> a.shape == x.shape and bool(torch.equal(a, b))
    True
    >>> augment_batch(x, flip=False, padding=0, intensity_jitter=0.0, generator=torch.Generator()) is x
    True
    """
    if x.dim() < 3:
        raise ConfigError(
            f"augmentation needs (batch, channels, *spatial) examples, got shape {tuple(x.shape)}",
            field="plan.model.augment",
        )
    batch = x.shape[0]
    spatial = x.dim() - 2
    broadcast = (batch,) + (1,) * (x.dim() - 1)
    out = x
    if flip:
        mirrored = torch.rand(batch, generator=generator) < 0.5
        out = torch.where(mirrored.view(broadcast), out.flip(-1), out)
    if padding > 0:
        padded = torch.nn.functional.pad(out, (padding,) * (2 * spatial))
        offsets = torch.randint(0, 2 * padding + 1, (batch, spatial), generator=generator).tolist()
        sizes = x.shape[2:]
        out = torch.stack(
            [
                padded[i][(slice(None), *(slice(o, o + s) for o, s in zip(offsets[i], sizes, strict=True)))]
                for i in range(batch)
            ]
        )
    if intensity_jitter > 0:
        scale = 1.0 + (torch.rand(batch, generator=generator) * 2.0 - 1.0) * intensity_jitter
        offset = (torch.rand(batch, generator=generator) - 0.5) * intensity_jitter
        out = out * scale.view(broadcast).to(out.dtype) + offset.view(broadcast).to(out.dtype)
    return out


def _outputs(spec: DataSpec) -> int:
    return 1 if spec.num_classes == 2 else spec.num_classes


def _norm(kind: str, channels: int, *, spatial: int) -> torch.nn.Module:
    if kind == "batch":
        return torch.nn.BatchNorm2d(channels) if spatial == 2 else torch.nn.BatchNorm3d(channels)
    if kind == "group":
        return torch.nn.GroupNorm(math.gcd(8, channels), channels)
    return torch.nn.Identity()


def _conv(spatial: int, inputs: int, outputs: int, *, kernel: int, stride: int = 1, bias: bool) -> torch.nn.Module:
    conv = torch.nn.Conv2d if spatial == 2 else torch.nn.Conv3d
    return conv(inputs, outputs, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias)


class _ImagingTask(TorchClassificationTask):
    """Shared by the imaging tasks: the shape check and the augmentation."""

    #: Spatial axes of one example (2 for images, 3 for volumes).
    spatial_axes: ClassVar[int] = 2
    #: How the expected example shape is written in errors.
    shape_words: ClassVar[str] = "(channels, height, width)"

    def _checked_shape(self, spec: DataSpec) -> tuple[int, ...]:
        shape = spec.shape
        if len(shape) != self.spatial_axes + 1:
            raise ConfigError(
                f"task {self.name!r} needs examples of shape {self.shape_words}, but the dataset's examples have "
                f"shape {shape}; use a task for data of that shape (tabular-* for tables)",
                field="plan.dataset.input_shape",
            )
        return shape

    def augment(self, x: torch.Tensor, plan: Plan, *, generator: torch.Generator) -> torch.Tensor:
        """Flip, shift and jitter the training batch as ``plan.model`` asks (:func:`augment_batch`)."""
        model = plan.model
        return augment_batch(
            x,
            flip=model.augment in ("flip", "flip-crop"),
            padding=model.crop_padding if model.augment == "flip-crop" else 0,
            intensity_jitter=model.intensity_jitter,
            generator=generator,
        )

    def _small_cnn(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        """Three conv-norm-ReLU blocks of ``width``, ``2 width``, ``4 width`` channels, max-pooling between."""
        shape = self._checked_shape(spec)
        spatial = self.spatial_axes
        width, norm = plan.model.width, plan.model.norm
        pool = torch.nn.MaxPool2d if spatial == 2 else torch.nn.MaxPool3d
        adaptive = torch.nn.AdaptiveAvgPool2d if spatial == 2 else torch.nn.AdaptiveAvgPool3d
        layers: list[torch.nn.Module] = []
        channels, sizes = shape[0], list(shape[1:])
        for block, out in enumerate((width, 2 * width, 4 * width)):
            layers += [
                _conv(spatial, channels, out, kernel=3, bias=norm == "none"),
                _norm(norm, out, spatial=spatial),
                torch.nn.ReLU(),
            ]
            if block < 2 and min(sizes) >= 2:
                layers.append(pool(2))
                sizes = [s // 2 for s in sizes]
            channels = out
        layers += [adaptive(1), torch.nn.Flatten()]
        if plan.model.dropout > 0:
            layers.append(dropout(plan.model.dropout))
        layers.append(torch.nn.Linear(channels, _outputs(spec)))
        return torch.nn.Sequential(*layers)


class ImageCNNTask(_ImagingTask):
    """A small 2D CNN for ``(channels, height, width)`` images; cheap on a CPU.

    Three blocks of 3x3 convolution, normalization (``plan.model.norm``) and
    ReLU with ``width``, ``2 width`` and ``4 width`` channels, 2x2 max-pooling
    after the first two, global average pooling, dropout and a linear layer.
    With ``width: 16`` it has about 23,500 parameters.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "image-cnn", "dataset": {"name": "x"}, "rounds": 1, "model": {"width": 8}})
    >>> spec = DataSpec(num_features=784, num_classes=2, input_shape=(1, 28, 28))
    >>> model = ImageCNNTask().build_model(spec, plan, seed=0)
    >>> sum(p.numel() for p in model.parameters())
    5977
    >>> ImageCNNTask().build_model(DataSpec(num_features=13, num_classes=2), plan)
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.dataset.input_shape: task 'image-cnn' needs examples of shape (channels, height, width), but the dataset's examples have shape (13,); use a task for data of that shape (tabular-* for tables)
    """

    name = "image-cnn"

    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        return self._small_cnn(spec, plan)


class VolumeCNN3DTask(_ImagingTask):
    """A small 3D CNN for ``(channels, depth, height, width)`` volumes.

    The 3D counterpart of ``image-cnn``: three blocks of 3x3x3 convolution,
    normalization and ReLU (``width``, ``2 width``, ``4 width`` channels),
    2x2x2 max-pooling after the first two, global average pooling, dropout and
    a linear layer.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "volume-cnn3d", "dataset": {"name": "x"}, "rounds": 1,
    ...                    "model": {"width": 4, "norm": "group"}})
    >>> spec = DataSpec(num_features=4096, num_classes=3, input_shape=(1, 16, 16, 16))
    >>> model = VolumeCNN3DTask().build_model(spec, plan, seed=0)
    >>> [shape for _, shape in VolumeCNN3DTask().get_parameters(model).spec][-2:]
    [(3, 16), (3,)]
    """

    name = "volume-cnn3d"
    spatial_axes = 3
    shape_words = "(channels, depth, height, width)"

    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        return self._small_cnn(spec, plan)


class ImageResNet18Task(_ImagingTask):
    """ResNet-18 for small images (28x28 MedMNIST, 32x32 CIFAR): a 3x3 stem and no max-pooling.

    Four stages of two basic blocks with ``width``, ``2 width``, ``4 width``
    and ``8 width`` channels (``width: 64`` is the original ResNet-18, about
    11.2 million parameters; the default 16 has about 0.7 million), strides
    1, 2, 2, 2, global average pooling, dropout and a linear layer.
    ``plan.model.norm`` is ``batch`` (BatchNorm, local under ``fedbn``) or
    ``group`` (GroupNorm, for DP-SGD).

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "image-resnet18", "dataset": {"name": "x"}, "rounds": 1,
    ...                    "model": {"width": 64}})
    >>> spec = DataSpec(num_features=2352, num_classes=10, input_shape=(3, 28, 28))
    >>> model = ImageResNet18Task().build_model(spec, plan, seed=0)
    >>> sum(p.numel() for p in model.parameters())
    11173962
    """

    name = "image-resnet18"

    def make_module(self, spec: DataSpec, plan: Plan) -> torch.nn.Module:
        shape = self._checked_shape(spec)
        norm = plan.model.norm
        if norm == "none":
            raise ConfigError(
                "image-resnet18 needs a normalization layer, got 'none'; use batch (or group with DP-SGD)",
                field="plan.model.norm",
            )
        width = plan.model.width
        layers: list[torch.nn.Module] = [
            _conv(2, shape[0], width, kernel=3, bias=False),
            _norm(norm, width, spatial=2),
            torch.nn.ReLU(),
        ]
        channels = width
        for stage, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if stage == 0 else 2
            layers += [_BasicBlock(channels, out, stride=stride, norm=norm), _BasicBlock(out, out, stride=1, norm=norm)]
            channels = out
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
        if plan.model.dropout > 0:
            layers.append(dropout(plan.model.dropout))
        layers.append(torch.nn.Linear(channels, _outputs(spec)))
        return torch.nn.Sequential(*layers)


class _BasicBlock(torch.nn.Module):
    """ResNet's basic block: two 3x3 convolutions and a shortcut (projected when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, *, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv(2, inputs, outputs, kernel=3, stride=stride, bias=False)
        self.norm1 = _norm(norm, outputs, spatial=2)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = _conv(2, outputs, outputs, kernel=3, bias=False)
        self.norm2 = _norm(norm, outputs, spatial=2)
        self.relu2 = torch.nn.ReLU()
        self.shortcut: torch.nn.Module = torch.nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = torch.nn.Sequential(
                _conv(2, inputs, outputs, kernel=1, stride=stride, bias=False), _norm(norm, outputs, spatial=2)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        result: torch.Tensor = self.relu2(out + self.shortcut(x))
        return result
