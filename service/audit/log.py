"""The durable audit log: group-committed appends, signed checkpoints, fail-closed.

`append` numbers and seals a record on the caller's thread (so the sequence is known at once and
is the order of the log), queues it, and returns only once it is written and fsynced. One writer
thread drains the queue: it writes everything queued while the previous fsync ran, fsyncs once,
and resolves every waiter of the batch with one `call_soon_threadsafe` per event loop. The event
loop never touches the disk.

If a write or fsync fails, the waiters of that batch get AuditWriteError and the log stays failed:
every later append raises at once. Nothing retries, because after a failed fsync the kernel may
have dropped the dirty pages and a retry could report success for data that is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from service.audit.checkpoint import (
    ROTATION_MARK,
    Checkpoint,
    CheckpointError,
    Signer,
    VerifierKey,
    check_origin,
    format_checkpoint,
    parse_body,
    parse_checkpoint,
    rotation_in,
    rotation_record,
    signer_names,
    split_note,
)
from service.audit.errors import AuditError, AuditWriteError, LogCorruptError
from service.audit.index import IndexedFrontier, IndexWriter
from service.audit.merkle import MerkleFrontier, leaf_hash
from service.audit.storage import (
    CHECKPOINT_FILE,
    GENESIS_CHAIN,
    LEGACY_RESUME_FILE,
    MAC_KEY_BYTES,
    LogReader,
    TornTail,
    encode_record,
    frame,
    list_segments,
    open_envelope,
    read_checkpoint_notes,
    seal_envelope,
    segment_name,
    stored_chain,
)

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_CHECKPOINT_SECONDS = 10.0
DEFAULT_MAX_BATCH = 1024
_FILE_MODE = 0o600  # records hold pseudonyms and sealed inputs: owner only
_log = structlog.get_logger("privscore.audit")

Waiter = asyncio.Future[Any] | concurrent.futures.Future[Any]


@dataclass(frozen=True)
class Appended:
    """A record that is durable: its place in the log and its Merkle leaf hash."""

    sequence: int
    leaf_hash: bytes


@dataclass(frozen=True)
class AuditStats:
    """Counts since open: records made durable, write batches, fsync calls, checkpoints signed."""

    records: int
    batches: int
    fsyncs: int
    checkpoints: int


@dataclass(frozen=True)
class RecoveryReport:
    """What open found: the number of records, the latest checkpoint's size (0: none), and any
    torn tail it cut off."""

    size: int
    torn_tails: tuple[TornTail, ...]
    checkpointed: int = 0


@dataclass(frozen=True)
class _Pending:
    sequence: int
    frame: bytes
    leaf_hash: bytes
    chain: bytes
    waiter: Waiter
    rotate_to: Signer | None = None  # a key rotation record: sign with this key after it


@dataclass(frozen=True)
class _Close:
    waiter: Waiter


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _settle_on_loop(settled: list[tuple[asyncio.Future[Any], object]]) -> None:
    for future, outcome in settled:
        if future.done():  # the caller was cancelled; the record is in the log regardless
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _settle(settled: list[tuple[Waiter, object]]) -> None:
    """Resolve waiters from the writer thread: one wake-up per event loop, not per record."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]] = {}
    for waiter, outcome in settled:
        if isinstance(waiter, asyncio.Future):
            by_loop.setdefault(waiter.get_loop(), []).append((waiter, outcome))
        elif isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)
    for loop, on_loop in by_loop.items():
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            loop.call_soon_threadsafe(_settle_on_loop, on_loop)


