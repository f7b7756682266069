"""Versioned schema migrations, and the check a server makes before it uses a database.

Migrations ship in the package (`service/db/migrations/NNNN_<name>.sql`, numbered densely from
1) and are applied in order, each in its own transaction together with its row in the version
table `privscore_schema` (version, name, SHA-256 of the file, when). DDL is transactional in
PostgreSQL, so a migration is applied whole or not at all.

Several replicas may run `privscore db migrate` at once: each transaction first takes the
transaction-level advisory lock MIGRATE_LOCK, then reads the version table (under READ
COMMITTED, so it sees what the previous holder committed), and applies only the next pending
migration. The second migrator waits, then finds nothing left to do.

A server calls `check_schema` at start: it refuses a database that is not migrated, is behind
the code, is ahead of it (a newer privscore migrated it), or ran a migration whose text differs
from the one shipped here, naming both versions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import psycopg

SCHEMA_TABLE = "privscore_schema"
# Advisory lock keys: pg_advisory_xact_lock(LOCK_SPACE, purpose), the two-int4 form, so ours
# cannot collide with a single-bigint lock another application takes. LOCK_SPACE is "priv".
LOCK_SPACE = 0x70726976
MIGRATE_LOCK = 1  # held by a migration's transaction
CHECKPOINT_LOCK = 2  # reserved: the replica that signs the audit log's checkpoints
DEFAULT_LOCK_TIMEOUT_S = 300.0
_FILE_NAME = re.compile(r"([0-9]{4})_([a-z0-9_]+)\.sql")
_CREATE_SCHEMA_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (
    version integer PRIMARY KEY CHECK (version > 0),
    name text NOT NULL,
    sha256 bytea NOT NULL CHECK (octet_length(sha256) = 32),
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_READ_APPLIED = f"SELECT version, name, sha256, applied_at FROM {SCHEMA_TABLE} ORDER BY version"
_HAS_SCHEMA_TABLE = "SELECT to_regclass(%s) IS NOT NULL"

_log = structlog.get_logger("privscore.db")


class SchemaError(RuntimeError):
    """The database's schema is not the one this code runs on (or a migration failed)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.sql.encode("utf-8")).digest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    sha256: bytes
    applied_at: dt.datetime


def load_migrations() -> tuple[Migration, ...]:
    """The shipped migrations in order; refuses a gap, a duplicate or a stray file name."""
    found: dict[int, Migration] = {}
    for entry in resources.files("service.db.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise SchemaError(f"migration file {entry.name} is not named NNNN_<name>.sql")
        version = int(match[1])
        if version in found:
            raise SchemaError(f"two migration files are numbered {version:04d}")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"migrations must be numbered 1, 2, ... without gaps: {versions}")
    return tuple(found[version] for version in versions)


MIGRATIONS = load_migrations()
SCHEMA_VERSION = MIGRATIONS[-1].version  # the version this code runs on


@dataclass(frozen=True)
class SchemaStatus:
    """What a database holds compared with the migrations this code ships."""

    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]
    problems: tuple[str, ...]  # why the database must not be used or migrated by this code

    @property
    def version(self) -> int:
        """The database's schema version: the highest migration applied, 0 if none."""
        return self.applied[-1].version if self.applied else 0

    @property
    def current(self) -> bool:
        return not self.pending and not self.problems


def judge(
    applied: Sequence[AppliedMigration], shipped: Sequence[Migration] = MIGRATIONS
) -> SchemaStatus:
    """Compare what a database ran with what this code ships (no database needed)."""
    known = {migration.version: migration for migration in shipped}
    latest = shipped[-1].version if shipped else 0
    problems = []
    newer = [row.version for row in applied if row.version not in known]
    if newer:
        problems.append(
            f"the database's schema version {max(newer)} is newer than this privscore knows "
            f"({latest}): run a privscore release that ships migration {max(newer):04d}"
        )
    for row in applied:
        migration = known.get(row.version)
        if migration is not None and migration.sha256 != row.sha256:
            problems.append(
                f"migration {migration.label} applied to the database differs from the one "
                f"this privscore ships (SHA-256 {row.sha256.hex()[:16]}... there, "
                f"{migration.sha256.hex()[:16]}... here)"
            )
    versions = [row.version for row in applied]
    if versions != list(range(1, len(versions) + 1)):
        problems.append(f"the database's applied migrations are not 1, 2, ...: {versions}")
    done = set(versions)
    pending = tuple(migration for migration in shipped if migration.version not in done)
    return SchemaStatus(tuple(applied), pending, tuple(problems))


