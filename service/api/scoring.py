"""ScoringService: Score and ScoreBatch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from privscore.v1 import common_pb2, scoring_service_pb2_grpc
from privscore.v1 import scoring_service_pb2 as pb
from service.api import validation as check
from service.api.features import encrypted_inputs, open_row, request_scorer
from service.api.ledger import SubjectScore
from service.api.runtime import Runtime, RuntimeSlot
from service.api.validation import well_formed_subject
from service.audit.record import PD_PPB, PPB
from service.decisions.policy import LimitPolicy, ScorePolicy
from service.decisions.rows import RecordedScore
from service.errors import ServiceError
from service.model.scorer import ModelBatcher, Row, Scorer
from service.monitoring.tracing import stage

SCORE_METHOD = "/privscore.v1.ScoringService/Score"
SCORE_BATCH_METHOD = "/privscore.v1.ScoringService/ScoreBatch"
_log = structlog.get_logger("privscore.decisions")
_DECISIONS = {
    "APPROVE": pb.CREDIT_DECISION_APPROVE,
    "REVIEW": pb.CREDIT_DECISION_REVIEW,
    "DECLINE": pb.CREDIT_DECISION_DECLINE,
}


def validate_score(request: pb.ScoreRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    check.check_encrypted_features(v, "features", request.HasField("features"), request.features)
    check.check_offer_currency(v, "offer_currency", request.offer_currency)
    v.raise_if_any()


def validate_batch_envelope(request: pb.ScoreBatchRequest) -> None:
    """The request as a whole; each item is validated on its own and fails on its own."""
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    if not request.items:
        v.add("items", "must hold at least one item", "REQUIRED_FIELD")
    elif len(request.items) > check.MAX_BATCH_ITEMS:
        v.add("items", f"must hold at most {check.MAX_BATCH_ITEMS} items", "BATCH_TOO_LARGE")
    check.check_offer_currency(v, "offer_currency", request.offer_currency)
    v.raise_if_any()


def check_offer_supported(policy: LimitPolicy, currency: str) -> None:
    if currency and currency not in policy.initial:
        raise check.CurrencyNotSupported(
            f"offer_currency: the limit policy has no initial limits for {currency}"
        )


def validate_batch_item(item: pb.ScoreBatchItem) -> None:
    v = check.Violations()
    check.check_subject(v, "subject", item.HasField("subject"), item.subject)
    check.check_encrypted_features(v, "features", item.HasField("features"), item.features)
    v.raise_if_any()


@dataclass
class _Applicant:
    subject: common_pb2.SubjectRef
    features: common_pb2.EncryptedFeatures
    row: Row


class ScoringServicer(scoring_service_pb2_grpc.ScoringServiceServicer):
    def __init__(self, slot: RuntimeSlot) -> None:
        self._slot = slot

    async def Score(
        self,
        request: pb.ScoreRequest,
        context: grpc.aio.ServicerContext[pb.ScoreRequest, pb.ScoreResponse],
    ) -> pb.ScoreResponse:
        validate_score(request)
        runtime = self._slot.runtime
        check_offer_supported(runtime.policy.limits, request.offer_currency)
        with stage("decrypt"):
            row = open_row(
                request_scorer(
                    runtime.scorer, challenger_of(runtime), request.features.schema_version
                ),
                runtime.opener,
                request.features,
                request.subject,
                method=SCORE_METHOD,
                request_id=request.request_id,
            )
        applicant = _Applicant(request.subject, request.features, row)
        (response,) = await _decide(
            runtime, SCORE_METHOD, request.request_id, [applicant], request.offer_currency
        )
        return response

    async def ScoreBatch(
        self,
        request: pb.ScoreBatchRequest,
        context: grpc.aio.ServicerContext[pb.ScoreBatchRequest, pb.ScoreBatchResponse],
    ) -> pb.ScoreBatchResponse:
        validate_batch_envelope(request)
        runtime = self._slot.runtime
        check_offer_supported(runtime.policy.limits, request.offer_currency)
        results = [pb.ScoreBatchResult(index=i) for i in range(len(request.items))]
        applicants: list[_Applicant] = []
        positions: list[int] = []
        refusals = []
        opened_keys: dict[bytes, Any] = {}  # one HPKE open per distinct sealed data key
        with stage("decrypt", rows=len(request.items)):
            for index, item in enumerate(request.items):
                try:
                    validate_batch_item(item)
                    row = open_row(
                        request_scorer(
                            runtime.scorer,
                            challenger_of(runtime),
                            item.features.schema_version,
                        ),
                        runtime.opener,
                        item.features,
                        item.subject,
                        method=SCORE_BATCH_METHOD,
                        request_id=request.request_id,
                        opened_keys=opened_keys,
                    )
                except ServiceError as error:
                    results[index].error.CopyFrom(error.to_status())
                    refusals.append(
                        runtime.audit_refusal(
                            SCORE_BATCH_METHOD, request.request_id, well_formed_subject(item), error
                        )
                    )
                    continue
                applicants.append(_Applicant(item.subject, item.features, row))
                positions.append(index)
        responses = await _decide(
            runtime, SCORE_BATCH_METHOD, request.request_id, applicants, request.offer_currency
        )
        await asyncio.gather(*refusals)
        for index, response in zip(positions, responses, strict=True):
            results[index].decision.CopyFrom(response)
        return pb.ScoreBatchResponse(results=results)


def score_outputs(score: pb.CreditScore) -> dict[str, Any]:
    """The score for the audit record, in the protobuf JSON mapping (`MessageToDict` with
    proto field names: defaults omitted, enums by name), built by hand because it runs for
    every decision and `MessageToDict` costs several times more. The probability of default
    is written in parts per billion, an integer (record format 2): with no float in a record,
    its canonical JSON is RFC 8785's, which any language reproduces."""
    outputs: dict[str, Any] = {}
    if score.probability_of_default:
        outputs[PD_PPB] = round(score.probability_of_default * PPB)
    if score.score:
        outputs["score"] = score.score
    if score.grade:
        outputs["grade"] = score.grade
    if score.decision:
        outputs["decision"] = pb.CreditDecision.Name(score.decision)
    if score.reasons:
        outputs["reasons"] = [
            {key: value for key, value in (("code", r.code), ("text", r.text)) if value}
            for r in score.reasons
        ]
    return outputs


