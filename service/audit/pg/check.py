"""What a replica checks before it trusts the database log: at open (all of it) and before it
signs a checkpoint (what the previous checkpoint does not cover yet).

Open, in one read-only snapshot (issue 12's checks, as the file log makes them): the latest
checkpoint verifies under this server's key, name and origin; the records up to it give its root
(streamed through a server-side cursor and hashed, not parsed); every record after it follows the
chain and carries this server's MAC; no key rotation hands the log to another key; and the state
row and the tiles are exactly what the records give. A quick open (`full=False`) leaves out
the pass over what the checkpoint covers, and resumes at it as a signer does (below); the
pass then runs apart (service/audit/pg/log.py), because at a million records it takes seconds
where the rest takes milliseconds. `check_tables` is the same check inside a transaction the
caller holds: `privscore db import` runs it on what it wrote before committing
(service/audit/pg/load.py).

Signing: a replica signs only a root it recomputed itself. It takes the frontier at the latest
checkpoint's size from the tiles and checks it gives that checkpoint's (signed) root, reads the
record just before (checked against the same root by an inclusion proof) for its chain value,
then reads every record after it, checks chain and MAC, and appends their leaves: the root it
signs owes nothing to the state row or to tiles it did not check, and a record someone else put
in the table is refused before any checkpoint covers it. The state row must agree, or nothing
is signed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.audit.checkpoint import (
    ROTATION_MARK,
    Checkpoint,
    CheckpointError,
    Signer,
    VerifierKey,
    format_checkpoint,
    rotation_in,
)
from service.audit.errors import AuditError, LogCorruptError
from service.audit.merkle import (
    EMPTY_ROOT,
    ProofError,
    fold,
    inclusion_path,
    leaf_hash,
    perfect_subtrees,
    verify_inclusion,
)
from service.audit.pg.tables import (
    CHECKPOINTS,
    ENTRIES,
    STATE,
    TILES,
    latest_checkpoint_row,
    read_state,
    read_tiles,
    verify_checkpoint_row,
)
from service.audit.pg.tiles import (
    TileError,
    TileFrontier,
    frontier_tiles,
    node_from_tiles,
    tiles_for,
)
from service.audit.storage import GENESIS_CHAIN, open_envelope, stored_chain

if TYPE_CHECKING:
    import psycopg

STREAM_ROWS = 2000  # rows a server-side cursor hands over per round trip
_ENTRIES_FROM = (
    "SELECT sequence, envelope FROM audit_entries WHERE sequence >= %s AND sequence < %s "
    "ORDER BY sequence"
)


@dataclass(frozen=True)
class Checked:
    """What open found: the log's size, the chain value of its last record, its root, and the
    latest checkpoint's size (0: none)."""

    size: int
    chain: bytes
    root: bytes
    checkpointed: int


@dataclass(frozen=True)
class Signed:
    """What a signing attempt found: the latest checkpoint's size afterwards, whether this call
    signed it, and whether another replica held the signing lock (nothing was done)."""

    size: int
    signed: bool = False
    busy: bool = False


class _Walk:
    """Records fed in sequence order: leaves into the frontier; the chain followed; records from
    `trusted_below` on (those no checkpoint covers) parsed and their MAC checked."""

    def __init__(
        self,
        frontier: TileFrontier,
        *,
        mac_key: bytes,
        origin: str,
        trusted_below: int,
        chain: bytes = GENESIS_CHAIN,
    ) -> None:
        self.frontier = frontier
        self.mac_key = mac_key
        self.origin = origin
        self.trusted_below = trusted_below
        self.chain = chain
        self.rotated_to: VerifierKey | None = None
        self.root_at_trusted: bytes | None = EMPTY_ROOT if trusted_below == 0 else None

    def feed(self, rows: list[tuple[Any, ...]]) -> None:
        frontier = self.frontier
        for sequence, data in rows:
            envelope = bytes(data)
            expected = frontier.size
            if sequence != expected:
                raise LogCorruptError(
                    expected,
                    f"{ENTRIES} does not hold it (the next record there is {sequence}): "
                    "records were deleted",
                )
            if sequence >= self.trusted_below:
                stored, self.chain = open_envelope(envelope, sequence, self.chain)
                if not stored.authentic(self.mac_key):
                    raise LogCorruptError(
                        sequence, "does not carry this server's MAC: the server did not write it"
                    )
            elif sequence == self.trusted_below - 1:
                self.chain = stored_chain(envelope, sequence)
            if ROTATION_MARK in envelope:
                self.rotated_to = self._rotation(envelope, sequence) or self.rotated_to
            frontier.append(leaf_hash(envelope))
            if frontier.size == self.trusted_below:
                self.root_at_trusted = frontier.root()

    def _rotation(self, envelope: bytes, sequence: int) -> VerifierKey | None:
        try:
            return rotation_in(self.origin, sequence, json.loads(envelope)["record"])
        except CheckpointError as error:
            raise LogCorruptError(sequence, f"bad key rotation: {error}") from None


