"""Where decisions are kept: the decision store and the audit log behind one interface, so the
servicers never know which backend runs (`Ledger`).

Both backends keep the rule of the data flow: no decision is answered that is not in the audit
log. They differ in how the store row follows the record:

- embedded (`EmbeddedLedger`): the record is appended to the file log (fsynced), then the row
  is written to SQLite. A crash in between leaves a record without its row, which the next
  start rebuilds from the log (service/api/reconcile.py). One process owns both, so a
  customer's decisions are serialised by the servicers' locks alone.
- PostgreSQL (service/api/pg_ledger.py): the row is written inside the log's batch transaction,
  so both commit or neither does; several replicas share them, and a decision made on state
  another replica changed meanwhile is withdrawn (`StateChanged`) for the servicer to make
  again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import structlog

from service.audit import AuditLog, AuditWriteError
from service.decisions.alert_rules import Event
from service.decisions.rows import OpenAlert, RecordedScore, StoredLimitDecision, StoreTampered
from service.decisions.store import DecisionStore, raised_state
from service.errors import DataLoss, Unavailable

if TYPE_CHECKING:
    from service.audit.pg import PgAuditLog

T = TypeVar("T")
SUBJECT_KEY_BYTES = 32
# Subject keys the embedded ledger keeps in memory (each well under a kilobyte).
CACHED_SUBJECT_KEYS = 50_000


def new_key() -> tuple[str, bytes]:
    """A fresh subject key and its id: random both, so the id says nothing of the subject."""
    return f"sk-{secrets.token_hex(12)}", secrets.token_bytes(SUBJECT_KEY_BYTES)


_log = structlog.get_logger("privscore.store")

# The stored reply of a decision, given the audit sequence its record got.
ResponseFor = Callable[[int], bytes]
# The serialized alerts an event raised, given the audit sequence of its record.
AlertsFor = Callable[[int], list[bytes]]


@dataclass(frozen=True)
class SubjectScore:
    """A subject's Score decision, as the store keeps the latest."""

    tenant: str
    pseudonym: str
    score: RecordedScore


@dataclass(frozen=True)
class LimitRow:
    """What a limit decision's store row holds beside its reply: one value for both ledgers."""

    tenant: str
    pseudonym: str
    request_id: str
    fingerprint: str
    decided_at: dt.datetime
    action: str

    def columns(self) -> dict[str, Any]:
        """As the stores' keyword arguments."""
        return dataclasses.asdict(self)


class FailClosedAudit:
    """The audit log as servicers see it: a failed append answers UNAVAILABLE and turns the
    whole server NOT_SERVING, so no decision ever leaves without its record."""

    def __init__(
        self,
        audit_log: AuditLog | PgAuditLog,
        on_failure: Callable[[], Awaitable[None]],
        on_durable: Callable[[Sequence[Mapping[str, Any]]], None] | None = None,
    ) -> None:
        """`audit_log`: the file log, or the PostgreSQL log, which also takes `within` hooks
        (service/audit/pg/log.py). `on_durable` is shown every record once it is durable: the
        one place every decision and refusal passes, which the metrics count."""
        self._log: Any = audit_log  # the two logs' append_all differ only in `within`
        self._on_failure = on_failure
        self._on_durable = on_durable

    async def append(self, record: Mapping[str, Any], within: Any = None) -> int:
        """Append one record; with `within` (PostgreSQL only) the caller's statements commit
        in its transaction, and what they raise reaches the caller as it is."""
        options = {"within": [within]} if within is not None else {}
        (sequence,) = await self.append_all([record], **options)
        return sequence

    async def append_all(self, records: Sequence[Mapping[str, Any]], **options: Any) -> list[int]:
        try:
            appended = await self._log.append_all(records, **options)
        except AuditWriteError:
            await self._on_failure()
            raise Unavailable(
                "the audit log cannot be written; no decision is made", reason="AUDIT_UNAVAILABLE"
            ) from None
        if self._on_durable is not None:
            self._on_durable(records)
        return [entry.sequence for entry in appended]


