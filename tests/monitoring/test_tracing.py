"""Traces: a real server exports over OTLP to a collector in this process, continuing the
caller's W3C trace, and no span it exports carries anything personal.

The caller side is an OpenTelemetry SDK provider with an in-memory exporter (the caller's own
spans); the server side is `privscore serve` with only the standard OTEL_* variables set,
exporting over OTLP/gRPC to a TraceService this test serves on loopback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")

from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from privscore.v1 import alert_service_pb2 as pb
from privscore.v1 import limit_service_pb2
from service.monitoring.tracing import ALLOWED_ATTRIBUTES, STAGES
from tests.conftest import LOOPBACK, ServerProcess, applicants
from tests.test_alerts import cny, event


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace endpoint that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[Any] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                self.resources.append(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    found = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    try:
        yield found, port
    finally:
        server.stop(0)


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


def test_server_spans_continue_the_callers_trace_and_hold_nothing_personal(
    tmp_path: Path, collector: tuple[Collector, int]
) -> None:
    found, port = collector
    server = ServerProcess(
        tmp_path / "var",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{LOOPBACK}:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    caller_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(caller_spans))
    tracer = provider.get_tracer("caller")
    rows = applicants()[:6]
    tenant, customers = "trace-tenant", [f"trace-customer-{n}" for n in range(6)]
    request_ids = [f"trace-req-{n}" for n in range(6)]
    try:
        assert any(r.get("event") == "tracing.on" for r in server.records())
        with server.channel() as channel:
            client = server.client(channel)
            with tracer.start_as_current_span("caller.score"):
                for customer, row, request_id in zip(customers, rows, request_ids, strict=True):
                    client.score(tenant, customer, row, request_id=request_id)
            client.score_batch(tenant, list(zip(customers, rows, strict=True)))
            client.adjust_limit(
                tenant,
                customers[0],
                limit_service_pb2.AccountState(
                    current_limit=cny(1_000_000), balance=cny(200_000), account_age_days=400
                ),
                features=rows[0],
            )
            client.evaluate_event(
                tenant,
                customers[1],
                event(0, missed_payment=pb.MissedPayment(amount_due=cny(5000), days_past_due=45)),
            )
            with pytest.raises(grpc.RpcError):
                client.score(tenant, customers[2], {**rows[2], "duration_in_month": -4})
    finally:
        assert server.terminate() == 0  # shutdown exports what is pending
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not found.spans:
        time.sleep(0.05)

    spans = found.spans
    by_id = {span.span_id: span for span in spans}
    calls = [s for s in spans if s.kind == s.SPAN_KIND_SERVER]
    names = {s.name for s in calls}
    assert {
        "privscore.v1.ScoringService/Score",
        "privscore.v1.ScoringService/ScoreBatch",
        "privscore.v1.LimitService/AdjustLimit",
        "privscore.v1.AlertService/EvaluateEvent",
    } <= names

    # The caller's trace continues: each Score made inside "caller.score" is its child.
    (caller,) = [s for s in caller_spans.get_finished_spans() if s.name == "caller.score"]
    scores = [s for s in calls if s.name.endswith("/Score")]
    continued = [s for s in scores if s.parent_span_id == caller.context.span_id.to_bytes(8, "big")]
    assert len(continued) == len(rows)
    assert all(s.trace_id == caller.context.trace_id.to_bytes(16, "big") for s in continued)

    # Every stage is a child of its call; a Score has decrypt, model, policy and audit.
    for call in continued:
        stages = [s for s in spans if s.parent_span_id == call.span_id]
        assert {s.name for s in stages} >= {f"privscore.{name}" for name in STAGES}
    stage_spans = [s for s in spans if s.kind != s.SPAN_KIND_SERVER]
    assert all(by_id[s.parent_span_id].kind == s.SPAN_KIND_SERVER for s in stage_spans)

    # A refused call is an error span with its gRPC status code.
    errors = [s for s in spans if s.status.code == s.status.STATUS_CODE_ERROR]
    (error,) = errors  # the call span only, without a message
    assert error.name.endswith("/Score") and not error.status.message
    codes = {a.key: _value(a.value) for a in error.attributes}
    assert codes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    # Nothing personal: only the allowed keys, and no value that is a tenant, pseudonym,
    # customer id, request id or feature value.
    secrets = {tenant, *customers, *request_ids}
    secrets |= {value for row in rows for value in row.values() if isinstance(value, str)}
    for span in spans:
        assert {a.key for a in span.attributes} <= ALLOWED_ATTRIBUTES, span.name
        for attribute in span.attributes:
            value = _value(attribute.value)
            assert not (isinstance(value, str) and value in secrets), attribute.key
            assert not any(secret in str(value) for secret in secrets if len(secret) > 3)
        assert not span.events and not span.links
    for resource in found.resources:
        assert not any(str(_value(a.value)) in secrets for a in resource.attributes)


def test_an_unsupported_exporter_stops_the_server_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="OTLP only"):
        ServerProcess(tmp_path / "var", env={"OTEL_TRACES_EXPORTER": "zipkin"})