async def stream(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    query: str,
    params: tuple[Any, ...],
    handle: Callable[[list[tuple[Any, ...]]], Awaitable[None] | None],
) -> None:
    """Run `query` through a server-side cursor `name` (binary rows, `STREAM_ROWS` a round
    trip) inside the caller's transaction, handing each chunk of rows to `handle`."""
    async with conn.cursor(name, binary=True) as cursor:
        cursor.itersize = STREAM_ROWS
        await cursor.execute(query, params)
        while rows := await cursor.fetchmany(STREAM_ROWS):
            result = handle(rows)
            if result is not None:
                await result


def _refused(error: LogCorruptError, action: str) -> LogCorruptError:
    return LogCorruptError(error.sequence, f"{ENTRIES}: {error}; {action}")


async def check_log(
    conn: psycopg.AsyncConnection[Any],
    *,
    verifier: VerifierKey,
    origin: str,
    mac_key: bytes,
    full: bool = True,
) -> Checked:
    """The open checks (module doc) in one REPEATABLE READ, READ ONLY snapshot; AuditError
    (a LogCorruptError for damage) naming the table and the problem.

    `full=False` leaves out the pass over what the latest checkpoint covers (the cost that grows
    with the log): the checkpoint's root is then checked against the tiles on the tree's right
    edge, and the record just before the rest by its inclusion proof, as a signer resumes; the
    records under the checkpoint, the other tiles and the key rotations among them are not
    read. Run the full check later to cover them."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return await check_tables(
            conn,
            verifier=verifier,
            origin=origin,
            mac_key=mac_key,
            full=full,
            refusing="refusing to open the log (run `privscore audit export` and `audit verify`)",
        )


async def check_tables(
    conn: psycopg.AsyncConnection[Any],
    *,
    verifier: VerifierKey,
    origin: str,
    mac_key: bytes,
    full: bool,
    refusing: str,
) -> Checked:
    """`check_log`'s checks inside the caller's transaction, which must be open: `privscore db
    import` runs them on the rows it wrote, before it commits them. `refusing` ends each
    error's message."""
    row = await latest_checkpoint_row(conn)
    latest = verify_checkpoint_row(row, verifier, origin) if row is not None else None
    checkpointed = latest.size if latest is not None else 0
    state = await read_state(conn)
    frontier, chain, start = TileFrontier(), GENESIS_CHAIN, 0
    if not full and latest is not None:
        frontier, chain = await _resume_at(conn, latest, refusing)
        start = checkpointed
    walk = _Walk(frontier, mac_key=mac_key, origin=origin, trusted_below=checkpointed, chain=chain)
    if start:
        walk.root_at_trusted = frontier.root()  # _resume_at checked it is the signed one
    try:
        await stream(conn, "privscore_audit_open", _ENTRIES_FROM, (start, 2**63 - 1), walk.feed)
    except LogCorruptError as error:
        raise _refused(error, refusing) from None
    frontier = walk.frontier
    size = frontier.size
    if checkpointed > size:
        raise LogCorruptError(
            size,
            f"{CHECKPOINTS} row {row.id if row else '?'}: the latest signed checkpoint covers "
            f"{checkpointed} records but {ENTRIES} holds only {size}: records from {size} "
            f"were deleted; {refusing}",
        )
    if latest is not None and walk.root_at_trusted != latest.root_hash:
        raise LogCorruptError(
            checkpointed - 1 if checkpointed else None,
            f"{ENTRIES}: the records no longer give the latest signed checkpoint's root (size "
            f"{checkpointed}): a record was altered; {refusing}",
        )
    if walk.rotated_to is not None and walk.rotated_to != verifier:
        raise AuditError(
            f"{ENTRIES}: the log was handed to audit key {walk.rotated_to.key_id.hex()} by a "
            f"key rotation, but this server signs with {verifier.key_id.hex()}"
        )
    _check_state(state.size, state.chain, state.root, size, walk.chain, frontier, refusing)
    if not start:
        await _check_tiles(conn, frontier, refusing)
    return Checked(size, walk.chain, frontier.root(), checkpointed)


