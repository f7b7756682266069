"""The closed loop's state on PostgreSQL (schema 2), shared by replicas: each subject's latest
score, where each alert stands and its changes on the stream, subject keys, erasure, and the fill
that gives alerts raised under schema 1 their states. Real servers on one database, called
through the SDK, and the ledger itself where a race needs placing exactly."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privscore.client.pseudonym import Pseudonymiser
from privscore.v1 import alert_service_pb2 as alert_pb
from privscore.v1 import limit_service_pb2 as limit_pb
from service.api.ledger import FailClosedAudit, SubjectScore
from service.api.pg_ledger import PgLedger
from service.audit import Signer
from service.audit.pg import PgAuditLog, establish_identity
from service.config import DataLayout
from service.db import MIGRATIONS, migrate, open_async_pool
from service.decisions.alert_rules import MISSED_PAYMENT, Event
from service.decisions.pg_store import PgDecisionStore
from service.decisions.rows import (
    AlertRow,
    OpenAlert,
    RecordedScore,
    RowSealer,
    StateChanged,
    to_us,
)
from service.privacy.digest import derive_state_key
from service.privacy.keyring import Keyring, load_kek
from tests.conftest import PostgresDatabase, ServerProcess, applicants, init_dev_keys
from tests.db.replicas import migrate as migrate_with_cli
from tests.db.replicas import replica, rows, until
from tests.db.rows import raised_alert
from tests.test_alerts import cny, event
from tests.test_limits import GOOD_SCORE, account

TENANT = "t"
STATE_KEY = bytes(range(32))
MAC_KEY = bytes(range(32, 64))
REASON = "CUSTOMER_CONTACTED"
SUBJECT_TABLES = ("events", "limit_decisions", "scores", "alert_states", "subject_keys")


def missed_payment(days: int) -> alert_pb.BehaviourEvent:
    """Raises one alert: CRITICAL from 60 days past due (a freeze), HIGH from 30."""
    return event(0, missed_payment=alert_pb.MissedPayment(amount_due=cny(5000), days_past_due=days))


def pseudonym(data_dir: Path, customer: str) -> str:
    return Pseudonymiser.from_file(DataLayout(data_dir).pseudonym_key).pseudonym(TENANT, customer)


def state_key_of(data_dir: Path) -> bytes:
    layout = DataLayout(data_dir)
    return derive_state_key(Keyring.load(layout.keyring, load_kek(layout.dev_kek)).server_secret())


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls on threads of their own, released together; each one's result or the
    grpc.RpcError it raised."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=20)
        try:
            return call()
        except grpc.RpcError as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@asynccontextmanager
async def ledgers(database: PostgresDatabase, count: int) -> AsyncIterator[list[PgLedger]]:
    """`count` ledgers on pools of their own over one migrated database, as replicas have."""
    with database.connect() as conn:
        migrate(conn)
    key = Ed25519PrivateKey.generate()

    async def failed() -> None:
        raise AssertionError("the audit log failed")

    opened: list[tuple[Any, PgAuditLog, PgLedger]] = []
    try:
        for _ in range(count):
            pool = await open_async_pool(database.kwargs, min_size=1, max_size=4)
            async with pool.connection() as conn:
                identity = await establish_identity(conn, None)
            log = await PgAuditLog.open(
                pool, signer=Signer(identity.key_name, key), mac_key=MAC_KEY, origin=identity.origin
            )
            store = PgDecisionStore(pool, STATE_KEY)
            opened.append((pool, log, PgLedger(store, FailClosedAudit(log, failed))))
        yield [ledger for _, _, ledger in opened]
    finally:
        for pool, log, _ in opened:
            await log.close()
            await pool.close()


def score_record(decision_id: str) -> dict[str, Any]:
    return {"decision_id": decision_id, "rpc": "/privscore.v1.ScoringService/Score"}


def recorded(score: int, scored_at: dt.datetime) -> RecordedScore:
    return RecordedScore(str(uuid.uuid4()), scored_at, score, "A", "APPROVE", "test-model")


# -- the latest score -----------------------------------------------------------------------


def test_the_later_score_is_the_one_every_replica_decides_on(
    postgres_database: PostgresDatabase,
    data_dir: Path,
    replicas: Callable[[int], list[ServerProcess]],
) -> None:
    servers = replicas(2)
    with servers[0].channel() as first, servers[1].channel() as second:
        one, two = servers[0].client(first), servers[1].client(second)
        earlier = one.score(TENANT, "scored", applicants()[0])
        later = two.score(TENANT, "scored", applicants()[1])
        decided = one.adjust_limit(TENANT, "scored", account())
        assert decided.score_source == limit_pb.SCORE_SOURCE_RECORDED
        assert decided.score_decision_id == later.metadata.decision_id
        assert decided.score == later.score.score
        assert earlier.metadata.decision_id != later.metadata.decision_id

        # Scored on both replicas at once: the latest decision is kept, whichever committed
        # last, and the subject got one key for the month however many calls made it at once.
        replies = at_once(
            [
                functools.partial(client.score, TENANT, "raced", applicants()[n % 5])
                for n, client in enumerate([one, two] * 4)
            ]
        )
        latest = max(reply.metadata.decided_at.ToDatetime() for reply in replies)
        winners = {
            reply.metadata.decision_id
            for reply in replies
            if reply.metadata.decided_at.ToDatetime() == latest
        }
        decided = two.adjust_limit(TENANT, "raced", account())
        assert decided.score_decision_id in winners
    raced = pseudonym(data_dir, "raced")
    assert rows(postgres_database, "SELECT count(*) FROM scores WHERE pseudonym = %s", raced) == [
        (1,)
    ]
    keys = "SELECT count(*) FROM subject_keys WHERE pseudonym = %s"
    assert rows(postgres_database, keys, raced) == [(1,)]


def test_a_score_that_commits_after_a_later_one_does_not_replace_it(
    postgres_database: PostgresDatabase,
) -> None:
    """A slow replica's earlier score commits last: the later one stays."""
    now = dt.datetime.now(dt.UTC)
    earlier, later = recorded(500, now), recorded(650, now + dt.timedelta(seconds=1))

    async def main() -> tuple[RecordedScore | None, RecordedScore | None]:
        async with ledgers(postgres_database, 2) as (slow, fast):
            for ledger, score in ((fast, later), (slow, earlier)):
                await ledger.commit_scores(
                    [score_record(score.decision_id)], [SubjectScore(TENANT, "p", score)]
                )
            return await slow.latest_score(TENANT, "p"), await fast.latest_score(TENANT, "p")

    assert asyncio.run(main()) == (later, later)


