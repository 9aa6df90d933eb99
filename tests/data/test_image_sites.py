"""PNG folders of real MedMNIST images, npz archives and csv tables, loaded through manifests."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.data.catalog import DatasetCatalog
from fedcare.data.manifest import DatasetManifest, ManifestDataset, load_manifest_site
from fedcare.data.readers import ImageFolderReader
from fedcare.errors import ConfigError
from fedcare.plan import DatasetConfig

from .conftest import MEDMNIST, write_png_folder

LABELS = ("malignant", "benign")
CONFIG = DatasetConfig(name="breast-us", labels=LABELS, input_shape=(1, 32, 32))


@pytest.fixture
def png_site(tmp_path, breastmnist):
    images, labels = breastmnist
    return write_png_folder(tmp_path / "site", images[:120], labels[:120], names={0: "malignant", 1: "benign"})


def manifest(path, **extra):
    return DatasetManifest.model_validate({"format": "imagefolder", "path": str(path), **extra}).resolved(path.parent)


def test_png_folder_reads_grayscale_as_one_channel_with_folder_labels(png_site, breastmnist):
    records, report = ImageFolderReader().read(png_site)
    images, labels = breastmnist
    assert len(records) == 120 and report.shapes == {(1, 28, 28): 120}
    by_key = {r.key: r for r in records}
    first = by_key[f"{'benign' if labels[0] else 'malignant'}/P0000_0.png"]
    np.testing.assert_array_equal(first.array[0], images[0].astype(np.float32))


def test_png_site_loads_as_unit_range_images_of_the_plan_shape(png_site, breastmnist):
    data, report = load_manifest_site(manifest(png_site), CONFIG, site="a")
    assert data.train.x.shape[1:] == (1, 32, 32) and data.train.x.dtype == np.float32
    assert data.train.y.dtype == np.int64
    assert 0.0 <= data.train.x.min() and data.train.x.max() <= 1.0
    assert len(data.train) + len(data.test) == 120
    _, labels = breastmnist
    expected = {"malignant": int((labels[:120] == 0).sum()), "benign": int((labels[:120] == 1).sum())}
    assert {k: report.train_counts[k] + report.test_counts[k] for k in LABELS} == expected


def test_site_spec_equals_the_catalog_spec_with_unit_bounds(png_site):
    data, _ = load_manifest_site(manifest(png_site), CONFIG, site="a")
    catalog_spec = DatasetCatalog.bundled().spec(CONFIG)
    assert data.spec.feature_bounds == ((0.0, 1.0),)
    assert data.spec == type(catalog_spec)(**{**catalog_spec.__dict__, "feature_bounds": ((0.0, 1.0),)})


def test_gray_images_are_repeated_to_three_channels(png_site):
    config = DatasetConfig(name="breast-us", labels=LABELS, input_shape=(3, 28, 28))
    data, _ = load_manifest_site(manifest(png_site), config, site="a")
    np.testing.assert_array_equal(data.train.x[:, 0], data.train.x[:, 2])
    assert data.spec.feature_bounds == ((0.0, 1.0),) * 3


def test_fixed_intensity_maps_the_range_without_per_image_stretch(png_site, breastmnist):
    config = DatasetConfig(name="breast-us", labels=LABELS, input_shape=(1, 28, 28))
    site = manifest(png_site, preprocess={"intensity": "fixed", "range": [0, 255]}, split={"test_fraction": 0.5})
    data, _ = load_manifest_site(site, config, site="a")
    images, _ = breastmnist
    pixels = np.sort(np.concatenate([data.train.x, data.test.x]).reshape(-1))
    np.testing.assert_allclose(pixels, np.sort(images[:120].reshape(-1) / 255.0), atol=1e-6)


def test_npz_archive_reads_medmnist_arrays_without_pickle(tmp_path):
    site = DatasetManifest.model_validate(
        {"format": "npz", "path": str(MEDMNIST), "npz": {"images": "val_images", "labels": "val_labels"},
         "label_map": {"0": "malignant", "1": "benign"}}
    ).resolved(tmp_path)
    data, report = load_manifest_site(site, CONFIG, site="a")
    with np.load(MEDMNIST, allow_pickle=False) as archive:
        n, counts = len(archive["val_labels"]), np.bincount(archive["val_labels"][:, 0])
    assert len(data.train) + len(data.test) == n == report.read.records_read
    assert np.bincount(np.concatenate([data.train.y, data.test.y])).tolist() == counts.tolist()


def test_csv_table_skips_rows_with_missing_values_and_uses_declared_bounds(tmp_path):
    rows = ["age,chol,outcome,pid"] + [f"{30 + i},{150 + 3 * i},{'dead' if i % 3 == 0 else 'alive'},p{i // 2}" for i in range(40)]
    rows += ["55,,alive,p99", "x,200,dead,p98"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    site = DatasetManifest.model_validate(
        {"format": "csv", "path": "t.csv", "labels": {"column": "outcome"}, "patient": {"column": "pid"},
         "label_map": {"alive": "censored", "dead": "death"}, "bounds": {"age": [18, 90], "chol": [0, 600]}}
    ).resolved(tmp_path)
    config = DatasetConfig(name="clinic", labels=("censored", "death"), features=("age", "chol"))
    data, report = load_manifest_site(site, config, site="a")
    assert report.read.skipped == {"missing value": 2}
    assert data.train.x.shape[1] == 2 and len(data.train) + len(data.test) == 40
    assert data.spec.feature_bounds == ((18.0, 90.0), (0.0, 600.0)) and data.spec.feature_names == ("age", "chol")


def test_plan_without_labels_is_a_config_error(png_site):
    with pytest.raises(ConfigError, match="plan.dataset.labels"):
        load_manifest_site(manifest(png_site), DatasetConfig(name="breast-us", input_shape=(1, 28, 28)), site="a")


def test_manifest_dataset_runs_sites_from_manifests(tmp_path, breastmnist):
    images, labels = breastmnist
    sites = {}
    for n, (start, stop) in enumerate([(0, 60), (60, 130)]):
        root = write_png_folder(tmp_path / f"s{n}", images[start:stop], labels[start:stop], names={0: "malignant", 1: "benign"})
        sites[f"site-{n}"] = manifest(root)
    dataset = ManifestDataset("breast-us", sites)
    loaded = dataset.load_sites(CONFIG)
    assert dataset.site_names(CONFIG) == ("site-0", "site-1") and set(loaded) == {"site-0", "site-1"}
    assert sum(len(d.train) + len(d.test) for d in loaded.values()) == 130
    assert dataset.spec(CONFIG) == loaded["site-0"].spec
    assert dataset.info.name == "breast-us"


def test_pillow_formats_colour_and_damaged_files_in_an_image_folder(tmp_path, breastmnist):
    from PIL import Image

    images, _ = breastmnist
    root = tmp_path / "images" / "benign"
    root.mkdir(parents=True)
    gray = Image.fromarray(images[0])
    gray.save(root / "a.jpg")
    gray.save(root / "b.bmp")
    gray.save(root / "c.tiff")
    Image.fromarray(np.stack([images[1]] * 3 + [np.full((28, 28), 255, np.uint8)], axis=-1), "RGBA").save(root / "d.png")
    gray.save(root / "whole.png")
    (root / "cut.png").write_bytes((root / "whole.png").read_bytes()[:60])
    (root / "notes.txt").write_text("not an image")
    records, report = ImageFolderReader().read(tmp_path / "images")
    shapes = {r.key.split("/")[-1]: r.array.shape for r in records}
    assert shapes == {"a.jpg": (1, 28, 28), "b.bmp": (1, 28, 28), "c.tiff": (1, 28, 28), "d.png": (3, 28, 28), "whole.png": (1, 28, 28)}
    assert report.skipped == {"truncated or corrupt": 1, "not an image file": 1}
    rgba = next(r for r in records if r.key.endswith("d.png"))
    np.testing.assert_array_equal(rgba.array[1], images[1].astype(np.float32))


def test_rgb_images_are_averaged_to_one_channel_when_the_plan_asks_for_gray(tmp_path, breastmnist):
    from PIL import Image

    images, labels = breastmnist
    for i in range(12):
        folder = tmp_path / "images" / ("M" if i % 2 else "B")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([images[i]] * 3, axis=-1), "RGB").save(folder / f"{i}.png")
    site = DatasetManifest.model_validate(
        {"format": "imagefolder", "path": "images", "label_map": {"M": "malignant", "B": "benign"},
         "preprocess": {"intensity": "fixed", "range": [0, 255]}, "split": {"test_fraction": 0.5}}
    ).resolved(tmp_path)
    data, _ = load_manifest_site(site, DatasetConfig(name="b", labels=LABELS, input_shape=(1, 28, 28)), site="a")
    assert data.train.x.shape[1:] == (1, 28, 28)
    pixels = np.sort(np.concatenate([data.train.x, data.test.x]).reshape(-1))
    np.testing.assert_allclose(pixels, np.sort(images[:12].reshape(-1) / 255.0), atol=1e-6)
