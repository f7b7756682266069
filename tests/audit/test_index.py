"""The lookup index: answers as the one-pass scan does, checked, maintained, repaired at open.

Every lookup here is compared with `find_with_inclusion_proof`, the scan the index replaces:
the same record (sequence, fields and stored bytes) and the same proof, or the same reason why
there is none. An index that was deleted, cut short, left behind, edited or made for another
log never yields a wrong record or a proof that does not verify, and the next open makes it
the log's again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from service.audit import (
    AuditLog,
    Checkpoint,
    LogCorruptError,
    NotProvable,
    find_with_inclusion_proof,
    iter_records,
    prove_record,
    verify_inclusion,
    verify_log,
)
from service.audit import index as index_module
from service.audit.index import (
    CHUNKS_FILE,
    DECISIONS_DB,
    INDEX_DIR,
    POSITIONS_FILE,
    IndexUnusable,
    _Stream,
    decision_id_of,
    find_decision,
)
from service.audit.merkle import MerkleFrontier, ProofError
from service.audit.storage import (
    CHECKPOINT_FILE,
    GENESIS_CHAIN,
    canonical_json,
    encode_record,
    frame,
    list_segments,
    read_checkpoint_notes,
    read_latest_note,
    seal_envelope,
)

from .conftest import (
    MAC_KEY,
    ORIGIN,
    copy_log,
    index_contents,
    latest,
    make_record,
    signer,
    verifier,
)

Outcome = tuple[Any, ...] | str  # (sequence, record, envelope, proof, tree size) or the reason


def no_fsync(fd: int) -> None:
    """The index needs none; the tests do not need the log's either."""


def varied_record(n: int) -> dict[str, Any]:
    """Records that exercise the decision id's fast path and its fallback: most like the
    server's; some without a decision id; some with a nested decision_id or an escaped string
    before the real one; some decision ids used twice (the first record is the answer)."""
    if n % 7 == 3:
        return {"rpc": "privscore.audit/Note", "note": n}
    record = make_record(n)
    if n % 5 == 1:
        record["aaa"] = {"decision_id": f"nested-{n}"}
    if n % 13 == 2:
        record["caller"] = 'an "escaped" caller'
    if n % 11 == 4:
        record["decision_id"] = f"twice-{n % 3}"
    return record


def decision_ids(count: int) -> list[str]:
    wanted = {varied_record(n).get("decision_id") for n in range(count)}
    named = {str(value) for value in wanted if value is not None}
    absent = {"dec-absent", "dec-9999", "twice-9"}
    return sorted(named | {f"nested-{n}" for n in range(count)} | absent)


def open_writer(directory: Path, key: Any, **options: Any) -> AuditLog:
    settings_: dict[str, Any] = {
        "signer": signer(key),
        "mac_key": MAC_KEY,
        "origin": ORIGIN,
        "fsync": no_fsync,
    }
    return AuditLog(directory, **(settings_ | options))


def write(directory: Path, key: Any, count: int, start: int = 0, **options: Any) -> AuditLog:
    """Append records start..count-1 to the log in `directory` (opened for it); left open."""
    log = open_writer(directory, key, **options)
    for n in range(start, count):
        log.append_sync(varied_record(n))
    return log


def settled(directory: Path, key: Any, first: int, count: int, every: int) -> Checkpoint:
    """The latest checkpoint once the writer has signed the one its cadence calls for after
    records first..count-1 were appended one by one (it signs after acknowledging)."""
    expected = first  # closing signed one at `first`
    for size in range(first + 1, count + 1):
        if size - expected >= every:
            expected = size
    deadline = time.monotonic() + 10
    while (checkpoint := latest(directory, key)).size != expected:
        assert time.monotonic() < deadline, f"no checkpoint of size {expected}"
        time.sleep(0.001)
    return checkpoint


def index_size(directory: Path) -> int:
    """How many records the index says it covers."""
    with sqlite3.connect(directory / INDEX_DIR / DECISIONS_DB) as db:
        (size,) = db.execute("SELECT value FROM meta WHERE key = 'size'").fetchone()
    return int(size)


