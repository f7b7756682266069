"""Keys, records and logs for the audit tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import AuditLog, Checkpoint, Signer, VerifierKey, latest_checkpoint
from service.audit.index import CHUNKS_FILE, DECISIONS_DB, INDEX_DIR, POSITIONS_FILE

ORIGIN = "privscore.audit/test-instance"
KEY_NAME = "privscore.audit/test-instance"
# The server's record MAC key; any 32 bytes serve in these tests.
MAC_KEY = bytes(range(32))


def verifier(key: Ed25519PrivateKey, name: str = KEY_NAME) -> VerifierKey:
    return VerifierKey(name, key.public_key())


def signer(key: Ed25519PrivateKey, name: str = KEY_NAME) -> Signer:
    return Signer(name, key)


def make_record(n: int) -> dict[str, Any]:
    """A decision record shaped like the server's: ids, pseudonym, UTC time, opaque outputs."""
    return {
        "decision_id": f"dec-{n:04d}",
        "subject": f"pseudo-{n % 3}",
        "time": f"2026-11-26T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "rpc": "Score",
        "outputs": {"score": 600 + n, "reasons": ["R1", "R7"]},
    }


def copy_log(source: Path, target: Path) -> Path:
    """A copy of a log its writer may still have open, index included: what a crash at this
    moment would leave."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_dir():
            copy_log(path, target / path.name)
        else:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def index_contents(directory: Path) -> dict[str, Any]:
    """Every file of the index, and the database's rows, for comparing two indexes."""
    index = directory / INDEX_DIR
    files = {
        path.name: path.read_bytes()
        for path in sorted(index.iterdir())
        if path.name in (POSITIONS_FILE, CHUNKS_FILE) or path.name.startswith("level-")
    }
    with sqlite3.connect(index / DECISIONS_DB) as db:
        rows = db.execute("SELECT seq, decision_id FROM decisions ORDER BY seq").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    return {"files": files, "rows": rows, "meta": meta}


def latest(directory: Path, key: Ed25519PrivateKey) -> Checkpoint:
    """The log's newest checkpoint, which the test expects to exist."""
    checkpoint = latest_checkpoint(directory, verifier(key), ORIGIN)
    assert checkpoint is not None
    return checkpoint


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def open_log(signing_key: Ed25519PrivateKey) -> Iterator[Callable[..., AuditLog]]:
    """Opens logs with the test key and closes whatever a test left open."""
    opened: list[AuditLog] = []

    def open_(directory: Path, **options: Any) -> AuditLog:
        defaults: dict[str, Any] = {
            "signer": signer(signing_key),
            "mac_key": MAC_KEY,
            "origin": ORIGIN,
        }
        log = AuditLog(directory, **(defaults | options))
        opened.append(log)
        return log

    yield open_
    for log in opened:
        log.close_sync()


@pytest.fixture
def write_log(open_log: Callable[..., AuditLog]) -> Callable[..., Path]:
    """Writes records 0..count-1 one by one and closes the log (a final checkpoint)."""

    def write(directory: Path, count: int, **options: Any) -> Path:
        log = open_log(directory, **options)
        for n in range(count):
            log.append_sync(make_record(n))
        log.close_sync()
        return directory

    return write
