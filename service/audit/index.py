"""The lookup index: where each record lies, which decision it holds, and the tree's levels.

Derived data kept in `index/` beside the segments, so that a decision's record and its inclusion
proof against the latest checkpoint cost O(log n) reads instead of a pass over the log:

    index/positions          8 bytes per record (big-endian): the byte offset of record s's frame
                             in its segment, the one whose name holds the largest first sequence
                             not above s
    index/level-KK           32 bytes per node: node i of level k is the Merkle tree hash of the
                             perfect, aligned subtree over leaves [i * 2**k, (i + 1) * 2**k), so
                             level-00 holds the leaf hashes. The same hashes Tessera's tlog-tiles
                             keep, in one file per level rather than in tiles of 256.
    index/decisions.sqlite3  table decisions(seq INTEGER PRIMARY KEY, decision_id TEXT): every
                             record whose top-level decision_id is a string, indexed by
                             (decision_id, seq); table meta: format, and size, the number of records
                             [0, size) all of the above cover.
    index/chunks             32 bytes per complete chunk of 8192 records: a tag that lets open
                             accept the chunk's rows without reading its records again (see
                             `IndexWriter`); lookups never read it.

Nothing here is trusted for what a lookup returns, and nothing is fsynced:

- The writer (`IndexWriter`, driven by `AuditLog`) gathers what each durable batch adds and
  writes it every 256 records and before each checkpoint is signed (so every checkpoint a
  reader finds is covered), flat files first and the SQLite transaction that raises `size`
  last, so a reader that believes `size` finds the flat files written that far. Records after
  `size` (at most those since the last write) are read from the log when a lookup misses. A
  crash of the machine can lose or garble any of it, which the next open repairs.
- At open, the log's own pass over every record (which hashes them all for the signed
  checkpoint) feeds the index in check mode: every position, node and decision row is compared
  with what the records give (a chunk's rows through its tag when it has a valid one), and from
  the first one that differs the rest is rewritten, after `size` is lowered to where the index
  still agrees with the log; entries beyond the log are cut. A deleted, truncated, stale (a log
  rolled back to an older copy) or edited index is therefore exactly the log's again before
  the server serves.
- A lookup (`find_decision`) checks what it returns: the record is read from the segment at
  the indexed position and must hold the decision id and the sequence asked about, and its
  inclusion proof, built from the stored levels, must verify against the signed checkpoint's root
  with the leaf hash recomputed from the bytes read. Any failure raises `IndexUnusable` and the
  caller falls back to the one-pass scan. What a lookup cannot check is absence: an index edited
  to drop a decision's row after the server opened it makes a lookup answer "not found" until
  the next open repairs it (an edit below SQL, to the pages of SQLite's index on decision ids,
  until the index is deleted: open reads the table, not that index); never a wrong record or a
  proof that does not verify. `prove_record(..., confirm_not_found=True)`, which `privscore
  audit prove` uses, scans the log before answering "not found".
"""

from __future__ import annotations

import array
import bisect
import contextlib
import hashlib
import hmac
import json
import os
import re
import sqlite3
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import structlog

from service.audit.errors import LogCorruptError
from service.audit.merkle import (
    HASH_SIZE,
    MerkleFrontier,
    ProofError,
    fold,
    inclusion_path,
    perfect_subtrees,
    verify_inclusion,
)
from service.audit.storage import (
    FrameError,
    FrameFile,
    StoredRecord,
    list_segments,
    read_frame_at,
)

