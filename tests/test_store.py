"""The decision store authenticates every row: each attack edits a real SQLite file with raw
sqlite3 (as someone with the file but not the state key could), then reads it back through the
store, which must raise StoreTampered naming the table and no value. Also: honest rows read
back whole, and a version-2 store (built here as v2 wrote it) migrates to v3 at open."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privscore.client.encoding import length_prefixed
from service.decisions.alert_rules import Event
from service.decisions.store import (
    SCHEMA_VERSION,
    DecisionStore,
    StoreError,
    StoreTampered,
    from_us,
    to_us,
)

KEY = bytes(range(32))
T0 = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)
TENANT = "tenant-secret-name"
ALICE = "a" * 64  # pseudonyms as the servicers give them: 64 hex characters
BOB = "b" * 64
# Every value a tampering message must not repeat.
VALUES = (TENANT, ALICE, BOB, "req-increase", "req-hold", "ev-purchase", "ev-repay", "fp-")


def limit(store: DecisionStore, request_id: str, action: str, minutes: int) -> None:
    store.record_limit_decision(
        tenant=TENANT,
        pseudonym=ALICE,
        request_id=request_id,
        fingerprint=f"fp-{request_id}",
        decided_at=T0 + dt.timedelta(minutes=minutes),
        action=action,
        response=f"response of {request_id}: limit 1234500".encode(),
    )


def event(event_id: str, minutes: int, kind: str = "purchase") -> Event:
    return Event(
        event_id=event_id,
        occurred_at=T0 + dt.timedelta(minutes=minutes),
        kind=kind,
        currency="CNY",
        amount=987_654,
    )


def populate(store: DecisionStore) -> None:
    """Two decisions for ALICE (an increase, then a hold); two events for BOB raising three
    alerts (sequences 1, 2, 3)."""
    limit(store, "req-increase", "INCREASE", 0)
    limit(store, "req-hold", "HOLD", 10)
    store.record_event(
        TENANT, BOB, event("ev-purchase", 0), [b"alert-1", b"alert-2"], T0, T0 - dt.timedelta(1)
    )
    store.record_event(
        TENANT, BOB, event("ev-repay", 5, "repayment"), [b"alert-3"], T0, T0 - dt.timedelta(1)
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "decisions.sqlite3"
    store = DecisionStore(path, KEY)
    populate(store)
    store.close()
    return path


def raw(path: Path, *statements: str) -> None:
    """Edit the file behind the store's back."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()


@pytest.fixture
def reopen(path: Path) -> Iterator[Callable[[], DecisionStore]]:
    opened: list[DecisionStore] = []

    def open_store() -> DecisionStore:
        opened.append(DecisionStore(path, KEY))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


def assert_tampered(table: str, read: Callable[[], object]) -> None:
    with pytest.raises(StoreTampered) as caught:
        read()
    assert caught.value.table == table
    assert isinstance(caught.value, StoreError)
    message = str(caught.value)
    assert table in message
    for value in VALUES:
        assert value not in message


def test_honest_rows_read_back_whole(reopen: Callable[[], DecisionStore]) -> None:
    store = reopen()
    stored = store.limit_decision(TENANT, "req-hold")
    assert stored is not None
    assert stored.fingerprint == "fp-req-hold"
    assert stored.response == b"response of req-hold: limit 1234500"
    assert store.limit_decision(TENANT, "req-missing") is None
    assert store.has_limit_decision(TENANT, "req-increase")
    assert not store.has_limit_decision(TENANT, "req-missing")
    assert store.last_increase_at(TENANT, ALICE) == T0
    assert store.last_increase_at(TENANT, BOB) is None
    assert store.limit_decision_keys() == [(TENANT, "req-hold"), (TENANT, "req-increase")]

    assert store.has_event(TENANT, BOB, "ev-purchase")
    assert not store.has_event(TENANT, BOB, "ev-missing")
    assert store.events(TENANT, BOB) == [event("ev-purchase", 0), event("ev-repay", 5, "repayment")]
    assert store.event_keys() == [(TENANT, BOB, "ev-purchase"), (TENANT, BOB, "ev-repay")]

    alerts = [(1, b"alert-1"), (2, b"alert-2"), (3, b"alert-3")]
    assert store.alerts_after(0, 10) == alerts
    assert store.alerts_after(1, 1) == alerts[1:2]
    assert store.alert_rows() == alerts
    assert store.last_alert_sequence() == 3
    sequences = store.record_event(
        TENANT, BOB, event("ev-late", 9), [b"alert-4"], T0, T0 + dt.timedelta(minutes=1)
    )
    assert sequences == [4]
    assert store.event_keys() == [(TENANT, BOB, "ev-late"), (TENANT, BOB, "ev-repay")]


