"""Three replicas on one PostgreSQL database under load, one SIGKILLed mid-load and restarted
(issue 13, "Tests on a real PostgreSQL").

Several callers (threads) drive Score, AdjustLimit and EvaluateEvent round-robin over the
replicas, each on channels of its own. A call that fails (UNAVAILABLE from the killed replica)
is sent again with the same request id to the next replica: an AdjustLimit whose reply was lost
must come back replayed if it had committed, or be decided then if it had not, and a retried
event is a duplicate. Customers are shared between callers, so replicas also race on one
customer's cool-down and event history. A WatchAlerts subscriber on a replica that is never
killed follows the alert stream from the start meanwhile.

A SIGKILL lands between a commit and its reply only by luck, so some callers reach the victim
through a relay that, just before the kill, stops passing on what the victim sends: their calls
still arrive and commit, and the replies are lost with the process. The others reach it
directly and are cut off mid-call by the kill itself.

Afterwards, with every server stopped: each acknowledged decision is in the log at the sequence
its caller got, `audit verify` passes, the log is dense and no acknowledged sequence was given
twice, every limit request and event was decided exactly once (a lost one replayed), and the
alert stream has no gap, from the start or resumed from the middle on the restarted replica.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from privscore.v1 import alert_service_pb2, limit_service_pb2
from privscore.v1.alert_service_pb2_grpc import AlertServiceStub
from service.client.channel import open_channel
from service.client.sdk import ADJUST_LIMIT_METHOD, SCORE_METHOD, PrivscoreClient
from tests.conftest import LOOPBACK, PostgresDatabase, ServerProcess, applicants
from tests.db.replicas import migrate, replica, verify_database_log
from tests.test_alerts import cny, event
from tests.test_limits import GOOD_SCORE, account

EVALUATE_EVENT_METHOD = "/privscore.v1.AlertService/EvaluateEvent"
TENANT = "kill-test"
REPLICAS = 3
KILLED = 2  # the slot whose replica is killed; the first subscriber watches slot 0
# Call i of caller n goes first to slot (n + i) % 3, and calls cycle Score, AdjustLimit,
# EvaluateEvent: so caller n's first attempts on the killed slot are all of one kind,
# (KILLED - n) % 3. Callers 0, 1 and 2 (one of each kind) reach it through the relay.
CALLERS = 5
RELAYED_CALLERS = frozenset({0, 1, 2})
CALLS_PER_CALLER = 60  # 300 calls in all
LIMIT_CUSTOMERS = 4  # shared by every caller: replicas race on their cool-downs
EVENT_CUSTOMERS = 5  # shared by every caller: replicas race on their histories
LOW_SCORE = 480  # below the policy's decrease_below_score: a decrease
CALL_TIMEOUT_S = 10.0
ATTEMPTS = 12  # per request id, each on the next slot
RETRY_PAUSE_S = 0.05
# What a caller retries: the replica is gone or went away mid-call (UNAVAILABLE), the reply
# never came (DEADLINE_EXCEEDED), or other replicas kept changing the customer (ABORTED).
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
LOAD_TIMEOUT_S = 90.0
STUCK_TIMEOUT_S = 8.0  # for the relayed callers' calls to commit behind the swallowed replies
WATCH_TIMEOUT_S = 180.0  # the subscriptions' own deadline; they are cancelled long before
ALERT_WAIT_S = 15.0


@dataclass(frozen=True)
class Reply:
    """What a caller keeps of a reply."""

    decision_id: str
    audit_sequence: int
    replayed: bool = False  # AdjustLimit
    reply: bytes = b""  # AdjustLimit: the reply's bytes
    duplicate: bool = False  # EvaluateEvent
    alert_sequences: tuple[int, ...] = ()  # EvaluateEvent


@dataclass(frozen=True)
class Ack:
    """An acknowledged call: the request, where it was answered, after how many attempts."""

    method: str
    request_id: str
    replica: int  # the slot that answered
    pid: int  # the process that answered
    attempts: int
    reply: Reply

    @property
    def decision_id(self) -> str:
        return self.reply.decision_id

    @property
    def audit_sequence(self) -> int:
        return self.reply.audit_sequence


@dataclass(frozen=True)
class Attempt:
    """A call on its way: which request, to which slot and process."""

    method: str
    request_id: str
    replica: int
    pid: int


@dataclass(frozen=True)
class Failure:
    """An attempt that got no reply, and its code."""

    attempt: Attempt
    code: grpc.StatusCode


@dataclass(frozen=True)
class LimitRequest:
    customer: str
    latest_score: int

    def send(
        self, client: PrivscoreClient, request_id: str
    ) -> limit_service_pb2.AdjustLimitResponse:
        return client.adjust_limit(
            TENANT,
            self.customer,
            account(),
            latest_score=self.latest_score,
            request_id=request_id,
            timeout=CALL_TIMEOUT_S,
        )


class Relay:
    """A TCP relay in front of one server. Once `swallow` is called it drops whatever the
    server sends: requests still reach it and are decided, their replies never leave."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = (LOOPBACK, upstream_port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self.target = f"{LOOPBACK}:{self._listener.getsockname()[1]}"
        self._swallowing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def swallow(self) -> None:
        self._swallowing.set()

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                downstream.close()  # the server is gone: so is the connection
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [downstream, upstream]
            for source, sink, replies in (
                (downstream, upstream, False),
                (upstream, downstream, True),
            ):
                threading.Thread(
                    target=self._pump, args=(source, sink, replies), name="relay-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (replies and self._swallowing.is_set()):
                    sink.sendall(data)
        except OSError:
            pass
        finally:  # one side ended: end both, as a proxy that lost a peer does
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Replicas:
    """The slots callers route to; a restarted replica takes the place of the killed one."""

    def __init__(self, servers: list[ServerProcess]) -> None:
        self._lock = threading.Lock()
        self._servers = list(servers)

    def __len__(self) -> int:
        return len(self._servers)

    def server(self, slot: int) -> ServerProcess:
        with self._lock:
            return self._servers[slot]

    def replace(self, slot: int, server: ServerProcess) -> None:
        with self._lock:
            self._servers[slot] = server


class Channels:
    """Channels opened on demand, one per server process (a restarted replica gets a new one),
    through a relay where `detours` names one for the process; all closed by `close`."""

    def __init__(self, detours: dict[int, str] | None = None) -> None:
        self._detours = detours or {}
        self._open: dict[int, tuple[grpc.Channel, PrivscoreClient]] = {}

    def client(self, server: ServerProcess) -> PrivscoreClient:
        pid = server.process.pid
        if pid not in self._open:
            channel = open_channel(self._detours.get(pid, server.target), server.data_dir)
            self._open[pid] = (channel, server.client(channel))
        return self._open[pid][1]

    def close(self) -> None:
        for channel, _ in self._open.values():
            channel.close()


class Caller(threading.Thread):
    """CALLS_PER_CALLER calls, each retried with its request id on the next slot until one
    answers. Past two thirds of its calls it waits for the killed replica's restart, so the
    restarted replica serves load as well."""

    def __init__(
        self,
        number: int,
        replicas: Replicas,
        restarted: threading.Event,
        detours: dict[int, str] | None = None,
    ) -> None:
        super().__init__(name=f"caller-{number}", daemon=True)
        self.number = number
        self._replicas = replicas
        self._restarted = restarted
        self._channels = Channels(detours)
        self.acks: list[Ack] = []
        self.failures: list[Failure] = []
        self.limit_requests: dict[str, LimitRequest] = {}
        self.in_flight: Attempt | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for index in range(CALLS_PER_CALLER):
                if index == 2 * CALLS_PER_CALLER // 3:
                    assert self._restarted.wait(LOAD_TIMEOUT_S), "the replica never restarted"
                self._call(index)
        except BaseException as error:  # noqa: BLE001 - reported by the test's thread
            self.error = error
        finally:
            self._channels.close()

    def _call(self, index: int) -> None:
        request_id = f"c{self.number}-{index}"
        method, send = self._request(index, request_id)
        for tried in range(ATTEMPTS):
            slot = (self.number + index + tried) % len(self._replicas)
            server = self._replicas.server(slot)
            attempt = Attempt(method, request_id, slot, server.process.pid)
            self.in_flight = attempt
            try:
                reply = send(self._channels.client(server))
            except grpc.RpcError as error:
                code = error.code()
                self.failures.append(Failure(attempt, code))
                if code not in RETRYABLE:
                    raise
                time.sleep(RETRY_PAUSE_S)
                continue
            finally:
                self.in_flight = None
            self.acks.append(Ack(method, request_id, slot, attempt.pid, tried + 1, reply))
            return
        raise AssertionError(f"{method} {request_id}: no replica answered in {ATTEMPTS} tries")

    def _request(
        self, index: int, request_id: str
    ) -> tuple[str, Callable[[PrivscoreClient], Reply]]:
        """Call `index` of this caller: the method, and the same request for every attempt."""
        if index % 3 == 0:
            customer = f"score-{self.number}-{index}"
            features = applicants()[(self.number * CALLS_PER_CALLER + index) % len(applicants())]

            def score(client: PrivscoreClient) -> Reply:
                meta = client.score(
                    TENANT, customer, features, request_id=request_id, timeout=CALL_TIMEOUT_S
                ).metadata
                return Reply(meta.decision_id, meta.audit_sequence)

            return SCORE_METHOD, score

        if index % 3 == 1:
            limit = LimitRequest(
                f"limit-{index % LIMIT_CUSTOMERS}", LOW_SCORE if index % 9 == 7 else GOOD_SCORE
            )
            self.limit_requests[request_id] = limit

            def adjust(client: PrivscoreClient) -> Reply:
                reply = limit.send(client, request_id)
                meta = reply.metadata
                return Reply(
                    meta.decision_id,
                    meta.audit_sequence,
                    replayed=reply.replayed,
                    reply=reply.SerializeToString(),
                )

            return ADJUST_LIMIT_METHOD, adjust

        missed = alert_service_pb2.MissedPayment(amount_due=cny(1000), days_past_due=1 + index)
        behaviour = event(index, event_id=f"ev-{request_id}", missed_payment=missed)
        customer = f"events-{index % EVENT_CUSTOMERS}"

        def evaluate(client: PrivscoreClient) -> Reply:
            reply = client.evaluate_event(
                TENANT, customer, behaviour, request_id=request_id, timeout=CALL_TIMEOUT_S
            )
            meta = reply.metadata
            return Reply(
                meta.decision_id,
                meta.audit_sequence,
                duplicate=reply.duplicate,
                alert_sequences=tuple(alert.sequence for alert in reply.alerts),
            )

        return EVALUATE_EVENT_METHOD, evaluate


class Subscriber(threading.Thread):
    """WatchAlerts on one replica after `after`: the alerts, in the order received."""

    def __init__(self, server: ServerProcess, after: int) -> None:
        super().__init__(name=f"watch-after-{after}", daemon=True)
        self._channel = server.channel()
        request = alert_service_pb2.WatchAlertsRequest(after_sequence=after)
        self._call = AlertServiceStub(self._channel).WatchAlerts(request, timeout=WATCH_TIMEOUT_S)
        self.alerts: list[alert_service_pb2.Alert] = []
        self.ended: grpc.StatusCode | None = None

    @property
    def sequences(self) -> list[int]:
        return [alert.sequence for alert in list(self.alerts)]

    def run(self) -> None:
        try:
            for response in self._call:
                self.alerts.append(response.alert)
        except grpc.RpcError as error:
            self.ended = error.code()

    def wait_for(self, count: int, timeout: float) -> list[int]:
        """The sequences once `count` have arrived, the stream ended, or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while len(self.alerts) < count and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.sequences)

    def stop(self) -> None:
        self._call.cancel()
        self.join(timeout=10)
        self._channel.close()
        assert not self.is_alive(), "the subscription did not end when cancelled"


def acknowledged(callers: list[Caller]) -> int:
    return sum(len(caller.acks) for caller in callers)


def committed(database: PostgresDatabase, request_id: str) -> bool:
    """Whether the log holds a record for `request_id` (its decision committed)."""
    with database.connect() as conn:
        row = conn.execute(
            "SELECT 1 FROM audit_entries WHERE "
            "convert_from(envelope, 'UTF8')::jsonb #>> '{record,request_id}' = %s LIMIT 1",
            (request_id,),
        ).fetchone()
    return row is not None


def stuck_behind(
    database: PostgresDatabase, callers: list[Caller], pid: int, timeout: float
) -> dict[str, Attempt]:
    """Once each caller has a call in flight to process `pid` that the log already holds (or
    `timeout` passed): those calls, by caller."""
    deadline = time.monotonic() + timeout
    stuck: dict[str, Attempt] = {}
    while len(stuck) < len(callers) and time.monotonic() < deadline:
        for caller in callers:
            attempt = caller.in_flight
            if (
                attempt is not None
                and attempt.pid == pid
                and committed(database, attempt.request_id)
            ):
                stuck[caller.name] = attempt
        time.sleep(0.02)
    return stuck


def read_log(database: PostgresDatabase) -> dict[int, dict[str, Any]]:
    """Every audit envelope by sequence, parsed (chain, MAC, record and sequence)."""
    with database.connect() as conn:
        rows = conn.execute("SELECT sequence, envelope FROM audit_entries").fetchall()
    return {int(sequence): json.loads(bytes(envelope)) for sequence, envelope in rows}


def scalar(database: PostgresDatabase, query: str) -> Any:
    with database.connect() as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_a_killed_replica_loses_no_acknowledged_decision_and_no_alert(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    database = postgres_database
    data_dir = tmp_path / "var"
    migrate(database, data_dir)
    began = time.monotonic()
    started: list[ServerProcess] = []
    relay: Relay | None = None
    try:
        for _ in range(REPLICAS):
            started.append(replica(database, data_dir))
        replicas = Replicas(started)
        victim = started[KILLED]
        relay = Relay(victim.port)
        watcher = Subscriber(started[0], after=0)
        watcher.start()
        restarted = threading.Event()
        callers = [
            Caller(
                number,
                replicas,
                restarted,
                {victim.process.pid: relay.target} if number in RELAYED_CALLERS else None,
            )
            for number in range(CALLERS)
        ]
        load_began = time.monotonic()
        for caller in callers:
            caller.start()

        # Mid-load, a third of the calls answered: the relayed callers' next calls to the
        # victim commit without a reply, while the others go on; then the victim is killed.
        total = CALLERS * CALLS_PER_CALLER
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while acknowledged(callers) < total // 3 and time.monotonic() < deadline:
            assert all(caller.error is None for caller in callers), [c.error for c in callers]
            time.sleep(0.01)
        assert acknowledged(callers) >= total // 3, "the load stalled before the kill"
        relay.swallow()
        relayed = [caller for caller in callers if caller.number in RELAYED_CALLERS]
        stuck = stuck_behind(database, relayed, victim.process.pid, STUCK_TIMEOUT_S)
        killed_after = acknowledged(callers)
        in_flight = [attempt for c in callers if (attempt := c.in_flight) is not None]
        victim.process.kill()
        assert victim.process.wait(timeout=10) < 0
        killed_at = time.monotonic()
        restarted_server = replica(database, data_dir)
        started.append(restarted_server)
        replicas.replace(KILLED, restarted_server)
        restart_s = time.monotonic() - killed_at
        restarted.set()

        for caller in callers:
            caller.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        assert not any(caller.is_alive() for caller in callers), "the load did not finish"
        load_s = time.monotonic() - load_began
        for caller in callers:
            if caller.error is not None:
                raise caller.error
        acks = [ack for caller in callers for ack in caller.acks]
        failures = [failure for caller in callers for failure in caller.failures]
        limit_requests = {
            request_id: request
            for caller in callers
            for request_id, request in caller.limit_requests.items()
        }
        assert len(acks) == total

        # The alert stream from the start, then resumed from its middle on the restarted
        # replica (which holds none of it in memory): every alert, once, in order.
        last_alert = int(scalar(database, "SELECT last_sequence FROM alerts_sequencing"))
        watched = watcher.wait_for(last_alert, ALERT_WAIT_S)
        watcher.stop()
        middle = last_alert // 2
        resumer = Subscriber(restarted_server, after=middle)
        resumer.start()
        resumed = resumer.wait_for(last_alert - middle, ALERT_WAIT_S)
        time.sleep(0.5)  # and nothing after: no alert is raised any more
        resumed_all = list(resumer.sequences)
        resumer.stop()

        # Every limit request sent again, to another slot than the one that answered it: the
        # decision its caller got, replayed.
        replays: dict[str, limit_service_pb2.AdjustLimitResponse] = {}
        channels = Channels()
        try:
            for ack in acks:
                if ack.method == ADJUST_LIMIT_METHOD:
                    client = channels.client(replicas.server((ack.replica + 1) % REPLICAS))
                    request = limit_requests[ack.request_id]
                    replays[ack.request_id] = request.send(client, ack.request_id)
        finally:
            channels.close()

        running = [server for server in started if server is not victim]
        assert [server.terminate() for server in running] == [0] * REPLICAS
    finally:
        if relay is not None:
            relay.close()
        for server in started:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(timeout=10)

    # -- the load was what it meant to be: the kill cut calls off, and the load went on -----
    assert {failure.code for failure in failures} <= RETRYABLE
    on_victim = [f for f in failures if f.attempt.pid == victim.process.pid]
    assert on_victim, "no call failed on the killed replica"
    assert sorted(stuck) == sorted(c.name for c in relayed), (
        "not every relayed caller had a committed call waiting for its reply at the kill",
        stuck,
    )
    assert {attempt.method for attempt in stuck.values()} == {
        SCORE_METHOD,
        ADJUST_LIMIT_METHOD,
        EVALUATE_EVENT_METHOD,
    }
    restarted_acks = [ack for ack in acks if ack.pid == restarted_server.process.pid]
    assert restarted_acks, "the restarted replica answered no call"
    by_request = {ack.request_id: ack for ack in acks}
    assert len(by_request) == len(acks)

    # -- every acknowledged decision is in the log at the sequence its caller got -----------
    log = read_log(database)
    assert sorted(log) == list(range(len(log)))  # dense from 0
    assert scalar(database, "SELECT count(*) FROM audit_entries") == len(log)
    assert scalar(database, "SELECT size FROM audit_log_state") == len(log)
    for ack in acks:
        envelope = log.get(ack.audit_sequence)
        assert envelope is not None, f"{ack.request_id}: sequence {ack.audit_sequence} missing"
        assert envelope["seq"] == ack.audit_sequence
        record = envelope["record"]
        assert (record["rpc"], record["decision_id"], record["request_id"]) == (
            ack.method,
            ack.decision_id,
            ack.request_id,
        ), f"{ack.request_id}: the record at {ack.audit_sequence} is another decision's"
    given_twice = [s for s, n in Counter(a.audit_sequence for a in acks).items() if n > 1]
    assert given_twice == []
    assert len({ack.decision_id for ack in acks}) == len(acks)

    # -- idempotency: one decision per limit request id, which every replay answers ---------
    decided: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for sequence, envelope in log.items():
        record = envelope["record"]
        if "rpc" in record and record.get("outcome") != "refused":
            decided[(record["rpc"], record["request_id"])].append((sequence, record))
    limit_acks = [ack for ack in acks if ack.method == ADJUST_LIMIT_METHOD]
    with database.connect() as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM limit_decisions WHERE tenant = %s "
            "GROUP BY request_id",
            (TENANT,),
        ).fetchall()
        increases = conn.execute(
            "SELECT pseudonym, count(*) FROM limit_decisions "
            "WHERE tenant = %s AND action = 'INCREASE' GROUP BY pseudonym",
            (TENANT,),
        ).fetchall()
    assert dict(rows) == {ack.request_id: 1 for ack in limit_acks}
    for ack in limit_acks:
        logged = decided[(ADJUST_LIMIT_METHOD, ack.request_id)]
        assert len(logged) == 1, f"{ack.request_id}: decided {len(logged)} times"
        [(sequence, record)] = logged
        assert (record["decision_id"], sequence) == (ack.decision_id, ack.audit_sequence)
        replay = replays[ack.request_id]
        assert replay.replayed, f"{ack.request_id}: asked again, decided again"
        original = limit_service_pb2.AdjustLimitResponse.FromString(ack.reply.reply)
        original.replayed = replay.replayed = False
        assert replay == original, f"{ack.request_id}: the replay is another reply"
    # Replicas racing on a customer's cool-down raised each customer's limit at most once.
    assert increases and all(count == 1 for _, count in increases), increases

    # -- events evaluated once each, each raising its one alert once ------------------------
    event_acks = [ack for ack in acks if ack.method == EVALUATE_EVENT_METHOD]
    for ack in event_acks:
        logged = decided[(EVALUATE_EVENT_METHOD, ack.request_id)]
        first = [record for _, record in logged if not record["outputs"]["duplicate"]]
        assert len(first) == 1, f"{ack.request_id}: the event was evaluated {len(first)} times"
        assert ack.reply.duplicate or len(ack.reply.alert_sequences) == 1
    assert scalar(database, "SELECT count(*) FROM events") == len(event_acks)

    # -- what committed behind a lost reply came back as it was decided --------------------
    for attempt in stuck.values():
        ack = by_request[attempt.request_id]
        assert ack.attempts > 1 and ack.pid != victim.process.pid
        if attempt.method == ADJUST_LIMIT_METHOD:
            assert ack.reply.replayed, f"{ack.request_id}: committed, lost, then decided again"
        if attempt.method == EVALUATE_EVENT_METHOD:
            assert ack.reply.duplicate, f"{ack.request_id}: committed, lost, evaluated again"

    # -- the alert stream has no gap ---------------------------------------------------------
    assert last_alert == len(event_acks)  # one alert per event, none raised twice
    assert scalar(database, "SELECT count(*) FROM alerts") == last_alert
    assert watched == list(range(1, last_alert + 1)), (watcher.ended, watched)
    got = {sequence for ack in event_acks for sequence in ack.reply.alert_sequences}
    assert got <= set(watched)
    assert resumed == list(range(middle + 1, last_alert + 1)), (resumer.ended, resumed)
    assert resumed_all == resumed
    # Each alert as every replica streams it (from its own memory or the database), naming
    # the evaluation that raised it: in the log at its audit sequence, not a duplicate.
    assert resumer.alerts == watcher.alerts[middle:]
    raised_by: Counter[str] = Counter()
    for alert in watcher.alerts:
        meta = alert.metadata
        record = log[meta.audit_sequence]["record"]
        assert (record["rpc"], record["decision_id"], record["request_id"]) == (
            EVALUATE_EVENT_METHOD,
            meta.decision_id,
            meta.request_id,
        ), f"alert {alert.sequence}: its decision is not at audit sequence {meta.audit_sequence}"
        assert not record["outputs"]["duplicate"]
        assert record["event"]["event_id"] == alert.event_id == f"ev-{meta.request_id}"
        raised_by[meta.request_id] += 1
    assert raised_by == Counter({ack.request_id: 1 for ack in event_acks})

    verify_database_log(database, data_dir)

    replayed = [ack for ack in limit_acks if ack.reply.replayed]
    print(
        f"\n{len(acks)} calls in {load_s:.1f}s on {REPLICAS} replicas; slot {KILLED} killed "
        f"after {killed_after} acknowledged, {len(in_flight)} calls in flight "
        f"({len(stuck)} committed behind lost replies), back in {restart_s:.1f}s; "
        f"{len(failures)} failed attempts, {len(on_victim)} on the killed replica "
        f"({dict(Counter(f.code.name for f in on_victim))}); {len(replayed)} limit replies "
        f"replayed; {len(restarted_acks)} calls answered by the restarted replica; log "
        f"{len(log)} records for {len(acks)} acknowledged calls, {last_alert} alerts; "
        f"{time.monotonic() - began:.1f}s in all"
    )
