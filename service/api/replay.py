"""`privscore audit replay`: re-run a recorded decision and say whether it comes out the same.

Needs what only an authorised reviewer has: the server's keyring and KEK, to open the encrypted
inputs exactly as they were received and the record's sealed account figures, and the recorded
model and policy versions. A record that cannot be replayed here (a refusal, an event decision,
another model or policy, inputs or sealed fields missing or not opening) raises NotReplayable
saying why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from privscore.v1 import common_pb2, limit_service_pb2
from service.api.alerts import EVALUATE_EVENT_METHOD
from service.api.features import open_row, read_encrypted_inputs
from service.api.limits import ADJUST_LIMIT_METHOD, account_of, request_fingerprint
from service.api.scoring import (
    SCORE_BATCH_METHOD,
    SCORE_METHOD,
    assess,
    score_outputs,
)
from service.audit.record import recorded_probability
from service.decisions.limits import decide_limit
from service.decisions.policy import DecisionPolicy
from service.decisions.rows import OpenAlert
from service.errors import ServiceError
from service.model.scorer import ModelBatcher, Row, Scorer
from service.privacy.digest import input_digest
from service.privacy.record_seal import RecordSealError, open_personal
from service.privacy.sealing import FeatureOpener

_SCORES = (SCORE_METHOD, SCORE_BATCH_METHOD)


@dataclass
class ReplayReport:
    decision_id: str
    rpc: str
    matches: bool
    differences: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "rpc": self.rpc,
            "matches": self.matches,
            "differences": self.differences,
        }


class NotReplayable(ValueError):
    """The record cannot be replayed here; the message says why."""


@dataclass(frozen=True)
class _Keys:
    opener: FeatureOpener
    digest_key: bytes
    record_key: bytes


def _same_score(recorded: dict[str, Any], replayed: dict[str, Any]) -> list[str]:
    differences = [
        key
        for key in ("score", "grade", "decision", "reasons")
        if recorded.get(key) != replayed.get(key)
    ]
    if not math.isclose(
        recorded_probability(recorded, -1.0), recorded_probability(replayed, -2.0), abs_tol=1e-9
    ):
        differences.append("probability_of_default")
    return differences


def _text(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise NotReplayable(f"the record has no {name}")
    return value


def _outputs(record: dict[str, Any]) -> dict[str, Any]:
    outputs = record.get("outputs")
    if not isinstance(outputs, dict):
        raise NotReplayable("the record has no outputs to compare with")
    return outputs


def _subject(record: dict[str, Any]) -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant=_text(record, "tenant"), pseudonym=_text(record, "subject"))


def _open_inputs(record: dict[str, Any], scorer: Scorer, keys: _Keys) -> tuple[Row, bool]:
    """The recorded inputs, opened as the server opened them, and whether their keyed digest
    is the recorded one."""
    try:
        features = read_encrypted_inputs(_text(record, "encrypted_inputs"))
    except (binascii.Error, ValueError, DecodeError):
        raise NotReplayable("the record's encrypted inputs are not a serialised message") from None
    rpc = _text(record, "rpc")
    try:
        decided_at = dt.datetime.fromisoformat(_text(record, "time")).timestamp()
    except ValueError:
        raise NotReplayable("the record's time is not an ISO 8601 time") from None
    try:
        row = open_row(
            scorer,
            keys.opener,
            features,
            _subject(record),
            method=rpc,
            request_id=_text(record, "request_id"),
            identity=_text(record, "caller"),  # the data key is sealed for the caller
            at=decided_at,  # and was within its grant when the decision was made
        )
    except ServiceError as error:
        raise NotReplayable(f"the recorded inputs do not open here: {error}") from None
    return row, input_digest(keys.digest_key, dict(row)) == record.get("input_digest")


def _rescore(scorer: Scorer, policy: DecisionPolicy, row: Row) -> dict[str, Any]:
    model = ModelBatcher(scorer)
    try:
        (score,) = asyncio.run(assess(model, policy.score, [row]))
    finally:
        model.close()
    return score_outputs(score)


def _replay_score(
    record: dict[str, Any], scorer: Scorer, policy: DecisionPolicy, keys: _Keys
) -> list[str]:
    if not record.get("encrypted_inputs"):
        raise NotReplayable(
            "the record holds no encrypted inputs (removed?): the score cannot be re-run"
        )
    outputs = _outputs(record)
    row, same_inputs = _open_inputs(record, scorer, keys)
    differences = [] if same_inputs else ["input_digest"]
    replayed = _rescore(scorer, policy, row)
    return (
        differences + _same_score(outputs, replayed) + _same_offer(record, replayed, policy, keys)
    )


def _same_offer(
    record: dict[str, Any], replayed: dict[str, Any], policy: DecisionPolicy, keys: _Keys
) -> list[str]:
    """An initial-limit offer made again: the rule in clear and the sealed amount must be what
    the recorded policy gives the replayed grade in the recorded currency."""
    offered = record.get("offer")
    if not isinstance(offered, dict):
        return []
    again = policy.limits.initial_offer(str(offered.get("currency")), str(replayed.get("grade")))
    if again is None or again[1] != offered.get("rule"):
        return ["offer"]
    return [] if record.get("initial_limit") == again[0] else ["offer"]


def _sealed_limit(
    sealed: dict[str, Any],
) -> tuple[limit_service_pb2.AccountState, limit_service_pb2.AdjustLimitResponse, str]:
    """(account, response as decided, request fingerprint) from the record's sealed fields."""
    try:
        account = json_format.ParseDict(sealed["account"], limit_service_pb2.AccountState())
        response = limit_service_pb2.AdjustLimitResponse.FromString(
            base64.b64decode(sealed["response"], validate=True)
        )
        fingerprint = str(sealed["fingerprint"])
    except (KeyError, TypeError, binascii.Error, ValueError, DecodeError) as error:
        raise NotReplayable(f"the sealed fields are not an AdjustLimit payload: {error}") from None
    return account, response, fingerprint