def no_fallback(reason: str) -> None:
    raise AssertionError(f"the index should have answered: {reason}")


def outcome(directory: Path, key: Any, decision_id: str, **options: Any) -> Outcome:
    """What `prove_record` answers: the record, its proof and the tree size, or why not."""
    try:
        checkpoint, stored, proof = prove_record(
            directory, verifier(key), ORIGIN, equals={"decision_id": decision_id}, **options
        )
    except NotProvable as error:
        return error.why
    verify_inclusion(stored.envelope, stored.sequence, checkpoint.size, proof, checkpoint.root_hash)
    return (stored.sequence, stored.record, stored.envelope, proof, checkpoint.size)


def scanned(directory: Path, checkpoint: Checkpoint, decision_id: str) -> Outcome:
    """The same answer from the scan alone (an empty checkpoint proves nothing: none yet)."""
    if checkpoint.size == 0:
        return "NO_CHECKPOINT"
    found = find_with_inclusion_proof(
        directory, checkpoint.size, equals={"decision_id": decision_id}
    )
    if found is None:
        return "NOT_FOUND"
    stored, proof = found
    if proof is None:
        return "NEWER_THAN_CHECKPOINT"
    return (stored.sequence, stored.record, stored.envelope, proof, checkpoint.size)


def expected_outcomes(directory: Path, key: Any, ids: list[str]) -> dict[str, Outcome]:
    checkpoint = latest(directory, key)
    return {decision_id: scanned(directory, checkpoint, decision_id) for decision_id in ids}


def roots(directory: Path) -> dict[int, bytes]:
    """The root of the tree at every size, from the records."""
    frontier = MerkleFrontier()
    found = {}
    for stored in iter_records(directory):
        frontier.append(stored.leaf_hash)
        found[frontier.size] = frontier.root()
    return found


def sql(directory: Path, statement: str, *parameters: object) -> None:
    with sqlite3.connect(directory / INDEX_DIR / DECISIONS_DB) as db:
        db.execute(statement, parameters)


CHUNK = 16


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 records instead of 8192, so that these small logs have several: the
    tagged fast path of the open check and its edges are exercised."""
    monkeypatch.setattr(index_module, "_CHUNK", CHUNK)


@pytest.fixture(scope="module")
def key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


# -- the index answers as the scan does -----------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    count=st.integers(1, 90),
    segment_bytes=st.sampled_from([300, 1500, 1 << 20]),
    checkpoint_every=st.integers(1, 30),
    reopen_at=st.integers(0, 90),
    data=st.data(),
)
def test_lookups_answer_as_the_scan_does(
    tmp_path_factory, key, count, segment_bytes, checkpoint_every, reopen_at, data
):
    """For logs of many sizes, segment sizes and checkpoint cadences (written in two runs of
    the writer, the second left open with records after its last checkpoint): every decision
    id, present, absent, nested or used twice, gets the scan's answer from the index, and at
    every tree size the proof is the scan's."""
    directory = tmp_path_factory.mktemp("log")
    options = {"segment_bytes": segment_bytes, "checkpoint_every": checkpoint_every}
    first = min(reopen_at, count)
    write(directory, key, first, **options).close_sync()
    log = write(directory, key, count, start=first, **options)
    try:
        checkpoint = settled(directory, key, first, count, checkpoint_every)
        covered = index_size(directory)
        assert checkpoint.size <= covered <= count
        ids = decision_ids(count)
        for decision_id in data.draw(st.lists(st.sampled_from(ids), max_size=25, unique=True)):
            assert outcome(directory, key, decision_id, on_fallback=no_fallback) == scanned(
                directory, checkpoint, decision_id
            )
        root_at = roots(directory)
        sizes = (
            st.lists(st.integers(1, covered), max_size=4, unique=True) if covered else st.just([])
        )
        for size in data.draw(sizes):
            for decision_id in data.draw(st.lists(st.sampled_from(ids), max_size=8)):
                found = find_with_inclusion_proof(
                    directory, size, equals={"decision_id": decision_id}
                )
                assert find_decision(directory, decision_id, size, root_at[size]) == found
    finally:
        log.close_sync()


