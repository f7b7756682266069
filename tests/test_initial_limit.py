"""The initial limit (issue 17, the loop's first step): an approved applicant scored with an
offer currency is offered the policy's initial limit for its grade, recorded in the audit log
with the rule in clear and the amount sealed (with the applicant's other personal fields, under
its subject key)."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from privscore.v1 import scoring_service_pb2 as pb
from service.audit import iter_records
from service.config import DEFAULT_POLICY, DataLayout
from service.decisions.policy import load_policy
from service.privacy.record_seal import open_record_fields
from tests.conftest import ServerProcess, applicants
from tests.test_audit_sealed_amounts import personal, subject_key
from tests.test_server import error_reason, violations

LIMITS = load_policy(DEFAULT_POLICY).limits


def record_of(server: ServerProcess, decision_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for stored in iter_records(DataLayout(server.data_dir).audit_dir):
            if stored.record.get("decision_id") == decision_id:
                return stored.record
        time.sleep(0.05)
    raise AssertionError(f"no record for {decision_id}")


def test_approved_applicants_get_the_policys_offer_for_their_grade(
    shared_server: ServerProcess,
) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        responses = [
            client.score("t", f"offer-{n}", row, offer_currency="CNY")
            for n, row in enumerate(applicants()[:40])
        ]
        pseudonym_of = {
            r.metadata.decision_id: client.subject("t", f"offer-{n}").pseudonym
            for n, r in enumerate(responses)
        }
        unasked = client.score("t", "offer-none", applicants()[0])
    offered = [r for r in responses if r.HasField("initial_limit")]
    assert offered and len(offered) < len(responses)
    for response in responses:
        score = response.score
        expected = (
            LIMITS.initial_offer("CNY", score.grade)
            if score.decision == pb.CREDIT_DECISION_APPROVE
            else None
        )
        if expected is None:
            assert not response.HasField("initial_limit")
            continue
        amount, rule = expected
        assert response.initial_limit.limit.currency_code == "CNY"
        assert response.initial_limit.limit.minor_units == amount
        assert response.initial_limit.rule == rule
        assert amount <= LIMITS.ceilings["CNY"][score.grade]
    assert not unasked.HasField("initial_limit")

    # The record: rule and currency in clear, the amount sealed to this record only, under
    # the applicant's subject key.
    for response in offered[:3]:
        metadata = response.metadata
        record = record_of(shared_server, metadata.decision_id)
        assert record["offer"] == {"currency": "CNY", "rule": response.initial_limit.rule}
        key = subject_key(shared_server.data_dir, str(record["subject_key"]))
        assert key is not None
        opened = open_record_fields(
            key,
            "/privscore.v1.ScoringService/Score",
            metadata.decision_id,
            metadata.request_id,
            str(record["sealed"]),
        )
        assert set(opened) == {"subject", "input_digest", "encrypted_inputs", "initial_limit"}
        assert opened["initial_limit"] == response.initial_limit.limit.minor_units
        assert opened["subject"] == pseudonym_of[metadata.decision_id]
        clear = {k: v for k, v in record.items() if k != "sealed"}
        assert str(response.initial_limit.limit.minor_units) not in json.dumps(clear)
    plain = record_of(shared_server, unasked.metadata.decision_id)
    assert "offer" not in plain and "initial_limit" not in personal(shared_server.data_dir, plain)


def test_a_batch_offers_to_each_approved_item(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        batch = shared_server.client(channel).score_batch(
            "t",
            [(f"batch-offer-{n}", row) for n, row in enumerate(applicants()[40:60])],
            offer_currency="USD",
        )
    decisions = [result.decision for result in batch.results]
    approved = [d for d in decisions if d.score.decision == pb.CREDIT_DECISION_APPROVE]
    assert approved
    for decision in decisions:
        expected = (
            LIMITS.initial_offer("USD", decision.score.grade)
            if decision.score.decision == pb.CREDIT_DECISION_APPROVE
            else None
        )
        assert decision.HasField("initial_limit") == (expected is not None)
        if expected is not None:
            assert decision.initial_limit.limit.minor_units == expected[0]


@pytest.mark.parametrize(
    ("currency", "code", "reason"),
    [
        ("EUR", grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_NOT_SUPPORTED"),
        ("cny", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
def test_an_offer_currency_the_policy_lacks_or_malformed_is_refused(
    shared_server: ServerProcess, currency: str, code: grpc.StatusCode, reason: str
) -> None:
    with shared_server.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        shared_server.client(channel).score(
            "t", "offer-bad", applicants()[0], offer_currency=currency
        )
    assert refused.value.code() == code
    assert error_reason(refused.value) == reason
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert set(violations(refused.value)) == {"offer_currency"}
    else:
        assert "offer_currency" in (refused.value.details() or "")
