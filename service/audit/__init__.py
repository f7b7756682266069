"""The tamper-evident audit log: every decision durable, provable and reviewable offline.

Writing: `AuditLog` (group-committed appends, signed checkpoints, fail-closed). Reviewing, with
only the directory and the public key: `verify_log`, proofs and their verifiers, checkpoints,
and record lookup. This package imports nothing else of ours, so it runs alone.
"""

from service.audit.checkpoint import (
    ROTATE_KEY_RPC,
    Checkpoint,
    CheckpointError,
    Signer,
    VerifierKey,
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
from service.audit.identity import LogIdentity, establish_identity, read_identity
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
    records_containing,
    verify_log,
)

__all__ = [
    "ROTATE_KEY_RPC",
    "Appended",
    "AuditError",
    "AuditLog",
    "AuditRecordError",
    "AuditStats",
    "AuditWriteError",
    "Checkpoint",
    "CheckpointError",
    "LogCorruptError",
    "LogIdentity",
    "NotProvable",
    "ProofError",
    "RecoveryReport",
    "Signer",
    "StoredRecord",
    "TornTail",
    "VerifierKey",
    "VerifyReport",
    "consistency_proof",
    "establish_identity",
    "find_records",
    "find_with_inclusion_proof",
    "format_checkpoint",
    "inclusion_proof",
    "iter_records",
    "latest_checkpoint",
    "leaf_hash",
    "parse_checkpoint",
    "prove_record",
    "read_identity",
    "records_containing",
    "verify_consistency",
    "verify_inclusion",
    "verify_log",
]