# -- alert states -----------------------------------------------------------------------------


def test_an_alert_changed_on_one_replica_is_changed_on_the_other_and_streamed_in_order(
    replicas: Callable[[int], list[ServerProcess]],
) -> None:
    servers = replicas(2)
    with servers[0].channel() as first, servers[1].channel() as second:
        one, two = servers[0].client(first), servers[1].client(second)
        (alert,) = one.evaluate_event(TENANT, "frozen", missed_payment(90)).alerts
        raised = alert.sequence
        assert alert.severity == alert_pb.SEVERITY_CRITICAL

        stream = two.watch_alerts(after_sequence=raised - 1, timeout=30)
        first_seen = next(stream)
        assert (first_seen.sequence, first_seen.state) == (raised, alert_pb.ALERT_STATE_OPEN)

        def blocking() -> list[int]:
            decided = two.adjust_limit(TENANT, "frozen", account(), latest_score=GOOD_SCORE)
            return list(decided.blocking_alerts)

        assert blocking() == [raised]
        acknowledged = one.update_alert_state(raised, alert_pb.ALERT_STATE_ACKNOWLEDGED, REASON)
        assert blocking() == [raised]  # acknowledged is not resolved: still frozen
        resolved = one.update_alert_state(raised, alert_pb.ALERT_STATE_RESOLVED, "PAID")
        assert blocking() == []

        changes = [next(stream), next(stream)]
        stream.close()
    assert [(a.sequence, a.alert_sequence, a.state, a.state_reason) for a in changes] == [
        (raised + 1, raised, alert_pb.ALERT_STATE_ACKNOWLEDGED, REASON),
        (raised + 2, raised, alert_pb.ALERT_STATE_RESOLVED, "PAID"),
    ]
    assert acknowledged.alert.sequence == raised + 1 and resolved.alert.sequence == raised + 2
    assert changes[1].subject == alert.subject and changes[1].rule == alert.rule


