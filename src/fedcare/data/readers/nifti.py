"""NIfTI-1 and NIfTI-2 volumes through nibabel, in canonical (RAS+) orientation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedcare.data.readers.base import ImageRecord, Reader, ReadReport, SkippedFile, iter_files
from fedcare.errors import DataError

__all__ = ["NiftiReader", "is_nifti", "read_nifti_file"]

logger = logging.getLogger(__name__)


def is_nifti(name: str) -> bool:
    """Whether a file name is a NIfTI file's (``.nii`` or ``.nii.gz``).

    Examples
    --------
    >>> is_nifti("brain.nii.gz"), is_nifti("brain.NII"), is_nifti("brain.img")
    (True, True, False)
    """
    lower = name.lower()
    return lower.endswith(".nii") or lower.endswith(".nii.gz")


def read_nifti_file(path: Path, key: str) -> list[ImageRecord]:
    """The records of one NIfTI file: one ``(1, D, H, W)`` volume, or one per volume of a 4D file.

    The image is reoriented with ``nibabel.as_closest_canonical`` (RAS+) and
    its data (after ``scl_slope``/``scl_inter``) transposed from nibabel's
    ``(i, j, k)`` to ``(k, j, i)``: ``array[0, k, j, i]`` is canonical voxel
    ``(i, j, k)``, so ``D`` runs inferior to superior, ``H`` posterior to
    anterior and ``W`` left to right. ``spacing`` is the header's zooms in the
    same ``(D, H, W)`` order, in mm. A 2D image is a volume with ``D = 1``; a
    4D image gives one record per volume along its 4th axis (all with the
    file's key); more dimensions are "unsupported image".

    Raises
    ------
    SkippedFile
        "truncated or corrupt" when nibabel cannot read it.

    Examples
    --------
    >>> from importlib.resources import files
    >>> [record] = read_nifti_file(Path(str(files("nibabel") / "tests" / "data" / "anatomical.nii")), "a.nii")
    >>> record.array.shape, record.spacing
    ((1, 25, 41, 33), (2.0, 2.0, 2.0))
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        canonical = nib.as_closest_canonical(image)  # type: ignore[no-untyped-call]
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in canonical.header.get_zooms())
    except Exception:  # noqa: BLE001 - nibabel raises many kinds on a damaged file
        raise SkippedFile("truncated or corrupt") from None
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = (*zooms[:2], 1.0)
    if data.ndim not in (3, 4):
        raise SkippedFile("unsupported image")
    spacing = (zooms[2], zooms[1], zooms[0])
    volumes = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    return [
        ImageRecord(array=np.ascontiguousarray(v.transpose(2, 1, 0)[None]), key=key, spacing=spacing) for v in volumes
    ]


class NiftiReader(Reader):
    """Every ``.nii``/``.nii.gz`` file under a path (see :func:`read_nifti_file`); other files are skipped.

    Examples
    --------
    >>> from importlib.resources import files
    >>> records, report = NiftiReader().read(Path(str(files("nibabel") / "tests" / "data" / "functional.nii")))
    >>> len(records), records[0].array.shape
    (20, (1, 3, 21, 17))
    """

    def read(self, path: Path) -> tuple[list[ImageRecord], ReadReport]:
        if not path.exists():
            raise DataError("the dataset path does not exist", field="path")
        report = ReadReport()
        records: list[ImageRecord] = []
        for file, key in iter_files(path):
            report.files_seen += 1
            if not is_nifti(file.name):
                report.skip("not a NIfTI file")
                continue
            try:
                records.extend(read_nifti_file(file, key))
            except SkippedFile as skipped:
                report.skip(skipped.reason)
        report.add_records(records)
        logger.info(
            "read NIfTI dataset",
            extra={"files_seen": report.files_seen, "records": report.records_read, "skipped": dict(report.skipped)},
        )
        return records, report
