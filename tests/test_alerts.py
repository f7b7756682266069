"""EvaluateEvent and WatchAlerts end to end: each rule firing and not, event time, duplicates,
streaming with severity filters, and resuming from a cursor across a restart."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from privscore.v1 import alert_service_pb2 as pb
from privscore.v1 import common_pb2
from privscore.v1.alert_service_pb2_grpc import AlertServiceStub
from service.client.sdk import PrivscoreClient
from tests.conftest import ServerProcess

BASE = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)
_ids = itertools.count()


def at(minutes: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(BASE + dt.timedelta(minutes=minutes))
    return stamp


def cny(minor_units: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="CNY", minor_units=minor_units)


def event(
    minutes: float, event_id: str | None = None, balance: int | None = None, **kind: Message
) -> pb.BehaviourEvent:
    """An event at `minutes` after BASE; `kind` names its one detail, e.g. purchase=..."""
    message = pb.BehaviourEvent(event_id=event_id or f"e{next(_ids)}", occurred_at=at(minutes))
    for name, detail in kind.items():
        getattr(message, name).CopyFrom(detail)
    if balance is not None:
        message.balance_after.CopyFrom(cny(balance))
    return message


def purchase(minutes: float, amount: int = 10_000, **extra: Any) -> pb.BehaviourEvent:
    return event(minutes, purchase=pb.Purchase(amount=cny(amount)), **extra)


def rules(response: pb.EvaluateEventResponse) -> list[str]:
    return [alert.rule for alert in response.alerts]


def send(client: PrivscoreClient, customer: str, *events: pb.BehaviourEvent) -> list[list[str]]:
    return [rules(client.evaluate_event("t", customer, e)) for e in events]


def test_missed_payments_raise_the_highest_overdue_bucket(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        responses = [
            client.evaluate_event(
                "t",
                "overdue-1",
                event(0, missed_payment=pb.MissedPayment(amount_due=cny(5000), days_past_due=dpd)),
            )
            for dpd in (5, 45, 90)
        ]
    outcomes = [
        (r.alerts[0].rule, r.alerts[0].severity, r.alerts[0].recommended_action) for r in responses
    ]
    assert outcomes == [
        ("overdue.dpd_1", pb.SEVERITY_LOW, pb.RECOMMENDED_ACTION_REVIEW),
        ("overdue.dpd_30", pb.SEVERITY_HIGH, pb.RECOMMENDED_ACTION_REDUCE_LIMIT),
        ("overdue.dpd_60", pb.SEVERITY_CRITICAL, pb.RECOMMENDED_ACTION_FREEZE),
    ]
    alert = responses[0].alerts[0]
    assert alert.sequence > 0 and alert.event_id and alert.metadata.decision_id
    assert alert.metadata.audit_sequence == responses[0].metadata.audit_sequence


def test_velocity_fires_on_the_sixth_purchase_within_an_hour(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        quiet = send(client, "velocity-1", *(purchase(m) for m in (0, 10, 20, 30, 40)))
        burst = send(client, "velocity-1", purchase(50))
        spread = send(client, "velocity-2", *(purchase(m * 30) for m in range(8)))
    assert quiet == [[]] * 5
    assert burst == [["velocity.purchases"]]
    assert spread == [[]] * 8


def test_a_late_event_is_judged_at_its_own_time(shared_server: ServerProcess) -> None:
    """Five purchases in an hour, then one that happened in the middle of them arrives late:
    the burst is complete at event time, whatever the arrival order."""
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        arrivals = send(client, "late-1", *(purchase(m) for m in (50, 0, 40, 10, 30)))
        late = send(client, "late-1", purchase(20))
        # An event from the day before touches no window of those purchases.
        old = send(client, "late-1", purchase(-24 * 60))
    assert arrivals == [[]] * 5
    assert late == [["velocity.purchases"]]
    assert old == [[]]


def test_spending_spike_against_the_customers_own_mean(shared_server: ServerProcess) -> None:
    day = 24 * 60
    history = [purchase(d * day, amount=10_000) for d in range(5)]
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        send(client, "spike-1", *history)
        normal = send(client, "spike-1", purchase(6 * day, amount=25_000))
        spike = send(client, "spike-1", purchase(7 * day, amount=40_000))
        too_new = send(client, "spike-2", purchase(0, amount=10_000), purchase(day, amount=90_000))
    assert normal == [[]]
    assert spike == [["spending.spike"]]
    assert too_new == [[], []]  # fewer than min_history purchases to compare with


def test_utilisation_jump(shared_server: ServerProcess) -> None:
    limit = event(0, limit_change=pb.LimitChange(new_limit=cny(1_000_000)))
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        send(client, "util-1", limit, purchase(10, balance=100_000))
        small = send(client, "util-1", purchase(60, balance=300_000))
        jump = send(client, "util-1", purchase(120, amount=450_000, balance=750_000))
    assert small == [[]]  # 10% -> 30%
    assert jump == [["utilisation.jump"]]  # 30% -> 75%


def test_repeated_failed_repayments_within_the_window(shared_server: ServerProcess) -> None:
    def failed(minutes: float) -> pb.BehaviourEvent:
        return event(
            minutes,
            repayment=pb.Repayment(amount=cny(20_000), outcome=pb.REPAYMENT_OUTCOME_FAILED),
        )

    def paid(minutes: float) -> pb.BehaviourEvent:
        return event(
            minutes,
            repayment=pb.Repayment(amount=cny(20_000), outcome=pb.REPAYMENT_OUTCOME_SUCCEEDED),
        )

    day = 24 * 60
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        first_two = send(client, "fail-1", failed(0), paid(day), failed(2 * day))
        third = send(client, "fail-1", failed(3 * day))
        spread = send(client, "fail-2", failed(0), failed(8 * day), failed(16 * day))
    assert first_two == [[], [], []]
    assert third == [["repayments.repeated_failures"]]
    assert spread == [[], [], []]


def test_duplicate_event_ids_are_ignored(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        send(client, "dup-1", *(purchase(m, event_id=f"dup-{m}") for m in (0, 10, 20, 30, 40)))
        repeats = [
            client.evaluate_event("t", "dup-1", purchase(40, event_id="dup-40")) for _ in range(3)
        ]
        sixth = send(client, "dup-1", purchase(45))
        login = send(client, "dup-1", event(46, login=pb.Login(new_device=True)))
    assert all(r.duplicate and not r.alerts for r in repeats)
    assert all(r.metadata.decision_id for r in repeats)  # still a recorded decision
    assert sixth == [["velocity.purchases"]]  # the repeats did not count as purchases
    assert login == [[]]


def test_watch_alerts_filters_by_severity_and_resumes_after_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    received: list[pb.Alert] = []
    try:
        with server.channel() as channel:
            client = server.client(channel)
            high_only = client.watch_alerts(min_severity=pb.SEVERITY_HIGH, timeout=20)
            reader = threading.Thread(
                target=lambda: received.extend(itertools.islice(high_only, 2))
            )
            reader.start()
            sequences = []
            for dpd in (5, 45, 10, 90):
                response = client.evaluate_event(
                    "t",
                    "watch-1",
                    event(
                        0, missed_payment=pb.MissedPayment(amount_due=cny(1000), days_past_due=dpd)
                    ),
                )
                sequences.append(response.alerts[0].sequence)
            reader.join(timeout=20)
    finally:
        assert server.terminate() == 0
    assert [a.sequence for a in received] == [sequences[1], sequences[3]]
    assert [a.severity for a in received] == [pb.SEVERITY_HIGH, pb.SEVERITY_CRITICAL]

    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            resumed = list(
                itertools.islice(client.watch_alerts(after_sequence=sequences[0], timeout=20), 3)
            )
    finally:
        assert server.terminate() == 0
    assert [a.sequence for a in resumed] == sequences[1:]
    assert resumed[2] == received[1]


def test_a_subscriber_that_never_reads_does_not_block_decisions(
    shared_server: ServerProcess,
) -> None:
    with shared_server.channel() as watch_channel, shared_server.channel() as channel:
        stalled = AlertServiceStub(watch_channel).WatchAlerts(pb.WatchAlertsRequest(), timeout=60)
        client = shared_server.client(channel)
        responses = [
            client.evaluate_event(
                "t",
                f"flood-{i}",
                event(0, missed_payment=pb.MissedPayment(amount_due=cny(1000), days_past_due=99)),
                timeout=10,
            )
            for i in range(150)
        ]
        stalled.cancel()
    assert all(r.alerts[0].rule == "overdue.dpd_60" for r in responses)


def test_rolling_state_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            before = send(
                server.client(channel), "restart-1", *(purchase(m) for m in (0, 10, 20, 30, 40))
            )
    finally:
        assert server.terminate() == 0
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            after = send(client, "restart-1", purchase(50))
            repeat = client.evaluate_event("t", "restart-1", purchase(55, event_id="e-dup"))
            again = client.evaluate_event("t", "restart-1", purchase(55, event_id="e-dup"))
    finally:
        assert server.terminate() == 0
    assert before == [[]] * 5
    assert after == [["velocity.purchases"]]
    assert not repeat.duplicate and again.duplicate
