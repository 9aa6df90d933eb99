"""The audit log is append-only and hash-chained: any tampering is found and named."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.errors import ConfigError, DataError
from fedcare.federation.audit_log import AUDIT_EVENTS, GENESIS, AuditLog, read_entries, verify

SHA = "ab" * 32


def fixed_clock() -> datetime:
    return datetime(2026, 12, 4, 2, 30, 0, 123456, tzinfo=timezone.utc)


def write_log(path: Path, entries: int = 8) -> AuditLog:
    log = AuditLog(path, actor="hungary", clock=fixed_clock)
    log.append("run_started", run_id="r1")
    for seq in range(1, entries):
        log.update_sent(run_id="r1", round=seq, size_bytes=1000 + seq, sha256=SHA)
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    return path


# -- round trip ----------------------------------------------------------------------


def test_appended_entries_verify_and_chain(log_path):
    report = verify(log_path)
    assert report.ok and report.entries == 8
    entries = list(read_entries(log_path))
    assert [e.seq for e in entries] == list(range(8))
    assert entries[0].prev == GENESIS
    assert all(later.prev == earlier.hash for earlier, later in zip(entries, entries[1:]))
    assert report.head == entries[-1].hash


def test_entry_line_is_canonical_json_with_seven_fields(log_path):
    first = lines_of(log_path)[0]
    body = json.loads(first)
    assert set(body) == {"seq", "time", "actor", "event", "data", "prev", "hash"}
    assert first == json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert body["time"] == "2026-12-04T02:30:00.123456+00:00"
    without_hash = {k: v for k, v in body.items() if k != "hash"}
    expected = hashlib.sha256(json.dumps(without_hash, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert body["hash"] == expected


def test_reopened_log_continues_seq_and_chain(log_path):
    head = verify(log_path).head
    entry = AuditLog(log_path, actor="hungary").refusal(reason="plan not approved", field="plan.task")
    assert entry.seq == 8 and entry.prev == head
    assert verify(log_path).entries == 9


def test_empty_log_verifies_with_genesis_head(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path, actor="coordinator")
    report = verify(path)
    assert report.ok and report.entries == 0 and report.head == GENESIS


def test_numpy_numbers_are_stored_as_plain_numbers(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", actor="hungary")
    entry = log.epsilon_spent(run_id="r1", round=np.int64(2), epsilon=np.float64(0.25), delta=1e-5)  # type: ignore[arg-type]
    assert entry.data == {"run_id": "r1", "round": 2, "epsilon": 0.25, "delta": 1e-5}
    assert verify(tmp_path / "audit.jsonl").ok


# -- tampering is found and named ---------------------------------------------------


def test_one_changed_digit_in_data_names_that_entry(log_path):
    lines = lines_of(log_path)
    assert b'"size_bytes":1005' in lines[5]
    lines[5] = lines[5].replace(b'"size_bytes":1005', b'"size_bytes":9005')
    write_lines(log_path, lines)
    report = verify(log_path)
    assert not report.ok
    assert (report.first_bad_seq, report.first_bad_line) == (5, 6)
    assert report.reason == "entry 5 (line 6) was changed: its hash does not match its content"
    assert report.entries == 5


@pytest.mark.parametrize("field", ["time", "event", "hash", "prev", "actor"])
def test_one_changed_byte_in_any_field_names_that_entry(log_path, field):
    lines = lines_of(log_path)
    body = json.loads(lines[3])
    value = body[field]
    if field == "event":
        body[field] = "task_started"  # another allowed event
    else:
        body[field] = value[:-1] + ("0" if value[-1] != "0" else "1")
    lines[3] = json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    write_lines(log_path, lines)
    report = verify(log_path)
    assert not report.ok
    assert report.first_bad_seq == 3 and report.first_bad_line == 4
    assert "entry 3" in str(report.reason)


def test_changed_whitespace_is_found_even_in_the_last_line(log_path):
    lines = lines_of(log_path)
    lines[-1] = lines[-1].replace(b'"seq":7', b'"seq": 7')
    write_lines(log_path, lines)
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == 7
    assert "not in the form the writer writes" in str(report.reason)


def test_deleted_middle_line_names_the_missing_entry(log_path):
    lines = lines_of(log_path)
    del lines[4]
    write_lines(log_path, lines)
    report = verify(log_path)
    assert (report.ok, report.first_bad_seq, report.first_bad_line) == (False, 4, 5)
    assert report.reason == "entry 4 is missing or lines were reordered: expected seq 4, found 5 (line 5)"


def test_deleted_first_line_names_entry_zero(log_path):
    write_lines(log_path, lines_of(log_path)[1:])
    report = verify(log_path)
    assert (report.ok, report.first_bad_seq, report.first_bad_line) == (False, 0, 1)
    assert "entry 0 is missing" in str(report.reason)


def test_swapped_lines_name_the_first_out_of_place(log_path):
    lines = lines_of(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(log_path, lines)
    report = verify(log_path)
    assert (report.ok, report.first_bad_seq, report.first_bad_line) == (False, 2, 3)
    assert "expected seq 2, found 3" in str(report.reason)


def test_inserted_copy_of_another_line_is_found(log_path):
    lines = lines_of(log_path)
    lines.insert(6, lines[2])
    write_lines(log_path, lines)
    report = verify(log_path)
    assert (report.ok, report.first_bad_seq, report.first_bad_line) == (False, 6, 7)
    assert "expected seq 6, found 2" in str(report.reason)


def test_edit_with_recomputed_hash_is_found_at_the_next_entry(log_path):
    lines = lines_of(log_path)
    body = json.loads(lines[3])
    body["data"]["size_bytes"] = 1
    body["hash"] = hashlib.sha256(
        json.dumps({k: v for k, v in body.items() if k != "hash"}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    lines[3] = json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    write_lines(log_path, lines)
    report = verify(log_path)
    assert (report.ok, report.first_bad_seq, report.first_bad_line) == (False, 4, 5)
    assert report.reason is not None
    assert report.reason.startswith("entry 4 (line 5) does not follow entry 3")


def test_forged_first_entry_must_start_from_genesis(tmp_path):
    path = tmp_path / "audit.jsonl"
    body = {"seq": 0, "time": "t", "actor": "x", "event": "run_started", "data": {}, "prev": "1" * 64}
    body["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    report = verify(path)
    assert (report.ok, report.first_bad_seq) == (False, 0)
    assert "does not start a chain" in str(report.reason)


def test_incomplete_last_line_is_reported_as_such(log_path):
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-40])
    report = verify(log_path)
    assert (report.ok, report.first_bad_seq, report.first_bad_line) == (False, 7, 8)
    assert report.reason == "the last line (line 8) is incomplete (the writer stopped mid-entry)"
    assert report.entries == 7


def test_line_that_is_not_json_is_named(log_path):
    lines = lines_of(log_path)
    lines[2] = b"hello\n"
    write_lines(log_path, lines)
    report = verify(log_path)
    assert (report.first_bad_seq, report.first_bad_line) == (2, 3)
    assert report.reason is not None and report.reason.startswith("line 3 is not valid JSON")


def test_truncation_at_the_end_verifies_alone_but_not_against_a_noted_head(log_path):
    noted = verify(log_path)
    write_lines(log_path, lines_of(log_path)[:5])
    assert verify(log_path).ok  # the file alone cannot show it
    report = verify(log_path, expect_head=noted.head)
    assert not report.ok and "expected head hash" in str(report.reason)
    report = verify(log_path, expect_entries=noted.entries)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "removed from the end" in str(report.reason)


def test_noted_head_still_verifies_after_the_log_grows(log_path):
    noted = verify(log_path)
    AuditLog(log_path, actor="hungary").refusal(reason="late update", peer="va-long-beach")
    assert verify(log_path, expect_head=noted.head, expect_entries=noted.entries).ok


def test_read_entries_stops_at_the_first_bad_entry(log_path):
    lines = lines_of(log_path)
    lines[5] = lines[5].replace(b"1005", b"1006")
    write_lines(log_path, lines)
    seen = []
    with pytest.raises(DataError, match="entry 5"):
        for entry in read_entries(log_path):
            seen.append(entry.seq)
    assert seen == [0, 1, 2, 3, 4]


def test_missing_file_is_a_data_error_naming_only_the_file_name(tmp_path):
    with pytest.raises(DataError, match="'nope.jsonl' cannot be read") as caught:
        verify(tmp_path / "secret-ward" / "nope.jsonl")
    assert "secret-ward" not in str(caught.value)


# -- refusals --------------------------------------------------------------------------


def test_opening_a_tampered_log_is_refused(log_path):
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b"1002", b"1003")
    write_lines(log_path, lines)
    before = log_path.read_bytes()
    with pytest.raises(DataError, match=r"entry 2 \(line 3\).*refusing to append"):
        AuditLog(log_path, actor="hungary")
    assert log_path.read_bytes() == before


def test_appending_after_someone_tampered_with_an_open_log_is_refused(log_path):
    log = AuditLog(log_path, actor="hungary")
    lines = lines_of(log_path)
    del lines[-1]
    write_lines(log_path, lines)
    with pytest.raises(DataError, match="shrank"):
        log.append("run_finished", run_id="r1")


def test_appending_after_an_incomplete_last_line_is_refused(log_path):
    log_path.write_bytes(log_path.read_bytes()[:-10])
    with pytest.raises(DataError, match="incomplete"):
        AuditLog(log_path, actor="hungary")


def test_unknown_event_is_refused_naming_it_and_the_allowed_ones(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", actor="hungary")
    with pytest.raises(ConfigError) as caught:
        log.append("data_exported", rows=3)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "'data_exported'" in message
    assert all(event in message for event in AUDIT_EVENTS)
    assert isinstance(caught.value, ValueError)
    assert verify(tmp_path / "audit.jsonl").entries == 0


def test_data_that_is_not_json_is_refused_naming_the_field(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", actor="hungary")
    with pytest.raises(ConfigError, match=r"data\.weights: must be JSON .* got ndarray"):
        log.append("task_finished", weights=np.zeros(3))
    with pytest.raises(ConfigError, match=r"data\.extra\.when: must be JSON .* got datetime"):
        log.append("task_finished", extra={"when": fixed_clock()})
    with pytest.raises(ConfigError, match=r"data\.loss: must be a finite number"):
        log.append("task_finished", loss=float("nan"))
    with pytest.raises(ConfigError, match="too long"):
        log.append("refusal", reason="x" * 5000)
    assert verify(tmp_path / "audit.jsonl").entries == 0


# -- concurrency -----------------------------------------------------------------------


def test_two_threads_appending_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, actor="coordinator")

    def work(peer: str) -> None:
        for round_ in range(200):
            log.update_received(run_id="r1", round=round_, peer=peer, size_bytes=10, sha256=SHA)

    threads = [threading.Thread(target=work, args=(peer,)) for peer in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = verify(path)
    assert report.ok and report.entries == 400


def _append_from_process(path: str, actor: str, count: int, start: object) -> None:
    log = AuditLog(path, actor=actor)
    start.wait()  # type: ignore[attr-defined]  # a Barrier: both processes append at once
    for round_ in range(count):
        log.update_sent(run_id="r1", round=round_, size_bytes=10, sha256=SHA)


def test_two_processes_appending_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path, actor="setup").append("run_started", run_id="r1")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [
        context.Process(target=_append_from_process, args=(str(path), name, 100, start)) for name in ("p1", "p2")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    report = verify(path)
    assert report.ok and report.entries == 201
    assert {e.actor for e in read_entries(path)} == {"setup", "p1", "p2"}


# -- CLI -------------------------------------------------------------------------------


def test_cli_verify_prints_ok_and_the_head_hash(log_path):
    out = CliRunner().invoke(app, ["audit", "verify", str(log_path)])
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == f"OK: 8 entries, head {verify(log_path).head}"


def test_cli_verify_names_the_tampered_entry_and_exits_1(log_path):
    lines = lines_of(log_path)
    lines[3] = lines[3].replace(b"1003", b"1004")
    write_lines(log_path, lines)
    out = CliRunner().invoke(app, ["audit", "verify", str(log_path)])
    assert out.exit_code == 1
    assert "TAMPERED: entry 3 (line 4) was changed" in out.stdout


def test_cli_verify_expect_head_finds_truncation(log_path):
    head = verify(log_path).head
    write_lines(log_path, lines_of(log_path)[:-2])
    assert CliRunner().invoke(app, ["audit", "verify", str(log_path)]).exit_code == 0
    out = CliRunner().invoke(app, ["audit", "verify", str(log_path), "--expect-head", head, "--json"])
    assert out.exit_code == 1
    payload = json.loads(out.stdout)
    assert payload["ok"] is False and payload["entries"] == 6 and "expected head hash" in payload["reason"]


def test_cli_verify_unreadable_file_exits_2(tmp_path):
    out = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / "missing.jsonl")])
    assert out.exit_code == 2
    assert "cannot be read" in out.stderr


def test_cli_show_json_lists_the_last_entries(log_path):
    out = CliRunner().invoke(app, ["audit", "show", str(log_path), "--last", "3", "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["ok"] is True
    assert [e["seq"] for e in payload["entries"]] == [5, 6, 7]
    assert payload["entries"][0]["data"]["size_bytes"] == 1005


def test_cli_show_prints_a_table_and_flags_a_broken_log(log_path, console_columns):
    lines = lines_of(log_path)
    lines[6] = lines[6].replace(b"1006", b"1007")
    write_lines(log_path, lines)
    console_columns(200)
    out = CliRunner().invoke(app, ["audit", "show", str(log_path)])
    assert out.exit_code == 1
    assert "update_sent" in out.stdout and "size_bytes=1005" in out.stdout
    assert "TAMPERED" in out.stdout and "entry 6" in out.stdout
