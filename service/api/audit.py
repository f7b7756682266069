"""AuditService: a decision's record and its inclusion proof, for reviewers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privscore.v1 import audit_service_pb2 as pb
from privscore.v1 import audit_service_pb2_grpc
from service.api import validation as check
from service.api.runtime import RuntimeSlot
from service.audit import find_with_inclusion_proof, latest_checkpoint
from service.errors import FailedPrecondition, ServiceError

DECISION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "DECISION_NOT_FOUND"


def find_with_proof(
    audit_dir: Path, public_key: Ed25519PublicKey, origin: str, decision_id: str
) -> pb.GetDecisionRecordResponse:
    """Search only the checkpointed prefix: it is signed, and no append is racing it."""
    checkpoint = latest_checkpoint(audit_dir, public_key, origin)
    if checkpoint is None or checkpoint.size == 0:
        raise FailedPrecondition(
            "no signed checkpoint yet; records become provable within seconds",
            reason="NOT_YET_CHECKPOINTED",
        )
    found = find_with_inclusion_proof(
        audit_dir, checkpoint.size, equals={"decision_id": decision_id}
    )
    if found is None:
        raise NotFound(f"decision {decision_id} is not in the log")
    stored, proof = found
    if proof is None:
        raise NotFound(
            f"decision {decision_id} is newer than the latest checkpoint (size "
            f"{checkpoint.size}); it is provable after the next checkpoint"
        )
    return pb.GetDecisionRecordResponse(
        sequence=stored.sequence,
        record=stored.envelope,
        tree_size=checkpoint.size,
        inclusion_proof=proof,
        checkpoint=checkpoint.text,
    )


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    def __init__(self, slot: RuntimeSlot, audit_dir: Path, origin: str) -> None:
        self._slot = slot
        self._audit_dir = audit_dir
        self._origin = origin

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
        public_key = self._slot.runtime.audit_public_key
        return await asyncio.to_thread(
            find_with_proof, self._audit_dir, public_key, self._origin, request.decision_id
        )