def test_a_change_decided_on_a_state_that_moved_meanwhile_is_withdrawn(
    postgres_database: PostgresDatabase,
) -> None:
    """Under the alert's row lock the stored state must be the one the change was decided
    from (its record's `alert.from`), not resolved, and not the state asked for: else
    StateChanged, and neither its record nor a stream number is kept."""
    now = dt.datetime.now(dt.UTC)
    happened = Event("ev-1", now, MISSED_PAYMENT, "CNY", 5000, None, 90, None)

    async def main() -> list[int]:
        async with ledgers(postgres_database, 2) as (one, two):
            _, (raised,) = await one.commit_event(
                {"decision_id": str(uuid.uuid4())},
                tenant=TENANT,
                pseudonym="p",
                event=happened,
                duplicate=False,
                seen_history=[],
                alerts=lambda _: [raised_alert(TENANT, "p")],
                raised_at=now,
                forget_before=now - dt.timedelta(days=1),
            )

            async def change(seen: str, state: str) -> None:
                await two.commit_alert_update(
                    {"decision_id": str(uuid.uuid4()), "alert": {"from": seen, "to": state}},
                    alert_sequence=raised,
                    state=state,
                    changed_at=now,
                    update=lambda _: [alert_pb.Alert(alert_sequence=raised).SerializeToString()],
                )

            await change("OPEN", "ACKNOWLEDGED")
            for seen, state in (("OPEN", "RESOLVED"), ("ACKNOWLEDGED", "ACKNOWLEDGED")):
                with pytest.raises(StateChanged):
                    await change(seen, state)
            assert await one.open_alerts(TENANT, "p") == [
                OpenAlert(raised, "CRITICAL", "ACKNOWLEDGED")
            ]
            await change("ACKNOWLEDGED", "RESOLVED")
            with pytest.raises(StateChanged):
                await change("RESOLVED", "ACKNOWLEDGED")
            assert await one.open_alerts(TENANT, "p") == []
            found = await one.alert_state(raised)
            assert found is not None and found[0] == "RESOLVED"
            return [sequence for sequence, _ in await one.alerts_after(0, 10)]

    assert asyncio.run(main()) == [1, 2, 3]  # raised, acknowledged, resolved: no number left unused
    assert rows(postgres_database, "SELECT count(*) FROM audit_entries") == [(3,)]


def test_two_replicas_resolving_one_alert_at_once_resolve_it_once(
    postgres_database: PostgresDatabase, replicas: Callable[[int], list[ServerProcess]]
) -> None:
    servers = replicas(2)
    rounds = 6
    with servers[0].channel() as first, servers[1].channel() as second:
        one, two = servers[0].client(first), servers[1].client(second)
        for n in range(rounds):
            (alert,) = one.evaluate_event(TENANT, f"contested-{n}", missed_payment(45)).alerts
            outcomes = at_once(
                [
                    functools.partial(
                        client.update_alert_state,
                        alert.sequence,
                        alert_pb.ALERT_STATE_RESOLVED,
                        REASON,
                    )
                    for client in (one, two)
                ]
            )
            refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
            assert len(refused) == 1, outcomes
            assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "resolved" in (refused[0].details() or "")
    # Each alert: raised, then changed once on the stream, and resolved.
    assert rows(postgres_database, "SELECT count(*), max(sequence) FROM alerts") == [
        (2 * rounds, 2 * rounds)
    ]
    assert rows(postgres_database, "SELECT state, count(*) FROM alert_states GROUP BY 1") == [
        ("RESOLVED", rounds)
    ]


# -- subject keys -----------------------------------------------------------------------------


def test_a_subject_key_is_made_once_however_many_replicas_ask_at_once(
    postgres_database: PostgresDatabase,
) -> None:
    async def main() -> list[tuple[str, bytes]]:
        async with ledgers(postgres_database, 3) as opened:
            asked = [
                ledger.subject_key(TENANT, "new", "2026-12") for ledger in opened for _ in range(6)
            ]
            batches = [
                ledger.subject_keys([(TENANT, "other"), (TENANT, "new")], "2026-12")
                for ledger in opened
            ]
            found = await asyncio.gather(*asked)
            batched = await asyncio.gather(*batches)
            assert all(pair[1] == found[0] for pair in batched)
            (key_id, key) = found[0]
            assert await opened[0].key_by_id(key_id) == key
            assert await opened[1].subject_key_ids(TENANT, "new") == [key_id]
            return found

    found = asyncio.run(main())
    assert len(set(found)) == 1
    assert rows(
        postgres_database, "SELECT pseudonym, period, count(*) FROM subject_keys GROUP BY 1, 2"
    ) == [("new", "2026-12", 1), ("other", "2026-12", 1)]


