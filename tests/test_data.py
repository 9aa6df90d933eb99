"""Bundled datasets, partitions and federated feature normalization."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from fedcare.data import (
    DatasetCatalog,
    HeartDisease,
    Standardization,
    combine_feature_stats,
    feature_stats,
)
from fedcare.errors import ConfigError, DataError, ProtocolError
from fedcare.plan import DatasetConfig
from fedcare.tasks.base import DataSpec, SiteData, Split

BUNDLED = Path(str(resources.files("fedcare.data").joinpath("bundled", "heart_disease")))
HEART_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va-long-beach": "processed.va.data",
}
FLAMBY_SIZES = {
    "cleveland": (199, 104),
    "hungary": (172, 89),
    "switzerland": (30, 16),
    "va-long-beach": (85, 45),
}


@pytest.fixture(scope="module")
def catalog() -> DatasetCatalog:
    return DatasetCatalog.bundled()


@pytest.fixture(scope="module")
def heart(catalog: DatasetCatalog) -> dict[str, SiteData]:
    return catalog.get("heart-disease").load_sites(DatasetConfig(name="heart-disease"))


def _breast(catalog: DatasetCatalog, **config: object) -> dict[str, SiteData]:
    config_model = DatasetConfig.model_validate({"name": "breast-cancer", **config})
    return catalog.get("breast-cancer").load_sites(config_model)


@pytest.fixture(scope="module")
def breast_iid(catalog: DatasetCatalog) -> dict[str, SiteData]:
    return _breast(catalog, num_nodes=5, partition="iid")


@pytest.fixture(scope="module")
def breast_dirichlet(catalog: DatasetCatalog) -> dict[str, SiteData]:
    return _breast(catalog, num_nodes=5, partition="dirichlet", dirichlet_alpha=0.5)


def _read_raw_heart_site(filename: str) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's preprocessing, written out independently of fedcare's reader."""
    table = np.genfromtxt(BUNDLED / filename, delimiter=",", missing_values="?", filling_values=np.nan)
    table = np.delete(table, [10, 11, 12], axis=1)  # slope, ca, thal
    table = table[~np.isnan(table).any(axis=1)]
    age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, num = table.T
    one_hot = [cp == level for level in (2, 3, 4)] + [restecg == level for level in (1, 2)]
    x = np.column_stack([age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, *one_hot]).astype(np.float32)
    return x, (num > 0).astype(np.int64)


def _rows(x: np.ndarray) -> list[bytes]:
    """Rows as sorted byte strings, to compare tables as multisets of rows."""
    return sorted(row.tobytes() for row in np.ascontiguousarray(x))


def _all_rows(site: SiteData) -> np.ndarray:
    return np.concatenate([site.train.x, site.test.x])


def _malignant_share_spread(sites: dict[str, SiteData]) -> float:
    shares = [np.concatenate([s.train.y, s.test.y]).mean() for s in sites.values()]
    return float(np.std(shares))


# --- catalog --------------------------------------------------------------------------


def test_catalog_lists_the_bundled_datasets(catalog: DatasetCatalog) -> None:
    assert catalog.names() == ["breast", "breast-cancer", "heart-disease", "pneumonia", "retina", "tcga-brca"]


def test_unknown_dataset_is_refused_with_its_plan_field(catalog: DatasetCatalog) -> None:
    with pytest.raises(ConfigError) as caught:
        catalog.get("mnist")

    assert caught.value.field == "plan.dataset.name"


def test_unknown_dataset_error_lists_the_available_ones(catalog: DatasetCatalog) -> None:
    with pytest.raises(ConfigError, match="breast-cancer, heart-disease"):
        catalog.get("mnist")


def test_unknown_site_is_refused(catalog: DatasetCatalog) -> None:
    with pytest.raises(ConfigError, match="no site 'boston'"):
        catalog.get("heart-disease").load_site(DatasetConfig(name="heart-disease"), "boston")


# --- heart disease --------------------------------------------------------------------


def test_heart_disease_has_the_four_hospitals(heart: dict[str, SiteData]) -> None:
    assert list(heart) == ["cleveland", "hungary", "switzerland", "va-long-beach"]


def test_heart_disease_split_sizes_are_flamby_s(heart: dict[str, SiteData]) -> None:
    sizes = {site: (len(data.train), len(data.test)) for site, data in heart.items()}

    assert sizes == FLAMBY_SIZES


def test_heart_disease_has_740_patients(heart: dict[str, SiteData]) -> None:
    assert sum(len(d.train) + len(d.test) for d in heart.values()) == 740


