"""The ledger on PostgreSQL: decision rows written inside the audit log's batch transaction
(service/api/ledger.py says why), reads through the pool.

Imported only when a database is configured: psycopg is an optional extra.

A database that cannot be reached or fails a statement answers UNAVAILABLE with
`DATABASE_UNAVAILABLE`, naming no row and no value (SQLSTATE class only, in the log line); the
call may be retried, and nothing was decided. A row that fails its authentication answers
DATA_LOSS as in the embedded store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import psycopg
import psycopg_pool
import structlog

from service.api.ledger import AlertsFor, FailClosedAudit, LimitRow, ResponseFor, tampered
from service.decisions.alert_rules import Event
from service.decisions.pg_store import PgDecisionStore
from service.decisions.rows import StoredLimitDecision, StoreTampered
from service.errors import Unavailable

_log = structlog.get_logger("privscore.store")


def database_unavailable(error: BaseException | None) -> Unavailable:
    if error is not None:
        sqlstate = getattr(error, "sqlstate", None)
        _log.warning("store.database_error", error=type(error).__name__, sqlstate=sqlstate)
    return Unavailable(
        "the database is unavailable; nothing was decided, retry shortly",
        reason="DATABASE_UNAVAILABLE",
    )


@contextlib.asynccontextmanager
async def _database(down: bool = False) -> AsyncIterator[None]:
    if down:  # known down: answer now rather than wait for a connection in vain
        raise database_unavailable(None)
    try:
        yield
    except StoreTampered as error:
        raise tampered(error) from None
    except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
        raise database_unavailable(error) from None


class PgLedger:
    def __init__(self, store: PgDecisionStore, audit: FailClosedAudit) -> None:
        self._store = store
        self._audit = audit
        # Set by the server's health watch while the database does not answer: calls are
        # refused at once instead of each waiting out the pool.
        self.down = False

    @property
    def audit(self) -> FailClosedAudit:
        return self._audit

    async def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        async with _database(self.down):
            return await self._store.limit_decision(tenant, request_id)

    async def last_increase_at(self, tenant: str, pseudonym: str) -> dt.datetime | None:
        async with _database(self.down):
            return await self._store.last_increase_at(tenant, pseudonym)

    async def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool:
        async with _database(self.down):
            return await self._store.has_event(tenant, pseudonym, event_id)

    async def events(self, tenant: str, pseudonym: str) -> list[Event]:
        async with _database(self.down):
            return await self._store.events(tenant, pseudonym)

    async def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        async with _database(self.down):
            return await self._store.alerts_after(sequence, limit)

    async def last_alert_sequence(self) -> int:
        async with _database(self.down):
            return await self._store.last_alert_sequence()

    async def commit_limit(
        self,
        record: Mapping[str, Any],
        decision: LimitRow,
        *,
        response: ResponseFor,
        seen_last_increase: dt.datetime | None,
    ) -> int:
        async def store_row(conn: psycopg.AsyncConnection[Any], sequence: int) -> None:
            await self._store.insert_limit_decision(
                conn,
                **decision.columns(),
                response=response(sequence),
                seen_last_increase=seen_last_increase,
            )

        async with _database(self.down):
            return await self._audit.append(record, within=store_row)

    async def commit_event(
        self,
        record: Mapping[str, Any],
        *,
        tenant: str,
        pseudonym: str,
        event: Event,
        duplicate: bool,
        seen_history: Sequence[str],
        alerts: AlertsFor,
        raised_at: dt.datetime,
        forget_before: dt.datetime,
    ) -> tuple[int, list[int]]:
        if duplicate:
            async with _database(self.down):
                return await self._audit.append(record), []
        numbered: list[int] = []

        async def store_rows(conn: psycopg.AsyncConnection[Any], sequence: int) -> None:
            numbered[:] = await self._store.insert_event(
                conn,
                tenant=tenant,
                pseudonym=pseudonym,
                event=event,
                seen_history=seen_history,
                alerts=alerts(sequence),
                raised_at=raised_at,
                forget_before=forget_before,
            )

        async with _database(self.down):
            sequence = await self._audit.append(record, within=store_rows)
        return sequence, numbered

    def close(self) -> None:
        """The pool is the server's, closed after the audit log."""
