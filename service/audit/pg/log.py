"""The audit log in PostgreSQL: one log for every replica, group-committed, fail-closed.

`append` encodes the record at once (AuditRecordError before anything is used) and queues it;
one writer task per process drains the queue and commits everything queued while the previous
transaction ran in one transaction (group commit: one per batch, never one per record):

 1. BEGIN (READ COMMITTED), with a lock timeout and an idle-in-transaction timeout so a stuck
    holder cannot stall the other replicas for ever;
 2. `SELECT size, chain, root FROM audit_log_state ... FOR UPDATE`: the one sequencing row. It
    serialises batches across every replica until COMMIT, so numbers are dense, follow commit
    order and are never reused (a rolled-back batch leaves `size` as it was);
 3. continue the tree from the frontier this process committed last if the row is still at
    that size and root (no other replica wrote since), else from the tiles on the tree's right
    edge, read now; either way, check the frontier gives the row's `root`;
 4. run each record's `within` hook, if any, under a savepoint with the connection and the
    sequence the record will get: a hook that raises is rolled back to its savepoint and its
    caller gets the exception; its record is neither numbered nor stored, the others go on;
 5. number the remaining records `size, size + 1, ...`, seal each envelope on the chain (MAC
    under the server's key: service/audit/storage.py) and hash it into the tree;
 6. COPY the entries, insert their decision-id index rows, append the new nodes to their tiles
    (checking each tile's length is the one the new size gives), update the state row;
 7. COMMIT; only then are the callers resolved with `Appended(sequence, leaf_hash)`.

A failed transaction rolls back whole and fails its callers with AuditWriteError, saying whether
nothing was stored (an error before COMMIT) or the outcome is unknown (COMMIT itself failed: the
records may be in the log, never half of one). Such a failure is a database's: `failed` is True
until the database answers again (a probe asks every `retry_seconds`), and appends meanwhile
are refused at once. What shows the log is not the one the server wrote (the state row behind
what this process saw or behind the entries, a tile of the wrong length, a record without the
server's MAC) breaks the log for good: every later append fails at once, as the file log does.

Checkpoints: one replica at a time, under the transaction-level advisory lock CHECKPOINT_LOCK,
signs the size it recomputed itself (service/audit/pg/check.py) every `checkpoint_every`
records or `checkpoint_seconds` while the log grows, and at close; each is a row of
`audit_checkpoints`. Opening checks the schema, the identity row, and the whole log
(`check_log`) before anything is appended.

Nothing of a record's content reaches a log line or an error: sequences, counts, table names
and SQLSTATEs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from service.audit.checkpoint import Checkpoint, Signer, VerifierKey, check_origin
from service.audit.errors import AuditError, AuditWriteError, LogCorruptError
from service.audit.log import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    DEFAULT_MAX_BATCH,
    Appended,
    AuditStats,
    RecoveryReport,
)
from service.audit.merkle import leaf_hash
from service.audit.pg.check import Signed, check_log, sign_checkpoint
from service.audit.pg.lookup import indexable, prove_decision
from service.audit.pg.tables import (
    ENTRIES,
    IDENTITY,
    STATE,
    TILES,
    describe,
    read_identity,
    read_state,
    read_tiles,
)
from service.audit.pg.tiles import TileError, TileFrontier, frontier_tiles, tile_width
from service.audit.storage import MAC_KEY_BYTES, StoredRecord, encode_record, seal_envelope

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

DEFAULT_LOCK_TIMEOUT_S = 10.0  # waiting for the state row (another replica's batch) or signing
DEFAULT_IDLE_TIMEOUT_S = 30.0  # a batch transaction idle this long (a stuck hook) is ended
DEFAULT_RETRY_SECONDS = 1.0

Within = Callable[["psycopg.AsyncConnection[Any]", int], Awaitable[None]]
"""A caller's statements for the batch transaction: called with its connection, inside a
savepoint, and the sequence its record gets if it returns. Raising withdraws the record."""

_log = structlog.get_logger("privscore.audit")

_TIMEOUTS = (
    "SELECT set_config('lock_timeout', %s, true), "
    "set_config('idle_in_transaction_session_timeout', %s, true)"
)
_COPY_ENTRIES = "COPY audit_entries (sequence, envelope) FROM STDIN (FORMAT BINARY)"
_INSERT_DECISIONS = (
    "INSERT INTO audit_decisions (decision_id, sequence) "
    "SELECT * FROM unnest(%s::uuid[], %s::int8[]) ON CONFLICT (decision_id) DO NOTHING"
)
_APPEND_TILES = (
    "INSERT INTO audit_tiles (level, tile_index, nodes) "
    "SELECT * FROM unnest(%s::int2[], %s::int8[], %s::bytea[]) "
    "ON CONFLICT (level, tile_index) DO UPDATE SET nodes = audit_tiles.nodes || excluded.nodes "
    "RETURNING level, tile_index, octet_length(nodes)"
)
_UPDATE_STATE = (
    "UPDATE audit_log_state SET size = %s, chain = %s, root = %s, updated_at = now() WHERE id = 0"
)


@dataclass(eq=False)
class _Pending:
    record_json: bytes
    decision_id: Any  # uuid.UUID | None: the index key
    future: asyncio.Future[Appended]
    within: Within | None
    refusal: BaseException | None = None  # what its hook raised


def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


def _settle(future: asyncio.Future[Appended], outcome: Appended | BaseException) -> None:
    if future.done():  # the caller was cancelled; a committed record stays in the log regardless
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class PgAuditLog:
    """The audit log in the database of `pool`, open for appending; `await PgAuditLog.open(...)`.

    The same caller's side as `AuditLog` (append, append_all, close, failed, verifier, origin,
    stats, recovery), with the same envelope bytes, tree and signed notes; several instances,
    in one process or many, may append to one database at once. The pool is the caller's: close
    it after `close`. It needs a connection for the writer, one for signing checkpoints and
    one per concurrent lookup.
    """

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool,
        *,
        signer: Signer,
        mac_key: bytes,
        origin: str,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        max_batch: int = DEFAULT_MAX_BATCH,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        full_check: bool = True,
    ) -> None:
        """Use `open`, which checks the database log before anything is appended.

        `full_check=False` opens without the pass over the records the latest checkpoint
        covers (`check_log(full=False)`: what grows with the log) and runs that pass in the
        background right after; if it finds damage the log fails closed from then on, as
        after any other refusal, and `verified` stays False."""
        check_origin(origin)
        if min(checkpoint_every, max_batch) < 1 or checkpoint_seconds <= 0:
            raise ValueError("the checkpoint cadence and the batch size must be positive")
        if min(lock_timeout_s, idle_timeout_s, retry_seconds) <= 0:
            raise ValueError("timeouts must be positive")
        if len(mac_key) != MAC_KEY_BYTES:
            raise ValueError(f"the record MAC key must be {MAC_KEY_BYTES} bytes")
        self._pool = pool
        self._signer = signer
        self._mac_key = mac_key
        self._origin = origin
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._max_batch = max_batch
        self._lock_timeout_s = lock_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._retry_seconds = retry_seconds
        self._full_check = full_check
        self._verified = False
        self._records = self._batches = self._commits = self._checkpoints = 0
        # Told (records, seconds) of each batch's committed transaction (the server's metrics).
        self.on_commit: Callable[[int, float], None] | None = None
        self.recovery = RecoveryReport(0, ())

        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()  # None: close
        self._closing = False
        self._broken: BaseException | None = None  # the log is not the server's: for good
        self._failing: BaseException | None = None  # the database failed the last transaction
        self._high_water = 0  # the largest size this process saw the state row hold
        self._checkpointed = 0  # the largest checkpoint size this process knows of
        self._uncheckpointed_since: float | None = None
        self._next_try = 0.0  # no checkpoint attempt before (monotonic), after a busy lock
        self._wake = asyncio.Event()
        self._frontier: TileFrontier | None = None  # after this process's last commit
        self._writer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._verifier_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, pool: psycopg_pool.AsyncConnectionPool, *, signer: Signer, **options: Any
    ) -> PgAuditLog:
        """Check the database and its log, then start appending. Refuses (AuditError naming
        the table and the problem; SchemaError for the schema) unless: the schema is the one
        this code runs on; `audit_log_identity` names `origin` and `signer`'s key name (a fresh
        database gets them); the latest checkpoint verifies under `signer`'s key, name and
        origin; the records up to it give its root; every record after it carries this
        server's MAC and follows the chain; no key rotation hands the log to another key; and
        the state row and the tiles are what the records give. Options: see `__init__`."""
        log = cls(pool, signer=signer, **options)
        started = time.monotonic()
        async with pool.connection() as conn:
            await log._check_identity(conn)
            checked = await check_log(
                conn,
                verifier=signer.verifier,
                origin=log._origin,
                mac_key=log._mac_key,
                full=log._full_check,
            )
        log._verified = log._full_check
        log.recovery = RecoveryReport(checked.size, (), checked.checkpointed)
        log._high_water = checked.size
        log._checkpointed = checked.checkpointed
        if checked.size > checked.checkpointed:
            log._uncheckpointed_since = time.monotonic()
        log._writer = asyncio.create_task(log._run_writer(), name="audit-pg-writer")
        log._checkpointer = asyncio.create_task(log._run_checkpoints(), name="audit-pg-signer")
        if not log._full_check:
            log._verifier_task = asyncio.create_task(log._check_all(), name="audit-pg-check")
        _log.info(
            "audit.pg_opened",
            records=checked.size,
            checkpointed=checked.checkpointed,
            seconds=round(time.monotonic() - started, 3),
            full_check=log._full_check,
        )
        return log

    async def _check_all(self) -> None:
        """The full check a quick open left out, on a connection of its own, until it has run
        (a database failure is retried): a log that fails it is refused from then on."""
        while not self._closing and self._broken is None:
            started = time.monotonic()
            try:
                async with self._pool.connection() as conn:
                    checked = await check_log(
                        conn,
                        verifier=self._signer.verifier,
                        origin=self._origin,
                        mac_key=self._mac_key,
                    )
            except AuditError as error:
                self._break(error)
                return
            except Exception as error:  # noqa: BLE001 - the database: try again
                _log.warning("audit.pg_full_check_failed", error=describe(error))
                await asyncio.sleep(self._retry_seconds)
                continue
            self._verified = True
            _log.info(
                "audit.pg_verified",
                records=checked.size,
                seconds=round(time.monotonic() - started, 3),
            )
            return

    async def _check_identity(self, conn: psycopg.AsyncConnection[Any]) -> None:
        from service.db.schema import check_schema_async

        await check_schema_async(conn)
        await conn.execute(
            "INSERT INTO audit_log_identity (id, origin, key_name) VALUES (0, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (self._origin, self._signer.name),
        )
        identity = await read_identity(conn)
        if identity is None:
            raise AuditError(f"{IDENTITY} has no row")
        if (identity.origin, identity.key_name) != (self._origin, self._signer.name):
            raise AuditError(
                f"{IDENTITY}: the database holds the log of {identity.origin!r} (key name "
                f"{identity.key_name!r}); this server is configured for {self._origin!r} "
                f"(key name {self._signer.name!r})"
            )

    # -- the caller's side -----------------------------------------------------------------

    async def append(self, record: Mapping[str, Any], *, within: Within | None = None) -> Appended:
        """Log `record` (a JSON object); return once its transaction committed.

        While the database has failed and not answered since (`failed`), the append is refused
        at once. With `within`, the caller's own statements run in that transaction first (see
        `Within`): the record is logged only if they succeed, and commits with them; if they
        raise, the caller gets that exception and nothing of theirs or the record's remains.
        Raises AuditWriteError if the log has failed, is closed or the transaction failed,
        AuditRecordError if the record cannot be logged. A caller cancelled while waiting
        withdraws its record if its transaction has not begun; once it has, the record commits
        with the rest.
        """
        (appended,) = await self.append_all([record], within=[within])
        return appended

    async def append_all(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        within: Sequence[Within | None] | None = None,
    ) -> list[Appended]:
        """`append` for several records, in order, each with its own hook (`within[i]`)."""
        hooks = list(within) if within is not None else [None] * len(records)
        if len(hooks) != len(records):
            raise ValueError("one hook (or None) per record")
        encoded = [encode_record(record) for record in records]  # before anything is queued
        self._refuse_if_closed()
        loop = asyncio.get_running_loop()
        pending = [
            _Pending(
                record_json,
                indexable(record.get("decision_id")),
                loop.create_future(),
                hook,
            )
            for record, record_json, hook in zip(records, encoded, hooks, strict=True)
        ]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def prove(self, decision_id: str) -> tuple[Checkpoint, StoredRecord, list[bytes]]:
        """The decision's record and its inclusion proof against the latest checkpoint, from
        the index and the tiles (service/audit/pg/lookup.py)."""
        async with self._pool.connection() as conn:
            return await prove_decision(conn, decision_id, self._signer.verifier, self._origin)

    async def checkpoint(self) -> int:
        """Sign a checkpoint now if the latest does not cover the log (waiting for another
        replica's signing to end); the latest checkpoint's size afterwards."""
        await self._checkpoint(wait=True)
        if self._broken is not None:
            raise self._broken_error()
        return self._checkpointed

    async def close(self) -> None:
        """Commit what is queued, sign a final checkpoint, and stop. Raises AuditWriteError if
        that checkpoint cannot be signed (the log then failed earlier or fails now)."""
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)
        tasks = [task for task in (self._writer, self._checkpointer) if task is not None]
        self._wake.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for helper in (self._probe, self._verifier_task):
            if helper is not None and not helper.done():
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
        if self._broken is None and self._high_water > self._checkpointed:
            await self._checkpoint(wait=True)
            if self._broken is not None or self._high_water > self._checkpointed:
                raise AuditWriteError("audit log: the final checkpoint could not be signed")

    def unreachable(self) -> None:
        """The caller found the database not answering (a health check): refuse appends at
        once, as after a failed transaction, until the probe finds it answering again."""
        if self._failing is None and self._broken is None and not self._closing:
            self._failing = ConnectionError("the database does not answer")
            _log.warning("audit.pg_database_unreachable")
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._wait_for_database(), name="audit-pg-probe")

    @property
    def failed(self) -> bool:
        """True while the log cannot take records: broken for good, or the database failed
        the last transaction and has not answered since (serve NOT_SERVING meanwhile)."""
        return self._broken is not None or self._failing is not None

    @property
    def verified(self) -> bool:
        """Whether every record was checked (at open, or by the background pass a quick open
        starts) and found to be the server's."""
        return self._verified

    @property
    def stats(self) -> AuditStats:
        """Records committed, batches, transactions committed (`fsyncs`: each commit is one
        WAL flush) and checkpoints signed by this process since open."""
        return AuditStats(self._records, self._batches, self._commits, self._checkpoints)

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def verifier(self) -> VerifierKey:
        return self._signer.verifier

    def _refuse_if_closed(self) -> None:
        if self._broken is not None:
            raise self._broken_error()
        if self._closing:
            raise AuditWriteError("audit log is closed")

    def _broken_error(self) -> AuditWriteError:
        error = AuditWriteError(f"audit log has failed: {self._broken}")
        error.__cause__ = self._broken
        return error

    # -- the writer ------------------------------------------------------------------------

    async def _run_writer(self) -> None:
        closing = False
        while not closing:
            batch: list[_Pending] = []
            item = await self._queue.get()
            while True:
                if item is None:
                    closing = True  # always last: nothing is queued after closing
                    break
                batch.append(item)
                if len(batch) >= self._max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        # A caller that gave up (its deadline passed, it was cancelled) before its record's
        # transaction began withdraws it: it will never answer, so nothing need be logged.
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        if self._broken is not None:
            for item in batch:
                _settle(item.future, item.refusal or self._broken_error())
            return
        if self._failing is not None:
            # The database failed the last transaction and has not answered the probe since:
            # refuse at once rather than make every caller wait for a connection in vain.
            for item in batch:
                _settle(
                    item.future,
                    AuditWriteError(
                        "audit log write refused: the database failed and has not answered "
                        "since; nothing was stored"
                    ),
                )
            return
        import psycopg

        committing = [False]
        try:
            try:
                started = time.perf_counter()
                appended = await self._transaction(batch, committing)
                if self.on_commit is not None:
                    self.on_commit(len(batch), time.perf_counter() - started)
            except psycopg.IntegrityError as error:
                # Our own statements break no constraint unless the tables were edited (a
                # hook's violation is its caller's, caught in its savepoint).
                raise LogCorruptError(
                    None, f"the batch broke a constraint of the audit tables: {describe(error)}"
                ) from None
        except (LogCorruptError, AuditError) as error:
            self._break(error)
            for item in batch:
                _settle(item.future, item.refusal or self._broken_error())
        except Exception as error:  # noqa: BLE001 - whatever failed, its callers fail closed
            failure = self._transaction_failed(error, committing[0], len(batch))
            for item in batch:
                _settle(item.future, item.refusal or failure)
        except BaseException:
            for item in batch:
                _settle(item.future, item.refusal or AuditWriteError("audit log writer stopped"))
            raise
        else:
            for item in batch:
                _settle(item.future, item.refusal or appended[id(item)])

    async def _transaction(
        self, batch: list[_Pending], committing: list[bool]
    ) -> dict[int, Appended]:
        """Steps 1-7 of the module doc; the Appended of each accepted record by id(item)."""
        import psycopg
        from psycopg import pq

        async with self._pool.connection() as conn, conn.transaction():
            async with conn.pipeline():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                await conn.execute(
                    _TIMEOUTS, (_ms(self._lock_timeout_s), _ms(self._idle_timeout_s))
                )
                state = await read_state(conn, lock=True)
            if state.size < self._high_water:
                raise LogCorruptError(
                    state.size,
                    f"{STATE} says the log holds {state.size} records, but this server saw "
                    f"it hold {self._high_water}: it was rolled back; refusing to number "
                    "records again",
                )
            frontier = await self._frontier_at(conn, state.size, state.root)
            if frontier.root() != state.root:
                raise LogCorruptError(
                    None,
                    f"{STATE}: its root is not the one {TILES} give (size {state.size}): "
                    "one of them was edited",
                )

            accepted: list[_Pending] = []
            for item in batch:
                if item.within is not None:
                    try:
                        async with conn.transaction():  # a savepoint
                            await item.within(conn, state.size + len(accepted))
                    except Exception as error:
                        if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
                            raise  # the connection failed, not (only) the hook
                        item.refusal = error
                        continue
                accepted.append(item)
            if not accepted:
                committing[0] = True
                return {}

            chain = state.chain
            rows: list[tuple[int, bytes]] = []
            appended: dict[int, Appended] = {}
            decisions: list[tuple[Any, int]] = []
            for sequence, item in enumerate(accepted, start=state.size):
                envelope, chain = seal_envelope(sequence, item.record_json, chain, self._mac_key)
                leaf = leaf_hash(envelope)
                frontier.append(leaf)
                rows.append((sequence, envelope))
                appended[id(item)] = Appended(sequence, leaf)
                if item.decision_id is not None:
                    decisions.append((item.decision_id, sequence))
            size = frontier.size

            cursor = conn.cursor()
            try:
                async with cursor.copy(_COPY_ENTRIES) as copy:
                    copy.set_types(["int8", "bytea"])
                    for row in rows:
                        await copy.write_row(row)
            except psycopg.errors.UniqueViolation as error:
                if error.diag.table_name != ENTRIES:
                    raise
                raise LogCorruptError(
                    state.size,
                    f"{ENTRIES} already holds records numbered from {state.size} on, which "
                    f"{STATE} says are free: it was rolled back; refusing to number records "
                    "again",
                ) from None
            async with conn.pipeline():
                if decisions:
                    await conn.execute(
                        _INSERT_DECISIONS,
                        ([key for key, _ in decisions], [seq for _, seq in decisions]),
                    )
                keys = sorted(frontier.added)
                grown = await conn.execute(
                    _APPEND_TILES,
                    (
                        [level for level, _ in keys],
                        [index for _, index in keys],
                        [bytes(frontier.added[key]) for key in keys],
                    ),
                )
                await conn.execute(_UPDATE_STATE, (size, chain, frontier.root()))
            for level, index, length in await grown.fetchall():
                expected = tile_width((int(level), int(index)), size)
                if int(length) != 32 * expected:
                    raise LogCorruptError(
                        None,
                        f"{TILES}: tile (level {level}, index {index}) would hold "
                        f"{int(length) // 32} hashes where the log's size {size} gives "
                        f"{expected}: it was edited",
                    )
            committing[0] = True
        self._frontier = frontier
        self._committed(size, len(accepted))
        return appended

    async def _frontier_at(
        self, conn: psycopg.AsyncConnection[Any], size: int, root: bytes
    ) -> TileFrontier:
        """The frontier at `size` to continue: this process's own when the log has not moved
        since its last commit, else read from the tiles."""
        kept, self._frontier = self._frontier, None  # kept again only once a batch commits
        if kept is not None and kept.size == size and kept.root() == root:
            return kept.continued()
        tiles = await read_tiles(conn, frontier_tiles(size))
        try:
            return TileFrontier.from_tiles(size, tiles)
        except TileError as error:
            raise LogCorruptError(None, f"{TILES}: {error}") from None

    def _committed(self, size: int, records: int) -> None:
        self._records += records
        self._batches += 1
        self._commits += 1
        self._high_water = max(self._high_water, size)
        if self._failing is not None:
            self._failing = None
            _log.info("audit.pg_recovered", size=size)
        if self._high_water > self._checkpointed:
            if self._uncheckpointed_since is None:  # the signer starts its timer
                self._uncheckpointed_since = time.monotonic()
                self._wake.set()
            if self._high_water - self._checkpointed >= self._checkpoint_every:
                self._wake.set()

    def _transaction_failed(
        self, error: Exception, committing: bool, records: int
    ) -> AuditWriteError:
        outcome = "outcome unknown" if committing else "rolled back"
        _log.error(
            "audit.pg_write_failed",
            error=describe(error),
            records=records,
            outcome=outcome,
        )
        self._failing = error
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._wait_for_database(), name="audit-pg-probe")
        if committing:
            message = (
                f"audit log write failed: the commit failed ({describe(error)}); whether the "
                "records were stored is unknown (a retried request is replayed if they were)"
            )
        else:
            message = (
                f"audit log write failed: the transaction failed ({describe(error)}) and was "
                "rolled back; none of its records was stored"
            )
        failure = AuditWriteError(message)
        failure.__cause__ = None
        return failure

    async def _wait_for_database(self) -> None:
        """While the database fails, ask it every `retry_seconds`: `failed` clears once it
        answers (or once a transaction succeeds)."""
        while self._failing is not None and self._broken is None:
            await asyncio.sleep(self._retry_seconds)
            try:
                async with self._pool.connection(timeout=self._retry_seconds * 5) as conn:
                    await read_state(conn)
            except Exception:  # noqa: BLE001 - still down: ask again
                continue
            if self._failing is not None:
                self._failing = None
                _log.info("audit.pg_recovered", size=self._high_water)

    def _break(self, error: BaseException) -> None:
        if self._broken is None:
            self._broken = error
            _log.error("audit.pg_log_refused", error=str(error))

    # -- checkpoints -----------------------------------------------------------------------

    def _until_checkpoint(self) -> float | None:
        if self._uncheckpointed_since is None or self._broken is not None:
            return None
        due = max(self._uncheckpointed_since + self._checkpoint_seconds, self._next_try)
        return max(0.0, due - time.monotonic())

    def _checkpoint_due(self) -> bool:
        if self._broken is not None or self._uncheckpointed_since is None:
            return False
        now = time.monotonic()
        if now < self._next_try:
            return False
        behind = self._high_water - self._checkpointed
        return (
            behind >= self._checkpoint_every
            or now - self._uncheckpointed_since >= self._checkpoint_seconds
        )

    async def _run_checkpoints(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._until_checkpoint())
            self._wake.clear()
            if not self._closing and self._checkpoint_due():
                await self._checkpoint(wait=False)

    async def _lock(self, conn: psycopg.AsyncConnection[Any], *, wait: bool) -> bool:
        import psycopg

        from service.db.schema import CHECKPOINT_LOCK, LOCK_SPACE

        if not wait:
            cursor = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_SPACE, CHECKPOINT_LOCK)
            )
            row = await cursor.fetchone()
            return bool(row and row[0])
        await conn.execute(
            "SELECT set_config('lock_timeout', %s, true)", (_ms(self._lock_timeout_s),)
        )
        try:
            async with conn.transaction():  # a savepoint: a timeout leaves the transaction usable
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, CHECKPOINT_LOCK)
                )
        except psycopg.errors.LockNotAvailable:
            return False
        return True

    async def _checkpoint(self, *, wait: bool) -> None:
        if self._broken is not None:
            return
        target = self._high_water
        try:
            async with self._pool.connection() as conn:

                async def lock(connection: psycopg.AsyncConnection[Any]) -> bool:
                    return await self._lock(connection, wait=wait)

                outcome: Signed = await sign_checkpoint(
                    conn,
                    signer=self._signer,
                    origin=self._origin,
                    mac_key=self._mac_key,
                    lock=lock,
                )
        except (LogCorruptError, AuditError) as error:
            self._break(error)
            return
        except Exception as error:  # noqa: BLE001 - a database failure: try again later
            _log.warning("audit.pg_checkpoint_failed", error=describe(error))
            self._next_try = time.monotonic() + self._retry_seconds
            return
        if outcome.busy:  # another replica is signing: look again shortly
            self._next_try = time.monotonic() + min(self._retry_seconds, self._checkpoint_seconds)
            return
        self._checkpoints += outcome.signed
        self._checkpointed = max(self._checkpointed, outcome.size)
        self._high_water = max(self._high_water, outcome.size)
        if self._checkpointed >= target:
            self._uncheckpointed_since = None
            if self._high_water > self._checkpointed:  # appended meanwhile
                self._uncheckpointed_since = time.monotonic()