def tampered(error: StoreTampered) -> DataLoss:
    """The refusal for a row that fails its authentication (audited like every refusal),
    naming the table: no decision is ever made or replayed from an edited row."""
    _log.error("store.tampered", table=error.table, problem=error.problem)
    return DataLoss(
        f"{error}; the call is refused (run `privscore store verify`)", reason="STORE_TAMPERED"
    )


class Ledger(Protocol):
    """The decisions' state and their commit, whichever backend keeps them."""

    @property
    def audit(self) -> FailClosedAudit: ...

    async def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None: ...

    async def last_increase_at(self, tenant: str, pseudonym: str) -> dt.datetime | None: ...

    async def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool: ...

    async def events(self, tenant: str, pseudonym: str) -> list[Event]: ...

    async def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]: ...

    async def last_alert_sequence(self) -> int: ...

    async def latest_score(self, tenant: str, pseudonym: str) -> RecordedScore | None: ...

    async def open_alerts(self, tenant: str, pseudonym: str) -> list[OpenAlert]: ...

    async def alert_state(self, alert_sequence: int) -> tuple[str, bytes] | None:
        """(state, the alert as raised) or None for an alert not kept (never raised, erased)."""
        ...

    async def subject_key(self, tenant: str, pseudonym: str, period: str) -> tuple[str, bytes]:
        """(key id, key) of the subject for the period (YYYY-MM), made and stored durably
        first if there is none yet."""
        ...

    async def subject_keys(
        self, subjects: Sequence[tuple[str, str]], period: str
    ) -> list[tuple[str, bytes]]:
        """`subject_key` for several (tenant, pseudonym) at once, in order."""
        ...

    async def key_by_id(self, key_id: str) -> bytes | None:
        """A subject key by id; None once destroyed."""
        ...

    async def subject_key_ids(self, tenant: str, pseudonym: str) -> list[str]: ...

    async def commit_scores(
        self, records: Sequence[Mapping[str, Any]], scores: Sequence[SubjectScore]
    ) -> list[int]:
        """Log the Score decisions' records and keep each subject's latest; their sequences."""
        ...

    async def commit_alert_update(
        self,
        record: Mapping[str, Any],
        *,
        alert_sequence: int,
        state: str,
        changed_at: dt.datetime,
        update: AlertsFor,
    ) -> tuple[int, int]:
        """Log an alert's state change and apply it; (audit sequence, stream sequence).
        `update(audit_sequence)` gives the one serialized Alert the stream carries.
        StoreError when the alert was resolved meanwhile."""
        ...

    async def erase_subject(
        self, record: Mapping[str, Any], tenant: str, pseudonym: str
    ) -> tuple[int, dict[str, int]]:
        """Log the erasure, then delete the subject's rows and destroy its keys;
        (audit sequence, rows deleted by table)."""
        ...

    async def expire_keys(
        self, before_period: str, record: Callable[[int], Mapping[str, Any]]
    ) -> tuple[int | None, int]:
        """Destroy every subject key of a period before `before_period` (YYYY-MM) and forget
        the store's rows of decisions made before it, logging one record (`record(count)`)
        first when there are keys; (audit sequence or None, keys destroyed)."""
        ...

    async def commit_limit(
        self,
        record: Mapping[str, Any],
        decision: LimitRow,
        *,
        response: ResponseFor,
        seen_last_increase: dt.datetime | None,
    ) -> int:
        """Log the decision's record and store its row; the record's audit sequence.
        StateChanged (PostgreSQL): nothing was logged or stored; decide again."""
        ...

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
        """Log the evaluation's record and, unless `duplicate`, store the event and its alerts;
        (audit sequence, alert sequences). StateChanged as for `commit_limit`."""
        ...

    def close(self) -> None: ...


K = TypeVar("K")
V = TypeVar("V")


