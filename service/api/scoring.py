"""ScoringService: Score and ScoreBatch."""

from __future__ import annotations

import grpc

from privscore.v1 import scoring_service_pb2 as pb
from privscore.v1 import scoring_service_pb2_grpc
from service.api import validation as check
from service.errors import Unimplemented


def validate_score(request: pb.ScoreRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    check.check_encrypted_features(v, "features", request.HasField("features"), request.features)
    v.raise_if_any()


def validate_score_batch(request: pb.ScoreBatchRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    if not request.items:
        v.add("items", "must hold at least one item", "REQUIRED_FIELD")
    elif len(request.items) > check.MAX_BATCH_ITEMS:
        v.add("items", f"must hold at most {check.MAX_BATCH_ITEMS} items", "BATCH_TOO_LARGE")
    v.raise_if_any()


class ScoringServicer(scoring_service_pb2_grpc.ScoringServiceServicer):
    async def Score(
        self,
        request: pb.ScoreRequest,
        context: grpc.aio.ServicerContext[pb.ScoreRequest, pb.ScoreResponse],
    ) -> pb.ScoreResponse:
        validate_score(request)
        raise Unimplemented("Score needs the model pipeline, which is not served yet")

    async def ScoreBatch(
        self,
        request: pb.ScoreBatchRequest,
        context: grpc.aio.ServicerContext[pb.ScoreBatchRequest, pb.ScoreBatchResponse],
    ) -> pb.ScoreBatchResponse:
        validate_score_batch(request)
        raise Unimplemented("ScoreBatch needs the model pipeline, which is not served yet")
