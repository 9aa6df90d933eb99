"""The privacy ledger: budget checks, persistence, refusals that fail closed, and crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fedcare.errors import BudgetExceeded, DataError, ProtocolError
from fedcare.privacy.dp import Mechanism, PrivacyLedger, epsilon_spent

DELTA = 1e-5
# Without sampling RDP has a closed form, so these records cost microseconds to account.
RELEASE = Mechanism(noise_multiplier=8.0, sample_rate=1.0, steps=1, label="dp-sgd")
STATS = Mechanism(noise_multiplier=8.0, sample_rate=1.0, steps=1, label="feature-stats")


def open_ledger(path: Path, **overrides) -> PrivacyLedger:
    settings = {"dataset": "heart", "epsilon_budget": 2.0, "delta": DELTA, "accountant": "rdp", **overrides}
    return PrivacyLedger(path, **settings)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "site" / "heart.ledger.json"


def write_document(path: Path, entries: list[dict], **overrides) -> None:
    document = {"version": 1, "dataset": "heart", "delta": DELTA, "accountant": "rdp", "entries": entries, **overrides}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def entry(round_number: int, epsilon_after: float, **overrides) -> dict:
    return {
        "run_id": "r1",
        "round": round_number,
        "label": "dp-sgd",
        "noise_multiplier": 8.0,
        "sample_rate": 1.0,
        "steps": 1,
        "epsilon_after": epsilon_after,
        **overrides,
    }


# -- spending ------------------------------------------------------------------------


def test_fresh_ledger_spends_nothing_and_creates_no_file(path):
    ledger = open_ledger(path)
    assert (ledger.spent(), ledger.remaining(), ledger.entries) == (0.0, 2.0, ())
    assert not path.parent.exists()


def test_record_increases_spent_and_returns_it(path):
    ledger = open_ledger(path)
    first = ledger.record([RELEASE], run_id="r1", round=1)
    second = ledger.record([RELEASE], run_id="r1", round=2)
    assert 0 < first < second == ledger.spent()
    assert ledger.remaining() == pytest.approx(2.0 - second)


def test_spent_is_the_accountant_composition_of_the_entries(path):
    ledger = open_ledger(path)
    ledger.record([STATS, RELEASE], run_id="r1", round=0)
    expected = epsilon_spent([STATS, RELEASE], delta=DELTA, accountant="rdp")
    assert ledger.spent() == pytest.approx(expected)
    assert [e.epsilon_after for e in ledger.entries] == [
        pytest.approx(epsilon_spent([STATS], delta=DELTA, accountant="rdp")),
        pytest.approx(expected),
    ]


def test_check_gives_the_epsilon_the_work_would_reach_without_recording_it(path):
    ledger = open_ledger(path)
    planned = ledger.check([RELEASE, RELEASE])
    assert planned == pytest.approx(epsilon_spent([RELEASE, RELEASE], delta=DELTA, accountant="rdp"))
    assert ledger.entries == ()


def test_check_refuses_overspending_with_budget_spent_outcome_and_what_is_left(path):
    ledger = open_ledger(path, epsilon_budget=1.0)
    spent = ledger.record([RELEASE], run_id="r1", round=1)  # about 0.48
    too_much = [Mechanism(noise_multiplier=8.0, sample_rate=1.0, steps=10)]
    with pytest.raises(BudgetExceeded) as caught:
        ledger.check(too_much)
    message = caught.value.message
    assert caught.value.field == "policy.privacy.heart.epsilon"
    assert "budget of 1 " in message
    assert f"{spent:.4g} is already spent" in message
    assert f"{1.0 - spent:.4g} is left" in message
    outcome = epsilon_spent([RELEASE, *too_much], delta=DELTA, accountant="rdp")
    assert f"to {outcome:.4g}" in message


def test_record_refuses_overspending_and_leaves_the_file_as_it_was(path):
    ledger = open_ledger(path, epsilon_budget=1.0)
    ledger.record([RELEASE], run_id="r1", round=1)
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded):
        ledger.record([Mechanism(noise_multiplier=1.0, sample_rate=1.0, steps=5)], run_id="r1", round=2)
    assert path.read_bytes() == before
    assert len(ledger.entries) == 1


def test_spending_exactly_the_budget_is_allowed(path):
    exact = epsilon_spent([RELEASE], delta=DELTA, accountant="rdp")
    ledger = open_ledger(path, epsilon_budget=exact)
    assert ledger.record([RELEASE], run_id="r1", round=1) == pytest.approx(exact)
    assert ledger.remaining() == 0.0


# -- persistence ---------------------------------------------------------------------


def test_reloaded_ledger_gives_the_same_spent_and_entries(path):
    ledger = open_ledger(path)
    ledger.record([STATS], run_id="r1", round=0)
    ledger.record([RELEASE], run_id="r1", round=1)
    reloaded = open_ledger(path)
    assert reloaded.spent() == ledger.spent()
    assert reloaded.entries == ledger.entries


def test_ledger_file_holds_the_documented_fields(path):
    open_ledger(path).record([RELEASE], run_id="r1", round=3)
    document = json.loads(path.read_text())
    assert {k: document[k] for k in ("version", "dataset", "delta", "accountant")} == {
        "version": 1,
        "dataset": "heart",
        "delta": DELTA,
        "accountant": "rdp",
    }
    (only,) = document["entries"]
    assert set(only) == {"run_id", "round", "label", "noise_multiplier", "sample_rate", "steps", "epsilon_after"}
    assert (only["run_id"], only["round"], only["label"], only["steps"]) == ("r1", 3, "dp-sgd", 1)


def test_the_same_run_round_and_label_is_recorded_only_once(path):
    ledger = open_ledger(path)
    ledger.record([RELEASE], run_id="r1", round=1)
    with pytest.raises(ProtocolError) as caught:
        ledger.record([RELEASE], run_id="r1", round=1)
    assert caught.value.field == "ledger.entries"
    ledger.record([STATS], run_id="r1", round=1)  # another label
    ledger.record([RELEASE], run_id="r2", round=1)  # another run
    assert len(ledger.entries) == 3


def test_a_second_ledger_object_on_the_file_sees_and_builds_on_the_other_ones_records(path):
    first, second = open_ledger(path), open_ledger(path)
    first.record([RELEASE], run_id="r1", round=1)
    second.record([RELEASE], run_id="r2", round=1)
    assert len(first.entries) == 2
    both = epsilon_spent([RELEASE, RELEASE], delta=DELTA, accountant="rdp")
    assert first.spent() == second.spent() == pytest.approx(both)


def test_records_from_many_threads_are_all_kept_in_order_of_epsilon(path):
    ledger = open_ledger(path, epsilon_budget=100.0)

    def work(run: int) -> None:
        for round_number in range(1, 11):
            ledger.record([RELEASE], run_id=f"r{run}", round=round_number)

    threads = [threading.Thread(target=work, args=(run,)) for run in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reloaded = open_ledger(path, epsilon_budget=100.0)
    assert len(reloaded.entries) == 40
    assert len({(e.run_id, e.round) for e in reloaded.entries}) == 40
    afters = [e.epsilon_after for e in reloaded.entries]
    assert afters == sorted(afters)
    assert reloaded.spent() == pytest.approx(epsilon_spent([RELEASE] * 40, delta=DELTA, accountant="rdp"))


# -- refusing what cannot be trusted -------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b'{"version": 1, "dataset": "heart", "entr', b"\xff\xfe garbage", b"[1, 2]", b'{"version": NaN}'],
    ids=["empty", "truncated", "binary", "not-an-object", "nan"],
)
def test_corrupt_ledger_refuses_to_load_and_is_left_untouched(path, content):
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DataError, match="refuses to train") as caught:
        open_ledger(path)
    assert caught.value.field == "ledger"
    assert str(path.parent) not in str(caught.value)  # no paths in errors
    assert path.read_bytes() == content


def test_unparseable_ledger_is_reported_as_unreadable(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{not json")
    with pytest.raises(DataError, match="unreadable"):
        open_ledger(path)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dataset": "other"}, "ledger.dataset"),
        ({"delta": 1e-6}, "ledger.delta"),
        ({"accountant": "prv"}, "ledger.accountant"),
    ],
)
def test_ledger_of_another_dataset_delta_or_accountant_is_refused(path, overrides, field):
    open_ledger(path).record([RELEASE], run_id="r1", round=1)
    before = path.read_bytes()
    with pytest.raises(DataError) as caught:
        open_ledger(path, **overrides)
    assert caught.value.field == field
    assert path.read_bytes() == before


def test_ledger_whose_epsilon_after_decreases_is_refused(path):
    write_document(path, [entry(1, 0.5), entry(2, 0.4)])
    with pytest.raises(DataError, match="never decreases") as caught:
        open_ledger(path)
    assert caught.value.field == "ledger.entries[1].epsilon_after"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"steps": 0}, "ledger.entries[0].steps"),
        ({"noise_multiplier": "8"}, "ledger.entries[0].noise_multiplier"),
        ({"round": -1}, "ledger.entries[0].round"),
        ({"epsilon_after": -0.1}, "ledger.entries[0].epsilon_after"),
        ({"extra": 1}, "ledger.entries[0]"),
    ],
)
def test_ledger_with_a_malformed_entry_is_refused_naming_it(path, bad, field):
    write_document(path, [{**entry(1, 0.5), **bad}])
    with pytest.raises(DataError) as caught:
        open_ledger(path)
    assert caught.value.field == field


def test_ledger_with_a_duplicated_entry_is_refused(path):
    write_document(path, [entry(1, 0.5), entry(1, 0.6)])
    with pytest.raises(DataError, match="recorded twice"):
        open_ledger(path)


def test_ledger_whose_file_disappears_after_it_was_read_refuses_instead_of_restarting_at_zero(path):
    ledger = open_ledger(path)
    ledger.record([RELEASE], run_id="r1", round=1)
    path.unlink()
    with pytest.raises(DataError, match="disappeared"):
        ledger.spent()


def test_ledger_rewritten_on_disk_with_fewer_entries_is_refused(path):
    ledger = open_ledger(path)
    ledger.record([RELEASE], run_id="r1", round=1)
    ledger.record([RELEASE], run_id="r1", round=2)
    document = json.loads(path.read_text())
    document["entries"] = document["entries"][:1]
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="append-only"):
        ledger.check([RELEASE])


# -- crashes -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from fedcare.privacy.dp import Mechanism, PrivacyLedger

    ledger = PrivacyLedger(sys.argv[1], dataset="heart", epsilon_budget=1e6, delta=1e-5, accountant="pld")
    release = Mechanism(noise_multiplier=20.0, sample_rate=1.0, steps=1)
    round_number = max((e.round for e in ledger.entries), default=0)
    ledger.record([release], run_id="crash", round=round_number + 1)
    sys.stdout.write("recording\\n")
    sys.stdout.flush()
    while True:
        round_number += 1
        ledger.record([release], run_id="crash", round=round_number + 1)
    """
)


@pytest.mark.timeout(60)
def test_ledger_survives_sigkill_at_random_instants_without_losing_or_rewinding_entries(tmp_path, path):
    script = tmp_path / "record_forever.py"
    script.write_text(CHILD)
    rng = random.Random(20240601)
    previous_entries: tuple = ()
    previous_spent = 0.0
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line == b"recording\n", child.stderr.read().decode() if child.stderr else ""
            threading.Event().wait(rng.uniform(0.05, 0.6))  # a random instant, often mid-write
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        ledger = open_ledger(path, epsilon_budget=1e6, accountant="pld")  # loads: the old file or the new one
        entries = ledger.entries
        assert len(entries) > len(previous_entries)
        assert entries[: len(previous_entries)] == previous_entries  # append-only
        spent = ledger.spent()
        assert spent >= previous_spent
        previous_entries, previous_spent = entries, spent
    leftovers = [name for name in os.listdir(path.parent) if name.endswith(".tmp")]
    assert len(leftovers) <= 1  # a killed writer's temporary file is removed by the next record