def _check_state(
    stored_size: int,
    stored_chain_value: bytes,
    stored_root: bytes,
    size: int,
    chain: bytes,
    frontier: TileFrontier,
    refusing: str,
) -> None:
    if stored_size != size:
        why = (
            "records were deleted, or the state row was edited"
            if stored_size > size
            else "the state row was rolled back, or records were inserted without it"
        )
        raise LogCorruptError(
            min(stored_size, size),
            f"{STATE} says the log holds {stored_size} records but {ENTRIES} holds {size}: "
            f"{why}; {refusing}",
        )
    if stored_chain_value != chain or stored_root != frontier.root():
        raise LogCorruptError(
            size - 1 if size else None,
            f"{STATE}: its chain value or root is not the one the records give: the state row "
            f"was edited; {refusing}",
        )


async def _check_tiles(
    conn: psycopg.AsyncConnection[Any], frontier: TileFrontier, refusing: str
) -> None:
    """Every stored tile is the one the records give, and every tile they give is stored."""
    expected = frontier.added
    seen: set[tuple[int, int]] = set()
    problems: list[str] = []

    def compare(rows: list[tuple[Any, ...]]) -> None:
        for level, index, nodes in rows:
            key = (int(level), int(index))
            seen.add(key)
            if bytes(expected.get(key, b"")) != bytes(nodes) and not problems:
                problems.append(f"tile (level {key[0]}, index {key[1]}) differs from the records")

    await stream(
        conn,
        "privscore_audit_tiles",
        "SELECT level, tile_index, nodes FROM audit_tiles ORDER BY level, tile_index",
        (),
        compare,
    )
    missing = sorted(set(expected) - seen)
    if missing and not problems:
        problems.append(f"tile (level {missing[0][0]}, index {missing[0][1]}) is missing")
    if problems:
        raise LogCorruptError(None, f"{TILES}: {problems[0]}; {refusing}")


async def tile_hashes(
    conn: psycopg.AsyncConnection[Any], ranges: list[tuple[int, int]], *, frontier_of: int = 0
) -> tuple[list[bytes], dict[tuple[int, int], bytes]]:
    """The hashes of `ranges` (the ranges of a proof) and the tiles read for them, which also
    hold the frontier of the tree of `frontier_of` leaves; one round trip."""
    subtrees = [perfect_subtrees(start, end) for start, end in ranges]
    keys = tiles_for(node for nodes in subtrees for node in nodes) | frontier_tiles(frontier_of)
    tiles = await read_tiles(conn, keys)
    try:
        hashes = [fold([node_from_tiles(tiles, node) for node in nodes]) for nodes in subtrees]
    except TileError as error:
        raise LogCorruptError(None, f"{TILES}: {error}") from None
    return hashes, tiles


