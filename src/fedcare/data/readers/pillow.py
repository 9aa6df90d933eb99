"""PNG, JPEG, BMP and TIFF images through Pillow; and folders of images labelled by subfolder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedcare.data.readers.base import ImageRecord, Reader, ReadReport, SkippedFile, iter_files
from fedcare.data.readers.dicom import read_dicom_file
from fedcare.data.readers.nifti import is_nifti, read_nifti_file
from fedcare.errors import DataError

__all__ = ["ImageFolderReader", "read_image_file"]

logger = logging.getLogger(__name__)

_GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def read_image_file(path: Path, key: str) -> ImageRecord:
    """One image file read with Pillow: ``(1, H, W)`` for grayscale, ``(3, H, W)`` for colour.

    Values are as stored (0-255 for 8-bit, 0-65535 for 16-bit). Palette,
    RGBA and CMYK images become RGB; grayscale with alpha becomes grayscale.
    A multi-page TIFF gives its first page.

    Raises
    ------
    SkippedFile
        "not an image file" when Pillow does not recognise it, "truncated or
        corrupt" when it fails to verify or decode.

    Examples
    --------
    >>> import io, tempfile
    >>> from PIL import Image
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     Image.new("RGBA", (5, 4), (10, 20, 30, 255)).save(Path(tmp) / "a.png")
    ...     record = read_image_file(Path(tmp) / "a.png", "a.png")
    >>> record.array.shape, record.array[:, 0, 0].tolist()
    ((3, 4, 5), [10.0, 20.0, 30.0])
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            gray: Image.Image | None = None
            if image.mode in _GRAY_MODES:
                gray = image
            elif image.mode in ("LA", "La"):
                gray = image.convert("L")
            if gray is not None:
                array = np.asarray(gray, dtype=np.float32)[None]
            else:
                array = np.moveaxis(np.asarray(image.convert("RGB"), dtype=np.float32), -1, 0)
    except UnidentifiedImageError:
        raise SkippedFile("not an image file") from None
    except Exception:  # noqa: BLE001 - Pillow raises many kinds on a damaged file
        raise SkippedFile("truncated or corrupt") from None
    return ImageRecord(array=np.ascontiguousarray(array), key=key)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


class ImageFolderReader(Reader):
    """Images in one subfolder per class: ``path/<label>/.../<file>``; the local label is ``<label>``.

    Each file is read by what it is: DICOM (``.dcm``, ``.dicom``, ``.ima``
    or a ``DICM`` preamble) as in :func:`~fedcare.data.readers.read_dicom_file`,
    NIfTI (``.nii``, ``.nii.gz``) as in :func:`~fedcare.data.readers.read_nifti_file`,
    anything else with Pillow (:func:`read_image_file`). Files directly
    under ``path`` have no class folder and are skipped as "no label folder".

    Parameters
    ----------
    window : (center, width), optional
        VOI window for DICOM files.
    label_folders : bool
        Take each file's local label from its first folder under ``path``
        (default). ``False`` when labels come from a labels file: every image
        is read, flat or nested, with no local label.

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "benign").mkdir()
    ...     Image.new("L", (8, 8)).save(Path(tmp) / "benign" / "1.png")
    ...     _ = (Path(tmp) / "benign" / "notes.txt").write_text("hello")
    ...     records, report = ImageFolderReader().read(Path(tmp))
    >>> [r.local_label for r in records], dict(report.skipped)
    (['benign'], {'not an image file': 1})
    """

    def __init__(self, *, window: tuple[float, float] | None = None, label_folders: bool = True) -> None:
        self.window = window
        self.label_folders = label_folders

    def read(self, path: Path) -> tuple[list[ImageRecord], ReadReport]:
        if not path.is_dir():
            raise DataError("the dataset path is not a folder of images", field="path")
        report = ReadReport()
        records: list[ImageRecord] = []
        for file, key in iter_files(path):
            report.files_seen += 1
            if self.label_folders and "/" not in key:
                report.skip("no label folder")
                continue
            label = key.split("/", 1)[0] if self.label_folders else None
            try:
                if is_nifti(file.name):
                    found = read_nifti_file(file, key)
                elif _is_dicom(file):
                    found = read_dicom_file(file, key, window=self.window)
                else:
                    found = [read_image_file(file, key)]
            except SkippedFile as skipped:
                report.skip(skipped.reason)
                continue
            records.extend(
                ImageRecord(r.array, r.key, r.patient, r.series, local_label=label, spacing=r.spacing) for r in found
            )
        report.add_records(records)
        logger.info(
            "read image folder",
            extra={"files_seen": report.files_seen, "records": report.records_read, "skipped": dict(report.skipped)},
        )
        return records, report
