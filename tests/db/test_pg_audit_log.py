"""The audit log in PostgreSQL (service/audit/pg/) on a real server: the file log's records,
tree and checkpoints byte for byte; group commit; a caller's statements in the batch's
transaction; several replicas (pools and processes) making one dense log; checkpoints one
replica at a time; the start checks; lookups from the index and tiles; the export a reviewer
verifies offline; and every tampering of the tables caught at open, by the export's
verification, or both."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from service.audit import (
    AuditError,
    AuditLog,
    AuditRecordError,
    AuditWriteError,
    LogCorruptError,
    NotProvable,
    Signer,
    VerifierKey,
    inclusion_proof,
    parse_checkpoint,
    verify_inclusion,
    verify_log,
)
from service.audit import consistency_proof as file_consistency_proof
from service.audit.checkpoint import rotation_record
from service.audit.merkle import perfect_subtrees
from service.audit.pg import (
    PgAuditLog,
    consistency_proof,
    establish_identity,
    export_log,
    latest_checkpoint,
    prove_decision,
)
from service.audit.pg.tiles import TileFrontier, range_hash
from service.audit.storage import list_segments
from service.db import SchemaError, migrate, open_async_pool
from service.db.schema import CHECKPOINT_LOCK, LOCK_SPACE
from tests.conftest import REPO_ROOT

ORIGIN = "privscore.audit/pg-test"
MAC_KEY = bytes(range(32))
CANARY = "CANARY-7f3a"  # record content that must never reach a log line or an error


@pytest.fixture
def db(postgres_database: Any) -> Any:
    """A fresh database, migrated."""
    with postgres_database.connect() as conn:
        migrate(conn)
    return postgres_database


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signer_of(key: Ed25519PrivateKey, name: str = ORIGIN) -> Signer:
    return Signer(name, key)


def record(n: int, decision_id: str | None = None) -> dict[str, Any]:
    return {
        "decision_id": decision_id or str(uuid.uuid4()),
        "rpc": "privscore.v1.ScoringService/Score",
        "time": f"2026-12-01T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "outputs": {"score": 600 + n, "reasons": ["R1", "R7"]},
        "note": CANARY,
        "n": n,
    }


@asynccontextmanager
async def opened(
    db: Any, key: Ed25519PrivateKey, *, close: bool = True, **options: Any
) -> AsyncIterator[PgAuditLog]:
    """A log on its own pool; closed (final checkpoint) after, or left as a crash leaves it."""
    pool = await open_async_pool(db.kwargs, min_size=1, max_size=4)
    try:
        options.setdefault("origin", ORIGIN)
        options.setdefault("mac_key", MAC_KEY)
        log = await PgAuditLog.open(pool, signer=options.pop("signer", signer_of(key)), **options)
        try:
            yield log
        finally:
            if close:
                await log.close()
    finally:
        await pool.close()


def build(db: Any, key: Ed25519PrivateKey, signed: int, unsigned: int = 0) -> list[dict[str, Any]]:
    """A log of `signed` records under a checkpoint, then `unsigned` more no checkpoint covers
    (the writer stops as a crash stops it); the records, in order."""
    records = [record(n) for n in range(signed + unsigned)]

    async def main() -> None:
        async with opened(db, key) as log:
            await log.append_all(records[:signed])
        if unsigned:
            async with opened(db, key, close=False, checkpoint_seconds=3600) as log:
                await log.append_all(records[signed:])

    asyncio.run(main())
    return records


def open_log(db: Any, key: Ed25519PrivateKey, **options: Any) -> Any:
    """Open and close the log; what open found."""

    async def main() -> Any:
        async with opened(db, key, **options) as log:
            return log.recovery

    return asyncio.run(main())


def export(db: Any, tmp_path: Path, name: str = "export") -> Path:
    with db.connect() as conn:
        report = export_log(conn, tmp_path / name)
    return report.directory


def sql(db: Any, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def envelope_at(db: Any, sequence: int) -> bytes:
    (row,) = sql(db, "SELECT envelope FROM audit_entries WHERE sequence = %s", (sequence,))
    return bytes(row[0])


def set_envelope(db: Any, sequence: int, envelope: bytes) -> None:
    sql(db, "UPDATE audit_entries SET envelope = %s WHERE sequence = %s", (envelope, sequence))


def refused_at_open(db: Any, key: Ed25519PrivateKey) -> str:
    with pytest.raises(AuditError) as caught:
        open_log(db, key)
    message = str(caught.value)
    assert CANARY not in message
    return message


# -- the same log as the file log ------------------------------------------------------------


def test_the_database_log_is_the_file_log_byte_for_byte(db, key, tmp_path) -> None:
    records = [record(n) for n in range(300)]

    async def main() -> None:
        async with opened(db, key) as log:
            for chunk in range(0, 300, 100):
                await log.append_all(records[chunk : chunk + 100])
        file_log = AuditLog(
            tmp_path / "file", signer=signer_of(key), mac_key=MAC_KEY, origin=ORIGIN
        )
        await file_log.append_all(records)
        await file_log.close()

    asyncio.run(main())
    directory = export(db, tmp_path)
    exported = b"".join(path.read_bytes() for _, path in list_segments(directory))
    written = b"".join(path.read_bytes() for _, path in list_segments(tmp_path / "file"))
    assert exported == written  # same envelopes (chain, MAC), same framing
    report = verify_log(directory, signer_of(key).verifier, ORIGIN, mac_key=MAC_KEY)
    assert report.ok and report.size == 300 and report.proven_size == 300
    assert (
        report.root_hash == verify_log(tmp_path / "file", signer_of(key).verifier, ORIGIN).root_hash
    )
    identity = json.loads((directory / "identity.json").read_text())
    assert identity == {"origin": ORIGIN, "key_name": ORIGIN}
    # Owner-only, as the file log's own files are.
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()} == {0o600}


def test_tiles_hold_every_node_of_the_tree(db, key) -> None:
    build(db, key, 1000)
    tiles = {
        (int(level), int(index)): bytes(nodes)
        for level, index, nodes in sql(db, "SELECT level, tile_index, nodes FROM audit_tiles")
    }
    leaves = [bytes(tiles[(0, n // 256)][(n % 256) * 32 : (n % 256 + 1) * 32]) for n in range(1000)]
    frontier = TileFrontier()
    for leaf in leaves:
        frontier.append(leaf)
    assert range_hash(tiles, 0, 1000) == frontier.root()
    assert sorted(tiles) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert len(tiles[(0, 3)]) == 32 * (1000 - 768) and len(tiles[(1, 0)]) == 32 * 3
    assert perfect_subtrees(0, 1000) == [(9, 0), (8, 2), (7, 6), (6, 14), (5, 30), (3, 124)]
    (state,) = sql(db, "SELECT size, root FROM audit_log_state")
    assert state == (1000, frontier.root())


# -- group commit and the caller's statements ------------------------------------------------


def test_group_commit_numbers_concurrent_appends_densely_in_few_transactions(db, key) -> None:
    async def main() -> tuple[list[int], Any]:
        async with opened(db, key) as log:
            results = await asyncio.gather(*(log.append(record(n)) for n in range(500)))
            return [appended.sequence for appended in results], log.stats

    sequences, stats = asyncio.run(main())
    assert sorted(sequences) == list(range(500))
    assert stats.records == 500 and stats.batches == stats.fsyncs and stats.batches <= 5
    (row,) = sql(db, "SELECT count(*), min(sequence), max(sequence) FROM audit_entries")
    assert row == (500, 0, 499)
    assert sql(db, "SELECT count(*) FROM audit_decisions") == [(500,)]


def test_a_record_that_cannot_be_logged_is_refused_before_anything_is_used(db, key) -> None:
    async def main() -> int:
        async with opened(db, key) as log:
            with pytest.raises(AuditRecordError):
                await log.append({"value": object()})
            return (await log.append(record(0))).sequence

    assert asyncio.run(main()) == 0


def test_a_callers_statements_commit_with_its_record_and_a_failing_one_withdraws_it(
    db, key
) -> None:
    """The hook a decision store will use: its rows and the record commit together, or
    neither. A hook that fails (in Python or in SQL) leaves no row and no record, and takes
    no sequence number; the rest of the batch commits."""
    sql(db, "CREATE TABLE decision_rows (sequence bigint PRIMARY KEY, request text UNIQUE)")

    def store(request: str, *, fail: bool = False) -> Callable[..., Any]:
        async def within(conn: Any, sequence: int) -> None:
            await conn.execute(
                "INSERT INTO decision_rows (sequence, request) VALUES (%s, %s)", (sequence, request)
            )
            if fail:
                raise LookupError("the caller's own refusal")

        return within

    async def main() -> list[Any]:
        async with opened(db, key) as log:
            await log.append(record(0), within=store("first"))
            calls = [
                log.append(record(1), within=store("a")),
                log.append(record(2), within=store("b", fail=True)),  # Python failure
                log.append(record(3), within=store("first")),  # SQL failure: a duplicate request
                log.append(record(4)),  # no hook
                log.append(record(5), within=store("c")),
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], LookupError)
    assert type(results[2]).__name__ == "UniqueViolation"
    assert [result.sequence for result in results if not isinstance(result, BaseException)] == [
        1,
        2,
        3,
    ]
    rows = sql(db, "SELECT sequence, request FROM decision_rows ORDER BY sequence")
    assert rows == [(0, "first"), (1, "a"), (3, "c")]
    entries = [json.loads(envelope_at(db, s))["record"]["n"] for s in range(4)]
    assert entries == [0, 1, 4, 5]
    assert sql(db, "SELECT size FROM audit_log_state") == [(4,)]


def test_a_failed_transaction_fails_its_callers_stores_nothing_and_the_log_recovers(
    db, key
) -> None:
    """A batch whose connection dies is rolled back whole: every caller of it gets
    AuditWriteError saying nothing was stored, `failed` turns True, appends meanwhile are
    refused at once (no caller waits on a database that just failed), and once the probe finds
    the database answering, the next transaction (on a new connection) succeeds."""

    async def kill_connection(conn: Any, sequence: int) -> None:
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    async def main() -> tuple[list[Any], bool, int, bool]:
        async with opened(db, key) as log:
            await log.append(record(0))
            results = await asyncio.gather(
                log.append(record(1)),
                log.append(record(2), within=kill_connection),
                log.append(record(3)),
                return_exceptions=True,
            )
            failed = log.failed
            started = time.monotonic()
            with pytest.raises(AuditWriteError, match="has not answered since"):
                await log.append(record(9))
            assert time.monotonic() - started < 0.5
            while log.failed and time.monotonic() - started < 10:
                await asyncio.sleep(0.05)
            after = (await log.append(record(4))).sequence
            return list(results), failed, after, log.failed

    with structlog.testing.capture_logs() as logs:
        results, failed_then, after, failed_now = asyncio.run(main())
    assert all(isinstance(result, AuditWriteError) for result in results)
    assert "rolled back; none of its records was stored" in str(results[0])
    assert failed_then and not failed_now
    assert after == 1  # nothing of the failed batch took a number
    assert sql(db, "SELECT count(*) FROM audit_entries") == [(2,)]
    assert any(entry["event"] == "audit.pg_write_failed" for entry in logs)
    assert CANARY not in repr(logs) + "".join(map(str, results))


def test_appends_arriving_while_a_transaction_runs_go_in_the_next_one(db, key) -> None:
    """One transaction at a time per process: while the first batch's transaction is held open
    (its hook waits), fifty more appends queue, and all of them commit in one more."""

    async def main() -> tuple[list[int], int]:
        async with opened(db, key) as log:
            gate = asyncio.Event()
            entered = asyncio.Event()

            async def hold(conn: Any, sequence: int) -> None:
                entered.set()
                await gate.wait()

            first = asyncio.create_task(log.append(record(0), within=hold))
            await entered.wait()  # the writer is inside the first transaction
            rest = [asyncio.create_task(log.append(record(n))) for n in range(1, 51)]
            await asyncio.sleep(0.05)
            assert not any(task.done() for task in rest)
            gate.set()
            results = await asyncio.gather(first, *rest)
            return [appended.sequence for appended in results], log.stats.batches

    sequences, batches = asyncio.run(main())
    assert sequences == list(range(51)) and batches == 2


def test_failed_clears_once_the_database_answers_again(db, key) -> None:
    async def kill_connection(conn: Any, sequence: int) -> None:
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    async def main() -> tuple[bool, float]:
        async with opened(db, key, retry_seconds=0.05) as log:
            with pytest.raises(AuditWriteError):
                await log.append(record(0), within=kill_connection)
            failed = log.failed
            started = time.monotonic()
            while log.failed and time.monotonic() - started < 5:
                await asyncio.sleep(0.02)
            return failed, time.monotonic() - started

    failed, waited = asyncio.run(main())
    assert failed and waited < 5  # the probe found the database answering, with no append


def test_appends_after_close_are_refused(db, key) -> None:
    async def main() -> None:
        async with opened(db, key) as log:
            await log.append(record(0))
        with pytest.raises(AuditWriteError, match="closed"):
            await log.append(record(1))

    asyncio.run(main())


# -- several replicas ------------------------------------------------------------------------


def test_three_replicas_on_their_own_pools_make_one_dense_log(db, key, tmp_path) -> None:
    async def replica(number: int) -> list[int]:
        async with opened(db, key, checkpoint_every=40) as log:
            results = await asyncio.gather(
                *(log.append(record(1000 * number + n)) for n in range(150))
            )
            more = [await log.append(record(1000 * number + 500 + n)) for n in range(20)]
            return [appended.sequence for appended in [*results, *more]]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(replica(number) for number in range(3)))

    per_replica = asyncio.wait_for(main(), 60)
    sequences = [s for replica_sequences in asyncio.run(per_replica) for s in replica_sequences]
    assert sorted(sequences) == list(range(510))  # dense, none reused
    checkpoints = sql(db, "SELECT id, tree_size FROM audit_checkpoints ORDER BY id")
    assert [row[0] for row in checkpoints] == list(range(len(checkpoints)))
    sizes = [row[1] for row in checkpoints]
    assert sizes == sorted(sizes) and sizes[-1] == 510 and len(checkpoints) >= 3
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN, mac_key=MAC_KEY)
    assert report.ok and report.checkpoints == len(checkpoints) and report.proven_size == 510


def test_replica_processes_append_concurrently_into_one_dense_log(db, key, tmp_path) -> None:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.db.pg_audit_child", db.url, raw, ORIGIN, str(n), "300"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    sequences = [s for output in outputs for s in output["sequences"]]
    assert sorted(sequences) == list(range(900))
    # Each caller got the sequence its record holds.
    for output in outputs:
        pairs = list(zip(output["decision_ids"], output["sequences"], strict=True))
        for decision_id, sequence in pairs[::37]:
            assert json.loads(envelope_at(db, sequence))["record"]["decision_id"] == decision_id
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN, mac_key=MAC_KEY)
    assert report.ok and report.size == 900 and report.proven_size == 900
    assert open_log(db, key).checkpointed == 900


def test_one_replica_signs_at_a_time_under_the_checkpoint_lock(db, key) -> None:
    """While another session holds CHECKPOINT_LOCK nothing is signed; once it is released the
    next attempt signs the whole log."""

    async def main() -> tuple[int, int]:
        async with opened(db, key, checkpoint_seconds=3600, lock_timeout_s=0.2) as log:
            await log.append_all([record(n) for n in range(10)])
            with db.connect() as holder, holder.transaction():
                holder.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, CHECKPOINT_LOCK)
                )
                while_held = await log.checkpoint()
            return while_held, await log.checkpoint()

    assert asyncio.run(main()) == (0, 10)
    assert sql(db, "SELECT id, tree_size FROM audit_checkpoints") == [(0, 10)]


def test_a_checkpoint_is_signed_every_n_records_and_after_t_seconds(db, key) -> None:
    async def main() -> tuple[list[int], list[int]]:
        async with opened(db, key, checkpoint_every=100, checkpoint_seconds=0.3) as log:
            for chunk in range(3):
                await log.append_all([record(100 * chunk + n) for n in range(100)])
                await asyncio.sleep(0.1)
            by_count = [row[0] for row in sql(db, "SELECT tree_size FROM audit_checkpoints")]
            await log.append(record(300))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                sizes = [row[0] for row in sql(db, "SELECT tree_size FROM audit_checkpoints")]
                if sizes[-1:] == [301]:
                    break
                await asyncio.sleep(0.05)
            return by_count, sizes

    by_count, by_time = asyncio.run(main())
    assert by_count[-1] >= 200 and all(size % 100 == 0 for size in by_count)
    assert by_time[-1] == 301  # the last record, signed by the timer, not by close


# -- the start checks (issue 12) -------------------------------------------------------------


def test_open_refuses_another_origin_or_key_name_naming_the_table(db, key) -> None:
    build(db, key, 3)
    with pytest.raises(AuditError, match="audit_log_identity: the database holds the log of"):
        open_log(db, key, origin="privscore.audit/other")
    with pytest.raises(AuditError, match="audit_log_identity"):
        open_log(db, key, signer=signer_of(key, "other-name"))


def test_establish_identity_creates_one_origin_and_keeps_it(db) -> None:
    async def main() -> tuple[Any, Any]:
        pool = await open_async_pool(db.kwargs)
        try:
            async with pool.connection() as conn:
                first = await establish_identity(conn, None)
                again = await establish_identity(conn, None)
                with pytest.raises(AuditError, match="audit_log_identity"):
                    await establish_identity(conn, "privscore.audit/not-this")
                return first, again
        finally:
            await pool.close()

    first, again = asyncio.run(main())
    assert first == again and first.origin.startswith("privscore.audit/")
    assert first.key_name == first.origin


def test_open_refuses_a_database_that_is_not_migrated(postgres_database, key) -> None:
    with pytest.raises(SchemaError, match="not migrated"):
        open_log(postgres_database, key)


def test_open_refuses_a_checkpoint_signed_by_a_foreign_key(db, key) -> None:
    build(db, key, 5)
    message = refused_at_open(db, Ed25519PrivateKey.generate())
    assert "audit_checkpoints row 0: the latest checkpoint is refused" in message


def test_open_refuses_a_broken_checkpoint_signature(db, key, tmp_path) -> None:
    build(db, key, 5)
    (note,) = sql(db, "SELECT note FROM audit_checkpoints WHERE id = 0")[0]
    text = bytes(note).decode()
    body, signature = text.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(signature))
    raw[-1] ^= 1
    forged = f"{body} {base64.b64encode(bytes(raw)).decode()}\n"
    sql(db, "UPDATE audit_checkpoints SET note = %s WHERE id = 0", (forged.encode(),))
    assert "does not verify" in refused_at_open(db, key)
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN)
    assert not report.ok and "does not verify" in report.problems[0]


def test_open_refuses_a_log_handed_to_another_key(db, key) -> None:
    new = signer_of(Ed25519PrivateKey.generate())

    async def main() -> None:
        async with opened(db, key) as log:
            await log.append(record(0))
            await log.append(
                rotation_record(ORIGIN, 1, signer_of(key), new, "2026-12-01T00:00:00Z")
            )

    # The replica itself will not sign past it (close fails: no final checkpoint) ...
    with pytest.raises(AuditWriteError, match="final checkpoint"):
        asyncio.run(main())
    # ... and a start with the old key is refused.
    assert "was handed to audit key" in refused_at_open(db, key)


def test_a_quick_open_checks_the_rest_in_the_background(db, key) -> None:
    build(db, key, 300, unsigned=20)

    async def main() -> tuple[Any, bool, bool, int]:
        async with opened(db, key, full_check=False) as log:
            quick = log.verified
            deadline = time.monotonic() + 10
            while not log.verified and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return log.recovery, quick, log.verified, (await log.append(record(320))).sequence

    recovery, verified_at_open, verified_after, sequence = asyncio.run(main())
    assert (recovery.size, recovery.checkpointed) == (320, 300)
    assert not verified_at_open and verified_after and sequence == 320


def test_a_quick_open_still_refuses_what_it_reads(db, key) -> None:
    """What a quick open reads (the checkpoint, the right-edge tiles, the record before the
    unsigned ones, those records, the state row) it checks as a full open does."""
    build(db, key, 300, unsigned=20)
    set_envelope(db, 310, envelope_at(db, 310).replace(b'"score":910', b'"score":911'))
    with pytest.raises(LogCorruptError, match="audit_entries: record 310: chain does not"):
        open_log(db, key, full_check=False)
    set_envelope(db, 310, envelope_at(db, 310).replace(b'"score":911', b'"score":910'))
    set_envelope(db, 299, envelope_at(db, 299).replace(b'"score":899', b'"score":898'))
    with pytest.raises(LogCorruptError, match="record 299: audit_entries: it is not the record"):
        open_log(db, key, full_check=False)


def test_damage_a_quick_open_skips_fails_the_log_once_the_background_check_finds_it(
    db, key
) -> None:
    build(db, key, 300, unsigned=20)
    set_envelope(db, 7, envelope_at(db, 7).replace(b'"score":607', b'"score":608'))

    async def main() -> str:
        async with opened(db, key, full_check=False) as log:
            deadline = time.monotonic() + 10
            while not log.failed and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            with pytest.raises(AuditWriteError) as caught:
                await log.append(record(320))
            assert not log.verified
            return str(caught.value)

    message = asyncio.run(main())
    assert "no longer give the latest signed checkpoint's root" in message
    assert CANARY not in message


# -- tampering: caught at open, by the export's verification, or both ------------------------


def test_an_edited_record_under_the_checkpoint_is_caught(db, key, tmp_path) -> None:
    build(db, key, 20)
    original = envelope_at(db, 7)
    set_envelope(db, 7, original.replace(b'"score":607', b'"score":999'))
    assert "no longer give the latest signed checkpoint's root" in refused_at_open(db, key)
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN)
    assert not report.ok and report.first_bad_sequence == 7
    assert CANARY not in " ".join(report.problems)


def test_an_edited_record_after_the_checkpoint_is_caught(db, key, tmp_path) -> None:
    build(db, key, 10, unsigned=5)
    set_envelope(db, 12, envelope_at(db, 12).replace(b'"score":612', b'"score":613'))
    assert "audit_entries: record 12: chain does not follow" in refused_at_open(db, key)
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN, mac_key=MAC_KEY)
    assert not report.ok and report.first_bad_sequence == 12


def forge(db: Any, sequence: int, chain_of_previous: bytes, mac_key: bytes) -> bytes:
    """An envelope for `sequence` that follows the chain, MACed under `mac_key`."""
    from service.audit.storage import encode_record, seal_envelope

    envelope, _ = seal_envelope(
        sequence, encode_record(record(sequence)), chain_of_previous, mac_key
    )
    return envelope


def chain_of(db: Any, sequence: int) -> bytes:
    return base64.b64decode(json.loads(envelope_at(db, sequence))["chain"])


def test_a_forged_record_without_the_servers_mac_is_caught(db, key, tmp_path) -> None:
    """Someone with write access appends a well-formed, chained record with a MAC under a key
    that is not the server's, and brings the state row along."""
    build(db, key, 10, unsigned=2)
    forged = forge(db, 12, chain_of(db, 11), bytes(32))
    sql(db, "INSERT INTO audit_entries VALUES (12, %s)", (forged,))
    sql(db, "UPDATE audit_log_state SET size = 13")
    assert "record 12: does not carry this server's MAC" in refused_at_open(db, key)
    directory = export(db, tmp_path)
    report = verify_log(directory, signer_of(key).verifier, ORIGIN, mac_key=MAC_KEY)
    assert not report.ok and report.first_bad_sequence == 12
    # A reviewer without the MAC key is told nothing vouches for the records after the
    # checkpoint.
    blind = verify_log(directory, signer_of(key).verifier, ORIGIN)
    assert blind.ok and blind.unauthenticated_records == 3


