"""A site's privacy ledger: everything ever spent on one dataset, kept on disk.

Record-level differential privacy protects each patient record: whatever a
site releases (a DP-SGD model update, noisy feature statistics) changes by at
most ``(epsilon, delta)`` whether or not any one record was in the data.
Releases compose, so the guarantee a patient actually gets is the composition
of *every* release ever made on the dataset, across runs, plans and
researchers. The ledger is where a site keeps that total and refuses work that
would take it past the budget its policy sets.

What the ledger guarantees:

* **Append-only.** Entries are only ever added; one ``(run_id, round, label)``
  is recorded at most once. A file that loses or changes entries while a
  ledger has it open is refused.
* **Never decreases.** Each entry stores ``epsilon_after``, the epsilon of all
  entries up to it; these never go down, and a file in which they do is
  refused. :meth:`PrivacyLedger.spent` is never below the last of them.
* **Atomic and durable.** A record is written to a temporary file in the same
  directory, flushed, ``fsync``-ed, moved over the ledger with
  ``os.replace`` and the directory ``fsync``-ed. A crash at any instant
  leaves either the old file or the new one, never a mix or nothing.
* **Fails closed.** A missing file means nothing has been spent yet, but a
  file that cannot be read, parsed or trusted raises
  :class:`~fedcare.errors.DataError`: the site refuses to train on the
  dataset until the ledger is restored. It is never reset to zero.

One ledger object may be used from several threads. Processes that share a
ledger file serialize their records with an advisory lock (POSIX ``flock``)
on a ``.lock`` file beside it, and each record starts from what is on disk.

Errors and log messages carry counts, epsilons and the dataset name, never
file paths or anything about the records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcare.errors import BudgetExceeded, ConfigError, DataError, ProtocolError
from fedcare.privacy.dp.accountant import ACCOUNTANTS, Mechanism, epsilon_spent

try:  # POSIX: serialize writers across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads only
    fcntl = None  # type: ignore[assignment]

__all__ = ["LedgerEntry", "PrivacyLedger"]

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
_SLACK = 1e-9  # epsilon above the budget still allowed (floating point)
_MAX_LEDGER_BYTES = 64 * 1024 * 1024  # bound the read before allocating
_ENTRY_KEYS = frozenset({"run_id", "round", "label", "noise_multiplier", "sample_rate", "steps", "epsilon_after"})
_DOCUMENT_KEYS = frozenset({"version", "dataset", "delta", "accountant", "entries"})


@dataclass(frozen=True)
class LedgerEntry:
    """One release recorded in a ledger.

    Attributes
    ----------
    run_id : str
        The run that made the release.
    round : int
        The federation round (0: before the first round, e.g. feature statistics).
    label : str
        What was released (``"dp-sgd"``, ``"feature-stats"``).
    noise_multiplier, sample_rate : float
    steps : int
        The mechanism, as in :class:`~fedcare.privacy.dp.accountant.Mechanism`.
    epsilon_after : float
        Epsilon of all entries up to and including this one.

    Examples
    --------
    >>> entry = LedgerEntry(run_id="run-1", round=0, label="feature-stats", noise_multiplier=8.0,
    ...                     sample_rate=1.0, steps=1, epsilon_after=0.478)
    >>> entry.mechanism
    Mechanism(noise_multiplier=8.0, sample_rate=1.0, steps=1, label='feature-stats')
    """

    run_id: str
    round: int
    label: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float

    @property
    def mechanism(self) -> Mechanism:
        """The release as a :class:`~fedcare.privacy.dp.accountant.Mechanism`."""
        return Mechanism(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps, label=self.label
        )


class PrivacyLedger:
    """A site's persistent record of the privacy spent on one dataset over its lifetime.

    The file is read when the ledger is opened and whenever it changes on disk;
    it is written only by :meth:`record`.

    Parameters
    ----------
    path : str or Path
        The ledger file (JSON). Missing: nothing spent yet; it is created, with
        its directory, by the first :meth:`record`.
    dataset : str
        The dataset the ledger accounts for; must match the file's.
    epsilon_budget : float
        The site's lifetime budget for the dataset (> 0), from its policy.
        It may change between openings; what was spent does not.
    delta : float
        The delta at which epsilon is accounted, in (0, 1); must match the file's.
    accountant : {"prv", "rdp", "pld"}
        The accountant that composes the entries; must match the file's.

    Raises
    ------
    ConfigError
        If an argument is out of range.
    DataError
        If the file exists but is unreadable, malformed, or belongs to another
        dataset, delta or accountant (field ``ledger.<key>``). The file is
        left as it is.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> ledger = PrivacyLedger(Path(tmp.name) / "heart.ledger.json", dataset="heart", epsilon_budget=1.0,
    ...                        delta=1e-5, accountant="rdp")
    >>> ledger.spent()
    0.0
    >>> release = Mechanism(noise_multiplier=8.0, sample_rate=1.0, steps=1, label="feature-stats")
    >>> round(ledger.record([release], run_id="run-1", round=0), 3)
    0.478
    >>> reopened = PrivacyLedger(Path(tmp.name) / "heart.ledger.json", dataset="heart", epsilon_budget=1.0,
    ...                          delta=1e-5, accountant="rdp")
    >>> len(reopened.entries), round(reopened.remaining(), 3)
    (1, 0.522)
    >>> tmp.cleanup()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dataset: str,
        epsilon_budget: float,
        delta: float,
        accountant: str = "prv",
    ) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise ConfigError(f"must be a non-empty string, got {dataset!r}", field="dataset")
        field = f"policy.privacy.{dataset}"
        if not _is_real(epsilon_budget) or not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
            raise ConfigError(f"must be a finite number > 0, got {epsilon_budget!r}", field=f"{field}.epsilon")
        if not _is_real(delta) or not (0.0 < delta < 1.0):
            raise ConfigError(f"must be in (0, 1), got {delta!r}", field=f"{field}.delta")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}",
                field=f"{field}.accountant",
            )
        self._path = Path(path)
        self._dataset = dataset
        self._epsilon_budget = float(epsilon_budget)
        self._delta = float(delta)
        self._accountant = accountant
        self._lock = threading.Lock()
        self._entries: tuple[LedgerEntry, ...] = ()
        self._signature: tuple[int, ...] | None = None  # of the file last read or written
        self._spent: float | None = None  # of self._entries
        self._last_check: tuple[tuple[tuple[LedgerEntry, ...], tuple[Mechanism, ...]], float] | None = None
        with self._lock:
            self._refresh()

    # -- what it holds -----------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def dataset(self) -> str:
        """The dataset the ledger accounts for."""
        return self._dataset

    @property
    def epsilon_budget(self) -> float:
        """The site's lifetime epsilon budget for the dataset."""
        return self._epsilon_budget

    @property
    def delta(self) -> float:
        """The delta at which epsilon is accounted."""
        return self._delta

    @property
    def accountant(self) -> str:
        """The accountant that composes the entries."""
        return self._accountant

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every release recorded, oldest first.

        Raises
        ------
        DataError
            If the file changed on disk and can no longer be trusted.
        """
        with self._lock:
            self._refresh()
            return self._entries

    def spent(self) -> float:
        """The epsilon all recorded releases spend together, at :attr:`delta`.

        The accountant's composition of the entries, and never less than the
        last ``epsilon_after`` recorded.

        Raises
        ------
        DataError
            If the file changed on disk and can no longer be trusted.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     PrivacyLedger(Path(tmp) / "x.json", dataset="x", epsilon_budget=1.0, delta=1e-5).spent()
        0.0
        """
        with self._lock:
            self._refresh()
            return self._spent_locked()

    def remaining(self) -> float:
        """What is left of the budget: ``max(0, epsilon_budget - spent())``.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     PrivacyLedger(Path(tmp) / "x.json", dataset="x", epsilon_budget=2.5, delta=1e-5).remaining()
        2.5
        """
        return max(0.0, self._epsilon_budget - self.spent())

    # -- checking and recording -------------------------------------------------------

    def check(self, planned: Sequence[Mechanism]) -> float:
        """The epsilon the dataset would reach if ``planned`` were spent on top; refuse if past the budget.

        Parameters
        ----------
        planned : sequence of Mechanism
            The releases the site is asked to make; empty: nothing more.

        Returns
        -------
        float
            Epsilon of the recorded entries and ``planned`` together.

        Raises
        ------
        BudgetExceeded
            If that is above :attr:`epsilon_budget` (field
            ``policy.privacy.<dataset>.epsilon``); the message gives the
            budget, what is spent, what the work would bring it to and what is left.
        DataError
            If the file changed on disk and can no longer be trusted.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ledger = PrivacyLedger(Path(tmp) / "x.json", dataset="x", epsilon_budget=1.0, delta=1e-5,
        ...                            accountant="rdp")
        ...     ledger.check([Mechanism(noise_multiplier=1.0, sample_rate=1.0, steps=10)])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedcare.errors.BudgetExceeded: policy.privacy.x.epsilon: the work would bring epsilon on dataset 'x' to ...
        """
        planned = tuple(planned)
        _check_mechanisms(planned)
        with self._lock:
            self._refresh()
            return self._check_locked(planned)

    def record(self, mechanisms: Sequence[Mechanism], *, run_id: str, round: int) -> float:  # noqa: A002
        """Check ``mechanisms`` against the budget, then append them and save the ledger atomically.

        Parameters
        ----------
        mechanisms : sequence of Mechanism
            The releases made (at least one; labels distinct).
        run_id : str
            The run that made them.
        round : int
            The federation round (>= 0; 0 for releases before the first round).

        Returns
        -------
        float
            The epsilon spent on the dataset, these releases included.

        Raises
        ------
        BudgetExceeded
            If the releases would take the dataset past its budget; nothing is recorded.
        ProtocolError
            If ``(run_id, round, label)`` is already in the ledger (field ``ledger.entries``).
        DataError
            If the ledger on disk cannot be trusted, or cannot be written
            (nothing is recorded then).
        ConfigError
            If an argument is malformed.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ledger = PrivacyLedger(Path(tmp) / "x.json", dataset="x", epsilon_budget=5.0, delta=1e-5,
        ...                            accountant="rdp")
        ...     first = ledger.record([Mechanism(noise_multiplier=4.0, sample_rate=1.0, steps=1)], run_id="r", round=1)
        ...     second = ledger.record([Mechanism(noise_multiplier=4.0, sample_rate=1.0, steps=1)], run_id="r", round=2)
        >>> 0 < first < second
        True
        """
        mechanisms = tuple(mechanisms)
        if not mechanisms:
            raise ConfigError("nothing to record: pass at least one mechanism", field="mechanisms")
        _check_mechanisms(mechanisms)
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(f"must be a non-empty string, got {run_id!r}", field="run_id")
        if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 0:
            raise ConfigError(f"must be an integer >= 0, got {round!r}", field="round")
        labels = [mechanism.label for mechanism in mechanisms]
        if len(set(labels)) != len(labels):
            raise ProtocolError(
                f"the releases of one round need distinct labels, got {labels}",
                round=int(round),
                field="ledger.entries",
            )
        with self._lock, self._exclusive():
            self._refresh()
            taken = {(entry.run_id, entry.round, entry.label) for entry in self._entries}
            for label in labels:
                if (run_id, int(round), label) in taken:
                    raise ProtocolError(
                        f"run {run_id!r} already recorded a {label!r} release for this round; "
                        "a release is recorded once",
                        round=int(round),
                        field="ledger.entries",
                    )
            total = self._check_locked(mechanisms)
            recorded = [entry.mechanism for entry in self._entries]
            running = self._spent_locked()
            new_entries = []
            for index, mechanism in enumerate(mechanisms):
                last = index == len(mechanisms) - 1
                composed = total if last else epsilon_spent(
                    [*recorded, *mechanisms[: index + 1]], delta=self._delta, accountant=self._accountant
                )
                running = max(running, composed)
                new_entries.append(_entry_of(mechanism, run_id=run_id, round_number=int(round), epsilon_after=running))
            entries = (*self._entries, *new_entries)
            self._save(entries)
            self._entries = entries
            self._spent = running
        logger.info(
            "privacy ledger entries recorded",
            extra={
                "run_id": run_id,
                "round": int(round),
                "entries": len(entries),
                "epsilon": running,
                "epsilon_budget": self._epsilon_budget,
            },
        )
        return running

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(dataset={self._dataset!r}, epsilon_budget={self._epsilon_budget!r}, "
            f"delta={self._delta!r}, accountant={self._accountant!r})"
        )

    # -- internals (called with self._lock held) ----------------------------------------

    def _spent_locked(self) -> float:
        if self._spent is None:
            composed = epsilon_spent(
                [entry.mechanism for entry in self._entries], delta=self._delta, accountant=self._accountant
            )
            last = self._entries[-1].epsilon_after if self._entries else 0.0
            self._spent = max(composed, last)
        return self._spent

    def _check_locked(self, planned: tuple[Mechanism, ...]) -> float:
        spent = self._spent_locked()
        if not planned:
            return spent
        key = (self._entries, planned)
        if self._last_check is not None and self._last_check[0] == key:
            total = self._last_check[1]  # a check then a record of the same work: compose once
        else:
            recorded = [entry.mechanism for entry in self._entries]
            total = max(spent, epsilon_spent([*recorded, *planned], delta=self._delta, accountant=self._accountant))
            self._last_check = (key, total)
        if total > self._epsilon_budget + _SLACK:
            left = max(0.0, self._epsilon_budget - spent)
            logger.warning(
                "privacy budget would be exceeded; work refused",
                extra={"epsilon": spent, "epsilon_planned": total, "epsilon_budget": self._epsilon_budget},
            )
            raise BudgetExceeded(
                f"the work would bring epsilon on dataset {self._dataset!r} to {total:.4g}, above the site's budget "
                f"of {self._epsilon_budget:.4g} (delta {self._delta:g}, accountant {self._accountant}); "
                f"{spent:.4g} is already spent and {left:.4g} is left. The site refuses it: plan fewer rounds "
                "or more noise, or raise the budget in the site's policy",
                field=f"policy.privacy.{self._dataset}.epsilon",
            )
        return total

    def _refresh(self) -> None:
        """Read the file if it changed since it was last read or written."""
        try:
            handle = open(self._path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            if self._signature is not None:
                raise DataError(
                    f"the privacy ledger of dataset {self._dataset!r} has disappeared after "
                    f"{len(self._entries)} entries were read from it; the site refuses to train on this dataset "
                    "until the ledger is restored",
                    field="ledger",
                ) from None
            return
        except OSError as exc:
            raise self._unreadable(f"{type(exc).__name__}: {exc.strerror}") from None
        with handle:
            status = os.fstat(handle.fileno())
            signature = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
            if signature == self._signature:
                return
            if status.st_size > _MAX_LEDGER_BYTES:
                raise self._unreadable(f"{status.st_size} bytes, more than {_MAX_LEDGER_BYTES}")
            try:
                raw = handle.read(_MAX_LEDGER_BYTES + 1)
            except OSError as exc:
                raise self._unreadable(f"{type(exc).__name__}: {exc.strerror}") from None
        entries = self._parse(raw)
        known = len(self._entries)
        if entries[:known] != self._entries:
            raise DataError(
                f"the privacy ledger of dataset {self._dataset!r} changed on disk: of the {known} entries read "
                f"earlier, some are gone or different (it now holds {len(entries)}); a ledger is append-only, "
                "so the site refuses to train on this dataset until the ledger is restored",
                field="ledger.entries",
            )
        if len(entries) != known or self._signature is None:
            self._spent = None
        self._entries = entries
        self._signature = signature
        logger.debug("privacy ledger read", extra={"entries": len(entries)})

    def _parse(self, raw: bytes) -> tuple[LedgerEntry, ...]:
        try:
            document = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._unreadable(f"not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise self._malformed("the file is not a JSON object", "ledger")
        if document.get("version") != LEDGER_VERSION:
            raise self._malformed(
                f"version {document.get('version')!r} is not {LEDGER_VERSION}; a newer fedcare may have written it",
                "ledger.version",
            )
        if set(document) != _DOCUMENT_KEYS:
            raise self._malformed(f"keys {sorted(document)} are not {sorted(_DOCUMENT_KEYS)}", "ledger")
        if document["dataset"] != self._dataset:
            raise DataError(
                f"the ledger file belongs to dataset {document['dataset']!r}, not {self._dataset!r}; "
                "point the site at this dataset's own ledger",
                field="ledger.dataset",
            )
        if not _is_real(document["delta"]) or float(document["delta"]) != self._delta:
            raise DataError(
                f"the ledger accounts at delta {document['delta']!r}, the site's policy at {self._delta:g}; "
                "a ledger's delta cannot change, so keep the policy's delta at the ledger's",
                field="ledger.delta",
            )
        if document["accountant"] != self._accountant:
            raise DataError(
                f"the ledger is accounted with {document['accountant']!r}, the site's policy asks for "
                f"{self._accountant!r}; a ledger's accountant cannot change, so keep the policy's at the ledger's",
                field="ledger.accountant",
            )
        if not isinstance(document["entries"], list):
            raise self._malformed("entries is not a list", "ledger.entries")
        entries: list[LedgerEntry] = []
        seen: set[tuple[str, int, str]] = set()
        for index, item in enumerate(document["entries"]):
            entry = self._entry(index, item)
            key = (entry.run_id, entry.round, entry.label)
            if key in seen:
                raise self._malformed(
                    f"run {entry.run_id!r}, round {entry.round}, {entry.label!r} is recorded twice",
                    f"ledger.entries[{index}]",
                )
            seen.add(key)
            if entries and entry.epsilon_after < entries[-1].epsilon_after:
                raise self._malformed(
                    f"epsilon_after falls from {entries[-1].epsilon_after!r} to {entry.epsilon_after!r}; "
                    "a ledger's epsilon never decreases",
                    f"ledger.entries[{index}].epsilon_after",
                )
            entries.append(entry)
        return tuple(entries)

    def _entry(self, index: int, item: Any) -> LedgerEntry:
        where = f"ledger.entries[{index}]"
        if not isinstance(item, dict) or set(item) != _ENTRY_KEYS:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise self._malformed(f"an entry has keys {sorted(_ENTRY_KEYS)}, got {keys}", where)
        after = item["epsilon_after"]
        for key, valid, expected in (
            ("run_id", isinstance(item["run_id"], str) and bool(item["run_id"]), "a non-empty string"),
            ("round", _is_int(item["round"]) and item["round"] >= 0, "an integer >= 0"),
            ("noise_multiplier", _is_real(item["noise_multiplier"]), "a number"),
            ("sample_rate", _is_real(item["sample_rate"]), "a number"),
            ("steps", _is_int(item["steps"]), "an integer"),
            ("epsilon_after", _is_real(after) and math.isfinite(after) and after >= 0, "a finite number >= 0"),
        ):
            if not valid:
                raise self._malformed(f"must be {expected}, got {item[key]!r}", f"{where}.{key}")
        try:
            mechanism = Mechanism(
                noise_multiplier=item["noise_multiplier"],
                sample_rate=item["sample_rate"],
                steps=item["steps"],
                label=item["label"],
            )
        except ConfigError as exc:
            name = (exc.field or "").rsplit(".", 1)[-1]
            raise self._malformed(exc.message, f"{where}.{name}") from None
        return _entry_of(mechanism, run_id=item["run_id"], round_number=int(item["round"]), epsilon_after=float(after))

    def _save(self, entries: tuple[LedgerEntry, ...]) -> None:
        document = {
            "version": LEDGER_VERSION,
            "dataset": self._dataset,
            "delta": self._delta,
            "accountant": self._accountant,
            "entries": [asdict(entry) for entry in entries],
        }
        data = (json.dumps(document, indent=1, allow_nan=False) + "\n").encode("utf-8")
        try:
            self._signature = _replace_atomically(self._path, data)
        except OSError as exc:
            raise DataError(
                f"could not save the privacy ledger of dataset {self._dataset!r} ({type(exc).__name__}: "
                f"{exc.strerror}); nothing was recorded, so the work must not be released",
                field="ledger",
            ) from None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the ledger's inter-process lock (POSIX ``flock`` on a ``.lock`` file beside it)."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = open(self._path.with_name(f".{self._path.name}.lock"), "a+b")  # noqa: SIM115
        except OSError as exc:
            raise DataError(
                f"cannot open the privacy ledger of dataset {self._dataset!r} for writing "
                f"({type(exc).__name__}: {exc.strerror}); nothing was recorded",
                field="ledger",
            ) from None
        with lock_file:
            if fcntl is not None:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                _remove_stale_temporaries(self._path)
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _unreadable(self, detail: str) -> DataError:
        return DataError(
            f"the privacy ledger of dataset {self._dataset!r} is unreadable ({detail}); the site refuses to train "
            "on this dataset until the ledger is restored from a backup (it is never reset to zero)",
            field="ledger",
        )

    def _malformed(self, detail: str, field: str) -> DataError:
        return DataError(
            f"the privacy ledger of dataset {self._dataset!r} cannot be trusted: {detail}; the site refuses to "
            "train on this dataset until the ledger is restored from a backup",
            field=field,
        )


# -- helpers -------------------------------------------------------------------------------


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a ledger may hold")


def _entry_of(mechanism: Mechanism, *, run_id: str, round_number: int, epsilon_after: float) -> LedgerEntry:
    return LedgerEntry(
        run_id=run_id,
        round=round_number,
        label=mechanism.label,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=mechanism.steps,
        epsilon_after=epsilon_after,
    )


def _check_mechanisms(mechanisms: tuple[Mechanism, ...]) -> None:
    for index, mechanism in enumerate(mechanisms):
        if not isinstance(mechanism, Mechanism):
            raise ConfigError(f"must be a Mechanism, got {type(mechanism).__name__}", field=f"mechanisms[{index}]")


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _replace_atomically(path: Path, data: bytes) -> tuple[int, ...]:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one; return its signature."""
    directory = path.parent
    descriptor, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            status = os.fstat(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: fsync the directory that holds the entry (POSIX)."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open a directory; its rename is durable already
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files a crashed writer left (called with the inter-process lock held)."""
    if fcntl is None:  # pragma: no cover - without the lock another writer may own them
        return
    prefix = _temporary_prefix(path)
    for name in os.listdir(path.parent):
        if name.startswith(prefix) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
