"""AlertService: EvaluateEvent and WatchAlerts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from privscore.v1 import alert_service_pb2 as pb
from privscore.v1 import alert_service_pb2_grpc
from service.api import validation as check
from service.decisions.alert_stream import AlertStream
from service.errors import Unimplemented

# Which money field each event kind carries, and whether it must be positive.
_EVENT_AMOUNTS = {
    "purchase": "amount",
    "repayment": "amount",
    "missed_payment": "amount_due",
    "limit_change": "new_limit",
}


def validate_evaluate_event(request: pb.EvaluateEventRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    if not request.HasField("event"):
        v.add("event", "is required", "REQUIRED_FIELD")
        v.raise_if_any()
    event = request.event
    check.check_pattern(
        v, "event.event_id", event.event_id, check.REQUEST_ID, "1-64 characters of [A-Za-z0-9._:-]"
    )
    check.check_timestamp(v, "event.occurred_at", event.HasField("occurred_at"), event.occurred_at)
    if event.HasField("balance_after"):
        check.check_money(v, "event.balance_after", True, event.balance_after, allow_zero=True)
    kind = event.WhichOneof("kind")
    if kind is None:
        v.add(
            "event.kind",
            "one of purchase, repayment, missed_payment, login, limit_change is required",
            "REQUIRED_FIELD",
        )
    else:
        details = getattr(event, kind)
        amount_field = _EVENT_AMOUNTS.get(kind)
        if amount_field is not None:
            check.check_money(
                v,
                f"event.{kind}.{amount_field}",
                details.HasField(amount_field),
                getattr(details, amount_field),
                allow_zero=False,
            )
        if kind == "repayment":
            check.check_enum(
                v, "event.repayment.outcome", details.outcome, pb.RepaymentOutcome.DESCRIPTOR
            )
        if kind == "missed_payment":
            v.require(
                details.days_past_due >= 1,
                "event.missed_payment.days_past_due",
                "must be at least 1",
            )
    v.raise_if_any()


def validate_watch_alerts(request: pb.WatchAlertsRequest) -> None:
    v = check.Violations()
    check.check_enum(
        v, "min_severity", request.min_severity, pb.Severity.DESCRIPTOR, allow_unspecified=True
    )
    v.raise_if_any()


class AlertServicer(alert_service_pb2_grpc.AlertServiceServicer):
    def __init__(self, stream: AlertStream) -> None:
        self._stream = stream

    async def EvaluateEvent(
        self,
        request: pb.EvaluateEventRequest,
        context: grpc.aio.ServicerContext[pb.EvaluateEventRequest, pb.EvaluateEventResponse],
    ) -> pb.EvaluateEventResponse:
        validate_evaluate_event(request)
        raise Unimplemented("EvaluateEvent needs the alert rules, which are not served yet")

    async def WatchAlerts(
        self,
        request: pb.WatchAlertsRequest,
        context: grpc.aio.ServicerContext[pb.WatchAlertsRequest, pb.WatchAlertsResponse],
    ) -> AsyncIterator[pb.WatchAlertsResponse]:
        validate_watch_alerts(request)
        after = request.after_sequence if request.HasField("after_sequence") else None
        async for alert in self._stream.subscribe(request.min_severity, after):
            yield pb.WatchAlertsResponse(alert=alert)
