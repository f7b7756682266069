"""`privscore db import` on a real PostgreSQL: an embedded deployment a real server wrote moves
into the database (the file log byte for byte with its checkpoints and identity, the tree
rebuilt as PgAuditLog keeps it, the store's rows unchanged), checked before each part commits;
and what it refuses: a running server, a log or store that does not verify, a database that
already holds a log or rows. Also `audit replay` against the database, on the moved decisions."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from privscore.v1 import alert_service_pb2
from service.audit import (
    AuditLog,
    LogCorruptError,
    Signer,
    establish_identity,
    iter_records,
    read_identity,
)
from service.audit.pg import PgAuditLog
from service.audit.pg.load import load_file_log
from service.audit.storage import CHECKPOINT_FILE, frame, list_segments
from service.config import DataLayout
from service.db import connect_async, migrate, open_async_pool
from service.decisions.alert_rules import Event
from service.decisions.store import DecisionStore, from_us, to_us
from service.privacy.admin import init_keys
from service.privacy.digest import derive_audit_mac_key, derive_state_key
from service.privacy.keyring import Keyring, load_kek
from tests.conftest import ServerProcess, applicants, privscore_cli
from tests.db.rows import raised_alert
from tests.test_alerts import cny, event, purchase
from tests.test_limits import GOOD_SCORE, account

# The index of each table's time column.
STORE_TABLES = {
    "limit_decisions": 4,
    "events": 3,
    "alerts": 1,
    "scores": 3,
    "alert_states": 5,
    "subject_keys": 4,
}


def keys_of(data_dir: Path) -> tuple[Keyring, Signer, bytes, str]:
    """The server's keyring, its audit signer (under the log's key name), record MAC key and
    origin, as the server derives them."""
    layout = DataLayout(data_dir)
    keyring = Keyring.load(layout.keyring, load_kek(layout.dev_kek))
    identity = read_identity(layout.audit_dir)
    assert identity is not None
    signer = Signer(identity.key_name, keyring.audit_signing_key()[1])
    return keyring, signer, derive_audit_mac_key(keyring.server_secret()), identity.origin


def sqlite_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as db:
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}").fetchall()) for table in STORE_TABLES
        }


def database_rows(database: Any) -> dict[str, list[tuple[Any, ...]]]:
    """The store tables of the database, their times turned back into SQLite's microseconds."""
    found = {}
    with database.connect() as conn:
        for table, time_column in STORE_TABLES.items():
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            found[table] = sorted(
                (*row[:time_column], to_us(row[time_column]), *row[time_column + 1 :])
                for row in rows
            )
    return found


