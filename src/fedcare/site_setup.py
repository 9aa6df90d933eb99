"""``fedcare node init``: a working ``node.yaml`` from a site's data folder or table, for sites without ML staff.

:func:`init_site` looks at the data (a folder of images sorted into one
folder per label, or a CSV table), proposes how its local labels map onto
the federation's labels, sets a cautious policy, imports the site's
certificate files into ``certs/`` beside node.yaml, and writes a commented
node.yaml that :func:`~fedcare.deployment.load_node_config` and ``fedcare
data check`` accept. Local labels it cannot map are left out of
``label_map`` and listed in a ``TODO`` comment with their counts, so the
node refuses to run until the site decides on them.

Everything here reads local files and writes node.yaml; nothing leaves the
site. Results hold counts and label names (folder names or label values),
never file names or rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedcare.errors import ConfigError, DataError

__all__ = [
    "DetectedDataset",
    "LabelProposal",
    "SiteSetup",
    "detect_dataset",
    "import_certificates",
    "init_site",
    "propose_label_map",
]

_IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_MISSING = frozenset({"", "?", "na", "n/a", "nan", "null", "none", "-"})
#: Column names taken as the label column, in order of preference (compared case-insensitively).
_LABEL_COLUMNS = ("label", "target", "class", "diagnosis", "outcome", "finding", "dx", "y", "num", "status", "result")
#: Column names taken as the patient column (compared case- and punctuation-insensitively).
_PATIENT_COLUMNS = ("patientid", "patient", "subjectid", "subject", "mrn", "pid", "caseid")
#: A label column has at most this many distinct values.
_MAX_CLASSES = 20
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
#: Words YAML 1.1 reads as booleans or null: always quoted.
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null", "none"})
#: Groups of label names taken as the same class (after lower-casing and dropping punctuation).
_SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"normal", "negative", "neg", "no", "absent", "healthy", "none", "nofinding", "false", "control", "0"}),
    frozenset({"abnormal", "positive", "pos", "yes", "present", "disease", "diseased", "true", "1"}),
    frozenset({"benign", "noncancerous"}),
    frozenset({"malignant", "malignancy", "cancer", "cancerous", "tumor", "tumour", "carcinoma"}),
    frozenset({"pneumonia", "pneumonic"}),
)


@dataclass(frozen=True)
class DetectedDataset:
    """What :func:`detect_dataset` found in a site's data.

    Attributes
    ----------
    format : {"imagefolder", "csv"}
        The manifest format.
    kind : str
        What the files are, for the operator: ``png``, ``jpeg``, ``dicom``,
        ``nifti``, ... (the most common kind) or ``csv``.
    label_counts : dict of str to int
        Files (imagefolder) or rows (csv) per local label.
    label_column : str, optional
        csv: the proposed label column.
    patient_column : str, optional
        csv: the proposed patient column.
    feature_columns : tuple of str
        csv: the numeric columns proposed as features.
    other_columns : tuple of str
        csv: the columns left out (not numeric).
    unlabelled : int
        Files directly under the folder, or rows with no label.

    Examples
    --------
    >>> DetectedDataset(format="csv", kind="csv", label_counts={"sick": 2}).total
    2
    """

    format: Literal["imagefolder", "csv"]
    kind: str
    label_counts: dict[str, int]
    label_column: str | None = None
    patient_column: str | None = None
    feature_columns: tuple[str, ...] = ()
    other_columns: tuple[str, ...] = ()
    unlabelled: int = 0

    @property
    def total(self) -> int:
        """Files or rows with a local label."""
        return sum(self.label_counts.values())


@dataclass(frozen=True)
class LabelProposal:
    """The proposed ``label_map``: local label -> federation label, and the local labels left to the site.

    Attributes
    ----------
    label_map : dict of str to str
        The local labels matched to a federation label.
    how : dict of str to str
        How each was matched: ``exact``, ``case`` (same letters, other case
        or punctuation), ``synonym`` or ``as-is`` (no federation labels known).
    unmapped : dict of str to int
        Local labels with no match, with their counts.
    """

    label_map: dict[str, str]
    how: dict[str, str]
    unmapped: dict[str, int]


@dataclass(frozen=True)
class SiteSetup:
    """What :func:`init_site` wrote.

    Attributes
    ----------
    node_yaml : Path
        The node.yaml written.
    dataset : DetectedDataset
        What the data is.
    labels : LabelProposal
        The label map written, and the local labels left unmapped (a TODO in node.yaml).
    certs_dir : Path, optional
        Where the certificate files were imported (None: none given).
    notes : list of str
        What the site should know or still do, in plain words.
    """

    node_yaml: Path
    dataset: DetectedDataset
    labels: LabelProposal
    certs_dir: Path | None
    notes: list[str] = field(default_factory=list)


# -- detecting the data -------------------------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return _IMAGE_SUFFIXES[path.suffix.lower()]
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return "dicom"
    except OSError:
        return None
    return None


def _detect_folder(path: Path) -> DetectedDataset:
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    loose = 0
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        kind = _file_kind(file)
        if kind is None:
            continue
        kinds[kind] += 1
        if len(relative.parts) == 1:
            loose += 1
        else:
            counts[relative.parts[0]] += 1
    if not counts:
        what = f"{loose} image file(s) directly in it and none" if loose else "no image files"
        raise DataError(
            f"the data folder has {what} in label folders; sort the images into one folder per label "
            "(e.g. NORMAL/, PNEUMONIA/), or describe a labels file by hand (docs/data.md)",
            field="DATA",
        )
    return DetectedDataset(
        format="imagefolder", kind=kinds.most_common(1)[0][0], label_counts=dict(sorted(counts.items())), unlabelled=loose
    )


def _squash(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _detect_table(path: Path, *, label_column: str | None) -> DetectedDataset:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise DataError("the table is not UTF-8 text", field="DATA") from None
    except OSError as exc:
        raise DataError(f"cannot read the table ({exc.strerror})", field="DATA") from None
    if len(rows) < 2:
        raise DataError("the table has no data rows", field="DATA")
    header = [name.strip() for name in rows[0]]
    if all(_is_number(name) or name.strip().lower() in _MISSING for name in header):
        raise DataError(
            "the table's first row holds values, not column names; add a header line with the column names",
            field="DATA",
        )
    if len(set(header)) != len(header) or not all(header):
        raise DataError("the table's header has empty or repeated column names", field="DATA")
    columns: dict[str, list[str]] = {name: [] for name in header}
    for row in rows[1:]:
        for name, value in zip(header, row, strict=False):
            columns[name].append(value.strip())
    present = {name: [v for v in values if v.lower() not in _MISSING] for name, values in columns.items()}
    numeric = {name for name, values in present.items() if values and all(_is_number(v) for v in values)}
    patient = next((name for key in _PATIENT_COLUMNS for name in header if _squash(name) == key), None)
    if label_column is not None:
        if label_column not in header:
            raise ConfigError(f"the table has no column {label_column!r}; it has {', '.join(header)}", field="--label-column")
        label = label_column
    else:
        label = _propose_label_column(header, present, exclude={patient})
    counts = Counter(_label_text(v) for v in present[label])
    features = tuple(name for name in header if name in numeric and name not in (label, patient))
    others = tuple(name for name in header if name not in features and name not in (label, patient))
    return DetectedDataset(
        format="csv",
        kind="csv",
        label_counts=dict(sorted(counts.items())),
        label_column=label,
        patient_column=patient,
        feature_columns=features,
        other_columns=others,
        unlabelled=len(columns[label]) - len(present[label]),
    )


def _label_text(value: str) -> str:
    """``1.0`` and ``1`` are the same label ``1``, as the csv reader of a node sees them after mapping."""
    if _is_number(value) and float(value).is_integer() and "." in value:
        return str(int(float(value)))
    return value


def _propose_label_column(header: Sequence[str], present: Mapping[str, list[str]], *, exclude: set[str | None]) -> str:
    def few_values(name: str) -> bool:
        """2 to 20 distinct values, each a word or a whole number (a measurement with few values is not a label)."""
        values = set(present[name])
        return 2 <= len(values) <= _MAX_CLASSES and all(not _is_number(v) or float(v).is_integer() for v in values)

    by_name = {name.casefold(): name for name in header if name not in exclude}
    for wanted in _LABEL_COLUMNS:
        name = by_name.get(wanted)
        if name is not None and few_values(name):
            return name
    candidates = [name for name in header if name not in exclude and few_values(name)]
    if not candidates:
        raise DataError(
            f"no column looks like a label (2 to {_MAX_CLASSES} distinct values); name it with --label-column",
            field="DATA",
        )
    words = [name for name in candidates if not all(_is_number(v) for v in present[name])]
    return (words or candidates)[-1]  # words before codes; tables usually end with the outcome


def detect_dataset(path: str | os.PathLike[str], *, label_column: str | None = None) -> DetectedDataset:
    """Say what a site's data is: a folder of images in label folders, or a CSV table.

    Parameters
    ----------
    path : path-like
        A folder with one sub-folder per local label (PNG, JPEG, BMP, TIFF,
        DICOM or NIfTI files inside), or a ``.csv`` file with a header row.
    label_column : str, optional
        csv: the label column; default: a column named like a label
        (``label``, ``target``, ``diagnosis``, ...) with 2 to 20 values, else
        the last column with 2 to 20 values.

    Returns
    -------
    DetectedDataset
        Files are counted, not read (``fedcare data check`` reads them).

    Raises
    ------
    DataError
        If the path is missing, a folder has no label folders with images,
        or a table has no header or no label-like column (the message names
        ``DATA``, never the path).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     table = Path(tmp) / "t.csv"
    ...     _ = table.write_text("patient_id,age,chol,diagnosis\\nP1,61,233,sick\\nP2,50,?,well\\nP3,40,180,well\\n")
    ...     found = detect_dataset(table)
    >>> found.format, found.label_column, found.patient_column, found.feature_columns, found.label_counts
    ('csv', 'diagnosis', 'patient_id', ('age', 'chol'), {'sick': 1, 'well': 2})
    """
    path = Path(path)
    if path.is_dir():
        return _detect_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(
                f"cannot tell what a {path.suffix or 'suffix-less'} file is; give a folder of images in label "
                "folders, or a .csv table",
                field="DATA",
            )
        return _detect_table(path, label_column=label_column)
    raise DataError("the data folder or table does not exist", field="DATA")


# -- labels -------------------------------------------------------------------------------------


def propose_label_map(local: Mapping[str, int], federation: Sequence[str] | None) -> LabelProposal:
    """Match each local label to a federation label: exactly, then ignoring case and punctuation, then by synonym.

    A synonym match needs exactly one federation label in the local label's
    group (``normal``/``negative``/``no``/``0``...,
    ``abnormal``/``positive``/``yes``/``1``..., ``malignant``/``cancer``...).
    Without federation labels, every local label maps to itself (``as-is``),
    for the site to check.

    Parameters
    ----------
    local : mapping of str to int
        Local labels and their counts.
    federation : sequence of str, optional
        The federation's labels (the plan's ``dataset.labels``).

    Returns
    -------
    LabelProposal

    Examples
    --------
    >>> p = propose_label_map({"NORMAL": 40, "Pneumonia (viral)": 9, "no": 3, "QA_phantom": 2},
    ...                       ["normal", "pneumonia"])
    >>> p.label_map, p.unmapped
    ({'NORMAL': 'normal', 'no': 'normal'}, {'Pneumonia (viral)': 9, 'QA_phantom': 2})
    >>> p.how
    {'NORMAL': 'case', 'no': 'synonym'}
    """
    if federation is None:
        return LabelProposal({name: name for name in local}, {name: "as-is" for name in local}, {})
    squashed = {_squash(name): name for name in federation}
    label_map: dict[str, str] = {}
    how: dict[str, str] = {}
    unmapped: dict[str, int] = {}
    for name, count in local.items():
        target, kind = None, ""
        if name in federation:
            target, kind = name, "exact"
        elif _squash(name) in squashed:
            target, kind = squashed[_squash(name)], "case"
        else:
            for group in _SYNONYMS:
                if _squash(name) in group:
                    matches = [label for label in federation if _squash(label) in group]
                    if len(matches) == 1:
                        target, kind = matches[0], "synonym"
                    break
        if target is None:
            unmapped[name] = count
        else:
            label_map[name], how[name] = target, kind
    return LabelProposal(label_map, how, unmapped)


# -- certificates -------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a fresh file created with ``mode`` from the start, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def import_certificates(
    *, cert: Path, key: Path, ca: Path, name: str, certs_dir: Path, force: bool = False
) -> list[str]:
    """Check a site's certificate files and copy them to ``certs_dir`` as ``ca.pem``, ``NAME.pem``, ``NAME.key`` (0600).

    The certificate must be signed by the CA, be a node (client)
    certificate, name ``name`` as its common name, match the key and be
    valid now.

    Parameters
    ----------
    cert, key, ca : Path
        The files the federation's operator sent (``fedcare certs issue --role node``).
    name : str
        The node's name.
    certs_dir : Path
        Where the node will read them (``certs/`` beside node.yaml).
    force : bool
        Replace different files already in ``certs_dir``.

    Returns
    -------
    list of str
        Notes for the operator (e.g. when the certificate expires soon).

    Raises
    ------
    ConfigError
        Naming the option (``--cert``, ``--key``, ``--ca``) and what to ask the operator for.

    Examples
    --------
    >>> import tempfile
    >>> from fedcare.transport import pki
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = pki.init_ca(tmp / "ca", federation="demo")
    >>> cert, key = pki.issue_certificate(tmp / "ca", role="node", name="site-a")
    >>> import_certificates(cert=cert, key=key, ca=tmp / "ca" / "ca.pem", name="site-b", certs_dir=tmp / "certs")
    Traceback (most recent call last):
    ...
    fedcare.errors.ConfigError: --cert: the certificate names 'site-a', not 'site-b'; use --name site-a, or ask the federation's operator for a certificate named site-b
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from fedcare.transport import pki

    def load(path: Path, option: str) -> bytes:
        try:
            return pki.read_pem(path)
        except ConfigError as exc:
            raise ConfigError(exc.message, field=option) from None

    cert_pem, key_pem, ca_pem = load(cert, "--cert"), load(key, "--key"), load(ca, "--ca")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError("holds no valid PEM certificate", field="--cert") from None
    try:
        authority = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise ConfigError("holds no valid PEM certificate", field="--ca") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError("holds no unencrypted PEM private key", field="--key") from None
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            "the certificate is not signed by this CA; ask the federation's operator for the CA that issued it",
            field="--cert",
        ) from None
    claimed = pki.common_name(certificate)
    if claimed != name:
        raise ConfigError(
            f"the certificate names {claimed!r}, not {name!r}; use --name {claimed}, or ask the federation's "
            f"operator for a certificate named {name}",
            field="--cert",
        )
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ConfigError(
            "this is not a node certificate (it is not for client authentication); ask for one issued with "
            "fedcare certs issue --role node",
            field="--cert",
        )
    if private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError("the key does not belong to the certificate; use the key issued with it", field="--key")
    now = dt.datetime.now(dt.timezone.utc)
    if now > certificate.not_valid_after_utc:
        raise ConfigError(
            f"the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}; ask the federation's operator "
            "for a fresh one",
            field="--cert",
        )
    if now < certificate.not_valid_before_utc:
        raise ConfigError(
            f"the certificate is valid only from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this "
            "machine's clock",
            field="--cert",
        )
    targets = {certs_dir / pki.CA_CERT_FILE: (ca_pem, 0o644), certs_dir / f"{name}.pem": (cert_pem, 0o644),
               certs_dir / f"{name}.key": (key_pem, 0o600)}  # fmt: skip
    for target, (data, _) in targets.items():
        if target.exists() and not force and target.read_bytes() != data:
            raise ConfigError(f"certs/{target.name} already exists with other contents; use --force to replace it", field="--force")
    certs_dir.mkdir(parents=True, exist_ok=True)
    for target, (data, mode) in targets.items():
        _write_private(target, data, mode=mode)
    days_left = (certificate.not_valid_after_utc - now).days
    notes = []
    if days_left < 14:
        notes.append(f"the certificate expires in {days_left} day(s): ask the federation's operator for a new one soon")
    return notes