def verdict(score: int, policy: ScorePolicy) -> str:
    """APPROVE, REVIEW or DECLINE: the policy's thresholds on the score."""
    if score >= policy.approve_min_score:
        return "APPROVE"
    return "REVIEW" if score >= policy.review_min_score else "DECLINE"


async def shadow(
    challenger: ModelBatcher | None, policy: ScorePolicy, rows: Sequence[Row]
) -> list[dict[str, Any] | None]:
    """The challenger's assessment of the rows the champion decides, for the audit record
    only (`shadow`): its probability of default, score, grade and decision, no reasons (no
    one is told them). A challenger that fails is logged and leaves no shadow: the champion's
    decision is answered regardless."""
    if challenger is None or not rows:
        return [None] * len(rows)
    scorer = challenger.scorer
    # A row under the champion's older schema lacks what a challenger on a newer one needs:
    # it is recorded as not shadowed, never guessed at.
    needed = scorer.manifest.schema.model_feature_names
    scorable = [i for i, row in enumerate(rows) if needed <= row.keys()]
    shadows: list[dict[str, Any] | None] = [
        {"model_version": scorer.model_version, "skipped": "SCHEMA_VERSION"} for _ in rows
    ]
    if not scorable:
        return shadows
    try:
        with stage("model", rows=len(scorable)):
            probabilities = (
                await challenger.probabilities(scorer.columns([rows[i] for i in scorable]))
            ).tolist()
    except Exception as error:  # noqa: BLE001 - the shadow never fails a decision
        _log.error("shadow.failed", model_version=scorer.model_version, error=type(error).__name__)
        return [None] * len(rows)
    for index, probability in zip(scorable, probabilities, strict=True):
        score = round(scorer.manifest.scaling.score(probability))
        shadows[index] = {
            "model_version": scorer.model_version,
            "model_manifest_sha256": scorer.manifest_sha256,
            PD_PPB: round(probability * PPB),
            "score": score,
            "grade": policy.grade_of(score),
            "decision": f"CREDIT_DECISION_{verdict(score, policy)}",
        }
    return shadows


def challenger_of(runtime: Runtime) -> Scorer | None:
    return runtime.challenger.scorer if runtime.challenger is not None else None


