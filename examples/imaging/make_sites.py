"""Write two hospitals' chest X-ray folders, as PNG files and as DICOM files, for the imaging examples.

The images are real: chest X-rays of PneumoniaMNIST (MedMNIST v2, CC BY 4.0),
from the copy bundled with fedcare; nothing is downloaded. Each hospital
stores them its own way, as hospitals do:

==========  ==========================================  ==========================================
            PNG federation (``png/``)                    DICOM federation (``dicom/``)
==========  ==========================================  ==========================================
hospital-a  one folder per diagnosis (NORMAL/,           one folder per patient, MONOCHROME2,
            PNEUMONIA/), 56x56 grayscale                  12-bit with rescale slope 2 and intercept
                                                          -1024; labels.csv keyed by series
hospital-b  one flat folder and labels.csv keyed by      MONOCHROME1 (white is low), 8-bit;
            file, in its own words ("No finding",        labels.csv keyed by patient, in French
            "Pneumonia", "Pneumonia (viral)",            ("normal", "pneumonie"), and a few
            "Not assessed")                              secondary-capture reports without pixels
==========  ==========================================  ==========================================

Every patient has two images of the same diagnosis (PneumoniaMNIST has one
per patient; the example pairs them so that the patient-level split has work
to do). Patient
identifiers are made up (``A-0001``...) and carry no real person's data.

Usage::

    python examples/imaging/make_sites.py            # writes examples/imaging/{png,dicom}/hospital-*/
    python examples/imaging/make_sites.py --images 300
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_PNEUMONIA_SHA256 = "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8"


def chest_xrays() -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST's training images (uint8, 28x28) and labels (0 normal, 1 pneumonia)."""
    path = Path(str(resources.files("fedcare.data").joinpath("bundled", "medmnist", "pneumoniamnist.npz")))
    if hashlib.sha256(path.read_bytes()).hexdigest() != _PNEUMONIA_SHA256:
        raise SystemExit("the bundled pneumoniamnist.npz does not match its SHA-256; reinstall fedcare")
    with np.load(path, allow_pickle=False) as data:  # no pickle, even for a local file
        return data["train_images"], data["train_labels"].reshape(-1).astype(np.int64)


def _upsample(image: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(image, np.ones((factor, factor), dtype=image.dtype))


def write_png_sites(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    a, b = root / "hospital-a" / "images", root / "hospital-b" / "images"
    half = len(images) // 4 * 2  # even: a patient's two images stay at one hospital
    for index in range(half):  # hospital-a: a folder per diagnosis, files named after the patient
        folder = a / ("PNEUMONIA" if labels[index] else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        patient = f"A-{index // 2:04d}"
        Image.fromarray(_upsample(images[index], 2)).save(folder / f"{patient}_{index % 2}.png")
    b.mkdir(parents=True, exist_ok=True)
    words = {0: "No finding", 1: "Pneumonia"}
    with (root / "hospital-b" / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "finding", "patient_id"])
        for offset, index in enumerate(range(half, len(images))):
            name = f"img{offset:05d}.png"
            Image.fromarray(images[index]).save(b / name)
            finding = words[int(labels[index])]
            if labels[index] and offset % 7 == 0:
                finding = "Pneumonia (viral)"  # hospital-b records a subtype for some
            if offset % 50 == 49:
                finding = "Not assessed"  # and leaves some unread: the manifest drops them
            writer.writerow([name, finding, f"B-{offset // 2:04d}"])


def _dicom(
    pixels: np.ndarray, *, patient: str, series_uid: str, instance: int, monochrome1: bool, twelve_bit: bool
) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(instance)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.PatientName = "EXAMPLE^" + patient  # made up, like the identifier
    ds.Modality = "CR"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient])
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PixelSpacing = [0.5, 0.5]
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelRepresentation = 0
    values = 255 - pixels if monochrome1 else pixels
    if twelve_bit:
        # Stored values s with HU-like output 2 * s - 1024: the reader must apply the rescale.
        stored = ((values.astype(np.float64) * 4 + 1024) / 2).astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.PixelData = stored.tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = values.astype(np.uint8).tobytes()
    return ds


def write_dicom_sites(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    half = len(images) // 4 * 2  # even: a patient's two images stay at one hospital
    a = root / "hospital-a"
    a.mkdir(parents=True, exist_ok=True)
    with (a / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["series", "diagnosis"])
        for index in range(half):
            patient = f"A-{index // 2:04d}"
            series = generate_uid(entropy_srcs=["hospital-a", str(index)])
            folder = a / "dicom" / patient
            folder.mkdir(parents=True, exist_ok=True)
            ds = _dicom(images[index], patient=patient, series_uid=series, instance=1, monochrome1=False, twelve_bit=True)
            ds.save_as(folder / f"IM{index % 2}.dcm", enforce_file_format=True)
            writer.writerow([series, "PNEUMONIA" if labels[index] else "NORMAL"])
    b = root / "hospital-b"
    (b / "dicom").mkdir(parents=True, exist_ok=True)
    diagnosis: dict[str, str] = {}
    for offset, index in enumerate(range(half, len(images))):
        patient = f"B-{offset // 2:04d}"
        series = generate_uid(entropy_srcs=["hospital-b", str(offset)])
        ds = _dicom(images[index], patient=patient, series_uid=series, instance=offset % 2 + 1, monochrome1=True, twelve_bit=False)
        ds.save_as(b / "dicom" / f"{offset:05d}.dcm", enforce_file_format=True)
        diagnosis[patient] = "pneumonie" if labels[index] else "normal"  # a patient's two images share it
    for number in range(3):  # structured reports: DICOM files without pixel data, to be skipped
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = BasicTextSRStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["report", str(number)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        report = Dataset()
        report.file_meta = meta
        report.SOPClassUID, report.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        report.PatientID, report.Modality = f"B-{number:04d}", "SR"
        report.SeriesInstanceUID = generate_uid(entropy_srcs=["report-series", str(number)])
        report.save_as(b / "dicom" / f"report{number}.dcm", enforce_file_format=True)
    with (b / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient", "diagnostic"])
        writer.writerows(sorted(diagnosis.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1200, help="images in all (split between the two hospitals)")
    parser.add_argument("--out", type=Path, default=HERE, help="where png/ and dicom/ go")
    args = parser.parse_args()
    images, labels = chest_xrays()
    rng = np.random.default_rng(7)
    chosen = rng.permutation(len(labels))[: args.images - args.images % 2]
    # Pair images of the same diagnosis as one patient's two images, then shuffle the patients.
    pairs: list[np.ndarray] = []
    for label in (0, 1):
        members = chosen[labels[chosen] == label]
        pairs.extend(members[: len(members) - len(members) % 2].reshape(-1, 2))
    order = np.concatenate([pairs[i] for i in rng.permutation(len(pairs))])
    images, labels = images[order], labels[order]
    write_png_sites(args.out / "png", images, labels)
    write_dicom_sites(args.out / "dicom", images, labels)
    print(f"wrote {len(labels)} chest X-rays for two hospitals under {args.out}/png and {args.out}/dicom")


if __name__ == "__main__":
    main()
