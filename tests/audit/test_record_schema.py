"""The audit record's one schema and canonical form: every record a real server writes, of
every kind the schema names, validates against docs/audit-record.schema.json, and its stored
bytes are what an independent RFC 8785 implementation makes of it (so a verifier in any
language reproduces them). Format 3 exists so that destroying a subject's key leaves nothing of
the person readable: no record of that format may hold the subject, a pseudonym-shaped value
or the encrypted inputs in clear, whatever the schema allows."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import rfc8785

from model_export.sign import generate_keypair
from privscore.v1 import alert_service_pb2 as alert_pb
from privscore.v1 import limit_service_pb2 as limit_pb
from privscore.v1 import outcome_service_pb2 as outcome_pb
from service.api.ledger import new_key
from service.audit import iter_records
from service.audit.record import RECORD_FORMAT
from service.config import DataLayout
from service.decisions.store import DecisionStore
from service.privacy.digest import derive_state_key
from tests.conftest import REPO_ROOT, ServerProcess, applicants, init_dev_keys, privscore_cli
from tests.test_alerts import cny, event
from tests.test_audit_sealed_amounts import server_secret
from tests.test_model_lifecycle import artifact
from tests.test_server import error_reason

SCHEMA = json.loads((REPO_ROOT / "docs" / "audit-record.schema.json").read_text())
# The schema's kinds, in its order: every one must be written by the server below.
KINDS = tuple(str(branch["$ref"]).removeprefix("#/$defs/") for branch in SCHEMA["oneOf"])
HEX_64 = re.compile(r"[0-9a-f]{64}")
# The one 64-hex member a format-3 record may hold: the served model's manifest digest.
MANIFEST_DIGEST = "model_manifest_sha256"
TENANT = "t"


def kind_of(record: dict[str, Any]) -> str:
    """The schema's one branch this record validates against (and no other)."""
    matching = [
        kind
        for kind in KINDS
        if jsonschema.Draft202012Validator(
            {**SCHEMA, "oneOf": [{"$ref": f"#/$defs/{kind}"}]}
        ).is_valid(record)
    ]
    assert len(matching) == 1, (matching, sorted(record))
    return matching[0]


def validate(record: dict[str, Any]) -> str:
    """Validate against the whole schema; the record's kind."""
    jsonschema.validate(record, SCHEMA, cls=jsonschema.Draft202012Validator)
    return kind_of(record)


def floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in floats_in(item)]
    if isinstance(value, list):
        return [f for item in value for f in floats_in(item)]
    return []


def hex_64_in(value: Any, name: str = "") -> list[str]:
    """Members holding a pseudonym-shaped value (64 lowercase hex), by name, but for the
    manifest digest."""
    if isinstance(value, str):
        return [name] if HEX_64.fullmatch(value) and name != MANIFEST_DIGEST else []
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in hex_64_in(item, key)]
    if isinstance(value, list):
        return [found for item in value for found in hex_64_in(item, name)]
    return []


def seed_an_old_subject_key(data_dir: Path) -> None:
    """A subject key of a month long past, so the retention expiry at start destroys it and
    writes its record."""
    init_dev_keys(data_dir)
    store = DecisionStore(
        DataLayout(data_dir).decision_store, derive_state_key(server_secret(data_dir))
    )
    try:
        store.subject_keys([(TENANT, "a" * 64, "2020-01")], new_key)
    finally:
        store.close()