def test_heart_disease_has_13_float32_features(heart: dict[str, SiteData]) -> None:
    shapes = {(d.train.x.shape[1], d.test.x.shape[1], d.train.x.dtype) for d in heart.values()}

    assert shapes == {(13, 13, np.dtype(np.float32))}


def test_heart_disease_spec_matches_the_data(heart: dict[str, SiteData]) -> None:
    spec = heart["cleveland"].spec

    assert (spec.num_features, len(spec.feature_names), spec.num_classes) == (13, 13, 2)


def test_heart_disease_labels_are_binary(heart: dict[str, SiteData]) -> None:
    labels = np.concatenate([np.concatenate([d.train.y, d.test.y]) for d in heart.values()])

    assert set(np.unique(labels).tolist()) == {0, 1}


@pytest.mark.parametrize("site", list(HEART_FILES))
def test_heart_disease_features_match_flamby_preprocessing_of_the_raw_file(
    heart: dict[str, SiteData], site: str
) -> None:
    x, _ = _read_raw_heart_site(HEART_FILES[site])

    assert _rows(_all_rows(heart[site])) == _rows(x)


@pytest.mark.parametrize("site", list(HEART_FILES))
def test_heart_disease_split_equals_scikit_learn_train_test_split(
    heart: dict[str, SiteData], site: str
) -> None:
    x, y = _read_raw_heart_site(HEART_FILES[site])
    stratify = y if np.bincount(y, minlength=2).min() > 2 else None
    train_index, test_index = train_test_split(
        np.arange(len(y)), train_size=0.66, random_state=43, shuffle=True, stratify=stratify
    )

    np.testing.assert_array_equal(heart[site].train.x, x[train_index])
    np.testing.assert_array_equal(heart[site].test.x, x[test_index])
    np.testing.assert_array_equal(heart[site].train.y, y[train_index])
    np.testing.assert_array_equal(heart[site].test.y, y[test_index])


