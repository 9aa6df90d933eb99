"""NIfTI through nibabel's own sample files: canonical orientation, 4D, NIfTI-2, spacing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fedcare.data.readers import NiftiReader, read_nifti_file

from .conftest import copy_to, nibabel_sample


def canonical_dhw(path):
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(image.get_fdata(dtype=np.float32)), image.header.get_zooms()


def test_3d_volume_is_one_record_in_canonical_orientation():
    path = nibabel_sample("anatomical.nii")
    [record] = read_nifti_file(path, "anatomical.nii")
    data, zooms = canonical_dhw(path)
    assert record.array.shape == (1, 25, 41, 33)
    np.testing.assert_array_equal(record.array[0], data.transpose(2, 1, 0))
    assert record.spacing == pytest.approx(tuple(float(z) for z in zooms[:3][::-1]))


def test_4d_volume_gives_one_record_per_volume():
    path = nibabel_sample("functional.nii")
    records = read_nifti_file(path, "functional.nii")
    data, zooms = canonical_dhw(path)
    assert len(records) == 20 and {r.array.shape for r in records} == {(1, 3, 21, 17)}
    np.testing.assert_array_equal(records[7].array[0], data[..., 7].transpose(2, 1, 0))
    assert records[0].spacing == pytest.approx((8.0, 4.0, 4.0))


@pytest.mark.parametrize(("name", "shape"), [("example4d.nii.gz", (1, 24, 96, 128)), ("example_nifti2.nii.gz", (1, 12, 20, 32))])
def test_compressed_and_nifti2_files_are_read(tmp_path, name, shape):
    folder = copy_to(tmp_path, nibabel_sample(name))
    (tmp_path / "readme.txt").write_text("not a volume")
    records, report = NiftiReader().read(folder)
    assert len(records) == 2 and records[0].array.shape == shape
    assert report.skipped == {"not a NIfTI file": 1}
    data, _ = canonical_dhw(nibabel_sample(name))
    np.testing.assert_allclose(records[1].array[0], data[..., 1].transpose(2, 1, 0))
    assert report.spacing_min == pytest.approx(report.spacing_max)


def test_damaged_nifti_is_counted_as_corrupt(tmp_path):
    (tmp_path / "cut.nii").write_bytes(nibabel_sample("anatomical.nii").read_bytes()[:1000])
    records, report = NiftiReader().read(tmp_path)
    assert records == [] and report.skipped == {"truncated or corrupt": 1}


def test_nifti_site_is_resized_trilinearly_to_the_plan_volume_shape(tmp_path):
    from fedcare.data.manifest import DatasetManifest, load_manifest_site
    from fedcare.plan import DatasetConfig

    names = ["anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]
    copy_to(tmp_path / "scans", *(nibabel_sample(n) for n in names))
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{n},{'t1' if i % 2 else 't2'}\n" for i, n in enumerate(names)))
    manifest = DatasetManifest.model_validate(
        {"format": "nifti", "path": "scans", "labels": {"source": "file", "file": "labels.csv"},
         "split": {"test_fraction": 0.25}}
    ).resolved(tmp_path)
    config = DatasetConfig(name="mri", labels=("t1", "t2"), input_shape=(1, 8, 12, 12))
    data, report = load_manifest_site(manifest, config, site="a")
    assert data.train.x.shape[1:] == (1, 8, 12, 12) and 0 <= data.train.x.min() and data.train.x.max() <= 1
    assert report.read.records_read == 1 + 20 + 2 + 2 and report.patients == 4  # a file's volumes stay together
    assert len(data.train) + len(data.test) == 25 and data.spec.input_shape == (1, 8, 12, 12)
