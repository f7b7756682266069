"""Sealed account state and event figures, the server's side: from the envelope (under the
account and event schema versions of privscore/client/envelope.py) to the clear messages the
limit and alert rules read, held in memory for the call only.

The rules, the request fingerprint and the audit record's sealed fields were written for the
clear `AccountState` and `BehaviourEvent`; opening into those same messages keeps every one of
them unchanged, while nothing of the figures ever travels, or is logged, in clear.
Violations name the sealed field's position and name, never its value.
"""

from __future__ import annotations

from collections.abc import Mapping

from privscore.client.envelope import (
    ACCOUNT_COUNT_FIELDS,
    ACCOUNT_MONEY_FIELDS,
    ACCOUNT_SCHEMA_VERSION,
    EVENT_BALANCE_FIELD,
    EVENT_CLEAR_FIELDS,
    EVENT_COUNT_FIELDS,
    EVENT_MONEY_FIELDS,
    EVENT_SCHEMA_VERSION,
    Money,
    SealedValue,
)
from privscore.v1 import alert_service_pb2, common_pb2, limit_service_pb2
from service.api import validation as check
from service.privacy.sealing import FeatureOpener, RequestKeys

SEAL_REQUIRED = "SEAL_REQUIRED"
# Counts a person's account can hold: days (a century) and repayments in a row.
MAX_DAYS = 36_500
MAX_COUNT = 1_000_000


def check_sealed(
    v: check.Violations,
    field: str,
    present: bool,
    sealed: common_pb2.EncryptedFeatures,
    schema_version: str,
) -> None:
    """The envelope's structure, and that it claims the schema version its place requires (a
    features envelope moved here would otherwise fail only at decryption)."""
    check.check_encrypted_features(v, field, present, sealed)
    if present and sealed.schema_version and sealed.schema_version != schema_version:
        v.add(f"{field}.schema_version", f"must be {schema_version}")


def _positions(sealed: common_pb2.EncryptedFeatures) -> dict[str, int]:
    return {field.name: index for index, field in enumerate(sealed.fields)}


class _Reader:
    """Typed reads of opened values, each problem a violation naming the field's position."""

    def __init__(
        self, v: check.Violations, path: str, sealed: common_pb2.EncryptedFeatures
    ) -> None:
        self._v = v
        self._path = path
        self._index = _positions(sealed)

    def where(self, name: str) -> str:
        index = self._index.get(name)
        return f"{self._path}.fields" if index is None else f"{self._path}.fields[{index}]"

    def money(
        self, values: Mapping[str, SealedValue], name: str, *, allow_zero: bool, required: bool
    ) -> common_pb2.Money | None:
        if name not in values:
            if required:
                self._v.add(self.where(name), f"field {name} is required", "REQUIRED_FIELD")
            return None
        value = values[name]
        if not isinstance(value, Money):
            self._v.add(self.where(name), f"field {name} must be a money value")
            return None
        money = common_pb2.Money(currency_code=value.currency_code, minor_units=value.minor_units)
        # The clear message's checks, reported as one violation of the sealed field: they name
        # sub-fields the sealed value does not have.
        probe = check.Violations()
        check.check_money(probe, self.where(name), True, money, allow_zero=allow_zero)
        if probe.items:
            bound = "zero or more" if allow_zero else "positive"
            self._v.add(
                self.where(name),
                f"field {name} must be an ISO 4217 currency and an amount {bound}",
            )
            return None
        return money

    def count(
        self, values: Mapping[str, SealedValue], name: str, *, low: int, high: int
    ) -> int | None:
        if name not in values:
            self._v.add(self.where(name), f"field {name} is required", "REQUIRED_FIELD")
            return None
        value = values[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value != int(value)
            or not low <= value <= high
        ):
            self._v.add(self.where(name), f"field {name} must be a whole number {low}-{high}")
            return None
        return int(value)

    def no_others(self, values: Mapping[str, SealedValue], allowed: set[str]) -> None:
        for name in values:
            if name not in allowed:
                self._v.add(self.where(name), f"field {name} is not one this message carries")


