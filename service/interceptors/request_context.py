"""The one server interceptor: per call, who is calling, may they, within which limits, and
what came of it.

For every privscore call it binds a request id, reads the caller's identity from the verified
client certificate, checks the authorisation policy and the caller's limits, applies the
default or maximum deadline, turns errors into statuses (domain errors into their code with
AIP-193 details, anything unexpected into a bare INTERNAL naming only the request id, so no
message, value or stack trace leaks), has every refusal audited, and writes one log line.
The handler itself is wrapped because only the servicer context carries the auth context;
`intercept_service` alone sees just the method name and metadata.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from privscore.client.envelope import REQUEST_ID_METADATA, REQUEST_ID_SHAPE
from service.callctx import CALLER, GRANTS
from service.errors import FieldViolation, InvalidArgument, ServiceError
from service.monitoring import tracing
from service.monitoring.metrics import NO_METRICS, SERVER_STREAM, UNARY, Metrics
from service.security.authz import AuthzPolicy, missing_identity, peer_identity
from service.security.limits import CallLimits, IdentityLimiter

REQUEST_ID_HEADER = REQUEST_ID_METADATA
# Ids for calls that bring none: a random per-process tag and a counter. They correlate log
# lines and need only be unique; a uuid4 per call cost a getrandom system call each.
_GENERATED_ID_TAG = secrets.token_hex(8)
_GENERATED_ID_COUNTER = itertools.count()
# Probes and tooling carry no decisions: no role needed, and kept out of the request log.
_OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

if TYPE_CHECKING:  # grpc's classes are generic only in grpc-stubs
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor

# Records a refused call in the audit log; raises a ServiceError if it cannot.
RefusalHook = Callable[[str, Any, ServiceError], Awaitable[None]]

log = structlog.get_logger("privscore.rpc")


class MalformedRequest:
    """Stands in for request bytes that do not parse, so the refusal goes through the same
    path as any other: a status with details, an audit record and a log line."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name


def _tolerant(deserializer: Callable[..., Any] | None) -> Callable[[bytes], Any]:
    assert deserializer is not None  # generated handlers always have one

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            name = getattr(getattr(deserializer, "__self__", None), "__name__", "request")
            return MalformedRequest(name)

    return deserialize


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(
            [
                FieldViolation(
                    "request", f"is not a valid {request.message_name} message", "MALFORMED_MESSAGE"
                )
            ]
        )


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        well_formed = isinstance(value, str) and REQUEST_ID_SHAPE.fullmatch(value)
        if key == REQUEST_ID_HEADER and well_formed:
            return str(value)
    return f"{_GENERATED_ID_TAG}-{next(_GENERATED_ID_COUNTER)}"


