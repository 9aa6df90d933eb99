"""The imaging tasks: image-cnn, image-resnet18, volume-cnn3d, and training-time augmentation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedcare.errors import ConfigError
from fedcare.plan import Plan, parse_plan
from fedcare.simulation import simulate
from fedcare.tasks.base import DataSpec, Split
from fedcare.tasks.imaging import ImageCNNTask, ImageResNet18Task, VolumeCNN3DTask, augment_batch
from fedcare.tasks.registry import TaskRegistry
from fedcare.tasks.tabular import MLPTask

IMAGE = DataSpec(num_features=784, num_classes=2, input_shape=(1, 28, 28))
RGB5 = DataSpec(num_features=3 * 28 * 28, num_classes=5, input_shape=(3, 28, 28))
VOLUME = DataSpec(num_features=8 * 16 * 16, num_classes=2, input_shape=(1, 8, 16, 16))


def make_plan(task: str, **sections: Any) -> Plan:
    return parse_plan({"task": task, "dataset": {"name": "x", "normalization": "none"}, "rounds": 1, **sections})


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_image_cnn_gives_one_logit_for_binary_and_one_per_class_otherwise() -> None:
    plan = make_plan("image-cnn")
    binary = ImageCNNTask().build_model(IMAGE, plan, seed=0)
    multiclass = ImageCNNTask().build_model(RGB5, plan, seed=0)
    assert binary(torch.zeros(4, 1, 28, 28)).shape == (4, 1)
    assert multiclass(torch.zeros(4, 3, 28, 28)).shape == (4, 5)


def test_image_cnn_width_sets_the_channels() -> None:
    narrow = ImageCNNTask().build_model(IMAGE, make_plan("image-cnn", model={"width": 8}), seed=0)
    wide = ImageCNNTask().build_model(IMAGE, make_plan("image-cnn", model={"width": 32}), seed=0)
    assert param_count(narrow) == 5977
    assert param_count(wide) > 3 * param_count(narrow)


def test_resnet18_at_width_64_has_resnet18_size_and_keeps_28x28_resolution_in_its_stem() -> None:
    model = ImageResNet18Task().build_model(RGB5, make_plan("image-resnet18", model={"width": 64}), seed=0)
    assert 11.0e6 < param_count(model) < 11.3e6
    stem = model[0]
    assert isinstance(stem, torch.nn.Conv2d) and stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 5)


def test_fedbn_keeps_batch_norm_tensors_local_and_group_norm_has_none() -> None:
    task = ImageResNet18Task()
    batch = task.build_model(IMAGE, make_plan("image-resnet18", model={"norm": "batch"}), seed=0)
    group = task.build_model(IMAGE, make_plan("image-resnet18", model={"norm": "group"}), seed=0)
    local = task.local_parameter_names(batch)
    assert local and all(name in task.get_parameters(batch) for name in local)
    assert any(name.endswith("running_mean") for name in local)
    assert task.local_parameter_names(group) == ()
    assert any(isinstance(m, torch.nn.GroupNorm) for m in group.modules())


def test_resnet18_refuses_no_normalization() -> None:
    with pytest.raises(ConfigError) as caught:
        ImageResNet18Task().build_model(IMAGE, make_plan("image-resnet18", model={"norm": "none"}))
    assert caught.value.field == "plan.model.norm"


@pytest.mark.parametrize(
    ("task", "spec"),
    [(ImageCNNTask(), DataSpec(num_features=13, num_classes=2)), (VolumeCNN3DTask(), IMAGE), (ImageResNet18Task(), VOLUME)],
)
def test_task_refuses_examples_of_the_wrong_rank(task: Any, spec: DataSpec) -> None:
    with pytest.raises(ConfigError) as caught:
        task.build_model(spec, make_plan(task.name))
    assert caught.value.field == "plan.dataset.input_shape"
    assert str(spec.shape) in str(caught.value)


def test_volume_cnn3d_trains_on_a_small_volume_and_its_loss_decreases() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=64)
    x = rng.normal(0.0, 1.0, size=(64, *VOLUME.shape)).astype(np.float32)
    x[:, :, 2:6, 4:12, 4:12] += 1.5 * y[:, None, None, None, None]  # a bright cube marks class 1
    split = Split(x=x, y=y.astype(np.int64))
    plan = make_plan(
        "volume-cnn3d", model={"width": 4, "norm": "group"},
        local={"epochs": 1, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.01},
    )  # fmt: skip
    task = VolumeCNN3DTask()
    model = task.build_model(VOLUME, plan, seed=0)
    losses = [task.train(model, split, plan, seed=epoch).metrics["train_loss"] for epoch in range(6)]
    assert losses[-1] < 0.8 * losses[0]
    assert task.evaluate(model, split)["accuracy"] > 0.8


def test_augmentation_is_deterministic_for_a_seed_and_differs_between_seeds() -> None:
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(0))

    def augmented(seed: int) -> torch.Tensor:
        return augment_batch(x, flip=True, padding=2, intensity_jitter=0.1, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(augmented(1), augmented(1))
    assert not torch.equal(augmented(1), augmented(2))
    assert augmented(1).shape == x.shape


def test_augmentation_leaves_its_input_unchanged() -> None:
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    augment_batch(x, flip=True, padding=1, intensity_jitter=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


def test_flip_only_mirrors_examples_along_their_width() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4).repeat(8, 1, 1, 1)
    out = augment_batch(x, flip=True, padding=0, intensity_jitter=0.0, generator=torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_training_with_augmentation_is_reproducible_and_evaluation_is_not_augmented() -> None:
    rng = np.random.default_rng(0)
    split = Split(x=rng.random((40, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 2, size=40).astype(np.int64))
    plan = make_plan("image-cnn", model={"width": 4, "augment": "flip-crop", "intensity_jitter": 0.1},
                     local={"epochs": 1, "batch_size": 8})  # fmt: skip
    task = ImageCNNTask()
    weights = []
    for _ in range(2):
        model = task.build_model(IMAGE, plan, seed=0)
        task.train(model, split, plan, seed=7)
        weights.append(task.get_parameters(model).flatten().copy())
        first, second = task.evaluate(model, split), task.evaluate(model, split)
        assert first == second
    np.testing.assert_array_equal(weights[0], weights[1])
    unaugmented = make_plan("image-cnn", model={"width": 4}, local={"epochs": 1, "batch_size": 8})
    model = task.build_model(IMAGE, unaugmented, seed=0)
    task.train(model, split, unaugmented, seed=7)
    assert not np.array_equal(task.get_parameters(model).flatten(), weights[0])


def test_tabular_tasks_do_not_augment() -> None:
    x = torch.ones(3, 13)
    assert MLPTask().augment(x, make_plan("tabular-mlp"), generator=torch.Generator()) is x


def test_plan_refuses_batch_norm_image_model_with_record_level_dp_and_allows_group_norm() -> None:
    sections = {"privacy": {"record_level": {"enabled": True, "noise_multiplier": 1.0}}}
    with pytest.raises(ConfigError) as caught:
        make_plan("image-cnn", **sections)
    assert caught.value.field == "plan.model.norm"
    assert make_plan("image-cnn", model={"norm": "group"}, **sections).model.norm == "group"
    assert make_plan("tabular-mlp", **sections).model.norm == "batch"  # not an imaging task: ignored


def test_plan_refuses_balanced_class_weights_with_record_level_dp() -> None:
    with pytest.raises(ConfigError) as caught:
        make_plan("image-cnn", model={"norm": "group"}, local={"class_weighting": "balanced"},
                  privacy={"record_level": {"enabled": True, "noise_multiplier": 1.0}})  # fmt: skip
    assert caught.value.field == "plan.local.class_weighting"


def test_balanced_class_weighting_changes_training_of_a_skewed_site() -> None:
    rng = np.random.default_rng(0)
    split = Split(x=rng.random((32, 1, 28, 28), dtype=np.float32), y=(np.arange(32) < 4).astype(np.int64))
    trained = {}
    for weighting in ("none", "balanced"):
        plan = make_plan("image-cnn", model={"width": 4}, local={"epochs": 1, "batch_size": 8, "class_weighting": weighting})
        model = ImageCNNTask().build_model(IMAGE, plan, seed=0)
        ImageCNNTask().train(model, split, plan, seed=0)
        trained[weighting] = ImageCNNTask().get_parameters(model).flatten().copy()
    assert not np.array_equal(trained["none"], trained["balanced"])


def test_image_cnn_with_group_norm_trains_a_round_under_record_level_dp() -> None:
    plan = parse_plan(
        {
            "task": "image-cnn",
            "dataset": {"name": "breast", "normalization": "none", "num_nodes": 2},
            "rounds": 1,
            "model": {"width": 4, "norm": "group", "augment": "flip-crop"},
            "local": {"epochs": 1, "batch_size": 32, "learning_rate": 0.1},
            "privacy": {"record_level": {"enabled": True, "epsilon": 1.0, "max_grad_norm": 1.0}},  # the noise that spends 1
        }
    )
    result = simulate(plan, registry=TaskRegistry.from_entry_points())
    assert result.rounds_completed == 1 and not result.failures
    assert set(result.epsilon_spent) == {"site-0", "site-1"}
    assert all(0 < eps <= 1.0 + 1e-6 for eps in result.epsilon_spent.values())
    assert result.final_evaluation is not None and 0.0 <= result.final_evaluation.mean["accuracy"] <= 1.0