def _rows(rows: Sequence[tuple[Any, ...]]) -> list[AppliedMigration]:
    return [AppliedMigration(int(v), str(n), bytes(h), a) for v, n, h, a in rows]


def schema_status(conn: psycopg.Connection[Any]) -> SchemaStatus:
    """The database's schema compared with this code's; reads only."""
    with conn.transaction():
        present = conn.execute(_HAS_SCHEMA_TABLE, (SCHEMA_TABLE,)).fetchone()
        if not present or not present[0]:
            return judge([])
        return judge(_rows(conn.execute(_READ_APPLIED).fetchall()))


async def schema_status_async(conn: psycopg.AsyncConnection[Any]) -> SchemaStatus:
    async with conn.transaction():
        present = await (await conn.execute(_HAS_SCHEMA_TABLE, (SCHEMA_TABLE,))).fetchone()
        if not present or not present[0]:
            return judge([])
        return judge(_rows(await (await conn.execute(_READ_APPLIED)).fetchall()))


def refusal(status: SchemaStatus) -> SchemaError | None:
    """Why a server of this code must not run on a database in `status`, or None."""
    if status.problems:
        return SchemaError("; ".join(status.problems))
    if status.version == 0:
        return SchemaError(
            f"the database is not migrated (schema version 0; this privscore needs "
            f"{SCHEMA_VERSION}): run `privscore db migrate`"
        )
    if status.pending:
        return SchemaError(
            f"the database's schema version {status.version} is older than this privscore "
            f"needs ({SCHEMA_VERSION}): run `privscore db migrate`"
        )
    return None


def check_schema(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version if this code can run on it; else SchemaError naming the
    database's version and this code's."""
    status = schema_status(conn)
    error = refusal(status)
    if error is not None:
        raise error
    return status.version


async def check_schema_async(conn: psycopg.AsyncConnection[Any]) -> int:
    """`check_schema` on an asyncio connection (a server's pool)."""
    status = await schema_status_async(conn)
    error = refusal(status)
    if error is not None:
        raise error
    return status.version


def migrate(
    conn: psycopg.Connection[Any],
    *,
    shipped: Sequence[Migration] = MIGRATIONS,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[Migration]:
    """Apply every pending migration, each in its own transaction under the migration lock;
    returns those this call applied (none if another migrator got there first). Refuses, and
    changes nothing, a database `judge` finds problems with. `conn` must not be inside a
    transaction."""
    applied: list[Migration] = []
    while (step := _apply_next(conn, shipped, lock_timeout_s)) is not None:
        applied.append(step)
        _log.info("db.migration_applied", version=step.version, name=step.name)
    return applied


def _apply_next(
    conn: psycopg.Connection[Any], shipped: Sequence[Migration], lock_timeout_s: float
) -> Migration | None:
    """One transaction: take the lock, apply the next pending migration and record it; the
    migration applied, or None when none is pending."""
    import psycopg

    step: Migration | None = None
    try:
        with conn.transaction():
            # Before any other statement, so the lock wait precedes the snapshot.
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_s * 1000)}ms",)
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, MIGRATE_LOCK))
            conn.execute(_CREATE_SCHEMA_TABLE)
            status = judge(_rows(conn.execute(_READ_APPLIED).fetchall()), shipped)
            if status.problems:
                raise SchemaError("; ".join(status.problems))
            if not status.pending:
                return None
            step = status.pending[0]
            conn.execute(step.sql.encode("utf-8"))
            conn.execute(
                f"INSERT INTO {SCHEMA_TABLE} (version, name, sha256) VALUES (%s, %s, %s)",
                (step.version, step.name, step.sha256),
            )
    except psycopg.errors.LockNotAvailable:
        raise SchemaError(
            f"another migrator held the migration lock for over {lock_timeout_s:g} s"
        ) from None
    except psycopg.DatabaseError as error:
        failed = f"migration {step.label}" if step is not None else "migrating"
        raise SchemaError(f"{failed} failed: {_first_line(error)}") from None
    return step


def _first_line(error: BaseException) -> str:
    """A server error's primary message (its SQL state and first line), which names objects
    of the schema, never connection parameters."""
    sqlstate = getattr(error, "sqlstate", None)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text
