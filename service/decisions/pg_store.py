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

Database errors reach the caller as they are (psycopg errors); the runtime turns them into
UNAVAILABLE. Nothing here logs or raises a value from a row: tables, counts and numbers only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.decisions.alert_rules import Event
from service.decisions.rows import (
    ALERTS,
    EVENTS,
    LIMIT_DECISIONS,
    TABLES,
    AlertRow,
    AlreadyStored,
    AnyRow,
    EventRow,
    LimitRow,
    Row,
    RowSealer,
    StateChanged,
    StoredLimitDecision,
    StoreError,
    event_details,
    event_of,
    from_us,
    to_us,
    typed,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

ALERTS_CHANNEL = "privscore_alerts"
_TIME_SUFFIX = "_us"


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
            await conn.execute("SELECT pg_notify(%s, %s)", (ALERTS_CHANNEL, str(last)))
        old = (tenant, pseudonym, from_us(to_us(forget_before)))
        where = "tenant = %s AND pseudonym = %s AND occurred_at < %s"
        await self._opened(conn, EventRow, where, old)
        await conn.execute(f"DELETE FROM events WHERE {where}", old)
        return sequences
