"""The decision store in PostgreSQL: the rows of the SQLite store (service/decisions/rows.py),
in the tables of schema 1, shared by every replica.

Reads take a connection from the pool and authenticate every row they conclude anything from,
as the SQLite store does. Writes never run on their own: each runs inside the audit log's batch
transaction (`PgAuditLog.append(..., within=hook)`), so a decision's row and its audit record
commit together or not at all; and since that transaction holds the log's sequencing row, the
writes of every replica are serialised there.

A decision is made on state read before that transaction (its request id unseen, the
customer's last increase, their event history). Another replica may commit a decision for the
same request or customer in between: the write re-reads that state under the lock and raises
`StateChanged` if it moved (or `AlreadyStored` if the request or event now has a row), which
withdraws the record; the caller reads again and decides again. This is optimistic concurrency
with the check where the serialisation already is, instead of a second lock per customer.

Alerts are numbered from `alerts_sequencing`, locked after the log's state row (the lock order
of schema 1). Because both locks are held to COMMIT, alerts become visible in the order of their
numbers: a reader that sees alert N has every alert below N. Each transaction that raises
alerts sends `NOTIFY privscore_alerts` with its highest number, so every replica's alert stream
learns of them when they commit.

The closed loop's state (schema 2) follows the same rules. A subject's latest score is written
in its Score record's transaction, and a later `scored_at` wins whichever replica commits last.
An alert's state row is written with the alert; a state change locks that row, re-checks the
state the change was decided from (`StateChanged` otherwise), takes the next stream number from
`alerts_sequencing` as raised alerts do, appends the changed Alert to the stream and notifies.
Erasure deletes the subject's rows and blanks its alerts and their changes in place (each keeps
its number, sealed empty, so a subscriber resumes across them), in its record's transaction.
Subject keys are the one write outside the log's transaction: a key must be committed before any
record is sealed under it, so `subject_keys` inserts it (`ON CONFLICT DO NOTHING`, so replicas
racing for one subject keep one key) and commits, then reads back whichever key won.

Database errors reach the caller as they are (psycopg errors); the runtime turns them into
UNAVAILABLE. Nothing here logs or raises a value from a row: tables, counts and numbers only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from privscore.v1 import alert_service_pb2
from service.decisions.alert_rules import Event
from service.decisions.rows import (
    ALERT_STATES,
    ALERTS,
    EVENTS,
    LIMIT_DECISIONS,
    SCORES,
    SUBJECT_KEYS,
    TABLES,
    AlertRow,
    AlertStateRow,
    AlreadyStored,
    AnyRow,
    EventRow,
    LimitRow,
    OpenAlert,
    RecordedScore,
    Row,
    RowSealer,
    ScoreRow,
    StateChanged,
    StoredLimitDecision,
    StoreError,
    SubjectKeyRow,
    event_details,
    event_of,
    from_us,
    to_us,
    typed,
)
from service.decisions.store import ERASED_ALERT, OPEN, RESOLVED, raised_state

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

ALERTS_CHANNEL = "privscore_alerts"
# The numbers of alerts an erasure blanked, comma-separated: other replicas blank them in their
# streams' caches of recent alerts, which would otherwise still send them.
ERASED_CHANNEL = "privscore_alerts_erased"
_NOTIFY_CHARS = 7000  # a notification's payload is at most 8000 bytes
ALERT_STATES_FILL = "alert_states"  # its row in store_fills (0002_loop_state.sql)
_TIME_SUFFIX = "_us"
# Rows opened per query when a pass reads a table from one point on (alerts after a sequence).
_PAGE = 1000
# (tenant, pseudonym, period): one key `subject_keys` is asked for.
SubjectPeriod = tuple[str, str, str]
NewKey = Callable[[], tuple[str, bytes]]


def _select_list(kind: type[AnyRow]) -> str:
    """The row's plain columns as PostgreSQL names them (times without `_us`), then `sealed`."""
    names = [name.removesuffix(_TIME_SUFFIX) for name in kind._fields]
    return ", ".join([*names, "sealed"])


def _time_positions(kind: type[AnyRow]) -> frozenset[int]:
    return frozenset(i for i, name in enumerate(kind._fields) if name.endswith(_TIME_SUFFIX))


