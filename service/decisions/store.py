"""The embedded decision store: SQLite under the data directory.

Holds limit decisions (for idempotency and cool-downs), customers' behaviour events (for the
rolling rules) and the numbered alert stream (for subscribers that resume). Subjects appear
only as tenant + pseudonym, and no feature value is ever stored. Amounts (limits, balances,
purchases) are account data of a person: they rest encrypted with AES-256-GCM under a state
key, so the file holds none in clear. Only what the queries need stays plain: keys, times, a
decision's action and fingerprint, an alert's sequence.

Every row is authenticated whole: its plain columns are the AES-GCM associated data of its
sealed blob (`_associated_data`, one function for the writer and the reader), so a row whose
columns or blob were edited, or which was copied under another key, fails to open and raises
StoreTampered. No query trusts a plain column it has not verified: rows are selected by their
plain columns, then each candidate is opened before anything is concluded from it. What
per-row authentication cannot see: a row deleted, or the whole file replaced by an older copy
of itself; the audit log is the record to reconcile against (`limit_decision_keys`,
`event_keys`, `alert_rows`). A row moved to another subject (its pseudonym edited) leaves that
subject's queries until it is read by its key or by those reconciliation reads.

Not thread-safe by design: the servicers run every call on one dedicated thread, which also
serialises writers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar, get_type_hints

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.decisions.alert_rules import Event
from service.files import private_file
from service.privacy.encoding import length_prefixed

_ROW_LABEL = b"privscore.v1/store-row/v3\x00"
_ROW_LABEL_V2 = b"privscore.v1/store-row\x00"  # read by the v2 -> v3 migration only
_NONCE_BYTES = 12
_TAG_BYTES = 16
SCHEMA_VERSION = 3
LIMIT_DECISIONS = "limit_decisions"
EVENTS = "events"
ALERTS = "alerts"
_ALERTS_TABLE = """
CREATE TABLE IF NOT EXISTS alerts (
    sequence INTEGER PRIMARY KEY,
    raised_at_us INTEGER NOT NULL,
    sealed BLOB NOT NULL  -- AES-GCM: the serialized Alert (without its sequence)
);
"""
SCHEMA = (
    """
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
"""
    + _ALERTS_TABLE
)


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


class StoreTampered(StoreError):
    """A row does not authenticate: edited, copied under another key, or another state key.

    The message names the table and the fault, never a value from the row. `table` lets the
    caller map it (DATA_LOSS) and audit it.
    """

    def __init__(self, table: str, problem: str) -> None:
        super().__init__(f"decision store table {table}: {problem}")
        self.table = table
        self.problem = problem


_DOES_NOT_OPEN = (
    "a row does not authenticate: its plain columns or sealed data were edited, "
    "it was copied under another key, or the state key is wrong"
)


# The plain columns of each table, in associated-data order. The same tuple is written to the
# columns and bound into the seal, and read back from the columns to open it.
class _LimitRow(NamedTuple):
    tenant: str
    request_id: str
    pseudonym: str
    fingerprint: str
    decided_at_us: int
    action: str


class _EventRow(NamedTuple):
    tenant: str
    pseudonym: str
    event_id: str
    occurred_at_us: int


class _AlertRow(NamedTuple):
    sequence: int
    raised_at_us: int


_Row = TypeVar("_Row", _LimitRow, _EventRow, _AlertRow)


def _table(name: str, kind: type[tuple[object, ...]]) -> tuple[str, tuple[type, ...]]:
    hints = get_type_hints(kind)
    return name, tuple(hints[column] for column in kind._fields)  # type: ignore[attr-defined]


_TABLES: dict[type[tuple[object, ...]], tuple[str, tuple[type, ...]]] = {
    _LimitRow: _table(LIMIT_DECISIONS, _LimitRow),
    _EventRow: _table(EVENTS, _EventRow),
    _AlertRow: _table(ALERTS, _AlertRow),
}


def table_columns(table: str) -> tuple[tuple[str, type], ...]:
    """The columns of store table `table` in order, with their Python types: the plain columns
    (times as `*_at_us` microseconds, ints), then `sealed` (bytes). KeyError for another name."""
    for kind, (name, types) in _TABLES.items():
        if name == table:
            names: tuple[str, ...] = kind._fields  # type: ignore[attr-defined]
            return (*zip(names, types, strict=True), ("sealed", bytes))
    raise KeyError(table)


def _associated_data(row: _LimitRow | _EventRow | _AlertRow) -> bytes:
    """The table's name and each plain column (integers in decimal), length-prefixed."""
    table, _ = _TABLES[type(row)]
    return length_prefixed(_ROW_LABEL, table, *(str(value) for value in row))