def sql(database: Any, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with database.connect() as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def holds_nothing(database: Any) -> bool:
    counts = sql(
        database,
        "SELECT (SELECT count(*) FROM audit_log_identity) + (SELECT count(*) FROM audit_entries) "
        "+ (SELECT count(*) FROM audit_checkpoints) + (SELECT count(*) FROM audit_tiles) "
        "+ (SELECT count(*) FROM audit_decisions) + (SELECT size FROM audit_log_state) "
        "+ (SELECT count(*) FROM limit_decisions) + (SELECT count(*) FROM events) "
        "+ (SELECT count(*) FROM alerts) + (SELECT last_sequence FROM alerts_sequencing) "
        "+ (SELECT count(*) FROM scores) + (SELECT count(*) FROM alert_states) "
        "+ (SELECT count(*) FROM subject_keys)",
    )
    return bool(counts[0][0] == 0)


def import_into(data_dir: Path, database: Any) -> Any:
    return privscore_cli(data_dir, "db", "import", "--database-url", database.url)


@pytest.fixture
def db(postgres_database: Any) -> Any:
    with postgres_database.connect() as conn:
        migrate(conn)
    return postgres_database


def test_a_served_deployment_moves_into_postgresql(db, tmp_path) -> None:
    data_dir = tmp_path / "var"
    layout = DataLayout(data_dir)
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            scored = [client.score("t", f"applicant-{n}", applicants()[n]) for n in range(3)]
            limits = [
                client.adjust_limit(
                    "t", "borrower-1", account(), latest_score=GOOD_SCORE, request_id="req-1"
                ),
                client.adjust_limit(
                    "t", "borrower-2", account(), features=applicants()[4], request_id="req-2"
                ),
            ]
            events = [
                client.evaluate_event("t", "borrower-1", purchase(0)),
                client.evaluate_event(
                    "t",
                    "borrower-2",
                    event(
                        5,
                        missed_payment=alert_service_pb2.MissedPayment(
                            amount_due=cny(5000), days_past_due=45
                        ),
                    ),
                ),
            ]
            assert events[1].alerts  # an alert row, with its sequence
        running = import_into(data_dir, db)
        assert running.returncode == 1
        assert "in use by another audit log writer (a running server?)" in running.stderr
        assert holds_nothing(db)
    finally:
        assert server.terminate() == 0

    original = [stored.envelope for stored in iter_records(layout.audit_dir)]
    stored_rows = sqlite_rows(layout.decision_store)
    # Three scored applicants, one alert, and a key for each of the five subjects this month.
    assert [len(stored_rows[t]) for t in STORE_TABLES] == [2, 2, 1, 3, 1, 5]

    imported = import_into(data_dir, db)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    report = json.loads(imported.stdout)
    keyring, signer, mac_key, origin = keys_of(data_dir)
    assert report["audit_log"]["origin"] == origin
    assert report["audit_log"]["records"] == len(original)
    assert report["audit_log"]["imported"] == "committed"
    assert report["audit_log"]["torn_tail_bytes"] == 0
    assert report["store"] == {
        "limit_decisions": 2,
        "events": 2,
        "alerts": 1,
        "scores": 3,
        "alert_states": 1,
        "subject_keys": 5,
        "last_alert_sequence": events[1].alerts[0].sequence,
    }

    # The log opens with PgAuditLog's full check under the server's keys, and answers lookups.
    async def open_log() -> tuple[Any, bool, Any]:
        pool = await open_async_pool(db.kwargs, min_size=1, max_size=4)
        try:
            log = await PgAuditLog.open(pool, signer=signer, mac_key=mac_key, origin=origin)
            try:
                proved = await log.prove(scored[0].metadata.decision_id)
                return log.recovery, log.verified, proved
            finally:
                await log.close()
        finally:
            await pool.close()

    recovery, verified, (checkpoint, found, _) = asyncio.run(open_log())
    assert verified and recovery.size == len(original) == recovery.checkpointed
    assert found.sequence == scored[0].metadata.audit_sequence and checkpoint.size == len(original)

    # Exported, it is the original log, and verifies offline with every record's MAC.
    out = tmp_path / "export"
    exported = privscore_cli(
        data_dir, "audit", "export", "--database-url", db.url, "--out", str(out)
    )
    assert exported.returncode == 0, exported.stderr
    assert [stored.envelope for stored in iter_records(out)] == original
    assert (out / CHECKPOINT_FILE).read_bytes() == (layout.audit_dir / CHECKPOINT_FILE).read_bytes()
    assert json.loads((out / "identity.json").read_text()) == {
        "origin": origin,
        "key_name": signer.name,
    }
    checked = privscore_cli(data_dir, "audit", "verify", "--audit-dir", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = json.loads(checked.stdout)
    assert result["ok"] and result["mac_checked"] and result["size"] == len(original)

    # Every store row is the SQLite row, and opens under the same state key: copied back
    # into a fresh SQLite store, each authenticates and reads as the server stored it.
    assert database_rows(db) == stored_rows
    assert sql(db, "SELECT last_sequence FROM alerts_sequencing") == [
        (events[1].alerts[0].sequence,)
    ]
    state_key = derive_state_key(keyring.server_secret())
    copy_path = tmp_path / "copy.sqlite3"
    DecisionStore(copy_path, state_key).close()
    with sqlite3.connect(copy_path) as copy:
        for table, rows in database_rows(db).items():
            marks = ", ".join("?" * len(rows[0]))
            copy.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    store = DecisionStore(copy_path, state_key)
    try:
        assert store.tampered_rows() == []
        for request_id in ("req-1", "req-2"):
            assert store.limit_decision("t", request_id) is not None
        assert [sequence for sequence, _ in store.alert_rows()] == [events[1].alerts[0].sequence]
        assert len(store.event_keys()) == 2
    finally:
        store.close()

    # The moved decisions replay from the database (the limit's sealed account opened).
    for decision in (scored[1].metadata.decision_id, limits[1].metadata.decision_id):
        replayed = privscore_cli(
            data_dir, "audit", "replay", "--database-url", db.url, "--decision", decision
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert json.loads(replayed.stdout)["matches"] is True

    # Run again: the store rows are there, so nothing more is written.
    again = import_into(data_dir, db)
    assert again.returncode == 1 and "already holds decision store rows" in again.stderr
    assert database_rows(db) == stored_rows


# -- refusals, on deployments written without a server (faster) --------------------------------


def record(n: int) -> dict[str, Any]:
    return {
        "decision_id": str(uuid.uuid4()),
        "rpc": "privscore.v1.ScoringService/Score",
        "time": f"2026-12-02T11:00:{n % 60:02d}Z",
        "outputs": {"score": 600 + n},
    }


def embedded(tmp_path: Path, records: int = 20) -> Path:
    """A data directory as a stopped server leaves it: keys, a file log of `records` records
    under a final checkpoint, and a store with one limit decision, one event and two alerts."""
    data_dir = tmp_path / "var"
    layout = DataLayout(data_dir)
    init_keys(layout, layout.keyring, layout.dev_kek)
    keyring = Keyring.load(layout.keyring, load_kek(layout.dev_kek))
    identity = establish_identity(layout.audit_dir, None)
    log = AuditLog(
        layout.audit_dir,
        signer=Signer(identity.key_name, keyring.audit_signing_key()[1]),
        mac_key=derive_audit_mac_key(keyring.server_secret()),
        origin=identity.origin,
    )
    for n in range(records):
        log.append_sync(record(n))
    log.close_sync()
    store = DecisionStore(layout.decision_store, derive_state_key(keyring.server_secret()))
    moment = from_us(1_780_000_000_000_000)
    store.record_limit_decision(
        tenant="t",
        pseudonym="a" * 64,
        request_id="req-1",
        fingerprint="f" * 64,
        decided_at=moment,
        action="INCREASE",
        response=b"response",
    )
    happened = Event(
        event_id="ev-1",
        occurred_at=moment,
        kind="PURCHASE",
        currency="CNY",
        amount=100,
        succeeded=True,
        days_past_due=0,
        balance_after=50,
    )
    alerts = [raised_alert("t", "a" * 64), raised_alert("t", "a" * 64, rule="velocity.purchases")]
    store.record_event("t", "a" * 64, happened, alerts, moment, moment)
    store.close()
    return data_dir


def edit_record(audit_dir: Path, sequence: int) -> None:
    """Change a digit of record `sequence` and frame it again with a valid CRC: damage only
    the tree, the chain and the signatures can show."""
    _, segment = list_segments(audit_dir)[0]
    data, offset, out, n = segment.read_bytes(), 0, bytearray(), 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        payload = data[offset + 4 : offset + 4 + length]
        if n == sequence:
            payload = payload.replace(b'"score":', b'"score":1', 1)
        out += frame(payload)
        offset += 8 + length
        n += 1
    segment.write_bytes(bytes(out))


def test_a_log_that_does_not_verify_is_not_imported(db, tmp_path) -> None:
    data_dir = embedded(tmp_path)
    edit_record(DataLayout(data_dir).audit_dir, 6)
    done = import_into(data_dir, db)
    assert done.returncode == 1
    assert "does not verify (first bad sequence 6" in done.stderr
    assert holds_nothing(db)


def test_the_check_inside_the_transaction_rolls_back_what_it_refuses(db, tmp_path) -> None:
    """load_file_log checks what it wrote with PgAuditLog's full check before its caller
    commits (here on a damaged log that `db import` would have refused before writing)."""
    data_dir = embedded(tmp_path)
    edit_record(DataLayout(data_dir).audit_dir, 6)
    _, signer, mac_key, _ = keys_of(data_dir)
    identity = read_identity(DataLayout(data_dir).audit_dir)
    assert identity is not None

    async def main() -> None:
        conn = await connect_async(db.kwargs)
        try:
            async with conn.transaction():
                await load_file_log(
                    conn,
                    DataLayout(data_dir).audit_dir,
                    identity=identity,
                    verifier=signer.verifier,
                    mac_key=mac_key,
                )
        finally:
            await conn.close()

    with pytest.raises(LogCorruptError, match="refusing to import the log"):
        asyncio.run(main())
    assert holds_nothing(db)


def test_a_store_row_that_fails_its_authentication_stops_the_import_before_anything(
    db, tmp_path
) -> None:
    data_dir = embedded(tmp_path)
    with sqlite3.connect(DataLayout(data_dir).decision_store) as store:
        store.execute("UPDATE limit_decisions SET action = 'DECREASE'")
    done = import_into(data_dir, db)
    assert done.returncode == 1
    assert "1 decision store rows fail their authentication" in done.stderr
    assert holds_nothing(db)


def test_a_database_holding_another_log_is_refused(db, tmp_path) -> None:
    data_dir = embedded(tmp_path / "first")
    other = embedded(tmp_path / "second", records=5)
    assert import_into(other, db).returncode == 0
    before = sql(db, "SELECT size, root FROM audit_log_state")
    done = import_into(data_dir, db)
    assert done.returncode == 1
    assert "already holds an audit log (5 records" in done.stderr
    assert "import into a new database" in done.stderr
    assert sql(db, "SELECT size, root FROM audit_log_state") == before


def test_run_again_after_a_failed_store_part_it_imports_the_store_alone(db, tmp_path) -> None:
    data_dir = embedded(tmp_path)
    assert import_into(data_dir, db).returncode == 0
    log_rows = sql(db, "SELECT sequence, envelope FROM audit_entries ORDER BY sequence")
    rows = database_rows(db)
    # What a store part that rolled back leaves: the log committed, no store rows.
    sql(db, "DELETE FROM limit_decisions; DELETE FROM events; DELETE FROM alerts")
    sql(db, "DELETE FROM scores; DELETE FROM alert_states; DELETE FROM subject_keys")
    sql(db, "UPDATE alerts_sequencing SET last_sequence = 0")

    done = import_into(data_dir, db)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["audit_log"]["imported"].startswith("already in the database")
    assert report["store"] == {
        **{table: len(held) for table, held in rows.items()},
        "last_alert_sequence": 2,
    }
    assert (report["store"]["limit_decisions"], report["store"]["alerts"]) == (1, 2)
    assert database_rows(db) == rows
    assert sql(db, "SELECT sequence, envelope FROM audit_entries ORDER BY sequence") == log_rows
