"""DICOM files through pydicom: modality LUT, VOI window, MONOCHROME1, colour, multi-frame, series."""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcare.data.readers.base import ImageRecord, Reader, ReadReport, SkippedFile, iter_files
from fedcare.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["DicomReader", "read_dicom_file"]

logger = logging.getLogger(__name__)

_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


@dataclass(frozen=True)
class _Slice:
    array: np.ndarray  # (C, H, W) or (C, F, H, W) for a multi-frame file
    key: str
    patient: str | None
    series: str | None
    multi_frame: bool
    position: float | None  # along the slice normal, mm
    instance: int | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None


def _load_dataset(path: Path) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # pydicom's warnings can quote tag values
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=False)
        complete = _ends_cleanly(ds, size=path.stat().st_size)
    except InvalidDicomError:
        raise SkippedFile("not a DICOM file") from None
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
        raise SkippedFile("truncated or corrupt") from None
    if not complete:
        raise SkippedFile("truncated or corrupt")
    return ds


def _ends_cleanly(ds: Dataset, *, size: int) -> bool:
    """Whether the last element read ends at the end of the file (pydicom reads a cut file silently).

    Deflated files and a last element of undefined length (encapsulated
    pixel data, sequences) cannot be checked this way and pass.
    """
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    tags = list(ds.keys())
    if not tags or (syntax is not None and syntax.is_deflated):
        return True
    last = ds.get_item(max(tags))
    length, tell, value = getattr(last, "length", None), getattr(last, "value_tell", None), getattr(last, "value", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return True
    return bool(tell + length == size and (not isinstance(value, bytes) or len(value) == length))


def _is_image_storage(ds: Dataset) -> bool:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return uid is not None and "Image Storage" in str(getattr(uid, "name", ""))


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the modality LUT, as pydicom's windowing computes it."""
    bits = int(ds.get("BitsStored", 16) or 16)
    low: float
    high: float
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0) or 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        ends = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
        low, high = ends[0], ends[1]
    return low, high


def linear_window(array: np.ndarray, *, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR VOI window (PS3.3 C.11.2.1.2.1) onto [0, 1].

    Parameters
    ----------
    array : numpy.ndarray
        Values after the modality LUT (HU for CT).
    center, width : float
        Window center and width, in the same units; ``width >= 1``.

    Examples
    --------
    >>> linear_window(np.array([-1000.0, 40.0, 1000.0]), center=40, width=400).round(3).tolist()
    [0.0, 0.501, 1.0]
    """
    c, w = center - 0.5, width - 1.0
    if w <= 0:
        return (array > c).astype(np.float64)
    return np.clip((array - c) / w + 0.5, 0.0, 1.0)


def _pixels(ds: Dataset, *, window: tuple[float, float] | None) -> np.ndarray:
    """Decoded, rescaled, windowed pixels: ``(F, C, H, W)`` float32 (``F`` = 1 for one frame)."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # an image object without its pixels was cut short; an SR, RT plan or waveform has none
        raise SkippedFile("truncated or corrupt" if _is_image_storage(ds) else "no pixel data")
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    compressed = bool(syntax is not None and syntax.is_compressed)
    if compressed:
        try:
            if not get_decoder(str(syntax)).is_available:
                raise SkippedFile("unsupported compression")
        except NotImplementedError:
            raise SkippedFile("unsupported compression") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except Exception:  # noqa: BLE001 - decoders raise many kinds
        raise SkippedFile("unsupported compression" if compressed else "truncated or corrupt") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        if photometric == "PALETTE COLOR":
            raw = apply_color_lut(raw, ds)
            samples = 3
        elif samples > 1 and photometric not in _COLOUR:
            raise SkippedFile("unsupported image")
        if samples == 1:
            values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
            if window is not None:
                values = linear_window(values, center=window[0], width=window[1])
                low, high = 0.0, 1.0
            elif ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds):
                if ds.get("VOILUTSequence"):
                    low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
                else:
                    low, high = _modality_range(ds)
                values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
                values = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
                low, high = 0.0, 1.0
            else:
                low, high = _modality_range(ds)
            if photometric == "MONOCHROME1":  # 0 is white: invert within the value range
                values = (low + high) - values
            values = values.reshape((frames, 1, *values.shape[-2:]))
        else:
            values = np.asarray(raw, dtype=np.float64).reshape((frames, *raw.shape[-3:]))
            values = np.moveaxis(values, -1, 1)  # (F, H, W, 3) -> (F, 3, H, W)
    except SkippedFile:
        raise
    except Exception:  # noqa: BLE001 - a malformed LUT or window
        raise SkippedFile("truncated or corrupt") from None
    return values.astype(np.float32)