def _to_row(kind: type[Row], values: Sequence[object]) -> Row:
    """A database row's plain columns as the row type holds them (times in microseconds)."""
    times = _time_positions(kind)
    converted = [
        to_us(value) if i in times and isinstance(value, dt.datetime) else value
        for i, value in enumerate(values)
    ]
    return typed(kind, converted)


def subject_key_by_id(conn: psycopg.Connection[Any], state_key: bytes, key_id: str) -> bytes | None:
    """A subject key by id, for the offline tools that open format-3 records of a database log
    (`audit show --open`, `audit replay`): authenticated like every row; None once destroyed."""
    found = conn.execute(
        f"SELECT {_select_list(SubjectKeyRow)} FROM subject_keys WHERE key_id = %s", (key_id,)
    ).fetchone()
    if found is None:
        return None
    return RowSealer(state_key).open(_to_row(SubjectKeyRow, found[:-1]), bytes(found[-1]))


def key_ids_of_pseudonym(
    conn: psycopg.Connection[Any], state_key: bytes, pseudonym: str
) -> list[str]:
    """The ids of every key of a pseudonym, whatever its tenant, each row authenticated."""
    sealer = RowSealer(state_key)
    found = conn.execute(
        f"SELECT {_select_list(SubjectKeyRow)} FROM subject_keys WHERE pseudonym = %s",
        (pseudonym,),
    ).fetchall()
    rows = [_to_row(SubjectKeyRow, values[:-1]) for values in found]
    for row, values in zip(rows, found, strict=True):
        sealer.open(row, bytes(values[-1]))
    return [row.key_id for row in rows]


def raised_state_row(sequence: int, alert: bytes, raised_at: dt.datetime) -> AlertStateRow:
    """A raised alert's state row: open, under the subject and severity its message names
    (the row the SQLite store writes for it)."""
    return AlertStateRow(sequence, *raised_state(alert), OPEN, to_us(raised_at))


def changed_alert(alert: bytes) -> int:
    """The raised alert a stream entry changes (its `alert_sequence`), 0 for a raised alert
    itself or an erased entry."""
    return alert_service_pb2.Alert.FromString(alert).alert_sequence if alert else 0


def _chunks(sequences: Sequence[int]) -> list[str]:
    """`sequences` as comma-separated payloads, each short enough for one notification."""
    payloads: list[str] = []
    current: list[str] = []
    length = 0
    for sequence in map(str, sequences):
        if current and length + 1 + len(sequence) > _NOTIFY_CHARS:
            payloads.append(",".join(current))
            current, length = [], 0
        length += len(sequence) + (1 if current else 0)
        current.append(sequence)
    if current:
        payloads.append(",".join(current))
    return payloads


def _to_columns(row: AnyRow) -> list[object]:
    times = _time_positions(type(row))
    return [
        from_us(value) if i in times and isinstance(value, int) else value
        for i, value in enumerate(row)
    ]


