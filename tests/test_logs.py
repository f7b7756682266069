"""The application log's redaction: a second line of defence behind code that logs no value."""

from __future__ import annotations

import base64
import json
import os

import pytest
import structlog

from service.logs import REDACTED, configure_logging, redact


def test_deny_listed_keys_and_secret_shaped_values_are_masked() -> None:
    key_b64 = base64.b64encode(os.urandom(32)).decode()
    event = {
        "event": "x",
        "value": 5951,
        "data_key": "short",
        "note": f"key={key_b64}",
        "digest": "ab" * 32,
        "pem": "-----BEGIN PRIVATE KEY-----",
        "blob": b"\x00\x01",
        "request_id": "0123456789abcdef0123456789abcdef",  # 32 hex: an id, not a secret
        "method": "/privscore.v1.ScoringService/Score",
    }
    out = redact(None, "info", dict(event))
    assert {k for k, v in out.items() if v == REDACTED} == {
        "value",
        "data_key",
        "note",
        "digest",
        "pem",
        "blob",
    }
    assert out["request_id"] == event["request_id"] and out["method"] == event["method"]


def test_the_configured_json_log_redacts(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")  # after capsys has replaced stdout
    try:
        secret = base64.b64encode(os.urandom(48)).decode()
        structlog.get_logger("t").info("probe", features={"age": 22}, detail=secret)
    finally:
        structlog.reset_defaults()  # the configured logger holds this test's captured stdout
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["features"] == REDACTED and line["detail"] == REDACTED
    assert secret not in json.dumps(line)
