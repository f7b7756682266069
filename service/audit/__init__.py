"""The tamper-evident audit log: every decision durable, provable and reviewable offline.

Writing: `AuditLog` (group-committed appends, signed checkpoints, fail-closed). Reviewing, with
only the directory and the public key: `verify_log`, proofs and their verifiers, checkpoints,
and record lookup. This package imports nothing else of ours, so it runs alone.
"""

from service.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    format_checkpoint,
    parse_checkpoint,
)
from service.audit.errors import (
    AuditError,
    AuditRecordError,
    AuditWriteError,
    LogCorruptError,
    NotProvable,
)
from service.audit.log import Appended, AuditLog, AuditStats, RecoveryReport
from service.audit.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from service.audit.storage import StoredRecord, TornTail
from service.audit.verify import (
    VerifyReport,
    consistency_proof,
    find_records,
    find_with_inclusion_proof,
    inclusion_proof,
    iter_records,
    latest_checkpoint,
    prove_record,
    verify_log,
)

__all__ = [
    "Appended",
    "AuditError",
    "AuditLog",
    "AuditRecordError",
    "AuditStats",
    "AuditWriteError",
    "Checkpoint",
    "CheckpointError",
    "LogCorruptError",
    "NotProvable",
    "ProofError",
    "RecoveryReport",
    "StoredRecord",
    "TornTail",
    "VerifyReport",
    "consistency_proof",
    "find_records",
    "find_with_inclusion_proof",
    "format_checkpoint",
    "inclusion_proof",
    "iter_records",
    "latest_checkpoint",
    "leaf_hash",
    "parse_checkpoint",
    "prove_record",
    "verify_consistency",
    "verify_inclusion",
    "verify_log",
]