# -- node.yaml ----------------------------------------------------------------------------------


def _text(value: str) -> str:
    """A YAML scalar for any text: plain when YAML reads it back as that text, else double-quoted (JSON)."""
    if _PLAIN.fullmatch(value) and value.casefold() not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=False)


def _check_coordinator(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"must be HOST:PORT, e.g. fl.example.org:7443, got {address!r}", field="--coordinator")


def _render(
    *,
    name: str,
    dataset: str,
    data_path: str,
    found: DetectedDataset,
    labels: LabelProposal,
    federation: Sequence[str] | None,
    coordinator: str | None,
    certs_dir: str | None,
    secure_aggregation: bool,
    privacy: tuple[float, float, str] | None,
) -> str:
    lines = [
        f"# node.yaml for site {name}, written by fedcare node init on {dt.date.today().isoformat()}.",
        "# Check it, then: fedcare data check node.yaml; fedcare node doctor node.yaml; fedcare node --config node.yaml",
        f"name: {_text(name)}                        # must equal the certificate's name",
    ]
    if coordinator is not None:
        lines.append(f"coordinator: {_text(coordinator)}    # where the node dials out (HOST:PORT)")
    else:
        lines.append("# coordinator: fl.example.org:7443      # TODO: the coordinator's HOST:PORT (or fedcare node --coordinator)")
    if certs_dir is not None:
        lines.append(f"certs_dir: {_text(certs_dir)}                   # ca.pem, {name}.pem, {name}.key (mode 0600)")
    else:
        lines.append(f"# certs_dir: certs                       # TODO: ca.pem, {name}.pem, {name}.key (fedcare node init --cert/--key/--ca)")
    lines += ["datasets:", f"  {_text(dataset)}:"]
    if found.format == "imagefolder":
        lines += [
            "    format: imagefolder",
            f"    path: {_text(data_path)}   # {found.total} {found.kind} file(s) in {len(found.label_counts)} label folder(s)",
            "    labels:",
            "      source: folder              # the local label is the name of the file's first folder",
            "    # patient:                    # TODO if a patient has several images: pattern: '^(?P<patient>[^_]+)_'",
        ]
    else:
        lines += [
            "    format: csv",
            f"    path: {_text(data_path)}   # {found.total} row(s) with a label",
            "    labels:",
            f"      column: {_text(str(found.label_column))}",
        ]
        if found.patient_column is not None:
            lines += ["    patient:", f"      column: {_text(found.patient_column)}   # rows of one patient stay on one side of the split"]
        else:
            lines.append("    # patient: {column: patient_id}   # TODO if a patient has several rows")
        lines.append(f"    # feature columns found (numeric): {', '.join(found.feature_columns) or 'none'}")
        lines.append("    #   (the plan's dataset.features says which the federation uses)")
        if found.other_columns:
            lines.append(f"    # columns left out (not numeric): {', '.join(found.other_columns)}")
        lines.append("    # bounds: {age: [0, 120]}          # optional: public bounds per feature, never from the records")
    where = f"the federation's labels: {', '.join(federation)}" if federation is not None else (
        "TODO: no federation labels given (--labels or --plan); each local label maps to itself, rename the targets"
    )
    empty = " {}" if not labels.label_map else ""  # an empty map, not a missing one (that would pass labels as-is)
    lines.append(f"    label_map:{empty}                    # local label -> {where}")
    for local, target in labels.label_map.items():
        count = found.label_counts.get(local, 0)
        lines.append(f"      {_text(local)}: {_text(target)}   # {count} record(s), matched {labels.how[local]}")
    if labels.unmapped:
        lines.append("      # TODO: these local labels match no federation label; map each one, or null to leave it out:")
        for local, count in labels.unmapped.items():
            lines.append(f"      # {_text(local)}: ???   # {count} record(s)")
    lines += [
        "    unmapped_labels: refuse       # a local label missing from label_map stops the node",
        "    split:",
        "      test_fraction: 0.2          # by patient: no patient on both sides",
        "      seed: 0",
        "policy:                           # what this site requires of every plan (docs/governance.md)",
        "  auto_approve: false             # each plan waits for: fedcare node approve HASH --config node.yaml",
    ]
    if secure_aggregation:
        lines.append("  require_secure_aggregation: true   # the coordinator only ever sees sums of sites' updates")
    else:
        lines.append("  require_secure_aggregation: false  # the plan given does not use secure aggregation; true refuses such plans")
    lines += [
        "  min_participants: 2             # never summed with fewer than 2 sites (3 or more is safer)",
        "  allowed_statistics:             # aggregates only: counts, sums and metrics; delete a line to refuse it",
        "    - feature_statistics          # per-feature counts, sums, sums of squares",
        "    - evaluation_metrics          # accuracy, AUC, ... of the global model on the test split",
        "    - training_metrics            # mean training loss per round",
        "  # require_record_level_dp: true  # refuse plans without DP-SGD",
        "  # coordinator_fingerprint: ...   # trust only this coordinator: fedcare certs fingerprint on its machine",
    ]
    if privacy is not None:
        epsilon, delta, accountant = privacy
        lines += [
            "  privacy:                        # lifetime privacy budget of the dataset, across all runs",
            f"    {_text(dataset)}: {{epsilon: {epsilon!r}, delta: {delta!r}, accountant: {accountant}}}",
        ]
    else:
        lines.append(f"  # privacy: {{{_text(dataset)}: {{epsilon: 3.0, delta: 1.0e-5}}}}   # a lifetime budget, across runs")
    lines.append("# ledger, state, audit log and approvals: NAME-privacy-ledger/ ... beside node.yaml (back them up)")
    return "\n".join(lines) + "\n"


