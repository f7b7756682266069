"""AlertService: EvaluateEvent and WatchAlerts."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from privscore.client.envelope import EVENT_CLEAR_FIELDS, EVENT_MONEY_FIELDS
from privscore.v1 import alert_service_pb2 as pb
from privscore.v1 import alert_service_pb2_grpc, common_pb2
from service.api import validation as check
from service.api.figures import check_event_clear_fields, open_event
from service.api.runtime import DECISION_ATTEMPTS, Runtime, RuntimeSlot, decided_again
from service.callctx import CALLER
from service.decisions.alert_rules import MISSED_PAYMENT, REPAYMENT, Event, evaluate
from service.decisions.rows import StateChanged
from service.errors import Aborted, FailedPrecondition, NotFound
from service.monitoring.tracing import stage

EVALUATE_EVENT_METHOD = "/privscore.v1.AlertService/EvaluateEvent"
UPDATE_ALERT_STATE_METHOD = "/privscore.v1.AlertService/UpdateAlertState"
_STATE_PREFIX = "ALERT_STATE_"


class AlertNotFound(NotFound):
    reason = "ALERT_NOT_FOUND"


class AlertStateConflict(FailedPrecondition):
    reason = "ALERT_STATE_CONFLICT"


# Which money field each event kind carries in memory once its sealed figures are opened.
_EVENT_AMOUNTS = {
    kind: EVENT_CLEAR_FIELDS[kind][name]
    for kind, names in EVENT_MONEY_FIELDS.items()
    for name in names
}


def validate_evaluate_event(request: pb.EvaluateEventRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    if not request.HasField("event"):
        v.add("event", "is required", "REQUIRED_FIELD")
        v.raise_if_any()
    event = request.event
    check.check_request_id(v, "event.event_id", event.event_id)  # ids share one shape
    check.check_timestamp(v, "event.occurred_at", event.HasField("occurred_at"), event.occurred_at)
    kind = event.WhichOneof("kind")
    if kind is None:
        v.add(
            "event.kind",
            "one of purchase, repayment, missed_payment, login, limit_change is required",
            "REQUIRED_FIELD",
        )
    elif kind == "repayment":
        check.check_enum(
            v, "event.repayment.outcome", event.repayment.outcome, pb.RepaymentOutcome.DESCRIPTOR
        )
    # The figures travel sealed: clear ones are refused, the sealed ones checked once opened.
    check_event_clear_fields(v, event)
    v.raise_if_any()


def validate_update_alert_state(request: pb.UpdateAlertStateRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    v.require(
        request.alert_sequence > 0, "alert_sequence", "must be an alert's sequence (1 or more)"
    )
    if request.state not in (pb.ALERT_STATE_ACKNOWLEDGED, pb.ALERT_STATE_RESOLVED):
        v.add("state", "must be ALERT_STATE_ACKNOWLEDGED or ALERT_STATE_RESOLVED")
    check.check_pattern(
        v,
        "reason_code",
        request.reason_code,
        check.REASON_CODE,
        "an upper-snake-case code of 1-64 characters",
    )
    v.raise_if_any()


def validate_watch_alerts(request: pb.WatchAlertsRequest) -> None:
    v = check.Violations()
    check.check_enum(
        v, "min_severity", request.min_severity, pb.Severity.DESCRIPTOR, allow_unspecified=True
    )
    v.raise_if_any()


_SEVERITIES = {
    "LOW": pb.SEVERITY_LOW,
    "MEDIUM": pb.SEVERITY_MEDIUM,
    "HIGH": pb.SEVERITY_HIGH,
    "CRITICAL": pb.SEVERITY_CRITICAL,
}
_ACTIONS = {
    "NONE": pb.RECOMMENDED_ACTION_NONE,
    "REVIEW": pb.RECOMMENDED_ACTION_REVIEW,
    "REDUCE_LIMIT": pb.RECOMMENDED_ACTION_REDUCE_LIMIT,
    "FREEZE": pb.RECOMMENDED_ACTION_FREEZE,
}


def to_event(event: pb.BehaviourEvent) -> Event:
    """The rules' view of a validated wire event."""
    kind = event.WhichOneof("kind")
    assert kind is not None  # validated
    details = getattr(event, kind)
    amount_field = _EVENT_AMOUNTS.get(kind)
    money = getattr(details, amount_field) if amount_field else None
    balance = event.balance_after if event.HasField("balance_after") else None
    currency_source = money or balance
    return Event(
        event_id=event.event_id,
        occurred_at=event.occurred_at.ToDatetime(tzinfo=dt.UTC),
        kind=kind,
        currency=currency_source.currency_code if currency_source else None,
        amount=money.minor_units if money else None,
        succeeded=(details.outcome == pb.REPAYMENT_OUTCOME_SUCCEEDED)
        if kind == REPAYMENT
        else None,
        days_past_due=details.days_past_due if kind == MISSED_PAYMENT else None,
        balance_after=balance.minor_units if balance else None,
    )


