"""`privscore audit export --out DIR`: a log as a file-log directory a reviewer verifies offline.

What `privscore audit verify` reads, and nothing else: the segment files, `checkpoints.log` and
`identity.json` (the lookup index is derived data a copy does not need). From a file log,
`copy_log` copies those files byte for byte; from the database, service/audit/pg/export.py
writes the same files from the tables. Either way the copy is the log as it is, not as it
should be: nothing is checked or repaired on the way, so whatever was done to it shows in
`audit verify` of the copy exactly as in the original.

The directory must be new or empty; it is made owner-only (0700) and every file in it 0600
whatever the umask, each fsynced, then the directory, before the export returns.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from service.audit.errors import AuditError
from service.audit.identity import IDENTITY_FILE
from service.audit.storage import CHECKPOINT_FILE, list_segments

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class ExportReport:
    directory: Path
    records: int  # whole frames in the segment files (a torn or garbled tail is not counted)
    checkpoints: int  # whole frames in checkpoints.log
    segments: int
    bytes: int  # of the segment files


class PrivateDirectory:
    """A new or empty directory, made 0700, whose files are created 0600 and fsynced."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        directory = Path(out)
        if directory.exists() and any(directory.iterdir()):
            raise AuditError(f"{directory} is not empty: export into a new directory")
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, _DIR_MODE)
        self.directory = directory

    def create(self, name: str) -> int:
        """A new file `name` in the directory, open for writing; FileExistsError if any."""
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        os.fchmod(fd, _FILE_MODE)  # whatever the umask
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

    def write_file(self, name: str, data: bytes) -> None:
        fd = self.create(name)
        try:
            self.write(fd, data)
        finally:
            self.finish(fd)

    def sync(self) -> None:
        """fsync the directory, so the files' names are durable too."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def count_frames(data: bytes) -> int:
    """Whole frames from the start of `data` by their length fields (CRCs are not checked:
    that is the verifier's work), up to the first that does not fit."""
    count = offset = 0
    while offset + 8 <= len(data):
        (length,) = _U32.unpack_from(data, offset)
        if length == 0 or offset + 8 + length > len(data):
            break
        offset += 8 + length
        count += 1
    return count


def copy_log(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> ExportReport:
    """Copy what `audit verify` reads of the file log in `source` to `out` (module doc).

    A server may be appending meanwhile: `checkpoints.log` is copied first, so every checkpoint
    in the copy covers records that were durable before it was signed and are therefore in the
    segments copied after it; a record being written as its segment is copied leaves a torn
    tail in the copy, which `audit verify` reports as such. Raises AuditError when `source`
    holds no log or `out` is not empty."""
    directory = Path(source)
    if not directory.is_dir() or not (
        list_segments(directory)
        or (directory / CHECKPOINT_FILE).exists()
        or (directory / IDENTITY_FILE).exists()
    ):
        raise AuditError(f"no audit log in {directory}")
    target = PrivateDirectory(out)
    checkpoints = 0
    for name in (CHECKPOINT_FILE, IDENTITY_FILE):
        try:
            data = (directory / name).read_bytes()
        except FileNotFoundError:
            continue  # a log from before identity.json; one without a checkpoint yet
        target.write_file(name, data)
        if name == CHECKPOINT_FILE:
            checkpoints = count_frames(data)
    records = segments = total = 0
    for _, path in list_segments(directory):
        data = path.read_bytes()
        target.write_file(path.name, data)
        records += count_frames(data)
        segments += 1
        total += len(data)
    target.sync()
    return ExportReport(target.directory, records, checkpoints, segments, total)
