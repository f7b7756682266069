"""LimitService: AdjustLimit."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from privscore.v1 import common_pb2, limit_service_pb2_grpc
from privscore.v1 import limit_service_pb2 as pb
from service.api import validation as check
from service.api.features import encrypted_inputs, open_row, request_scorer
from service.api.figures import ACCOUNT_SCHEMA_VERSION, SEAL_REQUIRED, check_sealed, open_account
from service.api.ledger import LimitRow
from service.api.runtime import DECISION_ATTEMPTS, Runtime, RuntimeSlot, decided_again
from service.api.scoring import challenger_of, shadow
from service.callctx import CALLER, GRANTS
from service.decisions.limits import Account, decide_limit
from service.decisions.rows import StateChanged
from service.errors import Aborted, FailedPrecondition
from service.model.scorer import Row
from service.monitoring.tracing import stage
from service.privacy.sealing import RequestKeys
from service.security.authz import PermissionDenied, capability_name

ADJUST_LIMIT_METHOD = "/privscore.v1.LimitService/AdjustLimit"
_ACTIONS = {
    "HOLD": pb.LIMIT_ACTION_HOLD,
    "INCREASE": pb.LIMIT_ACTION_INCREASE,
    "DECREASE": pb.LIMIT_ACTION_DECREASE,
    "FREEZE": pb.LIMIT_ACTION_FREEZE,
}
# Scores outside this range cannot come from any model on a scorecard scale we serve.
LATEST_SCORE_RANGE = (0, 2000)


class RequestIdReused(FailedPrecondition):
    reason = "REQUEST_ID_REUSED"


class NoRecordedScore(FailedPrecondition):
    reason = "NO_RECORDED_SCORE"


# Stating a score instead of the recorded one: a capability within AdjustLimit.
STATE_SCORE = capability_name(ADJUST_LIMIT_METHOD, "latest_score")


@dataclass
class _Score:
    """The score a limit decision is made on, where it came from, and the row scored in the
    call (for the drift counts) when there was one."""

    score: int
    source: pb.ScoreSource.ValueType
    decision_id: str = ""
    rows: list[Row] = field(default_factory=list)
    # The challenger's assessment of the row scored in the call, when one runs in shadow.
    shadow: dict[str, Any] | None = None


def validate_adjust_limit(request: pb.AdjustLimitRequest) -> None:
    v = check.Violations()
    check.check_request_id(v, "request_id", request.request_id)
    check.check_subject(v, "subject", request.HasField("subject"), request.subject)
    if request.HasField("account"):
        # Its values are never read, checked or repeated: refusing is all it gets.
        v.add("account", "must travel sealed in sealed_account", SEAL_REQUIRED)
    check_sealed(
        v,
        "sealed_account",
        request.HasField("sealed_account"),
        request.sealed_account,
        ACCOUNT_SCHEMA_VERSION,
    )
    source = request.WhichOneof("score_source")
    if source == "features":
        check.check_encrypted_features(v, "features", True, request.features)
    elif source == "latest_score":
        low, high = LATEST_SCORE_RANGE
        v.require(
            low <= request.latest_score <= high, "latest_score", f"must be between {low} and {high}"
        )
    v.raise_if_any()


def account_of(state: pb.AccountState) -> Account:
    """The limit rules' view of a validated account (the servicer's and replay's one way)."""
    return Account(
        currency=state.current_limit.currency_code,
        current_limit=state.current_limit.minor_units,
        balance=state.balance.minor_units,
        on_time_repayments_in_row=state.on_time_repayments_in_row,
        days_past_due=state.days_past_due,
        account_age_days=state.account_age_days,
    )


_FINGERPRINT_LABEL = b"privscore.v1/limit-request-fingerprint\x00"


def request_fingerprint(
    key: bytes,
    subject: common_pb2.SubjectRef,
    account: pb.AccountState,
    score_input_digest: str,
) -> str:
    """What makes two requests with one request id the same request (ciphertexts differ by
    nonce on every retry, so features count by their keyed digest, not their bytes).

    Keyed (HMAC-SHA256 under the input-digest key): the store keeps it in clear, and an unkeyed
    hash of an account's few small figures could be brute-forced back to them.
    """
    mac = hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256)
    for part in (
        subject.SerializeToString(deterministic=True),
        account.SerializeToString(deterministic=True),
        score_input_digest.encode(),
    ):
        mac.update(struct.pack(">I", len(part)))
        mac.update(part)
    return mac.hexdigest()