def test_every_record_of_a_rotated_log_is_found_with_the_scans_proof(tmp_path, key):
    directory = tmp_path / "log"
    write(directory, key, 150, segment_bytes=2000, checkpoint_every=16).close_sync()
    assert len(list_segments(directory)) > 10
    ids = decision_ids(150)
    expected = expected_outcomes(directory, key, ids)
    assert sum(isinstance(answer, tuple) for answer in expected.values()) > 100
    for decision_id in ids:
        answer = outcome(directory, key, decision_id, on_fallback=no_fallback)
        assert answer == expected[decision_id]


@given(
    record=st.dictionaries(
        st.sampled_from(["aaa", "caller", "code", "decision_id", "outputs", "zz"])
        | st.text(max_size=12),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(10**20), 10**20)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.sampled_from(["decision_id", "a", "z"]), children, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=6,
    ),
    decision_id=st.none() | st.text(max_size=40),
    sequence=st.integers(0, 10**9),
    with_mac=st.booleans(),
)
def test_the_decision_id_fast_path_reads_what_json_reads(record, decision_id, sequence, with_mac):
    if decision_id is not None:
        record["decision_id"] = decision_id
    if with_mac:
        envelope, _ = seal_envelope(sequence, encode_record(record), GENESIS_CHAIN, MAC_KEY)
    else:  # a record from before MACs existed
        envelope = canonical_json({"chain": "AAAA", "record": record, "seq": sequence})
    value = json.loads(envelope)["record"].get("decision_id")
    assert decision_id_of(envelope) == (value if isinstance(value, str) else None)


# -- the writer keeps it, open repairs it ---------------------------------------------------


def test_the_writer_and_a_rebuild_make_the_same_index(tmp_path, key):
    """Across segment rotation, checkpoints and a reopen, what the writer appended batch by
    batch is byte for byte what open rebuilds from the records; a clean reopen repairs
    nothing."""
    directory = tmp_path / "log"
    write(directory, key, 70, segment_bytes=1500, checkpoint_every=9).close_sync()
    with capture_logs() as logs:
        log = write(directory, key, 130, start=70, segment_bytes=1500, checkpoint_every=9)
    assert [entry["event"] for entry in logs] == []

    async def burst() -> None:  # batches of many records, as under concurrent load
        await log.append_all([varied_record(n) for n in range(130, 200)])

    asyncio.run(burst())
    log.close_sync()
    kept = index_contents(directory)
    assert kept["meta"]["size"] == 200 and len(kept["files"]) == 2 + 8  # and levels 0-7
    assert len(kept["files"]["level-00"]) == 200 * 32 and len(kept["files"]["level-07"]) == 32
    assert len(kept["files"][CHUNKS_FILE]) == 200 // CHUNK * 32

    shutil.rmtree(directory / INDEX_DIR)
    with capture_logs() as logs:
        open_writer(directory, key).close_sync()
    assert [(entry["event"], entry["from_sequence"]) for entry in logs] == [
        ("audit.index_repaired", 0)
    ]
    assert index_contents(directory) == kept


def test_index_files_are_owner_only_whatever_the_umask(tmp_path, key):
    previous = os.umask(0o022)
    try:
        log = write(tmp_path / "log", key, 40, checkpoint_every=10)
        index = tmp_path / "log" / INDEX_DIR
        assert {path.name for path in index.iterdir()} >= {
            POSITIONS_FILE,
            "level-00",
            DECISIONS_DB,
            f"{DECISIONS_DB}-wal",
            f"{DECISIONS_DB}-shm",
        }
        log.close_sync()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(index.stat().st_mode) == 0o700
    for path in index.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_a_lookup_in_a_closed_log_leaves_nothing_behind(closed_log, key):
    """A reviewer's copy is read, not written: the closed index needs no SQLite -wal or -shm
    files, so a lookup creates none."""
    names = sorted(path.name for path in (closed_log / INDEX_DIR).iterdir())
    assert not any(name.endswith(("-wal", "-shm")) for name in names)
    assert isinstance(outcome(closed_log, key, "dec-0012", on_fallback=no_fallback), tuple)
    assert sorted(path.name for path in (closed_log / INDEX_DIR).iterdir()) == names


