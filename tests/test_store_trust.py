"""The decision store against the audit log on a real server, attacked as someone with write
access to the data directory would, and crashed in the window between a decision's audit
append and its store commit. The log is the source of truth: a lost row is rebuilt from it, a
row it does not record stops the start, an edited row refuses the call (or the start)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from privscore.v1 import common_pb2, limit_service_pb2
from service.api.limits import legacy_fingerprint
from service.audit import iter_records
from service.config import DataLayout
from service.decisions.store import DecisionStore
from service.privacy.digest import derive_input_digest_key, derive_state_key, input_digest
from service.privacy.keyring import Keyring, load_kek
from tests.audit.test_record_schema import validate
from tests.conftest import ServerProcess, privscore_cli
from tests.test_alerts import cny, event
from tests.test_audit_sealed_amounts import personal
from tests.test_audit_trust import refused, run_decisions
from tests.test_limits import GOOD_SCORE, account
from tests.test_model_serving import serve_once
from tests.test_server import error_reason

ADJUST_LIMIT = "/privscore.v1.LimitService/AdjustLimit"
RECONCILE = "privscore.store/Reconcile"


def store_verify(data_dir: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    result = privscore_cli(data_dir, "store", "verify", *flags)
    return result.returncode, json.loads(result.stdout)


def limit_records(data_dir: Path, request_id: str) -> list[dict[str, Any]]:
    return [
        r.record
        for r in iter_records(DataLayout(data_dir).audit_dir)
        if r.record.get("rpc") == ADJUST_LIMIT and r.record.get("request_id") == request_id
    ]


def reconcile_records(data_dir: Path) -> list[dict[str, Any]]:
    """The start-up reconciliation's records, each one of the schema's kinds."""
    found = [
        r.record
        for r in iter_records(DataLayout(data_dir).audit_dir)
        if r.record.get("rpc") == RECONCILE
    ]
    assert [validate(record) for record in found] == ["reconcile"] * len(found)
    return found


def sql(data_dir: Path, statement: str, *parameters: object) -> None:
    with sqlite3.connect(DataLayout(data_dir).decision_store) as db:
        db.execute(statement, parameters)


def adjust(server: ServerProcess, request_id: str, customer: str = "c-1") -> Any:
    with server.channel() as channel:
        return server.client(channel).adjust_limit(
            "t", customer, account(), latest_score=GOOD_SCORE, request_id=request_id
        )


def test_a_deleted_limit_decision_is_rebuilt_and_its_request_id_replays(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    first = adjust(server, "req-1")
    assert server.terminate() == 0
    sql(data_dir, "DELETE FROM limit_decisions")  # the attack: forget the decision was made

    server = ServerProcess(data_dir)
    try:
        again = adjust(server, "req-1")
    finally:
        assert server.terminate() == 0
    assert again.replayed and again.metadata.decision_id == first.metadata.decision_id
    assert again.new_limit == first.new_limit
    assert len(limit_records(data_dir, "req-1")) == 1  # decided once, recorded once
    [reconciled] = reconcile_records(data_dir)
    assert reconciled["outcome"] == "restored" and reconciled["rows"] == 1
    assert store_verify(data_dir)[0] == 0


def test_deleted_events_and_alerts_are_rebuilt(tmp_path: Path) -> None:
    from privscore.v1 import alert_service_pb2

    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    missed = alert_service_pb2.MissedPayment(amount_due=cny(5000), days_past_due=40)
    with server.channel() as channel:
        raised = server.client(channel).evaluate_event("t", "c-2", event(0, missed_payment=missed))
    assert raised.alerts and server.terminate() == 0
    sql(data_dir, "DELETE FROM events")
    sql(data_dir, "DELETE FROM alerts")
    code, report = store_verify(data_dir)
    assert code == 1
    assert report["missing_in_store"]["events"] == [
        ["t", raised.alerts[0].subject.pseudonym, raised.alerts[0].event_id]
    ]
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            again = server.client(channel).evaluate_event(
                "t", "c-2", event(0, event_id=raised.alerts[0].event_id, missed_payment=missed)
            )
    finally:
        assert server.terminate() == 0
    assert again.duplicate  # the rebuilt event row makes the retry a duplicate
    code, report = store_verify(data_dir)  # the alerts are back too, with their decision
    assert code == 0, report


def test_a_crash_between_the_audit_append_and_the_store_commit_does_not_decide_twice(
    tmp_path: Path,
) -> None:
    """Kill the server in the window: its audit record is durable, its store row is not.
    The customer decided on before, so its subject key of the month is stored already: a key
    is made durably before any record is sealed under it, which the lock would hold up."""
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    adjust(server, "req-before")
    # Another connection holds SQLite's write lock: the server's reads pass (WAL), its audit
    # append completes, and its store commit waits for the lock, where it is killed.
    blocker = sqlite3.connect(DataLayout(data_dir).decision_store, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(adjust(server, "req-crash"))
        except grpc.RpcError as error:
            outcome.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    deadline = time.monotonic() + 20
    while not limit_records(data_dir, "req-crash"):
        assert time.monotonic() < deadline, "the decision was never recorded"
        time.sleep(0.05)
    server.process.kill()
    server.process.wait()
    blocker.execute("ROLLBACK")
    blocker.close()
    caller.join(timeout=30)
    assert outcome and isinstance(outcome[0], grpc.RpcError)  # no reply left the server
    [recorded] = limit_records(data_dir, "req-crash")

    server = ServerProcess(data_dir)
    try:
        retried = adjust(server, "req-crash")
    finally:
        assert server.terminate() == 0
    assert retried.replayed and retried.metadata.decision_id == recorded["decision_id"]
    assert len(limit_records(data_dir, "req-crash")) == 1


def test_a_row_the_audit_log_does_not_record_stops_the_start(tmp_path: Path) -> None:
    """The log rolled back to an older copy (its tail of acknowledged records gone): the store
    still holds a decision from that tail, so the server refuses to hand its sequence numbers
    out again."""
    data_dir = tmp_path / "var"
    run_decisions(data_dir, count=1)
    audit_dir = DataLayout(data_dir).audit_dir
    shutil.copytree(audit_dir, tmp_path / "older-log")
    run_decisions(data_dir, start=1, count=1)  # another limit decision, r-1
    shutil.rmtree(audit_dir)
    shutil.copytree(tmp_path / "older-log", audit_dir)

    reason = refused(serve_once(data_dir))
    assert "rows the audit log does not record" in reason
    code, report = store_verify(data_dir)
    assert code == 1 and len(report["missing_in_log"]["limit_decisions"]) == 1
    assert reconcile_records(data_dir)[-1]["reason"] == "ROWS_NOT_IN_AUDIT_LOG"


def test_an_edited_row_stops_the_start_until_removed_and_rebuilt(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    first = adjust(server, "req-edit")
    assert first.action and server.terminate() == 0
    # The attack: make an increase look like a hold, to dodge the increase cool-down.
    sql(data_dir, "UPDATE limit_decisions SET action='HOLD'")

    reason = refused(serve_once(data_dir))
    assert "limit_decisions" in reason and "does not authenticate" in reason
    assert reconcile_records(data_dir)[-1]["reason"] == "STORE_TAMPERED"
    code, report = store_verify(data_dir)
    assert code == 1 and [r["table"] for r in report["tampered_rows"]] == ["limit_decisions"]

    code, report = store_verify(data_dir, "--delete-tampered")
    assert code == 1 and report["tampered_rows_deleted"]
    server = ServerProcess(data_dir)
    try:
        again = adjust(server, "req-edit")
    finally:
        assert server.terminate() == 0
    assert again.replayed and again.metadata.decision_id == first.metadata.decision_id
    assert store_verify(data_dir)[0] == 0


def test_a_row_edited_under_a_running_server_refuses_the_call_as_data_loss(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    try:
        adjust(server, "req-live")
        sql(data_dir, "UPDATE limit_decisions SET action='HOLD'")
        with pytest.raises(grpc.RpcError) as caught:
            adjust(server, "req-live")
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert error_reason(caught.value) == "STORE_TAMPERED"
        details = caught.value.details() or ""
        assert "limit_decisions" in details and "Traceback" not in details
        server.wait_for_record(lambda r: r.get("event") == "store.tampered")
    finally:
        server.terminate()
    refusals = [
        r
        for r in limit_records(data_dir, "req-live")
        if r.get("outcome") == "refused" and r.get("code") == "DATA_LOSS"
    ]
    assert len(refusals) == 1 and refusals[0]["reason"] == "STORE_TAMPERED"


def test_a_row_deleted_under_a_running_server_shows_as_a_request_decided_twice(
    tmp_path: Path,
) -> None:
    """Rebuilding happens at start; deleted while running, a request id can decide again. The
    log keeps both decisions, and `store verify` names the request."""
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    try:
        first = adjust(server, "req-twice")
        sql(data_dir, "DELETE FROM limit_decisions")
        second = adjust(server, "req-twice")
    finally:
        assert server.terminate() == 0
    assert not second.replayed and second.metadata.decision_id != first.metadata.decision_id
    assert len(limit_records(data_dir, "req-twice")) == 2
    code, report = store_verify(data_dir)
    assert code == 1 and report["request_ids_decided_twice"] == [["t", "req-twice"]]


def test_a_request_stored_with_the_unkeyed_fingerprint_of_before_still_replays(
    tmp_path: Path,
) -> None:
    """Rows stored before the idempotency fingerprint was keyed hold the plain SHA-256 one: a
    request retried across the upgrade replays instead of being refused as reused."""
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    first = adjust(server, "req-old")
    assert server.terminate() == 0
    layout = DataLayout(data_dir)
    secret = Keyring.load(layout.keyring, load_kek(layout.dev_kek)).server_secret()
    [record] = limit_records(data_dir, "req-old")
    opened = personal(data_dir, record)  # sealed under the subject's key since format 3
    digest = input_digest(derive_input_digest_key(secret), {"latest_score": GOOD_SCORE})
    assert opened["input_digest"] == digest
    wire_subject = common_pb2.SubjectRef(tenant="t", pseudonym=opened["subject"])
    store = DecisionStore(layout.decision_store, derive_state_key(secret))
    try:
        stored = store.limit_decision("t", "req-old")
        assert stored is not None
        sql(data_dir, "DELETE FROM limit_decisions")
        store.record_limit_decision(
            tenant="t",
            pseudonym=opened["subject"],
            request_id="req-old",
            fingerprint=legacy_fingerprint(wire_subject, account(), digest),
            decided_at=dt.datetime.fromisoformat(record["time"]),
            action=limit_service_pb2.LimitAction.Name(first.action).removeprefix("LIMIT_ACTION_"),
            response=stored.response,
        )
    finally:
        store.close()
    server = ServerProcess(data_dir)
    try:
        again = adjust(server, "req-old")
    finally:
        assert server.terminate() == 0
    assert again.replayed and again.metadata.decision_id == first.metadata.decision_id
