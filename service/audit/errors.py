"""The audit log's errors; callers catch `AuditError` for all of them."""

from __future__ import annotations


class AuditError(Exception):
    """Base of every audit log error."""


class AuditWriteError(AuditError):
    """A record could not be made durable; the log has failed closed and takes no more records."""


class AuditRecordError(AuditError, ValueError):
    """A record cannot be logged (not JSON, too large); nothing was written, no sequence used."""


class NotProvable(AuditError):
    """No inclusion proof can be given for the record asked for; `why` says which case:
    NO_CHECKPOINT (none signed yet), NOT_FOUND, or NEWER_THAN_CHECKPOINT."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why


class LogCorruptError(AuditError):
    """The stored log does not read back as a contiguous, intact sequence of records."""

    def __init__(self, sequence: int | None, reason: str) -> None:
        super().__init__(reason if sequence is None else f"record {sequence}: {reason}")
        self.sequence = sequence
        self.reason = reason
