"""The embedded decision store: SQLite under the data directory.

Holds limit decisions (for idempotency and cool-downs), customers' behaviour events (for the
rolling rules) and the numbered alert stream (for subscribers that resume). Subjects appear
only as tenant + pseudonym, and no feature value is ever stored. Amounts (limits, balances,
purchases) are account data of a person: they rest encrypted with AES-256-GCM under a state
key, bound to their row, so the file holds none in clear. Only what the queries need stays
plain: keys, times, and a decision's action. Not thread-safe by design: the servicers run
every call on one dedicated thread, which also serialises writers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.decisions.alert_rules import Event
from service.privacy.encoding import length_prefixed

_ROW_LABEL = b"privscore.v1/store-row\x00"
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS limit_decisions (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    decided_at_us INTEGER NOT NULL,
    action TEXT NOT NULL,
    sealed BLOB NOT NULL,  -- AES-GCM: the response (limits, rule, reasons)
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS limit_decisions_by_subject
    ON limit_decisions (tenant, pseudonym, decided_at_us);
CREATE TABLE IF NOT EXISTS events (
    tenant TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    event_id TEXT NOT NULL,
    occurred_at_us INTEGER NOT NULL,
    sealed BLOB NOT NULL,  -- AES-GCM: kind, currency, amounts, outcome, days past due
    PRIMARY KEY (tenant, pseudonym, event_id)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (tenant, pseudonym, occurred_at_us);
CREATE TABLE IF NOT EXISTS alerts (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    raised_at_us INTEGER NOT NULL,
    alert BLOB NOT NULL
);
"""


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def to_us(moment: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return (moment - _EPOCH) // _MICROSECOND


def from_us(micros: int) -> dt.datetime:
    return _EPOCH + micros * _MICROSECOND


@dataclass(frozen=True)
class StoredLimitDecision:
    fingerprint: str
    response: bytes


class StoreError(RuntimeError):
    """The store file is of another schema version, or a row does not open with the key."""


class DecisionStore:
    def __init__(self, path: Path, state_key: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._aead = AESGCM(state_key)
        # autocommit off (isolation_level=None + explicit BEGIN) so each change is one transaction
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise StoreError(
                f"{path} has store schema {version}, this server reads {SCHEMA_VERSION}"
            )
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _seal(self, row_key: tuple[str, ...], plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, length_prefixed(_ROW_LABEL, *row_key))

    def _open(self, row_key: tuple[str, ...], sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                sealed[:12], sealed[12:], length_prefixed(_ROW_LABEL, *row_key)
            )
        except InvalidTag:
            raise StoreError(
                "a stored row does not open: wrong state key or tampered store"
            ) from None

    def close(self) -> None:
        self._db.close()

    # -- limits ---------------------------------------------------------------------------

    def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        row = self._db.execute(
            "SELECT fingerprint, sealed FROM limit_decisions WHERE tenant=? AND request_id=?",
            (tenant, request_id),
        ).fetchone()
        if row is None:
            return None
        return StoredLimitDecision(row[0], self._open(("limit", tenant, request_id), row[1]))

    def last_increase_at(self, tenant: str, pseudonym: str) -> dt.datetime | None:
        row = self._db.execute(
            "SELECT MAX(decided_at_us) FROM limit_decisions "
            "WHERE tenant=? AND pseudonym=? AND action='INCREASE'",
            (tenant, pseudonym),
        ).fetchone()
        return from_us(row[0]) if row and row[0] is not None else None

    def record_limit_decision(
        self,
        *,
        tenant: str,
        pseudonym: str,
        request_id: str,
        fingerprint: str,
        decided_at: dt.datetime,
        action: str,
        response: bytes,
    ) -> None:
        """Store a decision: its serialized response sealed, its action plain for cool-downs."""
        sealed = self._seal(("limit", tenant, request_id), response)
        with self._transaction():
            self._db.execute(
                "INSERT INTO limit_decisions VALUES (?,?,?,?,?,?,?)",
                (tenant, request_id, pseudonym, fingerprint, to_us(decided_at), action, sealed),
            )

    # -- behaviour events and alerts ------------------------------------------------------

    def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM events WHERE tenant=? AND pseudonym=? AND event_id=?",
            (tenant, pseudonym, event_id),
        ).fetchone()
        return row is not None

    def events(self, tenant: str, pseudonym: str) -> list[Event]:
        rows = self._db.execute(
            "SELECT event_id, occurred_at_us, sealed FROM events "
            "WHERE tenant=? AND pseudonym=? ORDER BY occurred_at_us",
            (tenant, pseudonym),
        ).fetchall()
        events = []
        for event_id, occurred_at_us, sealed in rows:
            details = json.loads(self._open(("event", tenant, pseudonym, event_id), sealed))
            events.append(Event(event_id=event_id, occurred_at=from_us(occurred_at_us), **details))
        return events

    def record_event(
        self,
        tenant: str,
        pseudonym: str,
        event: Event,
        alerts: list[bytes],
        raised_at: dt.datetime,
        forget_before: dt.datetime,
    ) -> list[int]:
        """Store the event and its alerts in one transaction; returns the alerts' sequences.

        Alerts are stored without their sequence, which is the row's key.

        Events older than `forget_before` (event time) are dropped for this customer.
        """
        details = {
            "kind": event.kind,
            "currency": event.currency,
            "amount": event.amount,
            "succeeded": event.succeeded,
            "days_past_due": event.days_past_due,
            "balance_after": event.balance_after,
        }
        sealed = self._seal(
            ("event", tenant, pseudonym, event.event_id), json.dumps(details).encode("utf-8")
        )
        with self._transaction():
            self._db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?)",
                (tenant, pseudonym, event.event_id, to_us(event.occurred_at), sealed),
            )
            sequences = []
            for alert in alerts:
                cursor = self._db.execute(
                    "INSERT INTO alerts (raised_at_us, alert) VALUES (?, ?)",
                    (to_us(raised_at), alert),
                )
                assert cursor.lastrowid is not None
                sequences.append(cursor.lastrowid)
            self._db.execute(
                "DELETE FROM events WHERE tenant=? AND pseudonym=? AND occurred_at_us < ?",
                (tenant, pseudonym, to_us(forget_before)),
            )
        return sequences

    def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        return list(
            self._db.execute(
                "SELECT sequence, alert FROM alerts WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (sequence, limit),
            )
        )

    def last_alert_sequence(self) -> int:
        row = self._db.execute("SELECT MAX(sequence) FROM alerts").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
