"""`privscore audit export`: the database log as a file-log directory a reviewer verifies offline.

The export is the database's content as it is, not as it should be: one consistent snapshot
(REPEATABLE READ, READ ONLY) of `audit_entries` in sequence order, each envelope framed byte for
byte into segment files, every row of `audit_checkpoints` in order into `checkpoints.log`, and
`audit_log_identity` as `identity.json`. Nothing is checked or repaired on the way, so whatever
was done to the tables (an edited, inserted or deleted record, a rolled-back state) shows in
`privscore audit verify` of the copy exactly as it would in a file log: the same verifier, the
same report. Records are numbered in the files by their place, as the file log numbers them, so
a deleted row shows as the next record out of place.

Files are owner-only (0600, directories 0700), fsynced before the function returns
(service/audit/export.py, which also copies a file log the same way).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from service.audit.errors import AuditError
from service.audit.export import ExportReport, PrivateDirectory
from service.audit.identity import IDENTITY_FILE
from service.audit.log import DEFAULT_SEGMENT_BYTES
from service.audit.pg.check import STREAM_ROWS
from service.audit.storage import CHECKPOINT_FILE, frame, segment_name

if TYPE_CHECKING:
    import psycopg

__all__ = ["ExportReport", "export_log"]


def export_log(
    conn: psycopg.Connection[Any],
    out: str | os.PathLike[str],
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> ExportReport:
    """Write the database log of `conn` (an autocommit connection) to `out`, which must not
    exist or be empty; see the module doc. Raises AuditError when there is no log to export or
    `out` is not empty."""
    writer = PrivateDirectory(out)
    records = checkpoints = segments = total = 0
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        identity = conn.execute(
            "SELECT origin, key_name FROM audit_log_identity WHERE id = 0"
        ).fetchone()
        if identity is None:
            raise AuditError("audit_log_identity has no row: this database holds no audit log")
        document = {"key_name": str(identity[1]), "origin": str(identity[0])}
        writer.write_file(IDENTITY_FILE, json.dumps(document, sort_keys=True).encode() + b"\n")

        fd = writer.create(CHECKPOINT_FILE)
        try:
            for (note,) in conn.execute("SELECT note FROM audit_checkpoints ORDER BY id"):
                writer.write(fd, frame(bytes(note)))
                checkpoints += 1
        finally:
            writer.finish(fd)

        segment_fd: int | None = None
        segment_size = 0
        try:
            with conn.cursor("privscore_audit_export", binary=True) as cursor:
                cursor.itersize = STREAM_ROWS
                cursor.execute("SELECT envelope FROM audit_entries ORDER BY sequence")
                for (envelope,) in cursor:
                    framed = frame(bytes(envelope))
                    if segment_fd is None or (
                        segment_size > 0 and segment_size + len(framed) > segment_bytes
                    ):
                        if segment_fd is not None:
                            writer.finish(segment_fd)
                        segment_fd = writer.create(segment_name(records))
                        segment_size = 0
                        segments += 1
                    writer.write(segment_fd, framed)
                    segment_size += len(framed)
                    total += len(framed)
                    records += 1
        finally:
            if segment_fd is not None:
                writer.finish(segment_fd)
    writer.sync()
    return ExportReport(writer.directory, records, checkpoints, segments, total)