def clear_event_fields(wire_event: pb.BehaviourEvent, event: Event) -> dict[str, Any]:
    """What an EvaluateEvent record keeps readable of the event: no amount, outcome or days."""
    return {
        "event_id": event.event_id,
        "occurred_at": wire_event.occurred_at.ToJsonString(),
        "kind": event.kind,
        "currency": event.currency,
    }


def sealed_event_fields(
    wire_event: pb.BehaviourEvent, event: Event, alerts: list[pb.Alert]
) -> dict[str, Any]:
    """What an EvaluateEvent record seals: the event as received, its details as the decision
    store keeps them, and the alerts raised as stored, so the events and alerts rows can be
    rebuilt from the log. The alerts carry the decision's metadata without `audit_sequence`
    (the record's own sequence) and no stream sequence (the store's row number)."""
    details = dataclasses.asdict(event)
    del details["event_id"], details["occurred_at"]  # in clear, and the store's row keys
    return {
        "event": json_format.MessageToDict(wire_event, preserving_proto_field_name=True),
        "details": details,
        "alerts": [base64.b64encode(a.SerializeToString()).decode("ascii") for a in alerts],
    }


class AlertServicer(alert_service_pb2_grpc.AlertServiceServicer):
    def __init__(self, slot: RuntimeSlot) -> None:
        self._slot = slot

    async def EvaluateEvent(
        self,
        request: pb.EvaluateEventRequest,
        context: grpc.aio.ServicerContext[pb.EvaluateEventRequest, pb.EvaluateEventResponse],
    ) -> pb.EvaluateEventResponse:
        validate_evaluate_event(request)
        runtime = self._slot.runtime
        subject = request.subject
        with stage("decrypt"):
            event = open_event(
                runtime.opener,
                request.event,
                subject,
                method=EVALUATE_EVENT_METHOD,
                identity=CALLER.get(),
                request_id=request.request_id,
            )
        async with runtime.subject_locks.hold((subject.tenant, subject.pseudonym)):
            for attempt in range(1, DECISION_ATTEMPTS + 1):
                try:
                    response = await self._evaluate(runtime, request, event)
                    break
                except StateChanged as changed:
                    decided_again(EVALUATE_EVENT_METHOD, attempt, changed)
            else:
                raise Aborted(
                    "other replicas kept changing this customer's events; retry the request",
                    reason="CONCURRENT_DECISIONS",
                )
        runtime.alerts.publish(response.alerts)
        return response

    async def _evaluate(
        self, runtime: Runtime, request: pb.EvaluateEventRequest, opened: pb.BehaviourEvent
    ) -> pb.EvaluateEventResponse:
        """Evaluate the event (its figures opened, in memory) on the customer's stored history
        and commit it with its alerts (a duplicate event id is logged, not stored again)."""
        subject = request.subject
        event = to_event(opened)
        ledger = runtime.ledger
        now = runtime.clock()
        response = pb.EvaluateEventResponse(metadata=runtime.metadata(request.request_id, now))
        duplicate = await ledger.has_event(subject.tenant, subject.pseudonym, event.event_id)
        raised = []
        history: list[Event] = []
        if not duplicate:
            history = await ledger.events(subject.tenant, subject.pseudonym)
            with stage("policy"):
                raised = evaluate(runtime.policy.alerts, event, history)
        alerts = [
            pb.Alert(
                subject=subject,
                rule=alert.rule,
                severity=_SEVERITIES[alert.outcome.severity],
                recommended_action=_ACTIONS[alert.outcome.action],
                reasons=[common_pb2.Reason(code=c, text=t) for c, t in alert.reasons],
                event_id=event.event_id,
                metadata=response.metadata,
                state=pb.ALERT_STATE_OPEN,
            )
            for alert in raised
        ]
        alerts.sort(key=lambda a: -a.severity)
        response.duplicate = duplicate
        metadata = response.metadata
        (seal,) = await runtime.subject_seals([subject], now)
        record = runtime.record(
            EVALUATE_EVENT_METHOD,
            metadata,
            subject,
            seal=seal,
            # Amounts, balance, outcome and days past due: personal financial data.
            personal=sealed_event_fields(opened, event, alerts),
            event=clear_event_fields(opened, event),
            outputs={
                "duplicate": duplicate,
                "alerts": [
                    {
                        "rule": a.rule,
                        "severity": pb.Severity.Name(a.severity),
                        "action": pb.RecommendedAction.Name(a.recommended_action),
                        "reasons": [r.code for r in a.reasons],
                    }
                    for a in alerts
                ],
            },
        )

        def stored_alerts(sequence: int) -> list[bytes]:
            for alert in alerts:
                alert.metadata.audit_sequence = sequence
            return [alert.SerializeToString() for alert in alerts]

        with stage("audit", records=1):
            metadata.audit_sequence, sequences = await ledger.commit_event(
                record,
                tenant=subject.tenant,
                pseudonym=subject.pseudonym,
                event=event,
                duplicate=duplicate,
                seen_history=[known.event_id for known in history],
                alerts=stored_alerts,
                raised_at=now,
                forget_before=event.occurred_at
                - dt.timedelta(days=runtime.policy.alerts.retention_days),
            )
        if duplicate:
            return response
        for alert, sequence in zip(alerts, sequences, strict=True):
            alert.metadata.audit_sequence = metadata.audit_sequence
            alert.sequence = alert.alert_sequence = sequence
        response.alerts.extend(alerts)
        return response

    async def UpdateAlertState(
        self,
        request: pb.UpdateAlertStateRequest,
        context: grpc.aio.ServicerContext[pb.UpdateAlertStateRequest, pb.UpdateAlertStateResponse],
    ) -> pb.UpdateAlertStateResponse:
        validate_update_alert_state(request)
        runtime = self._slot.runtime
        ledger = runtime.ledger
        found = await ledger.alert_state(request.alert_sequence)
        if found is None:
            raise AlertNotFound(f"no alert {request.alert_sequence} is kept")
        subject = pb.Alert.FromString(found[1]).subject
        async with runtime.subject_locks.hold((subject.tenant, subject.pseudonym)):
            for attempt in range(1, DECISION_ATTEMPTS + 1):
                try:
                    update = await self._update(runtime, request)
                    break
                except StateChanged as changed:
                    decided_again(UPDATE_ALERT_STATE_METHOD, attempt, changed)
            else:
                raise Aborted(
                    "other replicas kept changing this alert; retry the request",
                    reason="CONCURRENT_DECISIONS",
                )
        runtime.alerts.publish([update])
        return pb.UpdateAlertStateResponse(alert=update, metadata=update.metadata)

    async def _update(self, runtime: Runtime, request: pb.UpdateAlertStateRequest) -> pb.Alert:
        """Move the alert to the requested state on what is stored now, log and apply it."""
        found = await runtime.ledger.alert_state(request.alert_sequence)
        if found is None:
            raise AlertNotFound(f"no alert {request.alert_sequence} is kept")
        state, blob = found
        wanted = pb.AlertState.Name(request.state).removeprefix(_STATE_PREFIX)
        if state == "RESOLVED":
            raise AlertStateConflict(f"alert {request.alert_sequence} is resolved, which is final")
        if state == wanted:
            raise AlertStateConflict(f"alert {request.alert_sequence} is {state.lower()} already")
        now = runtime.clock()
        metadata = runtime.metadata(request.request_id, now)
        update = pb.Alert.FromString(blob)
        update.alert_sequence = request.alert_sequence
        update.state = request.state
        update.state_reason = request.reason_code
        update.metadata.CopyFrom(metadata)
        (seal,) = await runtime.subject_seals([update.subject], now)
        record = runtime.record(
            UPDATE_ALERT_STATE_METHOD,
            metadata,
            update.subject,
            seal=seal,
            # The alert as the stream carries the change, so the row can be rebuilt.
            personal={"update": base64.b64encode(update.SerializeToString()).decode("ascii")},
            alert={
                "alert_sequence": request.alert_sequence,
                "rule": update.rule,
                "severity": pb.Severity.Name(update.severity),
                "from": state,
                "to": wanted,
                "reason": request.reason_code,
            },
        )

        def stored(sequence: int) -> list[bytes]:
            update.metadata.audit_sequence = sequence
            return [update.SerializeToString()]

        with stage("audit", records=1):
            audit_sequence, update.sequence = await runtime.ledger.commit_alert_update(
                record,
                alert_sequence=request.alert_sequence,
                state=wanted,
                changed_at=now,
                update=stored,
            )
        update.metadata.audit_sequence = audit_sequence
        return update

    async def WatchAlerts(
        self,
        request: pb.WatchAlertsRequest,
        context: grpc.aio.ServicerContext[pb.WatchAlertsRequest, pb.WatchAlertsResponse],
    ) -> AsyncIterator[pb.WatchAlertsResponse]:
        validate_watch_alerts(request)
        after = request.after_sequence if request.HasField("after_sequence") else None
        alerts = self._slot.runtime.alerts
        async for alert in alerts.subscribe(CALLER.get(), request.min_severity, after):
            yield pb.WatchAlertsResponse(alert=alert)