def legacy_fingerprint(
    subject: common_pb2.SubjectRef, account: pb.AccountState, score_input_digest: str
) -> str:
    """The unkeyed fingerprint that rows stored before `request_fingerprint` was keyed hold, so
    a request retried across the upgrade still replays instead of being refused as reused."""
    body = b"\x00".join(
        [
            subject.SerializeToString(deterministic=True),
            account.SerializeToString(deterministic=True),
            score_input_digest.encode(),
        ]
    )
    return hashlib.sha256(body).hexdigest()


def sealed_limit_fields(
    account: pb.AccountState, response: pb.AdjustLimitResponse, fingerprint: str
) -> dict[str, Any]:
    """What an AdjustLimit record seals: the account's figures and everything the store row
    holds but the record keeps in clear, so a lost row can be rebuilt from the log. `response`
    is the reply before the audit append, i.e. without `metadata.audit_sequence`, which is the
    record's own sequence."""
    return {
        "account": json_format.MessageToDict(account, preserving_proto_field_name=True),
        "new_limit": response.new_limit.minor_units,
        "response": base64.b64encode(response.SerializeToString()).decode("ascii"),
        "fingerprint": fingerprint,
    }


class LimitServicer(limit_service_pb2_grpc.LimitServiceServicer):
    def __init__(self, slot: RuntimeSlot) -> None:
        self._slot = slot

    async def AdjustLimit(
        self,
        request: pb.AdjustLimitRequest,
        context: grpc.aio.ServicerContext[pb.AdjustLimitRequest, pb.AdjustLimitResponse],
    ) -> pb.AdjustLimitResponse:
        validate_adjust_limit(request)
        runtime = self._slot.runtime
        subject = request.subject
        source = request.WhichOneof("score_source")
        if source == "latest_score" and STATE_SCORE not in GRANTS.get():
            raise PermissionDenied(
                f"{CALLER.get()} may not state a score; leave latest_score unset to decide on "
                "the subject's latest score privscore recorded"
            )
        opened_keys: RequestKeys = {}  # features and account may share one data key
        with stage("decrypt"):
            account = open_account(
                runtime.opener,
                request.sealed_account,
                subject,
                method=ADJUST_LIMIT_METHOD,
                identity=CALLER.get(),
                request_id=request.request_id,
                opened_keys=opened_keys,
            )
            row = (
                open_row(
                    request_scorer(
                        runtime.scorer,
                        challenger_of(runtime),
                        request.features.schema_version,
                    ),
                    runtime.opener,
                    request.features,
                    subject,
                    method=ADJUST_LIMIT_METHOD,
                    request_id=request.request_id,
                    opened_keys=opened_keys,
                )
                if source == "features"
                else None
            )
        currency = account.current_limit.currency_code
        if currency not in runtime.policy.limits.ceilings:
            raise check.CurrencyNotSupported(f"the limit policy has no ceilings for {currency}")
        if row is not None:
            with stage("model", rows=1):
                champion, (shadowed,) = await asyncio.gather(
                    runtime.model.probabilities(runtime.scorer.columns([row])),
                    shadow(runtime.challenger, runtime.policy.score, [row]),
                )
            scored = _Score(
                runtime.scorer.score_of(float(champion[0])),
                pb.SCORE_SOURCE_IN_CALL,
                "",
                [row],
                shadowed,
            )
            inputs_digest = runtime.input_digest(dict(row))
            encrypted = encrypted_inputs(request.features)
        elif source == "latest_score":
            scored = _Score(request.latest_score, pb.SCORE_SOURCE_CALLER_STATED)
            inputs_digest = runtime.input_digest({"latest_score": request.latest_score})
            encrypted = ""
        else:
            recorded = await runtime.ledger.latest_score(subject.tenant, subject.pseudonym)
            if recorded is None:
                raise NoRecordedScore(
                    "privscore has recorded no Score decision for this subject: score the "
                    "subject first, or send features to score in this call"
                )
            scored = _Score(recorded.score, pb.SCORE_SOURCE_RECORDED, recorded.decision_id)
            # Not the score itself: a retry after a newer Score must still replay this decision.
            inputs_digest = runtime.input_digest({"score_source": "recorded"})
            encrypted = ""
        fingerprint = request_fingerprint(runtime.input_digest_key, subject, account, inputs_digest)

        # One request id at a time (its first decision wins, a different request under it is
        # refused), then one decision per customer at a time; always in this order. Across
        # replicas the ledger settles the same races (StateChanged: decide again).
        request_key = (subject.tenant, f"request:{request.request_id}")
        async with (
            runtime.subject_locks.hold(request_key),
            runtime.subject_locks.hold((subject.tenant, subject.pseudonym)),
        ):
            for attempt in range(1, DECISION_ATTEMPTS + 1):
                try:
                    response = await self._decide(
                        runtime, request, account, scored, inputs_digest, encrypted, fingerprint
                    )
                except StateChanged as changed:
                    decided_again(ADJUST_LIMIT_METHOD, attempt, changed)
                    continue
                if not response.replayed:  # a replay's row was counted when it was decided
                    runtime.observe_drift(scored.rows, [scored.score] * len(scored.rows))
                return response
        raise Aborted(
            "other replicas kept changing this customer's limit; retry the request",
            reason="CONCURRENT_DECISIONS",
        )

    async def _decide(
        self,
        runtime: Runtime,
        request: pb.AdjustLimitRequest,
        account: pb.AccountState,
        scored: _Score,
        inputs_digest: str,
        encrypted: str,
        fingerprint: str,
    ) -> pb.AdjustLimitResponse:
        """Replay the request's stored decision, or decide it on the stored state and commit."""
        subject, score = request.subject, scored.score
        currency = account.current_limit.currency_code
        ledger = runtime.ledger
        stored = await ledger.limit_decision(subject.tenant, request.request_id)
        if stored is not None:
            if stored.fingerprint not in (
                fingerprint,
                legacy_fingerprint(subject, account, inputs_digest),
            ):
                raise RequestIdReused("request_id was used before for a different limit request")
            replay = pb.AdjustLimitResponse.FromString(stored.response)
            replay.replayed = True
            return replay
        last_increase = await ledger.last_increase_at(subject.tenant, subject.pseudonym)
        open_alerts = await ledger.open_alerts(subject.tenant, subject.pseudonym)
        now = runtime.clock()
        with stage("policy"):
            grade = runtime.policy.score.grade_of(score)
            decision = decide_limit(
                runtime.policy.limits,
                account_of(account),
                score,
                grade,
                last_increase,
                now,
                open_alerts,
            )
        response = pb.AdjustLimitResponse(
            metadata=runtime.metadata(request.request_id, now),
            previous_limit=account.current_limit,
            new_limit=common_pb2.Money(currency_code=currency, minor_units=decision.new_limit),
            action=_ACTIONS[decision.action],
            rule=decision.rule,
            reasons=[common_pb2.Reason(code=c, text=t) for c, t in decision.reasons],
            score=score,
            score_source=scored.source,
            score_decision_id=scored.decision_id,
            blocking_alerts=decision.blocking_alerts,
        )
        metadata = response.metadata
        (seal,) = await runtime.subject_seals([subject], now)
        record = runtime.record(
            ADJUST_LIMIT_METHOD,
            metadata,
            subject,
            seal=seal,
            # Limits, balance, the account's figures, the inputs: personal financial data.
            personal={
                "input_digest": inputs_digest,
                **({"encrypted_inputs": encrypted} if encrypted else {}),
                **sealed_limit_fields(account, response, fingerprint),
            },
            # What the cool-down and alert rules saw, so a replay can decide exactly as this did.
            last_increase_at=last_increase.isoformat() if last_increase else None,
            open_alerts=[
                {"alert_sequence": a.alert_sequence, "severity": a.severity} for a in open_alerts
            ],
            # Where the score came from: a caller-stated one is marked as such.
            score_source=pb.ScoreSource.Name(scored.source).removeprefix("SCORE_SOURCE_"),
            score_decision_id=scored.decision_id or None,
            **({"shadow": scored.shadow} if scored.shadow else {}),
            outputs={
                "action": pb.LimitAction.Name(response.action),
                "rule": decision.rule,
                "reasons": [code for code, _ in decision.reasons],
                "score": score,
                "grade": grade,
                "currency": currency,
            },
        )

        def stored_reply(sequence: int) -> bytes:
            response.metadata.audit_sequence = sequence
            return response.SerializeToString()

        row = LimitRow(
            subject.tenant, subject.pseudonym, request.request_id, fingerprint, now, decision.action
        )
        with stage("audit", records=1):
            response.metadata.audit_sequence = await ledger.commit_limit(
                record, row, response=stored_reply, seen_last_increase=last_increase
            )
        return response