def test_keys_past_retention_are_destroyed_once_by_racing_replicas(
    postgres_database: PostgresDatabase,
) -> None:
    async def main() -> list[tuple[int | None, int]]:
        async with ledgers(postgres_database, 2) as opened:
            for n in range(4):
                await opened[0].subject_key(TENANT, f"s{n}", "2026-10")
            await opened[0].subject_key(TENANT, "s0", "2026-11")

            def record(count: int) -> dict[str, Any]:
                return {"decision_id": str(uuid.uuid4()), "expired": {"keys": count}}

            outcomes = await asyncio.gather(
                *(ledger.expire_keys("2026-11", record) for ledger in opened)
            )
            assert await opened[1].subject_key_ids(TENANT, "s0") != []
            return list(outcomes)

    outcomes = asyncio.run(main())
    assert sorted(destroyed for _, destroyed in outcomes) == [0, 4]
    assert sorted(sequence is None for sequence, _ in outcomes) == [False, True]
    assert rows(postgres_database, "SELECT period FROM subject_keys") == [("2026-11",)]


# -- erasure ----------------------------------------------------------------------------------


def test_erasure_blanks_the_subjects_alerts_in_place_and_deletes_its_rows(
    postgres_database: PostgresDatabase,
    data_dir: Path,
    replicas: Callable[[int], list[ServerProcess]],
) -> None:
    servers = replicas(2)
    with servers[0].channel() as first, servers[1].channel() as second:
        one, two = servers[0].client(first), servers[1].client(second)
        # Replica one raises (and so caches) every alert of the subject; two erases it.
        kept = [one.evaluate_event(TENANT, "kept", missed_payment(45)).alerts[0].sequence]
        (gone,) = one.evaluate_event(TENANT, "erased", missed_payment(90)).alerts
        one.score(TENANT, "erased", applicants()[0])
        one.adjust_limit(TENANT, "erased", account())
        changed = one.update_alert_state(gone.sequence, alert_pb.ALERT_STATE_ACKNOWLEDGED, REASON)
        kept.append(one.evaluate_event(TENANT, "kept", missed_payment(90)).alerts[0].sequence)
        assert kept == [gone.sequence - 1, changed.alert.sequence + 1]

        erased = two.erase_subject(TENANT, customer_id="erased")
        assert erased.erased
        assert (erased.events_deleted, erased.alerts_deleted, erased.adjustments_deleted) == (
            1,
            2,
            1,
        )
        kept.append(two.evaluate_event(TENANT, "kept", missed_payment(45)).alerts[0].sequence)

        # A subscriber on the replica that raised them (and keeps them in its cache of recent
        # alerts, blanked there once the erasure's notification reaches it), resuming from
        # before them all, is sent every alert kept, in order, and nothing of the erased one.
        def resumed() -> list[alert_pb.Alert] | None:
            stream = one.watch_alerts(after_sequence=0, timeout=30)
            received = [next(stream) for _ in kept]
            stream.close()
            return received if [a.sequence for a in received] == kept else None

        received = until(resumed)
        assert {alert.subject.pseudonym for alert in received} == {pseudonym(data_dir, "kept")}

        for client in (one, two):
            with pytest.raises(grpc.RpcError) as missing:
                client.update_alert_state(gone.sequence, alert_pb.ALERT_STATE_RESOLVED, REASON)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    subject = pseudonym(data_dir, "erased")
    for table in SUBJECT_TABLES:
        query = f"SELECT count(*) FROM {table} WHERE pseudonym = %s"
        assert rows(postgres_database, query, subject) == [(0,)], table
    # The stream kept every number; the erased subject's entries are sealed empty.
    sealer = RowSealer(state_key_of(data_dir))
    stored = rows(postgres_database, "SELECT sequence, raised_at, sealed FROM alerts ORDER BY 1")
    assert [sequence for sequence, _, _ in stored] == list(range(1, kept[-1] + 1))
    blank = [
        sequence
        for sequence, raised_at, sealed in stored
        if sealer.open(AlertRow(sequence, to_us(raised_at)), sealed) == b""
    ]
    assert blank == [gone.sequence, changed.alert.sequence]


