"""Audit records hold no account amount in clear: a real server's AdjustLimit and EvaluateEvent
records seal limits, balances, amounts and the account's figures (PIPL Art. 28) with the record
key, bound to the record; `audit show --open`, with the keyring and KEK, opens them, and the
sealed payload holds everything the decision store keeps for those decisions."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from privscore.v1 import alert_service_pb2 as alerts_pb
from privscore.v1 import common_pb2
from privscore.v1 import limit_service_pb2 as limits_pb
from service.api.limits import request_fingerprint
from service.audit import iter_records
from service.config import DataLayout
from service.decisions.store import DecisionStore
from service.privacy.digest import derive_input_digest_key, derive_record_key, derive_state_key
from service.privacy.keyring import Keyring, load_kek
from service.privacy.record_seal import (
    RecordSealError,
    open_record,
    open_record_fields,
    seal_record_fields,
)
from tests.conftest import ServerProcess, applicants, privscore_cli
from tests.test_alerts import cny, event
from tests.test_limits import GOOD_SCORE, account

TENANT = "t"
# Figures no other part of a record holds; each must appear nowhere in the log in clear.
LIMIT = 123_456_789
BALANCE = 23_456_781
ON_TIME = 3_917
AGE_DAYS = 29_173
DAYS_PAST_DUE = 17_389  # the account's, in the features call
PURCHASE = 34_567_891
BALANCE_AFTER = 45_678_912
AMOUNT_DUE = 56_789_123
EVENT_DAYS_PAST_DUE = 31_337
REPAID = 67_891_234
FIGURES = (
    LIMIT,
    BALANCE,
    ON_TIME,
    AGE_DAYS,
    DAYS_PAST_DUE,
    PURCHASE,
    BALANCE_AFTER,
    AMOUNT_DUE,
    EVENT_DAYS_PAST_DUE,
    REPAID,
)


def standalone(number: int) -> re.Pattern[bytes]:
    """The number as text, not as digits inside base64, hex or a longer number."""
    return re.compile(rb"(?<![0-9A-Za-z+/])" + str(number).encode() + rb"(?![0-9])")


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return privscore_cli(data_dir, "audit", *args)


def server_secret(data_dir: Path) -> bytes:
    """What the key derivations (service.privacy.digest) take, from the server's keyring."""
    layout = DataLayout(data_dir)
    return Keyring.load(layout.keyring, load_kek(layout.dev_kek)).server_secret()


@dataclasses.dataclass
class Decisions:
    data_dir: Path
    limit_latest: limits_pb.AdjustLimitResponse
    limit_features: limits_pb.AdjustLimitResponse
    limit_account: limits_pb.AccountState
    features_account: limits_pb.AccountState
    events: list[alerts_pb.EvaluateEventResponse]

    def record(self, decision_id: str) -> dict[str, Any]:
        for stored in iter_records(DataLayout(self.data_dir).audit_dir):
            if stored.record.get("decision_id") == decision_id:
                return stored.record
        raise AssertionError(f"no record for {decision_id}")


@pytest.fixture(scope="module")
def decided(tmp_path_factory: pytest.TempPathFactory) -> Decisions:
    data_dir = tmp_path_factory.mktemp("sealed") / "var"
    server = ServerProcess(data_dir)
    limit_account = account(limit=LIMIT, balance=BALANCE, on_time=ON_TIME, age_days=AGE_DAYS)
    features_account = account(
        limit=LIMIT,
        balance=BALANCE,
        on_time=ON_TIME,
        age_days=AGE_DAYS,
        days_past_due=DAYS_PAST_DUE,
    )
    try:
        with server.channel() as channel:
            client = server.client(channel)
            limit_latest = client.adjust_limit(
                TENANT, "sealed-1", limit_account, latest_score=GOOD_SCORE
            )
            limit_features = client.adjust_limit(
                TENANT, "sealed-2", features_account, features=applicants()[4]
            )
            events = [
                client.evaluate_event(
                    TENANT,
                    "sealed-3",
                    event(
                        0, balance=BALANCE_AFTER, purchase=alerts_pb.Purchase(amount=cny(PURCHASE))
                    ),
                ),
                client.evaluate_event(
                    TENANT,
                    "sealed-3",
                    event(
                        1,
                        missed_payment=alerts_pb.MissedPayment(
                            amount_due=cny(AMOUNT_DUE), days_past_due=EVENT_DAYS_PAST_DUE
                        ),
                    ),
                ),
                client.evaluate_event(
                    TENANT,
                    "sealed-3",
                    event(
                        2,
                        repayment=alerts_pb.Repayment(
                            amount=cny(REPAID), outcome=alerts_pb.REPAYMENT_OUTCOME_FAILED
                        ),
                    ),
                ),
            ]
    finally:
        assert server.terminate() == 0
    assert events[1].alerts, "the missed payment raises an alert whose proto the record seals"
    return Decisions(
        data_dir, limit_latest, limit_features, limit_account, features_account, events
    )