def test_a_record_newer_than_the_checkpoint_is_found_but_not_provable(tmp_path, key):
    directory = tmp_path / "log"
    write(directory, key, 20).close_sync()
    log = write(directory, key, 25, start=20, checkpoint_every=1000)
    try:
        checkpoint = latest(directory, key)
        assert checkpoint.size == 20
        for decision_id in ("dec-0022", "dec-0021", "dec-absent"):
            answer = outcome(directory, key, decision_id, on_fallback=no_fallback)
            assert answer == scanned(directory, checkpoint, decision_id)
        assert outcome(directory, key, "dec-0022") == "NEWER_THAN_CHECKPOINT"
        # Records the index does not cover yet (a batch being written): read from the log.
        sql(directory, "DELETE FROM decisions WHERE seq >= 20")
        sql(directory, "UPDATE meta SET value = 20 WHERE key = 'size'")
        for decision_id in ("dec-0022", "dec-0024", "dec-absent"):
            answer = outcome(directory, key, decision_id, on_fallback=no_fallback)
            assert answer == scanned(directory, checkpoint, decision_id)
    finally:
        log.close_sync()


def test_lookups_racing_the_writer_are_answered_from_the_index(tmp_path, key):
    """The writer raises the index's size before a checkpoint covers a batch, so a lookup
    always finds the index covering the checkpoint it reads: it never needs the scan."""
    directory = tmp_path / "log"
    log = write(directory, key, 1, checkpoint_every=7)
    acknowledged = 1
    done = threading.Event()

    def append() -> None:
        nonlocal acknowledged
        for n in range(1, 400):
            log.append_sync(varied_record(n))
            acknowledged = n + 1
        done.set()

    writer = threading.Thread(target=append)
    writer.start()
    rng = random.Random(3)
    answered = 0
    try:
        while not done.is_set() or answered < 50:
            n = rng.randrange(acknowledged)
            decision_id = varied_record(n).get("decision_id", "dec-absent")
            answer = outcome(directory, key, decision_id, on_fallback=no_fallback)
            if decision_id == "dec-absent":
                assert answer in ("NO_CHECKPOINT", "NOT_FOUND")
            else:  # acknowledged: indexed, and proven once a checkpoint covers it
                assert answer in ("NO_CHECKPOINT", "NEWER_THAN_CHECKPOINT") or (
                    isinstance(answer, tuple) and answer[1]["decision_id"] == decision_id
                )
            answered += 1
    finally:
        writer.join()
        log.close_sync()


# -- a damaged index never gives a wrong answer, and open repairs it ------------------------

COUNT = 60


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, length: int) -> None:
    with path.open("r+b") as file:
        file.truncate(length)


def overwrite(path: Path) -> None:
    path.write_bytes(b"not a database" * 100)


def swap_positions(directory: Path) -> None:
    path = directory / INDEX_DIR / POSITIONS_FILE
    data = bytearray(path.read_bytes())
    data[8 * 10 : 8 * 11], data[8 * 12 : 8 * 13] = data[8 * 12 : 8 * 13], data[8 * 10 : 8 * 11]
    path.write_bytes(bytes(data))


