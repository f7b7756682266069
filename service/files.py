"""Owner-only files and directories: everything the server and CLI create under the data directory.

The data directory holds keys, certificates, the decision store and the audit log, so every
directory we create is 0700 and every file 0600, whatever the umask. A mode given to mkdir or
open passes through the umask, which can only remove bits, so each helper sets the mode again
after creating: in between, the entry is only ever more restrictive than intended, never more
open. Public material (the public keyset, CA certificate, audit verification key) is no
exception: callers receive copies; nothing here is meant to be read by other local users.

An existing directory is left as it is: `--data-dir` and `--keyring` may name a directory the
operator owns and shares (a home directory, a mounted volume whose root belongs to another
user), which is not ours to change.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and its missing parents as 0700; an existing directory is left alone."""
    missing = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, left as it is
        os.chmod(directory, DIR_MODE)
    return path


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, 0600: a temporary file beside it, fsynced, renamed
    over it, and the directory fsynced, so a crash leaves the old file or the new one whole.

    The temporary file's name is this call's own (process id and a random part): processes
    that write one file at once (workers publishing the same key) each rename a whole file of
    their own, and the last rename wins."""
    private_dir(path.parent)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _fsync_directory(path.parent)


def create_private(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, 0600, fsynced; FileExistsError if it exists (for keys that
    must never be replaced)."""
    private_dir(path.parent)
    _write_new(path, data)
    _fsync_directory(path.parent)


def _write_new(path: Path, data: bytes) -> None:
    """A new file holding `data`, 0600 whatever the umask, fsynced; FileExistsError if any."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(descriptor, FILE_MODE)
        _write_all(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def private_file(path: Path, *, create: bool = True) -> None:
    """Make sure `path` is 0600 without touching its contents: created empty if missing (unless
    `create` is false), tightened if it exists and is ours. For files another library opens by
    name afterwards, such as SQLite's database (its -wal and -shm take the database's mode)."""
    if create:
        private_dir(path.parent)
    flags = os.O_RDONLY | (os.O_CREAT if create else 0)
    try:
        descriptor = os.open(path, flags, FILE_MODE)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        if os.fstat(descriptor).st_uid == os.geteuid():
            os.fchmod(descriptor, FILE_MODE)
    finally:
        os.close(descriptor)
