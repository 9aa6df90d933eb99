"""Real files for the site-data tests: pydicom's and nibabel's samples, MedMNIST images as PNGs."""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import yaml

MEDMNIST = Path("/work/shared/data/medmnist/breastmnist.npz")


def dicom_sample(name: str) -> Path:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    assert found is not None, name
    return Path(str(found))


def dicom_test_dir() -> Path:
    return dicom_sample("CT_small.dcm").parent


def nibabel_sample(name: str) -> Path:
    return Path(str(files("nibabel") / "tests" / "data" / name))


def copy_to(folder: Path, *sources: Path, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, source in enumerate(sources):
        shutil.copy(source, folder / (names[i] if names else source.name))
    return folder


def write_node(folder: Path, datasets: dict[str, object], name: str = "site-a") -> Path:
    node = folder / "node.yaml"
    node.write_text(yaml.safe_dump({"name": name, "datasets": datasets}, sort_keys=False))
    return node


@pytest.fixture(scope="session")
def breastmnist() -> tuple[np.ndarray, np.ndarray]:
    if not MEDMNIST.exists():
        pytest.skip("the MedMNIST file is not available")
    with np.load(MEDMNIST, allow_pickle=False) as archive:  # no pickle on input files
        return archive["train_images"], archive["train_labels"][:, 0]


def write_png_folder(
    root: Path, images: np.ndarray, labels: np.ndarray, *, names: dict[int, str], per_patient: int = 1
) -> Path:
    """``root/<class>/<patient>_<n>.png``; ``per_patient`` consecutive images share a patient id."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"P{i // per_patient:04d}_{i % per_patient}.png")
    return root
