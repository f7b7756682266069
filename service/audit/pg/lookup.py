"""Lookups in the database log that do not grow with it: a decision's record and its inclusion
proof against the latest checkpoint in four point reads (the checkpoint, the decision's index
row joined to its entry, the tiles), and consistency proofs between two sizes from the tiles.

Nothing read is taken on trust. The record must be the sequence the index names and hold the
decision id asked about, and the proof, built from tiles anyone with write access could edit,
must verify against the checkpoint's signed root with the leaf hash recomputed from the bytes
read; else LogCorruptError naming the table and the sequence. The index is written in the
transaction that stores the record, so a decision it lacks is not in the log, unless someone
deleted the row (or the record's decision id is not a UUID in canonical form: such records are
not indexed).
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from service.audit.checkpoint import Checkpoint, VerifierKey
from service.audit.errors import LogCorruptError, NotProvable
from service.audit.merkle import (
    ProofError,
    consistency_path,
    inclusion_path,
    verify_consistency,
    verify_inclusion,
)
from service.audit.pg.check import tile_hashes
from service.audit.pg.tables import DECISIONS, ENTRIES, TILES, latest_checkpoint
from service.audit.storage import StoredRecord

if TYPE_CHECKING:
    import psycopg

_FIND = (
    "SELECT d.sequence, e.envelope FROM audit_decisions d "
    "LEFT JOIN audit_entries e ON e.sequence = d.sequence WHERE d.decision_id = %s"
)


def indexable(decision_id: object) -> uuid.UUID | None:
    """The decision id as `audit_decisions` keeps it: a UUID in canonical lower-case form (what
    the server writes), else None (not indexed)."""
    if not isinstance(decision_id, str):
        return None
    try:
        parsed = uuid.UUID(decision_id)
    except ValueError:
        return None
    return parsed if str(parsed) == decision_id else None


async def prove_decision(
    conn: psycopg.AsyncConnection[Any], decision_id: str, verifier: VerifierKey, origin: str
) -> tuple[Checkpoint, StoredRecord, list[bytes]]:
    """The record of `decision_id` with its inclusion proof against the latest checkpoint
    (verified under `verifier` for `origin`), as `prove_record` gives it for a file log.

    Raises NotProvable (NO_CHECKPOINT, NOT_FOUND, NEWER_THAN_CHECKPOINT) and LogCorruptError
    when the index, the entry or the tiles are not what the signed checkpoint vouches for."""
    checkpoint = await latest_checkpoint(conn, verifier, origin)
    if checkpoint is None or checkpoint.size == 0:
        raise NotProvable(
            "NO_CHECKPOINT", "no signed checkpoint yet; records become provable within seconds"
        )
    key = indexable(decision_id)
    row = None
    if key is not None:
        row = await (await conn.execute(_FIND, (key,))).fetchone()
    if row is None:
        raise NotProvable("NOT_FOUND", "no record has that decision id")
    sequence = int(row[0])
    if row[1] is None:
        raise LogCorruptError(sequence, f"{DECISIONS} names it, but {ENTRIES} does not hold it")
    envelope = bytes(row[1])
    try:
        parsed = json.loads(envelope)
        record = parsed["record"]
        holds = parsed["seq"] == sequence and record.get("decision_id") == decision_id
    except (ValueError, KeyError, TypeError, AttributeError):
        holds = False
    if not holds:
        raise LogCorruptError(
            sequence,
            f"{DECISIONS} points the decision at it, but the record in {ENTRIES} does not hold it",
        )
    stored = StoredRecord(sequence, record, envelope)
    if sequence >= checkpoint.size:
        raise NotProvable(
            "NEWER_THAN_CHECKPOINT",
            f"the record is newer than the latest checkpoint (size {checkpoint.size}); it is "
            "provable after the next checkpoint",
        )
    proof, _ = await tile_hashes(conn, inclusion_path(sequence, checkpoint.size))
    try:
        verify_inclusion(envelope, sequence, checkpoint.size, proof, checkpoint.root_hash)
    except ProofError:
        raise LogCorruptError(
            sequence,
            f"its inclusion proof from {TILES} does not verify against the signed checkpoint "
            f"of size {checkpoint.size}: the record in {ENTRIES} or the tiles were edited",
        ) from None
    return checkpoint, stored, proof


async def consistency_proof(
    conn: psycopg.AsyncConnection[Any], old: Checkpoint, new: Checkpoint
) -> list[bytes]:
    """The proof that the tree of `old` is a prefix of the tree of `new` (two verified
    checkpoints), from the tiles, checked before it is returned."""
    proof, _ = await tile_hashes(conn, consistency_path(old.size, new.size))
    try:
        verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
    except ProofError as error:
        raise LogCorruptError(
            None, f"{TILES}: the consistency proof {old.size} -> {new.size} fails: {error}"
        ) from None
    return proof