INDEX_DIR = "index"
POSITIONS_FILE = "positions"
CHUNKS_FILE = "chunks"
DECISIONS_DB = "decisions.sqlite3"
FORMAT = 1
_U64 = struct.Struct(">Q")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# Records per chunk: open checks the index a chunk at a time (which bounds what it holds in
# memory), and each complete chunk's rows carry a tag (see IndexWriter).
_CHUNK = 8192
_WRITE_EVERY = 256  # records the writer gathers before writing them, unless a checkpoint is due
_REINDEX_ABOVE = 20_000  # rows rewritten at open past which the id index is dropped and rebuilt
_SCHEMA = {
    ("table", "meta"): "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ("table", "decisions"): (
        "CREATE TABLE decisions(seq INTEGER PRIMARY KEY, decision_id TEXT NOT NULL)"
    ),
}
_ID_INDEX = "CREATE INDEX decisions_by_id ON decisions(decision_id, seq)"
_TAG_KEY_LABEL = b"privscore.v1/audit-index-chunk-tag"

_log = structlog.get_logger("privscore.audit")

# In a canonical envelope the record's members follow the first `"record":{` (the chain and MAC
# before it are base64). A "decision_id" string reached from there over scalar members only
# (strings without escapes, numbers, literals) cannot be inside a nested value, so it is the
# record's own. Anything else (a nested or escaped member before it, no decision_id) is parsed
# with json instead: this is only the fast path of the open pass, which reads every record.
_RECORD_START = b'"record":{'
_DECISION_ID = re.compile(
    rb'(?:"[^"\\]*":(?:"[^"\\]*"|-?[0-9][0-9.eE+-]*|true|false|null),)*?'
    rb'"decision_id":"([^"\\]*)"[,}]'
)


def decision_id_of(envelope: bytes) -> str | None:
    """A canonical envelope's top-level record.decision_id if it is a string, as json.loads
    reads it."""
    start = envelope.find(_RECORD_START)
    match = _DECISION_ID.match(envelope, start + len(_RECORD_START)) if start > 0 else None
    try:
        if match is not None:
            return match[1].decode("utf-8")
        value = json.loads(envelope)["record"].get("decision_id")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class IndexUnusable(Exception):
    """The index cannot answer this lookup (missing, behind the checkpoint, or disagreeing with
    the log); `quiet` when there is simply none, which is no news."""

    def __init__(self, reason: str, *, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.quiet = quiet


def _level_name(level: int) -> str:
    return f"level-{level:02d}"


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)  # whatever the umask, and a file left with wider bits
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_dir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, _DIR_MODE)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fchmod(fd, _DIR_MODE)
    finally:
        os.close(fd)


def _equal_prefix(stored: bytes, expected: bytes | bytearray, width: int) -> int:
    """How many whole entries of `width` bytes the two have in common from the start."""
    low, high = 0, min(len(stored), len(expected)) // width
    while low < high:  # entries [0, low) agree; the first difference is below high + 1
        middle = (low + high + 1) // 2
        if stored[: middle * width] == expected[: middle * width]:
            low = middle
        else:
            high = middle - 1
    return low


class _Stream:
    """One flat file of fixed-width entries: checked against what is fed, then written."""

    def __init__(self, path: Path, width: int, *, checking: bool) -> None:
        self.path = path
        self.fd = _open_private(path, os.O_RDWR | os.O_CREAT)
        self.width = width
        self.length = 0  # bytes settled: checked equal or written
        self.pending = bytearray()
        self.checking = checking

    def check(self) -> int | None:
        """Settle what agrees with the file; the entry where it first differs, if it does."""
        if not self.checking or not self.pending:
            return None
        stored = os.pread(self.fd, len(self.pending), self.length)
        same = _equal_prefix(stored, self.pending, self.width) * self.width
        self.length += same
        del self.pending[:same]
        if not self.pending:
            return None
        self.checking = False
        return self.length // self.width

    def write(self) -> None:
        if self.pending and not self.checking:
            written = os.pwrite(self.fd, self.pending, self.length)
            while written < len(self.pending):
                written += os.pwrite(
                    self.fd, memoryview(self.pending)[written:], self.length + written
                )
            self.length += len(self.pending)
            self.pending.clear()

    def cut(self) -> bool:
        """Drop stored entries beyond what was fed; whether there were any."""
        longer = os.fstat(self.fd).st_size > self.length
        if longer:
            os.ftruncate(self.fd, self.length)
        self.checking = False
        return longer

    def close(self) -> None:
        os.close(self.fd)


