"""Two sites with different local vocabularies agree on y; outside labels are refused; splits are by patient."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest

from fedcare.data.manifest import DatasetManifest, harmonize_labels, load_manifest_site, patient_split
from fedcare.errors import DataError
from fedcare.plan import DatasetConfig

from .conftest import dicom_sample, write_png_folder

CONFIG = DatasetConfig(name="breast-us", labels=("malignant", "benign"), input_shape=(1, 28, 28))


def site(path, label_map, **extra):
    entry = {"format": "imagefolder", "path": str(path), "label_map": label_map, **extra}
    return DatasetManifest.model_validate(entry).resolved(path.parent)


def test_sites_with_different_local_labels_get_the_same_encoding(tmp_path, breastmnist):
    images, labels = breastmnist
    # folder names that sort alike, so both sites list their files in the same order
    a = write_png_folder(tmp_path / "a", images[:80], labels[:80], names={0: "MALIGNANT", 1: "NOT_MALIGNANT"})
    b = write_png_folder(tmp_path / "b", images[:80], labels[:80], names={0: "0", 1: "1"})
    data_a, _ = load_manifest_site(site(a, {"MALIGNANT": "malignant", "NOT_MALIGNANT": "benign"}), CONFIG, site="a")
    data_b, _ = load_manifest_site(site(b, {"0": "malignant", "1": "benign"}), CONFIG, site="b")
    np.testing.assert_array_equal(data_a.train.y, data_b.train.y)
    np.testing.assert_array_equal(data_a.train.x, data_b.train.x)
    assert set(np.unique(np.concatenate([data_a.train.y, data_a.test.y]))) == {0, 1}
    malignant = images[:80][labels[:80] == 0].astype(np.float32)
    assert len(malignant) == (data_a.train.y == 0).sum() + (data_a.test.y == 0).sum()  # index 0 is "malignant"


def test_label_mapped_outside_the_vocabulary_is_refused(tmp_path, breastmnist):
    images, labels = breastmnist
    root = write_png_folder(tmp_path / "a", images[:20], labels[:20], names={0: "M", 1: "B"})
    with pytest.raises(DataError) as caught:
        load_manifest_site(site(root, {"M": "malignant", "B": "benign-ish"}), CONFIG, site="a")
    assert "'benign-ish'" in str(caught.value) and caught.value.field == "label_map"


def test_null_in_label_map_drops_those_records_on_purpose(tmp_path, breastmnist):
    images, labels = breastmnist
    root = write_png_folder(tmp_path / "a", images[:60], labels[:60], names={0: "M", 1: "B"})
    (root / "phantom").mkdir()
    (root / "phantom" / "qa.png").write_bytes((next((root / "M").iterdir())).read_bytes())
    data, report = load_manifest_site(site(root, {"M": "malignant", "B": "benign", "phantom": None}), CONFIG, site="a")
    assert report.dropped == {"phantom": 1} and report.read.skipped["dropped by label_map"] == 1
    assert len(data.train) + len(data.test) == 60


def test_harmonize_without_label_map_uses_local_labels_as_federation_labels():
    h = harmonize_labels(["benign", "malignant", "other"], label_map=None, vocabulary=["malignant", "benign"])
    assert h.y.tolist() == [1, 0, -1] and h.unmapped == {"other": 1}


def test_patient_pattern_keeps_each_patients_images_on_one_side(tmp_path, breastmnist):
    images, labels = breastmnist
    marked = images[:150].copy()
    marked[:, 0, 0] = np.arange(150) // 3  # pixel (0, 0) carries the patient number
    root = write_png_folder(tmp_path / "a", marked, labels[:150], names={0: "M", 1: "B"}, per_patient=3)
    manifest = site(
        root, {"M": "malignant", "B": "benign"}, patient={"pattern": "^(?P<patient>P[0-9]+)_"},
        preprocess={"intensity": "fixed", "range": [0, 255]},
    )
    first, report = load_manifest_site(manifest, CONFIG, site="a")
    second, _ = load_manifest_site(manifest, CONFIG, site="a")
    assert report.patients == 50
    np.testing.assert_array_equal(first.test.x, second.test.x)  # deterministic for a seed
    train_patients = set(np.rint(first.train.x[:, 0, 0, 0] * 255).astype(int))
    test_patients = set(np.rint(first.test.x[:, 0, 0, 0] * 255).astype(int))
    assert train_patients and test_patients and not train_patients & test_patients
    assert len(train_patients | test_patients) == 50


def test_split_differs_across_seeds_but_not_within_one():
    y = np.array([0, 1] * 30)
    groups = [f"p{i // 2}" for i in range(60)]
    a = patient_split(y, groups, test_fraction=0.2, seed=0)
    b = patient_split(y, groups, test_fraction=0.2, seed=0)
    c = patient_split(y, groups, test_fraction=0.2, seed=1)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert not {groups[i] for i in a[0]} & {groups[i] for i in a[1]}


def test_dicom_patient_id_groups_the_split(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = pydicom.dcmread(dicom_sample("CT_small.dcm"))
    folder = tmp_path / "scans"
    folder.mkdir()
    rows = []
    for i in range(12):
        template.PatientID = f"PAT{i // 3}"
        template.SOPInstanceUID = f"1.2.3.{i}"
        template.save_as(folder / f"{i}.dcm")
        rows.append(f"{i}.dcm,{'normal' if (i // 3) % 2 else 'abnormal'}")
    (tmp_path / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    manifest = DatasetManifest.model_validate(
        {"format": "dicom", "path": "scans", "labels": {"source": "file", "file": "labels.csv"}, "split": {"test_fraction": 0.25}}
    ).resolved(tmp_path)
    from fedcare.data.manifest import read_manifest_records

    records, _ = read_manifest_records(manifest)
    y = np.array([0 if r.local_label == "normal" else 1 for r in records])
    train, test = patient_split(y, [str(r.patient) for r in records], test_fraction=0.25, seed=0)
    assert not {records[i].patient for i in train} & {records[i].patient for i in test}
    config = DatasetConfig(name="ct", labels=("normal", "abnormal"), input_shape=(1, 16, 16))
    data, report = load_manifest_site(manifest, config, site="a")
    assert report.patients == 4 and len(data.test) % 3 == 0 and len(data.train) % 3 == 0