def test_every_record_of_every_kind_fits_the_schema_and_is_rfc_8785(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    seed_an_old_subject_key(data_dir)
    customers = [f"schema-{n}" for n in range(12)]
    # The model lifecycle's records need a challenger the server trusts: both artifacts signed
    # by a throwaway model-team key (the bundled model, re-signed; the challenger renamed).
    team_key, team_public = tmp_path / "team.key", tmp_path / "team.pub"
    generate_keypair(team_key, team_public)
    champion = artifact(tmp_path, "champion", team_key)
    challenger = artifact(tmp_path, "challenger", team_key, "german-credit-challenger-1")
    server = ServerProcess(
        data_dir,
        "--retention-days",
        "30",
        "--model-dir",
        str(champion),
        "--model-public-key",
        str(team_public),
    )
    try:
        server.wait_for_record(lambda r: r.get("event") == "retention.expired", timeout=30)
        with server.channel() as channel:
            client = server.client(channel)
            scored = [
                client.score(TENANT, customer, row, offer_currency="CNY" if n % 2 else "")
                for n, (customer, row) in enumerate(zip(customers, applicants(), strict=False))
            ]  # approvals and adverse ones
            client.score_batch(
                TENANT,
                [
                    ("schema-b1", applicants()[20]),
                    ("schema-b2", {**applicants()[21], "purpose": "x"}),
                ],
            )
            account = limit_pb.AccountState(
                current_limit=cny(1_000_000), balance=cny(200_000), account_age_days=400
            )
            # Each source of a limit decision's score, and one without any.
            client.adjust_limit(TENANT, "schema-l1", account, features=applicants()[3])
            client.adjust_limit(TENANT, "schema-l2", account, latest_score=570)
            client.adjust_limit(TENANT, customers[0], account)
            with pytest.raises(grpc.RpcError) as unscored:
                client.adjust_limit(TENANT, "schema-never-scored", account)
            assert error_reason(unscored.value) == "NO_RECORDED_SCORE"
            missed = event(
                0,
                event_id="schema-e1",
                missed_payment=alert_pb.MissedPayment(amount_due=cny(5000), days_past_due=65),
            )
            raised = client.evaluate_event(TENANT, customers[0], missed)
            client.evaluate_event(TENANT, customers[0], missed)  # a duplicate is recorded too
            (critical,) = [a for a in raised.alerts if a.severity == alert_pb.SEVERITY_CRITICAL]
            frozen = client.adjust_limit(TENANT, customers[0], account)  # sees the open alert
            assert critical.alert_sequence in frozen.blocking_alerts
            for state in (alert_pb.ALERT_STATE_ACKNOWLEDGED, alert_pb.ALERT_STATE_RESOLVED):
                client.update_alert_state(critical.alert_sequence, state, "CUSTOMER_CONTACTED")
            client.explain_decision(scored[0].metadata.decision_id)
            client.export_subject(TENANT, customer_id=customers[0])
            client.export_subject(TENANT, customer_id="schema-never-seen")  # names the tenant
            client.erase_subject(TENANT, customer_id=customers[1])
            # A challenger in shadow, promoted, rolled back and unloaded; an outcome.
            client.change_models("load", model_dir=str(challenger))
            client.score(TENANT, "schema-shadowed", applicants()[5])
            client.change_models("promote", model_version="german-credit-challenger-1")
            client.change_models("rollback")
            client.change_models("unload")
            client.record_outcome(
                scored[0].metadata.decision_id,
                outcome_pb.OUTCOME_BAD,
                dt.datetime.now(dt.UTC),
                "DPD90_WITHIN_12M",
            )
            pseudonyms = {
                client.subject(TENANT, c).pseudonym
                for c in [*customers, "schema-b1", "schema-b2", "schema-l1", "schema-l2"]
            }
        with server.channel("auditor") as channel, pytest.raises(grpc.RpcError):
            server.client(channel).score(TENANT, "schema-denied", applicants()[0])
    finally:
        assert server.terminate() == 0
    # A lost store row, rebuilt at the next start and recorded.
    with sqlite3.connect(DataLayout(data_dir).decision_store) as db:
        db.execute("DELETE FROM limit_decisions")
    assert ServerProcess(data_dir).terminate() == 0
    rotated = privscore_cli(data_dir, "audit", "rotate-key", "--data-dir", str(data_dir))
    assert rotated.returncode == 0, rotated.stderr

    seen: dict[str, int] = {}
    records = []
    for stored in iter_records(DataLayout(data_dir).audit_dir):
        record = stored.record
        records.append(record)
        kind = validate(record)
        seen[kind] = seen.get(kind, 0) + 1
        assert floats_in(record) == []
        # The stored record's bytes are its RFC 8785 form, as another implementation makes it.
        assert b'"record":' + rfc8785.dumps(record) + b',"seq":' in stored.envelope
        if "format" in record:
            assert record["format"] == RECORD_FORMAT  # the server writes the newest only
            assert {"subject", "input_digest", "encrypted_inputs"}.isdisjoint(record), record
            assert hex_64_in(record) == [], record["rpc"]
    assert set(seen) == set(KINDS), seen
    assert seen["score"] >= 13 and seen["refusal"] >= 3 and seen["rotation"] == 1
    assert seen["alert_update"] == 2 and seen["expire"] == 1 and seen["reconcile"] == 1
    assert seen["model_change"] == 4 and seen["outcome"] == 1
    assert any("score" in record.get("shadow", {}) for record in records)
    assert any("offer" in record for record in records)  # an initial-limit offer was recorded
    limits = [r for r in records if r["rpc"].endswith("/AdjustLimit") and "outputs" in r]
    assert {r["score_source"] for r in limits} == {"IN_CALL", "CALLER_STATED", "RECORDED"}
    assert any(r["open_alerts"] for r in limits)
    exports = [r for r in records if r["rpc"].endswith("/ExportSubject")]
    assert sorted("subject_key" in r for r in exports) == [False, True]
    # No pseudonym anywhere in the log's files, in any form the server wrote them.
    files = b"".join(
        p.read_bytes() for p in DataLayout(data_dir).audit_dir.rglob("*") if p.is_file()
    )
    assert [p for p in pseudonyms if p.encode() in files] == []


FORMAT_2_SCORE: dict[str, Any] = {
    "format": 2,
    "rpc": "/privscore.v1.ScoringService/Score",
    "decision_id": "2ec76422-fe1d-40ad-bd34-bba302a511fc",
    "request_id": "r1",
    "time": "2026-12-01T23:11:19.194737Z",
    "caller": "spiffe://privscore.dev/client/dev",
    "tenant": "t",
    "subject": "a" * 64,
    "model_version": "m",
    "model_manifest_sha256": "b" * 64,
    "policy_version": "p",
    "input_digest": "c" * 64,
    "encrypted_inputs": "",
    "outputs": {"decision": "CREDIT_DECISION_APPROVE", "grade": "A", "score": 600},
}
# The same decision in format 3: the pseudonym, digest and inputs are sealed.
FORMAT_3_SCORE: dict[str, Any] = {
    **{
        k: v
        for k, v in FORMAT_2_SCORE.items()
        if k not in ("subject", "input_digest", "encrypted_inputs")
    },
    "format": 3,
    "subject_key": "sk-" + "d" * 24,
    "sealed": "A" * 40,
}


def test_the_schema_refuses_a_float_and_an_unknown_member() -> None:
    for record in (FORMAT_2_SCORE, FORMAT_3_SCORE):
        validate(record)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(
                {**record, "outputs": {**record["outputs"], "score": 600.5}}, SCHEMA
            )
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**record, "customer_id": "CN-0001"}, SCHEMA)


