"""A tamper-evident, append-only audit log for a site's data protection officer.

The log is a JSON Lines file. Each line is one entry, written as canonical
JSON (sorted keys, compact separators, ASCII only) and ended by ``\\n``::

    {"actor":"hungary","data":{"round":1,"run_id":"r1","sha256":"ab...","size_bytes":1024},
     "event":"update_sent","hash":"5c...","prev":"e3...","seq":3,"time":"2026-12-04T02:27:09.123456+00:00"}

(shown on two lines here; in the file it is one). The fields:

``seq``
    0 for the first entry, then 1, 2, ... with no gaps.
``time``
    When the entry was written: UTC, ISO 8601, microseconds.
``actor``
    The node or coordinator that wrote it.
``event``
    One of :data:`AUDIT_EVENTS` (a closed set; anything else is refused).
``data``
    Event-specific fields: numbers, short strings, hashes. **Callers must
    never put patient data or secrets here** (no record IDs, data paths,
    DICOM tags, row values, keys or passwords): the log is meant to be
    shown to auditors. Strings are limited to :data:`MAX_STRING_CHARS`
    characters and a whole line to :data:`MAX_LINE_BYTES` bytes.
``prev``
    The ``hash`` of the entry before; 64 zeros (:data:`GENESIS`) for entry 0.
``hash``
    SHA-256 (hex) of the entry's canonical JSON *without* the ``hash`` field,
    so it covers ``prev`` too: each entry seals the whole chain before it.

:func:`verify` checks every line. Because each line must also be exactly
the canonical form of the entry it holds, *any* changed byte is found:
a change to an entry's content breaks its ``hash``; an attacker who also
recomputes that ``hash`` breaks the next entry's ``prev``; a deleted,
swapped or inserted line breaks the ``seq`` sequence or the ``prev`` links.

What the file alone cannot show: that entries were cut off *at the end*. A
log truncated after entry 41 is a valid log of 42 entries. To detect that,
note the head hash (:attr:`VerifyReport.head`, printed by ``fedcare audit
verify``) or the entry count somewhere else and pass it back later as
``verify(path, expect_head=...)`` or ``expect_entries=...``.

Writers: :class:`AuditLog` appends one line per call with ``open(..., "a")``,
then flushes and ``os.fsync``\\ s it. A lock makes it thread-safe; on POSIX an
exclusive ``fcntl.flock`` on the file while appending makes several processes
(or several :class:`AuditLog` objects) writing one log safe too, as long as
they all go through :class:`AuditLog`. On other platforms only the thread
lock applies: give each process its own log there. Opening checks the whole
file; before each append the writer checks whatever other writers added since
its last look (and that the file did not shrink), so it never extends a chain
that does not verify. It does not re-read lines it already checked: a change
to those made while the writer is open is found by :func:`verify`, not by the
next append.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "audit.jsonl"
>>> log = AuditLog(path, actor="hungary")
>>> _ = log.append("run_started", run_id="r1")
>>> entry = log.update_sent(run_id="r1", round=1, size_bytes=1024, sha256="ab" * 32)
>>> entry.seq, entry.event, entry.data["size_bytes"]
(1, 'update_sent', 1024)
>>> report = verify(path)
>>> report.ok, report.entries, report.head == entry.hash
(True, 2, True)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, get_args

from fedcare.errors import ConfigError, DataError

if sys.platform != "win32":
    import fcntl

__all__ = [
    "AUDIT_EVENTS",
    "GENESIS",
    "MAX_LINE_BYTES",
    "MAX_STRING_CHARS",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "VerifyReport",
    "read_entries",
    "verify",
]

AuditEvent = Literal[
    "run_started",
    "run_finished",
    "plan_received",
    "plan_approved",
    "plan_rejected",
    "plan_pending",
    "task_started",
    "task_finished",
    "update_sent",
    "update_received",
    "epsilon_spent",
    "refusal",
    "peer_identity",
]
"""The events an entry may record.

