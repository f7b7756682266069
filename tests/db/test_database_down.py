"""The database goes away under a running server and comes back (issue 13): health turns
NOT_SERVING, calls answer UNAVAILABLE with a clear message before their deadline, nothing
acknowledged is lost, and the server serves again by itself, without a restart.

A TCP proxy (tests/db/proxy.py) stands between the server and PostgreSQL, which other tests
share: cutting the proxy takes the database from this server alone. The test migrates and
reads the database directly, never through the proxy.

Once the server knows the database is down (health NOT_SERVING), calls that need it are
refused at once: the ledger and the audit log do not wait for a connection in vain. Calls in
flight when it goes wait at most the pool's wait (service/server_pg.py POOL_WAIT_SECONDS).
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from privscore.v1 import alert_service_pb2
from privscore.v1 import limit_service_pb2 as limit_pb
from service.client.probe import health_status
from service.client.sdk import PrivscoreClient, new_request_id
from service.server import SERVICE_NAMES
from tests.conftest import PostgresDatabase, ServerProcess, applicants
from tests.db.proxy import TcpProxy
from tests.db.replicas import CHECKPOINT_SECONDS, migrate, verify_database_log
from tests.test_alerts import cny, event
from tests.test_limits import account
from tests.test_server import error_reason

GOOD_SCORE = 800
TENANT = "t"
CALL_TIMEOUT_S = 8.0  # every call's deadline: a refusal must come clearly before it
REFUSED_AT_ONCE_S = 1.5  # a call made while health is NOT_SERVING is refused within this
DOWN_WITHIN_S = 10.0  # health turns NOT_SERVING within this of the cut
BACK_WITHIN_S = 15.0  # ... and SERVING again within this of the restore
REFUSAL_REASONS = ("DATABASE_UNAVAILABLE", "AUDIT_UNAVAILABLE")


@dataclass(frozen=True)
class Acknowledged:
    """A decision the server answered, and where its caller was told it is in the log."""

    rpc: str
    request_id: str
    decision_id: str
    sequence: int
    at: float = 0.0  # time.monotonic() when the reply came


@dataclass(frozen=True)
class Refused:
    """A call that failed, and how."""

    rpc: str
    request_id: str
    customer: str
    code: grpc.StatusCode
    reason: str
    message: str
    seconds: float
    at: float  # time.monotonic() when the call was made


@dataclass(frozen=True)
class Served:
    server: ServerProcess
    password: str | None  # the database password the server was given, to look for in output


def proxied(url: str, port: int) -> str:
    """`url` with the proxy's host and port (user, database and parameters kept)."""
    parts = urllib.parse.urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{port}").geturl()