def _item(ds: Dataset, sequence: str, keyword: str) -> Any:
    """``keyword`` from the dataset, or from its shared functional groups (enhanced multi-frame)."""
    if keyword in ds:
        return ds.get(keyword)
    groups = ds.get("SharedFunctionalGroupsSequence")
    if groups:
        inner = groups[0].get(sequence)
        if inner:
            return inner[0].get(keyword)
    return None


def _geometry(ds: Dataset) -> tuple[tuple[float, float] | None, float | None, float | None]:
    spacing = _item(ds, "PixelMeasuresSequence", "PixelSpacing")
    thickness = _item(ds, "PixelMeasuresSequence", "SliceThickness")
    pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    position = None
    orientation = _item(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    origin = ds.get("ImagePositionPatient")
    if orientation is not None and origin is not None and len(orientation) == 6 and len(origin) == 3:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        position = float(np.dot(normal, np.asarray(origin, float)))
    return pixel_spacing, (float(thickness) if thickness not in (None, "") else None), position


def _read_slice(path: Path, key: str, *, window: tuple[float, float] | None) -> _Slice:
    ds = _load_dataset(path)
    values = _pixels(ds, window=window)
    pixel_spacing, thickness, position = _geometry(ds)
    instance = ds.get("InstanceNumber")
    frames = values.shape[0]
    array = values[0] if frames == 1 else np.moveaxis(values, 0, 1)  # (C, H, W) or (C, F, H, W)
    patient, series = ds.get("PatientID"), ds.get("SeriesInstanceUID")
    return _Slice(
        array=array,
        key=key,
        patient=str(patient) if patient else None,
        series=str(series) if series else None,
        multi_frame=frames > 1,
        position=position,
        instance=int(instance) if instance not in (None, "") else None,
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
    )


def _frames(item: _Slice) -> list[ImageRecord]:
    """A file's frames as 2D records (a multi-frame file gives one record per frame, same key)."""
    planes = [item.array] if not item.multi_frame else [item.array[:, f] for f in range(item.array.shape[1])]
    return [
        ImageRecord(
            array=np.ascontiguousarray(plane),
            key=item.key,
            patient=item.patient,
            series=item.series,
            spacing=item.pixel_spacing,
        )
        for plane in planes
    ]


def read_dicom_file(path: Path, key: str, *, window: tuple[float, float] | None = None) -> list[ImageRecord]:
    """The 2D records of one DICOM file: one per frame.

    Parameters
    ----------
    path : Path
        The file.
    key : str
        Its key (path relative to the dataset root).
    window : (center, width), optional
        A VOI window to apply instead of the file's own.

    Raises
    ------
    SkippedFile
        With the reason the file cannot be used ("not a DICOM file", "no pixel
        data", "truncated or corrupt", "unsupported compression",
        "unsupported image").

    Examples
    --------
    >>> from pydicom.data import get_testdata_file
    >>> [record] = read_dicom_file(Path(get_testdata_file("CT_small.dcm")), "ct.dcm")
    >>> record.array.shape, record.spacing
    ((1, 128, 128), (0.661468, 0.661468))
    """
    return _frames(_read_slice(path, key, window=window))


def _stack(series: list[_Slice]) -> ImageRecord:
    """Single-frame slices of one series as one ``(C, D, H, W)`` volume."""
    if all(s.position is not None for s in series):
        ordered = sorted(series, key=lambda s: (s.position, s.key))
        steps = np.diff([s.position for s in ordered if s.position is not None])
        slice_spacing: float | None = float(np.median(np.abs(steps))) if len(steps) else ordered[0].slice_thickness
    else:
        ordered = sorted(series, key=lambda s: (s.instance if s.instance is not None else 0, s.key))
        slice_spacing = ordered[0].slice_thickness
    first = ordered[0]
    spacing = (slice_spacing, *first.pixel_spacing) if slice_spacing and first.pixel_spacing else None
    return ImageRecord(
        array=np.stack([s.array for s in ordered], axis=1),
        key=first.key,
        patient=first.patient,
        series=first.series,
        spacing=spacing,
    )


class DicomReader(Reader):
    """Every DICOM file under a path, as 2D images or, with ``volume``, as 3D volumes.

    Files are read with ``pydicom.dcmread(force=False)``; pixels go through
    the modality LUT (rescale slope and intercept), then either the window
    given here or the file's own VOI LUT or window (both onto [0, 1]), or
    neither; MONOCHROME1 is inverted so that higher is brighter; RGB, YBR and
    palette colour give 3 channels. Files without pixel data (SR, RT plans,
    waveforms, DICOMDIR), damaged files, other files and files whose
    compression has no decoder installed are skipped and counted.

    With ``volume=False`` every frame is one ``(C, H, W)`` record (a
    multi-frame file gives one record per frame, all with the file's key).
    With ``volume=True`` a multi-frame file is one ``(C, F, H, W)`` record and
    the single-frame files of each SeriesInstanceUID are stacked into one
    ``(C, D, H, W)`` record, ordered along the slice normal (from
    ImagePositionPatient and ImageOrientationPatient; InstanceNumber when
    those are missing), keyed by the key of its first slice; a series whose
    slices differ in shape is skipped as "inconsistent series".
    Spacing: ``(row, column)`` from PixelSpacing; for volumes the slice
    spacing (from the slice positions, else SliceThickness) comes first.

    Parameters
    ----------
    window : (center, width), optional
        VOI window, in modality units (HU for CT), used instead of the file's.
    volume : bool
        Stack series into volumes.

    Examples
    --------
    >>> import shutil, tempfile
    >>> from pydicom.data import get_testdata_file
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = shutil.copy(get_testdata_file("CT_small.dcm"), tmp)
    ...     _ = shutil.copy(get_testdata_file("rtplan.dcm"), tmp)
    ...     records, report = DicomReader().read(Path(tmp))
    >>> len(records), dict(report.skipped)
    (1, {'no pixel data': 1})
    """

    def __init__(self, *, window: tuple[float, float] | None = None, volume: bool = False) -> None:
        self.window = window
        self.volume = volume

    def read(self, path: Path) -> tuple[list[ImageRecord], ReadReport]:
        if not path.exists():
            raise DataError("the dataset path does not exist", field="path")
        report = ReadReport()
        slices: list[_Slice] = []
        for file, key in iter_files(path):
            report.files_seen += 1
            try:
                slices.append(_read_slice(file, key, window=self.window))
            except SkippedFile as skipped:
                report.skip(skipped.reason)
        records: list[ImageRecord] = []
        if not self.volume:
            for item in slices:
                records.extend(_frames(item))
        else:
            by_series: dict[str, list[_Slice]] = defaultdict(list)
            for item in slices:
                if item.multi_frame:
                    spacing = (item.slice_thickness, *item.pixel_spacing) if item.slice_thickness and item.pixel_spacing else None
                    records.append(ImageRecord(item.array, item.key, item.patient, item.series, spacing=spacing))
                else:
                    by_series[item.series or f"file:{item.key}"].append(item)
            for group in by_series.values():
                if len({s.array.shape for s in group}) > 1:
                    report.skip("inconsistent series", len(group))
                    continue
                records.append(_stack(group))
        report.add_records(records)
        logger.info(
            "read DICOM dataset",
            extra={"files_seen": report.files_seen, "records": report.records_read, "skipped": dict(report.skipped)},
        )
        return records, report
