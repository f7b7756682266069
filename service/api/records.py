"""Finding decision records in the audit log while serving, for the customer's rights: one
decision by id (its explanation), every record of a subject (its export).

The subject of a format-3 record is known only by the id of its subject key, which the store
lists per subject, so a subject's records are the records naming one of its key ids. Both
backends search the whole log for them: an export is a rare privacy-office call, and an index
by subject key would be one more place a subject's trail outlives its erasure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.audit import StoredRecord, records_containing
from service.audit.record import SUBJECT_KEY

if TYPE_CHECKING:  # the embedded default runs without the postgres extra installed
    import psycopg_pool


def decision_needle(decision_id: str) -> bytes:
    return b'"decision_id":"' + decision_id.encode() + b'"'


def key_needle(key_id: str) -> bytes:
    return b'"' + SUBJECT_KEY.encode() + b'":"' + key_id.encode() + b'"'


class RecordFinder(Protocol):
    async def by_decision(self, decision_id: str) -> StoredRecord | None:
        """The decision record (not a refusal) with this decision id, or None."""
        ...

    async def by_subject_keys(self, key_ids: Sequence[str]) -> list[StoredRecord]:
        """Every record sealed under one of these subject keys, in log order."""
        ...

    async def mentioning(self, decision_id: str) -> list[StoredRecord]:
        """Every record naming this decision id anywhere (the decision, its outcomes, its
        explanations), in log order."""
        ...


def _decision(found: list[StoredRecord], decision_id: str) -> StoredRecord | None:
    """The record a needle matched that really is the decision: the needle can match inside
    another record (an explanation names the decision it explains) or a refusal."""
    for stored in found:
        record = stored.record
        if record.get("decision_id") == decision_id and record.get("outcome") != "refused":
            return stored
    return None


class FileRecords:
    """The file log's records, read beside the writer (a torn final frame ends a pass)."""

    def __init__(self, audit_dir: Path) -> None:
        self._dir = audit_dir

    async def by_decision(self, decision_id: str) -> StoredRecord | None:
        return _decision(await self.mentioning(decision_id), decision_id)

    async def mentioning(self, decision_id: str) -> list[StoredRecord]:
        needle = decision_needle(decision_id)
        return await asyncio.to_thread(lambda: list(records_containing(self._dir, [needle])))

    async def by_subject_keys(self, key_ids: Sequence[str]) -> list[StoredRecord]:
        if not key_ids:
            return []
        needles = [key_needle(key_id) for key_id in key_ids]
        found = await asyncio.to_thread(lambda: list(records_containing(self._dir, needles)))
        return [s for s in found if s.record.get(SUBJECT_KEY) in key_ids]


class PgRecords:
    """The database log's records: a decision through the log's decision index, a subject's
    by scanning the entries for its key ids."""

    _BY_DECISION = (
        "SELECT e.sequence, e.envelope FROM audit_decisions d "
        "JOIN audit_entries e ON e.sequence = d.sequence WHERE d.decision_id = %s"
    )
    _BY_NEEDLE = (
        "SELECT sequence, envelope FROM audit_entries "
        "WHERE position(%s::bytea in envelope) > 0 ORDER BY sequence"
    )

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self._pool = pool

    async def by_decision(self, decision_id: str) -> StoredRecord | None:
        from service.audit.pg.lookup import indexable

        key = indexable(decision_id)
        if key is None:
            return None
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(self._BY_DECISION, (key,))).fetchall()
        return _decision([_stored(row) for row in rows], decision_id)

    async def mentioning(self, decision_id: str) -> list[StoredRecord]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._BY_NEEDLE, (decision_needle(decision_id),))
            return [_stored(row) for row in await cursor.fetchall()]

    async def by_subject_keys(self, key_ids: Sequence[str]) -> list[StoredRecord]:
        found: dict[int, StoredRecord] = {}
        async with self._pool.connection() as conn:
            for key_id in key_ids:
                cursor = await conn.execute(self._BY_NEEDLE, (key_needle(key_id),))
                for row in await cursor.fetchall():
                    stored = _stored(row)
                    if stored.record.get(SUBJECT_KEY) == key_id:
                        found[stored.sequence] = stored
        return [found[sequence] for sequence in sorted(found)]


def _stored(row: Any) -> StoredRecord:
    envelope = bytes(row[1])
    return StoredRecord(int(row[0]), json.loads(envelope)["record"], envelope)
