"""Federated normalization: per channel for images, and through secure aggregation when it is on."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from fedcare.data.catalog import DatasetCatalog, HeartDisease
from fedcare.data.normalization import Standardization, combine_feature_stats, feature_stats, private_feature_stats
from fedcare.errors import ConfigError
from fedcare.plan import DatasetConfig, parse_plan
from fedcare.simulation import simulate
from fedcare.tasks.base import Split


def _heart_plan(**extra: Any) -> Any:
    return parse_plan({"task": "tabular-logistic", "dataset": {"name": "heart-disease"}, "rounds": 1, **extra})


def _normalization(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in events if e["event"] == "normalization")


def test_heart_disease_records_lie_within_the_public_feature_bounds() -> None:
    bounds = np.asarray(HeartDisease.BOUNDS)
    sites = HeartDisease().load_sites(DatasetConfig(name="heart-disease"))
    x = np.concatenate([split.x for d in sites.values() for split in (d.train, d.test)])
    assert (x >= bounds[:, 0]).all() and (x <= bounds[:, 1]).all()


def test_secure_normalization_equals_the_exact_global_statistics(tmp_path: Any) -> None:
    sites = DatasetCatalog.bundled().get("heart-disease").load_sites(DatasetConfig(name="heart-disease"))
    exact = combine_feature_stats([feature_stats(d.train.x) for d in sites.values()])
    events: list[dict[str, Any]] = []
    simulate(_heart_plan(secure_aggregation={"enabled": True}), out_dir=tmp_path / "run", on_event=events.append)
    event = _normalization(events)
    # The coordinator took part in a real SecAgg+ round: all four sites at every phase.
    assert event["secure_aggregation"]["phases"] == {"u1": 4, "u2": 4, "u3": 4, "u4": 4, "u5": 4}
    assert event["nodes"] == 4 and event["num_examples"] == sum(len(d.train) for d in sites.values())
    saved = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["normalization"]
    # Exact up to the ring's fixed-point quantization.
    np.testing.assert_allclose(saved["mean"], exact.mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(saved["scale"], exact.scale, rtol=1e-4, atol=1e-4)


def test_secure_normalization_is_refused_for_data_without_public_bounds() -> None:
    plan = parse_plan(
        {"task": "tabular-logistic", "dataset": {"name": "breast-cancer", "num_nodes": 3}, "rounds": 1,
         "secure_aggregation": {"enabled": True}}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="needs public bounds for every feature") as caught:
        simulate(plan)
    assert caught.value.field == "plan.dataset.normalization"


def test_image_statistics_are_per_channel_over_every_pixel() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=(5, 3, 4, 4)).astype(np.float32)
    b = rng.uniform(0.2, 0.6, size=(7, 3, 4, 4)).astype(np.float32)
    combined = combine_feature_stats([feature_stats(a), feature_stats(b)])
    pixels = np.concatenate([a, b]).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(combined.mean, pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(combined.scale, pixels.std(axis=1), rtol=1e-5)
    out = combined.apply(Split(x=np.concatenate([a, b]), y=np.zeros(12, np.int64)))
    flat = out.x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.std(axis=1), 1.0, atol=1e-4)


def test_private_image_statistics_are_close_to_the_exact_ones_with_little_noise() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(400, 2, 3, 3))
    private = private_feature_stats(x, bounds=[(0.0, 1.0)] * 2, noise_multiplier=1e-6, rng=rng)
    exact = feature_stats(x)
    np.testing.assert_allclose(private.sum, exact.sum, rtol=1e-6)
    np.testing.assert_allclose(private.sum_of_squares, exact.sum_of_squares, rtol=1e-6)
    assert abs(private.count - 400) < 1e-3
