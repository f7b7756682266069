"""Audit records hold no account amount in clear: a real server's AdjustLimit and EvaluateEvent
records seal limits, balances, amounts and the account's figures (PIPL Art. 28), with the
subject's pseudonym, under the key of that subject and month (record format 3), bound to the
record; `audit show --open`, with the keyring, KEK and the decision store's subject keys, opens
them, and the sealed payload holds everything the decision store keeps for those decisions."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import shutil
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from privscore.v1 import alert_service_pb2 as alerts_pb
from privscore.v1 import common_pb2
from privscore.v1 import limit_service_pb2 as limits_pb
from service.api.limits import request_fingerprint
from service.audit import iter_records
from service.audit.storage import GENESIS_CHAIN, canonical_json, frame
from service.config import DataLayout
from service.decisions.store import DecisionStore
from service.privacy.digest import derive_input_digest_key, derive_record_key, derive_state_key
from service.privacy.keyring import Keyring, load_kek
from service.privacy.record_seal import (
    RecordSealError,
    Shredded,
    open_personal,
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
CUSTOMERS = ("sealed-1", "sealed-2", "sealed-3")


def standalone(number: int) -> re.Pattern[bytes]:
    """The number as text, not as digits inside base64, hex or a longer number."""
    return re.compile(rb"(?<![0-9A-Za-z+/])" + str(number).encode() + rb"(?![0-9])")


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return privscore_cli(data_dir, "audit", *args)


def server_secret(data_dir: Path) -> bytes:
    """What the key derivations (service.privacy.digest) take, from the server's keyring."""
    layout = DataLayout(data_dir)
    return Keyring.load(layout.keyring, load_kek(layout.dev_kek)).server_secret()


def subject_key(data_dir: Path, key_id: str) -> bytes | None:
    """A subject key by id from the server's decision store (None once destroyed): what
    `audit show --open` and replay open a format-3 record's personal fields with."""
    store = DecisionStore(
        DataLayout(data_dir).decision_store, derive_state_key(server_secret(data_dir))
    )
    try:
        found = store.key_by_id(key_id)
    finally:
        store.close()
    return None if found is None else found[1]


