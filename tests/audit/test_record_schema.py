"""The audit record's one schema and canonical form: every record a real server writes, of
every kind, validates against docs/audit-record.schema.json, and its stored bytes are what an
independent RFC 8785 implementation makes of it (so a verifier in any language reproduces
them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import rfc8785

from privscore.v1 import alert_service_pb2 as alert_pb
from privscore.v1 import limit_service_pb2 as limit_pb
from service.audit import iter_records
from service.config import DataLayout
from tests.conftest import REPO_ROOT, ServerProcess, applicants, privscore_cli
from tests.test_alerts import cny, event

SCHEMA = json.loads((REPO_ROOT / "docs" / "audit-record.schema.json").read_text())
KINDS = ("score", "limit", "event", "refusal", "rotation")


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


def floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in floats_in(item)]
    if isinstance(value, list):
        return [f for item in value for f in floats_in(item)]
    return []


def test_every_record_of_every_kind_fits_the_schema_and_is_rfc_8785(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var")
    try:
        with server.channel() as channel:
            client = server.client(channel)
            for n, row in enumerate(applicants()[:12]):  # approvals and adverse ones
                client.score("t", f"schema-{n}", row, offer_currency="CNY" if n % 2 else "")
            client.score_batch(
                "t",
                [
                    ("schema-b1", applicants()[20]),
                    ("schema-b2", {**applicants()[21], "purpose": "x"}),
                ],
            )
            account = limit_pb.AccountState(
                current_limit=cny(1_000_000), balance=cny(200_000), account_age_days=400
            )
            client.adjust_limit("t", "schema-l1", account, features=applicants()[3])
            client.adjust_limit("t", "schema-l2", account, latest_score=570)
            missed = event(
                0,
                event_id="schema-e1",
                missed_payment=alert_pb.MissedPayment(amount_due=cny(5000), days_past_due=45),
            )
            client.evaluate_event("t", "schema-e", missed)
            client.evaluate_event("t", "schema-e", missed)  # a duplicate is recorded too
        with server.channel("auditor") as channel, pytest.raises(grpc.RpcError):
            server.client(channel).score("t", "schema-denied", applicants()[0])
    finally:
        assert server.terminate() == 0
    rotated = privscore_cli(
        server.data_dir, "audit", "rotate-key", "--data-dir", str(server.data_dir)
    )
    assert rotated.returncode == 0, rotated.stderr

    seen: dict[str, int] = {}
    for stored in iter_records(DataLayout(server.data_dir).audit_dir):
        record = stored.record
        jsonschema.validate(record, SCHEMA, cls=jsonschema.Draft202012Validator)
        kind = kind_of(record)
        seen[kind] = seen.get(kind, 0) + 1
        assert floats_in(record) == []
        # The stored record's bytes are its RFC 8785 form, as another implementation makes it.
        assert b'"record":' + rfc8785.dumps(record) + b',"seq":' in stored.envelope
    assert set(seen) == set(KINDS), seen
    assert seen["score"] >= 13 and seen["refusal"] >= 2 and seen["rotation"] == 1
    records = [stored.record for stored in iter_records(DataLayout(server.data_dir).audit_dir)]
    assert any("offer" in record for record in records)  # an initial-limit offer was recorded


def test_the_schema_refuses_a_float_and_an_unknown_member() -> None:
    record: dict[str, Any] = {
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
    jsonschema.validate(record, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "outputs": {**record["outputs"], "score": 600.5}}, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "customer_id": "CN-0001"}, SCHEMA)
