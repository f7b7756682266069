"""The closed loop from the command line, against a real server over mutual TLS: score, a
limit decided on the score privscore recorded, an event whose alert freezes the limit until
it is resolved with `privscore alert`, explanations and a subject's export and erasure.

Each step is `privscore ...` as its own process, as an operator runs it; the checks read its
printed JSON and, for privacy, the server's own log lines: no amount the CLI was given
appears in them.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, ServerProcess, privscore_cli

TENANT = "baitiao-cn"
# Amounts no other figure in these calls equals: they must appear in no server log line.
CANARY_LIMIT = 1_234_567
CANARY_BALANCE = 234_567
CANARY_DUE = 98_765
CANARY_BALANCE_AFTER = 456_789


NESTED = ("alert", "subject")  # commands whose verb is a second word


def cli(server: ServerProcess, *args: str, cert: str = "dev") -> subprocess.CompletedProcess[str]:
    """`privscore ARGS` against `server`, as the client certificate `cert`."""
    words = 2 if args[0] in NESTED else 1
    caller = ("--target", server.target, "--cert-name", cert)
    return privscore_cli(server.data_dir, *args[:words], *caller, *args[words:])


def ok(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refused(done: subprocess.CompletedProcess[str], code: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert f": {code}: " in done.stderr.splitlines()[0], done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def limit(server: ServerProcess, customer: str, *extra: str, cert: str = "dev") -> Any:
    return cli(
        server,
        "limit",
        "--tenant",
        TENANT,
        "--customer-id",
        customer,
        "--current-limit",
        str(CANARY_LIMIT),
        "--balance",
        str(CANARY_BALANCE),
        "--on-time-repayments",
        "12",
        "--account-age-days",
        "400",
        *extra,
        cert=cert,
    )


def missed_payment(tmp_path: Path, event_id: str, days: int) -> Path:
    """A BehaviourEvent file with its figures in clear, as a caller writes it."""
    path = tmp_path / f"{event_id}.json"
    path.write_text(
        json.dumps(
            {
                "event_id": event_id,
                "occurred_at": "2026-11-26T08:30:00Z",
                "balance_after": {"currency_code": "CNY", "minor_units": CANARY_BALANCE_AFTER},
                "missed_payment": {
                    "amount_due": {"currency_code": "CNY", "minor_units": CANARY_DUE},
                    "days_past_due": days,
                },
            }
        )
    )
    return path


def check_no_amount_logged(server: ServerProcess) -> None:
    logs = "".join(server.lines)
    assert logs  # positive control: the server logged the calls
    for amount in (CANARY_LIMIT, CANARY_BALANCE, CANARY_DUE, CANARY_BALANCE_AFTER):
        assert str(amount) not in logs, amount


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(tmp_path_factory.mktemp("loop") / "var")
    try:
        yield server
    finally:
        server.terminate()


def test_limit_on_the_recorded_score_a_stated_one_or_none(server: ServerProcess) -> None:
    customer = "CLI-LOOP-1"
    refused(limit(server, customer), "FAILED_PRECONDITION")  # never scored: nothing recorded
    scored = ok(
        cli(
            server,
            "score",
            "--tenant",
            TENANT,
            "--customer-id",
            customer,
            "--features",
            str(REPO_ROOT / "examples" / "applicant.json"),
        )
    )
    recorded = ok(limit(server, customer))
    assert recorded["score_source"] == "SCORE_SOURCE_RECORDED"
    assert recorded["score_decision_id"] == scored["metadata"]["decision_id"]
    assert recorded["score"] == scored["score"]["score"]
    assert recorded["previous_limit"] == {"currency_code": "CNY", "minor_units": str(CANARY_LIMIT)}
    stated = ok(limit(server, customer, "--latest-score", "560"))
    assert (stated["score_source"], stated["score"]) == ("SCORE_SOURCE_CALLER_STATED", 560)
    # A role without the score_stater capability may not state one, and is told how not to.
    denied = refused(
        limit(server, customer, "--latest-score", "560", cert="limit-manager"),
        "PERMISSION_DENIED",
    )
    assert "latest_score" in denied
    assert ok(limit(server, customer, cert="limit-manager"))["score_source"] == (
        "SCORE_SOURCE_RECORDED"
    )
    both = limit(server, customer, "--latest-score", "1", "--features", "x.json")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    check_no_amount_logged(server)


def test_an_alert_freezes_the_limit_until_it_is_resolved(
    server: ServerProcess, tmp_path: Path
) -> None:
    customer = "CLI-LOOP-2"
    ok(limit(server, customer, "--latest-score", "700"))  # a limit to compare with
    raised = ok(
        cli(
            server,
            "event",
            "--tenant",
            TENANT,
            "--customer-id",
            customer,
            "--event",
            str(missed_payment(tmp_path, "cli-loop-overdue", days=61)),
        )
    )
    (alert,) = [a for a in raised["alerts"] if a["severity"] == "SEVERITY_CRITICAL"]
    sequence = alert["alert_sequence"]
    assert alert["state"] == "ALERT_STATE_OPEN" and sequence == alert["sequence"]

    frozen = ok(limit(server, customer, "--latest-score", "700"))
    assert frozen["action"] == "LIMIT_ACTION_FREEZE"
    assert frozen["blocking_alerts"] == [sequence]

    acknowledged = ok(
        cli(server, "alert", "ack", "--alert", sequence, "--reason", "CUSTOMER_CONTACTED")
    )
    assert acknowledged["alert"]["state"] == "ALERT_STATE_ACKNOWLEDGED"
    assert acknowledged["alert"]["state_reason"] == "CUSTOMER_CONTACTED"
    still = ok(limit(server, customer, "--latest-score", "700"))
    assert still["blocking_alerts"] == [sequence]  # acknowledged still acts on the limit

    free_text = "called her at home"
    text = refused(
        cli(server, "alert", "resolve", "--alert", sequence, "--reason", free_text),
        "INVALID_ARGUMENT",
    )
    assert "reason_code" in text and free_text not in text

    resolved = ok(
        cli(server, "alert", "resolve", "--alert", sequence, "--reason", "PAYMENT_RECEIVED")
    )
    assert resolved["alert"]["state"] == "ALERT_STATE_RESOLVED"
    assert resolved["alert"]["alert_sequence"] == sequence
    released = ok(limit(server, customer, "--latest-score", "700"))
    assert released["blocking_alerts"] == [] and released["action"] != "LIMIT_ACTION_FREEZE"

    # Resolved is final; an alert that does not exist is named as such.
    refused(
        cli(server, "alert", "ack", "--alert", sequence, "--reason", "AGAIN"),
        "FAILED_PRECONDITION",
    )
    refused(cli(server, "alert", "ack", "--alert", "999999", "--reason", "X"), "NOT_FOUND")
    # A role without alert_manager may watch alerts but not change them.
    refused(
        cli(server, "alert", "ack", "--alert", sequence, "--reason", "X", cert="monitor"),
        "PERMISSION_DENIED",
    )
    check_no_amount_logged(server)


def test_a_subject_export_is_written_owner_only(server: ServerProcess, tmp_path: Path) -> None:
    """Needs PrivacyService on the server."""
    customer = "CLI-LOOP-3"
    scored = ok(
        cli(
            server,
            "score",
            "--tenant",
            TENANT,
            "--customer-id",
            customer,
            "--features",
            str(REPO_ROOT / "examples" / "applicant.json"),
        )
    )
    decision_id = scored["metadata"]["decision_id"]
    explained = cli(server, "explain", "--decision-id", decision_id)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("[zh-CN]\n") and "\n\n[en]\n" in explained.stdout
    as_json = ok(cli(server, "explain", "--decision-id", decision_id, "--json"))
    assert [e["language"] for e in as_json["explanations"]] == ["zh-CN", "en"]
    assert as_json["decision_id"] == decision_id

    out = tmp_path / "export.json"
    done = cli(
        server,
        "subject",
        "export",
        "--tenant",
        TENANT,
        "--customer-id",
        customer,
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    document = json.loads(out.read_text())
    assert decision_id in json.dumps(document["decisions"])
    # By pseudonym: the same subject, printed.
    pseudonym = document["subject"]["pseudonym"]
    printed = ok(cli(server, "subject", "export", "--tenant", TENANT, "--pseudonym", pseudonym))
    assert printed["subject"] == document["subject"]

    erased = ok(cli(server, "subject", "erase", "--tenant", TENANT, "--pseudonym", pseudonym))
    assert erased["erased"] is True
    again = ok(cli(server, "subject", "erase", "--tenant", TENANT, "--customer-id", customer))
    assert again.get("erased", False) is False
    refused(
        cli(
            server,
            "subject",
            "export",
            "--tenant",
            TENANT,
            "--customer-id",
            customer,
            cert="customer-service",
        ),
        "PERMISSION_DENIED",
    )
