"""Real medical datasets shipped with fedcare, and the catalog that names them.

Provenance, licences and checksums are in ``data/bundled/README.md``. Nothing
is downloaded at run time.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fedcare.errors import ConfigError, DataError
from fedcare.plan import DatasetConfig
from fedcare.tasks.base import DataSpec, SiteData, Split

from fedcare.data.splits import dirichlet_partition, iid_partition, stratified_split

__all__ = ["BreastCancer", "BundledDataset", "DatasetCatalog", "DatasetInfo", "HeartDisease", "TcgaBrca"]


@dataclass(frozen=True)
class DatasetInfo:
    """What ``fedcare datasets`` shows about a bundled dataset."""

    name: str
    description: str
    sites: str
    patients: int
    licence: str
    source: str


class BundledDataset(abc.ABC):
    """A dataset that ships with fedcare, divided into sites."""

    info: DatasetInfo

    @abc.abstractmethod
    def spec(self, config: DatasetConfig) -> DataSpec:
        """The schema, known without loading a site."""

    @abc.abstractmethod
    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        """The sites the dataset is divided into under ``config``."""

    @abc.abstractmethod
    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        """Every site's train and test splits (before any validation carve)."""

    def load_sites(self, config: DatasetConfig) -> dict[str, SiteData]:
        """Every site's data; with ``validation_fraction`` the test split is a validation split.

        With ``config.validation_fraction > 0`` each site's training split is
        divided (stratified, fixed seed) into a smaller training split and a
        validation split that takes the place of the test split, so that
        hyperparameters are chosen without touching the test data.
        """
        sites = self._load_all(config)
        if config.validation_fraction > 0:
            sites = {name: _carve_validation(data, config.validation_fraction) for name, data in sites.items()}
        return sites

    def load_site(self, config: DatasetConfig, site: str) -> SiteData:
        """One site's data.

        Raises
        ------
        ConfigError
            If ``site`` is not one of :meth:`site_names`.
        """
        sites = self.load_sites(config)
        if site not in sites:
            raise ConfigError(
                f"dataset {self.info.name!r} has no site {site!r}; sites: {', '.join(sites)}",
                field="site",
            )
        return sites[site]


def _carve_validation(data: SiteData, fraction: float) -> SiteData:
    rng = np.random.default_rng(20231)  # fixed: the same validation split for every training seed
    y = data.train.y
    if min(np.bincount(y, minlength=data.spec.num_classes)[np.unique(y)]) >= 2:
        train_index, val_index = stratified_split(y, test_fraction=fraction, rng=rng)
    else:
        order = rng.permutation(len(y))
        n_val = max(1, int(round(len(y) * fraction)))
        train_index, val_index = np.sort(order[n_val:]), np.sort(order[:n_val])
    train = data.train.take(train_index)
    validation = data.train.take(val_index)
    return SiteData(site=data.site, spec=data.spec, train=train, test=validation)


def _bundled_path(*parts: str) -> Path:
    return Path(str(resources.files("fedcare.data").joinpath("bundled", *parts)))