def accepts_password(database: PostgresDatabase, password: str) -> bool:
    """Whether PostgreSQL lets us in with `password` (trust authentication ignores it)."""
    import psycopg

    try:
        with psycopg.connect(**{**database.kwargs, "password": password}, connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` until it holds; the seconds that took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


def health(server: ServerProcess, name: str = "") -> str:
    with server.channel() as channel:
        try:
            return health_status(channel, name, timeout=2.0)
        except grpc.RpcError as error:
            return f"health check failed: {error.code().name}"


def refusal(rpc: str, request_id: str, customer: str, error: grpc.RpcError, at: float) -> Refused:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return Refused(
        rpc,
        request_id,
        customer,
        error.code(),
        error_reason(error) if status is not None else "(no status details)",
        str(error.details()),
        time.monotonic() - at,
        at,
    )


def check_refusal(failure: Refused, password: str | None) -> None:
    """UNAVAILABLE, saying the database or the audit log is at fault, before the deadline,
    and without the password."""
    assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
    assert failure.reason in REFUSAL_REASONS, failure
    assert "database" in failure.message or "audit log" in failure.message, failure
    assert failure.seconds < CALL_TIMEOUT_S - 0.5, failure
    if password is not None:
        assert password not in failure.message, failure


def logged_records(database: PostgresDatabase) -> dict[int, dict[str, Any]]:
    """Every record of the database's log, by sequence."""
    with database.connect() as conn:
        rows = conn.execute("SELECT sequence, envelope FROM audit_entries").fetchall()
    return {int(sequence): json.loads(bytes(envelope))["record"] for sequence, envelope in rows}


def decisions_by_request(logged: dict[int, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The log's decision records (refusal records left out) by request id."""
    found: dict[str, list[dict[str, Any]]] = {}
    for record in logged.values():
        if record.get("outcome") != "refused":
            found.setdefault(str(record.get("request_id")), []).append(record)
    return found


def check_acknowledged(logged: dict[int, dict[str, Any]], acknowledged: list[Acknowledged]) -> None:
    """Each acknowledged decision is the record at the sequence its caller got."""
    for decision in acknowledged:
        record = logged.get(decision.sequence)
        assert record is not None, f"acknowledged {decision} is not in the log"
        assert record["decision_id"] == decision.decision_id, decision
        assert record["request_id"] == decision.request_id, decision
        assert record["rpc"].endswith("/" + decision.rpc), decision
    assert len({decision.sequence for decision in acknowledged}) == len(acknowledged)


def check_server_log(served: Served) -> None:
    events = {record.get("event") for record in served.server.records()}
    # Down: seen by the health watch, or first by a failed audit write; back: by the watch.
    assert events & {"server.database_down", "audit.write_failed"}
    assert "server.database_back" in events
    if served.password is not None:
        assert not any(served.password in line for line in served.server.lines)


@pytest.fixture
def proxy(postgres_database: PostgresDatabase) -> Iterator[TcpProxy]:
    kwargs = postgres_database.kwargs
    host = str(kwargs.get("host") or "127.0.0.1")
    if host.startswith("/"):
        pytest.skip("the test database is reached over a Unix socket: no TCP to proxy")
    with TcpProxy(host, int(kwargs.get("port") or 5432)) as running:
        yield running


@pytest.fixture
def served(
    postgres_database: PostgresDatabase, proxy: TcpProxy, tmp_path: Path
) -> Iterator[Served]:
    """A server on the migrated test database through `proxy`; with a (fake) password when
    the database accepts one, so the test can look for it where it must not be."""
    data_dir = tmp_path / "var"
    migrate(postgres_database, data_dir)
    env: dict[str, str] = {}
    password = postgres_database.kwargs.password
    if password is None:
        fake = f"pw-{secrets.token_hex(8)}"
        if accepts_password(postgres_database, fake):
            env["PRIVSCORE_DATABASE_PASSWORD"] = password = fake
    server = ServerProcess(
        data_dir,
        "--database-url",
        proxied(postgres_database.url, proxy.port),
        "--audit-checkpoint-seconds",
        CHECKPOINT_SECONDS,
        env=env,
    )
    try:
        yield Served(server, password)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


class Calls:
    """The three deciding RPCs with a deadline, keeping what was acknowledged."""

    def __init__(self, client: PrivscoreClient) -> None:
        self.client = client
        self.acknowledged: list[Acknowledged] = []

    def _keep(self, rpc: str, request_id: str, metadata: Any) -> None:
        self.acknowledged.append(
            Acknowledged(
                rpc, request_id, metadata.decision_id, metadata.audit_sequence, time.monotonic()
            )
        )

    def score(self, customer: str, request_id: str) -> None:
        reply = self.client.score(
            TENANT, customer, applicants()[0], request_id=request_id, timeout=CALL_TIMEOUT_S
        )
        self._keep("Score", request_id, reply.metadata)

    def adjust(self, customer: str, request_id: str) -> limit_pb.AdjustLimitResponse:
        reply = self.client.adjust_limit(
            TENANT,
            customer,
            account(),
            latest_score=GOOD_SCORE,
            request_id=request_id,
            timeout=CALL_TIMEOUT_S,
        )
        if not reply.replayed:
            self._keep("AdjustLimit", request_id, reply.metadata)
        return reply

    def evaluate(self, customer: str, request_id: str) -> None:
        missed = alert_service_pb2.MissedPayment(amount_due=cny(5000), days_past_due=45)
        reply = self.client.evaluate_event(
            TENANT,
            customer,
            event(0, missed_payment=missed),
            request_id=request_id,
            timeout=CALL_TIMEOUT_S,
        )
        self._keep("EvaluateEvent", request_id, reply.metadata)


def test_database_down_turns_health_not_serving_refuses_calls_and_recovers_by_itself(
    postgres_database: PostgresDatabase, proxy: TcpProxy, served: Served
) -> None:
    server = served.server

    # 1. Decisions acknowledged through the proxy.
    assert health(server) == "SERVING"
    before = [new_request_id() for _ in range(3)]
    with server.channel() as channel:
        calls = Calls(server.client(channel))
        calls.score("down-1", new_request_id())
        limit_before = calls.adjust("down-1", before[0])
        calls.adjust("down-2", before[1])
        calls.evaluate("down-3", before[2])
        calls.score("down-4", new_request_id())
    assert not limit_before.replayed and len(calls.acknowledged) == 5
    assert proxy.accepted > 0  # the server's connections do pass through the proxy

    # 2. The database goes: health follows; calls are refused clearly and before their deadline.
    proxy.cut()
    cut_at = time.monotonic()
    went_down = until(lambda: health(server) == "NOT_SERVING", DOWN_WITHIN_S, "NOT_SERVING")
    for name in SERVICE_NAMES:
        assert health(server, name) == "NOT_SERVING", name
    outage = {rpc: new_request_id() for rpc in ("Score", "AdjustLimit", "EvaluateEvent")}

    def during(which: tuple[str, str]) -> Refused:
        rpc, request_id = which
        # A customer each: calls on one customer wait for each other (see the module doc).
        customer = {before[0]: "down-1", outage["AdjustLimit"]: "down-5"}.get(
            request_id, f"down-{rpc}"
        )
        # Without the channel's retries: what is timed is the server's own refusal.
        with server.channel(retries=False) as channel:
            attempt = Calls(server.client(channel))
            call = {"Score": attempt.score, "AdjustLimit": attempt.adjust}.get(
                rpc, attempt.evaluate
            )
            started = time.monotonic()
            try:
                call(customer, request_id)
            except grpc.RpcError as error:
                return refusal(rpc, request_id, customer, error, started)
        raise AssertionError(f"{rpc} succeeded with the database down")

    # At once, and with the request decided before the outage asked again (its replay reads
    # the database too).
    with ThreadPoolExecutor(4) as pool:
        refusals = list(pool.map(during, [*outage.items(), ("AdjustLimit", before[0])]))
    for failure in refusals:
        check_refusal(failure, served.password)
        assert failure.seconds < REFUSED_AT_ONCE_S, failure  # known down: no waiting
    assert health(server) == "NOT_SERVING"
    assert server.process.poll() is None, "the server exited while the database was down"
    down_for = time.monotonic() - cut_at

    # 3. The database comes back: the server serves again by itself.
    proxy.restore()
    came_back = until(lambda: health(server) == "SERVING", BACK_WITHIN_S, "SERVING again")
    for name in SERVICE_NAMES:
        assert health(server, name) == "SERVING", name
    with server.channel() as channel:
        after = Calls(server.client(channel))
        retried = after.adjust("down-5", outage["AdjustLimit"])  # refused before: decided now
        again = after.adjust("down-5", outage["AdjustLimit"])
        replayed = after.adjust("down-1", before[0])  # decided before the outage
        after.score("down-7", new_request_id())
        after.evaluate("down-8", new_request_id())
    assert not retried.replayed
    assert again.replayed and again.metadata == retried.metadata
    assert replayed.replayed and replayed.metadata == limit_before.metadata
    assert server.process.poll() is None

    # 4. A graceful stop: every acknowledged decision is in the log where its caller was told;
    # the calls refused during the outage left no decision; the retried one was decided once.
    assert server.terminate() == 0
    logged = logged_records(postgres_database)
    acknowledged = calls.acknowledged + after.acknowledged
    assert len(acknowledged) == 8
    check_acknowledged(logged, acknowledged)
    decided = decisions_by_request(logged)
    assert outage["Score"] not in decided and outage["EvaluateEvent"] not in decided
    assert [r["decision_id"] for r in decided[outage["AdjustLimit"]]] == [
        retried.metadata.decision_id
    ]
    assert [r["decision_id"] for r in decided[before[0]]] == [limit_before.metadata.decision_id]
    verify_database_log(postgres_database, server.data_dir)
    check_server_log(served)
    print(
        f"NOT_SERVING {went_down:.1f} s after the cut; down {down_for:.1f} s; SERVING again "
        f"{came_back:.1f} s after the restore; refusals took "
        f"{', '.join(f'{failure.seconds:.1f}' for failure in refusals)} s"
    )


def test_calls_in_flight_when_the_database_goes_are_answered_or_refused_and_none_is_lost(
    postgres_database: PostgresDatabase, proxy: TcpProxy, served: Served
) -> None:
    server = served.server
    lock = threading.Lock()
    acknowledged: list[Acknowledged] = []
    refusals: list[Refused] = []
    stop = threading.Event()

    def caller(number: int) -> None:
        """Score and AdjustLimit, alternately, until told to stop."""
        with server.channel() as channel:
            calls = Calls(server.client(channel))
            for turn in itertools.count():
                if stop.is_set():
                    break
                rpc = "Score" if turn % 2 else "AdjustLimit"
                customer, request_id = f"flight-{number}-{turn}", new_request_id()
                started = time.monotonic()
                try:
                    (calls.score if rpc == "Score" else calls.adjust)(customer, request_id)
                except grpc.RpcError as error:
                    with lock:
                        refusals.append(refusal(rpc, request_id, customer, error, started))
                    time.sleep(0.05)
        with lock:
            acknowledged.extend(calls.acknowledged)

    callers = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(8)]
    for thread in callers:
        thread.start()
    try:
        time.sleep(1.5)
        proxy.cut()  # under load: transactions and reads in flight lose their connections
        cut_at = time.monotonic()
        until(lambda: health(server) == "NOT_SERVING", DOWN_WITHIN_S, "NOT_SERVING")
        # Back well within the pool's wait: calls waiting for a connection then go on, and none
        # waits out two waits in the audit writer's queue (see the module doc).
        time.sleep(1.0)
        proxy.restore()
        until(lambda: health(server) == "SERVING", BACK_WITHIN_S, "SERVING again")
        back_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in callers:
            thread.join(timeout=CALL_TIMEOUT_S + 5)
    assert not any(thread.is_alive() for thread in callers)
    assert server.process.poll() is None, "the server exited while the database was down"

    assert any(a.at < cut_at for a in acknowledged) and any(a.at > back_at for a in acknowledged)
    assert refusals, "no call was refused while the database was down"
    for failure in refusals:
        check_refusal(failure, served.password)
        assert failure.at < back_at, f"a call made once SERVING again was refused: {failure}"

    # The AdjustLimit requests refused, retried now: each is decided (or, if its commit's
    # outcome was unknown and it did commit, replayed).
    with server.channel() as channel:
        retry = Calls(server.client(channel))
        retried = {
            failure.request_id: retry.adjust(failure.customer, failure.request_id)
            for failure in refusals
            if failure.rpc == "AdjustLimit"
        }

    assert server.terminate() == 0
    logged = logged_records(postgres_database)
    check_acknowledged(logged, acknowledged + retry.acknowledged)
    decided = decisions_by_request(logged)
    for request_id, reply in retried.items():
        (record,) = decided[request_id]  # decided once
        assert record["decision_id"] == reply.metadata.decision_id
    unknown = any(r.get("outcome") == "outcome unknown" for r in server.records())
    for failure in refusals:
        if failure.rpc == "Score" and failure.request_id in decided:
            assert unknown, f"refused {failure} left a decision though its commit failed before"
    verify_database_log(postgres_database, server.data_dir)
    check_server_log(served)
    slowest = max(failure.seconds for failure in refusals)
    print(
        f"{len(acknowledged)} acknowledged, {len(refusals)} refused (slowest {slowest:.1f} s), "
        f"{len(retried)} AdjustLimit retried"
    )