async def sign_checkpoint(
    conn: psycopg.AsyncConnection[Any],
    *,
    signer: Signer,
    origin: str,
    mac_key: bytes,
    lock: Callable[[psycopg.AsyncConnection[Any]], Awaitable[bool]],
) -> Signed:
    """Sign a checkpoint of the whole log if the latest does not cover it (module doc), under
    the signing lock `lock` takes (False: another replica holds it). Raises LogCorruptError when
    what it reads is not what the server wrote; then nothing is signed."""
    refusing = "refusing to sign a checkpoint"
    async with conn.transaction():
        if not await lock(conn):
            return Signed(0, busy=True)
        row = await latest_checkpoint_row(conn)
        latest: Checkpoint | None = None
        if row is not None:
            latest = verify_checkpoint_row(row, signer.verifier, origin)
        signed_size = latest.size if latest is not None else 0
        state = await read_state(conn)
        if state.size < signed_size:
            raise LogCorruptError(
                state.size,
                f"{STATE} says the log holds {state.size} records, fewer than the latest signed "
                f"checkpoint's {signed_size}: it was rolled back; {refusing}",
            )
        if state.size == signed_size:
            return Signed(signed_size)
        frontier, chain = await _resume_at(conn, latest, refusing)
        walk = _Walk(
            frontier, mac_key=mac_key, origin=origin, trusted_below=signed_size, chain=chain
        )
        try:
            await stream(
                conn,
                "privscore_audit_sign",
                _ENTRIES_FROM,
                (signed_size, state.size),
                walk.feed,
            )
        except LogCorruptError as error:
            raise _refused(error, refusing) from None
        if frontier.size != state.size:
            raise LogCorruptError(
                frontier.size,
                f"{ENTRIES} holds records only up to {frontier.size} but {STATE} says "
                f"{state.size}: records were deleted; {refusing}",
            )
        if walk.rotated_to is not None and walk.rotated_to != signer.verifier:
            raise AuditError(
                f"{ENTRIES}: a key rotation hands the log to audit key "
                f"{walk.rotated_to.key_id.hex()}, not this server's; {refusing}"
            )
        root = frontier.root()
        if root != state.root or walk.chain != state.chain:
            raise LogCorruptError(
                state.size - 1,
                f"{STATE}: its chain value or root is not the one the records give: the state "
                f"row or the tiles were edited; {refusing}",
            )
        note = format_checkpoint(origin, state.size, root, signers=[signer])
        await conn.execute(
            "INSERT INTO audit_checkpoints (id, tree_size, note) VALUES (%s, %s, %s)",
            (row.id + 1 if row is not None else 0, state.size, note.encode()),
        )
    return Signed(state.size, signed=True)


async def _resume_at(
    conn: psycopg.AsyncConnection[Any], latest: Checkpoint | None, refusing: str
) -> tuple[TileFrontier, bytes]:
    """The frontier and the chain value at the latest checkpoint, each checked against its
    signed root: the frontier from the tiles, the chain from the record before it, whose
    inclusion at its place the tiles prove. `refusing` ends each error's message."""
    if latest is None or latest.size == 0:
        return TileFrontier(), GENESIS_CHAIN
    last = latest.size - 1
    path = inclusion_path(last, latest.size)
    proof, tiles = await tile_hashes(conn, path, frontier_of=latest.size)
    try:
        frontier = TileFrontier.from_tiles(latest.size, tiles)
    except TileError as error:
        raise LogCorruptError(None, f"{TILES}: {error}; {refusing}") from None
    if frontier.root() != latest.root_hash:
        raise LogCorruptError(
            None,
            f"{TILES}: the tiles do not give the latest signed checkpoint's root (size "
            f"{latest.size}): they were edited; {refusing}",
        )
    found = await (
        await conn.execute("SELECT envelope FROM audit_entries WHERE sequence = %s", (last,))
    ).fetchone()
    if found is None:
        raise LogCorruptError(last, f"{ENTRIES} does not hold it: it was deleted; {refusing}")
    envelope = bytes(found[0])
    try:
        verify_inclusion(envelope, last, latest.size, proof, latest.root_hash)
    except ProofError:
        raise LogCorruptError(
            last, f"{ENTRIES}: it is not the record the latest checkpoint signed; {refusing}"
        ) from None
    return frontier, stored_chain(envelope, last)
