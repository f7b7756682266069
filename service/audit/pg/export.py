"""`privscore audit export`: the database log as a file-log directory a reviewer verifies offline.

The export is the database's content as it is, not as it should be: one consistent snapshot
(REPEATABLE READ, READ ONLY) of `audit_entries` in sequence order, each envelope framed byte for
byte into segment files, every row of `audit_checkpoints` in order into `checkpoints.log`, and
`audit_log_identity` as `identity.json`. Nothing is checked or repaired on the way, so whatever
was done to the tables (an edited, inserted or deleted record, a rolled-back state) shows in
`privscore audit verify` of the copy exactly as it would in a file log: the same verifier, the
same report. Records are numbered in the files by their place, as the file log numbers them, so
a deleted row shows as the next record out of place.

Files are owner-only (0600, directories 0700), fsynced before the function returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.audit.errors import AuditError
from service.audit.identity import IDENTITY_FILE
from service.audit.log import DEFAULT_SEGMENT_BYTES
from service.audit.pg.check import STREAM_ROWS
from service.audit.storage import CHECKPOINT_FILE, frame, segment_name

if TYPE_CHECKING:
    import psycopg

_FILE_MODE = 0o600
_DIR_MODE = 0o700


@dataclass(frozen=True)
class ExportReport:
    directory: Path
    records: int
    checkpoints: int
    segments: int
    bytes: int  # of the segment files


class _Writer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: list[Path] = []

    def create(self, name: str) -> int:
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        os.fchmod(fd, _FILE_MODE)  # whatever the umask
        self.written.append(path)
        return fd

    @staticmethod
    def write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    @staticmethod
    def finish(fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_log(
    conn: psycopg.Connection[Any],
    out: str | os.PathLike[str],
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> ExportReport:
    """Write the database log of `conn` (an autocommit connection) to `out`, which must not
    exist or be empty; see the module doc. Raises AuditError when there is no log to export or
    `out` is not empty."""
    directory = Path(out)
    if directory.exists() and any(directory.iterdir()):
        raise AuditError(f"{directory} is not empty: export into a new directory")
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, _DIR_MODE)
    writer = _Writer(directory)
    records = checkpoints = segments = total = 0
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        identity = conn.execute(
            "SELECT origin, key_name FROM audit_log_identity WHERE id = 0"
        ).fetchone()
        if identity is None:
            raise AuditError("audit_log_identity has no row: this database holds no audit log")
        fd = writer.create(IDENTITY_FILE)
        document = {"key_name": str(identity[1]), "origin": str(identity[0])}
        writer.write(fd, json.dumps(document, sort_keys=True).encode() + b"\n")
        writer.finish(fd)

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
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return ExportReport(directory, records, checkpoints, segments, total)
