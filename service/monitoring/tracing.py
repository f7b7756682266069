"""OpenTelemetry traces: off unless the standard OTEL_* variables ask for them.

On when `OTEL_TRACES_EXPORTER=otlp` or an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`
or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and `OTEL_SDK_DISABLED` is not `true`; the exporter
(OTLP over gRPC), its endpoint, headers, TLS, the batch processor's timing, the sampler and the
resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) all come from the same variables, as
the OpenTelemetry SDK reads them. Traces need the `tracing` extra (`pip install
privscore[tracing]`); asking for them without it stops the server with a message that says so.

Each privscore call is a SERVER span named after its gRPC method, continuing the caller's W3C
trace context (`traceparent`/`tracestate` metadata; the SDK sends it), with one child span per
stage: `privscore.decrypt`, `privscore.model`, `privscore.policy`, `privscore.audit`.

What a span may carry is fixed here and nowhere else: the RPC's system, service, method and
status code, and per stage a count (rows, records). Never a feature value, an amount, a
pseudonym, a tenant, a request id or a decision: a trace leaves the process for a collector
that is not privscore's to protect. tests/monitoring/test_tracing.py checks every attribute
of every span a real server exports.

Off, every entry point returns one shared no-op context manager: the calls cost a global read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

_OFF: AbstractContextManager[Any] = contextlib.nullcontext()
_tracer: Any = None  # an OpenTelemetry Tracer once `configure` turned traces on
_provider: Any = None

# The only attribute keys a span may carry (the test reads this set).
ALLOWED_ATTRIBUTES = frozenset(
    {
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "rpc.grpc.status_code",
        "privscore.stage",
        "privscore.rows",
        "privscore.records",
    }
)
STAGES = ("decrypt", "model", "policy", "audit")


class TracingError(Exception):
    """Traces were asked for but cannot be produced (missing extra, unknown exporter)."""


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn traces on if the environment asks; True if on. Raises TracingError if asked for
    something this server cannot do."""
    global _tracer, _provider
    if not requested(environ):
        return False
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter_name != "otlp":
        raise TracingError(
            f"OTEL_TRACES_EXPORTER={exporter_name} is not supported: privscore exports traces "
            "with OTLP only (stdout is its log)"
        )
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol.strip().lower() != "grpc":
        raise TracingError("OTLP traces are exported over gRPC only (OTEL_EXPORTER_OTLP_PROTOCOL)")
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingError(
            "traces were asked for (OTEL_*) but the tracing extra is not installed: "
            "pip install 'privscore[tracing]'"
        ) from None
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "privscore")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    _tracer = trace.get_tracer("privscore", tracer_provider=provider)
    return True


def shutdown() -> None:
    """Export what is pending and stop (server shutdown)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


class _Metadata:
    """The W3C propagator's getter over gRPC invocation metadata (a sequence of pairs)."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        found = [str(value) for name, value in carrier if name == key]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [name for name, _ in carrier]


_GETTER = _Metadata()


class _CallSpan:
    """A call's SERVER span; `finish(code)` records the gRPC status code before it ends."""

    def __init__(self, method: str, metadata: Any) -> None:
        """`metadata`: the call's invocation metadata, pairs of (key, value)."""
        from opentelemetry import trace
        from opentelemetry.propagate import extract

        service, _, name = method.strip("/").partition("/")
        parent = extract(list(metadata or ()), getter=_GETTER)  # type: ignore[arg-type]
        self._span = _tracer.start_span(
            method.strip("/"),
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        self._scope = trace.use_span(
            self._span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        )

    def __enter__(self) -> _CallSpan:
        self._scope.__enter__()
        return self

    def finish(self, code: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("rpc.grpc.status_code", code)
        if code != 0:
            self._span.set_status(Status(StatusCode.ERROR))

    def __exit__(self, *exc: Any) -> None:
        self._scope.__exit__(*exc)
        self._span.end()


class _NoCallSpan:
    def __enter__(self) -> _NoCallSpan:
        return self

    def finish(self, code: int) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        pass


_NO_CALL = _NoCallSpan()


def call_span(method: str, context: Any) -> _CallSpan | _NoCallSpan:
    """The span of one call, continuing the trace in the call's metadata (`context` is the
    servicer context); a no-op, reading nothing, when traces are off."""
    return _NO_CALL if _tracer is None else _CallSpan(method, context.invocation_metadata())


def stage(name: str, *, rows: int | None = None, records: int | None = None) -> Any:
    """A child span for one stage of a call (`STAGES`), with at most a count as detail."""
    if _tracer is None:
        return _OFF
    attributes: dict[str, Any] = {"privscore.stage": name}
    if rows is not None:
        attributes["privscore.rows"] = rows
    if records is not None:
        attributes["privscore.records"] = records
    # No exception events or status messages: an exception's message and stack are not ours
    # to export (a message may quote a value); the call span carries the status code.
    return _tracer.start_as_current_span(
        f"privscore.{name}",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )
