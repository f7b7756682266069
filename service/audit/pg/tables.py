"""Reading the audit tables of schema 1 (service/db/migrations/0001_initial.sql): the state row,
tiles, checkpoints and identity, with every problem named by table and sequence, never by
content.

psycopg is imported only for type checking: the embedded default runs without the `postgres`
extra, and this package is loaded only by what uses the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    VerifierKey,
    parse_body,
    parse_checkpoint,
    signer_names,
    split_note,
)
from service.audit.errors import AuditError, LogCorruptError
from service.audit.identity import LogIdentity, new_origin
from service.audit.pg.tiles import TileKey

if TYPE_CHECKING:
    import psycopg

ENTRIES = "audit_entries"
STATE = "audit_log_state"
TILES = "audit_tiles"
CHECKPOINTS = "audit_checkpoints"
DECISIONS = "audit_decisions"
IDENTITY = "audit_log_identity"

READ_STATE = "SELECT size, chain, root FROM audit_log_state WHERE id = 0"
LOCK_STATE = READ_STATE + " FOR UPDATE"
READ_TILES = (
    "SELECT t.level, t.tile_index, t.nodes FROM audit_tiles t "
    "JOIN unnest(%s::int2[], %s::int8[]) AS k(level, tile_index) USING (level, tile_index)"
)
LATEST_CHECKPOINT = "SELECT id, tree_size, note FROM audit_checkpoints ORDER BY id DESC LIMIT 1"


@dataclass(frozen=True)
class State:
    """The sequencing row: records in the log, the chain value of the last, the tree's root."""

    size: int
    chain: bytes
    root: bytes


@dataclass(frozen=True)
class CheckpointRow:
    id: int
    tree_size: int
    note: bytes


def describe(error: BaseException) -> str:
    """A database error as its class, SQLSTATE, table and constraint: never its message, whose
    DETAIL lines can quote a row's values."""
    diag = getattr(error, "diag", None)
    parts = [f"SQLSTATE {diag.sqlstate}"] if diag is not None and diag.sqlstate else []
    if diag is not None and diag.table_name:
        parts.append(f"table {diag.table_name}")
    if diag is not None and diag.constraint_name:
        parts.append(f"constraint {diag.constraint_name}")
    return f"{type(error).__name__} ({', '.join(parts)})" if parts else type(error).__name__


async def read_state(conn: psycopg.AsyncConnection[Any], *, lock: bool = False) -> State:
    row = await (await conn.execute(LOCK_STATE if lock else READ_STATE)).fetchone()
    if row is None:
        raise LogCorruptError(
            None, f"{STATE} has no row: the schema was not migrated or was edited"
        )
    return State(int(row[0]), bytes(row[1]), bytes(row[2]))


async def read_tiles(
    conn: psycopg.AsyncConnection[Any], keys: Iterable[TileKey]
) -> dict[TileKey, bytes]:
    """The stored tiles among `keys` (one round trip); absent ones are left out."""
    wanted = sorted(keys)
    if not wanted:
        return {}
    cursor = await conn.execute(
        READ_TILES, ([level for level, _ in wanted], [index for _, index in wanted])
    )
    return {
        (int(level), int(index)): bytes(nodes) for level, index, nodes in await cursor.fetchall()
    }


async def latest_checkpoint_row(conn: psycopg.AsyncConnection[Any]) -> CheckpointRow | None:
    row = await (await conn.execute(LATEST_CHECKPOINT)).fetchone()
    return None if row is None else CheckpointRow(int(row[0]), int(row[1]), bytes(row[2]))


def verify_checkpoint_row(
    row: CheckpointRow, verifier: VerifierKey, origin: str, *, what: str = "the latest checkpoint"
) -> Checkpoint:
    """The row's signed note, verified under `verifier` (its name and key) for `origin`, its
    size agreeing with the row's `tree_size`; else AuditError naming the table, the row and the
    problem (a note of another log is an AuditError, a bad one a LogCorruptError)."""
    where = f"{CHECKPOINTS} row {row.id}"
    try:
        text = row.note.decode("utf-8")
        note_origin = parse_body(split_note(text)[0])[0]
    except (UnicodeDecodeError, CheckpointError) as error:
        raise LogCorruptError(None, f"{where}: {what} is malformed ({error})") from None
    if note_origin != origin:
        raise AuditError(f"{where}: {what} is of the log {note_origin!r}, not {origin!r}")
    try:
        checkpoint = parse_checkpoint(text, verifier, origin)
    except CheckpointError as error:
        raise LogCorruptError(
            None,
            f"{where}: {what} is refused: {error} (this server's key: {verifier.name} "
            f"{verifier.key_id.hex()}; the note is signed as {', '.join(signer_names(text))})",
        ) from None
    if checkpoint.size != row.tree_size:
        raise LogCorruptError(
            None,
            f"{where}: tree_size says {row.tree_size} but the signed note {checkpoint.size}",
        )
    return checkpoint


async def latest_checkpoint(
    conn: psycopg.AsyncConnection[Any], verifier: VerifierKey, origin: str
) -> Checkpoint | None:
    """The newest checkpoint in the database, verified; None if none was signed yet."""
    row = await latest_checkpoint_row(conn)
    return None if row is None else verify_checkpoint_row(row, verifier, origin)


async def read_identity(conn: psycopg.AsyncConnection[Any]) -> LogIdentity | None:
    row = await (
        await conn.execute("SELECT origin, key_name FROM audit_log_identity WHERE id = 0")
    ).fetchone()
    return None if row is None else LogIdentity(str(row[0]), str(row[1]))


async def establish_identity(conn: psycopg.AsyncConnection[Any], origin: str | None) -> LogIdentity:
    """The database log's identity (`identity.json` of the file log), written on first use:
    `origin` if given (a log that has one must have the same), else a new unique origin; its
    key name is its origin. Two replicas doing this at once agree on the first one written."""
    from service.audit.checkpoint import check_key_name, check_origin

    fresh = origin or new_origin()
    check_origin(fresh)
    check_key_name(fresh)
    await conn.execute(
        "INSERT INTO audit_log_identity (id, origin, key_name) VALUES (0, %s, %s) "
        "ON CONFLICT (id) DO NOTHING",
        (fresh, fresh),
    )
    found = await read_identity(conn)
    if found is None:  # deleted between the two statements
        raise AuditError(f"{IDENTITY} has no row")
    if origin is not None and found.origin != origin:
        raise AuditError(
            f"{IDENTITY}: the database holds the log of {found.origin!r}; "
            f"the configured origin is {origin!r}"
        )
    return found
