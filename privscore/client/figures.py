"""Account state and event figures, moved from the clear messages into their sealed envelopes.

A caller builds `AccountState` and `BehaviourEvent` with their figures in clear, in its own
process, as the contract first defined them; the server refuses those clear fields, because an
amount or a day count in clear would reach every proxy, log and trace on the way. These helpers
turn the clear figures into typed values under the names and schema versions that
privscore/client/envelope.py defines ("account/1", "event/1"), so the SDK seals them like
features (same data key rules, same associated data), and return the event with its clear
figures cleared, so nothing of them is left in what is sent. Raw-request users (tests, the load
generator, the fuzzer) seal through `seal_account` / `seal_event` with a data key of their own.
"""

from __future__ import annotations

from privscore.client.envelope import (
    ACCOUNT_COUNT_FIELDS,
    ACCOUNT_MONEY_FIELDS,
    ACCOUNT_SCHEMA_VERSION,
    EVENT_BALANCE_FIELD,
    EVENT_CLEAR_FIELDS,
    EVENT_SCHEMA_VERSION,
    DataKey,
    Money,
    SealedValue,
)
from privscore.v1 import alert_service_pb2, common_pb2, limit_service_pb2

Figures = dict[str, SealedValue]


def money(value: common_pb2.Money) -> Money:
    """A clear `Money` message as the value sealed in its place (`FeatureValue.money_value`)."""
    return Money(value.currency_code, value.minor_units)


def account_figures(account: limit_service_pb2.AccountState) -> Figures:
    """The account state as sealed values: both amounts when set (an unset one is left out, so
    the server names it as missing rather than judging an empty amount) and every count (0 is a
    count like any other: proto3 cannot tell it from unset, and the server needs all three)."""
    values: Figures = {
        name: money(getattr(account, name))
        for name in ACCOUNT_MONEY_FIELDS
        if account.HasField(name)  # type: ignore[arg-type]
    }
    for name in ACCOUNT_COUNT_FIELDS:
        values[name] = int(getattr(account, name))
    return values


def event_figures(
    event: alert_service_pb2.BehaviourEvent,
) -> tuple[alert_service_pb2.BehaviourEvent, Figures]:
    """A copy of `event` with every clear figure cleared, and those figures as sealed values.

    The kind's sub-message stays set (empty, or with what stays in clear: a repayment's outcome,
    a login's new-device flag). A missed payment's days past due of 0 is "not given" in proto3
    and left out, so the server says it is required. The caller's message is not changed.
    """
    if event.HasField("sealed_figures"):
        raise ValueError(
            "event.sealed_figures is filled by the SDK, bound to the request it sends: give the "
            "event's figures in clear"
        )
    clear = alert_service_pb2.BehaviourEvent()
    clear.CopyFrom(event)
    values: Figures = {}
    kind = clear.WhichOneof("kind")
    if kind is not None:
        details = getattr(clear, kind)
        for sealed_name, clear_name in EVENT_CLEAR_FIELDS[kind].items():
            field = details.DESCRIPTOR.fields_by_name[clear_name]
            if field.message_type is not None:
                if details.HasField(clear_name):
                    values[sealed_name] = money(getattr(details, clear_name))
            elif getattr(details, clear_name):
                values[sealed_name] = int(getattr(details, clear_name))
            details.ClearField(clear_name)
    if clear.HasField("balance_after"):
        values[EVENT_BALANCE_FIELD] = money(clear.balance_after)
        clear.ClearField("balance_after")
    return clear, values


def seal_account(
    key: DataKey,
    subject: common_pb2.SubjectRef,
    account: limit_service_pb2.AccountState,
    *,
    request_id: str,
) -> common_pb2.EncryptedFeatures:
    """`AdjustLimitRequest.sealed_account` for `account`, under `key` (sealed for AdjustLimit;
    the same key as the request's features, if it has any)."""
    return key.seal(
        ACCOUNT_SCHEMA_VERSION, subject, account_figures(account), request_id=request_id
    )


def seal_event(
    key: DataKey,
    subject: common_pb2.SubjectRef,
    event: alert_service_pb2.BehaviourEvent,
    *,
    request_id: str,
) -> alert_service_pb2.BehaviourEvent:
    """The event as sent: clear figures cleared, `sealed_figures` under `key` (sealed for
    EvaluateEvent); an event with no figures (a login without a balance) carries none."""
    clear, values = event_figures(event)
    if values:
        clear.sealed_figures.CopyFrom(
            key.seal(EVENT_SCHEMA_VERSION, subject, values, request_id=request_id)
        )
    return clear
