"""The embedded decision store: SQLite under the data directory.

Holds limit decisions (for idempotency and cool-downs), customers' behaviour events (for the
rolling rules) and the numbered alert stream (for subscribers that resume). Subjects appear
only as tenant + pseudonym, and no feature value is ever stored. Amounts (limits, balances,
purchases) are account data of a person: they rest encrypted with AES-256-GCM under a state
key, so the file holds none in clear. Only what the queries need stays plain: keys, times, a
decision's action and fingerprint, an alert's sequence.

Every row is authenticated whole: its plain columns are the AES-GCM associated data of its
sealed blob (`associated_data`, one function for the writer and the reader), so a row whose
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
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError

from privscore.client.encoding import length_prefixed
from privscore.v1 import alert_service_pb2
from service.decisions.alert_rules import Event
from service.decisions.rows import (
    ALERTS,
    EVENTS,
    LIMIT_DECISIONS,
    ROW_LABEL_V2,
    TABLES,
    AlertRow,
    AlertStateRow,
    AnyRow,
    EventRow,
    LimitRow,
    OpenAlert,
    RecordedScore,
    Row,
    RowSealer,
    ScoreRow,
    StoredLimitDecision,
    StoreError,
    StoreTampered,
    SubjectKeyRow,
    columns,
    event_details,
    event_of,
    from_us,
    table_columns,
    table_of,
    to_us,
    typed,
)
from service.files import private_file

__all__ = [  # what the store's callers import from here
    "ALERTS",
    "EVENTS",
    "LIMIT_DECISIONS",
    "DecisionStore",
    "StoreError",
    "StoreTampered",
    "StoredLimitDecision",
    "from_us",
    "table_columns",
    "to_us",
]

SCHEMA_VERSION = 4
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
    + """
CREATE TABLE IF NOT EXISTS scores (
    tenant TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    scored_at_us INTEGER NOT NULL,
    sealed BLOB NOT NULL,  -- AES-GCM: score, grade, decision, model version
    PRIMARY KEY (tenant, pseudonym)
);
CREATE TABLE IF NOT EXISTS alert_states (
    alert_sequence INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    changed_at_us INTEGER NOT NULL,
    sealed BLOB NOT NULL  -- AES-GCM: the last change's reason code
);
CREATE INDEX IF NOT EXISTS alert_states_by_subject ON alert_states (tenant, pseudonym, state);
CREATE TABLE IF NOT EXISTS subject_keys (
    tenant TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    period TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    created_at_us INTEGER NOT NULL,
    sealed BLOB NOT NULL,  -- AES-GCM: the subject's key for the period
    PRIMARY KEY (tenant, pseudonym, period)
);
"""
)
# Alert states as the wire names them, without the enum's prefix.
OPEN, ACKNOWLEDGED, RESOLVED = "OPEN", "ACKNOWLEDGED", "RESOLVED"
# An erased alert keeps its place in the stream (subscribers resume across it) as an empty
# message: no subject, rule or reason is left.
ERASED_ALERT = b""


def severity_of(alert: alert_service_pb2.Alert) -> str:
    """An alert's severity as the state rows keep it, e.g. CRITICAL."""
    return alert_service_pb2.Severity.Name(alert.severity).removeprefix("SEVERITY_")