def lock_log_directory(directory: Path) -> int:
    """Take the lock a log's writer holds on its directory (which must exist): the directory's
    open descriptor, whose closing releases it. AuditError when another writer holds it: a
    running server, or a command that must not run beside one."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(
            f"{directory} is in use by another audit log writer (a running server?)"
        ) from None
    return fd


@contextlib.contextmanager
def log_directory_locked(directory: Path) -> Iterator[None]:
    """`lock_log_directory` for the length of a `with` block."""
    fd = lock_log_directory(directory)
    try:
        yield
    finally:
        os.close(fd)


class AuditLog:
    """An append-only, tamper-evident record log in `directory`, open for writing.

    Opening checks the log before anything is appended, and refuses it (AuditError naming the
    file and the problem) unless: the latest checkpoint is signed by `signer` for `origin`; the
    records it covers hash to its root; every record after it carries this server's MAC (it was
    written by a holder of `mac_key`, not appended by someone else) and follows the chain; and
    the log has not been handed to another key by a rotation record. A torn final record (an
    append that was never acknowledged) is cut off, logged as `audit.torn_tail_truncated` and
    reported in `recovery`. Opening reads the whole log (hashing, not parsing, what the latest
    checkpoint covers), and the same pass checks the lookup index (service/audit/index.py)
    against every record and repairs it where it differs (`audit.index_repaired`); the writer
    then keeps it current, covering every checkpoint before it is signed. The index is derived
    data: a failure to keep it is logged (`audit.index_failed`), never a failure of the log.
    One process at a time: the directory is locked. Opening does disk reads; on an event loop,
    open it with `asyncio.to_thread`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        signer: Signer,
        mac_key: bytes,
        origin: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
        max_batch: int = DEFAULT_MAX_BATCH,
        fsync: Callable[[int], None] = os.fsync,
        observe: Callable[[int, bytes], None] | None = None,
    ) -> None:
        check_origin(origin)
        if min(segment_bytes, checkpoint_every, max_batch) < 1 or checkpoint_seconds <= 0:
            raise ValueError("segment size, checkpoint cadence and batch size must be positive")
        if len(mac_key) != MAC_KEY_BYTES:
            raise ValueError(f"the record MAC key must be {MAC_KEY_BYTES} bytes")
        self._directory = Path(directory)
        self._signer = signer  # the writer thread replaces it when a key rotation commits
        self._mac_key = mac_key
        self._origin = origin
        self._segment_bytes = segment_bytes
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._max_batch = max_batch
        self._fsync = fsync
        # Shown every stored envelope (sequence, bytes) during the open's pass, so a caller that
        # needs to read the log at start (the server's store reconciliation) reads it once.
        self._observe = observe
        self._records = self._batches = self._fsyncs = self._checkpoints = 0
        # Told (records, seconds) of each group commit's write and fsync, on the writer's
        # thread: the server's metrics set it.
        self.on_commit: Callable[[int, float], None] | None = None

        self._lock = threading.Lock()  # guards sequence, chain, failure and closing
        self._queue: queue.SimpleQueue[_Pending | _Close] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._closing = False

        # The tree, the chain and the checkpoint state continue from what _recover finds on disk.
        self._frontier: MerkleFrontier
        self._next_sequence: int
        self._chain: bytes
        self._checkpointed_size: int | None
        self._uncheckpointed_since: float | None

        self._dir_fd = self._lock_directory()
        self._segment_fd: int | None = None
        self._segment_first_sequence = 0
        self._segment_size = 0
        self._committed_chain: bytes  # the chain of the last durable record (writer thread)
        self._checkpoint_fd: int | None = None
        self._index: IndexWriter | None = None
        try:
            self.recovery: RecoveryReport = self._recover()
            self._checkpoint_fd = self._create_or_open(CHECKPOINT_FILE)
        except BaseException:
            self._close_files()
            raise
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------

    async def append(self, record: Mapping[str, Any]) -> Appended:
        """Log `record` (a JSON object); return once it is fsynced.

        Raises AuditWriteError if the log has failed or is closed, AuditRecordError if the record
        cannot be logged. A caller cancelled while waiting does not withdraw the record.
        """
        (appended,) = await self.append_all([record])
        return appended

    async def append_all(self, records: Sequence[Mapping[str, Any]]) -> list[Appended]:
        """`append` for several records, in order, returning once all are fsynced; one waiter
        per record, not one task, because a batch's decisions arrive together."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Appended]] = []
        try:
            for record in records:
                future: asyncio.Future[Appended] = loop.create_future()
                self._enqueue(record, future)
                futures.append(future)
        except BaseException:
            # The records already queued will be written: settle them before failing.
            await asyncio.gather(*futures, return_exceptions=True)
            raise
        return list(await asyncio.gather(*futures))

    def append_sync(self, record: Mapping[str, Any]) -> Appended:
        """`append` for code without an event loop (offline tools, tests); blocks until durable."""
        future: concurrent.futures.Future[Appended] = concurrent.futures.Future()
        self._enqueue(record, future)
        return future.result()

    async def close(self) -> None:
        """Finish queued appends, sign a final checkpoint, fsync, and stop the writer."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            if self._request_close(future):
                await future
        finally:
            await asyncio.to_thread(self._thread.join)

    def close_sync(self) -> None:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            if self._request_close(future):
                future.result()
        finally:
            self._thread.join()

    @property
    def failed(self) -> bool:
        """True once a write failed: the log takes no more records (serve NOT_SERVING)."""
        return self._failure is not None

    @property
    def stats(self) -> AuditStats:
        return AuditStats(self._records, self._batches, self._fsyncs, self._checkpoints)

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def verifier(self) -> VerifierKey:
        """The key that signs this log's checkpoints now."""
        return self._signer.verifier

    def rotate_key_sync(self, new: Signer, time: str) -> Appended:
        """Hand the log to `new`: append a rotation record signed by the current key and
        `new`, sign a checkpoint with both right after it, and sign every later checkpoint
        with `new` alone. Returns once that checkpoint is durable."""
        if new.name != self._signer.name:
            raise AuditError("the new key must sign under the log's key name")
        if new.verifier == self._signer.verifier:
            raise AuditError("the new key is the key in use")
        future: concurrent.futures.Future[Appended] = concurrent.futures.Future()
        with self._lock:
            record = rotation_record(self._origin, self._next_sequence, self._signer, new, time)
            self._enqueue_locked(encode_record(record), future, rotate_to=new)
        return future.result()

    def _enqueue(self, record: Mapping[str, Any], waiter: Waiter) -> None:
        record_json = encode_record(record)
        with self._lock:
            self._enqueue_locked(record_json, waiter)

    def _enqueue_locked(
        self, record_json: bytes, waiter: Waiter, rotate_to: Signer | None = None
    ) -> None:
        if self._failure is not None:
            raise AuditWriteError(f"audit log has failed: {self._failure}") from self._failure
        if self._closing:
            raise AuditWriteError("audit log is closed")
        sequence = self._next_sequence
        envelope, self._chain = seal_envelope(sequence, record_json, self._chain, self._mac_key)
        self._next_sequence += 1
        self._queue.put(
            _Pending(sequence, frame(envelope), leaf_hash(envelope), self._chain, waiter, rotate_to)
        )

    def _request_close(self, waiter: Waiter) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._closing = True
            self._queue.put(_Close(waiter))
            return True

    # -- opening ---------------------------------------------------------------------------

    def _lock_directory(self) -> int:
        created = not self._directory.exists()
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            self._sync_directory(self._directory.parent)
        return lock_log_directory(self._directory)

    def _sync_directory(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._sync(fd)
        finally:
            os.close(fd)

    def _recover(self) -> RecoveryReport:
        torn: list[TornTail] = []
        notes, torn_note = read_checkpoint_notes(self._directory)
        if torn_note is not None:
            torn.append(self._cut(torn_note))
        latest = self._check_latest_checkpoint(notes)
        checkpointed = latest.size if latest is not None else 0
        # An earlier version kept a resume point here (world-readable); the log is read whole.
        (self._directory / LEGACY_RESUME_FILE).unlink(missing_ok=True)

        # The lookup index is derived data: the same pass checks it record by record against
        # what is read here and rewrites it where it differs (service/audit/index.py).
        self._index = index = IndexWriter(self._directory, self._mac_key)
        frontier = IndexedFrontier(index)
        root_at_latest = frontier.root() if checkpointed == 0 else None
        reader = LogReader(self._directory)
        chain = GENESIS_CHAIN
        rotated_to: VerifierKey | None = None
        try:
            for envelope in reader.envelopes():
                sequence = frontier.size
                if sequence >= checkpointed:
                    stored, chain = open_envelope(envelope, sequence, chain)
                    if not stored.authentic(self._mac_key):
                        raise LogCorruptError(
                            sequence,
                            "does not carry this server's MAC: the server did not write it",
                        )
                elif sequence == checkpointed - 1:
                    chain = stored_chain(envelope, sequence)
                # Records the latest checkpoint covers are only hashed, not parsed: its root,
                # compared below, vouches for every byte of them. Key rotations are parsed
                # wherever they are, to know which key the log expects now.
                if ROTATION_MARK in envelope:
                    rotated_to = self._rotation(envelope, sequence) or rotated_to
                if self._observe is not None:
                    self._observe(sequence, envelope)
                frontier.append(leaf_hash(envelope))
                index.record(sequence, reader.offset, envelope)
                if frontier.size == checkpointed:
                    root_at_latest = frontier.root()
        except LogCorruptError as error:
            raise LogCorruptError(
                error.sequence,
                f"{self._directory / reader.file}: {error.reason}; refusing to open the log "
                "(run `privscore audit verify`)",
            ) from None
        if reader.torn is not None:
            torn.append(self._cut(reader.torn))
        checkpoints = self._directory / CHECKPOINT_FILE
        if checkpointed > frontier.size:
            raise LogCorruptError(
                frontier.size,
                f"{checkpoints}: the latest signed checkpoint covers {checkpointed} records but "
                f"the segments hold only {frontier.size}; refusing to open the log "
                "(run `privscore audit verify`)",
            )
        if latest is not None and root_at_latest != latest.root_hash:
            raise LogCorruptError(
                checkpointed - 1 if checkpointed else None,
                f"{checkpoints}: the records no longer give the latest signed checkpoint's root "
                f"(size {checkpointed}): a record was altered; refusing to open the log "
                "(run `privscore audit verify`)",
            )
        if rotated_to is not None and rotated_to != self._signer.verifier:
            raise AuditError(
                f"{self._directory}: the log was handed to audit key {rotated_to.key_id.hex()} by "
                f"a key rotation, but this server signs with {self.verifier.key_id.hex()}; "
                "finish it with `privscore audit rotate-key`"
            )

        repaired_from = index.finish(frontier.size)
        if repaired_from is not None:
            _log.warning(
                "audit.index_repaired",
                from_sequence=repaired_from,
                size=frontier.size,
                directory=str(self._directory),
            )
        self._frontier = frontier
        self._next_sequence = frontier.size
        self._chain = self._committed_chain = chain
        self._checkpointed_size = latest.size if latest is not None else None
        self._uncheckpointed_since = (
            time.monotonic() if frontier.size != (self._checkpointed_size or 0) else None
        )
        segments = list_segments(self._directory)
        if segments:
            self._segment_first_sequence = segments[-1][0]
            self._segment_fd = os.open(segments[-1][1], os.O_WRONLY | os.O_APPEND)
            self._segment_size = os.fstat(self._segment_fd).st_size
        return RecoveryReport(frontier.size, tuple(torn), checkpointed)

    def _check_latest_checkpoint(self, notes: list[bytes]) -> Checkpoint | None:
        """The latest stored checkpoint, verified under this server's key and origin."""
        if not notes:
            return None
        path = self._directory / CHECKPOINT_FILE
        try:
            text = notes[-1].decode("utf-8")
            origin = parse_body(split_note(text)[0])[0]
        except (UnicodeDecodeError, CheckpointError) as error:
            raise LogCorruptError(
                None, f"{path}: the latest checkpoint is malformed ({error}); refusing to open"
            ) from None
        if origin != self._origin:
            raise AuditError(f"{self._directory} holds the log of {origin!r}, not {self._origin!r}")
        try:
            return parse_checkpoint(text, self._signer.verifier, self._origin)
        except CheckpointError as error:
            ours = self._signer.verifier
            raise LogCorruptError(
                None,
                f"{path}: the latest checkpoint is refused: {error} (this server's key: "
                f"{ours.name} {ours.key_id.hex()}; the note is signed as "
                f"{', '.join(signer_names(text))}); "
                "refusing to open the log",
            ) from None

    def _rotation(self, envelope: bytes, sequence: int) -> VerifierKey | None:
        """The key a stored rotation record hands the log to, once both keys' signatures check;
        None if the record only looked like one."""
        try:
            return rotation_in(self._origin, sequence, json.loads(envelope)["record"])
        except CheckpointError as error:
            raise LogCorruptError(sequence, f"bad key rotation: {error}") from None

    def _cut(self, torn: TornTail) -> TornTail:
        """Truncate an interrupted append off the end of a file, durably, and say so."""
        fd = os.open(self._directory / torn.file, os.O_WRONLY)
        try:
            os.ftruncate(fd, torn.offset)
            self._sync(fd)
        finally:
            os.close(fd)
        _log.warning(
            "audit.torn_tail_truncated",
            file=torn.file,
            offset=torn.offset,
            bytes=torn.length,
            sequence=torn.sequence,
        )
        return torn

    def _create_or_open(self, name: str) -> int:
        path = self._directory / name
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
        if created:
            self._sync(self._dir_fd)
        return fd

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._until_checkpoint())
            except queue.Empty:
                self._checkpoint()
                continue
            batch = [item]
            while len(batch) < self._max_batch and not isinstance(batch[-1], _Close):
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending = [entry for entry in batch if isinstance(entry, _Pending)]
            if pending:
                self._commit(pending)
            if self._checkpoint_due():
                self._checkpoint()
            if isinstance(batch[-1], _Close):  # always last: nothing is queued after closing
                self._finish(batch[-1])
                return

    def _commit(self, pending: list[_Pending]) -> None:
        offsets: list[int] = []
        if self._failure is None:
            try:
                started = time.perf_counter()
                offsets = self._write(pending)
                if self.on_commit is not None:
                    self.on_commit(len(pending), time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - whatever failed, fail closed
                self._fail(error)
        if self._failure is not None:
            _settle([(entry.waiter, self._write_error()) for entry in pending])
            return
        for entry, offset in zip(pending, offsets, strict=True):
            self._frontier.append(entry.leaf_hash)
            if self._index is not None:
                self._index.record(entry.sequence, offset, entry.frame[4:-4])
        if self._index is not None:
            self._index.commit(self._frontier.size)
        self._committed_chain = pending[-1].chain
        self._records += len(pending)
        self._batches += 1
        if self._uncheckpointed_since is None:
            self._uncheckpointed_since = time.monotonic()
        rotate_to = next((e.rotate_to for e in pending if e.rotate_to is not None), None)
        if rotate_to is not None:
            # The transition: one checkpoint past the rotation record, signed by both keys.
            self._checkpoint(cosigner=rotate_to)
            if self._failure is not None:
                _settle([(entry.waiter, self._write_error()) for entry in pending])
                return
            self._signer = rotate_to
        _settle([(entry.waiter, Appended(entry.sequence, entry.leaf_hash)) for entry in pending])

    def _write(self, pending: list[_Pending]) -> list[int]:
        """Write and fsync `pending`; the offset of each frame in its segment."""
        chunk: list[bytes] = []
        offsets: list[int] = []
        for entry in pending:
            full = self._segment_size + len(entry.frame) > self._segment_bytes
            if self._segment_fd is None or (full and self._segment_size > 0):
                self._flush(chunk)
                chunk = []
                self._start_segment(entry.sequence)
            chunk.append(entry.frame)
            offsets.append(self._segment_size)
            self._segment_size += len(entry.frame)
        self._flush(chunk)
        return offsets

    def _flush(self, chunk: list[bytes]) -> None:
        if chunk and self._segment_fd is not None:
            _write_all(self._segment_fd, b"".join(chunk))
            self._sync(self._segment_fd)

    def _start_segment(self, first_sequence: int) -> None:
        if self._segment_fd is not None:
            os.close(self._segment_fd)
            self._segment_fd = None
        path = self._directory / segment_name(first_sequence)
        self._segment_fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, _FILE_MODE
        )
        self._segment_first_sequence = first_sequence
        self._segment_size = 0
        self._sync(self._dir_fd)  # the new name must survive a crash with the data in it

    def _sync(self, fd: int) -> None:
        self._fsync(fd)
        self._fsyncs += 1

    def _until_checkpoint(self) -> float | None:
        if self._uncheckpointed_since is None or self._failure is not None:
            return None
        return max(0.0, self._uncheckpointed_since + self._checkpoint_seconds - time.monotonic())

    def _checkpoint_due(self) -> bool:
        if self._failure is not None or self._uncheckpointed_since is None:
            return False
        behind = self._frontier.size - (self._checkpointed_size or 0)
        waited = time.monotonic() - self._uncheckpointed_since
        return behind >= self._checkpoint_every or waited >= self._checkpoint_seconds

    def _checkpoint(self, cosigner: Signer | None = None) -> None:
        if self._failure is not None or self._checkpoint_fd is None:
            return
        if self._index is not None:  # lookups find every checkpoint covered by the index
            self._index.flush()
        size = self._frontier.size
        signers = [self._signer] if cosigner is None else [self._signer, cosigner]
        note = format_checkpoint(self._origin, size, self._frontier.root(), signers=signers)
        try:
            _write_all(self._checkpoint_fd, frame(note.encode()))
            self._sync(self._checkpoint_fd)
        except Exception as error:  # noqa: BLE001 - whatever failed, fail closed
            self._fail(error)
            return
        self._checkpointed_size = size
        self._uncheckpointed_since = None
        self._checkpoints += 1

    def _finish(self, close: _Close) -> None:
        # A log that failed earlier has told every appender; only a failing final checkpoint
        # makes close itself fail.
        final_checkpoint_failed = False
        if self._failure is None and self._frontier.size != self._checkpointed_size:
            self._checkpoint()
            final_checkpoint_failed = self._failure is not None
        self._close_files()
        _settle([(close.waiter, self._write_error() if final_checkpoint_failed else None)])

    def _close_files(self) -> None:
        if self._index is not None:
            self._index.flush()
            self._index.close()
        for fd in (self._segment_fd, self._checkpoint_fd, self._dir_fd):
            if fd is not None:
                os.close(fd)  # closing the directory releases its lock
        self._segment_fd = self._checkpoint_fd = None

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self._failure = error
        _log.error("audit.write_failed", error_type=type(error).__name__, error=str(error))

    def _write_error(self) -> AuditWriteError:
        error = AuditWriteError(f"audit log write failed: {self._failure}")
        error.__cause__ = self._failure
        return error