def test_no_figure_in_clear_in_the_log_files_or_audit_show(decided: Decisions) -> None:
    audit_dir = DataLayout(decided.data_dir).audit_dir
    files = {path.name: path.read_bytes() for path in audit_dir.rglob("*") if path.is_file()}
    assert any(name.startswith("segment-") for name in files)
    shown = cli(decided.data_dir, "show")
    assert shown.returncode == 0, shown.stderr
    haystacks = {**files, "audit show": shown.stdout.encode()}
    new_limits = {decided.limit_latest.new_limit.minor_units}
    new_limits |= {decided.limit_features.new_limit.minor_units}
    needles = [*FIGURES, *(n for n in new_limits if n > 1000)]
    leaks = [
        (name, number)
        for name, data in haystacks.items()
        for number in needles
        if standalone(number).search(data)
    ]
    assert leaks == []
    # The sealed field is there, but holds nothing readable without the key.
    limit_record = decided.record(decided.limit_latest.metadata.decision_id)
    assert isinstance(limit_record["sealed"], str)
    assert str(LIMIT).encode() not in base64.b64decode(limit_record["sealed"])


def test_what_stays_readable(decided: Decisions) -> None:
    limit = decided.limit_latest
    record = decided.record(limit.metadata.decision_id)
    assert "account" not in record
    assert record["outputs"] == {
        "action": limits_pb.LimitAction.Name(limit.action),
        "rule": limit.rule,
        "reasons": [r.code for r in limit.reasons],
        "score": GOOD_SCORE,
        "grade": "A",
        "currency": "CNY",
    }
    assert record["encrypted_inputs"] == "" and len(record["input_digest"]) == 64
    features_record = decided.record(decided.limit_features.metadata.decision_id)
    assert features_record["outputs"]["action"] == "LIMIT_ACTION_FREEZE"
    assert features_record["encrypted_inputs"]

    missed = decided.events[1]
    record = decided.record(missed.metadata.decision_id)
    assert record["event"] == {
        "event_id": record["event"]["event_id"],
        "occurred_at": "2026-11-01T09:01:00Z",
        "kind": "missed_payment",
        "currency": "CNY",
    }
    assert record["outputs"]["alerts"] == [
        {
            "rule": a.rule,
            "severity": alerts_pb.Severity.Name(a.severity),
            "action": alerts_pb.RecommendedAction.Name(a.recommended_action),
            "reasons": [r.code for r in a.reasons],
        }
        for a in missed.alerts
    ]


def shown_open(data_dir: Path, decision_id: str) -> dict[str, Any]:
    result = cli(data_dir, "show", "--open", "--decision", decision_id)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    shown: dict[str, Any] = json.loads(line)
    return shown


