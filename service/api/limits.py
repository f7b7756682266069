"""LimitService: AdjustLimit."""

from __future__ import annotations

import grpc

from privscore.v1 import limit_service_pb2 as pb
from privscore.v1 import limit_service_pb2_grpc
from service.api import validation as check
from service.errors import Unimplemented


def validate_adjust_limit(request: pb.AdjustLimitRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    if not request.HasField("account"):
        v.add("account", "is required", "REQUIRED_FIELD")
    else:
        account = request.account
        check.check_money(
            v,
            "account.current_limit",
            account.HasField("current_limit"),
            account.current_limit,
            allow_zero=False,
        )
        check.check_money(
            v, "account.balance", account.HasField("balance"), account.balance, allow_zero=True
        )
        check.check_same_currency(
            v,
            [
                ("account.current_limit", account.current_limit),
                ("account.balance", account.balance),
            ],
        )
    source = request.WhichOneof("score_source")
    if source is None:
        v.add("score_source", "one of latest_score or features is required", "REQUIRED_FIELD")
    elif source == "features":
        check.check_encrypted_features(v, "features", True, request.features)
    v.raise_if_any()


class LimitServicer(limit_service_pb2_grpc.LimitServiceServicer):
    async def AdjustLimit(
        self,
        request: pb.AdjustLimitRequest,
        context: grpc.aio.ServicerContext[pb.AdjustLimitRequest, pb.AdjustLimitResponse],
    ) -> pb.AdjustLimitResponse:
        validate_adjust_limit(request)
        raise Unimplemented("AdjustLimit needs the limit policy, which is not served yet")
