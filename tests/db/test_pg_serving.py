"""`privscore serve --database-url`: the store and the audit log in PostgreSQL, shared by
replicas. Each test runs real server processes on a database of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from privscore.v1 import alert_service_pb2, audit_service_pb2, audit_service_pb2_grpc
from privscore.v1 import limit_service_pb2 as limit_pb
from service.audit import VerifierKey, parse_checkpoint, verify_inclusion
from service.config import DataLayout
from tests.conftest import PostgresDatabase, ServerProcess, applicants, privscore_cli
from tests.db.replicas import replica, rows, until, verify_database_log
from tests.test_alerts import cny, event
from tests.test_limits import account

GOOD_SCORE = 800


def missed_payment(days: int = 45) -> alert_service_pb2.BehaviourEvent:
    return event(
        0, missed_payment=alert_service_pb2.MissedPayment(amount_due=cny(5000), days_past_due=days)
    )


def test_a_server_on_postgresql_decides_replays_proves_and_keeps_nothing_on_disk(
    postgres_database: PostgresDatabase,
    data_dir: Path,
    replicas: Callable[[int], list[ServerProcess]],
) -> None:
    (server,) = replicas(1)
    with server.channel() as channel:
        client = server.client(channel)
        scored = client.score("t", "pg-1", applicants()[0])
        decided = client.adjust_limit("t", "pg-1", account(), latest_score=GOOD_SCORE)
        again = client.adjust_limit(
            "t", "pg-1", account(), latest_score=GOOD_SCORE, request_id=decided.metadata.request_id
        )
        raised = client.evaluate_event("t", "pg-2", missed_payment())
    assert decided.action == limit_pb.LIMIT_ACTION_INCREASE and not decided.replayed
    assert again.replayed and again.metadata == decided.metadata
    assert [alert.sequence for alert in raised.alerts] == [1]

    # Each decision is the record at the sequence its reply names, and the store rows are there.
    entries = dict(rows(postgres_database, "SELECT sequence, envelope FROM audit_entries"))
    for reply in (scored, decided, raised):
        assert reply.metadata.decision_id.encode() in bytes(entries[reply.metadata.audit_sequence])
    assert len(entries) == 3  # the replay added no record
    assert rows(postgres_database, "SELECT count(*) FROM limit_decisions") == [(1,)]
    assert rows(postgres_database, "SELECT count(*) FROM events") == [(1,)]
    assert rows(postgres_database, "SELECT last_sequence FROM alerts_sequencing") == [(1,)]

    # A reviewer's proof comes from the database's index and tiles once a checkpoint covers it.
    def proven() -> audit_service_pb2.GetDecisionRecordResponse | None:
        with server.channel("auditor") as channel:
            auditor = audit_service_pb2_grpc.AuditServiceStub(channel)
            try:
                return auditor.GetDecisionRecord(
                    audit_service_pb2.GetDecisionRecordRequest(
                        decision_id=decided.metadata.decision_id
                    ),
                    timeout=10,
                )
            except grpc.RpcError as error:
                assert error.code() in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                )
                return None

    proof = until(proven)
    layout = DataLayout(data_dir)
    [(origin,)] = rows(postgres_database, "SELECT origin FROM audit_log_identity")
    checkpoint = parse_checkpoint(
        proof.checkpoint, VerifierKey.parse(layout.audit_verifier_key.read_text()), origin
    )
    assert proof.sequence == decided.metadata.audit_sequence
    verify_inclusion(
        proof.record, proof.sequence, proof.tree_size, list(proof.inclusion_proof),
        checkpoint.root_hash,
    )  # fmt: skip
    assert server.terminate() == 0
    verify_database_log(postgres_database, data_dir)
    # The embedded store and log were never made: the database holds them.
    assert not layout.decision_store.exists() and not layout.audit_dir.exists()


def test_an_unmigrated_database_is_refused_naming_the_schema(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    data_dir = tmp_path / "var"
    keys = privscore_cli(data_dir, "keys", "init")  # keys, but no `privscore db migrate`
    assert keys.returncode == 0, keys.stderr
    refused = privscore_cli(
        data_dir,
        "serve",
        "--insecure",
        "--port",
        "0",
        "--database-url",
        postgres_database.url,
        "--log-format",
        "json",
    )
    assert refused.returncode == 1
    assert "privscore db migrate" in refused.stderr and "schema" in refused.stderr
    assert "Traceback" not in refused.stderr


def adjust_at_once(
    servers: list[ServerProcess], calls: list[tuple[int, str, str]]
) -> list[limit_pb.AdjustLimitResponse]:
    """AdjustLimit calls (replica index, customer, request id), all released at one moment."""
    barrier = threading.Barrier(len(calls))

    def call(spec: tuple[int, str, str]) -> limit_pb.AdjustLimitResponse:
        index, customer, request_id = spec
        server = servers[index]
        with server.channel() as channel:
            client = server.client(channel)
            barrier.wait(timeout=20)
            return client.adjust_limit(
                "t", customer, account(), latest_score=GOOD_SCORE, request_id=request_id
            )

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(call, calls))


def test_one_request_id_sent_to_two_replicas_at_once_is_decided_once(
    postgres_database: PostgresDatabase, replicas: Callable[[int], list[ServerProcess]]
) -> None:
    servers = replicas(2)
    for round_ in range(8):
        same = (f"once-{round_}", f"r-{round_}")
        replies = adjust_at_once(servers, [(0, *same), (1, *same)])
        assert sorted(reply.replayed for reply in replies) == [False, True]
        first, second = replies
        assert first.metadata == second.metadata and first.new_limit == second.new_limit
    assert rows(postgres_database, "SELECT count(*) FROM limit_decisions") == [(8,)]
    decided = rows(
        postgres_database,
        "SELECT count(*) FROM audit_entries "
        "WHERE convert_from(envelope, 'UTF8')::jsonb #>> '{record,rpc}' LIKE '%%AdjustLimit'",
    )
    assert decided == [(8,)]


def test_two_replicas_racing_to_raise_one_customers_limit_give_one_increase(
    postgres_database: PostgresDatabase, replicas: Callable[[int], list[ServerProcess]]
) -> None:
    """Different request ids, one customer, inside the cool-down: one INCREASE, the rest
    held by the cool-down rule, whichever replica each call reached."""
    servers = replicas(2)
    for round_ in range(6):
        customer = f"race-{round_}"
        replies = adjust_at_once(servers, [(i % 2, customer, f"{customer}-{i}") for i in range(4)])
        actions = [reply.action for reply in replies]
        assert actions.count(limit_pb.LIMIT_ACTION_INCREASE) == 1, actions
        assert not any(reply.replayed for reply in replies)


def test_alerts_raised_on_every_replica_reach_every_subscriber_in_order_without_a_gap(
    postgres_database: PostgresDatabase, replicas: Callable[[int], list[ServerProcess]]
) -> None:
    servers = replicas(3)
    raisers, per_raiser = 6, 8
    total = raisers * per_raiser
    received: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(servers))}
    subscribed = threading.Barrier(len(servers) + 1)

    def subscribe(index: int) -> None:
        server = servers[index]
        with server.channel() as channel:
            stream = server.client(channel).watch_alerts(after_sequence=0, timeout=60)
            subscribed.wait(timeout=20)
            for alert in stream:
                received[index].append((alert.sequence, time.monotonic()))
                if len(received[index]) == total:
                    return

    raised_at: dict[int, float] = {}

    def raise_alerts(raiser: int) -> None:
        server = servers[raiser % len(servers)]
        with server.channel() as channel:
            client = server.client(channel)
            for n in range(per_raiser):
                reply = client.evaluate_event("t", f"alerts-{raiser}-{n}", missed_payment())
                (alert,) = reply.alerts
                raised_at[alert.sequence] = time.monotonic()

    with ThreadPoolExecutor(len(servers) + raisers) as pool:
        watchers = [pool.submit(subscribe, i) for i in range(len(servers))]
        subscribed.wait(timeout=20)
        for done in [pool.submit(raise_alerts, r) for r in range(raisers)]:
            done.result(timeout=60)
        for watcher in watchers:
            watcher.result(timeout=30)

    assert sorted(raised_at) == list(range(1, total + 1))
    for index, got in received.items():
        assert [sequence for sequence, _ in got] == list(range(1, total + 1)), index
        # Each reached every subscriber within a second of its raiser's reply.
        slowest = max(when - raised_at[sequence] for sequence, when in got)
        assert slowest < 1.0, (index, slowest)

    # A subscriber resuming on another replica from the middle gets exactly the rest.
    middle = total // 2
    server = servers[2]
    with server.channel() as channel:
        stream = server.client(channel).watch_alerts(after_sequence=middle, timeout=10)
        resumed = [next(stream).sequence for _ in range(total - middle)]
    assert resumed == list(range(middle + 1, total + 1))


def serving(server: ServerProcess) -> int:
    with server.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


def test_a_quick_open_serves_at_once_and_fails_closed_when_the_full_check_finds_damage(
    postgres_database: PostgresDatabase,
    data_dir: Path,
    replicas: Callable[[int], list[ServerProcess]],
) -> None:
    """`--audit-open-check latest` trades the check before serving for a check right after:
    a record edited under the checkpoint is found by the background pass, which fails the log
    closed (health NOT_SERVING, calls UNAVAILABLE), where `full` refuses to start."""
    (first,) = replicas(1)
    with first.channel() as channel:
        client = first.client(channel)
        for n in range(5):
            client.score("t", f"quick-{n}", applicants()[n % len(applicants())])
    assert first.terminate() == 0  # its final checkpoint covers every record
    with postgres_database.connect() as conn:
        conn.execute(
            "UPDATE audit_entries SET envelope = overlay(envelope placing 'X'::bytea from 30) "
            "WHERE sequence = 1"
        )
    with pytest.raises(AssertionError, match="exited early"):
        replica(postgres_database, data_dir)

    quick = replica(postgres_database, data_dir, "--audit-open-check", "latest")
    try:
        until(
            lambda: True if serving(quick) == health_pb2.HealthCheckResponse.NOT_SERVING else None
        )
        with quick.channel() as channel, pytest.raises(grpc.RpcError) as refused:
            quick.client(channel).score("t", "quick-late", applicants()[0])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        quick.terminate()
