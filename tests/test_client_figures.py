"""The SDK seals account state and event figures before anything leaves the process.

privscore/client/figures.py maps the clear messages a caller builds to the sealed values of
docs/envelope.md (account/1, event/1); the SDK's requests are captured on the wire by a
stand-in server on loopback (raw bytes, as a proxy would see them), searched for the amounts'
every encoding, and opened with the server's own opener, as the servicers open them.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from privscore.client.envelope import (
    ACCOUNT_SCHEMA_VERSION,
    EVENT_CLEAR_FIELDS,
    EVENT_COUNT_FIELDS,
    EVENT_MONEY_FIELDS,
    EVENT_SCHEMA_VERSION,
    FeatureInput,
    KeyLimits,
    Money,
    load_public_keyset,
)
from privscore.client.figures import account_figures, event_figures
from privscore.client.pseudonym import Pseudonymiser
from privscore.client.sdk import ADJUST_LIMIT_METHOD, EVALUATE_EVENT_METHOD, PrivscoreClient
from privscore.v1 import (
    alert_service_pb2,
    common_pb2,
    limit_service_pb2,
    privacy_service_pb2,
)
from service.privacy.keyring import Keyring
from service.privacy.sealing import FeatureOpener, RequestKeys
from tests.conftest import LOOPBACK

IDENTITY = "spiffe://privscore.dev/client/dev"
TENANT = "baitiao-cn"
SCHEMA = "german-credit-test"
# Amounts no other number in a request equals, to search the wire bytes for.
CANARY_LIMIT = 987_641_23
CANARY_BALANCE = 456_789_01
CANARY_AMOUNT = 135_792_46
CANARY_DAYS = 47


def money(units: int, code: str = "CNY") -> common_pb2.Money:
    return common_pb2.Money(currency_code=code, minor_units=units)


def encodings(units: int) -> list[bytes]:
    """Every way an amount could show in a request's bytes: as Money's varint field, the whole
    Money message, a double, and text."""
    varint = bytearray()
    n = units
    while True:
        varint.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return [
        b"\x10" + bytes(varint),
        money(units).SerializeToString(),
        struct.pack("<d", float(units)),
        str(units).encode(),
    ]


# -- the mapping ---------------------------------------------------------------------------


def test_account_figures_are_every_field_of_the_account_state() -> None:
    account = limit_service_pb2.AccountState(
        current_limit=money(1_000_000),
        balance=money(0),
        on_time_repayments_in_row=12,
        days_past_due=0,
        account_age_days=400,
    )
    assert account_figures(account) == {
        "current_limit": Money("CNY", 1_000_000),
        "balance": Money("CNY", 0),
        "on_time_repayments_in_row": 12,
        "days_past_due": 0,
        "account_age_days": 400,
    }
    # An amount not given is left out (the server names it as missing); counts never are.
    assert set(account_figures(limit_service_pb2.AccountState())) == {
        "on_time_repayments_in_row",
        "days_past_due",
        "account_age_days",
    }


def clear_event(kind: str, with_balance: bool = True) -> alert_service_pb2.BehaviourEvent:
    event = alert_service_pb2.BehaviourEvent(event_id=f"ev-{kind}")
    event.occurred_at.FromSeconds(1_790_000_000)
    if with_balance:
        event.balance_after.CopyFrom(money(CANARY_BALANCE))
    details = getattr(event, kind)
    details.SetInParent()
    if kind == "purchase":
        details.amount.CopyFrom(money(CANARY_AMOUNT))
    elif kind == "repayment":
        details.amount.CopyFrom(money(CANARY_AMOUNT))
        details.outcome = alert_service_pb2.REPAYMENT_OUTCOME_FAILED
    elif kind == "missed_payment":
        details.amount_due.CopyFrom(money(CANARY_AMOUNT))
        details.days_past_due = CANARY_DAYS
    elif kind == "limit_change":
        details.new_limit.CopyFrom(money(CANARY_AMOUNT))
    else:
        details.new_device = True
    return event


@pytest.mark.parametrize("kind", sorted(EVENT_CLEAR_FIELDS))
def test_event_figures_move_every_clear_figure_of_each_kind(kind: str) -> None:
    event = clear_event(kind)
    original = event.SerializeToString()
    cleared, values = event_figures(event)
    expected: dict[str, object] = {
        name: Money("CNY", CANARY_AMOUNT) for name in EVENT_MONEY_FIELDS[kind]
    }
    expected |= {name: CANARY_DAYS for name in EVENT_COUNT_FIELDS.get(kind, ())}
    expected["balance_after"] = Money("CNY", CANARY_BALANCE)
    assert values == expected
    # The copy keeps the kind and what stays in clear, and no figure; the caller's is unchanged.
    assert event.SerializeToString() == original
    assert cleared.WhichOneof("kind") == kind and not cleared.HasField("balance_after")
    details = getattr(cleared, kind)
    left = {descriptor.name for descriptor, _ in details.ListFields()}
    assert not left & set(EVENT_CLEAR_FIELDS[kind].values())
    if kind == "repayment":
        assert details.outcome == alert_service_pb2.REPAYMENT_OUTCOME_FAILED
    if kind == "login":
        assert details.new_device
    assert cleared.event_id == event.event_id and cleared.occurred_at == event.occurred_at


def test_a_login_without_a_balance_has_no_figures() -> None:
    cleared, values = event_figures(clear_event("login", with_balance=False))
    assert values == {} and cleared.WhichOneof("kind") == "login"


def test_an_event_with_sealed_figures_already_is_refused() -> None:
    event = clear_event("purchase")
    event.sealed_figures.schema_version = EVENT_SCHEMA_VERSION
    with pytest.raises(ValueError, match="sealed_figures"):
        event_figures(event)


# -- on the wire: a stand-in server records each request's bytes -----------------------------


@dataclass
class StandIn:
    """Answers every RPC the SDK makes with an empty (or given) reply, keeping the raw request
    bytes per method."""

    replies: dict[str, bytes] = field(default_factory=dict)
    received: dict[str, list[bytes]] = field(default_factory=dict)

    def handler(self, method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.received.setdefault(method, []).append(request)
            return self.replies.get(method, b"")

        return grpc.unary_unary_rpc_method_handler(answer)  # bytes in, bytes out

    def handlers(self) -> list[grpc.GenericRpcHandler[Any, Any]]:
        services: dict[str, list[str]] = {
            "privscore.v1.LimitService": ["AdjustLimit"],
            "privscore.v1.AlertService": ["EvaluateEvent", "UpdateAlertState"],
            "privscore.v1.PrivacyService": ["ExplainDecision", "ExportSubject", "EraseSubject"],
        }
        return [
            grpc.method_handlers_generic_handler(
                service, {name: self.handler(f"/{service}/{name}") for name in names}
            )
            for service, names in services.items()
        ]

    def one(self, method: str) -> bytes:
        (request,) = self.received.pop(method)
        return request


@dataclass
class Wire:
    client: PrivscoreClient
    stand_in: StandIn
    opener: FeatureOpener
    pseudonymiser: Pseudonymiser


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    """An SDK client (single-use data keys: a key must serve a whole AdjustLimit as one
    request) calling a stand-in over plaintext loopback, and the opener of a real keyring."""
    keyring = Keyring.create(tmp_path / "keyring.json", secrets.token_bytes(32))
    keyset = tmp_path / "public-keys.json"
    keyset.write_text(json.dumps(keyring.public_keyset()), encoding="utf-8")
    stand_in = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(stand_in.handlers())
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    pseudonymiser = Pseudonymiser(secrets.token_bytes(32))
    channel = grpc.insecure_channel(f"{LOOPBACK}:{port}")
    try:
        client = PrivscoreClient(
            channel,
            load_public_keyset(keyset),
            pseudonymiser,
            SCHEMA,
            identity=IDENTITY,
            key_limits=KeyLimits(max_requests=0),
        )
        yield Wire(client, stand_in, FeatureOpener(keyring), pseudonymiser)
    finally:
        channel.close()
        server.stop(None)


def assert_no_figure(raw: bytes, *amounts: int) -> None:
    for amount in amounts:
        for needle in encodings(amount):
            assert needle not in raw, (amount, needle)


@pytest.mark.parametrize("source", ["recorded", "stated", "features"])
def test_adjust_limit_sends_the_account_sealed_and_no_figure_in_clear(
    wire: Wire, source: str
) -> None:
    account = limit_service_pb2.AccountState(
        current_limit=money(CANARY_LIMIT),
        balance=money(CANARY_BALANCE),
        on_time_repayments_in_row=3,
        days_past_due=CANARY_DAYS,
        account_age_days=400,
    )
    features: dict[str, FeatureInput] = {"duration_in_month": 24, "purpose": "radio/television"}
    wire.client.adjust_limit(
        TENANT,
        "CN-0001",
        account,
        latest_score=560 if source == "stated" else None,
        features=features if source == "features" else None,
        request_id="limit-1",
    )
    raw = wire.stand_in.one(ADJUST_LIMIT_METHOD)
    assert_no_figure(raw, CANARY_LIMIT, CANARY_BALANCE)
    request = limit_service_pb2.AdjustLimitRequest.FromString(raw)
    assert not request.HasField("account")
    assert (
        request.WhichOneof("score_source")
        == {
            "recorded": None,
            "stated": "latest_score",
            "features": "features",
        }[source]
    )
    assert request.sealed_account.schema_version == ACCOUNT_SCHEMA_VERSION
    # One request of one data key: the server charges a single-use key once for both.
    memo: RequestKeys = {}

    def open_as_server(sealed: common_pb2.EncryptedFeatures, path: str) -> dict[str, Any]:
        return wire.opener.open(
            sealed,
            request.subject,
            method=ADJUST_LIMIT_METHOD,
            identity=IDENTITY,
            request_id=request.request_id,
            path=path,
            opened_keys=memo,
        )

    assert open_as_server(request.sealed_account, "sealed_account") == {
        "current_limit": Money("CNY", CANARY_LIMIT),
        "balance": Money("CNY", CANARY_BALANCE),
        "on_time_repayments_in_row": 3.0,
        "days_past_due": float(CANARY_DAYS),
        "account_age_days": 400.0,
    }
    if source == "features":
        assert request.features.data_key == request.sealed_account.data_key
        assert request.features.schema_version == SCHEMA
        assert open_as_server(request.features, "features") == features
    else:
        assert request.latest_score == (560 if source == "stated" else 0)
    assert wire.opener.hpke_opens == 1


def test_adjust_limit_takes_at_most_one_score_source(wire: Wire) -> None:
    with pytest.raises(ValueError, match="at most one"):
        wire.client.adjust_limit(
            TENANT, "CN-0001", limit_service_pb2.AccountState(), latest_score=1, features={}
        )
    assert wire.stand_in.received == {}


@pytest.mark.parametrize("kind", sorted(EVENT_CLEAR_FIELDS))
def test_evaluate_event_sends_the_figures_sealed_and_none_in_clear(wire: Wire, kind: str) -> None:
    event = clear_event(kind)
    wire.client.evaluate_event(TENANT, "CN-0001", event, request_id=f"event-{kind}")
    raw = wire.stand_in.one(EVALUATE_EVENT_METHOD)
    assert_no_figure(raw, CANARY_AMOUNT, CANARY_BALANCE)
    request = alert_service_pb2.EvaluateEventRequest.FromString(raw)
    sent = request.event
    assert sent.WhichOneof("kind") == kind and not sent.HasField("balance_after")
    assert sent.sealed_figures.schema_version == EVENT_SCHEMA_VERSION
    opened = wire.opener.open(
        sent.sealed_figures,
        request.subject,
        method=EVALUATE_EVENT_METHOD,
        identity=IDENTITY,
        request_id=request.request_id,
        path="event.sealed_figures",
    )
    assert opened == {
        **{name: Money("CNY", CANARY_AMOUNT) for name in EVENT_MONEY_FIELDS[kind]},
        **{name: float(CANARY_DAYS) for name in EVENT_COUNT_FIELDS.get(kind, ())},
        "balance_after": Money("CNY", CANARY_BALANCE),
    }
    # The caller's message still has its figures: nothing was cleared in place.
    assert event.HasField("balance_after")


def test_a_login_without_a_balance_is_sent_without_sealed_figures(wire: Wire) -> None:
    wire.client.evaluate_event(TENANT, "CN-0001", clear_event("login", with_balance=False))
    sent = alert_service_pb2.EvaluateEventRequest.FromString(
        wire.stand_in.one(EVALUATE_EVENT_METHOD)
    ).event
    assert not sent.HasField("sealed_figures") and sent.login.new_device


# -- alerts and the privacy service ---------------------------------------------------------


def test_alert_and_privacy_calls_send_what_they_are_given(wire: Wire) -> None:
    stand_in = wire.stand_in
    client = wire.client
    document = {"subject": {"tenant": TENANT}, "decisions": [], "events": []}
    stand_in.replies["/privscore.v1.PrivacyService/ExportSubject"] = (
        privacy_service_pb2.ExportSubjectResponse(
            document=json.dumps(document).encode()
        ).SerializeToString()
    )

    client.update_alert_state(
        7, alert_service_pb2.ALERT_STATE_RESOLVED, "PAYMENT_RECEIVED", request_id="alert-1"
    )
    update = alert_service_pb2.UpdateAlertStateRequest.FromString(
        stand_in.one("/privscore.v1.AlertService/UpdateAlertState")
    )
    assert (update.request_id, update.alert_sequence, update.state, update.reason_code) == (
        "alert-1",
        7,
        alert_service_pb2.ALERT_STATE_RESOLVED,
        "PAYMENT_RECEIVED",
    )

    client.explain_decision("0b5e1b8e-2f4c-4d7e-9a51-6f3c2d1e0a9b")
    explain = privacy_service_pb2.ExplainDecisionRequest.FromString(
        stand_in.one("/privscore.v1.PrivacyService/ExplainDecision")
    )
    assert explain.decision_id == "0b5e1b8e-2f4c-4d7e-9a51-6f3c2d1e0a9b" and explain.request_id

    # By raw id (pseudonymised here, never sent) or by the pseudonym itself.
    assert client.export_subject(TENANT, customer_id="CN-0001") == document
    export = privacy_service_pb2.ExportSubjectRequest.FromString(
        stand_in.one("/privscore.v1.PrivacyService/ExportSubject")
    )
    pseudonym = wire.pseudonymiser.pseudonym(TENANT, "CN-0001")
    assert (export.subject.tenant, export.subject.pseudonym) == (TENANT, pseudonym)
    client.erase_subject(TENANT, pseudonym=pseudonym)
    raw = stand_in.one("/privscore.v1.PrivacyService/EraseSubject")
    assert b"CN-0001" not in raw
    assert privacy_service_pb2.EraseSubjectRequest.FromString(raw).subject.pseudonym == pseudonym
    with pytest.raises(ValueError, match="exactly one"):
        client.erase_subject(TENANT)
    with pytest.raises(ValueError, match="exactly one"):
        client.erase_subject(TENANT, customer_id="CN-0001", pseudonym=pseudonym)
    assert stand_in.received == {}