def raised_state(blob: bytes) -> tuple[str, str, str]:
    """(tenant, pseudonym, severity) of a raised alert as stored."""
    alert = alert_service_pb2.Alert.FromString(blob)
    return alert.subject.tenant, alert.subject.pseudonym, severity_of(alert)


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
        self._rows = RowSealer(state_key)
        # Before SQLite opens anything: closing a descriptor of a file drops every POSIX lock
        # this process holds on it, and SQLite's on the -shm file are what tell another
        # process (a reviewer's `audit replay` beside the server) it is not alone, which
        # would otherwise reset the shared index under it (SIGBUS). SQLite's "How To Corrupt".
        for leftover in ("-wal", "-shm"):  # kept from an older server's crash, maybe 0644
            private_file(path.with_name(path.name + leftover), create=False)
        # autocommit off (isolation_level=None + explicit BEGIN) so each change is one transaction
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.text_factory = _text
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed decision survives power loss
        # What erasure and retention delete is overwritten, not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 2:
                self._migrate_from_v2()
            if version in (2, 3):
                self._db.executescript(SCHEMA)
                self._migrate_from_v3()
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

    def _seal(self, row: AnyRow, plaintext: bytes) -> bytes:
        return self._rows.seal(row, plaintext)

    def _open(self, row: AnyRow, sealed: object) -> bytes:
        return self._rows.open(row, sealed)

    def _decrypt(self, table: str, sealed: object, associated_data: bytes) -> bytes:
        return self._rows.decrypt(table, sealed, associated_data)

    def _select(
        self, kind: type[Row], where: str, parameters: Sequence[object] = (), tail: str = ""
    ) -> list[tuple[Row, object]]:
        """Rows of `kind`'s table as (plain columns, sealed blob), not yet opened."""
        table, _ = TABLES[kind]
        rows = self._db.execute(
            f"SELECT {columns(kind)}, sealed FROM {table} WHERE {where} {tail}", parameters
        ).fetchall()
        return [(typed(kind, row[:-1]), row[-1]) for row in rows]

    def _opened(
        self, kind: type[Row], where: str, parameters: Sequence[object] = (), tail: str = ""
    ) -> list[tuple[Row, bytes]]:
        """Rows of `kind`'s table, each opened (so authenticated) with its plaintext."""
        return [
            (row, self._open(row, sealed))
            for row, sealed in self._select(kind, where, parameters, tail)
        ]

    def tampered_rows(self) -> list[tuple[str, int]]:
        """(table, SQLite rowid) of every row that fails its authentication, for `privscore
        store verify`: the rowid names the row without showing anything in it."""
        found = []
        for kind, (table, _) in TABLES.items():
            query = f"SELECT rowid, {columns(kind)}, sealed FROM {table}"  # type: ignore[arg-type]
            for rowid, *values, sealed in self._db.execute(query):
                try:
                    self._open(typed(kind, values), sealed)  # type: ignore[type-var,arg-type]
                except StoreTampered:
                    found.append((table, int(rowid)))
        return found

    def stored_rows(self, table: str) -> Iterator[tuple[object, ...]]:
        """Every row of `table` as stored, in `table_columns` order (the plain columns, then
        the sealed blob untouched), each opened first: StoreTampered stops at a row that fails
        its authentication. For moving the store elsewhere (`privscore db import`)."""
        kind = table_of(table)
        query = f"SELECT {columns(kind)}, sealed FROM {table} ORDER BY rowid"
        for *values, sealed in self._db.execute(query):
            row = typed(kind, values)  # type: ignore[type-var]
            self._open(row, sealed)
            yield (*row, sealed)

    def delete_rows(self, rows: Sequence[tuple[str, int]]) -> None:
        """Delete rows by (table, rowid): tampered ones, which the next start rebuilds from
        the audit log when the log records them."""
        tables = {table for table, _ in TABLES.values()}
        with self._transaction():
            for table, rowid in rows:
                if table not in tables:
                    raise StoreError(f"no table {table}")
                self._db.execute(f"DELETE FROM {table} WHERE rowid=?", (rowid,))

    def _insert(self, row: AnyRow, plaintext: bytes) -> None:
        table, _ = TABLES[type(row)]
        self._db.execute(
            f"INSERT INTO {table} ({columns(type(row))}, sealed) "
            f"VALUES ({', '.join('?' * (len(row) + 1))})",
            (*row, self._seal(row, plaintext)),
        )

    # -- limits ---------------------------------------------------------------------------

    def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        rows = self._opened(LimitRow, "tenant=? AND request_id=?", (tenant, request_id))
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
        rows = self._opened(LimitRow, "tenant=? AND pseudonym=?", (tenant, pseudonym))
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
        row = LimitRow(tenant, request_id, pseudonym, fingerprint, to_us(decided_at), action)
        with self._transaction():
            self._insert(row, response)

    def limit_decision_keys(self) -> list[tuple[str, str]]:
        """(tenant, request_id) of every limit decision, each row authenticated, in key order:
        for reconciling the store with the audit log."""
        rows = self._opened(LimitRow, "1", tail="ORDER BY tenant, request_id")
        return [(row.tenant, row.request_id) for row, _ in rows]

    # -- behaviour events and alerts ------------------------------------------------------

    def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool:
        """Whether an authentic event is stored under this id: a row copied under the id of an
        event not yet seen would otherwise make that event a silent duplicate."""
        return bool(
            self._opened(
                EventRow, "tenant=? AND pseudonym=? AND event_id=?", (tenant, pseudonym, event_id)
            )
        )

    def events(self, tenant: str, pseudonym: str) -> list[Event]:
        rows = self._opened(
            EventRow, "tenant=? AND pseudonym=?", (tenant, pseudonym), "ORDER BY occurred_at_us"
        )
        return [event_of(row, plaintext) for row, plaintext in rows]

    def record_event(
        self,
        tenant: str,
        pseudonym: str,
        event: Event,
        alerts: list[bytes],
        raised_at: dt.datetime,
        forget_before: dt.datetime,
        severities: Sequence[str] = (),
    ) -> list[int]:
        """Store the event and its alerts in one transaction; returns the alerts' sequences.
        With `severities` (one per alert: `severity_of`), each alert also gets its open state
        under this subject, which limit decisions read.

        Alerts are stored without their sequence, which is the row's key (and bound into its
        seal).

        Events older than `forget_before` (event time) are dropped for this customer, once each
        has been authenticated: an edited time must not silently erase a row.
        """
        row = EventRow(tenant, pseudonym, event.event_id, to_us(event.occurred_at))
        with self._transaction():
            self._insert(row, event_details(event))
            sequences = self._insert_alerts(alerts, raised_at)
            for sequence, severity in zip(sequences, severities, strict=False):
                self._insert_state(sequence, tenant, pseudonym, severity, raised_at)
            where = "tenant=? AND pseudonym=? AND occurred_at_us < ?"
            old = (tenant, pseudonym, to_us(forget_before))
            self._opened(EventRow, where, old)
            self._db.execute(f"DELETE FROM events WHERE {where}", old)
        return sequences

    def record_alerts(self, alerts: list[bytes], raised_at: dt.datetime) -> list[int]:
        """Store alerts alone (restoring those an audit record holds), each open under its
        subject; their sequences."""
        with self._transaction():
            sequences = self._insert_alerts(alerts, raised_at)
            for sequence, blob in zip(sequences, alerts, strict=True):
                self._insert_state(sequence, *raised_state(blob), raised_at)
            return sequences

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
            self._insert(AlertRow(sequence, to_us(raised_at)), alert)
            sequences.append(sequence)
        return sequences

    def _insert_state(
        self,
        sequence: int,
        tenant: str,
        pseudonym: str,
        severity: str,
        raised_at: dt.datetime,
    ) -> None:
        """A raised alert's state row: open, under its subject and severity."""
        self._insert(
            AlertStateRow(sequence, tenant, pseudonym, severity, OPEN, to_us(raised_at)), b""
        )

    def event_keys(self) -> list[tuple[str, str, str]]:
        """(tenant, pseudonym, event_id) of every stored event, each row authenticated."""
        rows = self._opened(EventRow, "1", tail="ORDER BY tenant, pseudonym, event_id")
        return [(row.tenant, row.pseudonym, row.event_id) for row, _ in rows]

    def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` alerts after `sequence`: (sequence, serialized Alert), authenticated."""
        rows = self._opened(
            AlertRow, "sequence > ?", (sequence, limit), "ORDER BY sequence LIMIT ?"
        )
        return [(row.sequence, alert) for row, alert in rows]

    def alert_rows(self) -> list[tuple[int, bytes]]:
        """Every alert as (sequence, serialized Alert), each row authenticated."""
        rows = self._opened(AlertRow, "1", tail="ORDER BY sequence")
        return [(row.sequence, alert) for row, alert in rows]

    def last_alert_sequence(self) -> int:
        """The highest sequence given to an alert (0 if none), its row authenticated."""
        return self._last_alert_sequence()

    def _last_alert_sequence(self) -> int:
        rows = self._opened(AlertRow, "1", tail="ORDER BY sequence DESC LIMIT 1")
        return rows[0][0].sequence if rows else 0

    # -- recorded scores ------------------------------------------------------------------

    def latest_score(self, tenant: str, pseudonym: str) -> RecordedScore | None:
        rows = self._opened(ScoreRow, "tenant=? AND pseudonym=?", (tenant, pseudonym))
        return RecordedScore.opened(*rows[0]) if rows else None

    def record_scores(self, scores: Sequence[tuple[str, str, RecordedScore]]) -> None:
        """Keep each subject's latest Score decision, several calls' in one transaction (one
        fsync); a later one already stored wins. The stored row is not opened first: an edited
        `scored_at_us` that held a newer score back would fail its authentication at the next
        read (`latest_score`), which refuses the call rather than decide on it."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO scores (tenant, pseudonym, decision_id, scored_at_us, sealed) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, pseudonym) DO UPDATE SET "
                "decision_id = excluded.decision_id, scored_at_us = excluded.scored_at_us, "
                "sealed = excluded.sealed WHERE excluded.scored_at_us >= scores.scored_at_us",
                [
                    (*row, self._seal(row, score.sealed()))
                    for tenant, pseudonym, score in scores
                    for row in (score.row(tenant, pseudonym),)
                ],
            )

    # -- alert states ---------------------------------------------------------------------

    def open_alerts(self, tenant: str, pseudonym: str) -> list[OpenAlert]:
        """The subject's alerts not yet resolved, each row authenticated."""
        # Every state row of the subject is opened, then filtered: selecting on the plain
        # state column alone would never see a row whose state was edited to RESOLVED, which
        # would lift a freeze unnoticed.
        rows = self._opened(
            AlertStateRow,
            "tenant=? AND pseudonym=?",
            (tenant, pseudonym),
            "ORDER BY alert_sequence",
        )
        return [
            OpenAlert(row.alert_sequence, row.severity, row.state)
            for row, _ in rows
            if row.state != RESOLVED
        ]

    def alert_state(self, alert_sequence: int) -> tuple[AlertStateRow, bytes] | None:
        """An alert's state row and its stored message as raised, both authenticated."""
        states = self._opened(AlertStateRow, "alert_sequence=?", (alert_sequence,))
        raised = self._opened(AlertRow, "sequence=?", (alert_sequence,))
        if not states or not raised:
            return None
        return states[0][0], raised[0][1]

    def record_alert_update(
        self, alert_sequence: int, state: str, changed_at: dt.datetime, update: bytes
    ) -> int:
        """Move an alert to `state` and append the change to the stream; its stream sequence.
        StoreError if the alert is unknown or resolved meanwhile (the servicer checks first)."""
        with self._transaction():
            found = self._opened(AlertStateRow, "alert_sequence=?", (alert_sequence,))
            if not found or found[0][0].state == RESOLVED:
                raise StoreError(f"alert {alert_sequence} is not open")
            row = found[0][0]._replace(state=state, changed_at_us=to_us(changed_at))
            self._db.execute("DELETE FROM alert_states WHERE alert_sequence=?", (alert_sequence,))
            self._insert(row, b"")
            sequence = self._last_alert_sequence() + 1
            self._insert(AlertRow(sequence, to_us(changed_at)), update)
        return sequence

    # -- subject keys ---------------------------------------------------------------------

    def subject_keys(
        self,
        wanted: Sequence[tuple[str, str, str]],
        new_key: Callable[[], tuple[str, bytes]],
    ) -> list[tuple[str, bytes]]:
        """`subject_key` for several (tenant, pseudonym, period), the new ones made in one
        transaction (one fsync however many)."""
        found: dict[tuple[str, str, str], tuple[str, bytes]] = {}
        for tenant, pseudonym, period in set(wanted):
            rows = self._opened(
                SubjectKeyRow,
                "tenant=? AND pseudonym=? AND period=?",
                (tenant, pseudonym, period),
            )
            if rows:
                found[(tenant, pseudonym, period)] = (rows[0][0].key_id, rows[0][1])
        missing = sorted(set(wanted) - found.keys())
        if missing:
            now = to_us(dt.datetime.now(dt.UTC))
            with self._transaction():
                for tenant, pseudonym, period in missing:
                    key_id, key = new_key()
                    self._insert(SubjectKeyRow(tenant, pseudonym, period, key_id, now), key)
                    found[(tenant, pseudonym, period)] = (key_id, key)
        return [found[key] for key in wanted]

    def key_ids_of_pseudonym(self, pseudonym: str) -> list[str]:
        """The ids of every key of a pseudonym, whatever its tenant (`audit show --subject`)."""
        rows = self._opened(SubjectKeyRow, "pseudonym=?", (pseudonym,), "ORDER BY period")
        return [row.key_id for row, _ in rows]

    def subjects_of_keys(self) -> dict[str, tuple[str, str]]:
        """Every subject key's id with its (tenant, pseudonym), each row authenticated: how
        the start-up reconciliation names the subject of a record."""
        rows = self._opened(SubjectKeyRow, "1")
        return {row.key_id: (row.tenant, row.pseudonym) for row, _ in rows}

    def key_by_id(self, key_id: str) -> tuple[SubjectKeyRow, bytes] | None:
        """A subject key by its id, or None once destroyed (erased or expired)."""
        found = self._opened(SubjectKeyRow, "key_id=?", (key_id,))
        return found[0] if found else None

    def subject_key_ids(self, tenant: str, pseudonym: str) -> list[str]:
        """The ids of every key the subject has, oldest period first."""
        rows = self._opened(
            SubjectKeyRow, "tenant=? AND pseudonym=?", (tenant, pseudonym), "ORDER BY period"
        )
        return [row.key_id for row, _ in rows]

    def erase_subject(self, tenant: str, pseudonym: str) -> dict[str, int]:
        """Delete the subject's rows and destroy its keys, in one transaction: events, limit
        decisions, the recorded score, alert states; the subject's alerts keep their place in
        the stream as empty messages. Each row is authenticated before it goes. Counts by
        table. SQLite's secure_delete overwrites what is deleted."""
        subject = (tenant, pseudonym)
        where = "tenant=? AND pseudonym=?"
        with self._transaction():
            states = self._opened(AlertStateRow, where, subject)
            counts = {
                "events": len(self._opened(EventRow, where, subject)),
                "limit_decisions": len(self._opened(LimitRow, where, subject)),
                "scores": len(self._opened(ScoreRow, where, subject)),
                "subject_keys": len(self._opened(SubjectKeyRow, where, subject)),
                "alerts": 0,
            }
            for table in (EVENTS, LIMIT_DECISIONS, "scores", "alert_states", "subject_keys"):
                self._db.execute(f"DELETE FROM {table} WHERE {where}", subject)
            counts["alerts"] = self._erase_alerts({state.alert_sequence for state, _ in states})
        # Deleted pages are overwritten in the database file; the write-ahead log still holds
        # their last contents until it is checkpointed, so checkpoint it now.
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return counts

    def _erase_alerts(self, alert_sequences: set[int]) -> int:
        """Blank alerts and their state changes in place, in one pass from the oldest (a change
        names its alert by `alert_sequence`, which needs opening, so changes are found by
        reading every row from the first raised one on)."""
        if not alert_sequences:
            return 0
        blanked = 0
        for row, blob in self._opened(AlertRow, "sequence >= ?", (min(alert_sequences),)):
            if not blob:
                continue
            alert = alert_service_pb2.Alert.FromString(blob)
            if row.sequence in alert_sequences or alert.alert_sequence in alert_sequences:
                self._db.execute("DELETE FROM alerts WHERE sequence=?", (row.sequence,))
                self._insert(row, ERASED_ALERT)
                blanked += 1
        return blanked

    def expired_key_ids(self, before_period: str) -> list[tuple[str, str, str]]:
        """(tenant, pseudonym, key id) of keys of periods before `before_period` (YYYY-MM)."""
        rows = self._opened(SubjectKeyRow, "period < ?", (before_period,), "ORDER BY period")
        return [(row.tenant, row.pseudonym, row.key_id) for row, _ in rows]

    def destroy_keys(self, key_ids: Sequence[str], before: dt.datetime) -> int:
        """Retention expiry: destroy subject keys by id, and forget the rows of decisions made
        before `before` (limit decisions, recorded scores, resolved alerts' states; alerts
        blanked in place), as those keys' records become unreadable; how many keys."""
        cut = (to_us(before),)
        with self._transaction():
            destroyed = 0
            for key_id in key_ids:
                destroyed += self._db.execute(
                    "DELETE FROM subject_keys WHERE key_id=?", (key_id,)
                ).rowcount
            # Each row is authenticated before it goes: an edited time must not erase it.
            self._opened(LimitRow, "decided_at_us < ?", cut)
            self._db.execute("DELETE FROM limit_decisions WHERE decided_at_us < ?", cut)
            self._opened(ScoreRow, "scored_at_us < ?", cut)
            self._db.execute("DELETE FROM scores WHERE scored_at_us < ?", cut)
            old = self._opened(AlertStateRow, "changed_at_us < ? AND state = ?", (*cut, RESOLVED))
            self._erase_alerts({state.alert_sequence for state, _ in old})
            for state, _ in old:
                self._db.execute(
                    "DELETE FROM alert_states WHERE alert_sequence=?", (state.alert_sequence,)
                )
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return destroyed

    # -- schema ---------------------------------------------------------------------------

    def _migrate_from_v3(self) -> None:
        """Version 4 adds recorded scores, alert states and subject keys: every stored alert
        becomes open (version 3 had no way to resolve one)."""
        with self._transaction():
            for row, blob in self._opened(AlertRow, "1", tail="ORDER BY sequence"):
                try:
                    alert = alert_service_pb2.Alert.FromString(blob)
                except DecodeError:
                    continue  # authentic, but no Alert: not privscore's to give a state
                if alert.HasField("subject") and not alert.alert_sequence:
                    self._insert_state(row.sequence, *raised_state(blob), from_us(row.raised_at_us))
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
            limits = self._select(LimitRow, "1")
            for row, sealed in limits:
                response = self._decrypt(
                    LIMIT_DECISIONS,
                    sealed,
                    length_prefixed(ROW_LABEL_V2, "limit", row.tenant, row.request_id),
                )
                self._db.execute(
                    "UPDATE limit_decisions SET sealed=? WHERE tenant=? AND request_id=?",
                    (self._seal(row, response), row.tenant, row.request_id),
                )
            for event, sealed in self._select(EventRow, "1"):
                details = self._decrypt(
                    EVENTS,
                    sealed,
                    length_prefixed(
                        ROW_LABEL_V2, "event", event.tenant, event.pseudonym, event.event_id
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
                self._insert(typed(AlertRow, values[:2]), blob)
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