def test_formats_1_and_2_stay_valid_as_they_were_written() -> None:
    """Logs written before format 3 keep validating: format 2 names the subject by pseudonym
    in clear, and format 1 (no `format`) keeps a float probability of default."""
    assert validate(FORMAT_2_SCORE) == "score"
    format_1 = {k: v for k, v in FORMAT_2_SCORE.items() if k != "format"}
    format_1["outputs"] = {**FORMAT_2_SCORE["outputs"], "probability_of_default": 0.0625}
    assert validate(format_1) == "score"
    with pytest.raises(jsonschema.ValidationError):  # a float is format 1's only
        jsonschema.validate({**format_1, "format": 2}, SCHEMA)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"subject": "a" * 64}, "the pseudonym in clear"),
        ({"input_digest": "c" * 64}, "the input digest in clear"),
        ({"encrypted_inputs": "Zm9v"}, "the encrypted inputs in clear"),
        ({"subject_key": None}, "no subject key"),
        ({"sealed": None}, "nothing sealed"),
        ({"subject_key": "CN-0001"}, "a subject key id that is no key id"),
        ({"outputs": {**FORMAT_3_SCORE["outputs"], "probability_of_default": 0.5}}, "a float"),
    ],
)
def test_a_format_3_record_never_holds_the_person_in_clear(
    change: dict[str, Any], why: str
) -> None:
    """What crypto-shredding relies on, held by the schema too: a format-3 decision names its
    subject by key id alone and keeps the pseudonym, digest and inputs sealed."""
    record = {k: v for k, v in {**FORMAT_3_SCORE, **change}.items() if v is not None}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_a_format_3_refusal_names_the_tenant_only() -> None:
    refusal = {
        **{k: v for k, v in FORMAT_3_SCORE.items() if k not in ("outputs", "sealed")},
        "outcome": "refused",
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_ARGUMENT",
        "fields": ["features"],
    }
    del refusal["subject_key"]
    assert validate(refusal) == "refusal"
    for named in ({"subject": "a" * 64}, {"subject_key": "sk-" + "d" * 24}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**refusal, **named}, SCHEMA)
