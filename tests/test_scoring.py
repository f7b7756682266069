"""Score and ScoreBatch end to end: real keys, real model, real audit, over a loopback socket."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import code_pb2

from privscore.v1 import common_pb2
from privscore.v1 import scoring_service_pb2 as pb
from service.api.features import encrypted_inputs, read_encrypted_inputs
from service.api.scoring import score_outputs
from service.audit.record import PD_PPB, PPB
from service.config import DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY, DEFAULT_POLICY
from service.decisions.policy import load_policy
from service.model.scorer import Scorer
from tests.conftest import ServerProcess, applicants, served_manifest
from tests.test_privacy import sealed_request
from tests.test_server import violations

POLICY = load_policy(DEFAULT_POLICY)


def expected_decision(score: int) -> int:
    if score >= POLICY.score.approve_min_score:
        return pb.CREDIT_DECISION_APPROVE
    if score >= POLICY.score.review_min_score:
        return pb.CREDIT_DECISION_REVIEW
    return pb.CREDIT_DECISION_DECLINE


def test_score_returns_a_complete_decision(shared_server: ServerProcess) -> None:
    manifest = served_manifest()
    with shared_server.channel() as channel:
        response = shared_server.client(channel).score("baitiao-cn", "customer-1", applicants()[0])
    score = response.score
    assert 0.0 < score.probability_of_default < 1.0
    assert score.score == round(manifest.scaling.score(score.probability_of_default))
    assert score.grade == POLICY.score.grade_of(score.score)
    assert score.decision == expected_decision(score.score)
    metadata = response.metadata
    assert metadata.model_version == manifest.model_version
    assert metadata.policy_version == POLICY.version
    assert len(metadata.decision_id) == 36 and metadata.decided_at.seconds > 0


def test_adverse_decisions_carry_up_to_four_reasons_and_approvals_none(
    shared_server: ServerProcess,
) -> None:
    seen = set()
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        for index, features in enumerate(applicants()[:40]):
            score = client.score("baitiao-cn", f"c-{index}", features).score
            seen.add(score.decision)
            codes = [reason.code for reason in score.reasons]
            if score.decision == pb.CREDIT_DECISION_APPROVE:
                assert codes == []
            else:
                assert 1 <= len(codes) <= 4 and len(set(codes)) == len(codes)
                assert all(reason.text for reason in score.reasons)
    assert {pb.CREDIT_DECISION_APPROVE, pb.CREDIT_DECISION_DECLINE} <= seen


def test_reasons_are_faithful_to_the_model(shared_server: ServerProcess) -> None:
    """Setting the top reason's feature to its reference value moves the score more than
    doing so for any lower reason, as the served model itself scores it."""
    manifest = served_manifest()
    codes_to_feature = {spec.reason_code: spec.name for spec in manifest.schema.model_features}
    checked = 0
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        for index, features in enumerate(applicants()[:60]):
            base = client.score("t", f"f-{index}", features).score
            if len(base.reasons) < 2:
                continue
            gains = []
            for reason in base.reasons:
                name = codes_to_feature[reason.code]
                variant = {**features, name: manifest.reference_values[name]}
                moved = client.score("t", f"f-{index}", variant).score
                gains.append(base.probability_of_default - moved.probability_of_default)
            assert gains[0] > 0
            assert all(gains[0] > later for later in gains[1:]), gains
            checked += 1
    assert checked >= 5


def test_batch_scores_valid_items_and_reports_each_invalid_one(
    shared_server: ServerProcess,
) -> None:
    rows = list(applicants()[:6])
    rows[1] = {**rows[1], "duration_in_month": 999.0}  # out of the schema's range
    rows[4] = {k: v for k, v in rows[4].items() if k != "purpose"}  # missing feature
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        batch = client.score_batch("baitiao-cn", [(f"b-{i}", row) for i, row in enumerate(rows)])
        singles = [client.score("baitiao-cn", f"b-{i}", rows[i]).score for i in (0, 2, 3, 5)]
    results = list(batch.results)
    assert [r.index for r in results] == list(range(6))
    assert [r.WhichOneof("outcome") for r in results] == [
        "decision",
        "error",
        "decision",
        "decision",
        "error",
        "decision",
    ]
    assert results[1].error.code == code_pb2.INVALID_ARGUMENT
    assert "duration_in_month" in results[1].error.message or results[1].error.details
    assert results[4].error.code == code_pb2.INVALID_ARGUMENT
    batch_scores = [results[i].decision.score for i in (0, 2, 3, 5)]
    for from_batch, single in zip(batch_scores, singles, strict=True):
        assert from_batch.probability_of_default == pytest.approx(single.probability_of_default)
        assert from_batch.decision == single.decision
    sequences = [results[i].decision.metadata.audit_sequence for i in (0, 2, 3, 5)]
    assert len(set(sequences)) == 4
    ids = {results[i].decision.metadata.decision_id for i in (0, 2, 3, 5)}
    assert len(ids) == 4


def test_invalid_feature_value_is_named_never_echoed(shared_server: ServerProcess) -> None:
    features = {**applicants()[0], "purpose": "CANARY-purpose-31337"}
    with shared_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        shared_server.client(channel).score("t", "c", features)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(caught.value)
    (field,) = found
    assert field.startswith("features.fields[") and "purpose" in found[field]
    assert "CANARY" not in str(caught.value.details()) and "CANARY" not in found[field]


def test_batch_above_the_maximum_is_refused(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        shared_server.client(channel).score_batch(
            "t", [(f"x{i}", applicants()[0]) for i in range(257)]
        )
    assert violations(caught.value) == {"items": "must hold at most 256 items"}


def test_recorded_outputs_are_the_protobuf_json_mapping(shared_server: ServerProcess) -> None:
    """The hand-built audit outputs equal MessageToDict for served scores (adverse and not),
    for an all-default score, and for a score with every field set; but for the probability
    of default, which record format 2 writes as an integer in parts per billion."""

    def mapping(score: pb.CreditScore) -> dict[str, object]:
        expected = json_format.MessageToDict(score, preserving_proto_field_name=True)
        if "probability_of_default" in expected:
            expected[PD_PPB] = round(expected.pop("probability_of_default") * PPB)
        return expected

    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        scores = [
            client.score("baitiao-cn", f"outputs-{i}", row).score
            for i, row in enumerate(applicants()[:30])
        ]
    assert {s.decision for s in scores} >= {pb.CREDIT_DECISION_APPROVE, pb.CREDIT_DECISION_DECLINE}
    every_field = pb.CreditScore(
        probability_of_default=0.5,
        score=1,
        grade="A",
        decision=pb.CREDIT_DECISION_REVIEW,
        reasons=[common_pb2.Reason(code="C"), common_pb2.Reason(text="t")],
    )
    assert set(mapping(every_field)) == set(score_outputs(every_field))
    assert len(set(score_outputs(every_field))) == len(pb.CreditScore.DESCRIPTOR.fields)
    for score in [*scores, pb.CreditScore(), every_field]:
        assert score_outputs(score) == mapping(score)
        assert all(type(v) is not float for v in score_outputs(score).values())


def test_recorded_encrypted_inputs_read_back_as_received(shared_server: ServerProcess) -> None:
    features = sealed_request(shared_server, "mapping").features
    assert read_encrypted_inputs(encrypted_inputs(features)) == features


def test_skipping_features_already_at_reference_changes_no_reason() -> None:
    """Variants are made only for features not at their reference value; the reasons are
    exactly those of scoring every feature's variant."""
    scorer = Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)
    scaling, reference = scorer.manifest.scaling, scorer.manifest.reference_values
    rows = list(applicants()[:60])
    base = [scaling.score(float(p)) for p in scorer.probabilities(rows)]
    variants = scorer.reason_variants(scorer.columns(rows))
    assert len(variants.owner_rows) < len(rows) * len(scorer.features)
    ranked = scorer.rank_reasons(base, variants, scorer.run(variants.columns), 4)
    for row, score, reasons in zip(rows, base, ranked, strict=True):
        every = scorer.probabilities([{**row, f.name: reference[f.name]} for f in scorer.features])
        gains = sorted(
            (
                (scaling.score(float(p)) - score, f.name)
                for p, f in zip(every, scorer.features, strict=True)
            ),
            key=lambda gain: (-gain[0], gain[1]),
        )
        assert [r.feature for r in reasons] == [name for gain, name in gains[:4] if gain > 0]