def open_account(
    opener: FeatureOpener,
    sealed: common_pb2.EncryptedFeatures,
    subject: common_pb2.SubjectRef,
    *,
    method: str,
    identity: str,
    request_id: str,
    opened_keys: RequestKeys,
) -> limit_service_pb2.AccountState:
    """The account state sealed in `sealed_account`, validated, as the clear message."""
    path = "sealed_account"
    values = opener.open(
        sealed,
        subject,
        method=method,
        identity=identity,
        request_id=request_id,
        path=path,
        opened_keys=opened_keys,
    )
    v = check.Violations()
    read = _Reader(v, path, sealed)
    limit = read.money(values, "current_limit", allow_zero=False, required=True)
    balance = read.money(values, "balance", allow_zero=True, required=True)
    counts = {
        name: read.count(
            values, name, low=0, high=MAX_COUNT if name == "on_time_repayments_in_row" else MAX_DAYS
        )
        for name in ACCOUNT_COUNT_FIELDS
    }
    read.no_others(values, {*ACCOUNT_MONEY_FIELDS, *ACCOUNT_COUNT_FIELDS})
    if limit is not None and balance is not None and limit.currency_code != balance.currency_code:
        v.add(read.where("balance"), "field balance must be in the current limit's currency")
    v.raise_if_any()
    return limit_service_pb2.AccountState(
        current_limit=limit,
        balance=balance,
        on_time_repayments_in_row=counts["on_time_repayments_in_row"] or 0,
        days_past_due=counts["days_past_due"] or 0,
        account_age_days=counts["account_age_days"] or 0,
    )


def check_event_clear_fields(v: check.Violations, event: alert_service_pb2.BehaviourEvent) -> None:
    """Figures sent in clear are refused (their values are never read or repeated), as is a
    kind that carries figures without its sealed ones."""
    if event.HasField("balance_after"):
        v.add("event.balance_after", "must travel sealed in event.sealed_figures", SEAL_REQUIRED)
    kind = event.WhichOneof("kind")
    if kind is None:
        return
    details = getattr(event, kind)
    for name in EVENT_CLEAR_FIELDS[kind].values():
        present = details.HasField(name) if name != "days_past_due" else details.days_past_due
        if present:
            v.add(
                f"event.{kind}.{name}",
                "must travel sealed in event.sealed_figures",
                SEAL_REQUIRED,
            )
    if EVENT_MONEY_FIELDS[kind] or event.HasField("sealed_figures"):
        check_sealed(
            v,
            "event.sealed_figures",
            event.HasField("sealed_figures"),
            event.sealed_figures,
            EVENT_SCHEMA_VERSION,
        )


def open_event(
    opener: FeatureOpener,
    event: alert_service_pb2.BehaviourEvent,
    subject: common_pb2.SubjectRef,
    *,
    method: str,
    identity: str,
    request_id: str,
) -> alert_service_pb2.BehaviourEvent:
    """The event with its sealed figures opened into the clear fields, validated, in memory:
    what the alert rules and the record's sealed fields read."""
    clear = alert_service_pb2.BehaviourEvent()
    clear.CopyFrom(event)
    clear.ClearField("sealed_figures")
    if not event.HasField("sealed_figures"):
        return clear
    path = "event.sealed_figures"
    sealed = event.sealed_figures
    values = opener.open(
        sealed, subject, method=method, identity=identity, request_id=request_id, path=path
    )
    kind = event.WhichOneof("kind")
    assert kind is not None  # validated
    v = check.Violations()
    read = _Reader(v, path, sealed)
    details = getattr(clear, kind)
    amounts = []
    for name in EVENT_MONEY_FIELDS[kind]:
        money = read.money(values, name, allow_zero=False, required=True)
        if money is not None:
            getattr(details, EVENT_CLEAR_FIELDS[kind][name]).CopyFrom(money)
            amounts.append((name, money))
    for name in EVENT_COUNT_FIELDS.get(kind, ()):
        days = read.count(values, name, low=1, high=MAX_DAYS)
        if days is not None:
            details.days_past_due = days
    balance = read.money(values, EVENT_BALANCE_FIELD, allow_zero=True, required=False)
    if balance is not None:
        clear.balance_after.CopyFrom(balance)
        amounts.append((EVENT_BALANCE_FIELD, balance))
    read.no_others(
        values,
        {*EVENT_MONEY_FIELDS[kind], *EVENT_COUNT_FIELDS.get(kind, ()), EVENT_BALANCE_FIELD},
    )
    if len({money.currency_code for _, money in amounts}) > 1:
        for name, _ in amounts:
            v.add(read.where(name), f"field {name} must share one currency with the others")
    v.raise_if_any()
    return clear


__all__ = [
    "ACCOUNT_SCHEMA_VERSION",
    "EVENT_SCHEMA_VERSION",
    "SEAL_REQUIRED",
    "check_event_clear_fields",
    "check_sealed",
    "open_account",
    "open_event",
]
