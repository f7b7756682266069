"""The closed loop over gRPC, as one customer lives it (issue 17): scored and offered an initial
limit; spending and repaying to an increase decided on the score privscore recorded; a missed
payment raising a critical alert that freezes the limit until it is resolved (the stream
carrying the change); the decisions explained in Chinese and English, a declined applicant told
what would change the outcome; the customer's data exported, then erased, after which the log
still verifies and nothing of the person in it can be opened.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from privscore.v1 import alert_service_pb2 as alerts_pb
from privscore.v1 import common_pb2
from privscore.v1 import limit_service_pb2 as limits_pb
from privscore.v1 import scoring_service_pb2 as scoring_pb
from service.audit import iter_records
from service.config import DataLayout
from tests.conftest import ServerProcess, applicants, privscore_cli
from tests.test_server import error_reason

TENANT = "baitiao-cn"
CUSTOMER = "loop-customer-0001"
# Figures of this customer that must never be readable in the log after erasure, nor in clear
# before it.
SPEND, REPAY, DUE = 123_457, 123_457, 98_771
_ids = itertools.count(1)


def cny(minor_units: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="CNY", minor_units=minor_units)


def at(days_ago: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago))
    return stamp


def event(days_ago: float, **kind: Any) -> alerts_pb.BehaviourEvent:
    message = alerts_pb.BehaviourEvent(event_id=f"loop-{next(_ids)}", occurred_at=at(days_ago))
    for name, detail in kind.items():
        getattr(message, name).CopyFrom(detail)
    return message


def account(limit: int, balance: int) -> limits_pb.AccountState:
    return limits_pb.AccountState(
        current_limit=cny(limit),
        balance=cny(balance),
        on_time_repayments_in_row=8,
        days_past_due=0,
        account_age_days=200,
    )


def first(decision: int, client: Any, tenant: str, prefix: str) -> tuple[str, Any, Any]:
    """(customer id, features, response) of the first sample applicant given `decision`."""
    for n, row in enumerate(applicants()):
        response = client.score(tenant, f"{prefix}-{n}", row, offer_currency="CNY")
        if response.score.decision == decision:
            return f"{prefix}-{n}", row, response
    raise AssertionError("no sample applicant gets that decision")


@pytest.fixture
def server(server_process: ServerProcess) -> ServerProcess:
    return server_process


def test_the_whole_loop(server: ServerProcess) -> None:
    watched: list[alerts_pb.Alert] = []
    with server.channel() as channel:
        client = server.client(channel)

        # 1. Scored and offered an initial limit (an approved applicant of grade A or B, so
        # the grade's ceiling leaves room for an increase).
        trial = [client.score("trial", f"trial-{n}", row) for n, row in enumerate(applicants())]
        chosen = next(
            n
            for n, response in enumerate(trial)
            if response.score.decision == scoring_pb.CREDIT_DECISION_APPROVE
            and response.score.grade in ("A", "B")
        )
        scored = client.score(TENANT, CUSTOMER, applicants()[chosen], offer_currency="CNY")
        offer = scored.initial_limit
        assert offer.limit.currency_code == "CNY" and offer.limit.minor_units > 0
        assert offer.rule == f"offer.grade_{scored.score.grade.lower()}"
        limit = offer.limit.minor_units

        # 2. Spends and repays on time; the limit follows the score privscore recorded.
        spent = client.evaluate_event(
            TENANT, CUSTOMER, event(3, purchase=alerts_pb.Purchase(amount=cny(SPEND)))
        )
        repaid = client.evaluate_event(
            TENANT,
            CUSTOMER,
            event(
                2,
                repayment=alerts_pb.Repayment(
                    amount=cny(REPAY), outcome=alerts_pb.REPAYMENT_OUTCOME_SUCCEEDED
                ),
            ),
        )
        assert not spent.alerts and not repaid.alerts
        raised = client.adjust_limit(TENANT, CUSTOMER, account(limit, 0))
        assert raised.action == limits_pb.LIMIT_ACTION_INCREASE, raised
        assert raised.score_source == limits_pb.SCORE_SOURCE_RECORDED
        assert raised.score_decision_id == scored.metadata.decision_id
        assert raised.score == scored.score.score
        limit = raised.new_limit.minor_units

        # 3. A payment missed long enough raises a critical alert, which freezes the limit.
        subscriber = threading.Thread(
            target=lambda: watched.extend(_watch(server, until_state=True)), daemon=True
        )
        subscriber.start()
        missed = client.evaluate_event(
            TENANT,
            CUSTOMER,
            event(1, missed_payment=alerts_pb.MissedPayment(amount_due=cny(DUE), days_past_due=65)),
        )
        (critical,) = [a for a in missed.alerts if a.severity == alerts_pb.SEVERITY_CRITICAL]
        assert critical.state == alerts_pb.ALERT_STATE_OPEN
        assert critical.alert_sequence == critical.sequence
        frozen = client.adjust_limit(TENANT, CUSTOMER, account(limit, SPEND))
        assert frozen.action == limits_pb.LIMIT_ACTION_FREEZE
        assert frozen.rule == "freeze.open_alert"
        assert critical.alert_sequence in frozen.blocking_alerts
        assert frozen.new_limit.minor_units == SPEND  # frozen at the balance owed

        # Acknowledged is not resolved: still frozen. Resolved: the freeze lifts.
        acknowledged = client.update_alert_state(
            critical.alert_sequence, alerts_pb.ALERT_STATE_ACKNOWLEDGED, "CUSTOMER_CONTACTED"
        )
        assert acknowledged.alert.state == alerts_pb.ALERT_STATE_ACKNOWLEDGED
        still = client.adjust_limit(TENANT, CUSTOMER, account(limit, SPEND))
        assert still.action == limits_pb.LIMIT_ACTION_FREEZE
        resolved = client.update_alert_state(
            critical.alert_sequence, alerts_pb.ALERT_STATE_RESOLVED, "PAYMENT_RECEIVED"
        )
        assert resolved.alert.state == alerts_pb.ALERT_STATE_RESOLVED
        assert resolved.alert.sequence > critical.sequence  # a new place in the stream
        assert resolved.alert.state_reason == "PAYMENT_RECEIVED"
        with pytest.raises(grpc.RpcError) as final:
            client.update_alert_state(
                critical.alert_sequence, alerts_pb.ALERT_STATE_ACKNOWLEDGED, "REOPENED"
            )
        assert final.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(final.value) == "ALERT_STATE_CONFLICT"
        after = client.adjust_limit(TENANT, CUSTOMER, account(limit, SPEND))
        assert after.action != limits_pb.LIMIT_ACTION_FREEZE
        assert critical.alert_sequence not in after.blocking_alerts

        subscriber.join(timeout=30)
        states = [(a.alert_sequence, a.state) for a in watched]
        assert (critical.alert_sequence, alerts_pb.ALERT_STATE_OPEN) in states
        assert (critical.alert_sequence, alerts_pb.ALERT_STATE_ACKNOWLEDGED) in states
        assert states[-1] == (critical.alert_sequence, alerts_pb.ALERT_STATE_RESOLVED)

        # 4. Explained in both languages; a declined applicant is told what would change it.
        explained = client.explain_decision(scored.metadata.decision_id)
        assert [e.language for e in explained.explanations] == ["zh-CN", "en"]
        for text in explained.explanations:
            assert text.score == scored.score.score
            assert text.score_min < text.score < text.score_max
            assert text.model_version == scored.metadata.model_version
            assert text.outcome and text.contest and text.text
            assert not text.counterfactuals  # approved: nothing to change
        chinese, english = explained.explanations
        assert any("\u4e00" <= ch <= "\u9fff" for ch in chinese.text)
        assert all(ord(ch) < 0x3000 for ch in english.text)
        declined_id, _, declined = first(
            scoring_pb.CREDIT_DECISION_DECLINE, client, TENANT, "loop-declined"
        )
        told = client.explain_decision(declined.metadata.decision_id)
        for text in told.explanations:
            assert [r.code for r in text.reasons] == [r.code for r in declined.score.reasons]
            assert all(r.text for r in text.reasons)
            assert text.counterfactuals, "a declined applicant is told what would change it"
            for change in text.counterfactuals:
                assert change.feature not in ("age_in_years", "personal_status_and_sex")
                assert change.score > declined.score.score and change.text

        # 5. Everything privscore keeps about the customer, with the explanations.
        document = client.export_subject(TENANT, customer_id=CUSTOMER)
        assert document["subject"]["pseudonym"] == client.subject(TENANT, CUSTOMER).pseudonym
        assert [d["decision_id"] for d in document["decisions"]] == [scored.metadata.decision_id]
        assert document["decisions"][0]["offer"]["limit"] == offer.limit.minor_units
        assert document["decisions"][0]["explanation"][0]["language"] == "zh-CN"
        assert len(document["limits"]) == 4 and len(document["events"]) == 3
        amounts = json.dumps(document["events"])
        assert str(SPEND) in amounts and str(DUE) in amounts
        assert [a["alert"]["to"] for a in document["alerts"]] == ["ACKNOWLEDGED", "RESOLVED"]
        assert document["open_alerts"] == []
        assert document["accesses"], "the explanation given is part of the subject's trail"

        # A reviewer with the keys finds the subject's records by its pseudonym.
        pseudonym = client.subject(TENANT, CUSTOMER).pseudonym
        shown = privscore_cli(server.data_dir, "audit", "show", "--open", "--subject", pseudonym)
        assert shown.returncode == 0, shown.stderr
        found = [json.loads(line)["record"] for line in shown.stdout.splitlines()]
        assert len(found) >= 10 and all(r["opened"]["subject"] == pseudonym for r in found)
        assert scored.metadata.decision_id in {r["decision_id"] for r in found}

        # 6. Erased: the store forgets, the log keeps decisions nobody can read the person in.
        erased = client.erase_subject(TENANT, customer_id=CUSTOMER)
        assert erased.erased and erased.events_deleted == 3
        assert erased.adjustments_deleted == 4 and erased.alerts_deleted >= 3
        again = client.export_subject(TENANT, customer_id=CUSTOMER)
        assert again["decisions"] == again["limits"] == again["events"] == []
        with pytest.raises(grpc.RpcError) as gone:
            client.explain_decision(scored.metadata.decision_id)
        assert error_reason(gone.value) == "SUBJECT_ERASED"
        with pytest.raises(grpc.RpcError) as unscored:
            client.adjust_limit(TENANT, CUSTOMER, account(limit, 0))
        assert error_reason(unscored.value) == "NO_RECORDED_SCORE"
        # Another customer is untouched.
        assert client.explain_decision(declined.metadata.decision_id).explanations
        assert declined_id

    verified = privscore_cli(server.data_dir, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"]
    pseudonym = client.subject(TENANT, CUSTOMER).pseudonym
    log = DataLayout(server.data_dir).audit_dir
    erasures = []
    for stored in iter_records(log):
        serialized = json.dumps(stored.record)
        assert pseudonym not in serialized
        assert str(SPEND) not in serialized and str(DUE) not in serialized
        if stored.record.get("rpc", "").endswith("/EraseSubject"):
            erasures.append(stored.record["erased"])
    assert erasures and all(key.startswith("sk-") for key in erasures[0]["key_ids"])
    shown = privscore_cli(
        server.data_dir, "audit", "show", "--open", "--decision", scored.metadata.decision_id
    )
    assert shown.returncode == 1 and "destroyed subject key" in shown.stderr


def _watch(server: ServerProcess, *, until_state: bool) -> list[alerts_pb.Alert]:
    """Alerts of the stream from its start until a resolution arrives (or the stream's time)."""
    got: list[alerts_pb.Alert] = []
    with server.channel() as channel:
        client = server.client(channel)
        try:
            for alert in client.watch_alerts(after_sequence=0, timeout=30):
                got.append(alert)
                if until_state and alert.state == alerts_pb.ALERT_STATE_RESOLVED:
                    break
        except grpc.RpcError:
            pass
    return got