def test_a_deleted_record_is_caught(db, key, tmp_path) -> None:
    build(db, key, 20)
    sql(db, "DELETE FROM audit_decisions WHERE sequence = 9")
    sql(db, "DELETE FROM audit_entries WHERE sequence = 9")
    assert "record 9: audit_entries does not hold it" in refused_at_open(db, key)
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN)
    assert not report.ok and report.first_bad_sequence == 9


def test_a_state_row_rolled_back_is_caught(db, key, tmp_path) -> None:
    build(db, key, 10, unsigned=5)
    (root,) = sql(db, "SELECT root FROM audit_log_state")[0]
    sql(db, "UPDATE audit_log_state SET size = 12")
    assert "audit_log_state says the log holds 12 records but audit_entries holds 15" in (
        refused_at_open(db, key)
    )
    # Rolled back with its entries, below the signed checkpoint: the checkpoint gives it away.
    sql(db, "DELETE FROM audit_decisions WHERE sequence >= 8")
    sql(db, "DELETE FROM audit_entries WHERE sequence >= 8")
    sql(db, "UPDATE audit_log_state SET size = 8, root = %s", (root,))
    assert "covers 10 records but audit_entries holds only 8" in refused_at_open(db, key)
    report = verify_log(export(db, tmp_path), signer_of(key).verifier, ORIGIN)
    assert not report.ok and report.first_bad_sequence == 8


def test_a_running_replica_refuses_to_number_again_after_the_state_is_rolled_back(db, key) -> None:
    """The state row rolled back under a running replica: the next batch sees a size below
    what this process saw, refuses, and the log stays failed (no later append, no checkpoint
    over it), as the file log does after a failed write."""

    async def main() -> tuple[str, str, bool]:
        async with opened(db, key, checkpoint_seconds=3600) as log:
            await log.append_all([record(n) for n in range(6)])
            sql(db, "UPDATE audit_log_state SET size = 4")
            with pytest.raises(AuditWriteError) as first:
                await log.append(record(6))
            with pytest.raises(AuditWriteError) as later:
                await log.append(record(7))
            return str(first.value), str(later.value), log.failed

    first, later, failed = asyncio.run(main())
    assert "audit_log_state says the log holds 4 records, but this server saw it hold 6" in first
    assert failed and "has failed" in later
    assert sql(db, "SELECT max(sequence) FROM audit_entries") == [(5,)]
    assert sql(db, "SELECT count(*) FROM audit_checkpoints") == [(0,)]


def test_a_tile_filled_under_a_running_replica_fails_the_log_for_good(db, key) -> None:
    async def main() -> tuple[str, str, bool]:
        async with opened(db, key, checkpoint_seconds=3600) as log:
            await log.append_all([record(n) for n in range(10)])
            sql(db, "UPDATE audit_tiles SET nodes = %s WHERE level = 0", (bytes(8192),))
            with pytest.raises(AuditWriteError) as first:
                await log.append(record(10))
            await asyncio.sleep(0.1)  # no probe clears it: it is not the database failing
            with pytest.raises(AuditWriteError) as later:
                await log.append(record(11))
            return str(first.value), str(later.value), log.failed

    first, later, failed = asyncio.run(main())
    assert "audit_tiles" in first and "has failed" in later and failed
    assert sql(db, "SELECT size FROM audit_log_state") == [(10,)]


def test_the_signer_refuses_a_record_the_server_did_not_write(db, key) -> None:
    """A forged record put in the table under a running server is never signed: the replica
    that would sign reads it back, finds no MAC of the server's, and the log fails closed."""

    async def main() -> tuple[str, bool]:
        async with opened(db, key, checkpoint_seconds=3600) as log:
            await log.append_all([record(n) for n in range(4)])
            forged = forge(db, 4, chain_of(db, 3), bytes(32))
            sql(db, "INSERT INTO audit_entries VALUES (4, %s)", (forged,))
            sql(db, "UPDATE audit_log_state SET size = 5")
            with pytest.raises(AuditWriteError) as caught:
                await log.checkpoint()
            return str(caught.value), log.failed

    message, failed = asyncio.run(main())
    assert "record 4: does not carry this server's MAC" in message and failed
    assert sql(db, "SELECT count(*) FROM audit_checkpoints") == [(0,)]


def test_an_edited_tile_is_caught_at_open_and_by_a_lookup(db, key) -> None:
    records = build(db, key, 600)
    sql(
        db,
        "UPDATE audit_tiles SET nodes = overlay(nodes placing '\\x00'::bytea from 1 for 1) "
        "WHERE level = 0 AND tile_index = 1",
    )

    async def lookup() -> None:
        pool = await open_async_pool(db.kwargs)
        try:
            async with pool.connection() as conn:
                await prove_decision(
                    conn, records[300]["decision_id"], signer_of(key).verifier, ORIGIN
                )
        finally:
            await pool.close()

    # Leaf 256's hash: a node of record 300's proof, hashed from that tile.
    assert "audit_tiles: tile (level 0, index 1) differs from the records" in refused_at_open(
        db, key
    )
    with pytest.raises(LogCorruptError, match="record 300: its inclusion proof from audit_tiles"):
        asyncio.run(lookup())


# -- lookups ---------------------------------------------------------------------------------


def test_prove_gives_the_record_and_a_proof_against_the_signed_checkpoint(
    db, key, tmp_path
) -> None:
    records = build(db, key, 700)

    async def main() -> list[Any]:
        async with opened(db, key, checkpoint_seconds=3600) as log:
            found = [await log.prove(records[n]["decision_id"]) for n in (0, 255, 256, 699)]
            newer = await log.append(record(700))
            with pytest.raises(NotProvable) as too_new:
                await log.prove(
                    json.loads(envelope_at(db, newer.sequence))["record"]["decision_id"]
                )
            with pytest.raises(NotProvable) as unknown:
                await log.prove(str(uuid.uuid4()))
            with pytest.raises(NotProvable) as not_uuid:
                await log.prove("dec-0001")
            return [found, too_new.value.why, unknown.value.why, not_uuid.value.why]

    found, too_new, unknown, not_uuid = asyncio.run(main())
    assert (too_new, unknown, not_uuid) == ("NEWER_THAN_CHECKPOINT", "NOT_FOUND", "NOT_FOUND")
    directory = export(db, tmp_path)
    for (checkpoint, stored, proof), n in zip(found, (0, 255, 256, 699), strict=True):
        assert stored.sequence == n and stored.record == records[n]
        assert checkpoint.size == 700
        verify_inclusion(stored.envelope, n, 700, proof, checkpoint.root_hash)
        assert proof == inclusion_proof(directory, n, 700)  # as the file log's tools give it


