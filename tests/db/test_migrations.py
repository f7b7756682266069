"""Schema migrations on a real PostgreSQL: applied in order, once, under an advisory lock that
lets replicas migrate at the same moment; and the check a server makes before it starts."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from service.audit.merkle import EMPTY_ROOT
from service.audit.storage import GENESIS_CHAIN
from service.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SchemaError,
    check_schema,
    check_schema_async,
    migrate,
    open_async_pool,
    schema_status,
)
from service.db.schema import judge, load_migrations
from service.decisions.alert_rules import Event
from service.decisions.store import DecisionStore, from_us, to_us
from tests.conftest import REPO_ROOT
from tests.db.rows import raised_alert

# A slow next migration: long enough that two migrators overlap.
SLOW = Migration(
    SCHEMA_VERSION + 1, "slow", "SELECT pg_sleep(0.5); CREATE TABLE slow_marker (x integer);"
)
SHIPPED = [(migration.version, migration.name) for migration in MIGRATIONS]


def applied_versions(database: Any) -> list[tuple[int, str]]:
    with database.connect() as conn:
        rows = conn.execute("SELECT version, name FROM privscore_schema ORDER BY 1").fetchall()
    return [(int(version), str(name)) for version, name in rows]


def test_the_shipped_migrations_are_numbered_from_one() -> None:
    assert load_migrations() == MIGRATIONS
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    assert MIGRATIONS[0].label == "0001_initial"


def test_migrate_applies_the_schema_once(postgres_database) -> None:
    with postgres_database.connect() as conn:
        assert schema_status(conn).version == 0
        assert [m.version for m in schema_status(conn).pending] == [1, 2]
        assert migrate(conn) == list(MIGRATIONS)
        assert migrate(conn) == []  # nothing left: a second run changes nothing
        status = schema_status(conn)
    assert status.current and status.version == SCHEMA_VERSION
    assert [row.sha256 for row in status.applied] == [m.sha256 for m in MIGRATIONS]
    assert applied_versions(postgres_database) == SHIPPED == [(1, "initial"), (2, "loop_state")]


# Every column of schema 1 with its exact type: bytes as bytea, counters and sequence numbers
# as bigint, times as timestamptz.
SCHEMA_1 = {
    "audit_log_identity": [
        ("id", "smallint"),
        ("origin", "text"),
        ("key_name", "text"),
        ("created_at", "timestamp with time zone"),
    ],
    "audit_log_state": [
        ("id", "smallint"),
        ("size", "bigint"),
        ("chain", "bytea"),
        ("root", "bytea"),
        ("updated_at", "timestamp with time zone"),
    ],
    "audit_entries": [("sequence", "bigint"), ("envelope", "bytea")],
    "audit_decisions": [("decision_id", "uuid"), ("sequence", "bigint")],
    "audit_tiles": [("level", "smallint"), ("tile_index", "bigint"), ("nodes", "bytea")],
    "audit_checkpoints": [
        ("id", "bigint"),
        ("tree_size", "bigint"),
        ("note", "bytea"),
        ("signed_at", "timestamp with time zone"),
    ],
    "limit_decisions": [
        ("tenant", "text"),
        ("request_id", "text"),
        ("pseudonym", "text"),
        ("fingerprint", "text"),
        ("decided_at", "timestamp with time zone"),
        ("action", "text"),
        ("sealed", "bytea"),
    ],
    "events": [
        ("tenant", "text"),
        ("pseudonym", "text"),
        ("event_id", "text"),
        ("occurred_at", "timestamp with time zone"),
        ("sealed", "bytea"),
    ],
    "alerts": [
        ("sequence", "bigint"),
        ("raised_at", "timestamp with time zone"),
        ("sealed", "bytea"),
    ],
    "alerts_sequencing": [("id", "smallint"), ("last_sequence", "bigint")],
    "privscore_schema": [
        ("version", "integer"),
        ("name", "text"),
        ("sha256", "bytea"),
        ("applied_at", "timestamp with time zone"),
    ],
}
# What schema 2 adds: the closed loop's tables, as SQLite schema 4 has them (times timestamptz).
SCHEMA_2 = {
    "scores": [
        ("tenant", "text"),
        ("pseudonym", "text"),
        ("decision_id", "text"),
        ("scored_at", "timestamp with time zone"),
        ("sealed", "bytea"),
    ],
    "alert_states": [
        ("alert_sequence", "bigint"),
        ("tenant", "text"),
        ("pseudonym", "text"),
        ("severity", "text"),
        ("state", "text"),
        ("changed_at", "timestamp with time zone"),
        ("sealed", "bytea"),
    ],
    "subject_keys": [
        ("tenant", "text"),
        ("pseudonym", "text"),
        ("period", "text"),
        ("key_id", "text"),
        ("created_at", "timestamp with time zone"),
        ("sealed", "bytea"),
    ],
    "store_fills": [("name", "text")],
}


def test_the_schema_has_exactly_the_designed_tables_and_types(postgres_database) -> None:
    with postgres_database.connect() as conn:
        migrate(conn)
        rows = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ).fetchall()
        state = conn.execute("SELECT size, chain, root FROM audit_log_state").fetchall()
        alerts = conn.execute("SELECT last_sequence FROM alerts_sequencing").fetchall()
        fills = conn.execute("SELECT name FROM store_fills").fetchall()
    found: dict[str, list[tuple[str, str]]] = {}
    for table, column, data_type, nullable in rows:
        found.setdefault(table, []).append((column, data_type))
        assert nullable == "NO", f"{table}.{column} may be null"
    assert found == SCHEMA_1 | SCHEMA_2
    # The empty log as the file log starts it: no records, the genesis chain, RFC 9162's root.
    assert state == [(0, GENESIS_CHAIN, EMPTY_ROOT)]
    assert alerts == [(0,)]
    assert fills == []  # no alert to give a state row to


def test_the_shape_checks_refuse_malformed_rows(postgres_database) -> None:
    import psycopg

    with postgres_database.connect() as conn:
        migrate(conn)
        for statement in (
            "INSERT INTO audit_log_state (id, size, chain, root) VALUES (1, 0, '\\x00', '\\x00')",
            "UPDATE audit_log_state SET chain = '\\x0102'",
            "INSERT INTO audit_tiles VALUES (0, 0, '\\x00')",  # not a whole hash
            "INSERT INTO audit_tiles VALUES (8, 0, decode(repeat('00', 32), 'hex'))",
            "INSERT INTO audit_entries VALUES (-1, '\\x7b7d')",
            "INSERT INTO audit_decisions VALUES (gen_random_uuid(), 5)",  # no such entry
            "INSERT INTO alerts VALUES (0, now(), '\\x00')",  # alerts number from 1
            "INSERT INTO alert_states VALUES (0, 't', 'p', 'HIGH', 'OPEN', now(), '\\x00')",
            "INSERT INTO alert_states VALUES (1, 't', 'p', 'HIGH', 'CLOSED', now(), '\\x00')",
            "INSERT INTO subject_keys VALUES ('t', 'p', '2026-13-01', 'k', now(), '\\x00')",
        ):
            with pytest.raises(psycopg.errors.IntegrityError), conn.transaction():
                conn.execute(statement.encode())


def test_two_migrators_at_once_both_succeed_and_apply_each_migration_once(
    postgres_database,
) -> None:
    shipped = (*MIGRATIONS, SLOW)
    barrier = threading.Barrier(2)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def migrator() -> None:
        try:
            with postgres_database.connect() as conn:
                barrier.wait()
                results.append([m.version for m in migrate(conn, shipped=shipped)])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=migrator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    # Each once, by either.
    assert sorted(v for applied in results for v in applied) == list(range(1, SLOW.version + 1))
    assert applied_versions(postgres_database) == [*SHIPPED, (SLOW.version, "slow")]


def test_two_migrate_commands_at_once_both_exit_0(postgres_database) -> None:
    """`privscore db migrate` on two replicas starting together."""
    command = [sys.executable, "-m", "service.cli", "db", "migrate"]
    env = {"PATH": "/usr/bin:/bin", "PRIVSCORE_DATABASE_URL": postgres_database.url}
    processes = [
        subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    applied = b"".join(stdout for stdout, _ in outputs).count(b'"db.migration_applied"')
    assert applied == len(MIGRATIONS)
    assert applied_versions(postgres_database) == SHIPPED
    status = subprocess.run(
        [*command[:-1], "status"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and "up to date" in status.stdout


def test_a_failing_migration_leaves_nothing_behind(postgres_database) -> None:
    broken = Migration(
        SCHEMA_VERSION + 1, "broken", "CREATE TABLE half_done (x integer); SELECT no_such_column;"
    )
    with postgres_database.connect() as conn:
        with pytest.raises(SchemaError, match=f"migration {broken.label} failed"):
            migrate(conn, shipped=(*MIGRATIONS, broken))
        # The shipped ones committed each on its own, the broken one not at all.
        assert schema_status(conn).version == SCHEMA_VERSION
        missing = conn.execute("SELECT to_regclass('half_done') IS NULL").fetchone()
    assert missing == (True,)


def test_check_schema_refuses_a_database_that_is_not_migrated(postgres_database) -> None:
    with postgres_database.connect() as conn, pytest.raises(SchemaError) as raised:
        check_schema(conn)
    message = str(raised.value)
    assert "schema version 0" in message and f"needs {SCHEMA_VERSION}" in message
    assert "privscore db migrate" in message


def test_check_schema_accepts_the_current_schema(postgres_database) -> None:
    with postgres_database.connect() as conn:
        migrate(conn)
        assert check_schema(conn) == SCHEMA_VERSION


def test_check_schema_refuses_a_newer_schema_naming_both_versions(postgres_database) -> None:
    newer = SCHEMA_VERSION + 1
    with postgres_database.connect() as conn:
        migrate(conn)
        conn.execute(
            "INSERT INTO privscore_schema (version, name, sha256) VALUES (%s, 'future', %s)",
            (newer, bytes(32)),
        )
        with pytest.raises(SchemaError) as raised:
            check_schema(conn)
        message = str(raised.value)
        assert f"schema version {newer} is newer than this privscore knows ({SCHEMA_VERSION})" in (
            message
        )
        # Nor does this code migrate it (it would not know what it is changing).
        with pytest.raises(SchemaError, match=f"version {newer} is newer"):
            migrate(conn)


def test_check_schema_refuses_an_edited_migration(postgres_database) -> None:
    with postgres_database.connect() as conn:
        migrate(conn)
        conn.execute("UPDATE privscore_schema SET sha256 = %s WHERE version = 1", (bytes(32),))
        with pytest.raises(SchemaError, match="0001_initial applied to the database differs"):
            check_schema(conn)


def test_an_older_schema_is_refused_until_migrated() -> None:
    """No database needed: the verdict on what a database ran against what the code ships."""
    from service.db.schema import AppliedMigration, refusal

    later = (*MIGRATIONS, dataclasses.replace(SLOW, sql="CREATE TABLE later (x integer);"))
    first = MIGRATIONS[0]
    ran = [AppliedMigration(1, first.name, first.sha256, dt.datetime.now(dt.UTC))]
    status = judge(ran, later)
    assert status.version == 1
    assert [m.version for m in status.pending] == list(range(2, SLOW.version + 1))
    assert not status.problems
    error = refusal(status)
    assert error is not None and "version 1 is older" in str(error) and "needs" in str(error)
    assert judge([], later).pending == later


def test_the_async_check_through_a_pool(postgres_database) -> None:
    async def check() -> int:
        pool = await open_async_pool(postgres_database.kwargs, min_size=1, max_size=2)
        try:
            async with pool.connection() as conn:
                return await check_schema_async(conn)
        finally:
            await pool.close()

    with pytest.raises(SchemaError, match="not migrated"):
        asyncio.run(check())
    with postgres_database.connect() as conn:
        migrate(conn)
    assert asyncio.run(check()) == SCHEMA_VERSION


def test_store_rows_move_between_sqlite_and_postgresql_unchanged(
    postgres_database, tmp_path: Path
) -> None:
    """The decision store's tables mirror SQLite's column for column (times as timestamptz),
    and a row's seal is bound to the same values: rows copied to PostgreSQL and back into a
    fresh SQLite store open there, exactly as written."""
    state_key = bytes(range(32))
    decided = dt.datetime(2026, 11, 30, 23, 59, 59, 999_999, tzinfo=dt.UTC)
    occurred = dt.datetime(1901, 2, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    source = DecisionStore(tmp_path / "source.sqlite3", state_key)
    source.record_limit_decision(
        tenant="baitiao-cn",
        pseudonym="a" * 64,
        request_id="req-1",
        fingerprint="f" * 64,
        decided_at=decided,
        action="INCREASE",
        response=b"\x00sealed response\xff",
    )
    event = Event(
        event_id="ev-1",
        occurred_at=occurred,
        kind="PURCHASE",
        currency="CNY",
        amount=12_345,
        succeeded=True,
        days_past_due=0,
        balance_after=54_321,
    )
    raised = [raised_alert("baitiao-cn", "a" * 64, rule=rule) for rule in ("one", "two")]
    source.record_event("baitiao-cn", "a" * 64, event, raised, decided, occurred)
    source.close()

    raw = sqlite3.connect(tmp_path / "source.sqlite3")
    limits = raw.execute("SELECT * FROM limit_decisions").fetchall()
    events = raw.execute("SELECT * FROM events").fetchall()
    alerts = raw.execute("SELECT * FROM alerts").fetchall()
    raw.close()

    def at(row: tuple[Any, ...], index: int) -> tuple[Any, ...]:
        return (*row[:index], from_us(row[index]), *row[index + 1 :])

    with postgres_database.connect() as conn:
        migrate(conn)
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO limit_decisions VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [at(row, 4) for row in limits],
            )
            cursor.executemany(
                "INSERT INTO events VALUES (%s, %s, %s, %s, %s)", [at(row, 3) for row in events]
            )
            cursor.executemany("INSERT INTO alerts VALUES (%s, %s, %s)", [at(r, 1) for r in alerts])
        back = {
            table: conn.execute(f"SELECT * FROM {table}").fetchall()
            for table in ("limit_decisions", "events", "alerts")
        }

    def micros(row: tuple[Any, ...], index: int) -> tuple[Any, ...]:
        return (*row[:index], to_us(row[index]), *row[index + 1 :])

    assert [micros(r, 4) for r in back["limit_decisions"]] == limits
    assert [micros(r, 3) for r in back["events"]] == events
    assert [micros(r, 1) for r in back["alerts"]] == alerts

    copy = DecisionStore(tmp_path / "copy.sqlite3", state_key)
    copy.close()
    raw = sqlite3.connect(tmp_path / "copy.sqlite3")
    with raw:
        raw.executemany(
            "INSERT INTO limit_decisions VALUES (?, ?, ?, ?, ?, ?, ?)",
            [micros(r, 4) for r in back["limit_decisions"]],
        )
        raw.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)", [micros(r, 3) for r in back["events"]]
        )
        raw.executemany(
            "INSERT INTO alerts VALUES (?, ?, ?)", [micros(r, 1) for r in back["alerts"]]
        )
    raw.close()
    copy = DecisionStore(tmp_path / "copy.sqlite3", state_key)
    try:
        stored = copy.limit_decision("baitiao-cn", "req-1")
        assert stored is not None and stored.response == b"\x00sealed response\xff"
        assert copy.last_increase_at("baitiao-cn", "a" * 64) == decided
        assert copy.events("baitiao-cn", "a" * 64) == [event]
        assert copy.alert_rows() == [(1, raised[0]), (2, raised[1])]
        assert copy.tampered_rows() == []
    finally:
        copy.close()