Tamper = Callable[[Path], None]
# Each damage, and the decision ids whose lookup may answer NOT_FOUND until the next open: an
# index cannot show absence, so a row removed from it hides its decision (never a wrong record).
DAMAGE: dict[str, tuple[Tamper, set[str]]] = {
    "index deleted": (lambda d: shutil.rmtree(d / INDEX_DIR), set()),
    "positions cut short": (lambda d: truncate(d / INDEX_DIR / POSITIONS_FILE, 8 * 20), set()),
    "positions swapped": (swap_positions, set()),
    "leaf hash flipped": (lambda d: flip(d / INDEX_DIR / "level-00", 32 * 10 + 5), set()),
    "node flipped": (lambda d: flip(d / INDEX_DIR / "level-03", 32 * 2), set()),
    "level cut short": (lambda d: truncate(d / INDEX_DIR / "level-01", 32 * 3), set()),
    "level deleted": (lambda d: (d / INDEX_DIR / "level-04").unlink(), set()),
    "row moved": (lambda d: sql(d, "UPDATE decisions SET seq = 1012 WHERE seq = 12"), set()),
    "row added": (lambda d: sql(d, "INSERT INTO decisions VALUES (3, 'dec-0030')"), set()),
    "row renamed": (
        lambda d: sql(d, "UPDATE decisions SET decision_id = 'dec-9999' WHERE seq = 16"),
        {"dec-0016"},
    ),
    "row deleted": (lambda d: sql(d, "DELETE FROM decisions WHERE seq = 18"), {"dec-0018"}),
    "size raised": (lambda d: sql(d, "UPDATE meta SET value = 10000 WHERE key = 'size'"), set()),
    "id index dropped": (lambda d: sql(d, "DROP INDEX decisions_by_id"), set()),
    "database garbage": (lambda d: overwrite(d / INDEX_DIR / DECISIONS_DB), set()),
}


@pytest.fixture
def closed_log(tmp_path, key) -> Iterator[Path]:
    directory = tmp_path / "log"
    write(directory, key, COUNT, segment_bytes=1500, checkpoint_every=8).close_sync()
    yield directory


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_index_never_gives_a_wrong_answer_and_open_repairs_it(closed_log, key, damage):
    directory = closed_log
    ids = decision_ids(COUNT)
    expected = expected_outcomes(directory, key, ids)
    before = index_contents(directory)
    tamper, hidden = DAMAGE[damage]
    tamper(directory)

    reasons: list[str] = []
    for decision_id in ids:
        answer = outcome(directory, key, decision_id, on_fallback=reasons.append)
        if decision_id in hidden:
            assert answer == "NOT_FOUND"
            answer = outcome(directory, key, decision_id, confirm_not_found=True)
        assert answer == expected[decision_id], decision_id
    if damage not in ("index deleted", "size raised", "id index dropped", "row deleted"):
        assert reasons, "the index disagreeing with the log is reported"

    with capture_logs() as logs:
        open_writer(directory, key).close_sync()
    assert [entry["event"] for entry in logs] == ["audit.index_repaired"]
    assert index_contents(directory) == before
    for decision_id in ids:
        answer = outcome(directory, key, decision_id, on_fallback=no_fallback)
        assert answer == expected[decision_id]


def test_open_reads_decision_ids_only_where_no_tag_vouches_for_the_rows(
    closed_log, key, monkeypatch
):
    """A chunk whose rows carry this server's tag over the chunk's leaf hashes is accepted
    without reading a decision id; a missing, moved or outdated tag sends open to the records,
    and a row edited without the key cannot carry a valid tag."""
    reads: list[bytes] = []
    real = index_module.decision_id_of

    def counted(envelope: bytes) -> str | None:
        reads.append(envelope)
        return real(envelope)

    monkeypatch.setattr(index_module, "decision_id_of", counted)
    before = index_contents(closed_log)
    chunks = closed_log / INDEX_DIR / CHUNKS_FILE

    def reopen() -> list[Any]:
        reads.clear()
        with capture_logs() as logs:
            open_writer(closed_log, key).close_sync()
        return [(entry["event"], entry.get("from_sequence")) for entry in logs]

    assert reopen() == [] and len(reads) == COUNT % CHUNK  # the last, partial chunk only
    tags = chunks.read_bytes()
    chunks.write_bytes(tags[32:64] + tags[:32] + tags[64:])  # tags 0 and 1 swapped
    assert reopen() == [] and len(reads) == 2 * CHUNK + COUNT % CHUNK
    assert index_contents(closed_log) == before  # the rows were right; the tags are again
    chunks.unlink()
    assert reopen() == [] and len(reads) == COUNT
    assert index_contents(closed_log) == before
    sql(closed_log, "UPDATE decisions SET decision_id = 'dec-9999' WHERE seq = 18")
    assert reopen() == [("audit.index_repaired", 18)]
    assert index_contents(closed_log) == before


