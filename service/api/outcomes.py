"""OutcomeService: what happened after a Score decision, recorded for judging the models.

An outcome names its decision by id only, never the customer: the audit log joins the two
(`privscore-model report` reads them from an export), and the outcome's own record holds no
subject at all. The latest outcome recorded for a decision under one definition is the one
that counts.
"""

from __future__ import annotations

import datetime as dt

import grpc

from privscore.v1 import outcome_service_pb2 as pb
from privscore.v1 import outcome_service_pb2_grpc
from service.api import validation as check
from service.api.audit import DECISION_ID
from service.api.privacy import DecisionNotFound
from service.api.runtime import RuntimeSlot
from service.api.scoring import SCORE_BATCH_METHOD, SCORE_METHOD
from service.audit.verify import parse_time
from service.errors import FailedPrecondition
from service.monitoring.tracing import stage
from service.privacy.sealing import CLOCK_SKEW_S

RECORD_OUTCOME_METHOD = (
    f"/{pb.DESCRIPTOR.services_by_name['OutcomeService'].full_name}/RecordOutcome"
)
# The field of an outcome's record that holds it (not `outcome`, which a refusal's record
# uses for "refused").
OUTCOME = "observed"


class NotAScore(FailedPrecondition):
    reason = "NOT_A_SCORE_DECISION"


def validate_record_outcome(request: pb.RecordOutcomeRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_pattern(
        v, "decision_id", request.decision_id, DECISION_ID, "a UUID in canonical lower-case form"
    )
    check.check_enum(v, "outcome", request.outcome, pb.Outcome.DESCRIPTOR)
    check.check_timestamp(v, "observed_at", request.HasField("observed_at"), request.observed_at)
    check.check_pattern(
        v,
        "definition",
        request.definition,
        check.REASON_CODE,
        "an upper-snake-case code of 1-64 characters, e.g. DPD90_WITHIN_12M",
    )
    v.raise_if_any()


class OutcomeServicer(outcome_service_pb2_grpc.OutcomeServiceServicer):
    def __init__(self, slot: RuntimeSlot) -> None:
        self._slot = slot

    async def RecordOutcome(
        self,
        request: pb.RecordOutcomeRequest,
        context: grpc.aio.ServicerContext[pb.RecordOutcomeRequest, pb.RecordOutcomeResponse],
    ) -> pb.RecordOutcomeResponse:
        validate_record_outcome(request)
        runtime = self._slot.runtime
        mentioning = await runtime.records.mentioning(request.decision_id)
        decision = next(
            (
                s.record
                for s in mentioning
                if s.record.get("decision_id") == request.decision_id
                and s.record.get("outcome") != "refused"
            ),
            None,
        )
        if decision is None:
            raise DecisionNotFound(f"no decision {request.decision_id} is in the audit log")
        if decision.get("rpc") not in (SCORE_METHOD, SCORE_BATCH_METHOD):
            raise NotAScore("outcomes are recorded for Score and ScoreBatch decisions")
        observed = request.observed_at.ToDatetime(tzinfo=dt.UTC)
        decided = parse_time(decision.get("time"))
        now = runtime.clock()
        v = check.Violations()
        v.require(
            decided is None or observed >= decided,
            "observed_at",
            "must not be before the decision was made",
        )
        v.require(
            observed <= now + dt.timedelta(seconds=CLOCK_SKEW_S),
            "observed_at",
            "must not be in the future",
        )
        v.raise_if_any()
        definition = request.definition
        replaced = any(
            isinstance(s.record.get(OUTCOME), dict)
            and s.record["rpc"] == RECORD_OUTCOME_METHOD
            and s.record[OUTCOME].get("decision_id") == request.decision_id
            and s.record[OUTCOME].get("definition") == definition
            for s in mentioning
        )
        metadata = runtime.metadata(request.request_id, now)
        record = runtime.record(RECORD_OUTCOME_METHOD, metadata, None)
        record[OUTCOME] = {
            "decision_id": request.decision_id,
            "outcome": pb.Outcome.Name(request.outcome).removeprefix("OUTCOME_"),
            "observed_at": request.observed_at.ToJsonString(),
            "definition": definition,
            "replaces_earlier": replaced,
        }
        with stage("audit", records=1):
            metadata.audit_sequence = await runtime.audit.append(record)
        return pb.RecordOutcomeResponse(metadata=metadata, replaced=replaced)
