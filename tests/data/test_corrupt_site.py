"""A messy site folder: every bad item is counted by reason, the rest loads, and nothing identifying leaks."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image

from fedcare.data.manifest import DatasetManifest, load_manifest_site
from fedcare.errors import DataError
from fedcare.plan import DatasetConfig

from .conftest import dicom_sample

CONFIG = DatasetConfig(name="ct", labels=("normal", "abnormal"), input_shape=(1, 32, 32))
SENSITIVE = ("ZZsecretPatient", "CT_small", "truncated.dcm", "random.dcm", "notes.txt", "mislabeled")


def make_mess(folder):
    """Valid DICOMs with a patient id, a truncated one, random bytes, a text file, a PNG, an RT plan."""
    folder.mkdir(parents=True)
    with _quiet():
        template = pydicom.dcmread(dicom_sample("CT_small.dcm"))
    for i in range(6):
        template.PatientID = f"ZZsecretPatient{i // 2}"
        template.SOPInstanceUID = f"1.2.3.4.{i}"
        template.save_as(folder / f"CT_small_{i}.dcm")
    (folder / "truncated.dcm").write_bytes(dicom_sample("CT_small.dcm").read_bytes()[:400])
    (folder / "random.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "notes.txt").write_text("patient ZZsecretPatient0 called")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "scan.png")
    shutil.copy(dicom_sample("rtplan.dcm"), folder / "plan.dcm")
    return folder


class _quiet:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def assert_nothing_identifying(text):
    for secret in SENSITIVE:
        assert secret not in text, secret


def test_dicom_folder_counts_every_bad_file_by_reason(tmp_path, caplog):
    folder = make_mess(tmp_path / "scans")
    (tmp_path / "labels.csv").write_text("patient,label\n" + "".join(f"ZZsecretPatient{p},{'normal' if p else 'abnormal'}\n" for p in range(3)))
    manifest = DatasetManifest.model_validate(
        {"format": "dicom", "path": "scans", "labels": {"source": "file", "file": "labels.csv", "key": "patient"},
         "split": {"test_fraction": 0.34}}
    ).resolved(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="fedcare"):
        data, report = load_manifest_site(manifest, CONFIG, site="a")
    assert report.read.files_seen == 11 and report.read.records_read == 6
    assert report.read.skipped == {"not a DICOM file": 3, "truncated or corrupt": 1, "no pixel data": 1}
    assert len(data.train) + len(data.test) == 6 and report.patients == 3
    fedcare_logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("fedcare"))
    assert fedcare_logs and str(tmp_path) not in fedcare_logs
    assert_nothing_identifying(fedcare_logs)
    everything = "\n".join(r.getMessage() for r in caplog.records)  # pydicom's and Pillow's loggers too
    assert "ZZsecretPatient" not in everything and str(tmp_path) not in everything


def imagefolder_mess(tmp_path, unmapped_labels):
    root = tmp_path / "images"
    make_mess(root / "NORMAL")
    for i in range(4):
        (root / "SICK").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(root / "SICK" / f"p{i}_a.png")
    (root / "mislabeled").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "mislabeled" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "mislabeled" / "y.png")
    (root / "QA").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "QA" / "phantom.png")
    return DatasetManifest.model_validate(
        {"format": "imagefolder", "path": "images", "label_map": {"NORMAL": "normal", "SICK": "abnormal", "QA": None},
         "unmapped_labels": unmapped_labels, "split": {"test_fraction": 0.3}}
    ).resolved(tmp_path)


def test_imagefolder_with_skip_loads_the_rest_and_counts_each_reason(tmp_path, caplog):
    manifest = imagefolder_mess(tmp_path, "skip")
    with caplog.at_level(logging.DEBUG):
        data, report = load_manifest_site(manifest, CONFIG, site="a")
    assert report.read.skipped == {
        "not an image file": 1, "not a DICOM file": 1, "truncated or corrupt": 1, "no pixel data": 1,
        "unmapped label": 2, "dropped by label_map": 1,
    }
    assert report.unmapped == {"mislabeled": 2} and report.dropped == {"QA": 1}
    assert len(data.train) + len(data.test) == 6 + 1 + 4  # 6 DICOMs and the PNG in NORMAL, 4 SICK
    assert_nothing_identifying("\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("fedcare")))


def test_imagefolder_with_refuse_raises_listing_the_unmapped_label(tmp_path):
    manifest = imagefolder_mess(tmp_path, "refuse")
    with pytest.raises(DataError) as caught:
        load_manifest_site(manifest, CONFIG, site="a")
    message = str(caught.value)
    assert "'mislabeled' (2)" in message and "label_map" in message and "null" in message
    assert caught.value.field == "label_map"
    assert str(tmp_path) not in message and "x.png" not in message


def test_missing_dataset_path_names_the_field_not_the_path(tmp_path):
    manifest = DatasetManifest.model_validate({"format": "imagefolder", "path": "nowhere/ZZsecretPatient"}).resolved(tmp_path)
    with pytest.raises(DataError) as caught:
        load_manifest_site(manifest, CONFIG, site="a")
    assert caught.value.field == "path"
    assert_nothing_identifying(str(caught.value))
    assert str(tmp_path) not in str(caught.value)
