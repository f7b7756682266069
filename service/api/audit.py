"""AuditService: a decision's record and its inclusion proof, for reviewers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc

from privscore.v1 import audit_service_pb2 as pb
from privscore.v1 import audit_service_pb2_grpc
from service.api import validation as check
from service.api.runtime import Proven, Prover, RuntimeSlot
from service.audit import NotProvable, VerifierKey, prove_record
from service.errors import FailedPrecondition, ServiceError

DECISION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "DECISION_NOT_FOUND"


def file_prover(audit_dir: Path, verifier: VerifierKey, origin: str) -> Prover:
    """The file log's lookup (through its index), off the event loop. It searches only the
    checkpointed prefix: it is signed, and no append is racing it."""

    async def prove(decision_id: str) -> Proven:
        return await asyncio.to_thread(
            prove_record, audit_dir, verifier, origin, equals={"decision_id": decision_id}
        )

    return prove


async def find_with_proof(prove: Prover, decision_id: str) -> pb.GetDecisionRecordResponse:
    try:
        checkpoint, stored, proof = await prove(decision_id)
    except NotProvable as error:
        if error.why == "NO_CHECKPOINT":
            raise FailedPrecondition(str(error), reason="NOT_YET_CHECKPOINTED") from None
        raise NotFound(str(error)) from None
    return pb.GetDecisionRecordResponse(
        sequence=stored.sequence,
        record=stored.envelope,
        tree_size=checkpoint.size,
        inclusion_proof=proof,
        checkpoint=checkpoint.text,
    )


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    def __init__(self, slot: RuntimeSlot) -> None:
        self._slot = slot

    async def GetDecisionRecord(
        self,
        request: pb.GetDecisionRecordRequest,
        context: grpc.aio.ServicerContext[
            pb.GetDecisionRecordRequest, pb.GetDecisionRecordResponse
        ],
    ) -> pb.GetDecisionRecordResponse:
        v = check.Violations()
        check.check_pattern(
            v,
            "decision_id",
            request.decision_id,
            DECISION_ID,
            "a UUID in canonical lower-case form",
        )
        v.raise_if_any()
        return await find_with_proof(self._slot.runtime.prove, request.decision_id)
