"""The ledger on PostgreSQL: decision rows written inside the audit log's batch transaction
(service/api/ledger.py says why), reads through the pool.

Imported only when a database is configured: psycopg is an optional extra.

Each write hook runs in the log's batch transaction (`within`): the row commits with its record
or neither does. A hook that finds the state its decision was made on changed raises
StateChanged, which withdraws the record: the servicer decides again. Where the ledger builds
the record itself (retention expiry counts the keys it destroys), it decides again here.

A database that cannot be reached or fails a statement answers UNAVAILABLE with
`DATABASE_UNAVAILABLE`, naming no row and no value (SQLSTATE class only, in the log line); the
call may be retried, and nothing was decided. A row that fails its authentication answers
DATA_LOSS as in the embedded store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg_pool
import structlog

from service.api.ledger import (
    AlertsFor,
    FailClosedAudit,
    LimitRow,
    ResponseFor,
    SubjectScore,
    new_key,
    tampered,
)
from service.decisions.alert_rules import Event
from service.decisions.pg_store import PgDecisionStore
from service.decisions.rows import (
    OpenAlert,
    RecordedScore,
    StateChanged,
    StoredLimitDecision,
    StoreError,
    StoreTampered,
)
from service.errors import Unavailable

_log = structlog.get_logger("privscore.store")
# Retention expiry lists the keys, logs a record counting them, then destroys them: tries when
# other replicas keep destroying some in between.
EXPIRY_ATTEMPTS = 8
Hook = Callable[[psycopg.AsyncConnection[Any], int], Any]


def _seen_state(record: Mapping[str, Any]) -> str | None:
    """The state an alert change was decided from, as its record states it (`alert.from`):
    the stored state must still be it when the change commits, or the record would say
    otherwise than what happened. None when the record does not say."""
    alert = record.get("alert")
    seen = alert.get("from") if isinstance(alert, Mapping) else None
    return seen if isinstance(seen, str) else None


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

    async def latest_score(self, tenant: str, pseudonym: str) -> RecordedScore | None:
        async with _database(self.down):
            return await self._store.latest_score(tenant, pseudonym)

    async def open_alerts(self, tenant: str, pseudonym: str) -> list[OpenAlert]:
        async with _database(self.down):
            return await self._store.open_alerts(tenant, pseudonym)

    async def alert_state(self, alert_sequence: int) -> tuple[str, bytes] | None:
        async with _database(self.down):
            found = await self._store.alert_state(alert_sequence)
        return None if found is None else (found[0].state, found[1])

    async def subject_key(self, tenant: str, pseudonym: str, period: str) -> tuple[str, bytes]:
        (found,) = await self.subject_keys([(tenant, pseudonym)], period)
        return found

    async def subject_keys(
        self, subjects: Sequence[tuple[str, str]], period: str
    ) -> list[tuple[str, bytes]]:
        """Read from the database every time, never kept in memory: another replica's erasure
        destroys a subject's keys, and a record must not be sealed under a destroyed one."""
        async with _database(self.down):
            return await self._store.subject_keys(
                [(tenant, pseudonym, period) for tenant, pseudonym in subjects], new_key
            )

    async def key_by_id(self, key_id: str) -> bytes | None:
        async with _database(self.down):
            return await self._store.key_by_id(key_id)

    async def subject_key_ids(self, tenant: str, pseudonym: str) -> list[str]:
        async with _database(self.down):
            return await self._store.subject_key_ids(tenant, pseudonym)

    async def commit_scores(
        self, records: Sequence[Mapping[str, Any]], scores: Sequence[SubjectScore]
    ) -> list[int]:
        """Each score is written in the transaction of the record with its decision id (a
        batch's records may be split over several transactions)."""
        by_decision: dict[str, list[SubjectScore]] = {}
        for score in scores:
            by_decision.setdefault(score.score.decision_id, []).append(score)
        hooks: list[Hook | None] = []
        for record in records:
            kept = by_decision.pop(str(record.get("decision_id")), [])
            hooks.append(self._score_hook(kept) if kept else None)
        if by_decision:
            raise ValueError("a score whose decision has no record among those given")
        async with _database(self.down):
            return await self._audit.append_all(records, within=hooks)

    def _score_hook(self, scores: Sequence[SubjectScore]) -> Hook:
        async def store_rows(conn: psycopg.AsyncConnection[Any], sequence: int) -> None:
            for score in scores:
                await self._store.upsert_score(conn, score.tenant, score.pseudonym, score.score)

        return store_rows

    async def commit_alert_update(
        self,
        record: Mapping[str, Any],
        *,
        alert_sequence: int,
        state: str,
        changed_at: dt.datetime,
        update: AlertsFor,
    ) -> tuple[int, int]:
        numbered: list[int] = []

        async def store_rows(conn: psycopg.AsyncConnection[Any], sequence: int) -> None:
            def blob() -> bytes:
                (alert,) = update(sequence)
                return alert

            numbered[:] = [
                await self._store.update_alert(
                    conn,
                    alert_sequence=alert_sequence,
                    seen_state=_seen_state(record),
                    state=state,
                    changed_at=changed_at,
                    update=blob,
                )
            ]

        async with _database(self.down):
            sequence = await self._audit.append(record, within=store_rows)
        return sequence, numbered[0]

    async def erase_subject(
        self, record: Mapping[str, Any], tenant: str, pseudonym: str
    ) -> tuple[int, dict[str, int]]:
        counts: dict[str, int] = {}

        async def erase(conn: psycopg.AsyncConnection[Any], sequence: int) -> None:
            counts.update(await self._store.erase_subject(conn, tenant, pseudonym))

        async with _database(self.down):
            sequence = await self._audit.append(record, within=erase)
        return sequence, counts

    async def expire_keys(
        self, before_period: str, record: Callable[[int], Mapping[str, Any]]
    ) -> tuple[int | None, int]:
        """The keys are counted before the record is made, and destroyed in its transaction
        only if every one counted is still there: otherwise count again and make another."""
        for _ in range(EXPIRY_ATTEMPTS):
            async with _database(self.down):
                expired = await self._store.expired_key_ids(before_period)
                if not expired:
                    return None, 0
                try:
                    return await self._destroy_keys(expired, record(len(expired)))
                except StateChanged:
                    continue
        raise StoreError("subject keys: other replicas kept destroying keys during expiry")

    async def _destroy_keys(
        self, key_ids: Sequence[str], record: Mapping[str, Any]
    ) -> tuple[int, int]:
        destroyed: list[int] = []

        async def destroy(conn: psycopg.AsyncConnection[Any], sequence: int) -> None:
            destroyed[:] = [await self._store.destroy_keys(conn, key_ids)]

        sequence = await self._audit.append(record, within=destroy)
        return sequence, destroyed[0]

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