``run_started`` / ``run_finished``
    A federated run began or ended at this actor.
``plan_received`` / ``plan_approved`` / ``plan_rejected`` / ``plan_pending``
    A plan arrived, and what the site's policy decided about it (pending:
    waiting for a person to approve it).
``task_started`` / ``task_finished``
    Local work for one job (training, evaluation, statistics) began or ended.
``update_sent`` / ``update_received``
    A model update left this actor, or arrived from a peer (size and hash).
``epsilon_spent``
    Privacy budget was spent (epsilon, delta, running total).
``refusal``
    This actor refused a request, a message or a peer.
``peer_identity``
    A peer authenticated: certificate subject and fingerprint.
"""

AUDIT_EVENTS: Final[frozenset[str]] = frozenset(get_args(AuditEvent))
"""Every allowed ``event`` value (see :data:`AuditEvent`)."""

GENESIS: Final[str] = "0" * 64
"""The ``prev`` of entry 0, and the head of an empty log."""

MAX_STRING_CHARS: Final[int] = 1024
"""The longest string allowed anywhere in ``data`` (or as ``actor``), in characters."""

MAX_LINE_BYTES: Final[int] = 64 * 1024
"""The longest line (one entry) allowed, in bytes."""

_FIELDS: Final[frozenset[str]] = frozenset({"seq", "time", "actor", "event", "data", "prev", "hash"})
_HEX: Final[frozenset[str]] = frozenset("0123456789abcdef")


def _canonical(obj: Mapping[str, Any]) -> bytes:
    """The one byte form an entry (or its hashed part) may take."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _entry_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of an entry without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _check_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON, or a ConfigError naming ``where``."""
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise ConfigError(
                f"a string of {len(value)} characters is too long for the audit log (at most {MAX_STRING_CHARS}); "
                "log a hash or a count instead",
                field=where,
            )
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {number}", field=where)
        return number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"keys must be strings, got a key of type {type(key).__name__}", field=where)
            out[key] = _check_value(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_check_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ConfigError(
        f"must be JSON (null, bool, number, string, list or object with string keys), got {type(value).__name__}; "
        "convert it (e.g. int(), float(), str() or a hash) before logging it",
        field=where,
    )


@dataclass(frozen=True)
class AuditEntry:
    """One entry of an audit log, as written.

    Parameters
    ----------
    seq : int
        Position in the log, from 0.
    time : str
        When it was written (UTC, ISO 8601), exactly as in the file.
    actor : str
        The node or coordinator that wrote it.
    event : str
        One of :data:`AUDIT_EVENTS`.
    data : Mapping[str, Any]
        Event-specific fields (plain JSON values).
    prev : str
        The ``hash`` of the entry before (:data:`GENESIS` for entry 0).
    hash : str
        SHA-256 hex of this entry's canonical JSON without ``hash``.

    Examples
    --------
    >>> entry = AuditEntry(seq=0, time="2026-01-01T00:00:00.000000+00:00", actor="hungary",
    ...                    event="run_started", data={"run_id": "r1"}, prev=GENESIS, hash="")
    >>> entry.to_line()[:40]
    b'{"actor":"hungary","data":{"run_id":"r1"'
    """

    seq: int
    time: str
    actor: str
    event: str
    data: Mapping[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The entry as a plain dict (a copy), with all seven fields.

        Examples
        --------
        >>> sorted(AuditEntry(seq=0, time="t", actor="a", event="refusal").to_dict())
        ['actor', 'data', 'event', 'hash', 'prev', 'seq', 'time']
        """
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "event": self.event,
            "data": json.loads(json.dumps(dict(self.data))),
            "prev": self.prev,
            "hash": self.hash,
        }

    def to_line(self) -> bytes:
        """The entry's line in the file: canonical JSON, without the trailing newline.

        Examples
        --------
        >>> AuditEntry(seq=0, time="t", actor="a", event="refusal").to_line()[:19]
        b'{"actor":"a","data"'
        """
        return _canonical(self.to_dict())


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    Parameters
    ----------
    ok : bool
        True if every line is a valid entry, the chain is unbroken and any
        expectation (``expect_head``, ``expect_entries``) holds.
    entries : int
        How many entries verified, from the start, before any problem.
    head : str
        The ``hash`` of the last entry that verified (:data:`GENESIS` if none):
        note it to detect truncation later.
    first_bad_seq : int or None
        The position (``seq`` it should have) of the first bad entry.
    first_bad_line : int or None
        Its line number in the file (1-based).
    reason : str or None
        What is wrong, in words, e.g. ``"entry 7 was changed: its hash does
        not match its content"``.

    Examples
    --------
    >>> VerifyReport(ok=True, entries=0, head=GENESIS).to_dict()["ok"]
    True
    """

    ok: bool
    entries: int
    head: str
    first_bad_seq: int | None = None
    first_bad_line: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict (for ``--json``)."""
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head,
            "first_bad_seq": self.first_bad_seq,
            "first_bad_line": self.first_bad_line,
            "reason": self.reason,
        }


@dataclass
class _Problem:
    seq: int
    line: int
    reason: str


class _Chain:
    """Checks lines one at a time, carrying seq and prev between them."""

    def __init__(self) -> None:
        self.entries = 0
        self.head = GENESIS
        self.line_number = 0

    def feed(self, raw: bytes) -> tuple[AuditEntry | None, _Problem | None]:
        """Check one line (with its trailing newline, if it has one)."""
        self.line_number += 1
        seq, line = self.entries, self.line_number
        if not raw.endswith(b"\n"):
            return None, _Problem(seq, line, f"the last line (line {line}) is incomplete (the writer stopped mid-entry)")
        text = raw[:-1]
        if len(text) > MAX_LINE_BYTES:
            return None, _Problem(seq, line, f"line {line} is {len(text)} bytes, longer than any entry may be ({MAX_LINE_BYTES})")
        try:
            body = json.loads(text.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError):
            return None, _Problem(seq, line, f"line {line} is not valid JSON (entry {seq} was changed or damaged)")
        shape = _shape_problem(body)
        if shape is not None:
            return None, _Problem(seq, line, f"line {line} is not an audit entry: {shape} (entry {seq} was changed)")
        if _canonical(body) != text:
            return None, _Problem(seq, line, f"entry {seq} (line {line}) was changed: it is not in the form the writer writes")
        if body["hash"] != _entry_hash(body):
            return None, _Problem(seq, line, f"entry {seq} (line {line}) was changed: its hash does not match its content")
        if body["seq"] != seq:
            return None, _Problem(
                seq,
                line,
                f"entry {seq} is missing or lines were reordered: expected seq {seq}, found {body['seq']} (line {line})",
            )
        if body["prev"] != self.head:
            if seq == 0:
                reason = f"entry 0 (line {line}) does not start a chain: its prev is not {GENESIS[:8]}... (lines before it were removed?)"
            else:
                reason = (
                    f"entry {seq} (line {line}) does not follow entry {seq - 1}: its prev does not match entry {seq - 1}'s "
                    f"hash (entry {seq - 1} was changed and re-hashed, or entry {seq} was forged)"
                )
            return None, _Problem(seq, line, reason)
        entry = AuditEntry(
            seq=body["seq"],
            time=body["time"],
            actor=body["actor"],
            event=body["event"],
            data=body["data"],
            prev=body["prev"],
            hash=body["hash"],
        )
        self.entries += 1
        self.head = entry.hash
        return entry, None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _shape_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return f"expected a JSON object, got {type(body).__name__}"
    if set(body) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(body)), sorted(set(body) - _FIELDS)
        return f"fields missing {missing}, unexpected {extra}"
    if not isinstance(body["seq"], int) or isinstance(body["seq"], bool) or body["seq"] < 0:
        return "seq must be an integer >= 0"
    for name in ("time", "actor", "event"):
        if not isinstance(body[name], str):
            return f"{name} must be a string"
    if body["event"] not in AUDIT_EVENTS:
        return f"unknown event {body['event']!r}"
    if not isinstance(body["data"], dict):
        return "data must be a JSON object"
    for name in ("prev", "hash"):
        if not _is_sha256_hex(body[name]):
            return f"{name} must be 64 lowercase hex digits"
    return None


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    """The file's lines, each with its newline; an over-long line is cut (and then reported), never loaded whole."""
    limit = MAX_LINE_BYTES + 1  # the longest entry and its newline
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit:
            ended = raw.endswith(b"\n")
            while not ended:
                chunk = handle.readline(limit)
                if not chunk:
                    break
                ended = chunk.endswith(b"\n")
            raw = raw[:limit] + (b"\n" if ended else b"")
        yield raw


def _open_for_reading(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise DataError(f"audit log {path.name!r} cannot be read: {exc.strerror or exc}") from exc


def verify(path: str | Path, *, expect_head: str | None = None, expect_entries: int | None = None) -> VerifyReport:
    """Check an audit log line by line and report the first problem.

    Checks that every line is complete, valid canonical JSON with the seven
    fields, that ``seq`` counts up from 0 by one, that each ``hash`` matches
    its entry and that each ``prev`` is the ``hash`` of the entry before.
    That finds a changed byte anywhere, a deleted line (also the first), two
    swapped lines, an inserted line and an incomplete last line.

    Entries removed from the *end* cannot be seen from the file alone; pass
    what you noted earlier to detect that.

    Parameters
    ----------
    path : str or Path
        The log (JSON Lines). An empty file is a valid log of 0 entries.
    expect_head : str, optional
        A head hash noted earlier (:attr:`VerifyReport.head`). The log may
        have grown since, but the entry with that hash must still be in it.
    expect_entries : int, optional
        An entry count noted earlier: the log must have at least this many.

    Returns
    -------
    VerifyReport
        ``ok``, the number of good ``entries``, the ``head`` hash and, on
        failure, ``first_bad_seq``, ``first_bad_line`` and the ``reason``.

    Raises
    ------
    DataError
        If the file cannot be opened or read.
    ConfigError
        If ``expect_head`` is not 64 hex digits or ``expect_entries`` < 0.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "audit.jsonl"
    >>> log = AuditLog(path, actor="site-a")
    >>> for size in (10, 20, 30):
    ...     _ = log.update_sent(run_id="r1", round=1, size_bytes=size, sha256="0" * 64)
    >>> lines = path.read_bytes().splitlines(keepends=True)
    >>> _ = path.write_bytes(lines[0] + lines[1].replace(b'"size_bytes":20', b'"size_bytes":21') + lines[2])
    >>> report = verify(path)
    >>> report.ok, report.first_bad_seq, report.reason
    (False, 1, 'entry 1 (line 2) was changed: its hash does not match its content')
    """
    path = Path(path)
    if expect_head is not None:
        expect_head = expect_head.strip().lower()
        if not _is_sha256_hex(expect_head):
            raise ConfigError("must be 64 hex digits (a head hash printed by `fedcare audit verify`)", field="expect_head")
    if expect_entries is not None and expect_entries < 0:
        raise ConfigError(f"must be >= 0, got {expect_entries}", field="expect_entries")
    chain = _Chain()
    seen_head = expect_head is None or expect_head == GENESIS
    with _open_for_reading(path) as handle:
        try:
            for raw in _lines(handle):
                entry, problem = chain.feed(raw)
                if problem is not None:
                    return VerifyReport(
                        ok=False,
                        entries=chain.entries,
                        head=chain.head,
                        first_bad_seq=problem.seq,
                        first_bad_line=problem.line,
                        reason=problem.reason,
                    )
                if entry is not None and entry.hash == expect_head:
                    seen_head = True
        except OSError as exc:
            raise DataError(f"audit log {path.name!r} cannot be read: {exc.strerror or exc}") from exc
    if expect_entries is not None and chain.entries < expect_entries:
        return VerifyReport(
            ok=False,
            entries=chain.entries,
            head=chain.head,
            first_bad_seq=chain.entries,
            first_bad_line=chain.line_number + 1,
            reason=(
                f"the log has {chain.entries} entries but {expect_entries} were expected: "
                f"entries from {chain.entries} on were removed from the end"
            ),
        )
    if not seen_head:
        return VerifyReport(
            ok=False,
            entries=chain.entries,
            head=chain.head,
            reason=(
                f"no entry has the expected head hash {expect_head}: entries were removed from the end, "
                f"or the log was rewritten (its head is now {chain.head})"
            ),
        )
    return VerifyReport(ok=True, entries=chain.entries, head=chain.head)


def read_entries(path: str | Path) -> Iterator[AuditEntry]:
    """Yield the entries of an audit log, checking the chain as it goes.

    Every entry yielded has verified (as in :func:`verify`) together with
    all entries before it. At the first bad line, after yielding the good
    entries before it, this raises.

    Parameters
    ----------
    path : str or Path
        The log.

    Yields
    ------
    AuditEntry
        In file order, from ``seq`` 0.

    Raises
    ------
    DataError
        If the file cannot be read, or at the first line that does not verify
        (the message names the entry and line).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "audit.jsonl"
    >>> log = AuditLog(path, actor="coordinator")
    >>> _ = log.append("run_started", run_id="r1")
    >>> _ = log.append("run_finished", run_id="r1", rounds=3)
    >>> [(e.seq, e.event) for e in read_entries(path)]
    [(0, 'run_started'), (1, 'run_finished')]
    """
    path = Path(path)
    chain = _Chain()
    with _open_for_reading(path) as handle:
        try:
            for raw in _lines(handle):
                entry, problem = chain.feed(raw)
                if problem is not None:
                    raise DataError(f"audit log {path.name!r} does not verify: {problem.reason}")
                assert entry is not None
                yield entry
        except OSError as exc:
            raise DataError(f"audit log {path.name!r} cannot be read: {exc.strerror or exc}") from exc


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class AuditLog:
    """An append-only, hash-chained audit log that one actor writes to.

    Opening checks the existing file (the whole chain) and refuses to go on
    from one that does not verify. Each :meth:`append` writes one line,
    flushes and fsyncs it before returning.

    Parameters
    ----------
    path : str or Path
        The log file (JSON Lines); created, with its folder, if missing.
    actor : str
        The name written into every entry, e.g. the node's ID or
        ``"coordinator"``.
    clock : callable, optional
        Returns the current time as an aware ``datetime``; defaults to the
        system clock in UTC. For tests.

    Raises
    ------
    DataError
        If the existing file cannot be read, or does not verify (the message
        names the first bad entry and line). Never extend a broken chain:
        keep the file as evidence and start a new log elsewhere.
    ConfigError
        If ``actor`` is empty or too long.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "audit.jsonl"
    >>> _ = AuditLog(path, actor="hungary").append("plan_received", plan_sha256="ab" * 32)
    >>> entry = AuditLog(path, actor="hungary").append("plan_approved", plan_sha256="ab" * 32)
    >>> entry.seq, entry.prev == next(read_entries(path)).hash
    (1, True)
    """

    def __init__(
        self,
        path: str | Path,
        *,
        actor: str,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not isinstance(actor, str) or not actor.strip():
            raise ConfigError(f"must be a non-empty name, got {actor!r}", field="actor")
        _check_value(actor, "actor")
        self.path = Path(path)
        self.actor = actor
        self._clock = clock or _utc_now
        self._lock = threading.Lock()
        self._chain = _Chain()
        self._offset = 0  # bytes of the file checked so far
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self._lock, self._locked_file() as handle:
            self._catch_up(handle)
        if created:
            _fsync_directory(self.path.parent)

    @property
    def head(self) -> str:
        """The ``hash`` of the last entry (as of this writer's last look); :data:`GENESIS` if none."""
        return self._chain.head

    @property
    def entries(self) -> int:
        """How many entries the log holds (as of this writer's last look)."""
        return self._chain.entries

    def append(self, event: AuditEvent, /, **data: Any) -> AuditEntry:
        """Write one entry and return it once it is on disk.

        Parameters
        ----------
        event : str
            One of :data:`AUDIT_EVENTS`.
        **data
            The entry's ``data``: numbers, short strings, hashes, lists and
            objects of those. Never patient data or secrets. NumPy numbers
            are stored as plain ``int`` / ``float``.

        Returns
        -------
        AuditEntry
            The entry as written, with its ``seq``, ``prev`` and ``hash``.

        Raises
        ------
        ConfigError
            If ``event`` is not one of :data:`AUDIT_EVENTS`, a value in
            ``data`` is not JSON (or not finite), or the entry is too long.
            Nothing is written.
        DataError
            If the log no longer verifies (for example another program
            changed it since it was opened). Nothing is written.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "audit.jsonl", actor="hungary")
        >>> log.append("epsilon_spent", run_id="r1", round=2, epsilon=0.5, delta=1e-5).data["epsilon"]
        0.5
        >>> log.append("lunch_break")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedcare.errors.ConfigError: event: unknown audit event 'lunch_break'; allowed: epsilon_spent, ...
        """
        if event not in AUDIT_EVENTS:
            raise ConfigError(
                f"unknown audit event {event!r}; allowed: {', '.join(sorted(AUDIT_EVENTS))}",
                field="event",
            )
        checked = _check_value(dict(data), "data")
        moment = self._clock()
        if moment.tzinfo is None:
            raise ConfigError("the clock must return an aware datetime (UTC)", field="clock")
        stamp = moment.astimezone(timezone.utc).isoformat(timespec="microseconds")
        with self._lock, self._locked_file() as handle:
            self._catch_up(handle)
            body: dict[str, Any] = {
                "seq": self._chain.entries,
                "time": stamp,
                "actor": self.actor,
                "event": event,
                "data": checked,
                "prev": self._chain.head,
            }
            body["hash"] = _entry_hash(body)
            line = _canonical(body) + b"\n"
            if len(line) - 1 > MAX_LINE_BYTES:
                raise ConfigError(
                    f"the entry would be {len(line) - 1} bytes, more than {MAX_LINE_BYTES}; log hashes or counts instead",
                    field="data",
                )
            try:
                handle.seek(0, io.SEEK_END)
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                _undo_partial_write(handle, self._offset)
                raise DataError(
                    f"audit log {self.path.name!r} cannot be written: {exc.strerror or exc}; the entry was not recorded"
                ) from exc
            entry, problem = self._chain.feed(line)
            assert entry is not None and problem is None, problem
            self._offset += len(line)
            return entry

    # -- the usual entries ---------------------------------------------------

    def plan_received(self, *, run_id: str, plan_sha256: str, sender: str | None = None) -> AuditEntry:
        """Record that a plan arrived (its hash, not its content).

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "a.jsonl", actor="hungary")
        >>> log.plan_received(run_id="r1", plan_sha256="ab" * 32).event
        'plan_received'
        """
        return self.append("plan_received", **_without_none(run_id=run_id, plan_sha256=plan_sha256, sender=sender))

    def update_sent(self, *, run_id: str, round: int, size_bytes: int, sha256: str) -> AuditEntry:  # noqa: A002
        """Record that a model update left this actor: its size in bytes and SHA-256.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "a.jsonl", actor="hungary")
        >>> log.update_sent(run_id="r1", round=1, size_bytes=2048, sha256="cd" * 32).data["size_bytes"]
        2048
        """
        return self.append("update_sent", run_id=run_id, round=round, size_bytes=size_bytes, sha256=sha256)

    def update_received(
        self,
        *,
        run_id: str,
        round: int,  # noqa: A002
        peer: str,
        size_bytes: int,
        sha256: str,
    ) -> AuditEntry:
        """Record that a model update arrived from ``peer``: its size in bytes and SHA-256.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "a.jsonl", actor="coordinator")
        >>> log.update_received(run_id="r1", round=1, peer="hungary", size_bytes=2048, sha256="cd" * 32).data["peer"]
        'hungary'
        """
        return self.append(
            "update_received", run_id=run_id, round=round, peer=peer, size_bytes=size_bytes, sha256=sha256
        )

    def epsilon_spent(
        self,
        *,
        run_id: str,
        round: int,  # noqa: A002
        epsilon: float,
        delta: float,
        total_epsilon: float | None = None,
    ) -> AuditEntry:
        """Record privacy budget spent in ``round`` (and the running total, if known).

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "a.jsonl", actor="hungary")
        >>> log.epsilon_spent(run_id="r1", round=1, epsilon=0.3, delta=1e-5, total_epsilon=0.3).event
        'epsilon_spent'
        """
        return self.append(
            "epsilon_spent",
            **_without_none(run_id=run_id, round=round, epsilon=epsilon, delta=delta, total_epsilon=total_epsilon),
        )

    def refusal(self, *, reason: str, field: str | None = None, peer: str | None = None) -> AuditEntry:
        """Record that this actor refused something, why, and which field or peer it concerned.

        ``reason`` must describe the rule, never the data (no values from records).

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "a.jsonl", actor="hungary")
        >>> log.refusal(reason="plan not approved", field="plan.task").data
        {'field': 'plan.task', 'reason': 'plan not approved'}
        """
        return self.append("refusal", **_without_none(reason=reason, field=field, peer=peer))

    def peer_identity(self, *, subject: str, fingerprint: str) -> AuditEntry:
        """Record a peer that authenticated: its certificate subject and SHA-256 fingerprint.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = AuditLog(Path(tempfile.mkdtemp()) / "a.jsonl", actor="coordinator")
        >>> log.peer_identity(subject="CN=hungary", fingerprint="ef" * 32).event
        'peer_identity'
        """
        return self.append("peer_identity", subject=subject, fingerprint=fingerprint)

    # -- internals -------------------------------------------------------------

    def _locked_file(self) -> _FileLock:
        return _FileLock(self.path)

    def _catch_up(self, handle: BinaryIO) -> None:
        """Check whatever was added to the file since this writer last looked."""
        try:
            size = os.fstat(handle.fileno()).st_size
            if size < self._offset:
                raise DataError(
                    f"audit log {self.path.name!r} shrank from {self._offset} to {size} bytes since it was opened: "
                    "entries were removed; refusing to append (keep the file as evidence)"
                )
            if size == self._offset:
                return
            handle.seek(self._offset)
            for raw in _lines(handle):
                _, problem = self._chain.feed(raw)
                if problem is not None:
                    raise DataError(
                        f"audit log {self.path.name!r} does not verify: {problem.reason}; refusing to append "
                        "to a broken chain (keep the file as evidence and start a new log)"
                    )
                self._offset += len(raw)
        except OSError as exc:
            raise DataError(f"audit log {self.path.name!r} cannot be read: {exc.strerror or exc}") from exc


class _FileLock:
    """The log opened for appending (and reading back), under an exclusive flock on POSIX."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        try:
            handle: BinaryIO = self._path.open("a+b")
        except OSError as exc:
            raise DataError(f"audit log {self._path.name!r} cannot be opened for appending: {exc.strerror or exc}") from exc
        if sys.platform != "win32":
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        self._handle = handle
        return handle

    def __exit__(self, *exc_info: object) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            if sys.platform != "win32":
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()


def _undo_partial_write(handle: BinaryIO, size: int) -> None:
    """Cut a line that was only partly written (disk full, I/O error), so the chain stays whole."""
    try:
        handle.truncate(size)
        os.fsync(handle.fileno())
    except OSError:
        pass  # the incomplete line stays; verify reports it and the next append refuses


def _without_none(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _fsync_directory(folder: Path) -> None:
    """Make a newly created file's name durable too (POSIX; a no-op elsewhere)."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
