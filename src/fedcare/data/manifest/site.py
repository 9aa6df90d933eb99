"""Loading a site through its manifest: read, attach labels and patients, harmonize, resize, split."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from fedcare.data.catalog import BundledDataset, DatasetCatalog, DatasetInfo, _carve_validation
from fedcare.data.manifest.harmonize import LabelHarmonization, _listing, build_images, harmonize_labels, patient_split
from fedcare.data.manifest.model import DatasetManifest, NpzArrays
from fedcare.data.readers import (
    CsvReader,
    DicomReader,
    ImageFolderReader,
    ImageRecord,
    NiftiReader,
    NpzReader,
    Reader,
    ReadReport,
)
from fedcare.errors import ConfigError, DataError
from fedcare.plan import DatasetConfig
from fedcare.tasks.base import DataSpec, SiteData, Split

__all__ = ["DataReport", "ManifestDataset", "load_manifest_site", "manifest_spec", "read_manifest_records"]

logger = logging.getLogger(__name__)


# -- reading ------------------------------------------------------------------------------------


def _reader(manifest: DatasetManifest, *, features: Sequence[str] | None) -> Reader:
    window = manifest.preprocess.window
    if manifest.format == "dicom":
        return DicomReader(window=window, volume=manifest.preprocess.volume)
    if manifest.format == "imagefolder":
        return ImageFolderReader(window=window, label_folders=manifest.label_source == "folder")
    if manifest.format == "nifti":
        return NiftiReader()
    if manifest.format == "npz":
        arrays = manifest.npz or NpzArrays()
        return NpzReader(images=arrays.images, labels=arrays.labels, patients=arrays.patients)
    if features is None:
        raise ConfigError("a csv dataset needs the plan's dataset.features (the feature columns)", field="plan.dataset.features")
    patient_column = manifest.patient.column if manifest.patient is not None else None
    return CsvReader(features=features, label_column=manifest.labels.column, patient_column=patient_column)


def _labels_file(manifest: DatasetManifest) -> dict[str, tuple[str, str | None]]:
    """The labels file: key -> (label, patient or None)."""
    assert manifest.labels.file is not None  # checked by the model
    key_column = manifest.labels.key
    label_column = manifest.labels.column or "label"
    patient_column = manifest.patient.column if manifest.patient is not None else None
    try:
        with manifest.labels.file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in (key_column, label_column, patient_column) if c is not None and c not in header]
            if missing:
                raise DataError(f"the labels file has no column {', '.join(missing)}", field="labels.file")
            table: dict[str, tuple[str, str | None]] = {}
            for row in reader:
                key = (row.get(key_column) or "").strip()
                if key_column == "file":
                    key = PurePosixPath(key.replace("\\", "/")).as_posix().removeprefix("./")
                label = (row.get(label_column) or "").strip()
                patient = (row.get(patient_column) or "").strip() if patient_column else ""
                if key and label:
                    table[key] = (label, patient or None)
            return table
    except FileNotFoundError:
        raise DataError("the labels file does not exist", field="labels.file") from None
    except (OSError, UnicodeDecodeError):
        raise DataError("the labels file cannot be read as UTF-8 CSV", field="labels.file") from None


def _patient_from_name(pattern: re.Pattern[str], key: str) -> str | None:
    match = pattern.search(PurePosixPath(key).name)
    if match is None:
        return None
    if "patient" in match.groupdict():
        return match.group("patient")
    return match.group(1) if match.groups() else match.group(0)


def read_manifest_records(
    manifest: DatasetManifest, *, features: Sequence[str] | None = None
) -> tuple[list[ImageRecord], ReadReport]:
    """Every record of a resolved manifest, with its local label and patient attached.

    Parameters
    ----------
    manifest : DatasetManifest
        Already :meth:`~DatasetManifest.resolved`.
    features : sequence of str, optional
        For csv: the feature columns (the plan's ``dataset.features``).

    Raises
    ------
    DataError
        If the path or the labels file is missing or unreadable (naming the
        manifest field, not the path).
    """
    if not manifest.path.exists():
        raise DataError("the dataset path does not exist (paths are relative to node.yaml)", field="path")
    records, report = _reader(manifest, features=features).read(manifest.path)
    if manifest.label_source == "file":
        table = _labels_file(manifest)
        attached = []
        for record in records:
            lookup = {"file": record.key, "series": record.series, "patient": record.patient}[manifest.labels.key]
            label, patient = table.get(lookup, (None, None)) if lookup is not None else (None, None)
            attached.append(replace(record, local_label=label, patient=patient or record.patient))
        records = attached
    if manifest.patient is not None and manifest.patient.pattern is not None:
        pattern = re.compile(manifest.patient.pattern)
        records = [replace(r, patient=_patient_from_name(pattern, r.key) or r.patient) for r in records]
    return records, report


# -- the site -----------------------------------------------------------------------------------


def manifest_spec(config: DatasetConfig, manifest: DatasetManifest) -> DataSpec:
    """The schema of a manifest-described dataset: the plan's, with feature bounds.

    Equal to ``DatasetCatalog.bundled().spec(config)`` for a dataset the
    catalog does not hold, with ``feature_bounds`` ``(0, 1)`` per channel
    for images (intensities are scaled to [0, 1]) and the manifest's
    ``bounds`` for a csv table when it gives one for every feature. For csv
    a missing ``input_shape`` is taken from ``features``.

    Raises
    ------
    ConfigError
        If the plan lacks ``labels`` or ``input_shape`` (or ``features`` for csv).

    Examples
    --------
    >>> from pathlib import Path
    >>> config = DatasetConfig(name="chest-xray", labels=("normal", "pneumonia"), input_shape=(1, 32, 32))
    >>> spec = manifest_spec(config, DatasetManifest(format="imagefolder", path=Path("x")))
    >>> spec.num_features, spec.feature_bounds
    (1024, ((0.0, 1.0),))
    """
    if config.labels is None:
        raise ConfigError(
            "a dataset described by site manifests needs the federation's label vocabulary",
            field="plan.dataset.labels",
        )
    if manifest.format == "csv":
        if config.features is None:
            raise ConfigError("a csv dataset needs the feature columns", field="plan.dataset.features")
        features = config.features
        if config.input_shape is None:
            config = config.model_copy(update={"input_shape": (len(features),)})
        spec = DatasetCatalog([]).spec(config)
        bounds = manifest.bounds or {}
        feature_bounds = tuple(bounds[f] for f in features) if all(f in bounds for f in features) else ()
        return replace(spec, feature_bounds=tuple((float(lo), float(hi)) for lo, hi in feature_bounds))
    if config.input_shape is not None and len(config.input_shape) not in (3, 4):
        raise ConfigError(
            f"images need [channels, height, width] or [channels, depth, height, width], got {list(config.input_shape)}",
            field="plan.dataset.input_shape",
        )
    spec = DatasetCatalog([]).spec(config)
    return replace(spec, feature_bounds=((0.0, 1.0),) * spec.channels)


@dataclass
class DataReport:
    """What loading one site's manifest found: read counts, label counts, drops, patients, split sizes.

    Holds counts and label names only. ``skipped`` in ``read`` also counts
    records left out after reading ("unmapped label", "dropped by
    label_map", "no label", ...).
    """

    read: ReadReport
    vocabulary: tuple[str, ...]
    train_counts: dict[str, int] = field(default_factory=dict)
    test_counts: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    outside_vocabulary: dict[str, int] = field(default_factory=dict)
    patients: int = 0
    train_size: int = 0
    test_size: int = 0

    def log_counts(self) -> dict[str, int]:
        """Flat counts for a log record's ``extra`` (no label names, no identifiers).

        Examples
        --------
        >>> DataReport(read=ReadReport(files_seen=3), vocabulary=("a", "b")).log_counts()["files_seen"]
        3
        """
        return {
            "files_seen": self.read.files_seen,
            "records_read": self.read.records_read,
            "records_skipped": sum(self.read.skipped.values()),
            "patients": self.patients,
            "train_examples": self.train_size,
            "test_examples": self.test_size,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "read": self.read.to_dict(),
            "labels": {
                name: {"train": self.train_counts.get(name, 0), "test": self.test_counts.get(name, 0)}
                for name in self.vocabulary
            },
            "unmapped": dict(self.unmapped),
            "dropped": dict(self.dropped),
            "outside_vocabulary": dict(self.outside_vocabulary),
            "patients": self.patients,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


@dataclass
class _Analysis:
    """Every stage of loading a site, without raising for label problems (for ``data check``)."""

    records: list[ImageRecord]
    report: DataReport
    harmonization: LabelHarmonization
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    train_index: np.ndarray | None = None
    test_index: np.ndarray | None = None
    split_error: str | None = None


def _analyse(
    manifest: DatasetManifest,
    *,
    vocabulary: Sequence[str] | None,
    features: Sequence[str] | None,
    input_shape: Sequence[int] | None,
) -> _Analysis:
    records, read = read_manifest_records(manifest, features=features)
    if vocabulary is None:  # no plan: the label_map's targets, or the local labels themselves
        if manifest.label_map is not None:
            vocabulary = sorted({t for t in manifest.label_map.values() if t is not None})
        else:
            vocabulary = sorted({r.local_label for r in records if r.local_label is not None})
    report = DataReport(read=read, vocabulary=tuple(vocabulary))
    harmonization = harmonize_labels(
        [r.local_label for r in records], label_map=manifest.label_map, vocabulary=vocabulary
    )
    report.unmapped, report.dropped = harmonization.unmapped, harmonization.dropped
    report.outside_vocabulary = harmonization.outside_vocabulary
    for reason, count in (
        ("unmapped label", sum(harmonization.unmapped.values()) if manifest.unmapped_labels == "skip" else 0),
        ("dropped by label_map", sum(harmonization.dropped.values())),
        ("no label", harmonization.unlabelled),
    ):
        if count:
            read.skip(reason, count)
    analysis = _Analysis(records=records, report=report, harmonization=harmonization)
    kept = [r for r, keep in zip(records, harmonization.kept, strict=True) if keep]
    y = harmonization.y[harmonization.kept]
    if manifest.format == "csv":
        x = np.stack([r.array for r in kept]) if kept else np.zeros((0, len(features or ())), np.float32)
    elif input_shape is not None:
        x, mask, skipped = build_images(kept, input_shape=input_shape, preprocess=manifest.preprocess)
        for reason, count in skipped.items():
            read.skip(reason, count)
        kept = [r for r, keep in zip(kept, mask, strict=True) if keep]
        y = y[mask]
    else:
        x = None
    groups = [r.patient if r.patient is not None else f"\x00record:{r.key}" for r in kept]
    report.patients = len(set(groups))
    analysis.x, analysis.y = x, y
    if kept:
        try:
            train, test = patient_split(
                y, groups, test_fraction=manifest.split.test_fraction, seed=manifest.split.seed
            )
        except DataError as exc:
            analysis.split_error = exc.message
        else:
            analysis.train_index, analysis.test_index = train, test
            report.train_size, report.test_size = len(train), len(test)
            for side, index in ((report.train_counts, train), (report.test_counts, test)):
                counts = np.bincount(y[index], minlength=len(vocabulary))
                side.update({label: int(counts[i]) for i, label in enumerate(vocabulary)})
            if len(train) == 0 or len(test) == 0:
                analysis.split_error = "one side of the train/test split is empty"
    return analysis


def load_manifest_site(
    manifest: DatasetManifest, config: DatasetConfig, *, site: str
) -> tuple[SiteData, DataReport]:
    """Read a site's dataset through its manifest, harmonize its labels and split it by patient.

    Parameters
    ----------
    manifest : DatasetManifest
        The site's manifest, already :meth:`~DatasetManifest.resolved`.
    config : DatasetConfig
        The plan's dataset section: ``labels`` (the federation's vocabulary),
        ``input_shape`` and, for csv, ``features``.
    site : str
        The site's name (goes into :class:`SiteData`).

    Returns
    -------
    (SiteData, DataReport)
        ``x`` float32 ``(n, *input_shape)`` in [0, 1] for images (``(n,
        num_features)`` for csv), ``y`` int64 indices of ``config.labels``;
        ``spec`` as :func:`manifest_spec`.

    Raises
    ------
    ConfigError
        If the plan lacks ``labels`` or ``input_shape`` (``features`` for csv).
    DataError
        If the path is missing, no record is readable, local labels are
        unmapped under ``unmapped_labels: refuse`` (listed with counts),
        ``label_map`` names labels outside the vocabulary, or a side of the
        split is empty. Messages hold counts and label names, never paths.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "t.csv").write_text("age,dx,pid\\n" + "".join(f"{40 + i},{'yes' if i % 2 else 'no'},p{i}\\n" for i in range(10)))
    ...     manifest = DatasetManifest.model_validate({"format": "csv", "path": "t.csv",
    ...         "labels": {"column": "dx"}, "patient": {"column": "pid"},
    ...         "label_map": {"no": "healthy", "yes": "disease"}}).resolved(Path(tmp))
    ...     config = DatasetConfig(name="clinic", labels=("healthy", "disease"), features=("age",))
    ...     data, report = load_manifest_site(manifest, config, site="a")
    >>> len(data.train), len(data.test), data.spec.num_features, report.patients
    (8, 2, 1, 10)
    """
    spec = manifest_spec(config, manifest)
    analysis = _analyse(manifest, vocabulary=spec.class_names, features=config.features, input_shape=spec.shape)
    report, harmonization = analysis.report, analysis.harmonization
    if harmonization.outside_vocabulary:
        raise DataError(
            f"label_map maps onto labels the federation does not use: {_listing(harmonization.outside_vocabulary)}; "
            f"the plan's labels are {', '.join(spec.class_names)}",
            node_id=site,
            field="label_map",
        )
    if harmonization.unmapped and manifest.unmapped_labels == "refuse":
        raise DataError(
            f"{len(harmonization.unmapped)} local label(s) have no mapping: {_listing(harmonization.unmapped)} "
            "(records); add them to label_map (map a label to null to drop its records on purpose) "
            "or set unmapped_labels: skip",
            node_id=site,
            field="label_map",
        )
    if analysis.x is None or analysis.y is None or len(analysis.y) == 0:
        raise DataError(
            f"no readable records: {report.read.files_seen} file(s) seen, "
            f"skipped {dict(report.read.skipped) or 'none'}",
            node_id=site,
            field="path",
        )
    if analysis.split_error is not None or analysis.train_index is None or analysis.test_index is None:
        raise DataError(analysis.split_error or "the split failed", node_id=site, field="split")
    x, y = analysis.x, analysis.y
    data = SiteData(
        site=site,
        spec=spec,
        train=Split(x[analysis.train_index], y[analysis.train_index]),
        test=Split(x[analysis.test_index], y[analysis.test_index]),
    )
    logger.info("loaded site dataset", extra={"node_id": site, **report.log_counts()})
    return data, report


class ManifestDataset(BundledDataset):
    """A dataset whose sites each describe their own files in a manifest (for simulations).

    Parameters
    ----------
    name : str
        The dataset's name in plans.
    manifests : Mapping[str, DatasetManifest]
        Site name -> its resolved manifest.

    Examples
    --------
    >>> from pathlib import Path
    >>> dataset = ManifestDataset("chest-xray", {"a": DatasetManifest(format="imagefolder", path=Path("/a"))})
    >>> dataset.info.name, dataset.site_names(DatasetConfig(name="chest-xray"))
    ('chest-xray', ('a',))
    """

    def __init__(self, name: str, manifests: Mapping[str, DatasetManifest]) -> None:
        if not manifests:
            raise ConfigError("a manifest dataset needs at least one site", field="datasets")
        self.manifests = dict(manifests)
        formats = sorted({m.format for m in self.manifests.values()})
        self.info = DatasetInfo(
            name=name,
            description=f"site-held {', '.join(formats)} data described by node.yaml manifests",
            sites=", ".join(self.manifests),
            patients=0,  # unknown until the sites are read
            licence="held by each site",
            source="site manifests (node.yaml datasets)",
        )

    def spec(self, config: DatasetConfig) -> DataSpec:
        return manifest_spec(config, next(iter(self.manifests.values())))

    def site_names(self, config: DatasetConfig) -> tuple[str, ...]:
        return tuple(self.manifests)

    def load_site(self, config: DatasetConfig, site: str) -> SiteData:
        """One site's data, reading only that site's files (a site that cannot serve the plan fails alone).

        Raises
        ------
        ConfigError
            If ``site`` has no manifest.
        DataError
            If the site's files cannot serve the plan (unmapped labels, no readable records, ...).
        """
        if site not in self.manifests:
            raise ConfigError(
                f"dataset {self.info.name!r} has no site {site!r}; sites: {', '.join(self.manifests)}", field="site"
            )
        data = load_manifest_site(self.manifests[site], config, site=site)[0]
        if config.validation_fraction > 0:
            data = _carve_validation(data, config.validation_fraction)
        return data

    def _load_all(self, config: DatasetConfig) -> dict[str, SiteData]:
        sites = {site: load_manifest_site(m, config, site=site)[0] for site, m in self.manifests.items()}
        specs = {data.spec for data in sites.values()}
        if len(specs) > 1:
            raise ConfigError("the sites' manifests give different schemas (csv bounds differ)", field="datasets")
        return sites
