"""Site data: bundled datasets, partitioners and feature normalization."""

from fedcare.data.catalog import BreastCancer, BundledDataset, DatasetCatalog, DatasetInfo, HeartDisease, TcgaBrca
from fedcare.data.normalization import (
    FeatureStats,
    Standardization,
    combine_feature_stats,
    feature_stats,
)
from fedcare.data.splits import dirichlet_partition, iid_partition, stratified_split

__all__ = [
    "BreastCancer",
    "BundledDataset",
    "DatasetCatalog",
    "DatasetInfo",
    "FeatureStats",
    "HeartDisease",
    "Standardization",
    "TcgaBrca",
    "combine_feature_stats",
    "dirichlet_partition",
    "feature_stats",
    "iid_partition",
    "stratified_split",
]
