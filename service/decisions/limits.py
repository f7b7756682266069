"""Dynamic credit limits: grow with good use, shrink with risk, freeze when past due.

Pure rules over the account, the score and the customer's last increase; the servicer adds
idempotency, persistence and audit around them. Amounts are integer minor units throughout.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from service.decisions.policy import LimitPolicy
from service.decisions.rows import OpenAlert


@dataclass(frozen=True)
class Account:
    currency: str
    current_limit: int
    balance: int
    on_time_repayments_in_row: int
    days_past_due: int
    account_age_days: int


@dataclass(frozen=True)
class LimitDecision:
    action: str  # HOLD, INCREASE, DECREASE, FREEZE
    new_limit: int
    rule: str
    reasons: tuple[tuple[str, str], ...]  # (code, text)
    # The unresolved alerts that froze the limit or held back an increase.
    blocking_alerts: tuple[int, ...] = ()


def _floor_to_step(amount: int, step: int) -> int:
    return amount // step * step


def decide_limit(
    policy: LimitPolicy,
    account: Account,
    score: int,
    grade: str,
    last_increase_at: dt.datetime | None,
    now: dt.datetime,
    open_alerts: Sequence[OpenAlert] = (),
) -> LimitDecision:
    """The limit rules, then the subject's unresolved alerts over them: a critical one freezes
    the limit at the balance owed, a high one turns an increase into a hold, until resolved."""
    critical = tuple(a.alert_sequence for a in open_alerts if a.severity == "CRITICAL")
    if critical:
        return LimitDecision(
            "FREEZE",
            account.balance,
            "freeze.open_alert",
            (
                (
                    "OPEN_CRITICAL_ALERT",
                    "An unresolved critical alert froze the limit at the balance owed",
                ),
            ),
            critical,
        )
    decision = _decide(policy, account, score, grade, last_increase_at, now)
    high = tuple(a.alert_sequence for a in open_alerts if a.severity == "HIGH")
    if high and decision.action == "INCREASE":
        return LimitDecision(
            "HOLD",
            account.current_limit,
            "hold.open_alert",
            (("OPEN_HIGH_ALERT", "An unresolved high alert forbids an increase"),),
            high,
        )
    return decision


def _decide(
    policy: LimitPolicy,
    account: Account,
    score: int,
    grade: str,
    last_increase_at: dt.datetime | None,
    now: dt.datetime,
) -> LimitDecision:
    current, balance = account.current_limit, account.balance
    if account.days_past_due >= policy.freeze_days_past_due:
        return LimitDecision(
            "FREEZE",
            balance,
            "freeze.days_past_due",
            (
                (
                    "PAST_DUE_FREEZE",
                    f"Payment is {policy.freeze_days_past_due} or more days "
                    "past due: the limit is frozen at the balance owed",
                ),
            ),
        )
    deterioration = []
    if account.days_past_due > 0:
        deterioration.append(("PAST_DUE", "A repayment is past due"))
    if score < policy.decrease_below_score:
        deterioration.append(
            (
                "SCORE_DETERIORATED",
                "The credit score fell below the threshold for keeping the current limit",
            )
        )
    if deterioration:
        cut = int(current * policy.decrease_percent / 100)
        lowered = min(current, max(balance, _floor_to_step(current - cut, policy.step_minor_units)))
        if lowered < current:
            rule = "decrease.past_due" if account.days_past_due > 0 else "decrease.score"
            return LimitDecision("DECREASE", lowered, rule, tuple(deterioration))
        return LimitDecision(
            "HOLD",
            current,
            "hold.balance_floor",
            (*deterioration, ("BALANCE_FLOOR", "The limit cannot go below the balance owed")),
        )

    missing = []
    if account.on_time_repayments_in_row < policy.increase_min_on_time_repayments:
        missing.append(
            (
                "ON_TIME_RUN_TOO_SHORT",
                f"Fewer than {policy.increase_min_on_time_repayments} on-time repayments in a row",
            )
        )
    if score < policy.increase_min_score:
        missing.append(
            (
                "SCORE_TOO_LOW_FOR_INCREASE",
                "The credit score is below the threshold for an increase",
            )
        )
    if account.account_age_days < policy.increase_min_account_age_days:
        missing.append(
            (
                "ACCOUNT_TOO_NEW",
                f"The account is younger than {policy.increase_min_account_age_days} days",
            )
        )
    if missing:
        return LimitDecision("HOLD", current, "hold.not_eligible", tuple(missing))
    cooldown = dt.timedelta(days=policy.increase_cooldown_days)
    if last_increase_at is not None and now - last_increase_at < cooldown:
        return LimitDecision(
            "HOLD",
            current,
            "hold.cooldown",
            (
                (
                    "INCREASE_COOLDOWN",
                    f"The limit was raised within the last {policy.increase_cooldown_days} days",
                ),
            ),
        )
    ceiling = policy.ceilings[account.currency][grade]
    step_up = int(current * policy.increase_max_percent / 100)
    raised = min(ceiling, _floor_to_step(current + step_up, policy.step_minor_units))
    if raised <= current:
        return LimitDecision(
            "HOLD",
            current,
            "hold.grade_ceiling",
            (("GRADE_CEILING", f"The limit is at the ceiling for grade {grade}"),),
        )
    return LimitDecision(
        "INCREASE",
        raised,
        "increase.on_time_run",
        (("ON_TIME_REPAYMENTS", "A run of on-time repayments and a good score"),),
    )
