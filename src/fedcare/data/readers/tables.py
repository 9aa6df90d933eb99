"""Arrays from ``.npz`` archives and rows from CSV tables."""

from __future__ import annotations

import csv
import logging
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcare.data.readers.base import ImageRecord, Reader, ReadReport
from fedcare.errors import DataError

__all__ = ["CsvReader", "NpzReader", "images_to_channels_first"]

logger = logging.getLogger(__name__)


def images_to_channels_first(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)``, ``(N, H, W, C)``, ``(N, C, H, W)`` or ``(N, D, H, W)`` as ``(N, C, ...)`` float32.

    A 4D array whose last axis has 1, 3 or 4 entries is channels-last; else
    one whose second axis has 1 or 3 is channels-first; else it is a stack of
    single-channel volumes. 5D arrays are taken as ``(N, C, D, H, W)``.

    Raises
    ------
    DataError
        For fewer than 3 or more than 5 dimensions.

    Examples
    --------
    >>> images_to_channels_first(np.zeros((2, 28, 28, 3))).shape
    (2, 3, 28, 28)
    >>> images_to_channels_first(np.zeros((2, 28, 28))).shape, images_to_channels_first(np.zeros((2, 9, 9, 9))).shape
    ((2, 1, 28, 28), (2, 1, 9, 9, 9))
    """
    if images.ndim == 3:
        out = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        out = np.moveaxis(images, -1, 1)
    elif images.ndim == 4 and images.shape[1] in (1, 3):
        out = images
    elif images.ndim == 4:
        out = images[:, None]
    elif images.ndim == 5:
        out = images
    else:
        raise DataError(f"the images array has {images.ndim} dimensions; expected 3 to 5", field="npz.images")
    return np.ascontiguousarray(out, dtype=np.float32)


def _label_text(value: object) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class NpzReader(Reader):
    """Images and labels from the arrays of one ``.npz`` archive (e.g. a MedMNIST file).

    Loaded with ``allow_pickle=False``: an archive holding object arrays is
    refused, because unpickling a site's input file could run code. Labels
    ``(N,)`` or ``(N, 1)`` become local labels ``str(int(label))``. Keys
    are the row indices.

    Parameters
    ----------
    images, labels : str
        The names of the arrays.
    patients : str, optional
        An ``(N,)`` array of patient ids.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     np.savez(Path(tmp) / "d.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([[0], [1], [1]]))
    ...     records, report = NpzReader(images="x", labels="y").read(Path(tmp) / "d.npz")
    >>> [r.local_label for r in records], records[0].array.shape
    (['0', '1', '1'], (1, 4, 4))
    """

    def __init__(self, *, images: str = "images", labels: str = "labels", patients: str | None = None) -> None:
        self.images = images
        self.labels = labels
        self.patients = patients

    def read(self, path: Path) -> tuple[list[ImageRecord], ReadReport]:
        if not path.is_file():
            raise DataError("the dataset path is not a file (npz needs one .npz archive)", field="path")
        report = ReadReport(files_seen=1)
        try:
            # allow_pickle=False: no pickle on site input either; object arrays are refused
            with np.load(path, allow_pickle=False) as archive:
                names = set(archive.files)
                for field, name in (("npz.images", self.images), ("npz.labels", self.labels), ("npz.patients", self.patients)):
                    if name is not None and name not in names:
                        raise DataError(
                            f"the archive has no array {name!r}; it has {', '.join(sorted(names))}", field=field
                        )
                images = images_to_channels_first(archive[self.images])
                labels = np.asarray(archive[self.labels])
                patients = None if self.patients is None else np.asarray(archive[self.patients]).reshape(-1)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError("the dataset file is not a readable .npz archive (or holds object arrays)", field="path") from None
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or len(labels) != len(images) or (patients is not None and len(patients) != len(images)):
            raise DataError(
                f"labels have shape {labels.shape} for {len(images)} images; expected ({len(images)},) or ({len(images)}, 1)",
                field="npz.labels",
            )
        records = [
            ImageRecord(
                array=images[i],
                key=str(i),
                patient=None if patients is None else _label_text(patients[i]),
                local_label=_label_text(labels[i].item()),
            )
            for i in range(len(images))
        ]
        report.add_records(records)
        logger.info("read npz dataset", extra={"records": report.records_read})
        return records, report


class CsvReader(Reader):
    """Rows of a CSV table: the ``features`` columns as float32, a label column, a patient column.

    A row with an empty or non-numeric feature, or an empty label, is
    skipped as "missing value". Keys are ``row-<n>`` (the 1-based data row).

    Parameters
    ----------
    features : sequence of str
        The feature columns, in order (the plan's ``dataset.features``).
    label_column : str, optional
        The column holding the local label.
    patient_column : str, optional
        The column holding the patient id.

    Raises
    ------
    DataError
        If the file is missing or lacks a declared column (the message names
        the missing columns).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "t.csv").write_text("age,chol,dx\\n61,233,sick\\n,250,well\\n40,180,well\\n")
    ...     records, report = CsvReader(features=["age", "chol"], label_column="dx").read(Path(tmp) / "t.csv")
    >>> [r.array.tolist() for r in records], dict(report.skipped)
    ([[61.0, 233.0], [40.0, 180.0]], {'missing value': 1})
    """

    def __init__(
        self, *, features: Sequence[str], label_column: str | None = None, patient_column: str | None = None
    ) -> None:
        self.features = tuple(features)
        self.label_column = label_column
        self.patient_column = patient_column

    def read(self, path: Path) -> tuple[list[ImageRecord], ReadReport]:
        if not path.is_file():
            raise DataError("the dataset path is not a file (csv needs one table)", field="path")
        report = ReadReport(files_seen=1)
        records: list[ImageRecord] = []
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                header = reader.fieldnames or []
                wanted = [*self.features, *(c for c in (self.label_column, self.patient_column) if c is not None)]
                missing = [c for c in wanted if c not in header]
                if missing:
                    raise DataError(f"the table has no column {', '.join(missing)}", field="path")
                for n, row in enumerate(reader, start=1):
                    try:
                        values = [float(row[c]) for c in self.features]
                    except (TypeError, ValueError):
                        report.skip("missing value")
                        continue
                    label = row.get(self.label_column) if self.label_column else None
                    if not all(math.isfinite(v) for v in values) or (self.label_column and not (label or "").strip()):
                        report.skip("missing value")
                        continue
                    patient = (row.get(self.patient_column) or "").strip() if self.patient_column else ""
                    records.append(
                        ImageRecord(
                            array=np.asarray(values, dtype=np.float32),
                            key=f"row-{n}",
                            patient=patient or None,
                            local_label=label.strip() if label else None,
                        )
                    )
        except UnicodeDecodeError:
            raise DataError("the table is not UTF-8 text", field="path") from None
        report.add_records(records)
        logger.info("read csv dataset", extra={"records": report.records_read, "skipped": dict(report.skipped)})
        return records, report
