"""PrivacyService: a decision explained to the customer, a subject's export, a subject's
erasure; and the retention expiry that runs on a schedule.

Everything a subject's explanation or export tells comes from the audit log, the record of
what was decided, opened with the subject's keys (service/api/runtime.py `Runtime.record`):
the log keeps every decision for as long as the lender must, and erasure or expiry destroys the
keys that make the person in it readable. Each call is audited like a decision; an export's
and an explanation's records are sealed under the subject's key like its decisions, so a
later erasure takes them too.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from google.protobuf import json_format

from privscore.v1 import common_pb2, privacy_service_pb2_grpc
from privscore.v1 import privacy_service_pb2 as pb
from service.api import validation as check
from service.api.audit import DECISION_ID
from service.api.features import open_row, read_encrypted_inputs
from service.api.limits import ADJUST_LIMIT_METHOD
from service.api.runtime import Runtime, RuntimeSlot, key_period
from service.api.scoring import SCORE_BATCH_METHOD, SCORE_METHOD
from service.audit import StoredRecord
from service.audit.verify import parse_time
from service.errors import FailedPrecondition, NotFound, ServiceError
from service.explain import (
    Catalogue,
    ExplainedDecision,
    counterfactuals,
    explain_decision_response,
    explanations,
    score_range,
)
from service.model.scorer import Row
from service.monitoring.tracing import stage
from service.privacy.record_seal import RecordSealError, Shredded, open_personal

EXPLAIN_DECISION_METHOD = "/privscore.v1.PrivacyService/ExplainDecision"
EXPORT_SUBJECT_METHOD = "/privscore.v1.PrivacyService/ExportSubject"
ERASE_SUBJECT_METHOD = "/privscore.v1.PrivacyService/EraseSubject"
# The audit record of a retention expiry: not a call, a scheduled act of the server.
RETENTION_EXPIRE = "privscore.retention/Expire"
_SCORES = (SCORE_METHOD, SCORE_BATCH_METHOD)
_EXPLAINABLE = (*_SCORES, ADJUST_LIMIT_METHOD)
# Limit decisions whose customer is told what would most change them, as declined applicants are.
_REDUCED = ("DECREASE", "FREEZE")


class DecisionNotFound(NotFound):
    reason = "DECISION_NOT_FOUND"


class NotExplainable(FailedPrecondition):
    reason = "NOT_EXPLAINABLE"


class SubjectErased(FailedPrecondition):
    reason = "SUBJECT_ERASED"


def validate_explain(request: pb.ExplainDecisionRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_pattern(
        v, "decision_id", request.decision_id, DECISION_ID, "a UUID in canonical lower-case form"
    )
    v.raise_if_any()


def validate_subject_request(
    request: pb.ExportSubjectRequest | pb.EraseSubjectRequest,
) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    v.raise_if_any()


@dataclass(frozen=True)
class _Opened:
    """A decision record with its personal fields opened, and its subject."""

    stored: StoredRecord
    personal: dict[str, Any]
    subject: common_pb2.SubjectRef

    @property
    def record(self) -> dict[str, Any]:
        return self.stored.record


class _LogView:
    """One call's reads of the log and the keys: each subject key fetched once, and the records
    the call holds already (an export's) found by decision id without searching the log again
    (a limit decision names the Score decision it used)."""

    def __init__(self, runtime: Runtime, held: Sequence[StoredRecord] = ()) -> None:
        self.runtime = runtime
        self._keys: dict[str, bytes | None] = {}
        self._held = {
            str(s.record.get("decision_id")): s
            for s in held
            if s.record.get("outcome") != "refused"
        }

    async def key(self, key_id: str) -> bytes | None:
        if key_id not in self._keys:
            self._keys[key_id] = await self.runtime.ledger.key_by_id(key_id)
        return self._keys[key_id]

    async def decision(self, decision_id: str) -> StoredRecord | None:
        held = self._held.get(decision_id)
        return held if held is not None else await self.runtime.records.by_decision(decision_id)


async def _open(view: _LogView, stored: StoredRecord) -> _Opened:
    """The record's personal fields; SubjectErased once its subject key is destroyed."""
    runtime = view.runtime
    record = stored.record
    key_id = record.get("subject_key")
    key = await view.key(str(key_id)) if key_id is not None else None
    try:
        personal = open_personal(record, record_key=runtime.record_key, subject_key=lambda _: key)
    except Shredded:
        raise SubjectErased(
            "the decision's subject was erased (or its period is past retention): only its "
            "outcome is kept, which no longer names anyone"
        ) from None
    except RecordSealError as error:
        raise FailedPrecondition(f"the decision's record does not open: {error}") from None
    subject = common_pb2.SubjectRef(
        tenant=str(record.get("tenant")), pseudonym=str(personal.get("subject"))
    )
    return _Opened(stored, personal, subject)


def _decided_at(record: dict[str, Any]) -> dt.datetime:
    moment = parse_time(record.get("time"))
    if moment is None:
        raise FailedPrecondition("the decision's record has no time")
    return moment


async def _recorded_row(view: _LogView, opened: _Opened) -> Row | None:
    """The features the decision was scored on, opened as the server opened them then; None
    when the record holds none or they no longer open here (a retired key, another schema)."""
    runtime = view.runtime
    recorded = opened.personal.get("encrypted_inputs")
    record = opened.record
    if not recorded:
        source = record.get("score_decision_id")
        if record.get("rpc") != ADJUST_LIMIT_METHOD or not source:
            return None
        scored = await view.decision(str(source))
        if scored is None:
            return None
        try:
            return await _recorded_row(view, await _open(view, scored))
        except ServiceError:
            return None
    try:
        return open_row(
            runtime.scorer,
            runtime.opener,
            read_encrypted_inputs(str(recorded)),
            opened.subject,
            method=str(record.get("rpc")),
            request_id=str(record.get("request_id")),
            identity=str(record.get("caller")),
            at=_decided_at(record).timestamp(),
        )
    except (ServiceError, ValueError):
        return None


async def explained(view: _LogView, catalogue: Catalogue, opened: _Opened) -> ExplainedDecision:
    """What the customer is told about a Score or AdjustLimit decision: from its record, and,
    for a declined, reviewed or reduced one, counterfactuals from the served model."""
    runtime = view.runtime
    record = opened.record
    rpc = record.get("rpc")
    if rpc not in _EXPLAINABLE or record.get("outcome") == "refused":
        raise NotExplainable(
            f"{rpc} records are not decisions about an applicant's credit (scores and limits)"
        )
    outputs = record.get("outputs") or {}
    kind: Literal["score", "limit"]
    if rpc in _SCORES:
        kind = "score"
        outcome = str(outputs.get("decision", "")).removeprefix("CREDIT_DECISION_")
        reasons = [str(r.get("code")) for r in outputs.get("reasons", [])]
        adverse = outcome != "APPROVE"
    else:
        kind = "limit"
        outcome = str(outputs.get("action", "")).removeprefix("LIMIT_ACTION_")
        reasons = [str(code) for code in outputs.get("reasons", [])]
        adverse = outcome in _REDUCED
    found = []
    if adverse:
        row = await _recorded_row(view, opened)
        if row is not None:
            scorer = runtime.scorer
            with stage("model"):
                found = await counterfactuals(
                    row,
                    scorer,
                    lambda rows: runtime.model.probabilities(scorer.columns(rows)),
                    runtime.policy.score,
                    catalogue,
                )
    low, high = score_range(runtime.scorer.manifest.scaling)
    return ExplainedDecision(
        decision_id=str(record.get("decision_id")),
        kind=kind,
        outcome=outcome,
        score=int(outputs.get("score", 0)),
        score_min=low,
        score_max=high,
        reasons=reasons,
        decided_at=_decided_at(record),
        model_version=str(record.get("model_version")),
        counterfactuals=found,
    )


class PrivacyServicer(privacy_service_pb2_grpc.PrivacyServiceServicer):
    def __init__(self, slot: RuntimeSlot, catalogue: Catalogue) -> None:
        self._slot = slot
        self._catalogue = catalogue

    async def ExplainDecision(
        self,
        request: pb.ExplainDecisionRequest,
        context: grpc.aio.ServicerContext[pb.ExplainDecisionRequest, pb.ExplainDecisionResponse],
    ) -> pb.ExplainDecisionResponse:
        validate_explain(request)
        runtime = self._slot.runtime
        stored = await runtime.records.by_decision(request.decision_id)
        if stored is None:
            raise DecisionNotFound(f"no decision {request.decision_id} is in the audit log")
        view = _LogView(runtime)
        opened = await _open(view, stored)
        decision = await explained(view, self._catalogue, opened)
        now = runtime.clock()
        metadata = runtime.metadata(request.request_id, now)
        (seal,) = await runtime.subject_seals([opened.subject], now)
        record = runtime.record(
            EXPLAIN_DECISION_METHOD,
            metadata,
            opened.subject,
            seal=seal,
            explained={"decision_id": request.decision_id, "rpc": stored.record.get("rpc")},
        )
        with stage("audit", records=1):
            metadata.audit_sequence = await runtime.audit.append(record)
        return explain_decision_response(self._catalogue, decision, metadata)

    async def ExportSubject(
        self,
        request: pb.ExportSubjectRequest,
        context: grpc.aio.ServicerContext[pb.ExportSubjectRequest, pb.ExportSubjectResponse],
    ) -> pb.ExportSubjectResponse:
        validate_subject_request(request)
        runtime = self._slot.runtime
        subject = request.subject
        ledger = runtime.ledger
        key_ids = await ledger.subject_key_ids(subject.tenant, subject.pseudonym)
        stored = await runtime.records.by_subject_keys(key_ids)
        document = await self._document(runtime, subject, stored)
        now = runtime.clock()
        metadata = runtime.metadata(request.request_id, now)
        # The export is about the subject: sealed under its key like its decisions. A subject
        # never seen gets no key for it; the record then names the tenant alone.
        seals = await runtime.subject_seals([subject], now) if key_ids else [None]
        record = runtime.record(
            EXPORT_SUBJECT_METHOD,
            metadata,
            subject,
            seal=seals[0],
            exported={
                name: len(document[name]) for name in ("decisions", "limits", "events", "alerts")
            },
        )
        with stage("audit", records=1):
            metadata.audit_sequence = await runtime.audit.append(record)
        document["exported_at"] = metadata.decided_at.ToJsonString()
        body = json.dumps(document, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return pb.ExportSubjectResponse(metadata=metadata, document=body)

    async def _document(
        self, runtime: Runtime, subject: common_pb2.SubjectRef, records: Sequence[StoredRecord]
    ) -> dict[str, Any]:
        """The subject's data as the export's JSON document (docs/subject-export.md)."""
        document: dict[str, Any] = {
            "subject": {"tenant": subject.tenant, "pseudonym": subject.pseudonym},
            "catalogue_version": self._catalogue.version,
            "decisions": [],
            "limits": [],
            "events": [],
            "alerts": [],
            "accesses": [],
        }
        view = _LogView(runtime, records)
        for stored in records:
            opened = await _open(view, stored)
            record = opened.record
            rpc = record.get("rpc")
            entry: dict[str, Any] = {
                "decision_id": record.get("decision_id"),
                "time": record.get("time"),
                "audit_sequence": stored.sequence,
                "model_version": record.get("model_version"),
                "policy_version": record.get("policy_version"),
            }
            personal = opened.personal
            if rpc in _EXPLAINABLE:
                entry["outcome"] = record.get("outputs")
                decision = await explained(view, self._catalogue, opened)
                entry["explanation"] = [
                    json_format.MessageToDict(text, preserving_proto_field_name=True)
                    for text in explanations(self._catalogue, decision)
                ]
            if rpc in _SCORES:
                if "offer" in record:
                    entry["offer"] = {**record["offer"], "limit": personal.get("initial_limit")}
                document["decisions"].append(entry)
            elif rpc == ADJUST_LIMIT_METHOD:
                entry["account"] = personal.get("account")
                entry["new_limit"] = personal.get("new_limit")
                entry["score_source"] = record.get("score_source")
                entry["open_alerts"] = record.get("open_alerts")
                document["limits"].append(entry)
            elif "event" in personal:
                entry["event"] = personal["event"]
                entry["alerts_raised"] = (record.get("outputs") or {}).get("alerts", [])
                document["events"].append(entry)
            elif "alert" in record:
                entry["alert"] = record["alert"]
                document["alerts"].append(entry)
            else:
                entry["access"] = rpc
                entry["caller"] = record.get("caller")
                document["accesses"].append(entry)
        open_alerts = await runtime.ledger.open_alerts(subject.tenant, subject.pseudonym)
        document["open_alerts"] = [
            {"alert_sequence": a.alert_sequence, "severity": a.severity, "state": a.state}
            for a in open_alerts
        ]
        return document

    async def EraseSubject(
        self,
        request: pb.EraseSubjectRequest,
        context: grpc.aio.ServicerContext[pb.EraseSubjectRequest, pb.EraseSubjectResponse],
    ) -> pb.EraseSubjectResponse:
        validate_subject_request(request)
        runtime = self._slot.runtime
        subject = request.subject
        ledger = runtime.ledger
        async with runtime.subject_locks.hold((subject.tenant, subject.pseudonym)):
            key_ids = await ledger.subject_key_ids(subject.tenant, subject.pseudonym)
            metadata = runtime.metadata(request.request_id, runtime.clock())
            # The tenant and the destroyed keys' ids, never the pseudonym: the record must not
            # keep what it records the removal of.
            record = runtime.record(
                ERASE_SUBJECT_METHOD, metadata, subject, erased={"key_ids": key_ids}
            )
            with stage("audit", records=1):
                metadata.audit_sequence, counts = await ledger.erase_subject(
                    record, subject.tenant, subject.pseudonym
                )
            runtime.alerts.erase_subject(subject.tenant, subject.pseudonym)
        return pb.EraseSubjectResponse(
            metadata=metadata,
            erased=bool(key_ids) or any(counts.values()),
            events_deleted=counts["events"],
            alerts_deleted=counts["alerts"],
            adjustments_deleted=counts["limit_decisions"],
        )


def expiry_period(now: dt.datetime, retention_days: int) -> str:
    """The first period whose subject keys are kept: every key of an earlier month covers
    only records older than the retention period, and is destroyed."""
    return key_period(now - dt.timedelta(days=retention_days))


async def expire(runtime: Runtime, retention_days: int) -> int:
    """Destroy the subject keys of every period past retention, audited; how many."""
    now = runtime.clock()
    before = expiry_period(now, retention_days)

    def record(count: int) -> dict[str, Any]:
        metadata = runtime.metadata(f"retention-{uuid.uuid4()}", now)
        return runtime.record(
            RETENTION_EXPIRE,
            metadata,
            None,
            expired={"before_period": before, "keys": count, "retention_days": retention_days},
        )

    _, destroyed = await runtime.ledger.expire_keys(before, record)
    return destroyed
