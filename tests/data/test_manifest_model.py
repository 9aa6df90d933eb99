"""The manifest model: unknown keys and contradictions are errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedcare.data.manifest import DatasetManifest
from fedcare.errors import ConfigError
from fedcare.plan import _format_validation_error


def problem(entry: dict[str, object]) -> ConfigError:
    with pytest.raises(ValidationError) as caught:
        DatasetManifest.model_validate(entry)
    return _format_validation_error(caught.value, root="node.datasets.x")


def test_manifest_accepts_the_documented_imagefolder_example():
    manifest = DatasetManifest.model_validate(
        {
            "format": "imagefolder",
            "path": "images",
            "labels": {"source": "folder"},
            "patient": {"pattern": "^(?P<patient>[^_]+)_"},
            "label_map": {"NORMAL": "normal", "PNEUMONIA": "pneumonia", "QA_phantom": None},
            "unmapped_labels": "skip",
            "split": {"test_fraction": 0.25, "seed": 3},
            "preprocess": {"intensity": "fixed", "range": [0, 255]},
        }
    )
    assert manifest.label_map == {"NORMAL": "normal", "PNEUMONIA": "pneumonia", "QA_phantom": None}
    assert manifest.split.test_fraction == 0.25 and manifest.preprocess.range == (0.0, 255.0)


def test_unknown_key_is_an_error_naming_it():
    error = problem({"format": "imagefolder", "path": "x", "labels": {"sourse": "folder"}})
    assert error.field == "node.datasets.x.labels.sourse"
    assert "Extra inputs are not permitted" in str(error)


def test_site_key_is_not_part_of_a_manifest():
    assert problem({"format": "npz", "path": "x.npz", "site": "a"}).field == "node.datasets.x.site"


def test_format_is_required():
    assert problem({"path": "x"}).field == "node.datasets.x.format"


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"format": "dicom", "path": "x", "labels": {"source": "folder"}}, "labels.source"),
        ({"format": "dicom", "path": "x"}, "labels.source"),
        ({"format": "nifti", "path": "x", "labels": {"source": "file"}}, "labels.file"),
        ({"format": "nifti", "path": "x", "labels": {"source": "file", "file": "l.csv", "key": "series"}}, "labels.key"),
        ({"format": "csv", "path": "x.csv"}, "labels.column"),
        ({"format": "imagefolder", "path": "x", "labels": {"file": "l.csv"}}, "labels.file"),
        ({"format": "csv", "path": "x.csv", "labels": {"column": "y"}, "patient": {"pattern": "(.*)"}}, "patient.pattern"),
        ({"format": "imagefolder", "path": "x", "patient": {"column": "pid"}}, "patient.column"),
        ({"format": "imagefolder", "path": "x", "preprocess": {"volume": True}}, "preprocess.volume"),
        ({"format": "nifti", "path": "x", "labels": {"source": "file", "file": "l"}, "preprocess": {"window": [40, 400]}}, "preprocess.window"),
        ({"format": "imagefolder", "path": "x", "preprocess": {"intensity": "fixed"}}, "preprocess.range"),
        ({"format": "imagefolder", "path": "x", "preprocess": {"intensity": "fixed", "range": [5, 1]}}, "preprocess.range"),
        ({"format": "imagefolder", "path": "x", "npz": {"images": "x"}}, "npz"),
        ({"format": "imagefolder", "path": "x", "split": {"test_fraction": 1.5}}, "split.test_fraction"),
        ({"format": "imagefolder", "path": "x", "patient": {"pattern": "("}}, "patient.pattern"),
        ({"format": "imagefolder", "path": "x", "unmapped_labels": "ignore"}, "unmapped_labels"),
    ],
)
def test_contradiction_is_an_error_naming_the_field(entry, field):
    assert problem(entry).field == f"node.datasets.x.{field}"


def test_resolved_makes_paths_absolute_against_the_node_yaml_folder(tmp_path):
    manifest = DatasetManifest.model_validate(
        {"format": "dicom", "path": "scans", "labels": {"source": "file", "file": "meta/labels.csv", "key": "series"}}
    )
    resolved = manifest.resolved(tmp_path)
    assert resolved.path == tmp_path.resolve() / "scans"
    assert resolved.labels.file == tmp_path.resolve() / "meta" / "labels.csv"
    assert manifest.path == Path("scans")  # the original is unchanged


def test_numeric_yaml_labels_are_taken_as_text():
    import yaml

    entry = yaml.safe_load("format: npz\npath: x.npz\nlabel_map: {0: malignant, 1: benign}\n")
    assert DatasetManifest.model_validate(entry).label_map == {"0": "malignant", "1": "benign"}


def test_yaml_boolean_label_is_refused_with_advice_to_quote_it():
    import yaml

    error = problem(yaml.safe_load("format: npz\npath: x.npz\nlabel_map: {no: healthy, yes: sick}\n"))
    assert error.field == "node.datasets.x.label_map" and "quote" in str(error)
