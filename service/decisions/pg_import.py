"""`privscore db import`, the decision store's part: the SQLite store's rows copied into
PostgreSQL's `limit_decisions`, `events` and `alerts` (schema 1) and `scores`, `alert_states`
and `subject_keys` (schema 2), unchanged, inside the caller's transaction.

The schemas mirror the store column for column, times as timestamptz where SQLite keeps
microseconds (`decided_at_us` -> `decided_at`, the same instant), and each row's seal binds the
same values (service/db/migrations/__init__.py): so the sealed blobs and the plain columns are
copied as they are and still open under the same state key. Every row is authenticated as it
is read (`DecisionStore.stored_rows`), so a row that fails its authentication stops the import
(`privscore store verify` names it). Alerts keep their sequences, and `alerts_sequencing` is
set to the last of them, so the next alert raised on PostgreSQL continues the stream a
subscriber resumes from.

Before the caller commits, each table is read back and compared with what the store held: the
row count and a digest of the rows (the sum of each row's SHA-256, so order does not matter),
with the times turned back into microseconds. Nothing here reads or logs a row's content
beyond hashing it; errors name tables and counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.decisions.rows import ALERT_STATES, SCORES, SUBJECT_KEYS
from service.decisions.store import (
    ALERTS,
    EVENTS,
    LIMIT_DECISIONS,
    DecisionStore,
    StoreError,
    from_us,
    table_columns,
    to_us,
)

if TYPE_CHECKING:
    import psycopg

TABLES = (LIMIT_DECISIONS, EVENTS, ALERTS, SCORES, ALERT_STATES, SUBJECT_KEYS)
_TIME_SUFFIX = "_us"
_MODULUS = 1 << 256


@dataclass(frozen=True)
class LoadedRows:
    counts: dict[str, int]  # rows per table
    last_alert_sequence: int


class _Digest:
    """A multiset digest of rows: the count and the sum of each row's SHA-256."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0

    def add(self, row: tuple[object, ...]) -> None:
        digest = hashlib.sha256()
        for value in row:
            if isinstance(value, bytes):
                tag, data = b"b", value
            elif isinstance(value, int):
                tag, data = b"i", str(value).encode()
            else:
                tag, data = b"s", str(value).encode("utf-8")
            digest.update(tag + len(data).to_bytes(8, "big") + data)
        self.count += 1
        self.total = (self.total + int.from_bytes(digest.digest(), "big")) % _MODULUS


def _layout(table: str) -> tuple[list[str], list[str], list[int]]:
    """PostgreSQL's column names and COPY types for `table`, and the positions of its times."""
    names, types, times = [], [], []
    for position, (name, kind) in enumerate(table_columns(table)):
        if name.endswith(_TIME_SUFFIX):
            names.append(name.removesuffix(_TIME_SUFFIX))
            types.append("timestamptz")
            times.append(position)
        else:
            names.append(name)
            types.append({str: "text", int: "int8", bytes: "bytea"}[kind])
    return names, types, times


async def held_rows(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """Rows per store table in the database, and the alert counter (`alerts_sequencing`)."""
    counts = {}
    for table in TABLES:
        row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
        counts[table] = int(row[0]) if row else 0
    row = await (
        await conn.execute("SELECT last_sequence FROM alerts_sequencing WHERE id = 0")
    ).fetchone()
    counts["alerts_sequencing"] = int(row[0]) if row else 0
    return counts


async def load_store(conn: psycopg.AsyncConnection[Any], store: DecisionStore | None) -> LoadedRows:
    """Copy every row of `store` (None: no store file, nothing to copy) into the database's
    store tables, which must be empty, and check them (module doc); inside the caller's
    transaction, which must be open. StoreError names the problem."""
    # The counter row first: the lock order of schema 1 (audit_log_state, then this).
    await conn.execute("SELECT last_sequence FROM alerts_sequencing WHERE id = 0 FOR UPDATE")
    held = await held_rows(conn)
    if any(held.values()):
        raise StoreError(
            "the database already holds decision store rows ("
            + ", ".join(f"{table} {count}" for table, count in held.items() if count)
            + "): import into a new database"
        )
    counts: dict[str, int] = {}
    last_alert = 0
    for table in TABLES:
        names, types, times = _layout(table)
        written = _Digest()
        cursor = conn.cursor()
        async with cursor.copy(
            f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(types)
            for row in store.stored_rows(table) if store is not None else ():
                written.add(row)
                if table == ALERTS and isinstance(row[0], int):
                    last_alert = max(last_alert, row[0])
                await copy.write_row(
                    [
                        from_us(v) if isinstance(v, int) and i in times else v
                        for i, v in enumerate(row)
                    ]
                )
        read = _Digest()
        async with conn.cursor(f"privscore_import_{table}", binary=True) as back:
            await back.execute(f"SELECT {', '.join(names)} FROM {table}")
            async for values in back:
                read.add(tuple(to_us(v) if i in times else v for i, v in enumerate(values)))
        if (read.count, read.total) != (written.count, written.total):
            raise StoreError(
                f"{table}: the {read.count} rows read back from the database are not the "
                f"{written.count} rows the store holds"
            )
        counts[table] = written.count
    await conn.execute(
        "UPDATE alerts_sequencing SET last_sequence = %s WHERE id = 0", (last_alert,)
    )
    return LoadedRows(counts, last_alert)
