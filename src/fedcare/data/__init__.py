"""Site data: bundled datasets, site manifests and readers, partitioners and feature normalization."""

from fedcare.data.catalog import BreastCancer, BundledDataset, DatasetCatalog, DatasetInfo, HeartDisease, TcgaBrca
from fedcare.data.check import DatasetCheck, check_site
from fedcare.data.manifest import (
    DataReport,
    DatasetManifest,
    LabelHarmonization,
    ManifestDataset,
    harmonize_labels,
    load_manifest_site,
    manifest_spec,
    patient_split,
)
from fedcare.data.normalization import (
    FeatureStats,
    Standardization,
    combine_feature_stats,
    feature_stats,
)
from fedcare.data.readers import ImageRecord, ReadReport
from fedcare.data.splits import dirichlet_partition, iid_partition, stratified_split

__all__ = [
    "BreastCancer",
    "BundledDataset",
    "DataReport",
    "DatasetCatalog",
    "DatasetCheck",
    "DatasetInfo",
    "DatasetManifest",
    "FeatureStats",
    "HeartDisease",
    "ImageRecord",
    "LabelHarmonization",
    "ManifestDataset",
    "ReadReport",
    "Standardization",
    "TcgaBrca",
    "check_site",
    "combine_feature_stats",
    "dirichlet_partition",
    "feature_stats",
    "harmonize_labels",
    "iid_partition",
    "load_manifest_site",
    "manifest_spec",
    "patient_split",
    "stratified_split",
]