def _columns(kind: type[_LimitRow | _EventRow | _AlertRow]) -> str:
    return ", ".join(kind._fields)


def _typed(kind: type[_Row], values: Sequence[object]) -> _Row:
    """The row as read, refused if a column holds another type than the schema's (SQLite keeps
    e.g. a blob written into a TEXT column as a blob)."""
    table, types = _TABLES[kind]
    for column, value, expected in zip(kind._fields, values, types, strict=True):
        if type(value) is not expected:
            raise StoreTampered(table, f"a row's {column} column holds a value of the wrong type")
    return kind._make(values)


class _NotUtf8(bytes):
    """Text in the file that is not UTF-8, which nothing of ours writes: kept apart from str and
    bytes so that the type checks refuse it, where sqlite3 would fail the whole query."""


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _NotUtf8(data)  # type: ignore[return-value]


class DecisionStore:
    def __init__(self, path: Path, state_key: bytes) -> None:
        # 0600 before SQLite opens it: SQLite gives its -wal and -shm files the database's mode.
        private_file(path)
        self._aead = AESGCM(state_key)
        # autocommit off (isolation_level=None + explicit BEGIN) so each change is one transaction
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.text_factory = _text
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
        for leftover in ("-wal", "-shm"):  # kept from an older server's crash, maybe 0644
            private_file(path.with_name(path.name + leftover), create=False)
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 2:
                self._migrate_from_v2()
            elif version not in (0, SCHEMA_VERSION):
                raise StoreError(
                    f"{path} has store schema {version}, this server reads {SCHEMA_VERSION}"
                )
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    # -- sealing --------------------------------------------------------------------------

    def _seal(self, row: _LimitRow | _EventRow | _AlertRow, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, _associated_data(row))

    def _open(self, row: _LimitRow | _EventRow | _AlertRow, sealed: object) -> bytes:
        return self._decrypt(_TABLES[type(row)][0], sealed, _associated_data(row))

    def _decrypt(self, table: str, sealed: object, associated_data: bytes) -> bytes:
        if type(sealed) is not bytes or len(sealed) < _NONCE_BYTES + _TAG_BYTES:
            raise StoreTampered(table, "a row's sealed column is not a sealed value")
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise StoreTampered(table, _DOES_NOT_OPEN) from None

    def _select(
        self, kind: type[_Row], where: str, parameters: Sequence[object] = (), tail: str = ""
    ) -> list[tuple[_Row, object]]:
        """Rows of `kind`'s table as (plain columns, sealed blob), not yet opened."""
        table, _ = _TABLES[kind]
        rows = self._db.execute(
            f"SELECT {_columns(kind)}, sealed FROM {table} WHERE {where} {tail}", parameters
        ).fetchall()
        return [(_typed(kind, row[:-1]), row[-1]) for row in rows]

    def _opened(
        self, kind: type[_Row], where: str, parameters: Sequence[object] = (), tail: str = ""
    ) -> list[tuple[_Row, bytes]]:
        """Rows of `kind`'s table, each opened (so authenticated) with its plaintext."""
        return [
            (row, self._open(row, sealed))
            for row, sealed in self._select(kind, where, parameters, tail)
        ]

    def tampered_rows(self) -> list[tuple[str, int]]:
        """(table, SQLite rowid) of every row that fails its authentication, for `privscore
        store verify`: the rowid names the row without showing anything in it."""
        found = []
        for kind, (table, _) in _TABLES.items():
            query = f"SELECT rowid, {_columns(kind)}, sealed FROM {table}"  # type: ignore[arg-type]
            for rowid, *values, sealed in self._db.execute(query):
                try:
                    self._open(_typed(kind, values), sealed)  # type: ignore[type-var,arg-type]
                except StoreTampered:
                    found.append((table, int(rowid)))
        return found

    def stored_rows(self, table: str) -> Iterator[tuple[object, ...]]:
        """Every row of `table` as stored, in `table_columns` order (the plain columns, then
        the sealed blob untouched), each opened first: StoreTampered stops at a row that fails
        its authentication. For moving the store elsewhere (`privscore db import`)."""
        kind = next((k for k, (name, _) in _TABLES.items() if name == table), None)
        if kind is None:
            raise StoreError(f"no table {table}")
        columns = _columns(kind)  # type: ignore[arg-type]
        query = f"SELECT {columns}, sealed FROM {table} ORDER BY rowid"
        for *values, sealed in self._db.execute(query):
            row = _typed(kind, values)  # type: ignore[type-var]
            self._open(row, sealed)  # type: ignore[arg-type]
            yield (*row, sealed)

    def delete_rows(self, rows: Sequence[tuple[str, int]]) -> None:
        """Delete rows by (table, rowid): tampered ones, which the next start rebuilds from
        the audit log when the log records them."""
        tables = {table for table, _ in _TABLES.values()}
        with self._transaction():
            for table, rowid in rows:
                if table not in tables:
                    raise StoreError(f"no table {table}")
                self._db.execute(f"DELETE FROM {table} WHERE rowid=?", (rowid,))

    def _insert(self, row: _LimitRow | _EventRow | _AlertRow, plaintext: bytes) -> None:
        table, _ = _TABLES[type(row)]
        self._db.execute(
            f"INSERT INTO {table} ({_columns(type(row))}, sealed) "
            f"VALUES ({', '.join('?' * (len(row) + 1))})",
            (*row, self._seal(row, plaintext)),
        )

    # -- limits ---------------------------------------------------------------------------

    def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        rows = self._opened(_LimitRow, "tenant=? AND request_id=?", (tenant, request_id))
        if not rows:
            return None
        [(row, response)] = rows
        return StoredLimitDecision(row.fingerprint, response)

    def has_limit_decision(self, tenant: str, request_id: str) -> bool:
        """Whether an authentic decision is stored under this request id."""
        return self.limit_decision(tenant, request_id) is not None

    def last_increase_at(self, tenant: str, pseudonym: str) -> dt.datetime | None:
        """When this customer's limit was last increased. Every decision of the customer is
        opened, whatever its plain action and time say: a query over `action='INCREASE'` alone
        would never see an increase whose action was edited, nor notice its time moved."""
        rows = self._opened(_LimitRow, "tenant=? AND pseudonym=?", (tenant, pseudonym))
        increases = [row.decided_at_us for row, _ in rows if row.action == "INCREASE"]
        return from_us(max(increases)) if increases else None

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
        row = _LimitRow(tenant, request_id, pseudonym, fingerprint, to_us(decided_at), action)
        with self._transaction():
            self._insert(row, response)

    def limit_decision_keys(self) -> list[tuple[str, str]]:
        """(tenant, request_id) of every limit decision, each row authenticated, in key order:
        for reconciling the store with the audit log."""
        rows = self._opened(_LimitRow, "1", tail="ORDER BY tenant, request_id")
        return [(row.tenant, row.request_id) for row, _ in rows]

    # -- behaviour events and alerts ------------------------------------------------------

    def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool:
        """Whether an authentic event is stored under this id: a row copied under the id of an
        event not yet seen would otherwise make that event a silent duplicate."""
        return bool(
            self._opened(
                _EventRow, "tenant=? AND pseudonym=? AND event_id=?", (tenant, pseudonym, event_id)
            )
        )

    def events(self, tenant: str, pseudonym: str) -> list[Event]:
        rows = self._opened(
            _EventRow, "tenant=? AND pseudonym=?", (tenant, pseudonym), "ORDER BY occurred_at_us"
        )
        return [
            Event(event_id=row.event_id, occurred_at=from_us(row.occurred_at_us), **json.loads(p))
            for row, p in rows
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

        Alerts are stored without their sequence, which is the row's key (and bound into its
        seal).

        Events older than `forget_before` (event time) are dropped for this customer, once each
        has been authenticated: an edited time must not silently erase a row.
        """
        details = {
            "kind": event.kind,
            "currency": event.currency,
            "amount": event.amount,
            "succeeded": event.succeeded,
            "days_past_due": event.days_past_due,
            "balance_after": event.balance_after,
        }
        row = _EventRow(tenant, pseudonym, event.event_id, to_us(event.occurred_at))
        with self._transaction():
            self._insert(row, json.dumps(details).encode("utf-8"))
            sequences = self._insert_alerts(alerts, raised_at)
            where = "tenant=? AND pseudonym=? AND occurred_at_us < ?"
            old = (tenant, pseudonym, to_us(forget_before))
            self._opened(_EventRow, where, old)
            self._db.execute(f"DELETE FROM events WHERE {where}", old)
        return sequences

    def record_alerts(self, alerts: list[bytes], raised_at: dt.datetime) -> list[int]:
        """Store alerts alone (restoring those an audit record holds); their sequences."""
        with self._transaction():
            return self._insert_alerts(alerts, raised_at)

    def _insert_alerts(self, alerts: list[bytes], raised_at: dt.datetime) -> list[int]:
        # Inside a write transaction. The sequence is bound into the seal, so it is chosen
        # before sealing: MAX+1, read inside the BEGIN IMMEDIATE transaction. The store has one
        # writer (one process, one store thread, and the write lock held from BEGIN), so no one
        # else can take the same number; and every row is sealed from its first write, which
        # insert-then-update (a placeholder row, then its seal) would not give. The last row is
        # opened first, so an edited sequence is caught instead of continued from.
        sequence = self._last_alert_sequence()
        sequences = []
        for alert in alerts:
            sequence += 1
            self._insert(_AlertRow(sequence, to_us(raised_at)), alert)
            sequences.append(sequence)
        return sequences

    def event_keys(self) -> list[tuple[str, str, str]]:
        """(tenant, pseudonym, event_id) of every stored event, each row authenticated."""
        rows = self._opened(_EventRow, "1", tail="ORDER BY tenant, pseudonym, event_id")
        return [(row.tenant, row.pseudonym, row.event_id) for row, _ in rows]

    def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` alerts after `sequence`: (sequence, serialized Alert), authenticated."""
        rows = self._opened(
            _AlertRow, "sequence > ?", (sequence, limit), "ORDER BY sequence LIMIT ?"
        )
        return [(row.sequence, alert) for row, alert in rows]

    def alert_rows(self) -> list[tuple[int, bytes]]:
        """Every alert as (sequence, serialized Alert), each row authenticated."""
        rows = self._opened(_AlertRow, "1", tail="ORDER BY sequence")
        return [(row.sequence, alert) for row, alert in rows]

    def last_alert_sequence(self) -> int:
        """The highest sequence given to an alert (0 if none), its row authenticated."""
        return self._last_alert_sequence()

    def _last_alert_sequence(self) -> int:
        rows = self._opened(_AlertRow, "1", tail="ORDER BY sequence DESC LIMIT 1")
        return rows[0][0].sequence if rows else 0

    # -- schema ---------------------------------------------------------------------------

    def _migrate_from_v2(self) -> None:
        """Re-seal every row of a version-2 store under the version-3 associated data, in one
        transaction with the version bump.

        Version 2 bound only the key columns into a row's seal (limits: tenant, request id;
        events: tenant, pseudonym, event id) and left alerts unsealed. The migration trusts what
        version 2 could not check: a v2 row's plain columns (pseudonym, fingerprint, times,
        action) and its alert blobs are taken as they are and bound from here on. A v2 row
        whose key-bound seal does not open stops the migration with StoreTampered.
        """
        with self._transaction():
            limits = self._select(_LimitRow, "1")
            for row, sealed in limits:
                response = self._decrypt(
                    LIMIT_DECISIONS,
                    sealed,
                    length_prefixed(_ROW_LABEL_V2, "limit", row.tenant, row.request_id),
                )
                self._db.execute(
                    "UPDATE limit_decisions SET sealed=? WHERE tenant=? AND request_id=?",
                    (self._seal(row, response), row.tenant, row.request_id),
                )
            for event, sealed in self._select(_EventRow, "1"):
                details = self._decrypt(
                    EVENTS,
                    sealed,
                    length_prefixed(
                        _ROW_LABEL_V2, "event", event.tenant, event.pseudonym, event.event_id
                    ),
                )
                self._db.execute(
                    "UPDATE events SET sealed=? WHERE tenant=? AND pseudonym=? AND event_id=?",
                    (self._seal(event, details), event.tenant, event.pseudonym, event.event_id),
                )
            # v2's alerts table held the Alert in clear in an `alert` column: build v3's beside
            # it, seal each alert into it, and put it in its place.
            alerts = self._db.execute(
                "SELECT sequence, raised_at_us, alert FROM alerts ORDER BY sequence"
            ).fetchall()
            self._db.execute("ALTER TABLE alerts RENAME TO alerts_v2")
            self._db.execute(_ALERTS_TABLE)
            for values in alerts:
                blob = values[2]
                if type(blob) is not bytes:
                    raise StoreTampered(ALERTS, "a v2 alert is not a serialized message")
                self._insert(_typed(_AlertRow, values[:2]), blob)
            self._db.execute("DROP TABLE alerts_v2")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
