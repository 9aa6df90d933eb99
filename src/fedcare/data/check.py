"""``fedcare data check``: read a site's datasets as a node would, and say what is wrong, before a run.

Everything stays at the site: the check reads local files and prints counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from fedcare.data.manifest.model import DatasetManifest
from fedcare.data.manifest.harmonize import _listing
from fedcare.data.manifest.site import DataReport, _analyse, manifest_spec
from fedcare.errors import ConfigError, FedcareError
from fedcare.plan import Plan, _format_validation_error, read_yaml

__all__ = ["DatasetCheck", "check_site"]


@dataclass
class DatasetCheck:
    """What checking one ``datasets:`` entry of a node.yaml found.

    Attributes
    ----------
    name : str
        The dataset's name (the key under ``datasets:``).
    kind : {"manifest", "bundled"}
        A site manifest, or a binding to a bundled dataset (not read).
    errors : list of str
        Problems that would stop the node (each names the field at fault).
    warnings : list of str
        Problems worth a look: skipped files, rare or missing classes.
    format : str, optional
        The manifest's format.
    path : str, optional
        The configured path, as written in node.yaml (shown to the local
        operator only; never logged).
    site : str, optional
        For a bundled dataset: the site it is bound to.
    report : DataReport, optional
        Counts, when the files could be read.
    """

    name: str
    kind: Literal["manifest", "bundled"]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    format: str | None = None
    path: str | None = None
    site: str | None = None
    report: DataReport | None = None

    @property
    def ok(self) -> bool:
        """True when there is no error."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "ok": self.ok,
            "format": self.format,
            "path": self.path,
            "site": self.site,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "report": None if self.report is None else self.report.to_dict(),
        }


def _read_node_yaml(node_yaml: Path) -> Mapping[str, Any]:
    data = read_yaml(node_yaml, what="node config", field="node")
    if not isinstance(data, dict):
        raise ConfigError("node config must be a mapping", field="node")
    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError("must map dataset names to manifests or bindings", field="node.datasets")
    return datasets


def check_site(
    node_yaml: Path, *, dataset: str | None = None, plan: Plan | None = None, min_examples: int = 10
) -> list[DatasetCheck]:
    """Check the datasets a node.yaml declares: manifests valid, files readable, labels mapped, split possible.

    Parameters
    ----------
    node_yaml : Path
        The site's node.yaml (read with ``yaml.safe_load``; only its
        ``datasets`` mapping is used).
    dataset : str, optional
        Check only this dataset. With ``plan`` and no ``dataset``: the plan's.
    plan : Plan, optional
        The plan the site will be asked to run: then its ``dataset.labels``
        is the vocabulary (without it, the sorted ``label_map`` targets),
        ``dataset.input_shape`` the shape every record is resized to and
        ``dataset.features`` the columns of a csv table.
    min_examples : int
        A federation label with fewer examples than this at the site is a warning.

    Returns
    -------
    list of DatasetCheck
        One per dataset checked, in node.yaml order.

    Raises
    ------
    ConfigError
        If node.yaml cannot be read, has no ``datasets`` mapping, or lacks
        ``dataset`` (or the plan's dataset).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     node = Path(tmp) / "node.yaml"
    ...     _ = node.write_text("name: a\\ndatasets:\\n  heart-disease: {site: cleveland}\\n"
    ...                         "  scans: {format: nifti, path: missing, labels: {source: file, file: l.csv}}\\n")
    ...     [(c.name, c.kind, c.errors) for c in check_site(node)]
    [('heart-disease', 'bundled', []), ('scans', 'manifest', ['path: the dataset path does not exist (paths are relative to node.yaml)'])]
    """
    node_yaml = Path(node_yaml)
    entries = _read_node_yaml(node_yaml)
    if dataset is None and plan is not None:
        dataset = plan.dataset.name
    if dataset is not None and dataset not in entries:
        raise ConfigError(
            f"node.yaml has no dataset {dataset!r}; it lists {', '.join(map(str, entries))}", field="node.datasets"
        )
    names = [dataset] if dataset is not None else [str(name) for name in entries]
    return [
        _check_one(name, entries[name], base_dir=node_yaml.resolve().parent, plan=plan, min_examples=min_examples)
        for name in names
    ]


def _check_one(name: str, entry: Any, *, base_dir: Path, plan: Plan | None, min_examples: int) -> DatasetCheck:
    if isinstance(entry, dict) and set(entry) == {"site"}:
        return DatasetCheck(name=name, kind="bundled", site=str(entry["site"]))
    check = DatasetCheck(name=name, kind="manifest")
    if isinstance(entry, dict):
        check.format = str(entry.get("format")) if "format" in entry else None
        check.path = str(entry.get("path")) if "path" in entry else None
    try:
        manifest = DatasetManifest.model_validate(entry).resolved(base_dir)
    except ValidationError as exc:
        check.errors.append(str(_format_validation_error(exc, root=f"node.datasets.{name}")))
        return check
    config = plan.dataset if plan is not None else None
    vocabulary = None
    input_shape = None
    features = None
    try:
        if config is not None:
            spec = manifest_spec(config, manifest)
            vocabulary, input_shape, features = spec.class_names, spec.shape, config.features
        elif manifest.format == "csv":
            features = ()
            check.warnings.append("feature columns are checked only with --plan (the plan lists them)")
        analysis = _analyse(manifest, vocabulary=vocabulary, features=features, input_shape=input_shape)
    except FedcareError as exc:
        check.errors.append(str(exc))
        return check
    report = analysis.report
    check.report = report
    h = analysis.harmonization
    if report.read.records_read == 0:
        check.errors.append(f"path: no readable records ({report.read.files_seen} file(s) seen)")
    if h.outside_vocabulary:
        check.errors.append(
            f"label_map: maps onto labels the plan does not list: {_listing(h.outside_vocabulary)}; "
            f"the plan's labels are {', '.join(report.vocabulary)}"
        )
    if h.unmapped:
        message = f"local label(s) with no mapping: {_listing(h.unmapped)}"
        if manifest.unmapped_labels == "refuse":
            check.errors.append(
                f"label_map: {message}; add them to label_map (null drops them on purpose) or set unmapped_labels: skip"
            )
        else:
            check.warnings.append(f"{message}; skipped (unmapped_labels: skip)")
    if analysis.split_error is not None and report.read.records_read:
        check.errors.append(f"split: {analysis.split_error}")
    for reason, count in sorted(report.read.skipped.items()):
        if reason not in ("unmapped label",):
            check.warnings.append(f"{count} skipped: {reason}")
    if analysis.train_index is not None:
        for label in report.vocabulary:
            total = report.train_counts.get(label, 0) + report.test_counts.get(label, 0)
            if total == 0:
                check.warnings.append(f"class {label!r} is missing at this site")
            elif total < min_examples:
                check.warnings.append(f"class {label!r} has only {total} example(s) (fewer than {min_examples})")
    kept = [r for r, keep in zip(analysis.records, h.kept, strict=True) if keep]
    if kept and all(r.patient is None for r in kept):
        check.warnings.append("no patient information: each record is taken as its own patient in the split")
    return check
