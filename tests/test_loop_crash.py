"""Crashes in the window between a record and its store write, for the loop's new acts: an
alert's resolution and a subject's erasure are logged (fsynced) before the store changes; a
server killed in between finishes them at its next start, from the log."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from privscore.v1 import alert_service_pb2 as alerts_pb
from privscore.v1 import limit_service_pb2 as limits_pb
from service.audit import iter_records
from service.config import DataLayout
from tests.conftest import ServerProcess, applicants
from tests.test_closed_loop import account, cny, event

TENANT = "crash-t"
CUSTOMER = "crash-customer"


def logged(data_dir: Path, rpc_suffix: str) -> list[dict[str, Any]]:
    return [
        s.record
        for s in iter_records(DataLayout(data_dir).audit_dir)
        if str(s.record.get("rpc", "")).endswith(rpc_suffix)
        and s.record.get("outcome") != "refused"
    ]


def killed_in_the_window(server: ServerProcess, act: Callable[[], Any], rpc_suffix: str) -> None:
    """Run `act` with SQLite's write lock held elsewhere (reads pass, the store write waits),
    kill the server once `act`'s record is in the log, and check no reply left."""
    data_dir = server.data_dir
    before = len(logged(data_dir, rpc_suffix))
    blocker = sqlite3.connect(DataLayout(data_dir).decision_store, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(act())
        except grpc.RpcError as error:
            outcome.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    deadline = time.monotonic() + 20
    while len(logged(data_dir, rpc_suffix)) == before:
        assert time.monotonic() < deadline, "the act was never recorded"
        time.sleep(0.05)
    server.process.kill()
    server.process.wait()
    blocker.execute("ROLLBACK")
    blocker.close()
    caller.join(timeout=30)
    assert outcome and isinstance(outcome[0], grpc.RpcError)  # no reply left the server


def critical_alert(server: ServerProcess) -> int:
    with server.channel() as channel:
        client = server.client(channel)
        client.score(TENANT, CUSTOMER, applicants()[0])
        missed = client.evaluate_event(
            TENANT,
            CUSTOMER,
            event(
                1, missed_payment=alerts_pb.MissedPayment(amount_due=cny(5_000), days_past_due=70)
            ),
        )
    (alert,) = [a for a in missed.alerts if a.severity == alerts_pb.SEVERITY_CRITICAL]
    return alert.alert_sequence


def test_a_resolution_logged_before_a_crash_is_applied_at_the_next_start(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var")
    sequence = critical_alert(server)

    def resolve() -> Any:
        with server.channel() as channel:
            return server.client(channel).update_alert_state(
                sequence, alerts_pb.ALERT_STATE_RESOLVED, "PAYMENT_RECEIVED"
            )

    killed_in_the_window(server, resolve, "/UpdateAlertState")
    server = ServerProcess(tmp_path / "var")
    stream: list[alerts_pb.Alert] = []
    try:
        with server.channel() as channel:
            client = server.client(channel)
            decided = client.adjust_limit(TENANT, CUSTOMER, account(500_000, 0))
            for alert in client.watch_alerts(after_sequence=0, timeout=10):
                stream.append(alert)
                if alert.state == alerts_pb.ALERT_STATE_RESOLVED:
                    break
    finally:
        assert server.terminate() == 0
    assert decided.action != limits_pb.LIMIT_ACTION_FREEZE, "the resolution was lost"
    assert not decided.blocking_alerts
    assert [(a.alert_sequence, a.state) for a in stream][-1] == (
        sequence,
        alerts_pb.ALERT_STATE_RESOLVED,
    ), "the stream carries the restored change"


def test_an_erasure_logged_before_a_crash_is_finished_at_the_next_start(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var")
    critical_alert(server)

    def erase() -> Any:
        with server.channel() as channel:
            return server.client(channel).erase_subject(TENANT, customer_id=CUSTOMER)

    killed_in_the_window(server, erase, "/EraseSubject")
    server = ServerProcess(tmp_path / "var")
    try:
        with server.channel() as channel:
            document = server.client(channel).export_subject(TENANT, customer_id=CUSTOMER)
            again = server.client(channel).erase_subject(TENANT, customer_id=CUSTOMER)
    finally:
        assert server.terminate() == 0
    assert document["decisions"] == document["events"] == [] and document["open_alerts"] == []
    assert not again.erased, "the first erasure was finished at start"