class PgDecisionStore:
    """The store's reads on `pool`, and its writes on a caller's transaction."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, state_key: bytes) -> None:
        self._pool = pool
        self._rows = RowSealer(state_key)

    # -- reading ---------------------------------------------------------------------------

    async def _opened(
        self,
        conn: psycopg.AsyncConnection[Any] | None,
        kind: type[Row],
        where: str,
        parameters: Sequence[object] = (),
        tail: str = "",
    ) -> list[tuple[Row, bytes]]:
        """Rows of `kind`'s table selected by plain columns, each opened (so authenticated)."""
        table, _ = TABLES[kind]
        query = f"SELECT {_select_list(kind)} FROM {table} WHERE {where} {tail}"
        if conn is None:
            async with self._pool.connection() as own:
                fetched = await (await own.execute(query, parameters)).fetchall()
        else:
            fetched = await (await conn.execute(query, parameters)).fetchall()
        opened = []
        for values in fetched:
            row = _to_row(kind, values[:-1])
            opened.append((row, self._rows.open(row, values[-1])))
        return opened

    async def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        rows = await self._opened(
            None, LimitRow, "tenant = %s AND request_id = %s", (tenant, request_id)
        )
        if not rows:
            return None
        [(row, response)] = rows
        return StoredLimitDecision(row.fingerprint, response)

    async def last_increase_at(
        self, tenant: str, pseudonym: str, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> dt.datetime | None:
        """When this customer's limit was last increased; every one of their decisions opened
        (service/decisions/store.py says why)."""
        rows = await self._opened(
            conn, LimitRow, "tenant = %s AND pseudonym = %s", (tenant, pseudonym)
        )
        increases = [row.decided_at_us for row, _ in rows if row.action == "INCREASE"]
        return from_us(max(increases)) if increases else None

    async def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool:
        return bool(
            await self._opened(
                None,
                EventRow,
                "tenant = %s AND pseudonym = %s AND event_id = %s",
                (tenant, pseudonym, event_id),
            )
        )

    async def events(self, tenant: str, pseudonym: str) -> list[Event]:
        rows = await self._opened(
            None,
            EventRow,
            "tenant = %s AND pseudonym = %s",
            (tenant, pseudonym),
            "ORDER BY occurred_at, event_id",
        )
        return [event_of(row, plaintext) for row, plaintext in rows]

    async def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._opened(
            None, AlertRow, "sequence > %s", (sequence, limit), "ORDER BY sequence LIMIT %s"
        )
        return [(row.sequence, alert) for row, alert in rows]

    async def last_alert_sequence(self) -> int:
        """The last number given to an alert: every alert up to it has committed."""
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute("SELECT last_sequence FROM alerts_sequencing WHERE id = 0")
            ).fetchone()
        return int(row[0]) if row else 0

    async def _alerts_from(
        self, conn: psycopg.AsyncConnection[Any], first: int
    ) -> AsyncIterator[tuple[AlertRow, bytes]]:
        """Every alert from sequence `first` on, in order, opened a page at a time (a pass
        over the stream never holds it all)."""
        after = first - 1
        while True:
            page = await self._opened(
                conn, AlertRow, "sequence > %s", (after, _PAGE), "ORDER BY sequence LIMIT %s"
            )
            for found in page:
                yield found
            if len(page) < _PAGE:
                return
            after = page[-1][0].sequence

    async def latest_score(self, tenant: str, pseudonym: str) -> RecordedScore | None:
        rows = await self._opened(
            None, ScoreRow, "tenant = %s AND pseudonym = %s", (tenant, pseudonym)
        )
        return RecordedScore.opened(*rows[0]) if rows else None

    async def open_alerts(self, tenant: str, pseudonym: str) -> list[OpenAlert]:
        """The subject's alerts not yet resolved. Every state row of the subject is opened,
        the resolved ones too: a query on the plain `state` alone would never notice a row
        whose state was edited to RESOLVED, and that would lift a freeze."""
        rows = await self._opened(
            None,
            AlertStateRow,
            "tenant = %s AND pseudonym = %s",
            (tenant, pseudonym),
            "ORDER BY alert_sequence",
        )
        return [
            OpenAlert(row.alert_sequence, row.severity, row.state)
            for row, _ in rows
            if row.state != RESOLVED
        ]

    async def alert_state(self, alert_sequence: int) -> tuple[AlertStateRow, bytes] | None:
        """An alert's state row and its message as raised, both authenticated; None for an
        alert not kept (never raised, or erased)."""
        async with self._pool.connection() as conn:
            states = await self._opened(
                conn, AlertStateRow, "alert_sequence = %s", (alert_sequence,)
            )
            raised = await self._opened(conn, AlertRow, "sequence = %s", (alert_sequence,))
        if not states or not raised:
            return None
        return states[0][0], raised[0][1]

    # -- subject keys ------------------------------------------------------------------------

    async def _keys(
        self, conn: psycopg.AsyncConnection[Any] | None, wanted: Sequence[SubjectPeriod]
    ) -> dict[SubjectPeriod, tuple[str, bytes]]:
        """The stored keys of `wanted` (tenant, pseudonym, period), each row opened."""
        columns = [list(column) for column in zip(*wanted, strict=True)] if wanted else [[], [], []]
        rows = await self._opened(
            conn,
            SubjectKeyRow,
            "(tenant, pseudonym, period) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))",
            columns,
        )
        return {(row.tenant, row.pseudonym, row.period): (row.key_id, key) for row, key in rows}

    async def subject_keys(
        self, wanted: Sequence[SubjectPeriod], new_key: NewKey
    ) -> list[tuple[str, bytes]]:
        """(key id, key) for each (tenant, pseudonym, period), in order; those missing made
        with `new_key` and committed before this returns (a record sealed under a key that
        was never stored could not be read again). Replicas making one subject's key at once
        each insert theirs with ON CONFLICT DO NOTHING and read back the one that won."""
        found = await self._keys(None, sorted(set(wanted)))
        missing = sorted(set(wanted) - found.keys())
        if missing:
            made_at = to_us(dt.datetime.now(dt.UTC))
            async with self._pool.connection() as conn:
                async with conn.transaction():
                    for tenant, pseudonym, period in missing:
                        key_id, key = new_key()
                        row = SubjectKeyRow(tenant, pseudonym, period, key_id, made_at)
                        await self._insert(conn, row, key)
                found |= await self._keys(conn, missing)
            if len(found) < len(set(wanted)):  # a new key's id was another's: never in practice
                raise StoreError(f"{SUBJECT_KEYS}: a new key was neither stored nor found")
        return [found[key] for key in wanted]

    async def key_by_id(self, key_id: str) -> bytes | None:
        """A subject key by its id, or None once destroyed (erased or expired)."""
        rows = await self._opened(None, SubjectKeyRow, "key_id = %s", (key_id,))
        return rows[0][1] if rows else None

    async def subject_key_ids(self, tenant: str, pseudonym: str) -> list[str]:
        """The ids of every key the subject has, oldest period first."""
        rows = await self._opened(
            None,
            SubjectKeyRow,
            "tenant = %s AND pseudonym = %s",
            (tenant, pseudonym),
            "ORDER BY period",
        )
        return [row.key_id for row, _ in rows]

    async def expired_key_ids(self, before_period: str) -> list[str]:
        """The ids of keys of periods before `before_period` (YYYY-MM), each row opened."""
        rows = await self._opened(
            None, SubjectKeyRow, "period < %s", (before_period,), "ORDER BY period, key_id"
        )
        return [row.key_id for row, _ in rows]

    # -- schema 2's fill ---------------------------------------------------------------------

    async def fill_alert_states(self) -> int | None:
        """Give every alert raised under schema 1 its state row (open, as SQLite's migration
        to schema 4 does: schema 1 could not change an alert's state), once: the number of
        rows written, or None when there was nothing to fill (a new database, or filled by
        an earlier start). Replicas starting together wait on the fill's row lock, and the
        second finds it done; a start that fails midway rolls back, leaving it to the next."""
        async with self._pool.connection() as conn, conn.transaction():
            # A replica that waited on the row's lock then reads it anew, and finds it deleted.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            pending = await conn.execute(
                "SELECT 1 FROM store_fills WHERE name = %s FOR UPDATE", (ALERT_STATES_FILL,)
            )
            if await pending.fetchone() is None:
                return None
            filled = 0
            async for row, alert in self._alerts_from(conn, 1):
                if alert and not changed_alert(alert):
                    state = raised_state_row(row.sequence, alert, from_us(row.raised_at_us))
                    filled += await self._insert(conn, state, b"")
            await conn.execute("DELETE FROM store_fills WHERE name = %s", (ALERT_STATES_FILL,))
        return filled

    # -- writing, inside the audit log's transaction ----------------------------------------

    async def _insert(self, conn: psycopg.AsyncConnection[Any], row: AnyRow, plain: bytes) -> int:
        """Insert `row` sealed; the number of rows inserted (0 if its key was taken)."""
        table, _ = TABLES[type(row)]
        marks = ", ".join(["%s"] * (len(row) + 1))
        cursor = await conn.execute(
            f"INSERT INTO {table} ({_select_list(type(row))}) VALUES ({marks}) "
            "ON CONFLICT DO NOTHING",
            (*_to_columns(row), self._rows.seal(row, plain)),
        )
        return cursor.rowcount

    async def insert_limit_decision(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        tenant: str,
        pseudonym: str,
        request_id: str,
        fingerprint: str,
        decided_at: dt.datetime,
        action: str,
        response: bytes,
        seen_last_increase: dt.datetime | None,
    ) -> None:
        """Store a decision made when the customer's last increase was `seen_last_increase`;
        StateChanged if it is another now, AlreadyStored if the request id has a row."""
        if await self.last_increase_at(tenant, pseudonym, conn) != seen_last_increase:
            raise StateChanged(f"{LIMIT_DECISIONS}: the customer's last increase changed")
        row = LimitRow(tenant, request_id, pseudonym, fingerprint, to_us(decided_at), action)
        if not await self._insert(conn, row, response):
            raise AlreadyStored(f"{LIMIT_DECISIONS}: the request id was decided meanwhile")

    async def insert_event(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        tenant: str,
        pseudonym: str,
        event: Event,
        seen_history: Sequence[str],
        alerts: Sequence[bytes],
        raised_at: dt.datetime,
        forget_before: dt.datetime,
    ) -> list[int]:
        """Store an event evaluated against the history `seen_history` (its event ids) and the
        alerts it raised; their sequences. AlreadyStored if the event has a row now,
        StateChanged if the customer's history is another. Events older than `forget_before`
        are dropped for this customer, each authenticated first."""
        stored = await (
            await conn.execute(
                "SELECT event_id FROM events WHERE tenant = %s AND pseudonym = %s",
                (tenant, pseudonym),
            )
        ).fetchall()
        ids = {value for (value,) in stored}
        if event.event_id in ids:
            raise AlreadyStored(f"{EVENTS}: the event was stored meanwhile")
        if ids != set(seen_history):
            raise StateChanged(f"{EVENTS}: the customer's history changed")
        row = EventRow(tenant, pseudonym, event.event_id, to_us(event.occurred_at))
        await self._insert(conn, row, event_details(event))
        sequences: list[int] = []
        if alerts:
            counter = await (
                await conn.execute(
                    "UPDATE alerts_sequencing SET last_sequence = last_sequence + %s "
                    "WHERE id = 0 RETURNING last_sequence",
                    (len(alerts),),
                )
            ).fetchone()
            if counter is None:
                raise StoreError(f"{ALERTS}: alerts_sequencing has no row")
            last = int(counter[0])
            sequences = list(range(last - len(alerts) + 1, last + 1))
            for sequence, alert in zip(sequences, alerts, strict=True):
                if not await self._insert(conn, AlertRow(sequence, to_us(raised_at)), alert):
                    raise StoreError(f"{ALERTS}: a number from alerts_sequencing was taken")
                await self._insert(conn, raised_state_row(sequence, alert, raised_at), b"")
            await conn.execute("SELECT pg_notify(%s, %s)", (ALERTS_CHANNEL, str(last)))
        old = (tenant, pseudonym, from_us(to_us(forget_before)))
        where = "tenant = %s AND pseudonym = %s AND occurred_at < %s"
        await self._opened(conn, EventRow, where, old)
        await conn.execute(f"DELETE FROM events WHERE {where}", old)
        return sequences

    async def _next_alert_sequence(self, conn: psycopg.AsyncConnection[Any], count: int) -> int:
        """Take `count` numbers of the alert stream; the last of them. The counter row stays
        locked to COMMIT, so numbers become visible in order (module doc)."""
        counter = await (
            await conn.execute(
                "UPDATE alerts_sequencing SET last_sequence = last_sequence + %s "
                "WHERE id = 0 RETURNING last_sequence",
                (count,),
            )
        ).fetchone()
        if counter is None:
            raise StoreError(f"{ALERTS}: alerts_sequencing has no row")
        return int(counter[0])

    async def upsert_score(
        self, conn: psycopg.AsyncConnection[Any], tenant: str, pseudonym: str, score: RecordedScore
    ) -> bool:
        """Keep `score` as the subject's latest unless the stored one, opened first, is later;
        whether it was kept. Two replicas' scores of one subject are written one after the
        other (the log's state row serialises their transactions), so the later wins whichever
        commits last."""
        subject = (tenant, pseudonym)
        stored = await self._opened(
            conn, ScoreRow, "tenant = %s AND pseudonym = %s", subject, "FOR UPDATE"
        )
        if stored and stored[0][0].scored_at_us > to_us(score.scored_at):
            return False
        row = score.row(tenant, pseudonym)
        await conn.execute(
            f"INSERT INTO {SCORES} ({_select_list(ScoreRow)}) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (tenant, pseudonym) DO UPDATE SET decision_id = excluded.decision_id, "
            "scored_at = excluded.scored_at, sealed = excluded.sealed",
            (*_to_columns(row), self._rows.seal(row, score.sealed())),
        )
        return True

    async def update_alert(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        alert_sequence: int,
        seen_state: str | None,
        state: str,
        changed_at: dt.datetime,
        update: Callable[[], bytes],
    ) -> int:
        """Move the alert to `state` and append the change (`update()`, the Alert the stream
        carries) to the stream; its stream sequence. StateChanged if the alert is no longer
        kept, is resolved or already in `state`, or is not in `seen_state` (the state the
        change was decided from) now that its row is locked: the caller decides again."""
        sequence = await self._next_alert_sequence(conn, 1)
        found = await self._opened(
            conn, AlertStateRow, "alert_sequence = %s", (alert_sequence,), "FOR UPDATE"
        )
        if not found:
            raise StateChanged(f"{ALERT_STATES}: the alert was erased meanwhile")
        row = found[0][0]
        if row.state in (RESOLVED, state) or seen_state not in (None, row.state):
            raise StateChanged(f"{ALERT_STATES}: the alert's state changed meanwhile")
        if not await self._insert(conn, AlertRow(sequence, to_us(changed_at)), update()):
            raise StoreError(f"{ALERTS}: a number from alerts_sequencing was taken")
        changed = row._replace(state=state, changed_at_us=to_us(changed_at))
        await conn.execute(
            f"UPDATE {ALERT_STATES} SET state = %s, changed_at = %s, sealed = %s "
            "WHERE alert_sequence = %s",
            (state, from_us(changed.changed_at_us), self._rows.seal(changed, b""), alert_sequence),
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (ALERTS_CHANNEL, str(sequence)))
        return sequence

    async def erase_subject(
        self, conn: psycopg.AsyncConnection[Any], tenant: str, pseudonym: str
    ) -> dict[str, int]:
        """Delete the subject's events, limit decisions, score, alert states and keys, and
        blank its alerts and their state changes in place (each keeps its number, sealed
        empty, so subscribers resume across them); every row opened before it goes. Rows by
        table, as the SQLite store counts them."""
        subject = (tenant, pseudonym)
        where = "tenant = %s AND pseudonym = %s"
        states = await self._opened(conn, AlertStateRow, where, subject, "FOR UPDATE")
        counts = {
            EVENTS: len(await self._opened(conn, EventRow, where, subject, "FOR UPDATE")),
            LIMIT_DECISIONS: len(await self._opened(conn, LimitRow, where, subject, "FOR UPDATE")),
            SCORES: len(await self._opened(conn, ScoreRow, where, subject, "FOR UPDATE")),
            SUBJECT_KEYS: len(
                await self._opened(conn, SubjectKeyRow, where, subject, "FOR UPDATE")
            ),
            ALERTS: 0,
        }
        for table in (EVENTS, LIMIT_DECISIONS, SCORES, ALERT_STATES, SUBJECT_KEYS):
            await conn.execute(f"DELETE FROM {table} WHERE {where}", subject)
        raised = {row.alert_sequence for row, _ in states}
        blanked: list[int] = []
        if raised:
            # A change names its alert inside its seal: every entry from the first alert on
            # is opened to find them.
            async for row, alert in self._alerts_from(conn, min(raised)):
                if alert and (row.sequence in raised or changed_alert(alert) in raised):
                    await conn.execute(
                        f"UPDATE {ALERTS} SET sealed = %s WHERE sequence = %s",
                        (self._rows.seal(row, ERASED_ALERT), row.sequence),
                    )
                    blanked.append(row.sequence)
        for payload in _chunks(blanked):
            await conn.execute("SELECT pg_notify(%s, %s)", (ERASED_CHANNEL, payload))
        counts[ALERTS] = len(blanked)
        return counts

    async def destroy_keys(self, conn: psycopg.AsyncConnection[Any], key_ids: Sequence[str]) -> int:
        """Destroy the subject keys `key_ids` (retention expiry), each row opened first; how
        many. StateChanged if any is gone already (another replica expired or erased it since
        they were counted), so the record that counts them is made again."""
        rows = await self._opened(
            conn, SubjectKeyRow, "key_id = ANY(%s)", (list(key_ids),), "FOR UPDATE"
        )
        if len(rows) != len(set(key_ids)):
            raise StateChanged(f"{SUBJECT_KEYS}: keys were destroyed meanwhile")
        cursor = await conn.execute(
            f"DELETE FROM {SUBJECT_KEYS} WHERE key_id = ANY(%s)", (list(key_ids),)
        )
        return cursor.rowcount