class GroupCommit(Generic[K, V]):
    """Concurrent calls' store writes in one transaction: a call adds its items and waits;
    while one batch is being written, the next gathers, so under load one fsync serves many
    calls (as the audit log's group commit does), and alone a call waits for its own."""

    def __init__(self, write: Callable[[list[K]], Awaitable[dict[K, V]]]) -> None:
        self._write = write
        self._pending: dict[K, asyncio.Future[V]] = {}
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, items: Sequence[K]) -> list[V]:
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = self._pending.get(item)
            if future is None:
                future = self._pending[item] = loop.create_future()
            futures.append(future)
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    written = await self._write(list(batch))
                except BaseException as error:  # every waiter of the batch gets it
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(error)
                    if isinstance(error, asyncio.CancelledError):
                        raise
                    continue
                for item, future in batch.items():
                    if not future.done():
                        future.set_result(written[item])
        finally:
            self._writer = None


def _store_unavailable() -> Unavailable:
    return Unavailable(
        "the decision store cannot be written; no decision is made until the server restarts",
        reason="STORE_UNAVAILABLE",
    )


class EmbeddedLedger:
    """SQLite and the file log: the record first, then the row (module doc)."""

    def __init__(
        self,
        store: DecisionStore,
        audit: FailClosedAudit,
        on_failure: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`on_failure` is awaited when the store cannot be written (a full disk, an I/O
        error): the server turns NOT_SERVING, as for the audit log."""
        self._store = store
        self._audit = audit
        self._on_failure = on_failure
        self._broken = False
        # SQLite is used from this one thread only: it serialises writers, keeps the loop free.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        # Subject keys in use, by (tenant, pseudonym, period): most Score calls find theirs here.
        self._keys: OrderedDict[tuple[str, str, str], tuple[str, bytes]] = OrderedDict()
        self._new_keys: GroupCommit[tuple[str, str, str], tuple[str, bytes]] = GroupCommit(
            self._make_keys
        )
        self._scores: GroupCommit[tuple[str, str, RecordedScore], None] = GroupCommit(
            self._write_scores
        )

    @property
    def audit(self) -> FailClosedAudit:
        return self._audit

    async def _in_store(self, call: Callable[..., T], *args: Any) -> T:
        if self._broken:
            raise _store_unavailable()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, call, *args)
        except StoreTampered as error:
            raise tampered(error) from None
        except sqlite3.OperationalError as error:
            # Fail closed, as the audit log does, and for good: a decision whose record is in
            # the log may lack its row, so a retry could decide it again. The next start
            # rebuilds the row from the log. The class only: SQLite's message may quote a
            # statement.
            self._broken = True
            _log.error("store.write_failed", error=type(error).__name__)
            if self._on_failure is not None:
                await self._on_failure()
            raise _store_unavailable() from None

    async def limit_decision(self, tenant: str, request_id: str) -> StoredLimitDecision | None:
        return await self._in_store(self._store.limit_decision, tenant, request_id)

    async def last_increase_at(self, tenant: str, pseudonym: str) -> dt.datetime | None:
        return await self._in_store(self._store.last_increase_at, tenant, pseudonym)

    async def has_event(self, tenant: str, pseudonym: str, event_id: str) -> bool:
        return await self._in_store(self._store.has_event, tenant, pseudonym, event_id)

    async def events(self, tenant: str, pseudonym: str) -> list[Event]:
        return await self._in_store(self._store.events, tenant, pseudonym)

    async def alerts_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        return await self._in_store(self._store.alerts_after, sequence, limit)

    async def last_alert_sequence(self) -> int:
        return await self._in_store(self._store.last_alert_sequence)

    async def latest_score(self, tenant: str, pseudonym: str) -> RecordedScore | None:
        return await self._in_store(self._store.latest_score, tenant, pseudonym)

    async def open_alerts(self, tenant: str, pseudonym: str) -> list[OpenAlert]:
        return await self._in_store(self._store.open_alerts, tenant, pseudonym)

    async def alert_state(self, alert_sequence: int) -> tuple[str, bytes] | None:
        found = await self._in_store(self._store.alert_state, alert_sequence)
        return None if found is None else (found[0].state, found[1])

    async def subject_key(self, tenant: str, pseudonym: str, period: str) -> tuple[str, bytes]:
        (found,) = await self.subject_keys([(tenant, pseudonym)], period)
        return found

    async def subject_keys(
        self, subjects: Sequence[tuple[str, str]], period: str
    ) -> list[tuple[str, bytes]]:
        """From memory when known (one process owns the store, and erasure forgets them);
        the rest from the store in one transaction, one fsync for all that are new."""
        wanted = [(tenant, pseudonym, period) for tenant, pseudonym in subjects]
        known = {key: self._keys[key] for key in wanted if key in self._keys}
        missing = sorted(set(wanted) - known.keys())
        if missing:
            found = await self._new_keys.submit(missing)
            for key, value in zip(missing, found, strict=True):
                known[key] = self._keys[key] = value
                self._keys.move_to_end(key)
            while len(self._keys) > CACHED_SUBJECT_KEYS:
                self._keys.popitem(last=False)
        return [known[key] for key in wanted]

    async def _make_keys(
        self, wanted: list[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], tuple[str, bytes]]:
        found = await self._in_store(self._store.subject_keys, wanted, new_key)
        return dict(zip(wanted, found, strict=True))

    async def _write_scores(
        self, scores: list[tuple[str, str, RecordedScore]]
    ) -> dict[tuple[str, str, RecordedScore], None]:
        await self._in_store(self._store.record_scores, scores)
        return dict.fromkeys(scores)

    async def key_by_id(self, key_id: str) -> bytes | None:
        found = await self._in_store(self._store.key_by_id, key_id)
        return None if found is None else found[1]

    async def subject_key_ids(self, tenant: str, pseudonym: str) -> list[str]:
        return await self._in_store(self._store.subject_key_ids, tenant, pseudonym)

    async def commit_scores(
        self, records: Sequence[Mapping[str, Any]], scores: Sequence[SubjectScore]
    ) -> list[int]:
        sequences = await self._audit.append_all(records)
        await self._scores.submit([(s.tenant, s.pseudonym, s.score) for s in scores])
        return sequences

    async def commit_alert_update(
        self,
        record: Mapping[str, Any],
        *,
        alert_sequence: int,
        state: str,
        changed_at: dt.datetime,
        update: AlertsFor,
    ) -> tuple[int, int]:
        sequence = await self._audit.append(record)
        (blob,) = update(sequence)
        stream = await self._in_store(
            self._store.record_alert_update, alert_sequence, state, changed_at, blob
        )
        return sequence, stream

    async def erase_subject(
        self, record: Mapping[str, Any], tenant: str, pseudonym: str
    ) -> tuple[int, dict[str, int]]:
        sequence = await self._audit.append(record)
        for key in [key for key in self._keys if key[:2] == (tenant, pseudonym)]:
            del self._keys[key]
        counts = await self._in_store(self._store.erase_subject, tenant, pseudonym)
        return sequence, counts

    async def expire_keys(
        self, before_period: str, record: Callable[[int], Mapping[str, Any]]
    ) -> tuple[int | None, int]:
        expired = await self._in_store(self._store.expired_key_ids, before_period)
        if not expired:
            return None, 0
        sequence = await self._audit.append(record(len(expired)))
        gone = {key_id for _, _, key_id in expired}
        for key in [key for key, (key_id, _) in self._keys.items() if key_id in gone]:
            del self._keys[key]
        start = dt.datetime.strptime(before_period, "%Y-%m").replace(tzinfo=dt.UTC)
        destroyed = await self._in_store(self._store.destroy_keys, sorted(gone), start)
        return sequence, destroyed

    async def commit_limit(
        self,
        record: Mapping[str, Any],
        decision: LimitRow,
        *,
        response: ResponseFor,
        seen_last_increase: dt.datetime | None,
    ) -> int:
        sequence = await self._audit.append(record)
        stored = response(sequence)
        await self._in_store(
            lambda: self._store.record_limit_decision(**decision.columns(), response=stored)
        )
        return sequence

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
        sequence = await self._audit.append(record)
        if duplicate:
            return sequence, []
        blobs = alerts(sequence)
        sequences = await self._in_store(
            self._store.record_event,
            tenant,
            pseudonym,
            event,
            blobs,
            raised_at,
            forget_before,
            [raised_state(blob)[2] for blob in blobs],
        )
        return sequence, sequences

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._store.close()