def test_loading_heart_disease_does_not_import_scikit_learn() -> None:
    # Every node process loads its site; the split ships as indices (split.json), so none pays sklearn's import.
    import subprocess
    import sys

    code = (
        "import sys; from fedcare.data import DatasetCatalog; from fedcare.plan import DatasetConfig; "
        "DatasetCatalog.bundled().get('heart-disease').load_site(DatasetConfig(name='heart-disease'), 'hungary'); "
        "print('sklearn' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_heart_disease_switzerland_is_split_without_stratification() -> None:
    # One healthy patient in 46: FLamby stratifies only when both classes have more than two.
    _, y = _read_raw_heart_site(HEART_FILES["switzerland"])

    assert np.bincount(y, minlength=2).min() <= 2


@pytest.mark.parametrize("site", list(HEART_FILES))
def test_heart_disease_recorded_checksums_match_the_bundled_files(site: str) -> None:
    filename = HEART_FILES[site]
    recorded = dict(HeartDisease._FILES)[site]

    assert recorded == (filename, hashlib.sha256((BUNDLED / filename).read_bytes()).hexdigest())


@pytest.mark.parametrize("site", list(HEART_FILES))
def test_bundled_readme_records_the_same_checksums(site: str) -> None:
    readme = (BUNDLED.parent / "README.md").read_text(encoding="utf-8")
    filename, sha256 = HeartDisease._FILES[site]

    assert f"| `{filename}` |" in readme and f"`{sha256}`" in readme


def test_heart_disease_reader_refuses_a_file_whose_checksum_does_not_match(tmp_path: Path) -> None:
    filename = HEART_FILES["cleveland"]
    tampered = bytearray((BUNDLED / filename).read_bytes())
    tampered[0:2] = b"99"  # one patient is now 99 years old
    expected_sha256 = hashlib.sha256(bytes(tampered)).hexdigest()

    # The loader holds the bundled file to a checksum it does not have: it must refuse.
    with pytest.raises(DataError, match="SHA-256"):
        HeartDisease._read_site(filename, expected_sha256)


def test_heart_disease_checksum_error_does_not_show_a_data_path() -> None:
    filename = HEART_FILES["va-long-beach"]

    with pytest.raises(DataError) as caught:
        HeartDisease._read_site(filename, "0" * 64)

    assert str(BUNDLED) not in str(caught.value) and "/" not in str(caught.value)


def test_heart_disease_loads_identically_twice(catalog: DatasetCatalog, heart: dict[str, SiteData]) -> None:
    again = catalog.get("heart-disease").load_sites(DatasetConfig(name="heart-disease"))

    np.testing.assert_array_equal(again["hungary"].train.x, heart["hungary"].train.x)


# --- breast cancer --------------------------------------------------------------------


def test_breast_cancer_has_num_nodes_sites(breast_iid: dict[str, SiteData]) -> None:
    assert list(breast_iid) == [f"site-{i}" for i in range(5)]


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_breast_cancer_shares_all_569_patients_across_sites(catalog: DatasetCatalog, partition: str) -> None:
    sites = _breast(catalog, num_nodes=5, partition=partition)

    rows = np.concatenate([_all_rows(s) for s in sites.values()])

    assert (len(rows), len(np.unique(rows, axis=0))) == (569, 569)


def test_breast_cancer_has_30_features(breast_iid: dict[str, SiteData]) -> None:
    assert {s.train.x.shape[1] for s in breast_iid.values()} == {30}


def test_breast_cancer_iid_sites_are_near_equal(breast_iid: dict[str, SiteData]) -> None:
    sizes = [len(s.train) + len(s.test) for s in breast_iid.values()]

    assert max(sizes) - min(sizes) <= 1


def test_breast_cancer_keeps_a_quarter_of_each_site_for_testing(breast_iid: dict[str, SiteData]) -> None:
    shares = [len(s.test) / (len(s.train) + len(s.test)) for s in breast_iid.values()]

    np.testing.assert_allclose(shares, 0.25, atol=0.02)


def test_breast_cancer_dirichlet_partition_is_label_skewed(
    breast_iid: dict[str, SiteData], breast_dirichlet: dict[str, SiteData]
) -> None:
    assert _malignant_share_spread(breast_dirichlet) > 3 * _malignant_share_spread(breast_iid)


def test_breast_cancer_iid_partition_keeps_label_shares_close(breast_iid: dict[str, SiteData]) -> None:
    assert _malignant_share_spread(breast_iid) < 0.1


def test_breast_cancer_dirichlet_partition_is_deterministic(
    catalog: DatasetCatalog, breast_dirichlet: dict[str, SiteData]
) -> None:
    again = _breast(catalog, num_nodes=5, partition="dirichlet", dirichlet_alpha=0.5)

    for site in breast_dirichlet:
        np.testing.assert_array_equal(again[site].train.x, breast_dirichlet[site].train.x)
        np.testing.assert_array_equal(again[site].test.y, breast_dirichlet[site].test.y)


def test_breast_cancer_partition_ignores_numpy_global_seed(catalog: DatasetCatalog) -> None:
    np.random.seed(1)
    first = _breast(catalog, num_nodes=3)
    np.random.seed(2)
    second = _breast(catalog, num_nodes=3)

    np.testing.assert_array_equal(first["site-2"].test.x, second["site-2"].test.x)


# --- validation carve -----------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["heart-disease", "breast-cancer"])
def test_validation_is_carved_from_the_training_split(catalog: DatasetCatalog, dataset: str) -> None:
    original = catalog.get(dataset).load_sites(DatasetConfig(name=dataset))
    carved = catalog.get(dataset).load_sites(DatasetConfig(name=dataset, validation_fraction=0.2))

    sizes = {site: len(carved[site].train) + len(carved[site].test) for site in original}

    assert sizes == {site: len(data.train) for site, data in original.items()}


@pytest.mark.parametrize("dataset", ["heart-disease", "breast-cancer"])
def test_validation_carve_uses_exactly_the_training_rows(catalog: DatasetCatalog, dataset: str) -> None:
    original = catalog.get(dataset).load_sites(DatasetConfig(name=dataset))
    carved = catalog.get(dataset).load_sites(DatasetConfig(name=dataset, validation_fraction=0.2))

    for site in original:
        assert _rows(_all_rows(carved[site])) == _rows(original[site].train.x), site


def test_validation_split_holds_no_test_patient(catalog: DatasetCatalog) -> None:
    original = _breast(catalog, num_nodes=4)
    carved = _breast(catalog, num_nodes=4, validation_fraction=0.2)

    test_rows = {row.tobytes() for s in original.values() for row in s.test.x}
    validation_rows = {row.tobytes() for s in carved.values() for row in s.test.x}

    assert validation_rows.isdisjoint(test_rows)


def test_validation_split_is_about_the_requested_share(catalog: DatasetCatalog) -> None:
    carved = _breast(catalog, num_nodes=4, validation_fraction=0.2)

    shares = [len(s.test) / (len(s.train) + len(s.test)) for s in carved.values()]

    np.testing.assert_allclose(shares, 0.2, atol=0.03)


# --- normalization --------------------------------------------------------------------


def test_combined_site_statistics_give_the_mean_of_the_pooled_data(heart: dict[str, SiteData]) -> None:
    pooled = np.concatenate([d.train.x for d in heart.values()]).astype(np.float64)

    combined = combine_feature_stats([feature_stats(d.train.x) for d in heart.values()])

    np.testing.assert_allclose(combined.mean, pooled.mean(axis=0), rtol=1e-10, atol=1e-12)


def test_combined_site_statistics_give_the_std_of_the_pooled_data(heart: dict[str, SiteData]) -> None:
    pooled = np.concatenate([d.train.x for d in heart.values()]).astype(np.float64)

    combined = combine_feature_stats([feature_stats(d.train.x) for d in heart.values()])

    np.testing.assert_allclose(combined.scale, pooled.std(axis=0), rtol=1e-9)


def test_combined_statistics_of_random_sites_match_the_pooled_data() -> None:
    rng = np.random.default_rng(7)
    sites = [rng.normal(loc=50, scale=[1, 10, 100], size=(n, 3)).astype(np.float32) for n in (3, 40, 257)]
    pooled = np.concatenate(sites).astype(np.float64)

    combined = combine_feature_stats([feature_stats(x) for x in sites])

    np.testing.assert_allclose(combined.scale, pooled.std(axis=0), rtol=1e-9)


def test_combined_statistics_equal_fitting_the_pooled_data(heart: dict[str, SiteData]) -> None:
    pooled = np.concatenate([d.train.x for d in heart.values()])

    combined = combine_feature_stats([feature_stats(d.train.x) for d in heart.values()])

    np.testing.assert_allclose(combined.mean, Standardization.fit(pooled).mean, rtol=1e-12)


def test_constant_feature_keeps_scale_one() -> None:
    x = np.column_stack([np.full(10, 4.0), np.arange(10.0)]).astype(np.float32)

    assert Standardization.fit(x).scale[0] == 1.0


def test_combining_no_site_statistics_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        combine_feature_stats([])


def test_standardization_does_not_change_its_input(heart: dict[str, SiteData]) -> None:
    split = heart["cleveland"].train
    before_x, before_y = split.x.copy(), split.y.copy()

    Standardization.fit(split.x).apply(split)

    np.testing.assert_array_equal(split.x, before_x)
    np.testing.assert_array_equal(split.y, before_y)


def test_standardization_returns_a_new_array(heart: dict[str, SiteData]) -> None:
    split = heart["cleveland"].train

    out = Standardization.fit(split.x).apply(split)

    assert not np.shares_memory(out.x, split.x)


def test_standardized_training_features_have_zero_mean(heart: dict[str, SiteData]) -> None:
    split = heart["hungary"].train

    out = Standardization.fit(split.x).apply(split)

    np.testing.assert_allclose(out.x.mean(axis=0), 0, atol=1e-5)


def test_standardized_training_features_have_unit_std(heart: dict[str, SiteData]) -> None:
    split = heart["hungary"].train

    out = Standardization.fit(split.x).apply(split)

    np.testing.assert_allclose(out.x.std(axis=0, dtype=np.float64), 1, rtol=1e-5)


def test_standardization_keeps_float32(heart: dict[str, SiteData]) -> None:
    split = heart["hungary"].train

    assert Standardization.fit(split.x).apply(split).x.dtype == np.float32


def test_standardization_round_trips_through_its_config() -> None:
    x = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
    fitted = Standardization.fit(x)

    again = Standardization.from_config(fitted.to_config(), num_features=4)

    np.testing.assert_array_equal(again.scale, fitted.scale)


def test_standardization_config_of_the_wrong_width_is_refused() -> None:
    fitted = Standardization.fit(np.ones((5, 3), dtype=np.float32))

    with pytest.raises(ProtocolError):
        Standardization.from_config(fitted.to_config(), num_features=4)


def test_standardize_site_changes_neither_split_of_its_input() -> None:
    rng = np.random.default_rng(4)
    site = SiteData(
        site="a",
        spec=DataSpec(num_features=2, num_classes=2),
        train=Split(rng.normal(size=(10, 2)).astype(np.float32), np.zeros(10, dtype=np.int64)),
        test=Split(rng.normal(size=(5, 2)).astype(np.float32), np.zeros(5, dtype=np.int64)),
    )
    before = site.test.x.copy()

    Standardization.fit(site.train.x).apply_site(site)

    np.testing.assert_array_equal(site.test.x, before)
