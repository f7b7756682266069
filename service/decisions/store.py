"""The embedded decision store: SQLite under the data directory.

Holds limit decisions (for idempotency and cool-downs), customers' behaviour events (for the
rolling rules) and the numbered alert stream (for subscribers that resume). Subjects appear
only as tenant + pseudonym; no feature value is ever stored. Not thread-safe by design: the
servicers run every call on one dedicated thread, which also serialises writers.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from service.decisions.alert_rules import Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS limit_decisions (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    decided_at_us INTEGER NOT NULL,
    action TEXT NOT NULL,
    currency TEXT NOT NULL,
    previous_limit INTEGER NOT NULL,
    new_limit INTEGER NOT NULL,
    rule TEXT NOT NULL,
    response BLOB NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS limit_decisions_by_subject
    ON limit_decisions (tenant, pseudonym, decided_at_us);
CREATE TABLE IF NOT EXISTS events (
    tenant TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    event_id TEXT NOT NULL,
    occurred_at_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    currency TEXT,
    amount INTEGER,
    succeeded INTEGER,
    days_past_due INTEGER,
    balance_after INTEGER,
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


class DecisionStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit off (isolation_level=None + explicit BEGIN) so each change is one transaction
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- limits ---------------------------------------------------------------------------

    def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        row = self._db.execute(
            "SELECT fingerprint, response FROM limit_decisions WHERE tenant=? AND request_id=?",
            (tenant, request_id),
        ).fetchone()
        return StoredLimitDecision(row[0], row[1]) if row else None

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
        currency: str,
        previous_limit: int,
        new_limit: int,
        rule: str,
        response: bytes,
    ) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO limit_decisions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    tenant,
                    request_id,
                    pseudonym,
                    fingerprint,
                    to_us(decided_at),
                    action,
                    currency,
                    previous_limit,
                    new_limit,
                    rule,
                    response,
                ),
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
            "SELECT event_id, occurred_at_us, kind, currency, amount, succeeded, days_past_due, "
            "balance_after FROM events WHERE tenant=? AND pseudonym=? ORDER BY occurred_at_us",
            (tenant, pseudonym),
        ).fetchall()
        return [
            Event(
                r[0],
                from_us(r[1]),
                r[2],
                r[3],
                r[4],
                None if r[5] is None else bool(r[5]),
                r[6],
                r[7],
            )
            for r in rows
        ]

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
        with self._transaction():
            self._db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    tenant,
                    pseudonym,
                    event.event_id,
                    to_us(event.occurred_at),
                    event.kind,
                    event.currency,
                    event.amount,
                    None if event.succeeded is None else int(event.succeeded),
                    event.days_past_due,
                    event.balance_after,
                ),
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