def test_show_open_gives_the_reviewer_every_figure_and_the_store_row(decided: Decisions) -> None:
    limit = decided.limit_latest
    result = cli(decided.data_dir, "show", "--open", "--decision", limit.metadata.decision_id)
    assert result.returncode == 0, result.stderr
    assert standalone(LIMIT).search(result.stdout.encode())
    shown = json.loads(result.stdout)
    assert shown["seq"] == limit.metadata.audit_sequence
    opened = shown["record"]["opened"]
    assert set(opened) == {"account", "new_limit", "response", "fingerprint"}
    assert opened["account"]["current_limit"] == {"currency_code": "CNY", "minor_units": str(LIMIT)}
    assert opened["account"]["balance"]["minor_units"] == str(BALANCE)
    assert opened["account"]["on_time_repayments_in_row"] == ON_TIME
    assert opened["account"]["account_age_days"] == AGE_DAYS
    assert opened["new_limit"] == limit.new_limit.minor_units

    # The sealed response is the reply (its audit sequence is the record's own), and the
    # fingerprint is the store row's: enough to rebuild a lost row.
    sealed_response = limits_pb.AdjustLimitResponse.FromString(base64.b64decode(opened["response"]))
    sealed_response.metadata.audit_sequence = shown["seq"]
    assert sealed_response == limit
    layout = DataLayout(decided.data_dir)
    store = DecisionStore(layout.decision_store, derive_state_key(server_secret(decided.data_dir)))
    try:
        row = store.limit_decision(TENANT, limit.metadata.request_id)
    finally:
        store.close()
    assert row is not None
    assert opened["fingerprint"] == row.fingerprint
    assert limits_pb.AdjustLimitResponse.FromString(row.response) == limit

    features = shown_open(decided.data_dir, decided.limit_features.metadata.decision_id)
    assert features["record"]["opened"]["account"]["days_past_due"] == DAYS_PAST_DUE


def test_show_open_gives_the_events_and_alerts_rows(decided: Decisions) -> None:
    record_of = {
        r.metadata.decision_id: shown_open(decided.data_dir, r.metadata.decision_id)
        for r in decided.events
    }
    layout = DataLayout(decided.data_dir)
    store = DecisionStore(layout.decision_store, derive_state_key(server_secret(decided.data_dir)))
    try:
        pseudonym = next(iter(record_of.values()))["record"]["subject"]
        stored_events = {e.event_id: e for e in store.events(TENANT, pseudonym)}
        stored_alerts = dict(store.alerts_after(0, 100))
    finally:
        store.close()
    assert len(stored_events) == 3
    for response in decided.events:
        shown = record_of[response.metadata.decision_id]
        opened = shown["record"]["opened"]
        assert set(opened) == {"event", "details", "alerts"}
        event_id = shown["record"]["event"]["event_id"]
        expected = dataclasses.asdict(stored_events[event_id])
        del expected["event_id"], expected["occurred_at"]
        assert opened["details"] == expected
        assert len(opened["alerts"]) == len(response.alerts)
        for sealed, sent in zip(opened["alerts"], response.alerts, strict=True):
            alert = alerts_pb.Alert.FromString(base64.b64decode(sealed))
            alert.metadata.audit_sequence = shown["seq"]
            assert alerts_pb.Alert.FromString(stored_alerts[sent.sequence]) == alert
            alert.sequence = sent.sequence
            assert alert == sent
    details = [record_of[r.metadata.decision_id]["record"]["opened"] for r in decided.events]
    assert details[0]["details"]["amount"] == PURCHASE
    assert details[0]["details"]["balance_after"] == BALANCE_AFTER
    assert details[1]["details"]["days_past_due"] == EVENT_DAYS_PAST_DUE
    assert details[2]["details"] == {
        "kind": "repayment",
        "currency": "CNY",
        "amount": REPAID,
        "succeeded": False,
        "days_past_due": None,
        "balance_after": None,
    }
    assert details[2]["event"]["repayment"]["amount"]["minor_units"] == str(REPAID)