def test_prove_checks_the_record_the_index_points_at(db, key) -> None:
    records = build(db, key, 10)
    sql(db, "DELETE FROM audit_decisions WHERE sequence = 4")
    sql(
        db,
        "UPDATE audit_decisions SET decision_id = %s WHERE sequence = 5",
        (records[4]["decision_id"],),
    )

    async def main() -> None:
        async with opened(db, key) as log:
            await log.prove(records[4]["decision_id"])

    with pytest.raises(LogCorruptError, match="record 5: audit_decisions points the decision at"):
        asyncio.run(main())


def test_no_checkpoint_no_proof(db, key) -> None:
    async def main() -> str:
        pool = await open_async_pool(db.kwargs)
        try:
            async with pool.connection() as conn:
                assert await latest_checkpoint(conn, signer_of(key).verifier, ORIGIN) is None
                with pytest.raises(NotProvable) as caught:
                    await prove_decision(conn, str(uuid.uuid4()), signer_of(key).verifier, ORIGIN)
                return caught.value.why
        finally:
            await pool.close()

    assert asyncio.run(main()) == "NO_CHECKPOINT"


def test_consistency_proofs_between_checkpoints_come_from_the_tiles(db, key, tmp_path) -> None:
    build(db, key, 300)
    records = [record(n) for n in range(300, 1000)]

    async def main() -> list[bytes]:
        async with opened(db, key) as log:
            await log.append_all(records)
        pool = await open_async_pool(db.kwargs)
        try:
            async with pool.connection() as conn:
                notes = await (await conn.execute("SELECT note FROM audit_checkpoints")).fetchall()
                verifier = signer_of(key).verifier
                old, new = (parse_checkpoint(bytes(n).decode(), verifier, ORIGIN) for (n,) in notes)
                return await consistency_proof(conn, old, new)
        finally:
            await pool.close()

    proof = asyncio.run(main())
    assert proof and proof == file_consistency_proof(export(db, tmp_path), 300, 1000)


