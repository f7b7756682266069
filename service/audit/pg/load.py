"""`privscore db import`, the audit log's part: a file log written into the database's empty
audit tables as `PgAuditLog` would have written it, inside the caller's transaction, and checked
there, before the caller commits, by the checks `PgAuditLog.open` makes.

What is written (schema 1, service/db/migrations/0001_initial.sql):

- `audit_entries`: every envelope byte for byte at its sequence. The envelopes are the Merkle
  leaves, so the tree, every chain value and MAC, and every signed checkpoint stay what they
  were. A torn final record (an append that was never acknowledged, which the file log cuts off
  at its next open) is left out and counted.
- `audit_decisions`: the first record of each decision id that is a canonical UUID, as the
  writer's `ON CONFLICT DO NOTHING` keeps it (`indexable`).
- `audit_tiles`: the tlog-tiles of the tree the records give (service/audit/pg/tiles.py), full
  tiles written as they complete, the partial ones on the right edge at the end.
- `audit_log_state`: size, the chain value of the last record and the root.
- `audit_checkpoints`: every note of `checkpoints.log`, in order, numbered from 0, with the
  size its body states; `audit_log_identity`: the origin and key name of `identity.json`.

Then `check_tables` (service/audit/pg/check.py, what `PgAuditLog.open` runs, in full) reads
back what was written in the same transaction: the latest checkpoint verifies under the
server's key, name and origin; the records up to it give its root; every record after it
follows the chain and carries the server's MAC; no key rotation hands the log to another key;
the state row and every tile are exactly what the records give. Anything else raises, and the
caller's transaction rolls back: nothing of the log stays.

Records are read and written in chunks (`CHUNK_RECORDS` per COPY), so memory holds a chunk and
the tiles not yet complete, not the log. Errors name sequences, tables and files, never content.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.audit.checkpoint import CheckpointError, VerifierKey, parse_body, split_note
from service.audit.errors import AuditError, LogCorruptError
from service.audit.identity import LogIdentity
from service.audit.merkle import leaf_hash
from service.audit.pg.check import check_tables
from service.audit.pg.lookup import indexable
from service.audit.pg.tables import (
    CHECKPOINTS,
    ENTRIES,
    IDENTITY,
    STATE,
    read_identity,
    read_state,
)
from service.audit.pg.tiles import TILE_WIDTH, TileFrontier
from service.audit.storage import (
    CHECKPOINT_FILE,
    GENESIS_CHAIN,
    LogReader,
    read_checkpoint_notes,
    stored_chain,
)

if TYPE_CHECKING:
    import psycopg

CHUNK_RECORDS = 4096
_FULL_TILE = TILE_WIDTH * 32
_COPY_ENTRIES = "COPY audit_entries (sequence, envelope) FROM STDIN (FORMAT BINARY)"
_INSERT_DECISIONS = (
    "INSERT INTO audit_decisions (decision_id, sequence) "
    "SELECT * FROM unnest(%s::uuid[], %s::int8[]) ON CONFLICT (decision_id) DO NOTHING"
)
_INSERT_TILES = (
    "INSERT INTO audit_tiles (level, tile_index, nodes) "
    "SELECT * FROM unnest(%s::int2[], %s::int8[], %s::bytea[])"
)
_ANY_ROWS = (
    "SELECT EXISTS (SELECT 1 FROM audit_entries) OR EXISTS (SELECT 1 FROM audit_checkpoints) "
    "OR EXISTS (SELECT 1 FROM audit_tiles) OR EXISTS (SELECT 1 FROM audit_decisions)"
)


@dataclass(frozen=True)
class HeldLog:
    """What the database's audit tables hold: the identity row, the state row's size and root,
    and whether any entry, checkpoint, tile or index row exists."""

    identity: LogIdentity | None
    size: int
    root: bytes
    rows: bool

    @property
    def empty(self) -> bool:
        return self.identity is None and self.size == 0 and not self.rows


@dataclass(frozen=True)
class LoadedLog:
    records: int
    checkpoints: int
    indexed: int  # audit_decisions rows written
    torn_tail_bytes: int
    root: bytes


async def held_log(conn: psycopg.AsyncConnection[Any], *, lock: bool = False) -> HeldLog:
    """The database's log as `HeldLog`; with `lock`, the state row stays locked until the
    transaction ends (as an appender locks it), so no replica appends meanwhile."""
    state = await read_state(conn, lock=lock)
    rows = await (await conn.execute(_ANY_ROWS)).fetchone()
    return HeldLog(await read_identity(conn), state.size, state.root, bool(rows and rows[0]))


async def load_file_log(
    conn: psycopg.AsyncConnection[Any],
    directory: Path,
    *,
    identity: LogIdentity,
    verifier: VerifierKey,
    mac_key: bytes,
) -> LoadedLog:
    """Write the file log in `directory` into the database's audit tables, which must be empty,
    and check it there as `PgAuditLog.open` would (module doc); inside the caller's transaction,
    which must be open and commits the log only if this returns. AuditError (LogCorruptError for
    damage) names the problem."""
    held = await held_log(conn, lock=True)
    if not held.empty:
        raise AuditError(
            f"{STATE}: the database already holds an audit log ({held.size} records): import "
            "into a new database"
        )
    await conn.execute(
        f"INSERT INTO {IDENTITY} (id, origin, key_name) VALUES (0, %s, %s)",
        (identity.origin, identity.key_name),
    )
    checkpoints = await _load_checkpoints(conn, directory)

    reader = LogReader(directory)
    frontier = TileFrontier()
    chunk: list[tuple[int, bytes]] = []
    indexed = 0
    last: tuple[int, bytes] | None = None
    for envelope in reader.envelopes():
        chunk.append((reader.size, envelope))  # reader.size: this envelope's sequence
        if len(chunk) == CHUNK_RECORDS:
            indexed += await _load_chunk(conn, chunk, frontier)
            last, chunk = chunk[-1], []
    if chunk:
        indexed += await _load_chunk(conn, chunk, frontier)
        last = chunk[-1]
    await _insert_tiles(conn, frontier.added.items())
    chain = stored_chain(last[1], last[0]) if last is not None else GENESIS_CHAIN
    await conn.execute(
        f"UPDATE {STATE} SET size = %s, chain = %s, root = %s, updated_at = now() WHERE id = 0",
        (frontier.size, chain, frontier.root()),
    )

    checked = await check_tables(
        conn,
        verifier=verifier,
        origin=identity.origin,
        mac_key=mac_key,
        full=True,
        refusing="refusing to import the log (nothing of it is kept)",
    )
    if (checked.size, checked.root) != (frontier.size, frontier.root()):
        raise LogCorruptError(None, f"{ENTRIES}: the records read back are not those written")
    torn = reader.torn.length if reader.torn is not None else 0
    return LoadedLog(frontier.size, checkpoints, indexed, torn, frontier.root())


async def _load_checkpoints(conn: psycopg.AsyncConnection[Any], directory: Path) -> int:
    notes, _ = read_checkpoint_notes(directory)  # a torn final note was never complete
    rows = []
    for number, note in enumerate(notes):
        try:
            size = parse_body(split_note(note.decode("utf-8"))[0])[1]
        except (UnicodeDecodeError, CheckpointError) as error:
            raise LogCorruptError(
                None, f"{CHECKPOINT_FILE}: note #{number} is malformed ({error})"
            ) from None
        rows.append((number, size, note))
    if rows:
        cursor = conn.cursor()
        await cursor.executemany(
            f"INSERT INTO {CHECKPOINTS} (id, tree_size, note) VALUES (%s, %s, %s)", rows
        )
    return len(rows)


def _decision_id(sequence: int, envelope: bytes) -> Any:
    try:
        record = json.loads(envelope)["record"]
        return indexable(record.get("decision_id"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LogCorruptError(sequence, "is not a record envelope") from None


async def _load_chunk(
    conn: psycopg.AsyncConnection[Any], chunk: list[tuple[int, bytes]], frontier: TileFrontier
) -> int:
    """COPY the chunk's entries, index their decisions, and write the tiles they complete;
    the index rows written."""
    cursor = conn.cursor()
    async with cursor.copy(_COPY_ENTRIES) as copy:
        copy.set_types(["int8", "bytea"])
        for row in chunk:
            await copy.write_row(row)
    keys, sequences = [], []
    for sequence, envelope in chunk:
        frontier.append(leaf_hash(envelope))
        key = _decision_id(sequence, envelope)
        if key is not None:
            keys.append(key)
            sequences.append(sequence)
    indexed = 0
    if keys:
        done = await conn.execute(_INSERT_DECISIONS, (keys, sequences))
        indexed = max(done.rowcount, 0)
    full = [(key, nodes) for key, nodes in frontier.added.items() if len(nodes) == _FULL_TILE]
    for key, _ in full:
        del frontier.added[key]  # complete: no node is appended to it again
    await _insert_tiles(conn, full)
    return indexed


async def _insert_tiles(
    conn: psycopg.AsyncConnection[Any], tiles: Iterable[tuple[tuple[int, int], bytearray]]
) -> None:
    rows = sorted(tiles)
    if rows:
        await conn.execute(
            _INSERT_TILES,
            (
                [level for (level, _), _ in rows],
                [index for (_, index), _ in rows],
                [bytes(nodes) for _, nodes in rows],
            ),
        )
