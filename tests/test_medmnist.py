"""The bundled MedMNIST datasets: checksums, site splits, scanners and label skew."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedcare.data import DatasetCatalog
from fedcare.data.medmnist import BreastMNIST, PneumoniaMNIST, RetinaMNIST, load_npz
from fedcare.errors import ConfigError, DataError
from fedcare.plan import DatasetConfig

OFFICIAL = {  # train / val / test images
    "pneumonia": (4708, 524, 624),
    "breast": (546, 78, 156),
    "retina": (1080, 120, 400),
}


def test_catalog_lists_the_three_medmnist_datasets_with_their_licence() -> None:
    catalog = DatasetCatalog.bundled()
    for name, images in (("pneumonia", 5856), ("breast", 780), ("retina", 1600)):
        info = catalog.get(name).info
        assert info.patients == images and info.licence == "CC BY 4.0"


def test_a_corrupted_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = BreastMNIST()
    copy = tmp_path / "breastmnist.npz"
    shutil.copyfile(dataset.path(), copy)
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    copy.write_bytes(bytes(raw))
    monkeypatch.setattr(BreastMNIST, "path", lambda self: copy)

    with pytest.raises(DataError, match="SHA-256") as caught:
        dataset.load_sites(DatasetConfig(name="breast"))
    assert str(tmp_path) not in str(caught.value)  # names the file, not where it lies


def test_the_bundled_files_pass_their_checksums() -> None:
    for dataset in (PneumoniaMNIST(), BreastMNIST(), RetinaMNIST()):
        arrays = load_npz(dataset.path(), sha256=dataset.SHA256)
        assert {"train_images", "val_images", "test_images"} <= set(arrays)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_site_splits_add_up_to_the_official_splits(name: str) -> None:
    dataset = DatasetCatalog.bundled().get(name)
    train, val, test = OFFICIAL[name]
    sites = dataset.load_sites(DatasetConfig(name=name))
    assert sum(len(d.train) for d in sites.values()) == train
    assert sum(len(d.test) for d in sites.values()) == test
    validation = dataset.load_sites(DatasetConfig(name=name, validation_fraction=0.1))
    assert sum(len(d.test) for d in validation.values()) == val
    assert sum(len(d.train) for d in validation.values()) == train


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_images_are_float32_in_unit_range_with_the_spec_shape(name: str) -> None:
    dataset = DatasetCatalog.bundled().get(name)
    spec = dataset.spec(DatasetConfig(name=name))
    data = next(iter(dataset.load_sites(DatasetConfig(name=name)).values()))
    assert data.train.x.dtype == np.float32 and data.train.x.shape[1:] == spec.shape
    assert data.train.x.min() >= 0.0 and data.train.x.max() <= 1.0
    assert spec.feature_bounds == ((0.0, 1.0),) * spec.channels


def test_breast_and_retina_sites_follow_num_nodes() -> None:
    assert len(BreastMNIST().load_sites(DatasetConfig(name="breast"))) == 3
    sites = RetinaMNIST().load_sites(DatasetConfig(name="retina", num_nodes=4, partition="dirichlet"))
    assert list(sites) == ["site-0", "site-1", "site-2", "site-3"]
    assert sum(len(d.test) for d in sites.values()) == 400


def test_union_of_pneumonia_test_splits_is_the_official_test_split_through_each_scanner() -> None:
    dataset = PneumoniaMNIST()
    official = dataset.official_splits()["test"]
    sites = dataset.load_sites(DatasetConfig(name="pneumonia"))
    scanned = {name: dataset.scan(name, "test", official.x) for name in sites}
    matched: list[int] = []
    for name, data in sites.items():
        # each site's test image is one official test image through that site's scanner
        flat = scanned[name].reshape(len(official), -1)
        for image, label in zip(data.test.x.reshape(len(data.test), -1), data.test.y, strict=True):
            hits = np.flatnonzero(np.all(flat == image, axis=1))
            assert len(hits) >= 1 and official.y[hits[0]] == label
            matched.append(int(hits[0]))
    assert len(matched) == len(official) == 624
    assert len(set(matched)) >= 600  # a few official test images are exact duplicates
    labels = np.concatenate([d.test.y for d in sites.values()])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(official.y))


def test_pneumonia_scanners_differ_per_site_and_are_deterministic() -> None:
    dataset = PneumoniaMNIST()
    x = dataset.official_splits()["test"].x[:16]
    outputs = {site: dataset.scan(site, "test", x) for site in dataset.SCANNERS}
    for site, out in outputs.items():
        np.testing.assert_array_equal(out, dataset.scan(site, "test", x))
        assert not np.array_equal(out, x)
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(outputs[a], outputs[b], atol=1e-3), (a, b)


def test_pneumonia_partition_is_label_skewed_and_independent_of_the_training_seed() -> None:
    sites = PneumoniaMNIST().load_sites(DatasetConfig(name="pneumonia"))
    normal_share = [float(np.mean(d.train.y == 0)) for d in sites.values()]
    assert max(normal_share) - min(normal_share) > 0.3  # official train: 26% normal
    assert min(len(d.train) for d in sites.values()) >= 200
    again = PneumoniaMNIST().load_sites(DatasetConfig(name="pneumonia"))
    for name in sites:
        np.testing.assert_array_equal(sites[name].train.x, again[name].train.x)


def test_pneumonia_refuses_another_number_of_sites() -> None:
    with pytest.raises(ConfigError) as caught:
        PneumoniaMNIST().site_names(DatasetConfig(name="pneumonia", num_nodes=3))
    assert caught.value.field == "plan.dataset.num_nodes"
