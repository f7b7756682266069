"""AdjustLimit end to end: the policy's rules, idempotency and persistence across restarts."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from privscore.v1 import common_pb2
from privscore.v1 import limit_service_pb2 as pb
from service.config import DEFAULT_POLICY
from service.decisions.policy import load_policy
from tests.conftest import ServerProcess, applicants
from tests.test_server import error_reason, violations

LIMITS = load_policy(DEFAULT_POLICY).limits
GOOD_SCORE = 570  # grade A in the default policy
CNY = "CNY"


def cny(minor_units: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code=CNY, minor_units=minor_units)


def account(
    limit: int = 1_000_000,
    balance: int = 200_000,
    on_time: int = 12,
    days_past_due: int = 0,
    age_days: int = 400,
) -> pb.AccountState:
    return pb.AccountState(
        current_limit=cny(limit),
        balance=cny(balance),
        on_time_repayments_in_row=on_time,
        days_past_due=days_past_due,
        account_age_days=age_days,
    )


def test_good_use_raises_the_limit_by_at_most_the_percentage(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        response = shared_server.client(channel).adjust_limit(
            "t", "grow-1", account(limit=1_000_000), latest_score=GOOD_SCORE
        )
    assert response.action == pb.LIMIT_ACTION_INCREASE
    assert response.rule == "increase.on_time_run"
    assert response.previous_limit.minor_units == 1_000_000
    assert response.new_limit.minor_units == 1_200_000  # +20%, on a 100 CNY step
    assert response.new_limit.currency_code == CNY
    assert [r.code for r in response.reasons] == ["ON_TIME_REPAYMENTS"]


@pytest.mark.parametrize(
    ("state", "score", "codes"),
    [
        (account(on_time=3), GOOD_SCORE, ["ON_TIME_RUN_TOO_SHORT"]),
        (account(age_days=10), GOOD_SCORE, ["ACCOUNT_TOO_NEW"]),
        (account(), LIMITS.increase_min_score - 1, ["SCORE_TOO_LOW_FOR_INCREASE"]),
    ],
)
def test_no_increase_without_a_run_a_score_and_an_established_account(
    shared_server: ServerProcess, state: pb.AccountState, score: int, codes: list[str]
) -> None:
    with shared_server.channel() as channel:
        response = shared_server.client(channel).adjust_limit(
            "t", f"hold-{codes[0]}", state, latest_score=score
        )
    assert response.action == pb.LIMIT_ACTION_HOLD
    assert response.rule == "hold.not_eligible"
    assert response.new_limit.minor_units == state.current_limit.minor_units
    assert [r.code for r in response.reasons] == codes


def test_increase_stops_at_the_grade_ceiling(shared_server: ServerProcess) -> None:
    ceiling = LIMITS.ceilings[CNY]["A"]
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        capped = client.adjust_limit(
            "t", "cap-1", account(limit=ceiling - 100_000), latest_score=GOOD_SCORE
        )
        at_ceiling = client.adjust_limit(
            "t", "cap-2", account(limit=ceiling), latest_score=GOOD_SCORE
        )
    assert capped.action == pb.LIMIT_ACTION_INCREASE
    assert capped.new_limit.minor_units == ceiling
    assert at_ceiling.action == pb.LIMIT_ACTION_HOLD
    assert at_ceiling.rule == "hold.grade_ceiling"


def test_deterioration_lowers_the_limit_never_below_the_balance(
    shared_server: ServerProcess,
) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        lowered = client.adjust_limit(
            "t",
            "down-1",
            account(limit=1_000_000, balance=100_000, days_past_due=5),
            latest_score=GOOD_SCORE,
        )
        floored = client.adjust_limit(
            "t",
            "down-2",
            account(limit=1_000_000, balance=900_000),
            latest_score=LIMITS.decrease_below_score - 1,
        )
    assert lowered.action == pb.LIMIT_ACTION_DECREASE
    assert lowered.rule == "decrease.past_due"
    assert lowered.new_limit.minor_units == 750_000  # -25%
    assert floored.action == pb.LIMIT_ACTION_DECREASE
    assert floored.rule == "decrease.score"
    assert floored.new_limit.minor_units == 900_000  # the balance owed, not 750_000


def test_long_past_due_freezes_the_limit_at_the_balance(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        response = shared_server.client(channel).adjust_limit(
            "t",
            "freeze-1",
            account(balance=340_000, days_past_due=LIMITS.freeze_days_past_due),
            latest_score=GOOD_SCORE,
        )
    assert response.action == pb.LIMIT_ACTION_FREEZE
    assert response.rule == "freeze.days_past_due"
    assert response.new_limit.minor_units == 340_000
    assert [r.code for r in response.reasons] == ["PAST_DUE_FREEZE"]


def test_the_limit_can_be_scored_in_the_same_call(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        scored = client.score("t", "same-call", applicants()[0]).score.score
        response = client.adjust_limit("t", "same-call", account(), features=applicants()[0])
    assert response.score == scored


def test_same_request_id_gives_the_same_decision_and_adjusts_once(
    shared_server: ServerProcess,
) -> None:
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        first = client.adjust_limit(
            "t", "idem-1", account(), latest_score=GOOD_SCORE, request_id="idem-req-1"
        )
        again = client.adjust_limit(
            "t", "idem-1", account(), latest_score=GOOD_SCORE, request_id="idem-req-1"
        )
        fresh = client.adjust_limit("t", "idem-1", account(), latest_score=GOOD_SCORE)
        with pytest.raises(grpc.RpcError) as caught:
            client.adjust_limit(
                "t", "idem-1", account(balance=1), latest_score=GOOD_SCORE, request_id="idem-req-1"
            )
    assert first.action == pb.LIMIT_ACTION_INCREASE and not first.replayed
    assert again.replayed
    again.replayed = False
    assert again == first  # same decision id, audit sequence, limits, everything
    assert fresh.action == pb.LIMIT_ACTION_HOLD and fresh.rule == "hold.cooldown"
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "REQUEST_ID_REUSED"


def test_limit_history_and_cooldown_survive_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            first = server.client(channel).adjust_limit(
                "t", "persist-1", account(), latest_score=GOOD_SCORE, request_id="persist-req"
            )
    finally:
        assert server.terminate() == 0
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            replay = client.adjust_limit(
                "t", "persist-1", account(), latest_score=GOOD_SCORE, request_id="persist-req"
            )
            later = client.adjust_limit(
                "t", "persist-1", account(limit=1_200_000), latest_score=GOOD_SCORE
            )
    finally:
        assert server.terminate() == 0
    assert first.action == pb.LIMIT_ACTION_INCREASE
    assert replay.replayed and replay.metadata.decision_id == first.metadata.decision_id
    assert later.rule == "hold.cooldown"


def test_unsupported_currency_and_negative_money_are_refused(shared_server: ServerProcess) -> None:
    bad_currency = account()
    bad_currency.current_limit.currency_code = "EUR"
    bad_currency.balance.currency_code = "EUR"
    negative = account()
    negative.balance.minor_units = -1
    with shared_server.channel() as channel:
        client = shared_server.client(channel)
        with pytest.raises(grpc.RpcError) as currency_error:
            client.adjust_limit("t", "eur", bad_currency, latest_score=GOOD_SCORE)
        with pytest.raises(grpc.RpcError) as money_error:
            client.adjust_limit("t", "neg", negative, latest_score=GOOD_SCORE)
    assert currency_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(currency_error.value) == "CURRENCY_NOT_SUPPORTED"
    # Sealed: the violation names the field's position and name, never its value.
    assert violations(money_error.value) == {
        "sealed_account.fields[1]": "field balance must be an ISO 4217 currency and an amount "
        "zero or more"
    }


def test_concurrent_calls_under_one_request_id_make_one_decision(
    shared_server: ServerProcess,
) -> None:
    """Eight callers race with one request id: the same customer gets one decision replayed,
    other customers are refused, and nothing fails."""
    outcomes: list[object] = []

    def call(customer: str) -> None:
        with shared_server.channel() as channel:
            try:
                outcomes.append(
                    shared_server.client(channel).adjust_limit(
                        "t", customer, account(), latest_score=GOOD_SCORE, request_id="race-1"
                    )
                )
            except grpc.RpcError as error:
                outcomes.append(error)

    callers = [threading.Thread(target=call, args=(f"racer-{n % 2}",)) for n in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    decisions = [o for o in outcomes if isinstance(o, pb.AdjustLimitResponse)]
    refusals = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(decisions) + len(refusals) == 8
    assert len({d.metadata.decision_id for d in decisions}) == 1
    assert sum(not d.replayed for d in decisions) == 1
    assert {error_reason(r) for r in refusals} <= {"REQUEST_ID_REUSED"}
    assert len(decisions) == 4 and len(refusals) == 4
