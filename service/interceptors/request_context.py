"""Per-call request id, one canonical log line per call, and exceptions -> gRPC status.

Domain errors (ServiceError) become their status with AIP-193 details; anything unexpected
becomes a bare INTERNAL naming only the request id, so no message, value or stack trace leaks.
The handler itself is wrapped (not just intercept_service) because only the handler sees the
servicer context, which later interceptors need for the peer's identity.
"""

from __future__ import annotations

import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from grpc_status import rpc_status

from service.callctx import CALLER
from service.errors import ServiceError

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Probes and tooling are called often and carry no decisions; keep them out of the request log.
_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

if TYPE_CHECKING:  # grpc's classes are generic only in grpc-stubs
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor

log = structlog.get_logger("privscore.rpc")


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if (
            key == REQUEST_ID_HEADER
            and isinstance(value, str)
            and _REQUEST_ID_SHAPE.fullmatch(value)
        ):
            return value
    return uuid.uuid4().hex


def _origin(error: BaseException) -> str:
    """Where an unexpected error was raised, as file:line; its message may hold a value."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


# Records a refused call in the audit log; raises a ServiceError if it cannot.
RefusalHook = Callable[[str, Any, ServiceError], Awaitable[None]]


class _CallScope:
    """Binds the request id and caller to the log context for one call, audits a refusal, and
    writes the call's canonical log line."""

    def __init__(
        self, method: str, context: Context, request_id: str, on_refusal: RefusalHook | None
    ) -> None:
        self.method = method
        self.on_refusal = on_refusal
        self.context = context
        self.request_id = request_id
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()
        self._bound = structlog.contextvars.bound_contextvars(request_id=request_id, method=method)
        self._caller_token: Any = None

    async def __aenter__(self) -> _CallScope:
        self._bound.__enter__()
        self._caller_token = CALLER.set(self.context.peer())
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.request_id),))
        return self

    async def fail(self, error: Exception, request: Any) -> None:
        """Audit a refusal, then abort the call with the status for `error` (or UNAVAILABLE
        when the refusal cannot be audited); always raises grpc's AbortError."""
        if isinstance(error, ServiceError) and error.audited and self.on_refusal is not None:
            try:
                await self.on_refusal(self.method, request, error)
            except ServiceError as audit_error:
                error = audit_error
        if isinstance(error, ServiceError):
            self.code = error.code
            status = rpc_status.to_status(error.to_status())
            await self.context.abort(status.code, status.details, status.trailing_metadata)
        self.code = grpc.StatusCode.INTERNAL
        log.error("rpc.unexpected_error", error_type=type(error).__name__, origin=_origin(error))
        await self.context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {self.request_id})"
        )

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.code == grpc.StatusCode.OK:
            # Aborted by the servicer itself, or cancelled by the client or the deadline.
            code = self.context.code()
            self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.CANCELLED
        log.info(
            "rpc.finished",
            code=self.code.name,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
        )
        CALLER.reset(self._caller_token)
        self._bound.__exit__(exc_type, exc, tb)


class RequestContextInterceptor(Interceptor):
    def __init__(self, on_refusal: RefusalHook | None = None) -> None:
        self._on_refusal = on_refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        request_id = _request_id(handler_call_details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, request_id, self._on_refusal),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, request_id, self._on_refusal),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # privscore has no client-streaming RPCs


def _wrap_unary(behavior: Any, method: str, request_id: str, hook: RefusalHook | None) -> Any:
    async def unary(request: Any, context: Context) -> Any:
        async with _CallScope(method, context, request_id, hook) as scope:
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as error:  # noqa: BLE001 - every error must become a status
                await scope.fail(error, request)

    return unary


def _wrap_stream(behavior: Any, method: str, request_id: str, hook: RefusalHook | None) -> Any:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        async with _CallScope(method, context, request_id, hook) as scope:
            try:
                async for response in behavior(request, context):
                    yield response
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as error:  # noqa: BLE001 - every error must become a status
                await scope.fail(error, request)

    return stream