# -- export ----------------------------------------------------------------------------------


def test_export_splits_segments_and_refuses_a_directory_in_use(db, key, tmp_path) -> None:
    build(db, key, 50)
    with db.connect() as conn:
        report = export_log(conn, tmp_path / "small", segment_bytes=2000)
        assert report.records == 50 and report.segments > 5 and report.checkpoints == 1
        with pytest.raises(AuditError, match="not empty"):
            export_log(conn, tmp_path / "small")
    assert verify_log(tmp_path / "small", signer_of(key).verifier, ORIGIN, mac_key=MAC_KEY).ok
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "audit",
            "verify",
            "--audit-dir",
            str(tmp_path / "small"),
            "--verifier-key",
            signer_of(key).verifier.text,
            "--origin",
            ORIGIN,
            "--no-mac",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PRIVSCORE_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_of_a_record_reaches_a_log_line(db, key) -> None:
    with structlog.testing.capture_logs() as logs:
        build(db, key, 30, unsigned=3)
        set_envelope(db, 31, envelope_at(db, 31).replace(b'"score":631', b'"score":632'))
        refused_at_open(db, key)
    assert logs and CANARY not in repr(logs)


def test_verifier_key_and_origin_are_the_servers(db, key) -> None:
    async def main() -> tuple[VerifierKey, str]:
        async with opened(db, key) as log:
            return log.verifier, log.origin

    verifier, origin = asyncio.run(main())
    assert verifier == signer_of(key).verifier and origin == ORIGIN