def personal(data_dir: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's personal fields (pseudonym, inputs, amounts), opened as a key holder opens
    them: under the subject key the store keeps (format 3) or the record key (before)."""
    return open_personal(
        record,
        record_key=derive_record_key(server_secret(data_dir)),
        subject_key=lambda key_id: subject_key(data_dir, key_id),
    )


@dataclasses.dataclass
class Decisions:
    data_dir: Path
    limit_latest: limits_pb.AdjustLimitResponse
    limit_features: limits_pb.AdjustLimitResponse
    limit_account: limits_pb.AccountState
    features_account: limits_pb.AccountState
    events: list[alerts_pb.EvaluateEventResponse]
    pseudonyms: dict[str, str]  # by customer id

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
            pseudonyms = {c: client.subject(TENANT, c).pseudonym for c in CUSTOMERS}
    finally:
        assert server.terminate() == 0
    assert events[1].alerts, "the missed payment raises an alert whose proto the record seals"
    return Decisions(
        data_dir, limit_latest, limit_features, limit_account, features_account, events, pseudonyms
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
    # Nor whose figures they are: the pseudonyms are sealed with them.
    named = [
        (name, customer)
        for name, data in haystacks.items()
        for customer, pseudonym in decided.pseudonyms.items()
        if pseudonym.encode() in data
    ]
    assert named == []
    # The sealed field is there, but holds nothing readable without the key.
    limit_record = decided.record(decided.limit_latest.metadata.decision_id)
    assert isinstance(limit_record["sealed"], str)
    assert str(LIMIT).encode() not in base64.b64decode(limit_record["sealed"])


def test_what_stays_readable(decided: Decisions) -> None:
    """A reviewer reads the decision, its rule and reasons, where its score came from and the
    subject's key id; never the subject's pseudonym, inputs or their digest, which are sealed
    with the figures under the subject key (so that destroying it erases them)."""
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
    assert record["score_source"] == "CALLER_STATED" and record["score_decision_id"] is None
    assert record["open_alerts"] == [] and record["subject_key"].startswith("sk-")
    features_record = decided.record(decided.limit_features.metadata.decision_id)
    assert features_record["outputs"]["action"] == "LIMIT_ACTION_FREEZE"
    assert features_record["score_source"] == "IN_CALL"
    for clear in (record, features_record):
        assert {"subject", "input_digest", "encrypted_inputs"}.isdisjoint(clear)
        text = json.dumps(clear)
        assert [c for c, p in decided.pseudonyms.items() if p in text] == []
    assert len(personal(decided.data_dir, record)["input_digest"]) == 64
    assert personal(decided.data_dir, features_record)["encrypted_inputs"]

    missed = decided.events[1]
    record = decided.record(missed.metadata.decision_id)
    assert decided.pseudonyms["sealed-3"] not in json.dumps(record)
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
    assert set(opened) == {
        "subject",
        "input_digest",
        "account",
        "new_limit",
        "response",
        "fingerprint",
    }
    assert opened["subject"] == decided.pseudonyms["sealed-1"]
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
    assert features["record"]["opened"]["encrypted_inputs"]


def test_show_open_gives_the_events_and_alerts_rows(decided: Decisions) -> None:
    record_of = {
        r.metadata.decision_id: shown_open(decided.data_dir, r.metadata.decision_id)
        for r in decided.events
    }
    layout = DataLayout(decided.data_dir)
    store = DecisionStore(layout.decision_store, derive_state_key(server_secret(decided.data_dir)))
    try:
        pseudonym = next(iter(record_of.values()))["record"]["opened"]["subject"]
        assert pseudonym == decided.pseudonyms["sealed-3"]
        stored_events = {e.event_id: e for e in store.events(TENANT, pseudonym)}
        stored_alerts = dict(store.alerts_after(0, 100))
    finally:
        store.close()
    assert len(stored_events) == 3
    for response in decided.events:
        shown = record_of[response.metadata.decision_id]
        opened = shown["record"]["opened"]
        assert set(opened) == {"subject", "event", "details", "alerts"}
        event_id = shown["record"]["event"]["event_id"]
        expected = dataclasses.asdict(stored_events[event_id])
        del expected["event_id"], expected["occurred_at"]
        assert opened["details"] == expected
        assert len(opened["alerts"]) == len(response.alerts)
        for sealed, sent in zip(opened["alerts"], response.alerts, strict=True):
            alert = alerts_pb.Alert.FromString(base64.b64decode(sealed))
            alert.metadata.audit_sequence = shown["seq"]
            assert alerts_pb.Alert.FromString(stored_alerts[sent.sequence]) == alert
            alert.sequence = alert.alert_sequence = sent.sequence
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
    """Under the subject key and bound to the record's rpc, decision id and request id: moved
    to another record, altered, or opened with another key (the server's record key that
    sealed them before format 3 included), they do not open."""
    limit_record = decided.record(decided.limit_latest.metadata.decision_id)
    other_limit = decided.record(decided.limit_features.metadata.decision_id)
    event_record = decided.record(decided.events[0].metadata.decision_id)
    key = subject_key(decided.data_dir, limit_record["subject_key"])
    assert key is not None
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
    secret = server_secret(decided.data_dir)
    for wrong in (derive_state_key(secret), derive_record_key(secret)):
        with pytest.raises(RecordSealError, match="do not open"):
            open_record(wrong, limit_record)
    with pytest.raises(RecordSealError, match="no sealed fields"):
        open_record(key, {k: v for k, v in limit_record.items() if k != "sealed"})


def test_personal_fields_do_not_open_as_another_subjects(decided: Decisions) -> None:
    """The attack on crypto-shredding: a record's sealed fields moved into another subject's
    record, or its subject_key pointed at another subject's key (say, one not erased), must
    not open: the seal is bound to its own record and key. Opened as the reviewer's tools
    open them, by the key the record names."""
    limit_record = decided.record(decided.limit_latest.metadata.decision_id)
    other_subject = decided.record(decided.limit_features.metadata.decision_id)
    event_record = decided.record(decided.events[0].metadata.decision_id)
    assert len({r["subject_key"] for r in (limit_record, other_subject, event_record)}) == 3
    assert personal(decided.data_dir, limit_record)["subject"] == decided.pseudonyms["sealed-1"]
    attacks = [
        {**other_subject, "sealed": limit_record["sealed"]},
        {**event_record, "sealed": limit_record["sealed"]},
        {**limit_record, "subject_key": other_subject["subject_key"]},
        {**limit_record, "subject_key": event_record["subject_key"]},
        # Both moved: the record still is another decision's.
        {
            **other_subject,
            "sealed": limit_record["sealed"],
            "subject_key": limit_record["subject_key"],
        },
    ]
    for attack in attacks:
        with pytest.raises(RecordSealError, match="do not open"):
            personal(decided.data_dir, attack)
    # Made to look like a record of before format 3, to be opened with the record key: its
    # format says otherwise, and it is refused before any key is tried.
    stripped = {k: v for k, v in limit_record.items() if k != "subject_key"}
    with pytest.raises(RecordSealError, match="names no subject key"):
        personal(decided.data_dir, stripped)
    with pytest.raises(RecordSealError, match="do not open"):  # and with the format gone too
        personal(decided.data_dir, {k: v for k, v in stripped.items() if k != "format"})
    with pytest.raises(Shredded):  # a key id the store never made opens nothing either
        personal(decided.data_dir, {**limit_record, "subject_key": "sk-" + "0" * 24})


def relabelled(segment: bytes, key_id: str, other: str) -> bytes:
    """The first segment of a log with every record naming subject key `key_id` made to name
    `other`, rewritten as anyone able to write the files can (service/audit/storage.py): each
    record's chain made again from its predecessor's, each frame's length and CRC32 too. The
    MAC, which only the server can make, is left as it was."""
    out, offset, chain = [], 0, GENESIS_CHAIN
    while offset < len(segment):
        (length,) = struct.unpack_from(">I", segment, offset)
        envelope = json.loads(segment[offset + 4 : offset + 4 + length])
        offset += length + 8
        record = envelope["record"]
        if record.get("subject_key") == key_id:
            record["subject_key"] = other
        seq = str(envelope["seq"]).encode()
        chain = hashlib.sha256(
            chain + b'{"record":' + canonical_json(record) + b',"seq":' + seq + b"}"
        ).digest()
        envelope["chain"] = base64.b64encode(chain).decode()
        out.append(frame(canonical_json(envelope)))
    return b"".join(out)


def test_show_open_of_a_record_relabelled_to_another_subject_opens_nothing(
    decided: Decisions, tmp_path: Path
) -> None:
    """The same attack on the files, by someone who can write them: the limit record's
    subject_key edited in the log to another subject's key id, the chain and frames made
    again so that the log still reads. `audit show --open` shows the record but cannot open
    it, nor show any figure of it; `audit verify` reports the edit (a record's MAC is the
    server's alone)."""
    data_dir = tmp_path / "var"
    shutil.copytree(decided.data_dir, data_dir)
    decision_id = decided.limit_latest.metadata.decision_id
    own = decided.record(decision_id)["subject_key"]
    other = decided.record(decided.limit_features.metadata.decision_id)["subject_key"]
    (segment,) = DataLayout(data_dir).audit_dir.glob("segment-*")  # one, from sequence 0
    data = segment.read_bytes()
    assert data.count(own.encode()) == 1  # sealed-1 has this one decision
    segment.write_bytes(relabelled(data, own, other))

    result = cli(data_dir, "show", "--open", "--decision", decision_id)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "do not open" in result.stderr and "Traceback" not in result.stderr
    (line,) = result.stdout.splitlines()
    shown = json.loads(line)["record"]
    assert shown["subject_key"] == other and "opened" not in shown
    assert not standalone(LIMIT).search(result.stdout.encode())
    assert decided.pseudonyms["sealed-1"] not in result.stdout
    verified = cli(data_dir, "verify")
    assert verified.returncode != 0 and "server's MAC" in verified.stdout, verified.stdout


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
    opened = personal(decided.data_dir, record)
    subject = common_pb2.SubjectRef(tenant=record["tenant"], pseudonym=opened["subject"])
    digest = opened["input_digest"]
    unkeyed = hashlib.sha256(
        b"\x00".join(
            [
                subject.SerializeToString(deterministic=True),
                decided.limit_account.SerializeToString(deterministic=True),
                digest.encode(),
            ]
        )
    ).hexdigest()
    assert row.fingerprint != unkeyed
    assert (
        row.fingerprint
        == opened["fingerprint"]
        == request_fingerprint(derive_input_digest_key(key), subject, decided.limit_account, digest)
    )
    other_key = derive_state_key(key)
    assert row.fingerprint != request_fingerprint(other_key, subject, decided.limit_account, digest)
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
