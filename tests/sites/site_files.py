"""A site's files for the node init and doctor tests: PNGs in label folders, a CSV from the bundled heart data, certificates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from fedcare.transport import pki

HEART = Path(__file__).resolve().parents[2] / "src" / "fedcare" / "data" / "bundled" / "heart_disease"
#: The 14 columns of the UCI files (see /work/shared/data/README.md); num > 0 is heart disease.
HEART_COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
                 "slope", "ca", "thal", "num")  # fmt: skip


def write_pngs(folder: Path, counts: dict[str, int], *, size: int = 16, seed: int = 0) -> Path:
    """``folder/<label>/P<i>_<j>.png``: real grayscale PNG files, ``counts[label]`` per label folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, count in counts.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / label / f"P{i:03d}_{label[:2]}.png")
    return folder


def write_heart_csv(path: Path, *, site: str = "cleveland") -> Path:
    """The bundled hospital file as a table with a header, a patient column and a yes/no diagnosis column."""
    rows = (HEART / f"processed.{site}.data").read_text().splitlines()
    lines = ["patient_id," + ",".join(HEART_COLUMNS[:-1]) + ",diagnosis"]
    for n, row in enumerate(rows):
        values = row.split(",")
        lines.append(f"P{n:04d}," + ",".join(values[:-1]) + ("," + ("yes" if int(values[-1]) > 0 else "no")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_federation(directory: Path, *, nodes: tuple[str, ...], hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Path:
    """A CA with a server certificate for ``hosts`` and a node certificate per node; returns the CA folder."""
    pki.init_ca(directory, federation=directory.name)
    pki.issue_certificate(directory, role="server", name="coordinator", hosts=hosts)
    for node in nodes:
        pki.issue_certificate(directory, role="node", name=node)
    return directory


def issue_expired(ca_dir: Path, name: str) -> tuple[Path, Path]:
    """A node certificate that expired yesterday (valid for a week before)."""
    now = dt.datetime.now(dt.timezone.utc)
    return pki.issue_certificate(
        ca_dir, role="node", name=name, not_valid_before=now - dt.timedelta(days=8), not_valid_after=now - dt.timedelta(days=1)
    )
