"""A site's own dataset, described in its ``node.yaml``: format, labels, patients, split, preprocessing.

A ``datasets:`` entry of ``node.yaml`` is either a binding to a bundled
dataset (``{site: cleveland}``) or a :class:`DatasetManifest`, which tells
fedcare how to read the site's files and how its local labels map onto the
federation's label vocabulary (the plan's ``dataset.labels``)::

    datasets:
      chest-xray:
        format: imagefolder
        path: images
        label_map: {NORMAL: normal, PNEUMONIA: pneumonia, QA_phantom: null}
        split: {test_fraction: 0.2, seed: 0}

:func:`load_manifest_site` turns a manifest into the :class:`SiteData` a
node trains on, and a :class:`DataReport` of counts.
"""

from fedcare.data.manifest.harmonize import LabelHarmonization, build_images, harmonize_labels, patient_split
from fedcare.data.manifest.model import (
    DatasetManifest,
    LabelSource,
    NpzArrays,
    PatientSource,
    Preprocessing,
    SplitSettings,
)
from fedcare.data.manifest.site import (
    DataReport,
    ManifestDataset,
    load_manifest_site,
    manifest_spec,
    read_manifest_records,
)

__all__ = [
    "DataReport",
    "DatasetManifest",
    "LabelHarmonization",
    "LabelSource",
    "ManifestDataset",
    "NpzArrays",
    "PatientSource",
    "Preprocessing",
    "SplitSettings",
    "build_images",
    "harmonize_labels",
    "load_manifest_site",
    "manifest_spec",
    "patient_split",
    "read_manifest_records",
]
