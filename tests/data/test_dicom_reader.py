"""DICOM through pydicom's own sample files: values, colour, MONOCHROME1, multi-frame, series, spacing."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from fedcare.data.manifest import DatasetManifest, read_manifest_records
from fedcare.data.readers import DicomReader, read_dicom_file

from .conftest import copy_to, dicom_sample, dicom_test_dir


def dcmread(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def test_ct_values_are_the_modality_lut_output_in_hounsfield_units(tmp_path):
    source = dicom_sample("CT_small.dcm")
    ds = dcmread(source)
    expected = apply_modality_lut(ds.pixel_array, ds)
    [record] = read_dicom_file(copy_to(tmp_path, source) / "CT_small.dcm", "CT_small.dcm")
    assert record.array.dtype == np.float32 and record.array.shape == (1, 128, 128)
    np.testing.assert_allclose(record.array[0], expected, rtol=0, atol=1e-3)
    assert record.array.min() < 0 < record.array.max()  # HU: air is negative
    assert record.spacing == pytest.approx((0.661468, 0.661468))


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_mr_encodings_give_the_same_pixels(tmp_path, name):
    [reference] = read_dicom_file(dicom_sample("MR_small.dcm"), "a")
    [other] = read_dicom_file(dicom_sample(name), "b")
    np.testing.assert_array_equal(reference.array, other.array)


def test_mr_with_a_window_in_the_file_is_windowed_to_unit_range():
    ds = dcmread(dicom_sample("MR_small.dcm"))
    assert "WindowCenter" in ds
    [record] = read_dicom_file(dicom_sample("MR_small.dcm"), "a")
    assert 0.0 <= record.array.min() and record.array.max() <= 1.0


def test_manifest_window_replaces_the_file_window():
    [record] = read_dicom_file(dicom_sample("CT_small.dcm"), "a", window=(40.0, 400.0))
    ds = dcmread(dicom_sample("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert np.all(record.array[0][hu <= -160.5] == 0.0) and np.all(record.array[0][hu > 239] == 1.0)


def test_rgb_file_gives_three_channels():
    [record] = read_dicom_file(dicom_sample("examples_rgb_color.dcm"), "a")
    ds = dcmread(dicom_sample("examples_rgb_color.dcm"))
    assert record.array.shape == (3, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(record.array[0], ds.pixel_array[..., 0])


def test_monochrome1_is_inverted_so_that_higher_is_brighter():
    path = dicom_test_dir() / "dicomdirtests" / "77654033" / "CR1" / "6154"
    ds = dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(float)
    [record] = read_dicom_file(path, "a")
    darkest_stored, brightest_stored = np.unravel_index(raw.argmin(), raw.shape), np.unravel_index(raw.argmax(), raw.shape)
    # in MONOCHROME1 the smallest stored value is white: after inversion it is the brightest
    assert record.array[0][darkest_stored] == record.array[0].max()
    assert record.array[0][brightest_stored] == record.array[0].min()


def test_multi_frame_file_gives_one_record_per_frame_or_one_volume(tmp_path):
    folder = copy_to(tmp_path / "dose", dicom_sample("rtdose.dcm"))
    frames, _ = DicomReader().read(folder)
    [volume], report = DicomReader(volume=True).read(folder)
    assert len(frames) == 15 and frames[0].array.shape == (1, 10, 10)
    assert volume.array.shape == (1, 15, 10, 10)
    np.testing.assert_array_equal(volume.array[:, 3], frames[3].array)
    assert report.shapes == {(1, 15, 10, 10): 1}


def test_files_without_pixels_are_counted_not_read(tmp_path):
    folder = copy_to(tmp_path, dicom_sample("rtplan.dcm"), dicom_sample("waveform_ecg.dcm"), dicom_sample("CT_small.dcm"))
    records, report = DicomReader().read(folder)
    assert len(records) == 1
    assert report.skipped == {"no pixel data": 2} and report.files_seen == 3


def test_compression_without_a_decoder_is_counted_as_unsupported(tmp_path):
    folder = copy_to(tmp_path, dicom_sample("MR_small_jpeg_ls_lossless.dcm"))
    records, report = DicomReader().read(folder)
    assert records == [] and report.skipped == {"unsupported compression": 1}


def test_dicomdir_tree_groups_slices_into_series_volumes():
    tree = dicom_test_dir() / "dicomdirtests" / "77654033"
    records, report = DicomReader(volume=True).read(tree)
    by_shape = sorted(r.array.shape for r in records)
    assert by_shape == [(1, 1, 16, 16)] * 3 + [(1, 4, 16, 16)]  # CR1..CR3, and CT2's 4 slices
    assert report.series == 4 and report.patients == 1
    ct = next(r for r in records if r.array.shape[1] == 4)
    slices = sorted((tree / "CT2").iterdir(), key=lambda p: float(dcmread(p).ImagePositionPatient[2]))
    positions = [float(dcmread(p).ImagePositionPatient[2]) for p in slices]
    for depth, path in enumerate(slices):  # ordered along the slice normal
        np.testing.assert_array_equal(ct.array[:, depth], read_dicom_file(path, "x")[0].array)
    assert ct.spacing == pytest.approx((float(np.median(np.diff(positions))), 0.488281, 0.488281))


def test_dicom_manifest_labels_series_from_a_labels_file(tmp_path):
    tree = dicom_test_dir() / "dicomdirtests" / "98892001"
    uids = sorted({str(dcmread(p).SeriesInstanceUID) for p in tree.rglob("*") if p.is_file()})
    (tmp_path / "labels.csv").write_text("series,label\n" + "".join(f"{u},{'a' if i else 'b'}\n" for i, u in enumerate(uids)))
    manifest = DatasetManifest.model_validate(
        {"format": "dicom", "path": str(tree), "labels": {"source": "file", "file": "labels.csv", "key": "series"},
         "preprocess": {"volume": True}}
    ).resolved(tmp_path)
    records, report = read_manifest_records(manifest)
    assert sorted(r.local_label for r in records) == ["a", "b"]
    assert report.series == 2 and all(r.patient == "98890234" for r in records)