def _origin(error: BaseException) -> str:
    """Where an unexpected error was raised, as file:line; its message may hold a value."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


class _Call:
    """One call's scope: context binding, admission, error mapping and its log line."""

    def __init__(
        self,
        guard: RequestContextInterceptor,
        method: str,
        context: Context,
        request_id: str,
        kind: str = UNARY,
    ) -> None:
        self.guard = guard
        self.method = method
        self.context = context
        self.request_id = request_id
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()
        self.rpc = guard.metrics.rpc(method, kind)
        self.rpc.started()
        self.span = tracing.call_span(method, context)
        auth = context.auth_context()
        self.identity = peer_identity(auth)
        self.why = "" if self.identity is not None else missing_identity(auth)
        self._bound = structlog.contextvars.bound_contextvars(
            request_id=request_id, method=method, caller=self.identity
        )
        self._caller_token: Any = None
        self._grants_token: Any = None

    async def __aenter__(self) -> _Call:
        self.span.__enter__()
        self._bound.__enter__()
        self._caller_token = CALLER.set(self.identity or f"unauthenticated:{self.context.peer()}")
        self._grants_token = GRANTS.set(
            self.guard.authz.grants.get(self.identity or "", frozenset())
        )
        # The request id travels in the trailers, with the status, whatever the outcome: an
        # early header would cost every unary call a HEADERS write of its own.
        self.context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),))
        return self

    async def announce_stream(self) -> None:
        """A stream's headers, with its request id, sent once admitted: a subscriber that has
        them knows its stream holds a slot (and a stream sends headers before its first
        message anyway)."""
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.request_id),))

    def admit(self) -> Any:
        """Authorise the caller and take a slot of its limits (a context manager)."""
        self.guard.authz.check(self.identity, self.method, self.why)
        assert self.identity is not None  # check() refuses a call without one
        return self.guard.limiter.admit(self.identity)

    def admit_stream(self) -> None:
        """Authorise the caller and take one call from its rate, but no in-flight slot: a
        monitor holding a stream keeps its whole allowance for unary calls, and the streaming
        servicer bounds its subscribers itself (overall and per identity)."""
        self.guard.authz.check(self.identity, self.method, self.why)
        assert self.identity is not None  # check() refuses a call without one
        self.guard.limiter.take_rate(self.identity)

    def deadline(self) -> float:
        """Seconds this call may run: the caller's deadline, the default, capped at the max."""
        limits = self.guard.limits
        remaining = self.context.time_remaining()
        wanted = limits.default_deadline_seconds if remaining is None else remaining
        return min(wanted, limits.max_deadline_seconds)

    async def fail(self, error: Exception, request: Any) -> None:
        """Audit a refusal, then abort the call with the status for `error` (or UNAVAILABLE
        when the refusal cannot be audited); always raises grpc's AbortError."""
        if isinstance(error, TimeoutError):
            error = DeadlineExceeded("the call ran past its deadline")
        hook = self.guard.on_refusal
        if isinstance(error, ServiceError) and error.audited and hook is not None:
            try:
                await hook(self.method, request, error)
            except ServiceError as audit_error:
                error = audit_error
        if isinstance(error, ServiceError):
            self.code = error.code
            status = rpc_status.to_status(error.to_status())
            await self.context.abort(
                status.code,
                status.details,
                (*status.trailing_metadata, (REQUEST_ID_HEADER, self.request_id)),
            )
        self.code = grpc.StatusCode.INTERNAL
        log.error("rpc.unexpected_error", error_type=type(error).__name__, origin=_origin(error))
        await self.context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error (request id {self.request_id})",
            ((REQUEST_ID_HEADER, self.request_id),),
        )

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.code == grpc.StatusCode.OK:
            # Aborted by the servicer itself, or cancelled by the client or its deadline.
            code = self.context.code()
            self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.CANCELLED
        seconds = time.perf_counter() - self.started
        self.rpc.handled(self.code.name, seconds)
        log.info("rpc.finished", code=self.code.name, duration_ms=round(seconds * 1000, 3))
        CALLER.reset(self._caller_token)
        GRANTS.reset(self._grants_token)
        self._bound.__exit__(exc_type, exc, tb)
        self.span.finish(self.code.value[0])
        self.span.__exit__(exc_type, exc, tb)


class RequestContextInterceptor(Interceptor):
    def __init__(
        self,
        authz: AuthzPolicy,
        limits: CallLimits,
        on_refusal: RefusalHook | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.authz = authz
        self.limits = limits
        self.limiter = IdentityLimiter(limits)
        self.on_refusal = on_refusal
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        request_id = _request_id(handler_call_details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, request_id),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, request_id),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        # privscore has no client-streaming RPCs: anything else is refused, not passed through.
        raise RuntimeError(f"{method}: unsupported handler kind")

    def _wrap_unary(self, behavior: Any, method: str, request_id: str) -> Any:
        async def unary(request: Any, context: Context) -> Any:
            async with _Call(self, method, context, request_id) as call:
                try:
                    with call.admit():
                        _refuse_malformed(request)
                        async with asyncio.timeout(call.deadline()):
                            response = await behavior(request, context)
                    call.rpc.sent()
                    return response
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as error:  # noqa: BLE001 - every error must become a status
                    await call.fail(error, request)

        return unary

    def _wrap_stream(self, behavior: Any, method: str, request_id: str) -> Any:
        # Streams are long-lived by design: no default deadline and no in-flight slot; the
        # subscriber caps (overall and per identity) bound them.
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async with _Call(self, method, context, request_id, SERVER_STREAM) as call:
                try:
                    call.admit_stream()
                    await call.announce_stream()
                    _refuse_malformed(request)
                    async for response in behavior(request, context):
                        yield response
                        call.rpc.sent()
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as error:  # noqa: BLE001 - every error must become a status
                    await call.fail(error, request)

        return stream