# -- the fill of schema 2 ---------------------------------------------------------------------


def schema_1_with_alerts(database: PostgresDatabase, data_dir: Path) -> list[str]:
    """A database migrated to schema 1 only, holding three alerts a schema-1 server raised
    (sealed under the deployment's state key); their subjects' pseudonyms."""
    init_dev_keys(data_dir)
    sealer = RowSealer(state_key_of(data_dir))
    frozen, watched = pseudonym(data_dir, "old-frozen"), pseudonym(data_dir, "old-watched")
    raised = [
        raised_alert(TENANT, frozen, alert_pb.SEVERITY_CRITICAL),
        raised_alert(TENANT, watched, alert_pb.SEVERITY_LOW),
        raised_alert(TENANT, frozen, alert_pb.SEVERITY_HIGH),
    ]
    raised_at = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
    with database.connect() as conn:
        migrate(conn, shipped=MIGRATIONS[:1])
        for sequence, alert in enumerate(raised, start=1):
            row = AlertRow(sequence, to_us(raised_at))
            conn.execute(
                "INSERT INTO alerts (sequence, raised_at, sealed) VALUES (%s, %s, %s)",
                (sequence, raised_at, sealer.seal(row, alert)),
            )
        conn.execute("UPDATE alerts_sequencing SET last_sequence = %s", (len(raised),))
    return [frozen, watched]


def test_migration_2_gives_the_alerts_of_schema_1_their_states_once(
    postgres_database: PostgresDatabase, data_dir: Path
) -> None:
    frozen, watched = schema_1_with_alerts(postgres_database, data_dir)
    migrate_with_cli(postgres_database, data_dir)
    assert rows(postgres_database, "SELECT name FROM store_fills") == [("alert_states",)]

    servers = [replica(postgres_database, data_dir) for _ in range(2)]
    try:
        filled = [
            [r for r in server.records() if r.get("event") == "database.alert_states_filled"]
            for server in servers
        ]
        assert [[line["rows"] for line in lines] for lines in filled] == [[3], []]
        assert rows(postgres_database, "SELECT count(*) FROM store_fills") == [(0,)]
        states = "SELECT alert_sequence, pseudonym, severity, state FROM alert_states ORDER BY 1"
        assert rows(postgres_database, states) == [
            (1, frozen, "CRITICAL", "OPEN"),
            (2, watched, "LOW", "OPEN"),
            (3, frozen, "HIGH", "OPEN"),
        ]
        with servers[1].channel() as channel:
            client = servers[1].client(channel)
            decided = client.adjust_limit(TENANT, "old-frozen", account(), latest_score=GOOD_SCORE)
            assert 1 in decided.blocking_alerts
            assert decided.action == limit_pb.LIMIT_ACTION_FREEZE
            update = client.update_alert_state(1, alert_pb.ALERT_STATE_RESOLVED, REASON)
            assert (update.alert.sequence, update.alert.alert_sequence) == (4, 1)
    finally:
        for server in servers:
            server.terminate()


def test_replicas_filling_at_once_fill_once(postgres_database: PostgresDatabase, data_dir: Path):
    schema_1_with_alerts(postgres_database, data_dir)
    with postgres_database.connect() as conn:
        migrate(conn)
    state_key = state_key_of(data_dir)

    async def main() -> list[int | None]:
        pools = [
            await open_async_pool(postgres_database.kwargs, min_size=1, max_size=2)
            for _ in range(3)
        ]
        try:
            stores = [PgDecisionStore(pool, state_key) for pool in pools]
            return list(await asyncio.gather(*(store.fill_alert_states() for store in stores)))
        finally:
            for pool in pools:
                await pool.close()

    assert sorted(asyncio.run(main()), key=str) == [3, None, None]
    assert rows(postgres_database, "SELECT count(*) FROM alert_states") == [(3,)]