def init_site(
    data: str | os.PathLike[str],
    *,
    name: str,
    dataset: str | None = None,
    labels: Sequence[str] | None = None,
    plan: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    coordinator: str | None = None,
    out: str | os.PathLike[str] = "node.yaml",
    label_column: str | None = None,
    force: bool = False,
) -> SiteSetup:
    """Write a commented ``node.yaml`` for a site's data, with a proposed label map and a cautious policy.

    Parameters
    ----------
    data : path-like
        A folder of images in one folder per label, or a CSV table.
    name : str
        The node's name (its certificate's common name).
    dataset : str, optional
        The dataset's name as plans use it; default: the plan's.
    labels : sequence of str, optional
        The federation's labels; default: the plan's ``dataset.labels``.
    plan : path-like, optional
        A plan of the federation: its dataset name, labels, features,
        secure aggregation and record-level DP shape the result.
    cert, key, ca : path-like, optional
        The site's certificate, key and the federation's CA (all three, or
        none), imported into ``certs/`` beside node.yaml.
    coordinator : str, optional
        ``HOST:PORT`` of the coordinator.
    out : path-like
        The node.yaml to write.
    label_column : str, optional
        csv: the label column, when the proposed one is wrong.
    force : bool
        Replace an existing node.yaml (and different certificate files).

    Returns
    -------
    SiteSetup

    Raises
    ------
    ConfigError
        If node.yaml exists (without ``force``), options are missing or
        contradict the plan, or the certificate files do not fit.
    DataError
        If the data's format cannot be told (see :func:`detect_dataset`).

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> site = Path(tempfile.mkdtemp())
    >>> for label in ("NORMAL", "PNEUMONIA", "QA"):
    ...     (site / "images" / label).mkdir(parents=True)
    ...     Image.new("L", (8, 8)).save(site / "images" / label / "1.png")
    >>> setup = init_site(site / "images", name="site-a", dataset="chest-xray", labels=["normal", "pneumonia"],
    ...                   out=site / "node.yaml")
    >>> setup.labels.label_map, setup.labels.unmapped
    ({'NORMAL': 'normal', 'PNEUMONIA': 'pneumonia'}, {'QA': 1})
    >>> from fedcare.deployment import load_node_config
    >>> load_node_config(site / "node.yaml").policy.require_secure_aggregation
    True
    """
    from fedcare.deployment import load_node_config
    from fedcare.plan import load_plan
    from fedcare.transport.pki import _check_name

    try:
        _check_name(name)
    except ConfigError as exc:
        raise ConfigError(exc.message, field="--name") from None
    out_path = Path(out)
    if out_path.exists() and not force:
        raise ConfigError(f"{out_path.name} already exists; use --force to replace it", field="--out")
    loaded = load_plan(Path(plan)) if plan is not None else None
    if loaded is not None:
        if dataset is not None and dataset != loaded.dataset.name:
            raise ConfigError(f"the plan's dataset is {loaded.dataset.name!r}, not {dataset!r}", field="--dataset")
        dataset = loaded.dataset.name
        if labels is None and loaded.dataset.labels is not None:
            labels = list(loaded.dataset.labels)
    if dataset is None:
        raise ConfigError("name the dataset as the federation's plans do (--dataset), or give --plan", field="--dataset")
    if coordinator is not None:
        _check_coordinator(coordinator)
    given = [value is not None for value in (cert, key, ca)]
    if any(given) and not all(given):
        raise ConfigError("give --cert, --key and --ca together (the files the federation's operator sent)", field="--cert")
    data_path = Path(data)
    found = detect_dataset(data_path, label_column=label_column)
    proposal = propose_label_map(found.label_counts, labels)
    notes: list[str] = []
    if loaded is not None and found.format == "csv" and loaded.dataset.features is not None:
        missing = [f for f in loaded.dataset.features if f not in found.feature_columns]
        if missing:
            notes.append(f"the plan's features missing or not numeric in the table: {', '.join(missing)}")
    base = out_path.resolve().parent
    base.mkdir(parents=True, exist_ok=True)
    certs_dir = None
    if cert is not None and key is not None and ca is not None:
        certs_dir = base / "certs"
        notes += import_certificates(cert=Path(cert), key=Path(key), ca=Path(ca), name=name, certs_dir=certs_dir, force=force)
    else:
        notes.append("no certificate given: put ca.pem, NAME.pem and NAME.key in certs/ (or rerun with --cert --key --ca)")
    secure = loaded is None or loaded.secure_aggregation.enabled
    privacy = None
    if loaded is not None and loaded.privacy.record_level.enabled:
        record_level = loaded.privacy.record_level
        privacy = (float(record_level.epsilon), float(record_level.delta), str(record_level.accountant))
    try:
        relative = os.path.relpath(data_path.resolve(), base)
    except ValueError:  # another drive (Windows)
        relative = str(data_path.resolve())
    text = _render(
        name=name, dataset=dataset, data_path=Path(relative).as_posix(), found=found, labels=proposal,
        federation=labels, coordinator=coordinator, certs_dir="certs" if certs_dir is not None else None,
        secure_aggregation=secure, privacy=privacy,
    )  # fmt: skip
    temporary = out_path.with_name(f".{out_path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    try:
        load_node_config(temporary)  # what the node will read
    except ConfigError:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, out_path)
    if proposal.unmapped:
        notes.append(
            f"{len(proposal.unmapped)} local label(s) match no federation label (TODO in node.yaml): "
            + ", ".join(f"{label} ({count})" for label, count in proposal.unmapped.items())
        )
    if found.unlabelled:
        notes.append(f"{found.unlabelled} file(s) or row(s) have no label and will be skipped")
    return SiteSetup(node_yaml=out_path, dataset=found, labels=proposal, certs_dir=certs_dir, notes=notes)
