"""The two-hospital imaging examples, written fresh for a test from the bundled chest X-rays."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "imaging"


def write_example_sites(out: Path, *, images: int) -> Path:
    """Copy the examples' plans and node.yaml files to ``out`` and write the hospitals' files beside them."""
    for path in EXAMPLES.glob("*/plan.yaml"):
        (out / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.parent.name / "plan.yaml")
    for path in EXAMPLES.glob("*/hospital-*/node.yaml"):
        target = out / path.parent.parent.name / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / "node.yaml")
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_sites.py"), "--out", str(out), "--images", str(images)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="session")
def example_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_sites(tmp_path_factory.mktemp("imaging-examples"), images=600)
