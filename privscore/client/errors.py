"""What a refused call says, read from its rich status: for people (the CLI) and programs.

privscore answers errors as AIP-193 statuses: the `google.rpc.Status` in the
`grpc-status-details-bin` trailer carries an `ErrorInfo` (domain `privscore.v1`, a stable
reason) and, for INVALID_ARGUMENT, a `BadRequest` naming every field that failed and why
(never its value); the request id travels in the `x-request-id` trailer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from privscore.client.envelope import REQUEST_ID_METADATA

REQUEST_ID_TRAILER = REQUEST_ID_METADATA


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    reason: str = ""  # ErrorInfo.reason, e.g. SCHEMA_VERSION_MISMATCH
    violations: tuple[tuple[str, str], ...] = field(default=())  # (field path, description)
    request_id: str = ""

    def lines(self) -> list[str]:
        """The refusal as lines of text: the status, then each field that failed."""
        head = f"{self.code}: {self.message}"
        if self.reason and self.reason != self.code:
            head += f" [{self.reason}]"
        lines = [head]
        lines += [f"  {path}: {description}" for path, description in self.violations]
        if self.request_id:
            lines.append(f"  request id: {self.request_id}")
        return lines


def refusal(error: grpc.RpcError) -> Refusal:
    """Everything a failed call carries (only the code and message when it has no details,
    as from a proxy or a connection failure)."""
    code = error.code().name if isinstance(error, grpc.Call) else "UNKNOWN"
    message = error.details() if isinstance(error, grpc.Call) else str(error)
    reason = ""
    violations: list[tuple[str, str]] = []
    status: Any = None
    try:
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    except ValueError:  # details that contradict the status: show the status alone
        status = None
    details: list[Any] = list(status.details) if status is not None else []
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    trailers: Any = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    request_id = next(
        (str(value) for key, value in trailers or () if key == REQUEST_ID_TRAILER), ""
    )
    return Refusal(code, message or "", reason, tuple(violations), request_id)