def test_times_are_exact_microseconds() -> None:
    moment = dt.datetime(2026, 11, 1, 9, 0, 0, 123_457, tzinfo=dt.UTC)
    assert from_us(to_us(moment)) == moment


# -- limit_decisions ---------------------------------------------------------------------------

LIMIT_EDITS = {
    "tenant": "tenant = 'other-tenant'",
    "request_id": "request_id = 'req-other'",
    "pseudonym": f"pseudonym = '{'c' * 64}'",
    "fingerprint": "fingerprint = 'fp-forged'",
    "decided_at_us": "decided_at_us = decided_at_us - 86400000000",
    "action": "action = 'HOLD'",
    "action as a blob": "action = CAST(action AS BLOB)",
    "sealed": "sealed = CAST(sealed || X'00' AS BLOB)",
    "sealed flipped": "sealed = CAST(X'00' || substr(sealed, 2) AS BLOB)",
    "sealed as text": "sealed = sealed || ''",
    "sealed emptied": "sealed = X''",
}


def limit_reads(store: DecisionStore, row: dict[str, Any]) -> list[Callable[[], object]]:
    """Every read that meets the row as it now stands."""
    return [
        lambda: store.limit_decision(row["tenant"], row["request_id"]),
        lambda: store.has_limit_decision(row["tenant"], row["request_id"]),
        lambda: store.last_increase_at(row["tenant"], row["pseudonym"]),
        store.limit_decision_keys,
    ]


def row_of(path: Path, table: str, where: str) -> dict[str, Any]:
    """The row's plain columns as they now stand."""
    columns = {
        "limit_decisions": "tenant, request_id, pseudonym",
        "events": "tenant, pseudonym, event_id, occurred_at_us",
    }[table]
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return dict(db.execute(f"SELECT {columns} FROM {table} WHERE {where}").fetchone())
    finally:
        db.close()


@pytest.mark.parametrize("edit", LIMIT_EDITS, ids=list(LIMIT_EDITS))
def test_an_edited_limit_decision_is_refused(
    path: Path, reopen: Callable[[], DecisionStore], edit: str
) -> None:
    raw(path, f"UPDATE limit_decisions SET {LIMIT_EDITS[edit]} WHERE request_id='req-increase'")
    row = row_of(path, "limit_decisions", "rowid = (SELECT MIN(rowid) FROM limit_decisions)")
    store = reopen()
    for read in limit_reads(store, row):
        assert_tampered("limit_decisions", read)


