"""What the model team judges models by (`privscore audit outcomes`, read by `privscore-model
report`): each Score decision that has an outcome, with the champion's and the shadow
challenger's assessments of it and the applicant's age group, as JSON lines.

The join is by decision id alone: an outcome's record names no one (service/api/outcomes.py).
The age group is the one personal fact the file carries, coarse on purpose: the fairness
measures need it, and it is read from the decision's own inputs (opened with the server's
keys and the subject's key, as replay opens them), so an erased subject's decisions are
exported with no age group. The file is written owner-only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from service.api.features import open_row, read_encrypted_inputs
from service.api.outcomes import OUTCOME, RECORD_OUTCOME_METHOD
from service.api.scoring import SCORE_BATCH_METHOD, SCORE_METHOD
from service.audit import StoredRecord, records_containing
from service.audit.record import PD_PPB, PPB, recorded_probability
from service.audit.verify import parse_time
from service.errors import ServiceError
from service.model.scorer import Scorer
from service.privacy.record_seal import RecordSealError, open_personal
from service.privacy.sealing import FeatureOpener

FORMAT = "privscore-outcomes/1"
AGE_FEATURE = "age_in_years"
# Age groups: coarse bands, so the file says little of anyone; the report's minimum group size
# keeps small ones out of its ratios.
AGE_BANDS = ((25, "under_25"), (35, "25_34"), (50, "35_49"))
OLDEST_BAND = "50_plus"
_SCORES = (SCORE_METHOD, SCORE_BATCH_METHOD)
_DECISION = "CREDIT_DECISION_"


def age_group(age: float) -> str:
    for upper, band in AGE_BANDS:
        if age < upper:
            return band
    return OLDEST_BAND


def _needle(rpc: str) -> bytes:
    return b'"rpc":"' + rpc.encode() + b'"'


def latest_outcomes(
    records: Iterable[StoredRecord], definition: str | None
) -> dict[str, dict[str, Any]]:
    """The latest outcome of each decision (under `definition`, or each decision's latest
    whatever its definition), by decision id, in log order (a later record replaces)."""
    found: dict[str, dict[str, Any]] = {}
    for stored in records:
        record = stored.record
        observed = record.get(OUTCOME)
        if record.get("rpc") != RECORD_OUTCOME_METHOD or not isinstance(observed, dict):
            continue
        if definition is not None and observed.get("definition") != definition:
            continue
        found[str(observed.get("decision_id"))] = observed
    return found


def _decision(value: object) -> str | None:
    return value.removeprefix(_DECISION) if isinstance(value, str) and value else None


def _champion(record: dict[str, Any]) -> dict[str, Any]:
    """What the record says the champion decided; a value the record lacks is null, never a
    plausible zero the report would count."""
    outputs = record.get("outputs") or {}
    probability = recorded_probability(outputs, -1.0)
    return {
        "model_version": record.get("model_version"),
        "pd": probability if probability >= 0 else None,
        "score": outputs.get("score"),
        "decision": _decision(outputs.get("decision")),
    }


def _challenger(record: dict[str, Any]) -> dict[str, Any] | None:
    """The shadow's assessment, or null when none ran or the row was not shadowed."""
    shadow = record.get("shadow")
    if not isinstance(shadow, dict) or "skipped" in shadow:
        return None
    ppb = shadow.get(PD_PPB)
    return {
        "model_version": shadow.get("model_version"),
        "pd": float(ppb) / PPB if isinstance(ppb, int) else None,
        "score": shadow.get("score"),
        "decision": _decision(shadow.get("decision")),
    }


class AgeReader:
    """The applicant's age group from a decision's recorded inputs, or None when they no
    longer open (an erased subject, a retired field key, another schema)."""

    def __init__(
        self,
        scorer: Scorer,
        opener: FeatureOpener,
        record_key: bytes,
        subject_key: Callable[[str], bytes | None],
    ) -> None:
        self._scorer = scorer
        self._opener = opener
        self._record_key = record_key
        self._subject_key = subject_key

    def __call__(self, record: dict[str, Any]) -> str | None:
        from privscore.v1 import common_pb2

        try:
            personal = open_personal(
                record, record_key=self._record_key, subject_key=self._subject_key
            )
        except RecordSealError:
            return None
        recorded = personal.get("encrypted_inputs")
        moment = parse_time(record.get("time"))
        if not recorded or moment is None:
            return None
        subject = common_pb2.SubjectRef(
            tenant=str(record.get("tenant")), pseudonym=str(personal.get("subject"))
        )
        try:
            row = open_row(
                self._scorer,
                self._opener,
                read_encrypted_inputs(str(recorded)),
                subject,
                method=str(record.get("rpc")),
                request_id=str(record.get("request_id")),
                identity=str(record.get("caller")),
                at=moment.timestamp(),
            )
        except (ServiceError, ValueError):
            return None
        age = row.get(AGE_FEATURE)
        return age_group(float(age)) if isinstance(age, int | float) else None


def outcome_lines(
    audit_dir: Path, ages: Callable[[dict[str, Any]], str | None], definition: str | None
) -> Iterator[dict[str, Any]]:
    """The header, then one line per Score decision with an outcome, in log order."""
    outcomes = latest_outcomes(
        records_containing(audit_dir, [_needle(RECORD_OUTCOME_METHOD)]), definition
    )
    yield {
        "format": FORMAT,
        "exported_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "definition": definition,
    }
    if not outcomes:
        return
    for stored in records_containing(audit_dir, [_needle(rpc) for rpc in _SCORES]):
        record = stored.record
        observed = outcomes.get(str(record.get("decision_id")))
        if observed is None or record.get("rpc") not in _SCORES or record.get("outcome"):
            continue
        yield {
            "decision_id": record["decision_id"],
            "time": record.get("time"),
            "definition": observed.get("definition"),
            "outcome": observed.get("outcome"),
            "observed_at": observed.get("observed_at"),
            "champion": _champion(record),
            "challenger": _challenger(record),
            "age_group": ages(record),
        }
