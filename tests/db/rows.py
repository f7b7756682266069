"""Store rows for tests that write a store by hand: alerts as the servicer stores them."""

from __future__ import annotations

from privscore.v1 import alert_service_pb2, common_pb2


def raised_alert(
    tenant: str,
    pseudonym: str,
    severity: alert_service_pb2.Severity.ValueType = alert_service_pb2.SEVERITY_CRITICAL,
    rule: str = "delinquency.missed_payment",
) -> bytes:
    """A raised alert's stored message: as EvaluateEvent stores it, without its sequence (the
    row's key) and with `alert_sequence` unset, which marks it raised rather than changed."""
    return alert_service_pb2.Alert(
        subject=common_pb2.SubjectRef(tenant=tenant, pseudonym=pseudonym),
        rule=rule,
        severity=severity,
        state=alert_service_pb2.ALERT_STATE_OPEN,
    ).SerializeToString()
