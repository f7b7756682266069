"""What the servicers share: the loaded model, keys, policy, store, alert stream and audit log.

Built once by the server after everything has loaded and verified; servicers receive it whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from google.protobuf import timestamp_pb2

from privscore.v1 import common_pb2
from service.api.ledger import Ledger
from service.api.records import RecordFinder
from service.audit import Checkpoint, StoredRecord, VerifierKey
from service.audit.record import RECORD_FORMAT, SUBJECT_KEY
from service.callctx import CALLER
from service.decisions.alert_stream import AlertStream
from service.decisions.policy import DecisionPolicy
from service.errors import ServiceError, Unavailable
from service.model.scorer import ModelBatcher, Scorer
from service.monitoring.drift import DriftMonitor
from service.privacy.digest import input_digest
from service.privacy.keyring import Keyring
from service.privacy.record_seal import SEALED, seal_record_fields
from service.privacy.sealing import FeatureOpener

# A decision's record with its inclusion proof against the latest checkpoint, by decision id:
# the file log's index or the database's (raises NotProvable).
Proven = tuple[Checkpoint, StoredRecord, list[bytes]]
Prover = Callable[[str], Awaitable[Proven]]

# How many times a decision is made again when another replica changed what it was made on
# (service/api/ledger.py) before the call gives up with ABORTED.
DECISION_ATTEMPTS = 8
_decisions_log = structlog.get_logger("privscore.decisions")


def decided_again(method: str, attempt: int, error: Exception) -> None:
    """Log that a decision is made again because its state changed under it (another replica
    decided for the same request or customer): which table, never a value."""
    _decisions_log.info("decision.decided_again", method=method, attempt=attempt, why=str(error))


@dataclass(frozen=True)
class SubjectSeal:
    """The key one subject's records of one month are sealed under, and its id."""

    key_id: str
    key: bytes


def key_period(at: dt.datetime) -> str:
    """The period a subject key covers: the UTC calendar month, YYYY-MM."""
    return at.astimezone(dt.UTC).strftime("%Y-%m")


