"""What every reader returns: records (an array and its metadata) and a report of counts."""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ImageRecord", "ReadReport", "Reader", "SkippedFile", "iter_files"]


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One example read from a site's files: an array and what is known about it.

    Attributes
    ----------
    array : numpy.ndarray
        float32, ``(C, H, W)`` for an image, ``(C, D, H, W)`` for a volume,
        ``(F,)`` for a table row. Intensities as read: DICOM after its
        modality LUT (rescale slope and intercept, so CT is in HU) and, when a
        window applies, windowed to [0, 1]; MONOCHROME1 already inverted.
    key : str
        Where the record came from, relative to the dataset root (POSIX); a
        row or array index for tables and ``.npz`` files. Used to look labels
        up; never logged and never put in an error message.
    patient : str or None
        The patient the record belongs to, when known.
    series : str or None
        The DICOM SeriesInstanceUID, for DICOM records.
    local_label : str or None
        The site's own label, before harmonization.
    spacing : tuple of float or None
        Physical size of a pixel or voxel along each spatial axis of
        ``array`` (``(H, W)`` or ``(D, H, W)`` order), in mm.

    Examples
    --------
    >>> record = ImageRecord(array=np.zeros((1, 4, 4), np.float32), key="a/1.png")
    >>> record.array.shape, record.local_label
    ((1, 4, 4), None)
    """

    array: np.ndarray
    key: str
    patient: str | None = None
    series: str | None = None
    local_label: str | None = None
    spacing: tuple[float, ...] | None = None

    def __repr__(self) -> str:  # never show the key, patient or series (identifiers)
        return f"ImageRecord(shape={tuple(self.array.shape)}, label={self.local_label!r})"


class SkippedFile(Exception):
    """Raised by a per-file read to say the file is skipped, and why (a short, fixed reason).

    Examples
    --------
    >>> SkippedFile("not an image file").reason
    'not an image file'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ReadReport:
    """Counts of what a reader saw: files, records, skips by reason, shapes and spacing.

    Holds no file names, paths or identifiers: patients and series are counted.

    Examples
    --------
    >>> report = ReadReport()
    >>> report.skip("not an image file")
    >>> report.add_records([ImageRecord(np.zeros((1, 2, 3), np.float32), "x", spacing=(0.5, 0.5))])
    >>> report.to_dict()["shapes"], report.to_dict()["skipped"]
    ({'1x2x3': 1}, {'not an image file': 1})
    """

    files_seen: int = 0
    records_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    shapes: Counter[tuple[int, ...]] = field(default_factory=Counter)
    spacing_min: tuple[float, ...] | None = None
    spacing_max: tuple[float, ...] | None = None
    patients: int = 0
    series: int = 0

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` files (or records) skipped for ``reason``."""
        self.skipped[reason] += count

    def add_records(self, records: Sequence[ImageRecord]) -> None:
        """Count ``records``: their number, shapes, spacing range, patients and series.

        Spacing is summarised over records with as many spacing axes as the
        first record that has one.
        """
        self.records_read += len(records)
        patients: set[str] = set()
        series: set[str] = set()
        for record in records:
            self.shapes[tuple(int(n) for n in record.array.shape)] += 1
            if record.patient is not None:
                patients.add(record.patient)
            if record.series is not None:
                series.add(record.series)
            if record.spacing is None:
                continue
            if self.spacing_min is None or self.spacing_max is None:
                self.spacing_min = self.spacing_max = record.spacing
            elif len(record.spacing) == len(self.spacing_min):
                self.spacing_min = tuple(map(min, self.spacing_min, record.spacing))
                self.spacing_max = tuple(map(max, self.spacing_max, record.spacing))
        self.patients += len(patients)
        self.series += len(series)

    def size_range(self) -> dict[str, tuple[int, int]]:
        """Smallest and largest ``D``, ``H`` and ``W`` over the image shapes read (empty for tables)."""
        ranges: dict[str, tuple[int, int]] = {}
        for shape in self.shapes:
            if len(shape) < 3:
                continue
            for name, size in zip(("D", "H", "W")[-(len(shape) - 1) :], shape[1:], strict=True):
                low, high = ranges.get(name, (size, size))
                ranges[name] = (min(low, size), max(high, size))
        return {name: ranges[name] for name in ("D", "H", "W") if name in ranges}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (counts only)."""
        return {
            "files_seen": self.files_seen,
            "records_read": self.records_read,
            "skipped": dict(sorted(self.skipped.items())),
            "shapes": {"x".join(map(str, shape)): n for shape, n in sorted(self.shapes.items())},
            "size_range": {name: list(pair) for name, pair in self.size_range().items()},
            "spacing_min_mm": None if self.spacing_min is None else [round(v, 6) for v in self.spacing_min],
            "spacing_max_mm": None if self.spacing_max is None else [round(v, 6) for v in self.spacing_max],
            "patients": self.patients,
            "series": self.series,
        }


class Reader(abc.ABC):
    """Reads every record under a dataset path; the options are given to ``__init__``.

    A reader never raises for one bad file: it counts the file in the report
    under a short reason and goes on. It raises :class:`~fedcare.errors.DataError`
    only when the dataset as a whole cannot be read (the path is missing, an
    archive lacks a declared array, a table lacks a declared column).
    """

    @abc.abstractmethod
    def read(self, path: Path) -> tuple[list[ImageRecord], ReadReport]:
        """Every record under ``path`` (a file or a folder), and the report of the read."""


def iter_files(path: Path) -> Iterator[tuple[Path, str]]:
    """Every file under ``path`` in sorted order, with its key (POSIX path relative to ``path``).

    ``path`` may be a single file (its key is its name). Hidden files and
    folders (names starting with ``.``) are left out.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     root = Path(tmp)
    ...     (root / "b").mkdir(); _ = (root / "b" / "2.png").write_bytes(b""); _ = (root / "1.png").write_bytes(b"")
    ...     _ = (root / ".DS_Store").write_bytes(b"")
    ...     [key for _, key in iter_files(root)]
    ['1.png', 'b/2.png']
    """
    if path.is_file():
        yield path, path.name
        return
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        yield file, relative.as_posix()
