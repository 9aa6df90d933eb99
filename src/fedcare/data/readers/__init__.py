"""Readers of a site's files: DICOM, NIfTI, PNG/JPEG/BMP/TIFF folders, ``.npz`` archives, CSV tables.

Every reader has one method, ``read(path) -> (records, report)``: a list of
:class:`ImageRecord` (an array and its metadata, as MONAI's readers return)
and a :class:`ReadReport` of counts. Heavy backends (pydicom, nibabel,
Pillow) are imported only when a file is read. Readers never log or raise
with file names, paths or tag values: bad files are counted by reason.
"""

from fedcare.data.readers.base import ImageRecord, Reader, ReadReport, SkippedFile, iter_files
from fedcare.data.readers.dicom import DicomReader, linear_window, read_dicom_file
from fedcare.data.readers.nifti import NiftiReader, is_nifti, read_nifti_file
from fedcare.data.readers.pillow import ImageFolderReader, read_image_file
from fedcare.data.readers.tables import CsvReader, NpzReader, images_to_channels_first

__all__ = [
    "CsvReader",
    "DicomReader",
    "ImageFolderReader",
    "ImageRecord",
    "NiftiReader",
    "NpzReader",
    "ReadReport",
    "Reader",
    "SkippedFile",
    "images_to_channels_first",
    "is_nifti",
    "iter_files",
    "linear_window",
    "read_dicom_file",
    "read_image_file",
    "read_nifti_file",
]