def test_hiding_an_increase_cannot_lift_the_cool_down(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    """The attack on the old MAX(decided_at_us) ... WHERE action='INCREASE' query: with the
    increase relabelled, or moved back a day, the cool-down would have seen no recent one."""
    assert reopen().last_increase_at(TENANT, ALICE) == T0
    for edit in ("action = 'DECREASE'", "decided_at_us = decided_at_us - 86400000000"):
        raw(path, f"UPDATE limit_decisions SET {edit} WHERE request_id='req-increase'")
        assert_tampered("limit_decisions", lambda: reopen().last_increase_at(TENANT, ALICE))
        raw(path, "DELETE FROM limit_decisions WHERE request_id='req-increase'")
        store = reopen()
        limit(store, "req-increase", "INCREASE", 0)


def test_swapped_limit_blobs_are_refused(path: Path, reopen: Callable[[], DecisionStore]) -> None:
    raw(
        path,
        "CREATE TEMP TABLE s AS SELECT request_id, sealed FROM limit_decisions",
        "UPDATE limit_decisions SET sealed = (SELECT sealed FROM s WHERE s.request_id != "
        "limit_decisions.request_id)",
    )
    store = reopen()
    assert_tampered("limit_decisions", lambda: store.limit_decision(TENANT, "req-increase"))
    assert_tampered("limit_decisions", lambda: store.limit_decision(TENANT, "req-hold"))
    assert_tampered("limit_decisions", lambda: store.last_increase_at(TENANT, ALICE))


def test_a_limit_decision_copied_under_another_request_id_is_refused(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    """A copy would replay the decision to a request it was never made for."""
    raw(
        path,
        "INSERT INTO limit_decisions SELECT tenant, 'req-copy', pseudonym, fingerprint, "
        "decided_at_us, action, sealed FROM limit_decisions WHERE request_id='req-increase'",
    )
    store = reopen()
    assert_tampered("limit_decisions", lambda: store.limit_decision(TENANT, "req-copy"))
    assert_tampered("limit_decisions", lambda: store.has_limit_decision(TENANT, "req-copy"))
    assert_tampered("limit_decisions", store.limit_decision_keys)
    assert store.limit_decision(TENANT, "req-hold") is not None  # the honest rows still open


# -- events --------------------------------------------------------------------------------

EVENT_EDITS = {
    "tenant": "tenant = 'other-tenant'",
    "pseudonym": f"pseudonym = '{'c' * 64}'",
    "event_id": "event_id = 'ev-other'",
    "occurred_at_us": "occurred_at_us = occurred_at_us + 60000000",
    "occurred_at_us as text": "occurred_at_us = 'soon'",
    "sealed": "sealed = substr(sealed, 1, length(sealed) - 1)",
}


@pytest.mark.parametrize("edit", EVENT_EDITS, ids=list(EVENT_EDITS))
def test_an_edited_event_is_refused(
    path: Path, reopen: Callable[[], DecisionStore], edit: str
) -> None:
    raw(path, f"UPDATE events SET {EVENT_EDITS[edit]} WHERE event_id='ev-purchase'")
    row = row_of(path, "events", "rowid = (SELECT MIN(rowid) FROM events)")
    store = reopen()
    for read in (
        lambda: store.has_event(row["tenant"], row["pseudonym"], row["event_id"]),
        lambda: store.events(row["tenant"], row["pseudonym"]),
        store.event_keys,
    ):
        assert_tampered("events", read)


def test_swapped_event_blobs_are_refused(path: Path, reopen: Callable[[], DecisionStore]) -> None:
    raw(
        path,
        "CREATE TEMP TABLE s AS SELECT event_id, sealed FROM events",
        "UPDATE events SET sealed = (SELECT sealed FROM s WHERE s.event_id != events.event_id)",
    )
    assert_tampered("events", lambda: reopen().events(TENANT, BOB))


def test_an_event_copied_under_an_unseen_id_cannot_silence_it(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    """A copied row would make the real event, when it comes, a duplicate that raises no alert."""
    raw(
        path,
        "INSERT INTO events SELECT tenant, pseudonym, 'ev-next', occurred_at_us, sealed "
        "FROM events WHERE event_id='ev-purchase'",
    )
    assert_tampered("events", lambda: reopen().has_event(TENANT, BOB, "ev-next"))


def test_an_event_aged_by_editing_is_not_silently_forgotten(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    raw(path, "UPDATE events SET occurred_at_us = 0 WHERE event_id='ev-purchase'")
    store = reopen()
    assert_tampered(
        "events",
        lambda: store.record_event(TENANT, BOB, event("ev-new", 20), [], T0, T0),
    )
    assert row_of(path, "events", "event_id='ev-purchase'")["occurred_at_us"] == 0
    assert not store.has_event(TENANT, BOB, "ev-new")  # the transaction was rolled back


# -- alerts --------------------------------------------------------------------------------

ALERT_EDITS = {
    "sequence": "sequence = 7",
    "raised_at_us": "raised_at_us = raised_at_us + 1",
    "sealed": "sealed = CAST(substr(sealed, 1, 20) || X'ff' || substr(sealed, 22) AS BLOB)",
    "sealed in clear": "sealed = CAST('alert-2' AS BLOB)",
}


@pytest.mark.parametrize("edit", ALERT_EDITS, ids=list(ALERT_EDITS))
def test_an_edited_alert_is_refused(
    path: Path, reopen: Callable[[], DecisionStore], edit: str
) -> None:
    raw(path, f"UPDATE alerts SET {ALERT_EDITS[edit]} WHERE sequence=2")
    sequence = 7 if edit == "sequence" else 2
    store = reopen()
    for read in (
        lambda: store.alerts_after(0, 10),
        lambda: store.alerts_after(sequence - 1, 1),
        store.alert_rows,
    ):
        assert_tampered("alerts", read)
    if edit == "sequence":  # now the last: the stream must not resume after a forged number
        assert_tampered("alerts", store.last_alert_sequence)
        assert_tampered(
            "alerts", lambda: store.record_event(TENANT, BOB, event("ev-x", 6), [b"a"], T0, T0)
        )


def test_the_last_alert_is_checked_before_numbering_the_next(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    raw(path, "UPDATE alerts SET raised_at_us = 0 WHERE sequence=3")
    store = reopen()
    assert_tampered("alerts", store.last_alert_sequence)
    assert_tampered(
        "alerts", lambda: store.record_event(TENANT, BOB, event("ev-x", 6), [b"a"], T0, T0)
    )


def test_swapped_and_copied_alerts_are_refused(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    raw(
        path,
        "CREATE TEMP TABLE s AS SELECT sequence, sealed FROM alerts WHERE sequence IN (1, 2)",
        "UPDATE alerts SET sealed = (SELECT sealed FROM s WHERE s.sequence = 3 - alerts.sequence) "
        "WHERE sequence IN (1, 2)",
    )
    store = reopen()
    assert_tampered("alerts", lambda: store.alerts_after(0, 1))
    assert_tampered("alerts", lambda: store.alerts_after(1, 1))
    assert store.alerts_after(2, 10) == [(3, b"alert-3")]
    raw(path, "INSERT INTO alerts SELECT 9, raised_at_us, sealed FROM alerts WHERE sequence=3")
    assert_tampered("alerts", lambda: store.alerts_after(3, 10))
    assert_tampered("alerts", store.last_alert_sequence)


# -- schema ---------------------------------------------------------------------------------

V2_SCHEMA = """
CREATE TABLE limit_decisions (
    tenant TEXT NOT NULL, request_id TEXT NOT NULL, pseudonym TEXT NOT NULL,
    fingerprint TEXT NOT NULL, decided_at_us INTEGER NOT NULL, action TEXT NOT NULL,
    sealed BLOB NOT NULL, PRIMARY KEY (tenant, request_id)
);
CREATE INDEX limit_decisions_by_subject ON limit_decisions (tenant, pseudonym, decided_at_us);
CREATE TABLE events (
    tenant TEXT NOT NULL, pseudonym TEXT NOT NULL, event_id TEXT NOT NULL,
    occurred_at_us INTEGER NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (tenant, pseudonym, event_id)
);
CREATE INDEX events_by_time ON events (tenant, pseudonym, occurred_at_us);
CREATE TABLE alerts (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    raised_at_us INTEGER NOT NULL,
    alert BLOB NOT NULL
);
PRAGMA user_version=2;
"""
V2_LABEL = b"privscore.v1/store-row\x00"


def v2_seal(plaintext: bytes, *row_key: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(KEY).encrypt(nonce, plaintext, length_prefixed(V2_LABEL, *row_key))


def write_v2_store(path: Path, *, forged_limit: bool = False) -> None:
    """A store as version 2 wrote it: limit and event rows sealed to their key columns only,
    alerts in clear."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(V2_SCHEMA)
    increase = v2_seal(b"v2 increase", "limit", TENANT, "req-increase")
    db.execute(
        "INSERT INTO limit_decisions VALUES (?,?,?,?,?,?,?)",
        (TENANT, "req-increase", ALICE, "fp-1", to_us(T0), "INCREASE", increase),
    )
    hold = v2_seal(b"v2 hold", "limit", TENANT, "req-other" if forged_limit else "req-hold")
    db.execute(
        "INSERT INTO limit_decisions VALUES (?,?,?,?,?,?,?)",
        (TENANT, "req-hold", ALICE, "fp-2", to_us(T0) + 1, "HOLD", hold),
    )
    details = b'{"kind": "purchase", "currency": "CNY", "amount": 987654, "succeeded": null, '
    details += b'"days_past_due": null, "balance_after": null}'
    db.execute(
        "INSERT INTO events VALUES (?,?,?,?,?)",
        (
            TENANT,
            BOB,
            "ev-purchase",
            to_us(T0),
            v2_seal(details, "event", TENANT, BOB, "ev-purchase"),
        ),
    )
    for alert in (b"alert-1", b"alert-2"):
        db.execute("INSERT INTO alerts (raised_at_us, alert) VALUES (?, ?)", (to_us(T0), alert))
    db.close()


def test_a_version_2_store_is_resealed_under_every_column(tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite3"
    write_v2_store(path)
    store = DecisionStore(path, KEY)
    try:
        stored = store.limit_decision(TENANT, "req-increase")
        assert stored is not None and stored.response == b"v2 increase"
        assert stored.fingerprint == "fp-1"
        assert store.last_increase_at(TENANT, ALICE) == T0
        assert store.limit_decision_keys() == [(TENANT, "req-hold"), (TENANT, "req-increase")]
        assert store.events(TENANT, BOB) == [event("ev-purchase", 0)]
        assert store.alert_rows() == [(1, b"alert-1"), (2, b"alert-2")]
        assert store.record_event(TENANT, BOB, event("ev-2", 1), [b"alert-3"], T0, T0) == [3]
    finally:
        store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert [r[1] for r in db.execute("PRAGMA table_info(alerts)")] == [
        "sequence",
        "raised_at_us",
        "sealed",
    ]
    assert b"alert-1" not in b"".join(r[0] for r in db.execute("SELECT sealed FROM alerts"))
    db.close()
    # What v2 left unchecked is bound from now on.
    raw(path, "UPDATE limit_decisions SET action='HOLD' WHERE request_id='req-increase'")
    raw(path, "UPDATE alerts SET raised_at_us = 1 WHERE sequence = 1")
    store = DecisionStore(path, KEY)
    try:
        assert_tampered("limit_decisions", lambda: store.last_increase_at(TENANT, ALICE))
        assert_tampered("alerts", store.alert_rows)
    finally:
        store.close()


def test_a_version_2_row_that_does_not_open_stops_the_migration(tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite3"
    write_v2_store(path, forged_limit=True)
    assert_tampered("limit_decisions", lambda: DecisionStore(path, KEY))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2  # nothing half-migrated
    assert [r[1] for r in db.execute("PRAGMA table_info(alerts)")][-1] == "alert"
    db.close()


def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite3"
    raw(path, "PRAGMA user_version=7")
    with pytest.raises(StoreError, match="schema 7"):
        DecisionStore(path, KEY)


def test_text_that_is_not_utf8_is_refused_not_crashed_on(
    path: Path, reopen: Callable[[], DecisionStore]
) -> None:
    raw(path, "UPDATE limit_decisions SET action = CAST(X'ff' AS TEXT) WHERE request_id='req-hold'")
    raw(path, "UPDATE events SET tenant = CAST(X'ff' AS TEXT) WHERE event_id='ev-repay'")
    store = reopen()
    assert_tampered("limit_decisions", lambda: store.limit_decision(TENANT, "req-hold"))
    assert_tampered("limit_decisions", lambda: store.last_increase_at(TENANT, ALICE))
    assert_tampered("events", store.event_keys)


def test_an_alert_edited_to_resolved_cannot_lift_a_freeze(tmp_path: Path) -> None:
    """An unresolved CRITICAL alert freezes the subject's limit: editing its state row to
    RESOLVED must be caught, not taken as the alert's resolution."""
    path = tmp_path / "decisions.sqlite3"
    store = DecisionStore(path, KEY)
    try:
        [sequence] = store.record_event(
            TENANT, BOB, event("ev-missed", 0), [b"a critical alert"], T0, T0, ["CRITICAL"]
        )
        assert [a.alert_sequence for a in store.open_alerts(TENANT, BOB)] == [sequence]
    finally:
        store.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE alert_states SET state='RESOLVED' WHERE alert_sequence=?", (sequence,))
    db.close()
    store = DecisionStore(path, KEY)
    try:
        with pytest.raises(StoreTampered):
            store.open_alerts(TENANT, BOB)
    finally:
        store.close()