async def assess(
    model: ModelBatcher, policy: ScorePolicy, rows: Sequence[Row]
) -> list[pb.CreditScore]:
    """Score rows in one model run and explain the adverse ones in one more. Pure: the same
    model, policy and rows always give the same result, which is what `audit replay` checks."""
    if not rows:
        return []
    scorer = model.scorer
    columns = scorer.columns(rows)
    with stage("model", rows=len(rows)):
        probabilities = (await model.probabilities(columns)).tolist()
    with stage("policy"):
        exact_scores = [scorer.manifest.scaling.score(p) for p in probabilities]
        scores = [round(s) for s in exact_scores]
        verdicts = [verdict(s, policy) for s in scores]
    adverse = [i for i, verdict in enumerate(verdicts) if verdict != "APPROVE"]
    explained = []
    if adverse:
        variants = scorer.reason_variants(columns.take(adverse))
        with stage("model", rows=len(variants.columns)):
            variant_probabilities = await model.probabilities(variants.columns)
        explained = scorer.rank_reasons(
            [exact_scores[i] for i in adverse], variants, variant_probabilities, policy.max_reasons
        )
    reasons = dict(zip(adverse, explained, strict=True))
    return [
        pb.CreditScore(
            probability_of_default=probabilities[i],
            score=scores[i],
            grade=policy.grade_of(scores[i]),
            decision=_DECISIONS[verdicts[i]],
            reasons=[common_pb2.Reason(code=r.code, text=r.text) for r in reasons.get(i, [])],
        )
        for i in range(len(rows))
    ]


def offer(
    runtime: Runtime, response: pb.ScoreResponse, currency: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The initial-limit offer of an approved applicant (set on `response`), as the audit
    record's fields: (in clear, the rule and currency as `offer`; personal, sealed with the
    subject's other fields, the amount as `initial_limit`: a limit is personal financial
    data). Both empty: no offer."""
    score = response.score
    found = (
        runtime.policy.limits.initial_offer(currency, score.grade)
        if currency and score.decision == pb.CREDIT_DECISION_APPROVE
        else None
    )
    if found is None:
        return {}, {}
    amount, rule = found
    response.initial_limit.CopyFrom(
        pb.InitialLimitOffer(
            limit=common_pb2.Money(currency_code=currency, minor_units=amount), rule=rule
        )
    )
    return {"offer": {"currency": currency, "rule": rule}}, {"initial_limit": amount}


async def _decide(
    runtime: Runtime,
    method: str,
    request_id: str,
    applicants: Sequence[_Applicant],
    offer_currency: str = "",
) -> list[pb.ScoreResponse]:
    """Assess every applicant, audit every decision (concurrently, so group commit makes them
    one fsync), then reply."""
    rows = [a.row for a in applicants]
    scores, shadows = await asyncio.gather(
        assess(runtime.model, runtime.policy.score, rows),
        shadow(runtime.challenger, runtime.policy.score, rows),
    )
    decided_at = runtime.clock()
    seals = await runtime.subject_seals([a.subject for a in applicants], decided_at)
    responses = []
    records = []
    for applicant, score, seal, shadowed in zip(applicants, scores, seals, shadows, strict=True):
        response = pb.ScoreResponse(metadata=runtime.metadata(request_id, decided_at), score=score)
        responses.append(response)
        offered, offered_amount = offer(runtime, response, offer_currency)
        records.append(
            runtime.record(
                method,
                response.metadata,
                applicant.subject,
                seal=seal,
                personal={
                    "input_digest": runtime.input_digest(dict(applicant.row)),
                    "encrypted_inputs": encrypted_inputs(applicant.features),
                    **offered_amount,
                },
                outputs=score_outputs(response.score),
                **offered,
                # The challenger's view of the same row, marked: never the reply.
                **({"shadow": shadowed} if shadowed else {}),
            )
        )
    latest = [
        SubjectScore(
            applicant.subject.tenant,
            applicant.subject.pseudonym,
            RecordedScore(
                decision_id=response.metadata.decision_id,
                scored_at=decided_at,
                score=response.score.score,
                grade=response.score.grade,
                decision=pb.CreditDecision.Name(response.score.decision).removeprefix(
                    "CREDIT_DECISION_"
                ),
                model_version=response.metadata.model_version,
            ),
        )
        for applicant, response in zip(applicants, responses, strict=True)
    ]
    with stage("audit", records=len(records)):
        sequences = await runtime.ledger.commit_scores(records, latest)
    for response, sequence in zip(responses, sequences, strict=True):
        response.metadata.audit_sequence = sequence
    runtime.observe_drift([a.row for a in applicants], [s.score for s in scores])
    return responses