def _replay_limit(
    record: dict[str, Any], scorer: Scorer, policy: DecisionPolicy, keys: _Keys
) -> list[str]:
    outputs = _outputs(record)
    differences = []
    if record.get("encrypted_inputs"):
        row, same_inputs = _open_inputs(record, scorer, keys)
        if not same_inputs:
            differences.append("input_digest")
        score = _rescore(scorer, policy, row)["score"]
    elif record.get("score_source") == "RECORDED":
        # The subject's recorded score, which the record keeps (with the decision it came from).
        score = outputs.get("score")
        if input_digest(keys.digest_key, {"score_source": "recorded"}) != record.get(
            "input_digest"
        ):
            raise NotReplayable("the record's input digest is not a recorded score's")
    else:
        # Decided from a caller's latest score, unless the inputs were taken out of the record:
        # the keyed digest says which.
        score = outputs.get("score")
        if input_digest(keys.digest_key, {"latest_score": score}) != record.get("input_digest"):
            raise NotReplayable(
                "the decision was scored from features, and the record holds no encrypted "
                "inputs (removed?): the score cannot be re-run"
            )
    if not isinstance(score, int):
        raise NotReplayable("the record has no score")
    account, response, fingerprint = _sealed_limit(record)
    if (
        request_fingerprint(
            keys.digest_key, _subject(record), account, str(record.get("input_digest"))
        )
        != fingerprint
    ):
        differences.append("fingerprint")
    last = record.get("last_increase_at")
    try:
        decided_at = dt.datetime.fromisoformat(_text(record, "time"))
        last_increase = dt.datetime.fromisoformat(last) if last else None
    except (TypeError, ValueError):
        raise NotReplayable("the record's times are not ISO 8601") from None
    grade = policy.score.grade_of(score)
    decision = decide_limit(
        policy.limits,
        account_of(account),
        score,
        grade,
        last_increase,
        decided_at,
        _open_alerts(record),
    )
    replayed = {
        "score": score,
        "grade": grade,
        "action": f"LIMIT_ACTION_{decision.action}",
        "rule": decision.rule,
        "reasons": [code for code, _ in decision.reasons],
        "new_limit": decision.new_limit,
    }
    recorded = {
        **{key: outputs.get(key) for key in ("score", "grade", "action", "rule", "reasons")},
        "new_limit": response.new_limit.minor_units,
    }
    differences += [key for key in replayed if replayed[key] != recorded[key]]
    # The sealed response is the one the caller received: it must say what the record says.
    if (
        limit_service_pb2.LimitAction.Name(response.action) != outputs.get("action")
        or response.rule != outputs.get("rule")
        or response.score != outputs.get("score")
        or response.metadata.decision_id != record.get("decision_id")
    ):
        differences.append("sealed_response")
    return differences


def _open_alerts(record: dict[str, Any]) -> list[OpenAlert]:
    """The unresolved alerts the decision saw, as its record lists them."""
    listed = record.get("open_alerts") or []
    try:
        return [OpenAlert(int(a["alert_sequence"]), str(a["severity"]), "OPEN") for a in listed]
    except (KeyError, TypeError, ValueError):
        raise NotReplayable("the record's open alerts are not a list of alerts") from None


def replay(
    record: dict[str, Any],
    scorer: Scorer,
    opener: FeatureOpener,
    policy: DecisionPolicy,
    digest_key: bytes,
    record_key: bytes,
    subject_key: Callable[[str], bytes | None] = lambda key_id: None,
) -> ReplayReport:
    """Re-decide a Score, ScoreBatch item or AdjustLimit record; NotReplayable says why not.
    `subject_key` finds the key a format-3 record's personal fields are sealed under (the
    decision store keeps them until erasure or retention expiry)."""
    rpc = record.get("rpc")
    if record.get("outcome") == "refused":
        raise NotReplayable(
            f"the {rpc} call was refused ({record.get('code')}, {record.get('reason')}): "
            "no decision was made, so there is nothing to replay"
        )
    if rpc == EVALUATE_EVENT_METHOD:
        raise NotReplayable(
            f"{rpc} decisions depend on the customer's event history, which "
            "the log does not hold; replay covers scores and limits"
        )
    if rpc not in (*_SCORES, ADJUST_LIMIT_METHOD):
        raise NotReplayable(f"{rpc} records are not decisions replay covers (scores and limits)")
    if record.get("model_version") != scorer.model_version:
        raise NotReplayable(
            f"recorded with model {record.get('model_version')}; load that "
            f"model (--model-dir), not {scorer.model_version}"
        )
    if record.get("policy_version") != policy.version:
        raise NotReplayable(
            f"recorded under policy {record.get('policy_version')}; load that "
            f"policy (--policy), not {policy.version}"
        )
    report = ReplayReport(_text(record, "decision_id"), rpc, matches=True)
    try:
        personal = open_personal(record, record_key=record_key, subject_key=subject_key)
    except RecordSealError as error:
        raise NotReplayable(f"the personal fields cannot be read: {error}") from None
    record = {**record, **personal}
    keys = _Keys(opener, digest_key, record_key)
    if rpc in _SCORES:
        report.differences = _replay_score(record, scorer, policy, keys)
    else:
        report.differences = _replay_limit(record, scorer, policy, keys)
    report.matches = not report.differences
    return report
