"""Servers on a test database: migrated once, then any number of replicas sharing it.

Replicas of one deployment share its keys (as pods mount one keyring Secret): here they share
one data directory, which in PostgreSQL mode holds only keys, certificates and the published
verifier key; the store and the log are the database's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import PostgresDatabase, ServerProcess, init_dev_keys, privscore_cli

T = TypeVar("T")
# Checkpoints often, so that lookups and `audit verify` see recent records without waiting.
CHECKPOINT_SECONDS = "0.5"


def migrate(database: PostgresDatabase, data_dir: Path) -> None:
    init_dev_keys(data_dir)
    done = privscore_cli(data_dir, "db", "migrate", "--database-url", database.url)
    assert done.returncode == 0, done.stderr


def replica(database: PostgresDatabase, data_dir: Path, *args: str) -> ServerProcess:
    """A server on `database` (migrated), serving once it logs `server.ready`."""
    return ServerProcess(
        data_dir,
        "--database-url",
        database.url,
        "--audit-checkpoint-seconds",
        CHECKPOINT_SECONDS,
        *args,
    )


def verify_database_log(database: PostgresDatabase, data_dir: Path) -> str:
    """`privscore audit verify` against the database, as a reviewer runs it; its output."""
    done = privscore_cli(data_dir, "audit", "verify", "--database-url", database.url)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rows(database: PostgresDatabase, query: str, *parameters: object) -> list[tuple[Any, ...]]:
    with database.connect() as conn:
        return list(conn.execute(query, parameters).fetchall())


def until(check: Callable[[], T | None], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        time.sleep(0.05)