def test_an_index_left_behind_the_log_is_not_used_and_is_caught_up(tmp_path, key):
    """A stale index (an older copy put back): it covers fewer records than the checkpoint,
    so lookups read the log; open brings it up to date from where it stopped."""
    directory = tmp_path / "log"
    write(directory, key, 30, checkpoint_every=8).close_sync()
    old_index = copy_log(directory / INDEX_DIR, tmp_path / "old-index")
    write(directory, key, 60, start=30, checkpoint_every=8).close_sync()
    ids = decision_ids(60)
    expected = expected_outcomes(directory, key, ids)
    current = index_contents(directory)
    shutil.rmtree(directory / INDEX_DIR)
    shutil.copytree(old_index, directory / INDEX_DIR)

    reasons: list[str] = []
    for decision_id in ids:
        assert (
            outcome(directory, key, decision_id, on_fallback=reasons.append)
            == expected[decision_id]
        )
    assert reasons and all("covers 30 records" in reason for reason in reasons)
    with capture_logs() as logs:
        open_writer(directory, key).close_sync()
    assert [entry.get("from_sequence") for entry in logs] == [30]
    assert index_contents(directory) == current


def test_an_index_of_a_longer_log_is_cut_back(tmp_path, key):
    """The log rolled back to an older copy of its files, the index kept from after: what
    the index says about records the log no longer holds is never believed, and open cuts
    it back to the log."""
    directory = tmp_path / "log"
    write(directory, key, 30, segment_bytes=1500, checkpoint_every=8).close_sync()
    older = copy_log(directory, tmp_path / "older")
    write(directory, key, 60, start=30, segment_bytes=1500, checkpoint_every=8).close_sync()
    shutil.rmtree(older / INDEX_DIR)
    shutil.copytree(directory / INDEX_DIR, older / INDEX_DIR)  # the newer index, 60 records
    ids = decision_ids(60)
    expected = expected_outcomes(older, key, ids)
    assert expected["dec-0040"] == "NOT_FOUND"

    for decision_id in ids:
        assert outcome(older, key, decision_id, on_fallback=lambda _: None) == expected[decision_id]
    with capture_logs() as logs:
        open_writer(older, key).close_sync()
    assert [entry.get("from_sequence") for entry in logs] == [30]
    assert index_contents(older)["meta"]["size"] == 30
    for decision_id in ids:
        assert outcome(older, key, decision_id, on_fallback=no_fallback) == expected[decision_id]


def test_a_rewritten_record_is_not_proven_from_the_index(closed_log, key):
    """The index points at the right place, but the record there was rewritten (a valid
    frame): its proof cannot verify against the signed root, so the lookup is handed to the
    scan, which answers as it always did (that record, with a proof that does not verify;
    `audit verify` names the record)."""
    directory = closed_log
    stored = next(s for s in iter_records(directory) if s.sequence == 20)
    _, segment = next(pair for pair in reversed(list_segments(directory)) if pair[0] <= 20)
    forged = stored.envelope.replace(b'"score":620', b'"score":999')
    assert forged != stored.envelope and len(forged) == len(stored.envelope)
    data = segment.read_bytes()
    segment.write_bytes(data.replace(frame(stored.envelope), frame(forged)))
    reasons: list[str] = []
    checkpoint, found, proof = prove_record(
        directory,
        verifier(key),
        ORIGIN,
        equals={"decision_id": "dec-0020"},
        on_fallback=reasons.append,
    )
    assert found.envelope == forged and reasons and "does not verify" in reasons[0]
    with pytest.raises(ProofError):
        verify_inclusion(found.envelope, 20, checkpoint.size, proof, checkpoint.root_hash)
    assert verify_log(directory, verifier(key), ORIGIN).first_bad_sequence == 20


