"""`privscore audit replay`: re-run a recorded decision and say whether it comes out the same.

Needs what only an authorised reviewer has: the server's keyring and KEK, to open the encrypted
inputs exactly as they were received, and the recorded model and policy versions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from privscore.v1 import common_pb2, limit_service_pb2
from service.api.features import open_row, read_encrypted_inputs
from service.api.limits import ADJUST_LIMIT_METHOD, account_of
from service.api.scoring import SCORE_BATCH_METHOD, SCORE_METHOD, assess, score_outputs
from service.decisions.limits import decide_limit
from service.decisions.policy import DecisionPolicy
from service.model.scorer import ModelBatcher, Scorer
from service.privacy.digest import input_digest
from service.privacy.sealing import FeatureOpener


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


def _same_score(recorded: dict[str, Any], replayed: dict[str, Any]) -> list[str]:
    differences = [
        key
        for key in ("score", "grade", "decision", "reasons")
        if recorded.get(key) != replayed.get(key)
    ]
    if not math.isclose(
        recorded.get("probability_of_default", -1.0),
        replayed.get("probability_of_default", -2.0),
        abs_tol=1e-9,
    ):
        differences.append("probability_of_default")
    return differences


def replay(
    record: dict[str, Any],
    scorer: Scorer,
    opener: FeatureOpener,
    policy: DecisionPolicy,
    digest_key: bytes,
) -> ReplayReport:
    rpc = record.get("rpc", "")
    if record.get("outcome") == "refused":
        raise NotReplayable("the call was refused: no decision was made")
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
    report = ReplayReport(record["decision_id"], rpc, matches=True)
    subject = common_pb2.SubjectRef(tenant=record["tenant"], pseudonym=record["subject"])
    if (
        rpc in (SCORE_METHOD, SCORE_BATCH_METHOD, ADJUST_LIMIT_METHOD)
        and record["encrypted_inputs"]
    ):
        features = read_encrypted_inputs(record["encrypted_inputs"])
        row = open_row(
            scorer, opener, features, subject, method=rpc, request_id=record["request_id"]
        )
        if input_digest(digest_key, dict(row)) != record["input_digest"]:
            report.differences.append("input_digest")
        model = ModelBatcher(scorer)
        try:
            (score,) = asyncio.run(assess(model, policy.score, [row]))
        finally:
            model.close()
        replayed_score = score_outputs(score)
    if rpc in (SCORE_METHOD, SCORE_BATCH_METHOD):
        report.differences += _same_score(record["outputs"], replayed_score)
    elif rpc == ADJUST_LIMIT_METHOD:
        outputs = record["outputs"]
        score_value = replayed_score["score"] if record["encrypted_inputs"] else outputs["score"]
        account = json_format.ParseDict(record["account"], limit_service_pb2.AccountState())
        last = record.get("last_increase_at")
        decision = decide_limit(
            policy.limits,
            account_of(account),
            score_value,
            policy.score.grade_of(score_value),
            dt.datetime.fromisoformat(last) if last else None,
            dt.datetime.fromisoformat(record["time"]),
        )
        replayed = {
            "score": score_value,
            "action": f"LIMIT_ACTION_{decision.action}",
            "rule": decision.rule,
            "new_limit": str(decision.new_limit),
        }
        recorded = {
            "score": outputs["score"],
            "action": outputs["action"],
            "rule": outputs["rule"],
            "new_limit": outputs["new_limit"]["minor_units"],
        }
        report.differences += [k for k in replayed if replayed[k] != recorded[k]]
    else:
        raise NotReplayable(
            f"{rpc} decisions depend on the customer's event history, which "
            "the log does not hold; replay covers scores and limits"
        )
    report.matches = not report.differences
    return report
