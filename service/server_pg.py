"""The server's PostgreSQL parts: the pool, the shared audit log, the decision store on it, and
the listener that brings other replicas' alerts to this one's subscribers.

Imported only when `--database-url` is set, so the embedded server runs without psycopg.
Start-up refuses (StartupError, naming the database but never its password) when the
database cannot be reached, its schema is not the one this code runs on (`privscore db
migrate` applies it), or its log is not this deployment's; a database that goes away later
does not stop the server: health turns NOT_SERVING, calls answer UNAVAILABLE, and both come
back by themselves when the database does (`healthy`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.api.ledger import FailClosedAudit
from service.api.pg_ledger import PgLedger
from service.audit import AuditError, Signer
from service.audit.pg import PgAuditLog, establish_identity
from service.audit.pg.tables import describe
from service.config import ConfigError, ServerSettings
from service.db.connect import DatabaseUnavailable, open_async_pool
from service.db.schema import SchemaError, check_schema_async
from service.db.settings import ConnectionKwargs, connection_kwargs
from service.decisions.alert_stream import AlertStream
from service.decisions.pg_alerts import AlertListener
from service.decisions.pg_store import PgDecisionStore
from service.decisions.rows import StoreError
from service.privacy.digest import derive_audit_mac_key, derive_state_key
from service.server import StartupError

# A call waits this long for a pooled connection before answering UNAVAILABLE: longer than a
# busy moment, shorter than a caller's usual deadline.
POOL_WAIT_SECONDS = 5.0
HEALTH_CHECK_SECONDS = 2.0

log = structlog.get_logger("privscore.server")


@dataclass
class DatabaseParts:
    kwargs: ConnectionKwargs
    pool: psycopg_pool.AsyncConnectionPool
    audit_log: PgAuditLog
    ledger: PgLedger
    listener: AlertListener | None = None

    def listen(self, stream: AlertStream) -> None:
        """Advance `stream` with the alerts every replica commits."""
        self.listener = AlertListener(self.kwargs, stream, self.ledger.last_alert_sequence)
        self.listener.start()

    async def healthy(self) -> bool:
        """The log takes records and the database answers a query within a moment; while not,
        the ledger refuses calls at once."""
        answers = await self._answers()
        if not answers:
            self.audit_log.unreachable()
        healthy = answers and not self.audit_log.failed
        self.ledger.down = not healthy
        return healthy

    async def _answers(self) -> bool:
        try:
            async with asyncio.timeout(HEALTH_CHECK_SECONDS):
                async with self.pool.connection(timeout=HEALTH_CHECK_SECONDS) as conn:
                    await conn.execute("SELECT 1")
        except (TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout):
            return False
        return True

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        await self.pool.close()


async def open_database(
    settings: ServerSettings,
    *,
    signing_key: Ed25519PrivateKey,
    secret: bytes,
    on_audit_failure: Callable[[], Awaitable[None]],
    on_durable: Callable[[Sequence[Mapping[str, Any]]], None] | None = None,
) -> DatabaseParts:
    try:
        kwargs = connection_kwargs(settings.database)
    except ConfigError as error:
        raise StartupError(str(error)) from None
    assert kwargs is not None  # a database URL is set
    try:
        pool = await open_async_pool(
            kwargs, min_size=2, max_size=settings.database_pool_size, timeout_s=POOL_WAIT_SECONDS
        )
    except DatabaseUnavailable as error:
        raise StartupError(f"database: {error}") from None
    try:
        audit_log = await _open_log(pool, kwargs, settings, signing_key, secret)
    except BaseException:
        await pool.close()
        raise
    audit = FailClosedAudit(audit_log, on_audit_failure, on_durable)
    store = PgDecisionStore(pool, derive_state_key(secret))
    try:
        await _fill(store, kwargs)
    except BaseException:
        # The start is refused for the fill's error; closing can only add a checkpoint.
        with contextlib.suppress(AuditError):
            await audit_log.close()
        await pool.close()
        raise
    ledger = PgLedger(store, audit)
    log.info(
        "database.opened",
        database=kwargs.describe(),
        origin=audit_log.origin,
        records=audit_log.recovery.size,
        checkpointed=audit_log.recovery.checkpointed,
        key_id=audit_log.verifier.key_id.hex(),
    )
    return DatabaseParts(kwargs, pool, audit_log, ledger)


async def _fill(store: PgDecisionStore, kwargs: ConnectionKwargs) -> None:
    """What the migrations left for a server to fill (it opens sealed rows), before serving:
    a limit decision must find the alerts of schema 1 open."""
    try:
        filled = await store.fill_alert_states()
    except StoreError as error:  # a row that does not open: named by table, never by value
        raise StartupError(f"decision store in {kwargs.describe()}: {error}") from None
    except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
        # By class and SQLSTATE: a statement's message can quote a row.
        raise StartupError(
            f"database {kwargs.describe()}: filling alert states: {describe(error)}"
        ) from None
    if filled is not None:
        log.info("database.alert_states_filled", rows=filled)


async def _open_log(
    pool: psycopg_pool.AsyncConnectionPool,
    kwargs: ConnectionKwargs,
    settings: ServerSettings,
    signing_key: Ed25519PrivateKey,
    secret: bytes,
) -> PgAuditLog:
    """The database's log, checked whole before anything is appended."""
    where = kwargs.describe()
    try:
        async with pool.connection() as conn:
            await check_schema_async(conn)  # before anything reads or writes a table
            identity = await establish_identity(conn, settings.audit_origin)
        options: dict[str, Any] = {
            "checkpoint_seconds": settings.audit_checkpoint_seconds,
            # `latest`: serve once the tail is checked; the rest is checked right after.
            "full_check": settings.audit_open_check == "full",
        }
        return await PgAuditLog.open(
            pool,
            signer=Signer(identity.key_name, signing_key),
            mac_key=derive_audit_mac_key(secret),
            origin=identity.origin,
            **options,
        )
    except SchemaError as error:
        raise StartupError(f"database {where}: {error}") from None
    except AuditError as error:
        raise StartupError(f"audit log in {where}: {error}") from None
    except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
        raise StartupError(
            f"database {where}: {kwargs.scrub(str(error)) or type(error).__name__}"
        ) from None
