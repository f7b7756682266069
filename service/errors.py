"""Domain errors and their mapping to google.rpc.Status (AIP-193).

Code anywhere below the servicers raises a ServiceError; one interceptor turns it into a gRPC
status with details. Messages and violations name fields and causes, never values.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "privscore.v1"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (e.g. `subject.pseudonym`) and what is wrong."""

    field: str
    description: str
    reason: str = "INVALID_FIELD"


class ServiceError(Exception):
    """A failure the caller should see with a specific code and a stable reason."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
    # A refused call is audited; an unavailable server has nothing to audit it with.
    audited = True

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=self.details()
        )


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        fields = ", ".join(sorted({v.field for v in violations}))
        super().__init__(f"invalid request: {fields}")
        self.violations = violations

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description, reason=v.reason
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed, *super().details()]


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class DataLoss(ServiceError):
    """Stored state failed its integrity check: the call is refused, never answered from it."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"
    audited = False


class Aborted(ServiceError):
    """A concurrency conflict the server could not settle by retrying: the caller may retry."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "OUT_OF_RANGE"
