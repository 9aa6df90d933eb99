"""Tiny federations end to end on pydicom's and nibabel's own sample files, read through site manifests."""

from __future__ import annotations

import csv
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedcare.deployment import load_node_config, manifest_catalog
from fedcare.plan import parse_plan
from fedcare.simulation import simulate


def _pydicom_files() -> Path:
    from pydicom.data import get_testdata_file

    found = get_testdata_file("CT_small.dcm")
    assert found is not None
    return Path(str(found)).parent


def _write_site(root: Path, name: str, dataset: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    node = root / "node.yaml"
    node.write_text(yaml.safe_dump({"name": name, "datasets": {"samples": dataset}}, sort_keys=False))
    return node


def _label_by_modality(folder: Path) -> Path:
    """The site's spreadsheet of findings: each file's modality (read from the files, as a PACS export would)."""
    import pydicom

    table = folder.parent / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "modality"])
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
            except Exception:  # noqa: BLE001 - not DICOM: the site's spreadsheet has no row for it
                continue
            writer.writerow([path.relative_to(folder).as_posix(), modality])
    return table


def test_a_federation_trains_on_pydicoms_sample_files(tmp_path: Path) -> None:
    samples = _pydicom_files()
    # Site one: the MR_small series in every encoding pydicom ships (explicit, implicit, big endian,
    # RLE, padded...), CT_small, and a few that cannot be used (JPEG 2000 without a decoder, an RT plan,
    # an ECG waveform): skipped and counted, not fatal.
    one = tmp_path / "site-one" / "dicom"
    one.mkdir(parents=True)
    names = [p.name for p in samples.glob("MR_small*.dcm")] + ["CT_small.dcm", "rtplan.dcm", "waveform_ecg.dcm"]
    for name in names:
        shutil.copy(samples / name, one / name)
    # Site two: the CR, CT and MR series of pydicom's DICOMDIR test tree, one folder per patient and series.
    two = tmp_path / "site-two" / "dicom"
    shutil.copytree(samples / "dicomdirtests", two, ignore=shutil.ignore_patterns("DICOMDIR*", "README.txt", "TINY_ALPHA"))
    sites = []
    for name, folder in (("site-one", one), ("site-two", two)):
        labels = _label_by_modality(folder)
        sites.append(
            _write_site(
                folder.parent,
                name,
                {
                    "format": "dicom",
                    "path": "dicom",
                    "labels": {"source": "file", "file": labels.name, "key": "file", "column": "modality"},
                    "label_map": {"CT": "ct", "MR": "mr", "CR": "cr", "RTPLAN": None, "ECG": None},
                    "unmapped_labels": "skip",
                    "split": {"test_fraction": 0.3, "seed": 0},
                },
            )
        )
    plan = parse_plan(
        {"task": "image-cnn", "rounds": 2, "nodes": ["site-one", "site-two"], "seed": 0,
         "dataset": {"name": "samples", "labels": ["cr", "ct", "mr"], "input_shape": [1, 32, 32]},
         "local": {"epochs": 2, "batch_size": 8, "optimizer": "adam", "learning_rate": 0.01},
         "evaluation": {"every_rounds": 2}}
    )  # fmt: skip
    configs = [load_node_config(path) for path in sites]
    catalog = manifest_catalog(plan, configs)
    site_one = catalog.get("samples").load_site(plan.dataset, "site-one")
    assert site_one.train.x.shape[1:] == (1, 32, 32)
    assert 0.0 <= site_one.train.x.min() and site_one.train.x.max() <= 1.0
    result = simulate(plan, catalog=catalog, out_dir=tmp_path / "run")
    assert result.rounds_completed == 2 and not result.failures
    assert result.final_evaluation is not None
    assert set(result.final_evaluation.sites) == {"site-one", "site-two"}
    assert all(np.isfinite(m["accuracy"]) for m in result.final_evaluation.sites.values())
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_federation_trains_a_3d_cnn_on_nibabels_sample_volumes(tmp_path: Path) -> None:
    data = files("nibabel") / "tests" / "data"
    # functional.nii is 4D: each of its 20 time points is one volume; example4d.nii.gz holds 2.
    layout = {
        "site-one": {"functional.nii": "fmri", "anatomical.nii": "anatomical"},
        "site-two": {"example4d.nii.gz": "fmri", "example_nifti2.nii.gz": "anatomical", "standard.nii.gz": "anatomical"},
    }
    sites = []
    for site, assigned in layout.items():
        folder = tmp_path / site / "scans"
        folder.mkdir(parents=True)
        with (tmp_path / site / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "kind"])
            for name, kind in assigned.items():
                shutil.copy(Path(str(data / name)), folder / name)
                writer.writerow([name, kind])
        sites.append(
            _write_site(
                tmp_path / site,
                site,
                {
                    "format": "nifti",
                    "path": "scans",
                    "labels": {"source": "file", "file": "labels.csv", "key": "file", "column": "kind"},
                    # Each scan is its own patient; 4D scans keep their volumes together.
                    "patient": {"pattern": r"^(?P<patient>[^.]+)"},
                    "split": {"test_fraction": 0.5, "seed": 1},
                },
            )
        )
    plan = parse_plan(
        {"task": "volume-cnn3d", "rounds": 2, "nodes": ["site-one", "site-two"], "seed": 0,
         "dataset": {"name": "samples", "labels": ["anatomical", "fmri"], "input_shape": [1, 8, 16, 16]},
         "local": {"epochs": 1, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
         "evaluation": {"every_rounds": 2}}
    )  # fmt: skip
    catalog = manifest_catalog(plan, [load_node_config(path) for path in sites])
    one = catalog.get("samples").load_site(plan.dataset, "site-one")
    assert len(one.train) + len(one.test) == 21  # 20 functional volumes + 1 anatomical
    assert one.train.x.shape[1:] == (1, 8, 16, 16)
    result = simulate(plan, catalog=catalog, out_dir=tmp_path / "run")
    assert result.rounds_completed == 2 and not result.failures
    assert result.final_evaluation is not None and set(result.final_evaluation.sites) == {"site-one", "site-two"}


def test_a_plan_for_site_manifests_must_list_its_nodes() -> None:
    from fedcare.errors import ConfigError
    from fedcare.simulation import check_plan

    plan = parse_plan({"task": "image-cnn", "rounds": 1, "dataset": {"name": "x", "labels": ["a", "b"], "input_shape": [1, 8, 8]}})
    with pytest.raises(ConfigError, match="must list its nodes") as caught:
        check_plan(plan)
    assert caught.value.field == "plan.nodes"


def test_a_messy_site_reports_skips_and_still_trains_in_the_federation(tmp_path: Path) -> None:
    from tests.data.test_corrupt_site import imagefolder_mess

    messy = imagefolder_mess(tmp_path / "messy", "skip")  # corrupt, truncated and non-image files, a mislabeled folder
    clean = tmp_path / "clean" / "images"
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("NORMAL", "SICK"):
        (clean / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(clean / label / f"c{i}_0.png")
    sites = [
        _write_site(tmp_path / "messy", "messy", messy.model_dump(mode="json")),
        _write_site(tmp_path / "clean", "clean", {"format": "imagefolder", "path": "images",
                                                  "label_map": {"NORMAL": "normal", "SICK": "abnormal"}}),
    ]  # fmt: skip
    plan = parse_plan(
        {"task": "image-cnn", "rounds": 2, "nodes": ["messy", "clean"], "min_nodes": 2, "seed": 0,
         "dataset": {"name": "samples", "labels": ["normal", "abnormal"], "input_shape": [1, 32, 32]},
         "local": {"epochs": 1, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
         "evaluation": {"every_rounds": 2}}
    )  # fmt: skip
    result = simulate(plan, catalog=manifest_catalog(plan, [load_node_config(p) for p in sites]))
    assert result.rounds_completed == 2 and not result.failures
    assert result.train_examples["messy"] > 0 and result.train_examples["clean"] > 0
