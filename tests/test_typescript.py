"""The TypeScript client (clients/typescript) run from the Python suite, so `make test` runs it.

Its own tests (`npm test`: sealing and opening against every committed vector, choosing the
key to seal to from a GetServerInfo answer, with and without a pinned key, account state and
event figures split and sealed) and end-to-end runs against a real privscore server over mutual
TLS. Given only the caller's own secrets (copied out of the server's data directory), the
client learns the sealing key and schema version from DiscoveryService, scores (twice, reusing
the sealed data key), and closes the loop with account state and event figures sealed: limits
adjusted on features scored in the call (sealed with the account under one data key), on the
score the server recorded and on a stated one; a missed payment whose alert freezes the limit
until the TypeScript client acknowledges and resolves it; a login without figures; and calls
the server refuses (a Score, an AdjustLimit for a subject never scored, resolving a resolved
alert); decisions explained; and another customer exported and erased. This file then checks
what it discovered against the served manifest, the decisions and the published keyset, the
replies, the request ids from the trailers, the decoded error details, and that the audit log
holds every decision, alert change and refusal, with the figures the client sealed opening
from the records' sealed fields and none in clear, and the erased customer's unreadable. A
second run pins keys the server does not list and must be refused by the client before any
call but GetServerInfo.

Node 20 and npm are needed: without them these tests skip, saying so, unless
PRIVSCORE_REQUIRE_NODE=1 (CI, .ci/run), where they fail. `npm ci` (from the npm registry)
runs only when node_modules is missing or was installed from another package-lock.json.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from service.api.features import read_encrypted_inputs
from service.audit import iter_records
from service.config import DataLayout
from service.security.certs import CertPaths
from tests.conftest import REPO_ROOT, ServerProcess, applicants, privscore_cli, served_manifest

CLIENT_DIR = REPO_ROOT / "clients" / "typescript"
REQUIRE_NODE_ENV = "PRIVSCORE_REQUIRE_NODE"
NODE_MAJOR = 20
INSTALL_STAMP = CLIENT_DIR / "node_modules" / ".privscore-package-lock.sha256"
TENANT = "ts-e2e"
CUSTOMER = "ts-customer-0001"
UNSCORED_CUSTOMER = "ts-customer-0002"
ERASED_CUSTOMER = "ts-customer-0003"
# The erased customer's purchase: after erasure no record may show it, opened or not.
ERASED_SPEND = 54_321
ADJUST_LIMIT = "/privscore.v1.LimitService/AdjustLimit"
EVALUATE_EVENT = "/privscore.v1.AlertService/EvaluateEvent"
UPDATE_ALERT_STATE = "/privscore.v1.AlertService/UpdateAlertState"
SCORE = "/privscore.v1.ScoringService/Score"
GET_SERVER_INFO = "/privscore.v1.DiscoveryService/GetServerInfo"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_NODE_ENV) == "1":
        pytest.fail(f"{REQUIRE_NODE_ENV}=1, and the TypeScript client cannot run: {reason}")
    pytest.skip(f"TypeScript client not tested: {reason} (set {REQUIRE_NODE_ENV}=1 to fail)")


def _run(*args: str, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args,
        cwd=CLIENT_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout


@dataclass(frozen=True)
class Node:
    node: str
    npm: str


@pytest.fixture(scope="module")
def tools() -> Node:
    """node and npm, with the client's dependencies installed (`npm ci` when node_modules is
    missing or stale) and the client built."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("`node` and `npm` are not both on PATH")
    assert node is not None and npm is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major.group(1)) < NODE_MAJOR:
        _unavailable(f"Node {NODE_MAJOR} or later is needed, found {version or 'none'}")
    lock = hashlib.sha256((CLIENT_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not INSTALL_STAMP.exists() or INSTALL_STAMP.read_text().strip() != lock:
        _run(npm, "ci", timeout=600)
        INSTALL_STAMP.write_text(lock + "\n")
    _run(npm, "run", "build", timeout=300)
    return Node(node, npm)


def test_typescript_unit_tests_pass_against_the_vectors(tools: Node) -> None:
    out = _run(tools.npm, "test", timeout=300)
    assert re.search(r"^# fail 0$", out, re.M), out[-2000:]
    passed = re.search(r"^# pass (\d+)$", out, re.M)
    assert passed is not None and int(passed.group(1)) > 40, out[-2000:]


def _scenario(score_features: dict[str, Any], stated_score: int) -> dict[str, Any]:
    refused = {**score_features, "purpose": "nonsense"}
    money = {"currency_code": "CNY"}
    account = {
        "current_limit": {**money, "minor_units": 1_000_000},
        "balance": {**money, "minor_units": 200_000},
        "on_time_repayments_in_row": 12,
        "days_past_due": 0,
        "account_age_days": 400,
    }
    occurred = {"seconds": int(time.time()) - 60, "nanos": 0}
    return {
        "tenant": TENANT,
        "customer_id": CUSTOMER,
        "unscored_customer_id": UNSCORED_CUSTOMER,
        "score": {"request_id": "ts-score-1", "features": score_features},
        "adjust_limit": {
            "request_id": "ts-limit-1",
            "account": account,
            "features": score_features,
        },
        "adjust_limit_recorded": {"request_id": "ts-limit-2", "account": account},
        "adjust_limit_stated": {
            "request_id": "ts-limit-3",
            "account": account,
            "latest_score": stated_score,
        },
        # 65 days past due: the policy's CRITICAL bucket (60+), which freezes the limit.
        "evaluate_event": {
            "request_id": "ts-event-1",
            "event": {
                "event_id": "ts-missed-1",
                "occurred_at": occurred,
                "missed_payment": {
                    "amount_due": {**money, "minor_units": 123_457},
                    "days_past_due": 65,
                },
                "balance_after": {**money, "minor_units": 246_913},
            },
        },
        "login_event": {
            "request_id": "ts-event-2",
            "event": {"event_id": "ts-login-1", "occurred_at": occurred, "login": {}},
        },
        "adjust_limit_alerted": {"request_id": "ts-limit-4", "account": account},
        "acknowledge_alert": {"request_id": "ts-alert-ack", "reason_code": "CUSTOMER_CONTACTED"},
        "resolve_alert": {"request_id": "ts-alert-resolve", "reason_code": "PAYMENT_RECEIVED"},
        "adjust_limit_resolved": {"request_id": "ts-limit-5", "account": account},
        "refused_score": {"request_id": "ts-refused-1", "features": refused},
        "refused_adjust_limit": {"request_id": "ts-refused-2", "account": account},
        "refused_resolve": {"request_id": "ts-refused-3", "reason_code": "PAYMENT_RECEIVED"},
        "explain": {"score": "ts-explain-1", "limit": "ts-explain-2", "refused": "ts-refused-4"},
        "erasure": {
            "customer_id": ERASED_CUSTOMER,
            "request_ids": {
                step: f"ts-erasure-{n}"
                for n, step in enumerate(
                    (
                        "score",
                        "adjust_limit",
                        "event",
                        "export",
                        "erase",
                        "adjust_limit_after",
                        "explain_after",
                        "export_after",
                        "erase_again",
                    )
                )
            },
            "account": account,
            "event": {
                "event_id": "ts-purchase-1",
                "occurred_at": occurred,
                "purchase": {"amount": {**money, "minor_units": ERASED_SPEND}},
            },
        },
    }


def _caller_secrets(data_dir: Path, into: Path) -> dict[str, str]:
    """The e2e environment: the caller's own secrets (CA, client certificate and key, pseudonym
    key), copied out of the server's data directory, so the TypeScript client is given no path
    into it: the sealing key and schema version can only come from DiscoveryService."""
    layout = DataLayout(data_dir)
    certs = CertPaths(layout.certs_dir)
    into.mkdir()
    env = {}
    for name, source in (
        ("PRIVSCORE_CA_FILE", certs.ca),
        ("PRIVSCORE_CERT_FILE", certs.client_cert("dev")),
        ("PRIVSCORE_KEY_FILE", certs.client_key("dev")),
        ("PRIVSCORE_PSEUDONYM_KEY_FILE", layout.pseudonym_key),
    ):
        copy = into / source.name
        shutil.copyfile(source, copy)
        env[name] = str(copy)
    return env


def _published_primary(keyset: Path) -> tuple[str, bytes]:
    """(key id, raw public key) of the primary in the keyset the server publishes."""
    (primary,) = [k for k in json.loads(keyset.read_text())["keys"] if k["primary"]]
    return primary["key_id"], base64.b64decode(primary["public_key"], validate=True)


def _calls_logged(server: ServerProcess, since: int, expected: int) -> list[dict[str, Any]]:
    """The calls the server logged (`rpc.finished`) after its first `since` log records,
    waiting a moment for `expected` of them: a call's line may follow its reply."""
    deadline = time.monotonic() + 5
    while True:
        calls = [r for r in server.records()[since:] if r.get("event") == "rpc.finished"]
        if len(calls) >= expected or time.monotonic() > deadline:
            return calls
        time.sleep(0.02)


def test_typescript_client_scores_adjusts_and_reports_against_a_real_server(
    tools: Node, tmp_path: Path
) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    try:
        # An applicant the policy does not approve outright, so the score carries reasons;
        # the Python SDK's score for the same features is what the TypeScript one must get.
        with server.channel() as channel:
            client = server.client(channel)
            for features in applicants()[:100]:
                python_score = client.score(TENANT, "python-probe", features).score
                if python_score.reasons:
                    break
            else:
                pytest.fail("no applicant among the first 100 got reasons")
            pseudonym = client.subject(TENANT, CUSTOMER).pseudonym
            unscored = client.subject(TENANT, UNSCORED_CUSTOMER).pseudonym
            erased_pseudonym = client.subject(TENANT, ERASED_CUSTOMER).pseudonym
        stated_score = python_score.score + 7
        scenario = _scenario(dict(features), stated_score)
        scenario_file = tmp_path / "scenario.json"
        scenario_file.write_text(json.dumps(scenario))
        env = {
            "PRIVSCORE_TARGET": server.target,
            **_caller_secrets(data_dir, tmp_path / "caller"),
            "PRIVSCORE_E2E_INPUT": str(scenario_file),
        }
        stdout = _run(tools.node, "dist/e2e/e2e.js", timeout=120, env=env)
        out = json.loads(stdout)

        # Pinned keys the server does not list: a fresh key under a fresh id, and under the
        # server's own primary key id. The client refuses each after GetServerInfo, before
        # any other call (had it not, it would have scored).
        primary_id = out["sealed_to"]
        fresh = [x25519.X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in "ab"]
        pinned = [("fk-pinned-elsewhere", fresh[0]), (primary_id, fresh[1])]
        scenario_file.write_text(
            json.dumps(
                {
                    **scenario,
                    "pinned": [
                        {"key_id": key_id, "public_key": base64.b64encode(raw).decode()}
                        for key_id, raw in pinned
                    ],
                }
            )
        )
        audited_before = sum(1 for _ in iter_records(DataLayout(data_dir).audit_dir))
        calls_before = len(server.records())
        pinned_out = json.loads(_run(tools.node, "dist/e2e/e2e.js", timeout=120, env=env))
        calls_after = _calls_logged(server, calls_before, len(pinned))
    finally:
        assert server.terminate() == 0
    identity = "spiffe://privscore.dev/client/dev"
    assert out["identity"] == identity
    assert out["subject"] == {"tenant": TENANT, "pseudonym": pseudonym}  # same key, same HMAC

    # What it discovered: the served manifest's schema, the decisions' versions, the
    # published primary key (the one it sealed to).
    manifest = served_manifest()
    discovered = out["discovered"]
    assert discovered["sealing_format"] == 2
    assert out["schema_version"] == discovered["schema_version"] == manifest.schema_version
    assert discovered["features"] == [spec.name for spec in manifest.schema.model_features]
    keyset_id, keyset_key = _published_primary(DataLayout(data_dir).public_keyset)
    primary = discovered["sealing_keys"][0]
    assert primary["status"] == "SEALING_KEY_STATUS_PRIMARY"
    assert (primary["key_id"], base64.b64decode(primary["public_key"])) == (keyset_id, keyset_key)
    assert out["sealed_to"] == keyset_id

    score = out["score"]
    assert score["requestId"] == "ts-score-1" == score["response"]["metadata"]["request_id"]
    metadata = score["response"]["metadata"]
    assert metadata["model_version"] == discovered["model_version"] == manifest.model_version
    assert metadata["policy_version"] == discovered["policy_version"]
    credit = score["response"]["score"]
    assert credit["decision"] in {"CREDIT_DECISION_REVIEW", "CREDIT_DECISION_DECLINE"}
    assert credit["score"] == python_score.score and credit["grade"] == python_score.grade
    assert [(r["code"], r["text"]) for r in credit["reasons"]] == [
        (r.code, r.text) for r in python_score.reasons
    ]
    again = out["score_again"]
    assert re.fullmatch(r"[0-9a-f]{32}", again["requestId"])
    assert again["requestId"] == again["response"]["metadata"]["request_id"]
    assert again["response"]["score"]["score"] == credit["score"]

    # Score's key; one AdjustLimit key, which sealed the account and the features together
    # and served the next AdjustLimits; one EvaluateEvent key (the login sealed nothing).
    assert out["sealed_keys_after_adjust_limits"] == 2, "the second Score reuses the first key"
    assert out["sealed_keys"] == 3
    assert out["sealed_keys_at_the_end"] == 5, "a refused call's key is not used again"

    # Limits on the account state sealed for AdjustLimit: scored in the call, on the score the
    # server recorded (the latest Score decision: the second one), on a stated score.
    limit = out["adjust_limit"]
    assert limit["requestId"] == "ts-limit-1" == limit["response"]["metadata"]["request_id"]
    assert limit["response"]["action"].startswith("LIMIT_ACTION_")
    assert limit["response"]["action"] != "LIMIT_ACTION_UNSPECIFIED"
    assert limit["response"]["score"] == credit["score"]
    assert limit["response"]["score_source"] == "SCORE_SOURCE_IN_CALL"
    assert limit["response"]["previous_limit"] == {"currency_code": "CNY", "minor_units": "1000000"}
    assert limit["response"]["new_limit"]["currency_code"] == "CNY"
    recorded = out["adjust_limit_recorded"]["response"]
    assert (recorded["score_source"], recorded["score"]) == (
        "SCORE_SOURCE_RECORDED",
        credit["score"],
    )
    assert recorded["score_decision_id"] == again["response"]["metadata"]["decision_id"]
    assert recorded["blocking_alerts"] == []
    stated = out["adjust_limit_stated"]["response"]
    assert (stated["score_source"], stated["score"]) == ("SCORE_SOURCE_CALLER_STATED", stated_score)
    assert stated["score_decision_id"] == ""

    # A missed payment, its figures sealed for EvaluateEvent: a critical alert, open.
    event = out["evaluate_event"]
    assert event["requestId"] == "ts-event-1" == event["response"]["metadata"]["request_id"]
    assert event["response"]["duplicate"] is False
    assert event["response"]["alerts"], "a payment 65 days past due raises an alert"
    alert = event["response"]["alerts"][0]
    assert alert["subject"] == out["subject"] and alert["event_id"] == "ts-missed-1"
    assert (alert["severity"], alert["rule"]) == ("SEVERITY_CRITICAL", "overdue.dpd_60")
    assert alert["state"] == "ALERT_STATE_OPEN"
    assert alert["alert_sequence"] == alert["sequence"]
    login = out["login_event"]
    assert login["requestId"] == "ts-event-2" and login["response"]["duplicate"] is False

    # The open alert freezes the limit; acknowledged it still does; resolved (from TypeScript)
    # it no longer does.
    alerted = out["adjust_limit_alerted"]["response"]
    assert alerted["action"] == "LIMIT_ACTION_FREEZE" and alerted["rule"] == "freeze.open_alert"
    assert alerted["blocking_alerts"] == [alert["alert_sequence"]]
    assert alerted["score_source"] == "SCORE_SOURCE_RECORDED"
    acknowledged, resolved = out["acknowledge_alert"], out["resolve_alert"]
    for reply, state, reason, request_id in (
        (acknowledged, "ALERT_STATE_ACKNOWLEDGED", "CUSTOMER_CONTACTED", "ts-alert-ack"),
        (resolved, "ALERT_STATE_RESOLVED", "PAYMENT_RECEIVED", "ts-alert-resolve"),
    ):
        changed = reply["response"]["alert"]
        assert reply["requestId"] == request_id == reply["response"]["metadata"]["request_id"]
        assert (changed["state"], changed["state_reason"]) == (state, reason)
        assert changed["alert_sequence"] == alert["alert_sequence"]
        assert int(changed["sequence"]) > int(alert["sequence"]), "a change is a new stream entry"
        assert (changed["rule"], changed["subject"]) == (alert["rule"], alert["subject"])
        assert reply["response"]["metadata"] == changed["metadata"]
    after = out["adjust_limit_resolved"]["response"]
    assert after["blocking_alerts"] == [] and after["rule"] != "freeze.open_alert"
    assert after["score_source"] == "SCORE_SOURCE_RECORDED"

    refused = out["refused_score"]
    purpose = list(scenario["refused_score"]["features"]).index("purpose")
    assert refused["code"] == "INVALID_ARGUMENT"
    assert (refused["reason"], refused["domain"]) == ("INVALID_ARGUMENT", "privscore.v1")
    assert refused["request_id"] == "ts-refused-1"
    assert [(v["field"], v["reason"]) for v in refused["field_violations"]] == [
        (f"features.fields[{purpose}]", "UNKNOWN_CATEGORY")
    ]
    assert "nonsense" not in json.dumps(refused)
    refused_limit, refused_resolve = out["refused_adjust_limit"], out["refused_resolve"]
    assert (refused_limit["code"], refused_limit["reason"], refused_limit["request_id"]) == (
        "FAILED_PRECONDITION",
        "NO_RECORDED_SCORE",
        "ts-refused-2",
    )
    assert (refused_resolve["code"], refused_resolve["reason"], refused_resolve["request_id"]) == (
        "FAILED_PRECONDITION",
        "ALERT_STATE_CONFLICT",
        "ts-refused-3",
    )

    # Explained from TypeScript, in Chinese and English: the Score (reviewed or declined: what
    # would change it) and the frozen limit; an alert's change is no decision to explain.
    for name, decision_id, score_of in (
        ("explain_score", score["response"]["metadata"]["decision_id"], credit["score"]),
        ("explain_limit", out["adjust_limit_alerted"]["response"]["metadata"]["decision_id"], None),
    ):
        explained = out[name]["response"]
        assert explained["decision_id"] == decision_id and explained["catalogue_version"]
        assert [e["language"] for e in explained["explanations"]] == ["zh-CN", "en"]
        for text in explained["explanations"]:
            assert text["score_min"] < text["score"] < text["score_max"]
            assert text["score"] == (score_of if score_of is not None else credit["score"])
            assert text["outcome"] and text["contest"] and text["text"]
            assert text["model_version"] == manifest.model_version
    for text in out["explain_score"]["response"]["explanations"]:
        assert [r["code"] for r in text["reasons"]] == [r["code"] for r in credit["reasons"]]
        assert text["counterfactuals"], "a reviewed or declined applicant is told what would help"
        for change in text["counterfactuals"]:
            assert change["feature"] in discovered["features"] and change["text"]
            assert change["score"] > credit["score"]
    assert out["explain_score"]["requestId"] == "ts-explain-1"
    refused_explain = out["refused_explain"]
    assert (refused_explain["code"], refused_explain["reason"]) == (
        "FAILED_PRECONDITION",
        "NOT_EXPLAINABLE",
    )

    # Another customer, exported (what the TypeScript client sealed, opened) and erased: then
    # the store has nothing of them, and their decisions no longer explain.
    erasure = out["erasure"]
    assert erasure["subject"] == {"tenant": TENANT, "pseudonym": erased_pseudonym}
    exported = erasure["export"]["document"]
    assert exported["subject"] == erasure["subject"]
    assert [d["decision_id"] for d in exported["decisions"]] == [
        erasure["score"]["response"]["metadata"]["decision_id"]
    ]
    assert [e["language"] for e in exported["decisions"][0]["explanation"]] == ["zh-CN", "en"]
    (limit_kept,) = exported["limits"]
    assert limit_kept["score_source"] == "RECORDED"
    assert limit_kept["account"]["current_limit"] == {
        "currency_code": "CNY",
        "minor_units": "1000000",
    }
    (event_kept,) = exported["events"]
    assert event_kept["event"]["purchase"]["amount"] == {
        "currency_code": "CNY",
        "minor_units": str(ERASED_SPEND),
    }
    assert exported["alerts"] == [] and exported["open_alerts"] == []
    erased = erasure["erase"]["response"]
    assert erased["erased"] is True
    assert (erased["events_deleted"], erased["adjustments_deleted"]) == (1, 1)
    after_erasure = erasure["after"]
    assert (after_erasure["adjust_limit"]["code"], after_erasure["adjust_limit"]["reason"]) == (
        "FAILED_PRECONDITION",
        "NO_RECORDED_SCORE",
    )
    assert after_erasure["explain"]["reason"] == "SUBJECT_ERASED"
    emptied = after_erasure["export"]["document"]
    assert emptied["decisions"] == emptied["limits"] == emptied["events"] == []
    assert after_erasure["erase"]["response"]["erased"] is False

    # Each pinned key the server does not list: refused by the client, which made no call but
    # GetServerInfo (no log line for any other method, no audit record).
    assert [o["refused"] for o in pinned_out["pinned"]] == [True, True], pinned_out
    for outcome, (key_id, _) in zip(pinned_out["pinned"], pinned, strict=True):
        assert outcome["error"] == "DiscoveryRefused"
        assert f"does not list the pinned key {key_id}" in outcome["message"]
    assert [r["method"] for r in calls_after] == [GET_SERVER_INFO] * len(pinned), calls_after
    assert sum(1 for _ in iter_records(DataLayout(data_dir).audit_dir)) == audited_before

    # The audit log holds every decision the TypeScript client got, and its refusals. A
    # decision names its subject by subject key only; what is personal (the pseudonym, the
    # encrypted inputs, the account and event figures) is sealed under that key, and
    # `privscore audit show --open` opens it with the server's keys.
    records = {
        str(stored.record["decision_id"]): (stored.sequence, stored.record)
        for stored in iter_records(DataLayout(data_dir).audit_dir)
    }
    # The erased customer's records no longer open: exactly those, for a destroyed key.
    shown = privscore_cli(data_dir, "audit", "show", "--open")
    unopened = dict(re.findall(r"^privscore audit show: record (\d+): (.*)$", shown.stderr, re.M))
    assert shown.returncode == 1, shown.stderr
    assert set(unopened) == {
        erasure[step]["response"]["metadata"]["audit_sequence"]
        for step in ("score", "adjust_limit", "evaluate_event")
    } | {erasure["export"]["metadata"]["audit_sequence"]}, shown.stderr
    assert all("destroyed subject key" in why for why in unopened.values()), unopened
    opened = {
        line["record"]["decision_id"]: line["record"].get("opened")
        for line in map(json.loads, shown.stdout.splitlines())
    }
    decisions = {
        name: (out[name], rpc)
        for name, rpc in (
            ("score", SCORE),
            ("score_again", SCORE),
            ("adjust_limit", ADJUST_LIMIT),
            ("adjust_limit_recorded", ADJUST_LIMIT),
            ("adjust_limit_stated", ADJUST_LIMIT),
            ("evaluate_event", EVALUATE_EVENT),
            ("login_event", EVALUATE_EVENT),
            ("adjust_limit_alerted", ADJUST_LIMIT),
            ("acknowledge_alert", UPDATE_ALERT_STATE),
            ("resolve_alert", UPDATE_ALERT_STATE),
            ("adjust_limit_resolved", ADJUST_LIMIT),
        )
    }
    recorded_as: dict[str, dict[str, Any]] = {}
    personal: dict[str, dict[str, Any]] = {}
    for name, (reply, rpc) in decisions.items():
        metadata = reply["response"]["metadata"]
        sequence, record = records[metadata["decision_id"]]
        recorded_as[name], personal[name] = record, opened[metadata["decision_id"]]
        assert sequence == int(metadata["audit_sequence"])
        assert (record["rpc"], record["request_id"], record["caller"]) == (
            rpc,
            reply["requestId"],
            identity,
        )
        assert record["tenant"] == TENANT and "subject" not in record
        assert personal[name]["subject"] == pseudonym
    subject_keys = {record["subject_key"] for record in recorded_as.values()}
    assert len(subject_keys) == 1, "one key seals the subject's records of one month"
    # Where each limit decision's score came from, as recorded; a stated one is marked.
    assert [
        (recorded_as[name]["score_source"], recorded_as[name].get("score_decision_id"))
        for name in ("adjust_limit", "adjust_limit_recorded", "adjust_limit_stated")
    ] == [
        ("IN_CALL", None),
        ("RECORDED", again["response"]["metadata"]["decision_id"]),
        ("CALLER_STATED", None),
    ]
    assert [
        (recorded_as[name]["alert"]["from"], recorded_as[name]["alert"]["to"])
        for name in ("acknowledge_alert", "resolve_alert")
    ] == [("OPEN", "ACKNOWLEDGED"), ("ACKNOWLEDGED", "RESOLVED")]
    # What the TypeScript client sealed is what the server opened and recorded, sealed: the
    # account state of each limit decision and the missed payment's figures (protobuf's JSON
    # mapping: int64 amounts as strings, a count at 0 left out). None of it is in clear.
    sent_account = scenario["adjust_limit"]["account"]
    as_recorded = {
        name: {**value, "minor_units": str(value["minor_units"])}
        if isinstance(value, dict)
        else value
        for name, value in sent_account.items()
        if value != 0
    }
    for name in decisions:
        if name.startswith("adjust_limit"):
            assert personal[name]["account"] == as_recorded, name
    sent_event = scenario["evaluate_event"]["event"]
    event_opened = personal["evaluate_event"]["event"]
    assert event_opened["missed_payment"] == {
        "amount_due": {"currency_code": "CNY", "minor_units": "123457"},
        "days_past_due": sent_event["missed_payment"]["days_past_due"],
    }
    assert event_opened["balance_after"] == {"currency_code": "CNY", "minor_units": "246913"}
    figures = ("123457", "246913", '"days_past_due"', '"balance_after"', '"amount_due"')
    for name in decisions:
        text = json.dumps(recorded_as[name])
        assert not [f for f in figures if f in text], (name, text)
        assert '"account"' not in text and "1000000" not in text, (name, text)
    sealed = read_encrypted_inputs(str(personal["score"]["encrypted_inputs"]))
    assert sealed.data_key.key_id == keyset_id
    # Refusals name the tenant only (an UpdateAlertState names none: it carries no subject).
    for request_id, code, tenant in (
        ("ts-refused-1", "INVALID_ARGUMENT", TENANT),
        ("ts-refused-2", "FAILED_PRECONDITION", TENANT),
        ("ts-refused-3", "FAILED_PRECONDITION", None),
    ):
        refusal = next(r for _, r in records.values() if r["request_id"] == request_id)
        assert (refusal["outcome"], refusal["code"], refusal["caller"], refusal["tenant"]) == (
            "refused",
            code,
            identity,
            tenant,
        )
        text = json.dumps(refusal)
        assert pseudonym not in text and unscored not in text, refusal
    # Erasure is recorded by tenant and the ids of the keys destroyed; nothing of the erased
    # customer is in clear anywhere in the log.
    (erasure_record,) = [r for _, r in records.values() if r["request_id"] == "ts-erasure-4"]
    assert erasure_record["rpc"] == "/privscore.v1.PrivacyService/EraseSubject"
    assert erasure_record["tenant"] == TENANT
    assert erasure_record["erased"]["key_ids"]
    assert all(key.startswith("sk-") for key in erasure_record["erased"]["key_ids"])
    for _, record in records.values():
        text = json.dumps(record)
        assert erased_pseudonym not in text and str(ERASED_SPEND) not in text, record
    verified = privscore_cli(data_dir, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