def test_show_open_without_the_right_kek_opens_nothing(decided: Decisions, tmp_path: Path) -> None:
    wrong = tmp_path / "kek"
    wrong.write_text(base64.b64encode(bytes(32)).decode())
    result = cli(
        decided.data_dir,
        "show",
        "--open",
        "--kek-file",
        str(wrong),
        "--decision",
        decided.limit_latest.metadata.decision_id,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("privscore audit show:")
    assert not standalone(LIMIT).search(result.stdout.encode())


def test_sealed_fields_open_only_in_their_own_record(decided: Decisions) -> None:
    key = derive_record_key(server_secret(decided.data_dir))
    limit_record = decided.record(decided.limit_latest.metadata.decision_id)
    other_limit = decided.record(decided.limit_features.metadata.decision_id)
    event_record = decided.record(decided.events[0].metadata.decision_id)
    assert open_record(key, limit_record)["account"]["current_limit"]["minor_units"] == str(LIMIT)

    moves = [
        {**other_limit, "sealed": limit_record["sealed"]},  # same RPC, another decision
        {**event_record, "sealed": limit_record["sealed"]},  # another RPC
        {**limit_record, "request_id": other_limit["request_id"]},
        {**limit_record, "decision_id": other_limit["decision_id"]},
    ]
    for moved in moves:
        with pytest.raises(RecordSealError, match="do not open"):
            open_record(key, moved)
    blob = bytearray(base64.b64decode(limit_record["sealed"]))
    blob[20] ^= 1
    with pytest.raises(RecordSealError, match="do not open"):
        open_record(key, {**limit_record, "sealed": base64.b64encode(bytes(blob)).decode()})
    with pytest.raises(RecordSealError, match="do not open"):
        open_record(derive_state_key(server_secret(decided.data_dir)), limit_record)
    with pytest.raises(RecordSealError, match="no sealed fields"):
        open_record(key, {k: v for k, v in limit_record.items() if k != "sealed"})


def test_the_idempotency_fingerprint_is_keyed(decided: Decisions) -> None:
    """The store keeps the fingerprint in clear: an unkeyed hash of the subject and account
    would let a reader of the store brute-force a small balance back."""
    limit = decided.limit_latest
    record = decided.record(limit.metadata.decision_id)
    key = server_secret(decided.data_dir)
    layout = DataLayout(decided.data_dir)
    store = DecisionStore(layout.decision_store, derive_state_key(key))
    try:
        row = store.limit_decision(TENANT, limit.metadata.request_id)
    finally:
        store.close()
    assert row is not None
    subject = common_pb2.SubjectRef(tenant=record["tenant"], pseudonym=record["subject"])
    unkeyed = hashlib.sha256(
        b"\x00".join(
            [
                subject.SerializeToString(deterministic=True),
                decided.limit_account.SerializeToString(deterministic=True),
                record["input_digest"].encode(),
            ]
        )
    ).hexdigest()
    assert row.fingerprint != unkeyed
    assert row.fingerprint == request_fingerprint(
        derive_input_digest_key(key), subject, decided.limit_account, record["input_digest"]
    )
    other_key = derive_state_key(key)
    assert row.fingerprint != request_fingerprint(
        other_key, subject, decided.limit_account, record["input_digest"]
    )
    store_bytes = b"".join(p.read_bytes() for p in decided.data_dir.glob("decisions.sqlite3*"))
    assert unkeyed.encode() not in store_bytes


def test_seal_round_trip_and_binding() -> None:
    key = bytes(range(32))
    sealed = seal_record_fields(key, "/rpc", "d-1", "r-1", {"amount": 5})
    assert open_record_fields(key, "/rpc", "d-1", "r-1", sealed) == {"amount": 5}
    assert sealed != seal_record_fields(key, "/rpc", "d-1", "r-1", {"amount": 5})  # fresh nonce
    # Length-prefixed identity: moving characters between parts does not open.
    moved = seal_record_fields(key, "/rpc", "d-1", "r-1x", {"amount": 5})
    with pytest.raises(RecordSealError):
        open_record_fields(key, "/rpc", "d-1r", "-1x", moved)
    with pytest.raises(RecordSealError, match="not base64"):
        open_record_fields(key, "/rpc", "d-1", "r-1", "***")
    with pytest.raises(RecordSealError, match="too short"):
        open_record_fields(key, "/rpc", "d-1", "r-1", base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="32 bytes"):
        seal_record_fields(bytes(16), "/rpc", "d-1", "r-1", {})
