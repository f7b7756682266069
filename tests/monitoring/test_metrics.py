"""Metrics: a real server with `--metrics-port`, real calls over mutual TLS, then a real scrape
over HTTP; every metric the operations issue names is there with the values the calls imply,
and nothing personal is in the scrape."""

from __future__ import annotations

import datetime as dt
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from privscore.v1 import alert_service_pb2 as alert_pb
from privscore.v1 import limit_service_pb2 as limit_pb
from service.config import DataLayout
from service.privacy.keyring import Keyring, load_kek
from tests.conftest import LOOPBACK, ServerProcess, applicants
from tests.test_alerts import cny, event

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("metrics") / "var", "--metrics-port", "0")
    try:
        yield server
    finally:
        server.terminate()


def metrics_port(server: ServerProcess) -> int:
    (ready,) = [r for r in server.records() if r.get("event") == "server.ready"]
    return int(ready["metrics_port"])


SCORED = 30


def test_a_scrape_after_real_calls_has_every_metric_with_plausible_values(
    metered: ServerProcess,
) -> None:
    rows = applicants()[:SCORED]
    customers = [f"metrics-customer-{n}" for n in range(SCORED)]
    with metered.channel() as channel:
        client = metered.client(channel)
        scores = [
            client.score("metrics-tenant", customer, row)
            for customer, row in zip(customers, rows, strict=True)
        ]
        batch = client.score_batch(
            "metrics-tenant", list(zip(customers[:4], rows[:4], strict=True))
        )
        limit = client.adjust_limit(
            "metrics-tenant",
            customers[0],
            limit_pb.AccountState(
                current_limit=cny(1_000_000), balance=cny(200_000), account_age_days=400
            ),
            features=rows[0],
        )
        overdue = client.evaluate_event(
            "metrics-tenant",
            customers[1],
            event(0, missed_payment=alert_pb.MissedPayment(amount_due=cny(5000), days_past_due=45)),
        )
        with pytest.raises(grpc.RpcError) as refused:
            client.score("metrics-tenant", customers[2], {**rows[2], "duration_in_month": -4})
        watching = client.watch_alerts(after_sequence=0, timeout=30)
        stream = iter(watching)
        # The stream is open once the server has sent its first alert (the one raised above).
        next(stream)
        text = scrape(metrics_port(metered))
        found = samples(text)
        watching.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    score = {"grpc_service": "privscore.v1.ScoringService", "grpc_method": "Score"}
    assert total(found, "grpc_server_started_total", **score) == SCORED + 1
    assert total(found, "grpc_server_handled_total", grpc_code="OK", **score) == SCORED
    assert total(found, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **score) == 1
    assert total(found, "grpc_server_handling_seconds_count", **score) == SCORED + 1
    assert 0 < total(found, "grpc_server_handling_seconds_sum", **score) < 60 * (SCORED + 1)
    assert total(found, "grpc_server_msg_received_total", grpc_type="unary", **score) == SCORED + 1
    assert total(found, "grpc_server_msg_sent_total", **score) == SCORED
    assert (
        total(
            found, "grpc_server_started_total", grpc_type="server_stream", grpc_method="WatchAlerts"
        )
        == 1
    )

    # Decisions: every Score and batch item by outcome and grade, under the served versions.
    decided = [s.score for s in scores] + [r.decision.score for r in batch.results]
    version = scores[0].metadata.model_version
    policy = scores[0].metadata.policy_version
    by_outcome: dict[str, int] = {}
    for credit in decided:
        name = ("CREDIT_DECISION_APPROVE", "CREDIT_DECISION_REVIEW", "CREDIT_DECISION_DECLINE")[
            credit.decision - 1
        ]
        by_outcome[name] = by_outcome.get(name, 0) + 1
    for name, count in by_outcome.items():
        assert (
            total(
                found,
                "privscore_decisions_total",
                decision=name,
                model_version=version,
                policy_version=policy,
                rule="score_cutoffs",
            )
            == count
        )
    assert total(found, "privscore_decisions_total", method="ScoreBatch") == 4
    grades = {credit.grade for credit in decided}
    assert {labels for (name, labels), _ in found.items() if name == "privscore_decisions_total"}
    for grade in grades:
        assert total(found, "privscore_decisions_total", grade=grade) >= 1
    assert total(found, "privscore_score_count", model_version=version) == len(decided)
    assert total(found, "privscore_score_sum") == pytest.approx(sum(c.score for c in decided))
    low = min(c.score for c in decided)
    assert total(found, "privscore_score_bucket", le="+Inf") == len(decided)
    assert total(found, "privscore_probability_of_default_count") == len(decided)
    assert total(found, "privscore_probability_of_default_sum") == pytest.approx(
        sum(c.probability_of_default for c in decided)
    )
    assert low > 0

    action = limit_pb.LimitAction.Name(limit.action)
    assert total(found, "privscore_limit_actions_total", action=action, rule=limit.rule) == 1
    assert total(found, "privscore_decisions_total", method="AdjustLimit", rule=limit.rule) == 1
    (alert,) = overdue.alerts
    severity = alert_pb.Severity.Name(alert.severity)
    assert total(found, "privscore_alerts_total", rule=alert.rule, severity=severity) == 1
    assert total(found, "privscore_refusals_total", method="Score", code="INVALID_ARGUMENT") == 1

    # The audit log: every decision and the refusal, group-committed and timed.
    records = SCORED + 4 + 1 + 1 + 1
    assert total(found, "privscore_audit_records_total") == records
    assert total(found, "privscore_audit_batch_records_sum") == records
    assert 1 <= total(found, "privscore_audit_batches_total") <= records
    assert total(found, "privscore_audit_commit_seconds_count") == total(
        found, "privscore_audit_batches_total"
    )
    assert total(found, "privscore_audit_syncs_total") >= total(
        found, "privscore_audit_batches_total"
    )
    assert total(found, "privscore_audit_checkpoints_total") >= 0
    # The model: every scored row ran, with reason variants for the adverse ones.
    assert total(found, "privscore_model_batch_rows_sum") >= len(decided) + 1
    assert total(found, "privscore_model_run_seconds_count") >= 1

    # Key ages: each keyring key, made moments ago by the test's `keys init`.
    layout = DataLayout(metered.data_dir)
    keyring = Keyring.load(layout.keyring, load_kek(layout.dev_kek, {}))
    for entry in keyring.listing():
        age = total(found, "privscore_key_age_seconds", key_id=str(entry["key_id"]))
        made = dt.datetime.fromisoformat(str(entry["created_at"]).replace("Z", "+00:00"))
        assert 0 <= age <= (dt.datetime.now(dt.UTC) - made).total_seconds() + 1
    assert total(found, "privscore_alert_subscribers") == 1

    # Nothing that identifies anyone: no tenant, customer, pseudonym or request id anywhere.
    # (Category names do appear, as the drift report's training bins: the schema's words.)
    identifiers = {r.metadata.request_id for r in scores} | {"metrics-tenant", *customers}
    identifiers |= {client.subject("metrics-tenant", c).pseudonym for c in customers}
    assert not [found for found in identifiers if found in text]


def test_metrics_listen_on_loopback_only_by_default(metered: ServerProcess) -> None:
    port = metrics_port(metered)
    import socket

    with socket.create_connection((LOOPBACK, port), timeout=5):
        pass
    addresses = {
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A"  # LISTEN
    }
    assert f"0100007F:{port:04X}" in addresses  # 127.0.0.1, not 0.0.0.0


def test_without_the_flag_no_metrics_port_is_opened(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var")
    try:
        (ready,) = [r for r in server.records() if r.get("event") == "server.ready"]
        assert ready["metrics_port"] is None
    finally:
        assert server.terminate() == 0