class IndexWriter:
    """The writer's side, owned by `AuditLog` (one thread at a time).

    Starts in check mode for the open pass (`record` for every record, its nodes through
    `nodes`, then `finish`), then appends what each durable batch adds (`record`, `nodes`,
    `commit`, and `flush` before a checkpoint). It never raises: an error is logged once as
    `audit.index_failed` and the index stops being maintained for this process (lookups then
    fall back to the scan once the checkpoint passes it; the next open repairs it). The audit
    log must never fail because of derived data.

    Checking the decision rows is what open pays most for: reading a record's decision id
    costs more than hashing it. So every complete chunk of `_CHUNK` records gets a tag in
    `chunks`, an HMAC under a key derived from the log's record MAC key over the chunk's leaf
    hashes and its rows. A chunk whose stored rows carry a valid tag is exactly what this
    server derived from these very records (the leaf hashes fix them), so open accepts its
    rows without reading any decision id; any other chunk (no tag, a tag that does not verify,
    the last, partial chunk) has its decision ids read from the records and compared. Without
    the key a tag cannot be made, so an edited row never passes; lookups do not use the tags.
    """

    def __init__(self, directory: Path, mac_key: bytes) -> None:
        self._dir = directory / INDEX_DIR
        self._tag_key = hmac.digest(mac_key, _TAG_KEY_LABEL, "sha256")
        self._failed = False
        self._checking = True
        self._fed = 0  # records fed
        self._size = self._written = 0  # the log's size at the last commit, and in the index
        self._diverged: int | None = None  # the first record from which anything was rewritten
        self._levels: list[_Stream] = []
        # Nodes completed and not yet in their level's stream, by level: the frontier appends
        # here directly (it is the open pass's hottest loop).
        self.nodes: list[bytearray] = [bytearray() for _ in range(64)]
        self._rows: list[tuple[int, str]] = []  # to insert at the next write
        self._envelopes: list[bytes] = []  # check mode: the current chunk's, read if need be
        self._chunk_start = 0  # the first record of the chunk not tagged yet
        self._chunk_leaves = bytearray()  # writer: that chunk's leaf hashes and rows so far
        self._chunk_rows: list[tuple[int, str]] = []
        self._row_cursor: sqlite3.Cursor | None = None
        self._row_buffer: list[tuple[int, str]] = []
        self._check_db: sqlite3.Connection | None = None
        self._rewritten_rows = 0
        self._dropped_id_index = False
        self._positions: _Stream | None = None
        self._tags: _Stream | None = None
        self._offsets = array.array("Q")  # fed, not yet in the positions stream
        self._db: sqlite3.Connection | None = None
        self._stored_size = 0  # the size the index claimed before this open
        try:
            _private_dir(self._dir)
            self._db = self._open_db()
            row = self._db.execute("SELECT value FROM meta WHERE key = 'size'").fetchone()
            self._stored_size = int(row[0]) if row is not None else 0
            self._positions = _Stream(self._dir / POSITIONS_FILE, 8, checking=True)
            self._tags = _Stream(self._dir / CHUNKS_FILE, HASH_SIZE, checking=True)
            self._row_cursor = self._stored_rows()
        except Exception as error:  # noqa: BLE001 - derived data: log, then do without
            self._fail(error)

    # -- fed by the log --------------------------------------------------------------------

    def record(self, sequence: int, offset: int, envelope: bytes) -> None:
        """Record `sequence`, framed at `offset` of its segment, once the frontier has taken
        its leaf (its nodes come through `nodes`, which `IndexedFrontier` fills)."""
        if self._positions is None:  # failed or closed: drop what the frontier still hands over
            self._drop_nodes()
            return
        self._offsets.append(offset)
        self._fed = sequence + 1
        if self._checking:
            self._envelopes.append(envelope)
            if self._fed % _CHUNK == 0:
                self._guarded(self._check_step)
            return
        decision_id = decision_id_of(envelope)
        if decision_id is not None:
            self._rows.append((sequence, decision_id))

    def finish(self, size: int) -> int | None:
        """End of the open pass over `size` records: settle the check, cut what lies beyond the
        log, and commit. Returns the first record from which anything was repaired (None: the
        index agreed with the log throughout)."""
        self._guarded(lambda: self._finish(size))
        return None if self._failed else self._diverged

    def commit(self, size: int) -> None:
        """After a durable batch of the log, now `size` records long: write what the batches
        since the last write added, once they are `_WRITE_EVERY` records or more (each write
        costs a few system calls and a SQLite transaction, on the writer thread)."""
        self._size = size
        if size - self._written >= _WRITE_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write what was fed, then raise `size` to cover it: before a checkpoint is signed,
        so that every checkpoint a reader finds is covered, and at close."""
        if self._size > self._written:
            self._guarded(lambda: self._commit(self._size))

    def close(self) -> None:
        streams = [*self._levels, self._positions, self._tags]
        for stream in streams:
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._levels, self._positions, self._tags = [], None, None
        if self._db is not None:
            # Closed, the database needs no -wal and -shm beside it, and a reader of a copy
            # (read-only, mode=ro) leaves none behind; the next open turns WAL back on.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA journal_mode=DELETE")
        for db in (self._check_db, self._db):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._check_db = self._db = None
        self._row_cursor = None
        self._envelopes = []

    @property
    def failed(self) -> bool:
        return self._failed

    # -- inside ----------------------------------------------------------------------------

    def _guarded(self, step: Callable[[], None]) -> None:
        if self._failed or self._db is None:  # failed, or closed
            return
        try:
            step()
        except Exception as error:  # noqa: BLE001 - derived data: log, then do without
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if not self._failed:
            _log.warning(
                "audit.index_failed",
                error_type=type(error).__name__,
                error=str(error),
                directory=str(self._dir),
            )
        self._failed = True
        self.close()
        self._rows = []
        self._chunk_rows = []
        self._chunk_leaves = bytearray()

    def _open_db(self) -> sqlite3.Connection:
        path = self._dir / DECISIONS_DB
        os.close(_open_private(path, os.O_RDWR | os.O_CREAT))
        try:
            db = self._connect(path)
        except sqlite3.DatabaseError:
            pass  # not a database: made again below
        else:
            if self._schema_ok(db):
                return db
            db.close()
        # Not ours, damaged, or another format: derived, so start it again.
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        os.close(_open_private(path, os.O_RDWR | os.O_CREAT))
        db = self._connect(path)
        db.execute("BEGIN")
        for sql in _SCHEMA.values():
            db.execute(sql)
        db.execute(_ID_INDEX)
        db.execute("INSERT INTO meta VALUES ('format', ?), ('size', 0)", (FORMAT,))
        db.execute("COMMIT")
        return db

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # lookups read while the writer appends
            db.execute("PRAGMA synchronous=OFF")  # derived: rebuilt at open, never fsynced
            db.execute("PRAGMA cache_size=-32768")  # 32 MiB: random ids touch random pages
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _schema_ok(db: sqlite3.Connection) -> bool:
        try:
            found = {
                (kind, name): sql
                for kind, name, sql in db.execute(
                    "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                )
            }
            tables = {key: sql for key, sql in found.items() if key[0] == "table"}
            if tables != _SCHEMA:
                return False
            index = found.get(("index", "decisions_by_id"))
            if len(found) - len(tables) > (index is not None) or index not in (None, _ID_INDEX):
                return False  # an index that is not ours could answer lookups wrongly
            row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            return row is not None and row[0] == FORMAT
        except sqlite3.Error:
            return False

    def _stored_rows(self) -> sqlite3.Cursor:
        """The stored rows in sequence order, read on a connection of their own: its snapshot
        does not move while the check rewrites rows on the writer's connection."""
        self._check_db = sqlite3.connect(
            f"file:{quote(str(self._dir / DECISIONS_DB))}?mode=ro", uri=True
        )
        return self._check_db.execute("SELECT seq, decision_id FROM decisions ORDER BY seq")

    def _stored_rows_below(self, end: int) -> list[tuple[int, str]]:
        """The next stored rows, up to the first whose sequence is `end` or more."""
        assert self._row_cursor is not None
        rows: list[tuple[int, str]] = []
        while True:
            if not self._row_buffer:
                self._row_buffer = self._row_cursor.fetchmany(8192)
                if not self._row_buffer:
                    return rows
            cut = bisect.bisect_left(self._row_buffer, (end,))
            rows += self._row_buffer[:cut]
            del self._row_buffer[:cut]
            if self._row_buffer:
                return rows

    def _stop_reading_rows(self) -> None:
        self._row_cursor = None
        self._row_buffer = []
        if self._check_db is not None:
            self._check_db.close()
            self._check_db = None

    def _tag(self, chunk: int, leaves: bytes, rows: list[tuple[int, str]]) -> bytes | None:
        """The chunk's tag over its leaf hashes and rows; None for rows no server wrote."""
        try:
            seqs = array.array("q", [seq for seq, _ in rows])
            ids = [decision_id for _, decision_id in rows]
            lengths = array.array("q", map(len, ids))
            text = "".join(ids).encode("utf-8", "surrogatepass")
        except (TypeError, OverflowError):
            return None
        if sys.byteorder == "little":
            seqs.byteswap()
            lengths.byteswap()
        digest = hashlib.sha256(_U64.pack(chunk) + hashlib.sha256(leaves).digest())
        for part in (_U64.pack(len(rows)), seqs.tobytes(), lengths.tobytes(), text):
            digest.update(part)
        return hmac.digest(self._tag_key, digest.digest(), "sha256")

    def _drop_nodes(self) -> None:
        for pending in self.nodes:
            if not pending:
                break
            pending.clear()

    def _take_nodes(self) -> bytes:
        """Move the nodes completed since the last call into their streams; the leaf hashes."""
        leaves = bytes(self.nodes[0])
        for level, pending in enumerate(self.nodes):
            if not pending:  # a level only completes a node when the one below does
                break
            if level == len(self._levels):
                path = self._dir / _level_name(level)
                self._levels.append(_Stream(path, HASH_SIZE, checking=self._checking))
            self._levels[level].pending += pending
            pending.clear()
        return leaves

    def _take_offsets(self) -> None:
        assert self._positions is not None
        if sys.byteorder == "little":
            self._offsets.byteswap()  # stored big-endian
        self._positions.pending += self._offsets.tobytes()
        del self._offsets[:]

    def _lower_size(self, first_difference: int) -> None:
        """Before anything from `first_difference` on is rewritten, stop claiming it."""
        assert self._db is not None
        if self._diverged is None or first_difference < self._diverged:
            self._diverged = first_difference
        self._db.execute(
            "UPDATE meta SET value = min(value, ?) WHERE key = 'size'", (first_difference,)
        )

    def _chunk_rows_checked(
        self, leaves: bytes
    ) -> tuple[list[tuple[int, str]], int | None, bytes | None]:
        """The current chunk's rows as the log gives them, the sequence from which the stored
        rows differ if they do (then `_rows` holds what to write from there), and the chunk's
        tag if it is complete."""
        start, end = self._chunk_start, self._fed
        complete = end - start == _CHUNK
        stored = self._stored_rows_below(end) if self._row_cursor is not None else None
        if complete and stored is not None and self._tags is not None:
            tag = self._tag(start // _CHUNK, leaves, stored)
            kept = os.pread(self._tags.fd, HASH_SIZE, start // _CHUNK * HASH_SIZE)
            if tag is not None and hmac.compare_digest(tag, kept):
                return stored, None, tag  # vouched for by this server: no decision id read
        rows = [
            (sequence, decision_id)
            for sequence, envelope in enumerate(self._envelopes, start)
            if (decision_id := decision_id_of(envelope)) is not None
        ]
        tag = self._tag(start // _CHUNK, leaves, rows) if complete else None
        if stored is None:  # the stored rows differed earlier: everything is written
            self._rows = rows
            return rows, None, tag
        if rows == stored:
            return rows, None, tag
        same = next(
            (n for n, pair in enumerate(zip(rows, stored, strict=False)) if pair[0] != pair[1]),
            min(len(rows), len(stored)),
        )
        first = min(
            rows[same][0] if same < len(rows) else end,
            int(stored[same][0]) if same < len(stored) else end,
        )
        self._stop_reading_rows()
        self._rows = rows[same:]
        return rows, first, tag

    def _write_rows(self, from_sequence: int | None) -> None:
        assert self._db is not None
        if from_sequence is not None:
            self._db.execute("DELETE FROM decisions WHERE seq >= ?", (from_sequence,))
        if not self._rows:
            return
        if self._checking:
            self._rewritten_rows += len(self._rows)
            if self._rewritten_rows > _REINDEX_ABOVE and not self._dropped_id_index:
                # Rebuilding many rows: one sort at the end beats a random insert per row.
                self._db.execute("DROP INDEX IF EXISTS decisions_by_id")
                self._dropped_id_index = True
        self._db.executemany("INSERT INTO decisions VALUES (?, ?)", self._rows)
        self._rows.clear()

    def _check_step(self) -> None:
        """Check the chunk the pass has just finished (or the last, partial one)."""
        assert self._db is not None and self._positions is not None and self._tags is not None
        self._take_offsets()
        leaves = self._take_nodes()
        rows, rows_from, tag = self._chunk_rows_checked(leaves)
        if self._fed - self._chunk_start == _CHUNK:
            assert tag is not None  # every complete chunk has one
            self._tags.pending += tag
            self._chunk_start = self._fed
        else:  # the last chunk: the writer tags it once complete
            self._chunk_leaves = bytearray(leaves)
            self._chunk_rows = list(rows)
        self._envelopes = []
        differences: list[int] = []
        if rows_from is not None:
            differences.append(rows_from)
        position = self._positions.check()
        if position is not None:
            differences.append(position)
        for level, stream in enumerate(self._levels):
            node = stream.check()
            if node is not None:
                differences.append(((node + 1) << level) - 1)  # the record completing it
        self._tags.check()  # lookups do not read tags: a wrong one is rewritten, no more
        self._db.execute("BEGIN")
        if differences:
            self._lower_size(min(differences))
        self._db.execute("COMMIT")  # the lower size is visible before anything is rewritten
        self._db.execute("BEGIN")
        for stream in (self._positions, self._tags, *self._levels):
            stream.write()
        self._write_rows(rows_from)
        self._db.execute("COMMIT")

    def _finish(self, size: int) -> None:
        assert self._db is not None and self._positions is not None and self._tags is not None
        self._check_step()
        self._db.execute("BEGIN")
        extra = None
        if self._row_cursor is not None:
            extra = self._row_buffer[0] if self._row_buffer else self._row_cursor.fetchone()
        self._stop_reading_rows()
        cut = [self._positions.cut(), *(stream.cut() for stream in self._levels)]
        self._tags.cut()
        wanted = {_level_name(level) for level in range(len(self._levels))}
        for path in self._dir.glob("level-*"):  # levels a larger log left behind
            if path.name not in wanted:
                path.unlink()
                cut.append(True)
        if extra is not None:
            self._db.execute("DELETE FROM decisions WHERE seq >= ?", (extra[0],))
            cut.append(True)
        if any(cut) or self._stored_size != size:  # it claimed more, or less, than the log
            self._lower_size(min(size, self._stored_size))
        if self._dropped_id_index:
            self._db.execute(_ID_INDEX)
            self._dropped_id_index = False
        elif not self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'decisions_by_id'"
        ).fetchone():  # dropped by someone else: every lookup was a scan of the table
            self._lower_size(0)
            self._db.execute(_ID_INDEX)
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'size'", (size,))
        self._db.execute("COMMIT")
        self._checking = False
        self._size = self._written = size

    def _commit(self, size: int) -> None:
        assert self._db is not None and self._positions is not None and self._tags is not None
        self._take_offsets()
        self._chunk_leaves += self._take_nodes()
        self._chunk_rows += self._rows
        while len(self._chunk_leaves) >= _CHUNK * HASH_SIZE:  # a chunk complete: tag it
            end = self._chunk_start + _CHUNK
            within = bisect.bisect_left(self._chunk_rows, (end,))
            leaves = bytes(self._chunk_leaves[: _CHUNK * HASH_SIZE])
            tag = self._tag(self._chunk_start // _CHUNK, leaves, self._chunk_rows[:within])
            assert tag is not None
            self._tags.pending += tag
            del self._chunk_leaves[: _CHUNK * HASH_SIZE]
            del self._chunk_rows[:within]
            self._chunk_start = end
        for stream in (self._positions, self._tags, *self._levels):
            stream.write()
        self._db.execute("BEGIN")
        self._write_rows(None)
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'size'", (size,))
        self._db.execute("COMMIT")
        self._written = size


class IndexedFrontier(MerkleFrontier):
    """The log's frontier, handing every completed perfect subtree to the index."""

    def __init__(self, index: IndexWriter) -> None:
        super().__init__()
        self._sink = index.nodes

    def _completed(self, start: int, end: int, node: bytes) -> None:
        self._sink[(end - start).bit_length() - 1] += node


class _Reader:
    """Read-only access to an index, for one lookup."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.dir = directory / INDEX_DIR
        path = self.dir / DECISIONS_DB
        if not path.is_file():
            raise IndexUnusable("the log has no index", quiet=True)
        self.level_fds: dict[int, int] = {}
        self.positions_fd: int | None = None
        self.segments = list_segments(directory)
        self.firsts = [first for first, _ in self.segments]
        self.db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)

    def close(self) -> None:
        self.db.close()
        for fd in [*self.level_fds.values(), self.positions_fd]:
            if fd is not None:
                os.close(fd)

    def size(self) -> int:
        format_row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        size_row = self.db.execute("SELECT value FROM meta WHERE key = 'size'").fetchone()
        if format_row is None or format_row[0] != FORMAT or size_row is None:
            raise IndexUnusable("the index is of another format")
        return int(size_row[0])

    def first_sequence(self, decision_id: str) -> int | None:
        row = self.db.execute(
            "SELECT seq FROM decisions WHERE decision_id = ? ORDER BY seq LIMIT 1", (decision_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _read(self, fd: int, width: int, index: int, what: str) -> bytes:
        data = os.pread(fd, width, index * width)
        if len(data) != width:
            raise IndexUnusable(f"the index's {what} file ends before entry {index}")
        return data

    def position(self, sequence: int) -> tuple[Path, int]:
        """The segment holding record `sequence` and its frame's offset there."""
        if self.positions_fd is None:
            self.positions_fd = os.open(self.dir / POSITIONS_FILE, os.O_RDONLY)
        (offset,) = _U64.unpack(self._read(self.positions_fd, 8, sequence, POSITIONS_FILE))
        segment = bisect.bisect_right(self.firsts, sequence) - 1
        if segment < 0:
            raise IndexUnusable(f"no segment holds record {sequence}")
        return self.segments[segment][1], offset

    def node(self, level: int, index: int) -> bytes:
        if level not in self.level_fds:
            self.level_fds[level] = os.open(self.dir / _level_name(level), os.O_RDONLY)
        return self._read(self.level_fds[level], HASH_SIZE, index, _level_name(level))

    def range_hash(self, start: int, end: int) -> bytes:
        """The Merkle tree hash of leaves [start, end), from the fewest stored nodes."""
        return fold([self.node(level, index) for level, index in perfect_subtrees(start, end)])

    def record(self, sequence: int, decision_id: str) -> StoredRecord:
        """Record `sequence`, read where the index says it lies. Checked to be that record and
        to hold `decision_id`: an index pointing elsewhere is not believed."""
        path, offset = self.position(sequence)
        envelope = read_frame_at(path, offset)
        parsed = json.loads(envelope)
        record = parsed.get("record") if isinstance(parsed, dict) else None
        if not isinstance(record, dict) or parsed.get("seq") != sequence:
            raise IndexUnusable(f"the index's position of record {sequence} holds another")
        if record.get("decision_id") != decision_id:
            raise IndexUnusable(f"record {sequence} does not hold the decision the index says")
        return StoredRecord(sequence, record, envelope)

    def scan_after(self, size: int, decision_id: str) -> StoredRecord | None:
        """The first record from `size` on that holds `decision_id`: those the index does not
        cover yet, under a running writer at most the few hundred since its last write."""
        path, offset = self.position(size - 1)
        start = offset + 8 + len(read_frame_at(path, offset))
        needle = json.dumps(decision_id, ensure_ascii=False).encode("utf-8")
        sequence = size
        later = [(first, p) for first, p in self.segments if first >= size]
        files = [(None, path, start), *((first, p, 0) for first, p in later)]
        for number, (first, segment, begin) in enumerate(files):
            if first is not None and first != sequence:
                raise IndexUnusable(f"{segment.name} does not continue the log at {sequence}")
            frames = FrameFile(segment, may_be_torn=number == len(files) - 1, start=begin)
            for envelope in frames.frames():
                if needle in envelope:
                    record = json.loads(envelope)["record"]
                    if record.get("decision_id") == decision_id:
                        return StoredRecord(sequence, record, envelope)
                sequence += 1
        return None


def find_decision(
    directory: Path, decision_id: str, tree_size: int, root_hash: bytes
) -> tuple[StoredRecord, list[bytes] | None] | None:
    """`find_with_inclusion_proof` for one decision id, from the index: the first record
    holding it with its proof in the tree of `tree_size` records whose root is `root_hash`
    (None when it is newer than that tree), or None if no record holds it.

    Raises IndexUnusable when the index cannot answer: missing, of another format, covering
    fewer records than the tree, or disagreeing with the log. What it returns is checked:
    - the record is read at its indexed position and must be that sequence and hold the id
      (`_Reader.record`), so a wrong position or row is caught, not returned;
    - the proof's nodes come from the stored levels, which anyone with the disk could edit, so
      the proof is verified against `root_hash` (the signed checkpoint's) with the leaf hash
      recomputed from the bytes read: a stale or edited level, or a record that is not the
      signed one, fails here and the caller scans instead. Comparing with the stored level-0
      hash would add nothing: the recomputed hash is the one the signature vouches for.
    """
    try:
        reader = _Reader(directory)
    except (OSError, sqlite3.Error) as error:
        raise IndexUnusable(f"the index cannot be read: {error}") from None
    try:
        covered = reader.size()
        if covered < tree_size:
            raise IndexUnusable(
                f"the index covers {covered} records, fewer than the checkpoint's {tree_size}"
            )
        sequence = reader.first_sequence(decision_id)
        if sequence is None:
            found = reader.scan_after(covered, decision_id) if covered else None
            return None if found is None else (found, None)
        stored = reader.record(sequence, decision_id)
        if sequence >= tree_size:
            return stored, None
        path = inclusion_path(sequence, tree_size)
        proof = [reader.range_hash(start, end) for start, end in path]
        try:
            verify_inclusion(stored.envelope, sequence, tree_size, proof, root_hash)
        except ProofError as error:
            raise IndexUnusable(
                f"the proof of record {sequence} from the index does not verify: {error}"
            ) from None
        return stored, proof
    except (OSError, sqlite3.Error, FrameError, LogCorruptError, ValueError, LookupError) as error:
        raise IndexUnusable(f"the index cannot be read: {error}") from None
    finally:
        reader.close()
