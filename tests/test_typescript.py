"""The TypeScript client (clients/typescript) run from the Python suite, so `make test` runs it.

Its own tests (`npm test`: sealing and opening against every committed vector) and one
end-to-end run against a real privscore server over mutual TLS: it scores (twice, reusing the
sealed data key), adjusts a limit with features sealed for AdjustLimit, reports an event, and
sends a Score the server refuses; this file then checks the replies, the request ids from the
trailers, the decoded error details, and that the audit log holds every decision and the
refusal.

Node 20 and npm are needed: without them these tests skip, saying so, unless
PRIVSCORE_REQUIRE_NODE=1 (CI, .ci/run), where they fail. `npm ci` (from the npm registry)
runs only when node_modules is missing or was installed from another package-lock.json.
"""

from __future__ import annotations

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

from service.api.features import read_encrypted_inputs
from service.audit import iter_records
from service.config import DataLayout
from service.privacy.sealing import load_public_keyset
from service.security.certs import CertPaths
from tests.conftest import REPO_ROOT, ServerProcess, applicants, privscore_cli, served_manifest

CLIENT_DIR = REPO_ROOT / "clients" / "typescript"
REQUIRE_NODE_ENV = "PRIVSCORE_REQUIRE_NODE"
NODE_MAJOR = 20
INSTALL_STAMP = CLIENT_DIR / "node_modules" / ".privscore-package-lock.sha256"
TENANT = "ts-e2e"
CUSTOMER = "ts-customer-0001"


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


def _scenario(score_features: dict[str, Any]) -> dict[str, Any]:
    refused = {**score_features, "purpose": "nonsense"}
    money = {"currency_code": "CNY"}
    return {
        "tenant": TENANT,
        "customer_id": CUSTOMER,
        "score": {"request_id": "ts-score-1", "features": score_features},
        "adjust_limit": {
            "request_id": "ts-limit-1",
            "account": {
                "current_limit": {**money, "minor_units": 1_000_000},
                "balance": {**money, "minor_units": 200_000},
                "on_time_repayments_in_row": 12,
                "days_past_due": 0,
                "account_age_days": 400,
            },
            "features": score_features,
        },
        "evaluate_event": {
            "request_id": "ts-event-1",
            "event": {
                "event_id": "ts-missed-1",
                "occurred_at": {"seconds": int(time.time()) - 60, "nanos": 0},
                "missed_payment": {
                    "amount_due": {**money, "minor_units": 100_000},
                    "days_past_due": 40,
                },
            },
        },
        "refused_score": {"request_id": "ts-refused-1", "features": refused},
    }


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
        scenario = _scenario(dict(features))
        scenario_file = tmp_path / "scenario.json"
        scenario_file.write_text(json.dumps(scenario))
        layout = DataLayout(data_dir)
        certs = CertPaths(layout.certs_dir)
        stdout = _run(
            tools.node,
            "dist/e2e/e2e.js",
            timeout=120,
            env={
                "PRIVSCORE_TARGET": server.target,
                "PRIVSCORE_CA_FILE": str(certs.ca),
                "PRIVSCORE_CERT_FILE": str(certs.client_cert("dev")),
                "PRIVSCORE_KEY_FILE": str(certs.client_key("dev")),
                "PRIVSCORE_PUBLIC_KEYSET": str(layout.public_keyset),
                "PRIVSCORE_PSEUDONYM_KEY_FILE": str(layout.pseudonym_key),
                "PRIVSCORE_SCHEMA_VERSION": served_manifest().schema_version,
                "PRIVSCORE_E2E_INPUT": str(scenario_file),
            },
        )
    finally:
        assert server.terminate() == 0
    out = json.loads(stdout)
    identity = "spiffe://privscore.dev/client/dev"
    assert out["identity"] == identity
    assert out["subject"] == {"tenant": TENANT, "pseudonym": pseudonym}  # same key, same HMAC

    score = out["score"]
    assert score["requestId"] == "ts-score-1" == score["response"]["metadata"]["request_id"]
    credit = score["response"]["score"]
    assert credit["decision"] in {"CREDIT_DECISION_REVIEW", "CREDIT_DECISION_DECLINE"}
    assert credit["score"] == python_score.score and credit["grade"] == python_score.grade
    assert [(r["code"], r["text"]) for r in credit["reasons"]] == [
        (r.code, r.text) for r in python_score.reasons
    ]
    again = out["score_again"]
    assert re.fullmatch(r"[0-9a-f]{32}", again["requestId"])
    assert again["response"]["score"]["score"] == credit["score"]
    assert out["sealed_keys"] == 2, "the second Score reuses the first one's data key"

    limit = out["adjust_limit"]
    assert limit["requestId"] == "ts-limit-1" == limit["response"]["metadata"]["request_id"]
    assert limit["response"]["action"].startswith("LIMIT_ACTION_")
    assert limit["response"]["action"] != "LIMIT_ACTION_UNSPECIFIED"
    assert limit["response"]["score"] == credit["score"]
    assert limit["response"]["new_limit"]["currency_code"] == "CNY"

    event = out["evaluate_event"]
    assert event["requestId"] == "ts-event-1"
    assert event["response"]["duplicate"] is False
    assert event["response"]["alerts"], "a payment 40 days past due raises an alert"
    alert = event["response"]["alerts"][0]
    assert alert["subject"] == out["subject"] and alert["event_id"] == "ts-missed-1"
    assert alert["severity"].startswith("SEVERITY_") and alert["rule"]

    refused = out["refused_score"]
    purpose = list(scenario["refused_score"]["features"]).index("purpose")
    assert refused["code"] == "INVALID_ARGUMENT"
    assert (refused["reason"], refused["domain"]) == ("INVALID_ARGUMENT", "privscore.v1")
    assert refused["request_id"] == "ts-refused-1"
    assert [(v["field"], v["reason"]) for v in refused["field_violations"]] == [
        (f"features.fields[{purpose}]", "UNKNOWN_CATEGORY")
    ]
    assert "nonsense" not in json.dumps(refused)

    # The audit log holds every decision the TypeScript client got, and its refusal.
    records = {
        str(stored.record["decision_id"]): (stored.sequence, stored.record)
        for stored in iter_records(DataLayout(data_dir).audit_dir)
    }
    for reply, rpc in (
        (score, "/privscore.v1.ScoringService/Score"),
        (again, "/privscore.v1.ScoringService/Score"),
        (limit, "/privscore.v1.LimitService/AdjustLimit"),
        (event, "/privscore.v1.AlertService/EvaluateEvent"),
    ):
        metadata = reply["response"]["metadata"]
        sequence, record = records[metadata["decision_id"]]
        assert sequence == int(metadata["audit_sequence"])
        assert (record["rpc"], record["request_id"], record["caller"]) == (
            rpc,
            reply["requestId"],
            identity,
        )
        assert (record["tenant"], record["subject"]) == (TENANT, pseudonym)
    _, score_record = records[score["response"]["metadata"]["decision_id"]]
    sealed = read_encrypted_inputs(str(score_record["encrypted_inputs"]))
    assert sealed.data_key.key_id == load_public_keyset(layout.public_keyset).key_id
    refusal = next(r for _, r in records.values() if r["request_id"] == "ts-refused-1")
    assert (refusal["outcome"], refusal["code"], refusal["caller"]) == (
        "refused",
        "INVALID_ARGUMENT",
        identity,
    )
    verified = privscore_cli(data_dir, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
