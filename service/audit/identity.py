"""Which log a directory holds: its origin and the name its keys sign under.

Each deployment's log has its own origin (a transparency witness tells logs apart by it), kept
in `identity.json` beside the segments from the first open on. A witness names a log's key by
the log's origin, so a new log signs under its origin. A log written before this file existed
keeps the origin and key name its checkpoints already carry, so it stays verifiable.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from service.audit.checkpoint import (
    CheckpointError,
    check_key_name,
    check_origin,
    parse_body,
    signer_names,
    split_note,
)
from service.audit.errors import AuditError
from service.audit.storage import read_checkpoint_notes

IDENTITY_FILE = "identity.json"
ORIGIN_PREFIX = "privscore.audit/"


@dataclass(frozen=True)
class LogIdentity:
    origin: str
    key_name: str


def new_origin() -> str:
    """A fresh origin, unique to one data directory."""
    return ORIGIN_PREFIX + secrets.token_hex(8)


def read_identity(directory: Path) -> LogIdentity | None:
    """The identity of the log in `directory`: its file, else what its checkpoints carry (a log
    from before the file), else None (no log yet)."""
    path = directory / IDENTITY_FILE
    if path.exists():
        try:
            document = json.loads(path.read_bytes())
            identity = LogIdentity(document["origin"], document["key_name"])
            check_origin(identity.origin)
            check_key_name(identity.key_name)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise AuditError(f"{path} is not a log identity: {error}") from None
        return identity
    notes, _ = read_checkpoint_notes(directory) if directory.exists() else ([], None)
    if not notes:
        return None
    try:
        text = notes[0].decode("utf-8")
        return LogIdentity(parse_body(split_note(text)[0])[0], signer_names(text)[0])
    except (UnicodeDecodeError, CheckpointError, IndexError) as error:
        raise AuditError(f"{directory}: the first checkpoint is unreadable: {error}") from None


def establish_identity(directory: Path, origin: str | None) -> LogIdentity:
    """The log's identity, written down on first use: `origin` if given (it must match a log
    that already has one), else a new unique origin. Its key name is its origin."""
    found = read_identity(directory)
    if found is not None and origin is not None and found.origin != origin:
        raise AuditError(
            f"{directory} holds the log of {found.origin!r}; the configured origin is {origin!r}"
        )
    if found is None:
        fresh = origin or new_origin()
        found = LogIdentity(fresh, fresh)
    identity = found
    path = directory / IDENTITY_FILE
    if not path.exists():
        check_origin(identity.origin)
        check_key_name(identity.key_name)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(identity.__dict__, sort_keys=True).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    return identity