class AuditSink(Protocol):
    async def append(self, record: Mapping[str, Any]) -> int:
        """Append durably (fsynced) and return the record's sequence number."""
        ...

    async def append_all(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append several records in order; return once all are durable."""
        ...


class KeyedLocks:
    """One asyncio lock per key, dropped when no call holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class Runtime:
    """Everything a call decides with. A call reads its runtime once and uses only that: a
    model swap (service/api/models.py) puts a new one in the slot, so a call in flight never
    mixes two models; fields not meant to change are shared by the copies."""

    model: ModelBatcher  # the champion: its decisions are answered
    # The keyring (public halves and dates are what callers and metrics see) and the opener
    # built on it; both replaced together when SIGHUP reloads the keyring.
    keyring: Keyring
    opener: FeatureOpener
    policy: DecisionPolicy
    ledger: Ledger
    alerts: AlertStream
    audit: AuditSink
    audit_verifier: VerifierKey  # the key that signs the log's checkpoints now
    audit_origin: str
    input_digest_key: bytes
    # Seals the amounts in audit records (service.privacy.record_seal).
    record_key: bytes
    prove: Prover
    # Decision records by decision id and by subject key, for explanations and exports.
    records: RecordFinder
    # Counts scored rows in the training bins (service/monitoring/drift.py); None when the
    # model's manifest has no drift reference.
    drift: DriftMonitor | None = None
    # The model run in shadow on every scored row (recorded as `shadow`, never answered), and
    # the champion the last promotion replaced (for a rollback).
    challenger: ModelBatcher | None = None
    previous: ModelBatcher | None = None
    # When each served artifact (by manifest SHA-256) was loaded.
    loaded_at: dict[str, dt.datetime] = field(default_factory=dict)
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    subject_locks: KeyedLocks = field(default_factory=KeyedLocks)

    @property
    def scorer(self) -> Scorer:
        return self.model.scorer

    def observe_drift(self, rows: Sequence[Mapping[str, Any]], scores: Sequence[int]) -> None:
        """Count durably decided rows for the drift report: bin indices only, never a value.
        A row that cannot be binned is logged by feature name and skipped: the decision is
        made and audited already, and must be answered."""
        if self.drift is None:
            return
        for row, score in zip(rows, scores, strict=True):
            try:
                self.drift.observe(row, score)
            except ValueError as error:
                _decisions_log.warning("drift.not_counted", why=str(error))

    def input_digest(self, inputs: Mapping[str, Any]) -> str:
        return input_digest(self.input_digest_key, inputs)

    def metadata(self, request_id: str, decided_at: dt.datetime) -> common_pb2.DecisionMetadata:
        """Decision metadata without its audit sequence, which the audit append assigns."""
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(decided_at)
        return common_pb2.DecisionMetadata(
            decision_id=str(uuid.uuid4()),
            model_version=self.scorer.model_version,
            policy_version=self.policy.version,
            decided_at=stamp,
            request_id=request_id,
        )

    async def subject_seals(
        self, subjects: Sequence[common_pb2.SubjectRef], at: dt.datetime
    ) -> list[SubjectSeal]:
        """The keys the subjects' records of `at`'s month are sealed under (made first, and
        stored durably, for a subject new this month)."""
        found = await self.ledger.subject_keys(
            [(s.tenant, s.pseudonym) for s in subjects], key_period(at)
        )
        return [SubjectSeal(key_id, key) for key_id, key in found]

    def record(
        self,
        rpc: str,
        metadata: common_pb2.DecisionMetadata,
        subject: common_pb2.SubjectRef | None,
        *,
        seal: SubjectSeal | None = None,
        personal: Mapping[str, Any] | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        """An audit record: who, what, when, under which model and policy, plus `details`,
        which a reviewer reads in clear and which must hold nothing personal.

        The subject appears by tenant and, with `seal`, by the id of its key alone: its
        pseudonym and `personal` (amounts, encrypted inputs and their digest, anything of the
        person) are sealed under that key, which erasure or retention expiry destroys. Without
        `seal` (a refusal) the record names the tenant only.
        """
        record = {
            "format": RECORD_FORMAT,
            "rpc": rpc,
            "decision_id": metadata.decision_id,
            "request_id": metadata.request_id,
            "time": metadata.decided_at.ToJsonString(),
            "caller": CALLER.get(),
            "tenant": subject.tenant if subject is not None else None,
            "model_version": self.scorer.model_version,
            "model_manifest_sha256": self.scorer.manifest_sha256,
            "policy_version": self.policy.version,
            **details,
        }
        if seal is not None:
            assert subject is not None
            record[SUBJECT_KEY] = seal.key_id
            record[SEALED] = seal_record_fields(
                seal.key,
                rpc,
                metadata.decision_id,
                metadata.request_id,
                {"subject": subject.pseudonym, **(personal or {})},
            )
        return record

    async def audit_refusal(
        self, rpc: str, request_id: str, subject: common_pb2.SubjectRef | None, error: ServiceError
    ) -> int:
        """Record a refused call (invalid, unauthorised, ...) with its code and the fields
        named, so the log shows every call that asked for a decision and did not get one."""
        metadata = self.metadata(request_id, self.clock())
        fields = sorted({v.field for v in getattr(error, "violations", ())})
        return await self.audit.append(
            self.record(
                rpc,
                metadata,
                subject,
                outcome="refused",
                code=error.code.name,
                reason=error.reason,
                fields=fields,
            )
        )

    def close(self) -> None:
        for model in (self.model, self.challenger, self.previous):
            if model is not None:
                model.close()
        self.ledger.close()


class RuntimeSlot:
    """Holds the runtime once loaded; calls before then (or after shutdown) are UNAVAILABLE."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None

    def fill(self, runtime: Runtime | None) -> None:
        self._runtime = runtime

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise Unavailable(
                "privscore is starting or stopping; retry shortly", reason="NOT_READY"
            )
        return self._runtime

    def peek(self) -> Runtime | None:
        """The runtime if loaded, for shutdown; servicers use `runtime`."""
        return self._runtime
