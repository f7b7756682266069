"""Behaviour monitoring rules: overdue buckets, velocity, spending spikes, utilisation jumps and
repeated failed repayments.

Rules look at event time, not arrival time, so an event that arrives late is judged against
the customer's events around when it happened. Window rules count every window of the
configured length that contains the event, so a late event can complete a burst.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from service.decisions.policy import AlertAction, AlertPolicy

PURCHASE = "purchase"
REPAYMENT = "repayment"
MISSED_PAYMENT = "missed_payment"
LOGIN = "login"
LIMIT_CHANGE = "limit_change"


@dataclass(frozen=True)
class Event:
    event_id: str
    occurred_at: dt.datetime
    kind: str
    currency: str | None = None
    amount: int | None = None  # minor units: purchase/repayment amount, amount due, new limit
    succeeded: bool | None = None  # repayments only
    days_past_due: int | None = None  # missed payments only
    balance_after: int | None = None


@dataclass(frozen=True)
class RaisedAlert:
    rule: str
    outcome: AlertAction
    reasons: tuple[tuple[str, str], ...]


def _max_in_windows_containing(
    times: Sequence[dt.datetime], at: dt.datetime, window: dt.timedelta
) -> int:
    """Most events (sorted `times`, `at` among them) in any closed window of `window` length
    that contains `at`: such a window's end runs from `at` to `at + window`, and the busiest one
    ends on an event."""
    best = 0
    ends = times[bisect.bisect_left(times, at) : bisect.bisect_right(times, at + window)]
    for end in ends:
        count = bisect.bisect_right(times, end) - bisect.bisect_left(times, end - window)
        best = max(best, count)
    return best


def evaluate(policy: AlertPolicy, event: Event, history: Sequence[Event]) -> list[RaisedAlert]:
    """Alerts raised by `event`, given the customer's other retained events (any order)."""
    others = sorted(
        (e for e in history if e.event_id != event.event_id), key=lambda e: e.occurred_at
    )
    alerts: list[RaisedAlert] = []
    if event.kind == MISSED_PAYMENT and event.days_past_due is not None:
        reached = [b for b in policy.overdue_buckets if event.days_past_due >= b.min_days_past_due]
        if reached:
            bucket = reached[-1]
            alerts.append(
                RaisedAlert(
                    f"overdue.dpd_{bucket.min_days_past_due}",
                    bucket.outcome,
                    (
                        (
                            f"OVERDUE_{bucket.min_days_past_due}_DAYS",
                            f"A payment is {bucket.min_days_past_due} or more days past due",
                        ),
                    ),
                )
            )
    if event.kind == PURCHASE:
        alerts.extend(_velocity(policy, event, others))
        alerts.extend(_spending_spike(policy, event, others))
    if event.kind == REPAYMENT and event.succeeded is False:
        failures = sorted(
            [e.occurred_at for e in others if e.kind == REPAYMENT and e.succeeded is False]
            + [event.occurred_at]
        )
        window = dt.timedelta(days=policy.failed_window_days)
        if (
            _max_in_windows_containing(failures, event.occurred_at, window)
            >= policy.failed_min_failures
        ):
            alerts.append(
                RaisedAlert(
                    "repayments.repeated_failures",
                    policy.failed,
                    (
                        (
                            "REPEATED_FAILED_REPAYMENTS",
                            f"{policy.failed_min_failures} or more failed "
                            f"repayments within {policy.failed_window_days} days",
                        ),
                    ),
                )
            )
    if event.balance_after is not None:
        alerts.extend(_utilisation_jump(policy, event, others))
    return alerts


def _velocity(policy: AlertPolicy, event: Event, others: Sequence[Event]) -> list[RaisedAlert]:
    times = sorted([e.occurred_at for e in others if e.kind == PURCHASE] + [event.occurred_at])
    window = dt.timedelta(minutes=policy.velocity_window_minutes)
    if (
        _max_in_windows_containing(times, event.occurred_at, window)
        <= policy.velocity_max_purchases
    ):
        return []
    return [
        RaisedAlert(
            "velocity.purchases",
            policy.velocity,
            (
                (
                    "PURCHASE_VELOCITY",
                    f"More than {policy.velocity_max_purchases} purchases within "
                    f"{policy.velocity_window_minutes} minutes",
                ),
            ),
        )
    ]


def _spending_spike(
    policy: AlertPolicy, event: Event, others: Sequence[Event]
) -> list[RaisedAlert]:
    since = event.occurred_at - dt.timedelta(days=policy.spike_lookback_days)
    previous = [
        e.amount
        for e in others
        if e.kind == PURCHASE
        and e.currency == event.currency
        and e.amount is not None
        and since <= e.occurred_at < event.occurred_at
    ]
    if len(previous) < policy.spike_min_history or event.amount is None:
        return []
    mean = sum(previous) / len(previous)
    if event.amount <= policy.spike_multiplier * mean:
        return []
    return [
        RaisedAlert(
            "spending.spike",
            policy.spike,
            (
                (
                    "SPENDING_SPIKE",
                    f"A purchase above {policy.spike_multiplier:g} times the customer's "
                    f"mean purchase of the last {policy.spike_lookback_days} days",
                ),
            ),
        )
    ]


def _limit_at(others: Sequence[Event], at: dt.datetime, currency: str | None) -> int | None:
    changes = [
        e
        for e in others
        if e.kind == LIMIT_CHANGE and e.occurred_at <= at and e.currency == currency and e.amount
    ]
    return changes[-1].amount if changes else None


def _utilisation_jump(
    policy: AlertPolicy, event: Event, others: Sequence[Event]
) -> list[RaisedAlert]:
    limit = (
        event.amount
        if event.kind == LIMIT_CHANGE
        else _limit_at(others, event.occurred_at, event.currency)
    )
    since = event.occurred_at - dt.timedelta(hours=policy.utilisation_window_hours)
    earlier = [
        e
        for e in others
        if e.balance_after is not None
        and e.currency == event.currency
        and since <= e.occurred_at < event.occurred_at
    ]
    if not limit or not earlier or event.balance_after is None:
        return []
    before = earlier[-1]
    limit_before = _limit_at(others, before.occurred_at, before.currency)
    if not limit_before or before.balance_after is None:
        return []
    jump = 100 * (event.balance_after / limit - before.balance_after / limit_before)
    if jump < policy.utilisation_min_increase_points:
        return []
    return [
        RaisedAlert(
            "utilisation.jump",
            policy.utilisation,
            (
                (
                    "UTILISATION_JUMP",
                    f"Utilisation rose by {policy.utilisation_min_increase_points:g} or "
                    f"more percentage points within {policy.utilisation_window_hours} hours",
                ),
            ),
        )
    ]