def test_a_failing_index_never_fails_the_log(tmp_path, key, monkeypatch):
    directory = tmp_path / "log"
    directory.mkdir()
    (directory / INDEX_DIR).write_text("a file where the index directory would be")
    with capture_logs() as logs:
        log = write(directory, key, 10)
        log.close_sync()
    assert [entry["event"] for entry in logs] == ["audit.index_failed"]
    expected = expected_outcomes(directory, key, ["dec-0005"])
    assert outcome(directory, key, "dec-0005", on_fallback=no_fallback) == expected["dec-0005"]

    # Failing while the server runs: logged once, appends go on, lookups read the log.
    (directory / INDEX_DIR).unlink()
    log = write(directory, key, 20, start=10, checkpoint_every=5)
    settled(directory, key, 10, 20, 5)  # the index covers the checkpoint of 20 records

    def broken(self: _Stream) -> None:
        raise OSError(28, "No space left on device")

    with capture_logs() as logs:
        monkeypatch.setattr(_Stream, "write", broken)
        for n in range(20, 30):
            log.append_sync(varied_record(n))
        monkeypatch.undo()
    assert [entry["event"] for entry in logs] == ["audit.index_failed"]
    assert not log.failed
    log.close_sync()
    reasons: list[str] = []
    expected = expected_outcomes(directory, key, ["dec-0027"])
    assert outcome(directory, key, "dec-0027", on_fallback=reasons.append) == expected["dec-0027"]
    assert reasons and "fewer than the checkpoint's 30" in reasons[0]
    with capture_logs() as logs:
        open_writer(directory, key).close_sync()
    assert [entry.get("from_sequence") for entry in logs] == [20]
    report = verify_log(directory, verifier(key), ORIGIN, mac_key=MAC_KEY)
    assert report.ok and report.size == 30


def test_find_decision_refuses_what_it_cannot_answer(tmp_path, key):
    directory = tmp_path / "log"
    write(directory, key, 10).close_sync()
    checkpoint = latest(directory, key)
    with pytest.raises(IndexUnusable) as raised:
        find_decision(directory, "dec-0001", checkpoint.size + 1, checkpoint.root_hash)
    assert "fewer than the checkpoint's 11" in raised.value.reason
    with pytest.raises(IndexUnusable) as raised:
        find_decision(directory, "dec-0001", checkpoint.size, bytes(32))  # not the signed root
    assert "does not verify" in raised.value.reason
    shutil.rmtree(directory / INDEX_DIR)
    with pytest.raises(IndexUnusable) as raised:
        find_decision(directory, "dec-0001", checkpoint.size, checkpoint.root_hash)
    assert raised.value.quiet


def test_the_latest_note_is_read_from_the_end_of_the_file(tmp_path, key):
    """A lookup reads the latest checkpoint without reading every checkpoint before it, and
    finds the note the full read finds: after a torn final note, or a note longer than the
    end it reads, it reads the file whole."""
    directory = tmp_path / "log"
    write(directory, key, 40, checkpoint_every=1).close_sync()
    notes, _ = read_checkpoint_notes(directory)
    assert len(notes) == 40 and read_latest_note(directory) == notes[-1]
    path = directory / CHECKPOINT_FILE
    with path.open("ab") as file:
        file.write(frame(b"torn")[:-3])
    assert read_latest_note(directory) == read_checkpoint_notes(directory)[0][-1] == notes[-1]
    path.write_bytes(frame(b"a" * 10) + frame(b"b\x00" * 40_000) + frame(b"c" * 300))
    assert read_latest_note(directory) == b"c" * 300
    path.write_bytes(frame(b"a" * 10) + frame(b"b" * 70_000))
    assert read_latest_note(directory) == b"b" * 70_000
    # Damage to an earlier note is verify's to find; the latest is still read.
    damaged = bytearray(frame(b"a" * 10) + frame(b"z" * 300))
    damaged[6] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(LogCorruptError):
        read_checkpoint_notes(directory)
    assert read_latest_note(directory) == b"z" * 300
    path.unlink()
    assert read_latest_note(directory) is None
