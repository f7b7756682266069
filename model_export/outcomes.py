"""Reading `privscore audit outcomes` files: one Score decision with an outcome per JSON line.

The file is the server's (service/api/outcome_export.py); the model team reads it without
importing the server, so the format is checked here line by line, as a contract. It holds
decision ids and age groups, so an error names the line number and the field, never a value:
a message that travels into a ticket or a CI log must not carry what the file holds.

    {"format": "privscore-outcomes/1", "exported_at": ..., "definition": ...}   (header, optional)
    {"decision_id": ..., "time": ..., "definition": ..., "outcome": "BAD"|"GOOD"|"INDETERMINATE",
     "observed_at": ..., "champion": {"model_version", "pd", "score", "decision"},
     "challenger": same shape or null, "age_group": "under_25"|...|null}

Keys beyond these are accepted (a later exporter may add some); a header of another format is
refused, since its lines may mean something else.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "privscore-outcomes/1"
OUTCOMES = ("BAD", "GOOD", "INDETERMINATE")
DECISIONS = ("APPROVE", "REVIEW", "DECLINE")
# In age order: the report's tables list groups this way.
AGE_GROUPS = ("under_25", "25_34", "35_49", "50_plus")


class OutcomesFormatError(ValueError):
    """The file is not a privscore outcomes file; the message names the line, not its content."""


@dataclass(frozen=True)
class Assessment:
    """One model's view of a decision: its probability of default, score and decision."""

    model_version: str
    pd: float
    score: int
    decision: str


@dataclass(frozen=True)
class OutcomeRecord:
    line: int
    decision_id: str
    time: dt.datetime
    definition: str
    outcome: str
    observed_at: dt.datetime
    champion: Assessment
    challenger: Assessment | None
    age_group: str | None


@dataclass(frozen=True)
class OutcomesFile:
    records: tuple[OutcomeRecord, ...]
    exported_at: str | None
    header_definition: str | None


def read_outcomes(path: Path) -> OutcomesFile:
    """Every record of the file, in file order; OutcomesFormatError at the first bad line."""
    records: list[OutcomeRecord] = []
    seen: dict[tuple[str, str], int] = {}
    header_line: int | None = None
    exported_at: str | None = None
    header_definition: str | None = None
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise OutcomesFormatError(f"line {number}: not UTF-8 text") from None
            if not text.strip():
                continue
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                raise OutcomesFormatError(f"line {number}: not valid JSON") from None
            if not isinstance(document, dict):
                raise OutcomesFormatError(f"line {number}: not a JSON object")
            if "format" in document:
                if document["format"] != FORMAT:
                    raise OutcomesFormatError(
                        f"line {number}: a header of another format (this reader knows {FORMAT})"
                    )
                if records or header_line is not None:
                    raise OutcomesFormatError(f"line {number}: a header after the first line")
                header_line = number
                exported_at = _optional_text(document, "exported_at", number)
                header_definition = _optional_text(document, "definition", number)
                continue
            record = _record(document, number)
            key = (record.decision_id, record.definition)
            if key in seen:
                raise OutcomesFormatError(
                    f"line {number}: the decision and definition of line {seen[key]} again "
                    "(the export holds one outcome per decision and definition)"
                )
            seen[key] = number
            records.append(record)
    return OutcomesFile(tuple(records), exported_at, header_definition)


def _record(document: dict[str, Any], line: int) -> OutcomeRecord:
    challenger = document.get("challenger", _MISSING)
    if challenger is _MISSING:
        raise OutcomesFormatError(f"line {line}: no challenger field (null when none ran)")
    age_group = document.get("age_group", _MISSING)
    if age_group is _MISSING:
        raise OutcomesFormatError(f"line {line}: no age_group field (null when unknown)")
    if age_group is not None and age_group not in AGE_GROUPS:
        raise OutcomesFormatError(f"line {line}: age_group is not one of {', '.join(AGE_GROUPS)}")
    outcome = _text(document, "outcome", line)
    if outcome not in OUTCOMES:
        raise OutcomesFormatError(f"line {line}: outcome is not one of {', '.join(OUTCOMES)}")
    return OutcomeRecord(
        line=line,
        decision_id=_text(document, "decision_id", line),
        time=_time(document, "time", line),
        definition=_text(document, "definition", line),
        outcome=outcome,
        observed_at=_time(document, "observed_at", line),
        champion=_assessment(document.get("champion"), "champion", line),
        challenger=None if challenger is None else _assessment(challenger, "challenger", line),
        age_group=age_group,
    )


_MISSING: Any = object()


def _assessment(value: Any, field: str, line: int) -> Assessment:
    if not isinstance(value, dict):
        raise OutcomesFormatError(f"line {line}: {field} is not an object")
    pd = value.get("pd")
    # bool is an int to Python, and a JSON true is no probability.
    if isinstance(pd, bool) or not isinstance(pd, int | float) or not math.isfinite(pd):
        raise OutcomesFormatError(f"line {line}: {field}.pd is not a number")
    if not 0.0 <= pd <= 1.0:
        raise OutcomesFormatError(f"line {line}: {field}.pd is outside [0, 1]")
    score = value.get("score")
    if isinstance(score, bool) or not isinstance(score, int):
        raise OutcomesFormatError(f"line {line}: {field}.score is not an integer")
    decision = _text(value, "decision", line, field)
    if decision not in DECISIONS:
        raise OutcomesFormatError(
            f"line {line}: {field}.decision is not one of {', '.join(DECISIONS)}"
        )
    return Assessment(
        model_version=_text(value, "model_version", line, field),
        pd=float(pd),
        score=score,
        decision=decision,
    )


def _text(document: dict[str, Any], key: str, line: int, parent: str = "") -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        name = f"{parent}.{key}" if parent else key
        raise OutcomesFormatError(f"line {line}: {name} is missing or not a non-empty string")
    return value


def _optional_text(document: dict[str, Any], key: str, line: int) -> str | None:
    value = document.get(key)
    if value is not None and not isinstance(value, str):
        raise OutcomesFormatError(f"line {line}: {key} is not a string")
    return value or None


def _time(document: dict[str, Any], key: str, line: int) -> dt.datetime:
    text = _text(document, key, line)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise OutcomesFormatError(f"line {line}: {key} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise OutcomesFormatError(f"line {line}: {key} has no UTC offset")
    return moment.astimezone(dt.UTC)
