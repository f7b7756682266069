"""The decision policy file: score bands, limit rules and alert rules, validated once at start."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
ACTIONS = ("NONE", "REVIEW", "REDUCE_LIMIT", "FREEZE")


class PolicyError(ValueError):
    """The policy file is invalid; the message names the setting."""


@dataclass(frozen=True)
class Grade:
    grade: str
    min_score: int


@dataclass(frozen=True)
class ScorePolicy:
    approve_min_score: int
    review_min_score: int
    grades: tuple[Grade, ...]
    max_reasons: int

    def grade_of(self, score: int) -> str:
        return next(g.grade for g in self.grades if score >= g.min_score)


@dataclass(frozen=True)
class LimitPolicy:
    increase_min_on_time_repayments: int
    increase_min_score: int
    increase_min_account_age_days: int
    increase_max_percent: float
    increase_cooldown_days: int
    step_minor_units: int
    decrease_below_score: int
    decrease_percent: float
    freeze_days_past_due: int
    ceilings: Mapping[str, Mapping[str, int]]  # currency -> grade -> minor units
    # The limit offered to an approved applicant with its Score: currency -> grade -> minor
    # units, each at most the grade's ceiling (0: no offer for that grade).
    initial: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def initial_offer(self, currency: str, grade: str) -> tuple[int, str] | None:
        """(minor units, rule) offered for `grade` in `currency`, or None for no offer."""
        amount = self.initial.get(currency, {}).get(grade, 0)
        return (amount, f"offer.grade_{grade.lower()}") if amount > 0 else None


@dataclass(frozen=True)
class AlertAction:
    severity: str
    action: str


@dataclass(frozen=True)
class OverdueBucket:
    min_days_past_due: int
    outcome: AlertAction


@dataclass(frozen=True)
class AlertPolicy:
    overdue_buckets: tuple[OverdueBucket, ...]  # ascending by min_days_past_due
    velocity_window_minutes: int
    velocity_max_purchases: int
    velocity: AlertAction
    spike_lookback_days: int
    spike_min_history: int
    spike_multiplier: float
    spike: AlertAction
    utilisation_window_hours: int
    utilisation_min_increase_points: float
    utilisation: AlertAction
    failed_window_days: int
    failed_min_failures: int
    failed: AlertAction
    retention_days: int


@dataclass(frozen=True)
class DecisionPolicy:
    version: str
    score: ScorePolicy
    limits: LimitPolicy
    alerts: AlertPolicy


class _Reader:
    """Typed access to one table of the file, naming `section.key` in every error."""

    def __init__(self, table: Any, section: str) -> None:
        if not isinstance(table, dict):
            raise PolicyError(f"{section} must be a table")
        self.table = table
        self.section = section

    def get(self, key: str) -> Any:
        if key not in self.table:
            raise PolicyError(f"{self.section}.{key} is required")
        return self.table[key]

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PolicyError(f"{self.section}.{key} must be an integer in [{low}, {high}]")
        return value

    def number(self, key: str, low: float, high: float) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(f"{self.section}.{key} must be a number")
        if not math.isfinite(value) or not low <= value <= high:
            raise PolicyError(f"{self.section}.{key} must be in [{low:g}, {high:g}]")
        return float(value)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key), f"{self.section}.{key}")

    def items(self, key: str) -> list[_Reader]:
        value = self.get(key)
        if not isinstance(value, list) or not value:
            raise PolicyError(f"{self.section}.{key} must be a non-empty list")
        return [_Reader(item, f"{self.section}.{key}[{i}]") for i, item in enumerate(value)]

    def outcome(self) -> AlertAction:
        severity, action = self.get("severity"), self.get("action")
        if severity not in SEVERITIES:
            raise PolicyError(f"{self.section}.severity must be one of {', '.join(SEVERITIES)}")
        if action not in ACTIONS:
            raise PolicyError(f"{self.section}.action must be one of {', '.join(ACTIONS)}")
        return AlertAction(severity, action)


SCORE_RANGE = (-1_000_000, 1_000_000)
MAX_MINOR_UNITS = 10**15


def _score_policy(r: _Reader) -> ScorePolicy:
    grades = []
    for item in r.items("grades"):
        name = item.get("grade")
        if not isinstance(name, str) or not name:
            raise PolicyError(f"{item.section}.grade must be a non-empty string")
        grades.append(Grade(name, item.integer("min_score", *SCORE_RANGE)))
    if [g.min_score for g in grades] != sorted((g.min_score for g in grades), reverse=True):
        raise PolicyError(f"{r.section}.grades must run from the highest min_score down")
    if grades[-1].min_score > SCORE_RANGE[0]:
        raise PolicyError(f"{r.section}.grades: the last grade must catch every score")
    policy = ScorePolicy(
        approve_min_score=r.integer("approve_min_score", *SCORE_RANGE),
        review_min_score=r.integer("review_min_score", *SCORE_RANGE),
        grades=tuple(grades),
        max_reasons=r.integer("max_reasons", 1, 4),
    )
    if policy.review_min_score > policy.approve_min_score:
        raise PolicyError(f"{r.section}.review_min_score must not exceed approve_min_score")
    return policy


def _limit_policy(r: _Reader, grades: tuple[Grade, ...]) -> LimitPolicy:
    ceilings: dict[str, dict[str, int]] = {}
    table = r.sub("ceilings")
    for currency in table.table:
        if not (isinstance(currency, str) and len(currency) == 3 and currency.isupper()):
            raise PolicyError(f"{table.section}: {currency} is not an ISO 4217 code")
        per_grade = table.sub(currency)
        ceilings[currency] = {
            g.grade: per_grade.integer(g.grade, 1, MAX_MINOR_UNITS) for g in grades
        }
    if not ceilings:
        raise PolicyError(f"{table.section} must name at least one currency")
    initial: dict[str, dict[str, int]] = {}
    if "initial" in r.table:
        offers = r.sub("initial")
        for currency in offers.table:
            if currency not in ceilings:
                raise PolicyError(f"{offers.section}.{currency} has no ceilings to stay under")
            per_grade = offers.sub(currency)
            initial[currency] = {
                g.grade: per_grade.integer(g.grade, 0, ceilings[currency][g.grade]) for g in grades
            }
    return LimitPolicy(
        increase_min_on_time_repayments=r.integer("increase_min_on_time_repayments", 1, 1000),
        increase_min_score=r.integer("increase_min_score", *SCORE_RANGE),
        increase_min_account_age_days=r.integer("increase_min_account_age_days", 0, 36500),
        increase_max_percent=r.number("increase_max_percent", 0.01, 1000),
        increase_cooldown_days=r.integer("increase_cooldown_days", 0, 3650),
        step_minor_units=r.integer("step_minor_units", 1, MAX_MINOR_UNITS),
        decrease_below_score=r.integer("decrease_below_score", *SCORE_RANGE),
        decrease_percent=r.number("decrease_percent", 0.01, 100),
        freeze_days_past_due=r.integer("freeze_days_past_due", 1, 36500),
        ceilings=ceilings,
        initial=initial,
    )


def _alert_policy(r: _Reader) -> AlertPolicy:
    buckets = tuple(
        OverdueBucket(item.integer("min_days_past_due", 1, 36500), item.outcome())
        for item in r.items("overdue_buckets")
    )
    if [b.min_days_past_due for b in buckets] != sorted({b.min_days_past_due for b in buckets}):
        raise PolicyError(f"{r.section}.overdue_buckets must ascend by min_days_past_due")
    velocity, spike = r.sub("velocity"), r.sub("spending_spike")
    utilisation, failed = r.sub("utilisation_jump"), r.sub("failed_repayments")
    return AlertPolicy(
        overdue_buckets=buckets,
        velocity_window_minutes=velocity.integer("window_minutes", 1, 60 * 24 * 31),
        velocity_max_purchases=velocity.integer("max_purchases", 1, 100_000),
        velocity=velocity.outcome(),
        spike_lookback_days=spike.integer("lookback_days", 1, 3650),
        spike_min_history=spike.integer("min_history", 1, 100_000),
        spike_multiplier=spike.number("multiplier", 1.0, 1000.0),
        spike=spike.outcome(),
        utilisation_window_hours=utilisation.integer("window_hours", 1, 24 * 366),
        utilisation_min_increase_points=utilisation.number("min_increase_points", 1, 100),
        utilisation=utilisation.outcome(),
        failed_window_days=failed.integer("window_days", 1, 3650),
        failed_min_failures=failed.integer("min_failures", 1, 1000),
        failed=failed.outcome(),
        retention_days=r.integer("retention_days", 1, 36500),
    )


def parse_policy(document: Mapping[str, Any]) -> DecisionPolicy:
    root = _Reader(dict(document), "policy")
    version = root.get("version")
    if not isinstance(version, str) or not 1 <= len(version) <= 64:
        raise PolicyError("policy.version must be a string of 1-64 characters")
    score = _score_policy(root.sub("score"))
    return DecisionPolicy(
        version=version,
        score=score,
        limits=_limit_policy(root.sub("limits"), score.grades),
        alerts=_alert_policy(root.sub("alerts")),
    )


def load_policy(path: Path) -> DecisionPolicy:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"policy file {path} is not valid TOML: {error}") from None
    return parse_policy(document)
