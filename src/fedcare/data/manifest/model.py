"""The manifest model: one ``datasets:`` entry of a site's node.yaml that describes the site's own files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["DatasetManifest", "LabelSource", "NpzArrays", "PatientSource", "Preprocessing", "SplitSettings"]

Format = Literal["csv", "imagefolder", "dicom", "nifti", "npz"]
_DEFAULT_SOURCE: dict[str, str] = {"imagefolder": "folder", "csv": "column", "npz": "array"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _invalid(field_path: str, message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError("manifest", message, {**context, "loc": field_path})


class LabelSource(_Section):
    """Where each record's local label comes from.

    Attributes
    ----------
    source : {"folder", "column", "file", "array"}, optional
        ``folder``: the first folder level under ``path`` (imagefolder);
        ``column``: a column of the table (csv); ``file``: a CSV labels file
        (any format but npz); ``array``: the archive's labels array (npz).
        Default: folder for imagefolder, column for csv, array for npz; dicom
        and nifti must say ``file``.
    file : Path, optional
        ``source: file``: the labels file, relative to node.yaml.
    key : {"file", "series", "patient"}
        ``source: file``: what its rows are keyed by, in a column of that
        name: ``file`` (the path relative to ``path``, POSIX), ``series`` (the
        DICOM SeriesInstanceUID; dicom only) or ``patient`` (the patient id).
    column : str, optional
        The label column: of the table (csv, required) or of the labels file
        (default ``label``).
    """

    source: Literal["folder", "column", "file", "array"] | None = None
    file: Path | None = None
    key: Literal["file", "series", "patient"] = "file"
    column: str | None = Field(default=None, min_length=1)


class PatientSource(_Section):
    """How each record's patient is known, for the patient-level split.

    Attributes
    ----------
    column : str, optional
        A column of the table (csv) or of the labels file (``labels.source: file``).
    pattern : str, optional
        A regular expression searched in each file's name (not its folders);
        the patient is its ``patient`` group, else its first group, else the
        match. For imagefolder, nifti and dicom (for DICOM the PatientID tag
        is used when neither is set).

    Records whose patient is not known are each their own patient.
    """

    column: str | None = Field(default=None, min_length=1)
    pattern: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _pattern_compiles(self) -> PatientSource:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise _invalid("pattern", "is not a valid regular expression: {problem}", problem=str(exc)) from None
        if self.column is not None and self.pattern is not None:
            raise _invalid("pattern", "give either column or pattern, not both")
        return self


class SplitSettings(_Section):
    """The site's patient-level train/test split.

    Attributes
    ----------
    test_fraction : float
        Share of patients in the test split, in (0, 1). Stratified by label
        when every class has enough patients: then the test split is one of
        ``round(1 / test_fraction)`` folds of scikit-learn's
        ``StratifiedGroupKFold``; else ``GroupShuffleSplit``.
    seed : int
        Seed of the split.
    """

    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0


class Preprocessing(_Section):
    """How intensities are brought to [0, 1].

    Attributes
    ----------
    window : (center, width), optional
        DICOM VOI window in modality units (HU for CT), ``width >= 1``.
        Default: the file's own VOI LUT or window when it has one.
    intensity : {"minmax", "none", "fixed"}
        After windowing: ``minmax`` scales each record to [0, 1] by its own
        minimum and maximum (a constant record becomes 0); ``fixed`` maps
        ``range`` onto [0, 1]; ``none`` keeps values as they are. All three
        then clip to [0, 1].
    range : (low, high), optional
        For ``intensity: fixed``, in the units read (e.g. ``[0, 255]``).
    volume : bool
        dicom: stack each series into one 3D volume (and read multi-frame
        files as volumes); otherwise every frame is a 2D image.
    """

    window: tuple[float, float] | None = None
    intensity: Literal["minmax", "none", "fixed"] = "minmax"
    range: tuple[float, float] | None = None
    volume: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Preprocessing:
        if self.window is not None and self.window[1] < 1:
            raise _invalid("window", "the window width must be >= 1, got {width}", width=self.window[1])
        if self.intensity == "fixed" and self.range is None:
            raise _invalid("range", "intensity: fixed needs range: [low, high]")
        if self.intensity != "fixed" and self.range is not None:
            raise _invalid("range", "is only used with intensity: fixed, got intensity: {intensity}", intensity=self.intensity)
        if self.range is not None and not self.range[0] < self.range[1]:
            raise _invalid("range", "low must be below high, got {range}", range=list(self.range))
        return self


class NpzArrays(_Section):
    """The arrays of an ``.npz`` archive: images, labels and (optionally) patients."""

    images: str = Field(default="images", min_length=1)
    labels: str = Field(default="labels", min_length=1)
    patients: str | None = Field(default=None, min_length=1)


class DatasetManifest(_Section):
    """One entry of ``datasets:`` in a site's ``node.yaml``: how to read a site-held dataset.

    Attributes
    ----------
    format : {"csv", "imagefolder", "dicom", "nifti", "npz"}
        What the files are.
    path : Path
        The file or folder, relative to node.yaml (see :meth:`resolved`).
    labels : LabelSource
        Where local labels come from.
    patient : PatientSource, optional
        How records are grouped by patient.
    label_map : dict of str to (str or None), optional
        Local label -> federation label (one of the plan's ``dataset.labels``);
        ``null`` drops those records on purpose. Without it, local labels are
        used as federation labels.
    unmapped_labels : {"refuse", "skip"}
        What to do with records whose local label is not in ``label_map``:
        refuse to load (default) or skip them (counted).
    split : SplitSettings
        The patient-level train/test split.
    preprocess : Preprocessing
        Windowing and intensity scaling.
    npz : NpzArrays, optional
        format npz: which arrays.
    bounds : dict of str to (low, high), optional
        format csv: public bounds of each feature (from documentation or
        clinical ranges, never from the records); when every plan feature has
        one they become the spec's ``feature_bounds``.

    Examples
    --------
    >>> manifest = DatasetManifest.model_validate({
    ...     "format": "imagefolder", "path": "images",
    ...     "label_map": {"NORMAL": "normal", "PNEUMONIA": "pneumonia", "QA_phantom": None}})
    >>> manifest.label_source, manifest.resolved(Path("/site")).path.as_posix()
    ('folder', '/site/images')
    >>> DatasetManifest.model_validate({"format": "dicom", "path": "x", "labels": {"source": "folder"}})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for DatasetManifest
    ...
    """

    format: Format
    path: Path
    labels: LabelSource = LabelSource()
    patient: PatientSource | None = None
    label_map: dict[str, str | None] | None = None
    unmapped_labels: Literal["refuse", "skip"] = "refuse"
    split: SplitSettings = SplitSettings()
    preprocess: Preprocessing = Preprocessing()
    npz: NpzArrays | None = None
    bounds: dict[str, tuple[float, float]] | None = None

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_names_as_text(cls, value: Any) -> Any:
        """YAML reads ``0: malignant`` with an int key: take it as the text ``"0"``; refuse booleans."""
        if not isinstance(value, dict):
            return value
        names = {}
        for local, target in value.items():
            for name in (local, target):
                if isinstance(name, bool):
                    raise ValueError(
                        f"YAML read an unquoted yes/no/on/off/true/false as {name}; quote the label ('no': ...)"
                    )
                if isinstance(name, float):
                    raise ValueError(f"YAML read the label {name} as a number; quote it")
            names[str(local) if isinstance(local, int) else local] = str(target) if isinstance(target, int) else target
        return names

    @property
    def label_source(self) -> str:
        """``labels.source``, or the format's default."""
        return self.labels.source or _DEFAULT_SOURCE.get(self.format, "file")

    @model_validator(mode="after")
    def _consistent(self) -> DatasetManifest:  # noqa: C901 - one check per contradiction
        fmt = self.format
        if self.labels.source is None and fmt in ("dicom", "nifti"):
            raise _invalid("labels.source", "format {format} takes labels from a file: set labels.source: file and labels.file", format=fmt)
        source = self.label_source
        allowed = {"folder": ("imagefolder",), "column": ("csv",), "array": ("npz",)}
        if source in allowed and fmt not in allowed[source]:
            raise _invalid("labels.source", "source {source} needs format {needed}, got format {format}", source=source, needed=allowed[source][0], format=fmt)
        if source == "file" and fmt in ("csv", "npz"):
            raise _invalid("labels.source", "format {format} carries its own labels; use source {own}", format=fmt, own=_DEFAULT_SOURCE[fmt])
        if source == "file" and self.labels.file is None:
            raise _invalid("labels.file", "source: file needs labels.file (a CSV file, relative to node.yaml)")
        if source != "file" and self.labels.file is not None:
            raise _invalid("labels.file", "is only used with labels.source: file, got source {source}", source=source)
        if source != "file" and self.labels.key != "file":
            raise _invalid("labels.key", "is only used with labels.source: file, got source {source}", source=source)
        if self.labels.key == "series" and fmt != "dicom":
            raise _invalid("labels.key", "key series (SeriesInstanceUID) needs format dicom, got format {format}", format=fmt)
        if source == "column" and self.labels.column is None:
            raise _invalid("labels.column", "format csv needs the label column")
        if source in ("folder", "array") and self.labels.column is not None:
            raise _invalid("labels.column", "is not used with labels.source: {source}", source=source)
        if self.patient is not None:
            if self.patient.pattern is not None and fmt in ("csv", "npz"):
                raise _invalid("patient.pattern", "matches file names, which format {format} does not have; use patient.column", format=fmt)
            if self.patient.column is not None and fmt != "csv" and source != "file":
                raise _invalid("patient.column", "needs format csv or labels.source: file, got format {format}", format=fmt)
            if fmt == "npz":
                raise _invalid("patient", "format npz takes patients from an array: set npz.patients")
        if self.npz is not None and fmt != "npz":
            raise _invalid("npz", "is only used with format npz, got format {format}", format=fmt)
        if self.preprocess.window is not None and fmt not in ("dicom", "imagefolder"):
            raise _invalid("preprocess.window", "is a DICOM window; format {format} has no DICOM files", format=fmt)
        if self.preprocess.volume and fmt != "dicom":
            raise _invalid("preprocess.volume", "stacks DICOM series; needs format dicom, got format {format}", format=fmt)
        if self.bounds is not None:
            if fmt != "csv":
                raise _invalid("bounds", "gives feature bounds of a table; needs format csv, got format {format}", format=fmt)
            bad = sorted(name for name, (low, high) in self.bounds.items() if not low < high)
            if bad:
                raise _invalid("bounds", "low must be below high for {names}", names=", ".join(bad))
        if self.label_map is not None and any(not local for local in self.label_map):
            raise _invalid("label_map", "local labels must be non-empty")
        return self

    def resolved(self, base_dir: Path) -> DatasetManifest:
        """The manifest with ``path`` and ``labels.file`` made absolute against ``base_dir``.

        Parameters
        ----------
        base_dir : Path
            The folder holding ``node.yaml``.

        Examples
        --------
        >>> m = DatasetManifest.model_validate({"format": "nifti", "path": "scans",
        ...     "labels": {"source": "file", "file": "labels.csv", "key": "patient"}})
        >>> r = m.resolved(Path("/site"))
        >>> r.path.as_posix(), r.labels.file.as_posix()
        ('/site/scans', '/site/labels.csv')
        """
        base = Path(base_dir).resolve()
        labels = self.labels
        if labels.file is not None:
            labels = labels.model_copy(update={"file": base / labels.file})
        return self.model_copy(update={"path": base / self.path, "labels": labels})