class HeartDisease(BundledDataset):
    """UCI Heart Disease from four hospitals, with FLamby's Fed-Heart-Disease preprocessing.

    Columns slope, ca and thal are dropped, then every row with a missing
    value (740 patients remain); the label is ``num > 0``; chest pain type and
    resting ECG are one-hot encoded with the first level dropped (13
    features). Each hospital is split with scikit-learn's ``train_test_split``
    (``train_size=0.66``, ``random_state=43``, shuffled, stratified when both
    classes have more than two patients): 199/104, 172/89, 30/16, 85/45. The
    split's row indices ship beside the data (``split.json``), so loading
    does not import scikit-learn.
    """

    info = DatasetInfo(
        name="heart-disease",
        description="UCI Heart Disease, binary: angiographic disease (num > 0); FLamby split",
        sites="cleveland, hungary, switzerland, va-long-beach (natural)",
        patients=740,
        licence="CC BY 4.0",
        source="UCI ML Repository, doi:10.24432/C52P4X (via owkin/FLamby)",
    )
    _FILES = {
        "cleveland": ("processed.cleveland.data", "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8"),
        "hungary": ("processed.hungarian.data", "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796"),
        "switzerland": ("processed.switzerland.data", "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314"),
        "va-long-beach": ("processed.va.data", "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f"),
    }
    #: The split of each site's rows (after the rows with missing values are dropped) that
    #: ``train_test_split(rows, y, train_size=0.66, random_state=43, shuffle=True, stratify=...)`` gives.
    _SPLIT = ("split.json", "c7ffcaf1686057afd018c5083a5aee496c5154d5bba2e4c2e5e5a24184810003")
    FEATURES = (
        "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
        "cp_atypical_angina", "cp_non_anginal", "cp_asymptomatic", "restecg_st_t", "restecg_lvh",
    )  # fmt: skip
    #: Public bounds of each feature, from heart-disease.names and clinical ranges (not from the
    #: records): age in years, resting blood pressure in mm Hg (0 is how a missing value is
    #: recorded), serum cholesterol in mg/dl (0 is how Switzerland records a missing value; familial
    #: hypercholesterolaemia reaches 700), maximum heart rate, ST depression in mm; the rest are 0/1.
    BOUNDS = (
        (20.0, 90.0), (0.0, 1.0), (0.0, 200.0), (0.0, 700.0), (0.0, 1.0), (60.0, 210.0), (0.0, 1.0), (-3.0, 7.0),
        (0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0),
    )  # fmt: skip

    def spec(self, config: DatasetConfig) -> DataSpec:
        return DataSpec(
            num_features=len(self.FEATURES),
            num_classes=2,
            feature_names=self.FEATURES,
            class_names=("no disease", "disease"),
            feature_bounds=self.BOUNDS,
        )

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        return tuple(self._FILES)

    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        spec = self.spec(config)
        split = self._split()
        sites = {}
        for site, (filename, sha256) in self._FILES.items():
            x, y = self._read_site(filename, sha256)
            train, test = split[site]
            if not np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y))):
                raise DataError(f"bundled {self._SPLIT[0]} does not partition {filename}'s {len(y)} rows; reinstall fedcare")
            sites[site] = SiteData(site=site, spec=spec, train=Split(x[train], y[train]), test=Split(x[test], y[test]))
        return sites

    @classmethod
    def _split(cls) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each site's train and test row indices, in the order ``train_test_split`` gives them.

        Computed once with scikit-learn (``split.json``, see the bundled README)
        and read here without importing it, which takes about a second that
        every node process would otherwise pay.
        """
        filename, sha256 = cls._SPLIT
        raw = _bundled_path("heart_disease", filename).read_bytes()
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise DataError(f"bundled file {filename} does not match its recorded SHA-256; reinstall fedcare")
        table = json.loads(raw)
        return {
            site: (np.asarray(table[site]["train"], dtype=np.int64), np.asarray(table[site]["test"], dtype=np.int64))
            for site in cls._FILES
        }

    @staticmethod
    def _read_site(filename: str, sha256: str) -> tuple[np.ndarray, np.ndarray]:
        raw = _bundled_path("heart_disease", filename).read_bytes()
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise DataError(f"bundled file {filename} does not match its recorded SHA-256; reinstall fedcare")
        rows = []
        for line in raw.decode("ascii").splitlines():
            values = line.strip().split(",")
            if len(values) != 14:
                continue
            kept = values[:10] + values[13:]  # drop slope, ca, thal (columns 11-13)
            if "?" in kept:
                continue
            rows.append([float(v) for v in kept])
        table = np.asarray(rows, dtype=np.float64)
        cp, restecg = table[:, 2], table[:, 6]
        base = table[:, [0, 1, 3, 4, 5, 7, 8, 9]]
        dummies = np.stack([cp == 2, cp == 3, cp == 4, restecg == 1, restecg == 2], axis=1)
        x = np.concatenate([base, dummies.astype(np.float64)], axis=1).astype(np.float32)
        y = (table[:, 10] > 0).astype(np.int64)
        return x, y


class TcgaBrca(BundledDataset):
    """TCGA-BRCA clinical data for survival analysis, with FLamby's Fed-TCGA-BRCA sites and split.

    1,088 breast-cancer patients from six regions (FLamby's centers 0-5:
    northeast, south, west, midwest, europe, canada), each with FLamby's own
    train/test split (``train_test_split.csv``): 248/63, 156/40, 164/42,
    129/33, 129/33, 40/11. Features are FLamby's 39 preprocessed clinical
    columns (age at diagnosis in years, the rest one-hot 0/1), as float32.
    The label ``y`` is the event indicator (1 = death, 0 = censored) and
    ``time`` the follow-up in days. The 8 rows of ``brca.csv`` that FLamby's
    split does not list are not used.

    Examples
    --------
    >>> from fedcare.plan import DatasetConfig
    >>> sites = TcgaBrca().load_sites(DatasetConfig(name="tcga-brca"))
    >>> [(len(d.train), len(d.test)) for d in sites.values()]
    [(248, 63), (156, 40), (164, 42), (129, 33), (129, 33), (40, 11)]
    """

    info = DatasetInfo(
        name="tcga-brca",
        description="TCGA-BRCA breast cancer survival (event: death, time in days); 39 features; FLamby split",
        sites="northeast, south, west, midwest, europe, canada (natural, by tissue source site)",
        patients=1088,
        licence="NCI GDC data-use terms (not CC); FLamby code MIT",
        source="The Cancer Genome Atlas via NCI GDC (Liu et al. 2018), as used by owkin/FLamby",
    )
    SITES = ("northeast", "south", "west", "midwest", "europe", "canada")  # FLamby center index 0..5
    _FILES = {
        "brca.csv": "07cb53423f7d579d33cfdbf2cba57b2aee75318b85866c68ce39a75b1f1ba020",
        "centers.csv": "d610df2dae0203ea229c9579747ed3eb8d28e137c5378f55acc6fe6b4632bb1d",
        "train_test_split.csv": "1249c6543a4060ff0fdaf8510fc37017755836db6c9fc5e6af96057c36510990",
    }
    _NUM_FEATURES = 39
    #: Public bounds: age at diagnosis in years, 18 (TCGA enrols adults) to 90 (the GDC records
    #: every older age as 90); the other 38 features are one-hot indicators in [0, 1].
    BOUNDS = ((18.0, 90.0),) + ((0.0, 1.0),) * 38

    def spec(self, config: DatasetConfig) -> DataSpec:
        header = next(csv.reader(self._read("brca.csv").decode("ascii").splitlines()))
        return DataSpec(
            num_features=self._NUM_FEATURES,
            num_classes=2,
            feature_names=tuple(header[1 : 1 + self._NUM_FEATURES]),
            class_names=("censored", "death"),
            feature_bounds=self.BOUNDS,
        )

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        return self.SITES

    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        spec = self.spec(config)
        reader = csv.reader(self._read("brca.csv").decode("ascii").splitlines())
        header = next(reader)
        if len(header) != self._NUM_FEATURES + 3 or header[0] != "pid" or header[-2:] != ["E", "T"]:
            raise DataError(f"brca.csv has {len(header)} columns, expected pid, 39 features, E, T")
        rows = {row[0]: row[1:] for row in reader}
        fold: dict[str, tuple[str, int]] = {}
        for pid, _, fold2 in list(csv.reader(self._read("train_test_split.csv").decode("ascii").splitlines()))[1:]:
            part, _, index = fold2.partition("_")
            fold[pid] = (part, int(index))
        members: dict[tuple[str, int], list[list[str]]] = {}
        for pid, values in rows.items():  # brca.csv order
            if pid in fold:
                members.setdefault(fold[pid], []).append(values)
        if sum(len(v) for v in members.values()) != len(fold):
            raise DataError("train_test_split.csv names patients that brca.csv does not hold; reinstall fedcare")
        sites = {}
        for center, site in enumerate(self.SITES):
            train, test = (self._split(members.get((part, center), [])) for part in ("train", "test"))
            sites[site] = SiteData(site=site, spec=spec, train=train, test=test)
        return sites

    def _split(self, rows: list[list[str]]) -> Split:
        table = np.asarray(rows, dtype=np.float64).reshape(len(rows), self._NUM_FEATURES + 2)
        return Split(
            x=table[:, : self._NUM_FEATURES].astype(np.float32),
            y=table[:, self._NUM_FEATURES].astype(np.int64),
            time=table[:, self._NUM_FEATURES + 1].copy(),
        )

    def _read(self, filename: str) -> bytes:
        raw = _bundled_path("tcga_brca", filename).read_bytes()
        if hashlib.sha256(raw).hexdigest() != self._FILES[filename]:
            raise DataError(f"bundled file {filename} does not match its recorded SHA-256; reinstall fedcare")
        return raw


class BreastCancer(BundledDataset):
    """Wisconsin Diagnostic Breast Cancer (scikit-learn's copy), split into ``num_nodes`` sites.

    Label 1 is malignant. Sites get an IID share or a Dirichlet label-skewed
    share (``partition``, ``dirichlet_alpha``); each site keeps 25% of its rows
    (stratified) as its test split. The partition is fixed by ``plan.seed``-
    independent seed 0, so training seeds do not move patients between sites.
    """

    info = DatasetInfo(
        name="breast-cancer",
        description="Wisconsin Diagnostic Breast Cancer, binary: malignant; 30 features",
        sites="num_nodes synthetic sites (IID or Dirichlet label skew)",
        patients=569,
        licence="CC BY 4.0",
        source="UCI ML Repository via scikit-learn's bundled copy",
    )
    _DEFAULT_NODES = 4

    def spec(self, config: DatasetConfig) -> DataSpec:
        with self._csv_path().open() as handle:
            header = handle.readline().strip().split(",")
        return DataSpec(
            num_features=int(header[1]), num_classes=2, class_names=("benign", "malignant")
        )

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        return tuple(f"site-{i}" for i in range(config.num_nodes or self._DEFAULT_NODES))

    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        x, y = self._read()
        names = self.site_names(config)
        rng = np.random.default_rng(0)
        if config.partition == "dirichlet":
            parts = dirichlet_partition(y, num_parts=len(names), alpha=config.dirichlet_alpha, rng=rng)
        else:
            parts = iid_partition(len(y), num_parts=len(names), rng=rng)
        spec = self.spec(config)
        sites = {}
        for name, rows in zip(names, parts, strict=True):
            xs, ys = x[rows], y[rows]
            if np.bincount(ys, minlength=2).min() >= 2:
                train, test = stratified_split(ys, test_fraction=0.25, rng=rng)
            else:
                order = rng.permutation(len(ys))
                cut = len(ys) // 4
                train, test = np.sort(order[cut:]), np.sort(order[:cut])
            sites[name] = SiteData(
                site=name, spec=spec, train=Split(xs[train], ys[train]), test=Split(xs[test], ys[test])
            )
        return sites

    @staticmethod
    def _csv_path() -> Path:
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the breast-cancer dataset needs scikit-learn installed")
        return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "breast_cancer.csv"

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        # Read the file scikit-learn ships, without importing scikit-learn (about 1 s).
        with self._csv_path().open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            n_rows, n_features = int(header[0]), int(header[1])
            table = np.asarray([row for row in reader], dtype=np.float64)
        if table.shape != (n_rows, n_features + 1):
            raise DataError(f"breast-cancer table has shape {table.shape}, expected {(n_rows, n_features + 1)}")
        x = table[:, :n_features].astype(np.float32)
        y = (table[:, n_features] == 0).astype(np.int64)  # scikit-learn: 0 = malignant
        return x, y


class DatasetCatalog:
    """Datasets a simulation can use, by name; an object passed in, not a global.

    Examples
    --------
    >>> catalog = DatasetCatalog.bundled()
    >>> catalog.names()
    ['breast', 'breast-cancer', 'heart-disease', 'pneumonia', 'retina', 'tcga-brca']
    >>> catalog.get("mnist")
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: plan.dataset.name: unknown dataset 'mnist'; available: breast, breast-cancer, heart-disease, pneumonia, retina, tcga-brca
    """

    def __init__(self, datasets: list[BundledDataset]) -> None:
        self._datasets = {d.info.name: d for d in datasets}

    @classmethod
    def bundled(cls) -> DatasetCatalog:
        """The datasets that ship with fedcare."""
        from fedcare.data.medmnist import BreastMNIST, PneumoniaMNIST, RetinaMNIST

        return cls([HeartDisease(), BreastCancer(), TcgaBrca(), PneumoniaMNIST(), BreastMNIST(), RetinaMNIST()])

    def names(self) -> list[str]:
        """Dataset names, sorted."""
        return sorted(self._datasets)

    def spec(self, config: DatasetConfig) -> DataSpec:
        """The schema of the plan's dataset: a bundled dataset's own, or the one the plan declares.

        A dataset the sites describe in their own manifests is not in the
        catalog; its schema comes from the plan's ``labels`` (the
        federation's vocabulary) and ``input_shape``.

        Raises
        ------
        ConfigError
            If the dataset is neither bundled nor declared by the plan, or the
            plan's ``labels`` contradict a bundled dataset's classes.

        Examples
        --------
        >>> from fedcare.plan import DatasetConfig
        >>> catalog = DatasetCatalog.bundled()
        >>> catalog.spec(DatasetConfig(name="chest-xray", labels=("normal", "pneumonia"), input_shape=(1, 64, 64))).num_features
        4096
        >>> catalog.spec(DatasetConfig(name="chest-xray"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedcare.errors.ConfigError: plan.dataset.name: unknown dataset 'chest-xray'; bundled: ...; a dataset the sites describe in their own node.yaml needs the plan's dataset.labels and dataset.input_shape
        """
        if config.name in self._datasets:
            spec = self._datasets[config.name].spec(config)
            if config.labels is not None and spec.class_names and tuple(config.labels) != spec.class_names:
                raise ConfigError(
                    f"dataset {config.name!r} has classes {', '.join(spec.class_names)}; the plan lists "
                    f"{', '.join(config.labels)}",
                    field="plan.dataset.labels",
                )
            return spec
        if config.labels is None or config.input_shape is None:
            raise ConfigError(
                f"unknown dataset {config.name!r}; bundled: {', '.join(self.names())}; a dataset the sites "
                "describe in their own node.yaml needs the plan's dataset.labels and dataset.input_shape",
                field="plan.dataset.name",
            )
        shape = tuple(config.input_shape)
        image = len(shape) > 1
        return DataSpec(
            num_features=int(np.prod(shape)),
            num_classes=len(config.labels),
            feature_names=tuple(config.features or ()),
            class_names=tuple(config.labels),
            # Sites map image intensities into [0, 1] (their manifests' preprocess.intensity).
            feature_bounds=((0.0, 1.0),) * shape[0] if image else (),
            input_shape=shape if image else (),
        )

    def __contains__(self, name: object) -> bool:
        return name in self._datasets

    def get(self, name: str) -> BundledDataset:
        """The dataset called ``name``.

        Raises
        ------
        ConfigError
            If there is none; the message lists the available ones.
        """
        try:
            return self._datasets[name]
        except KeyError:
            raise ConfigError(
                f"unknown dataset {name!r}; available: {', '.join(self.names())}",
                field="plan.dataset.name",
            ) from None
