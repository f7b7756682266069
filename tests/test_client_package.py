"""The client distribution installs alone: its wheel goes into a fresh virtual environment
(no server, no onnxruntime, no numpy) and, against a real server over mutual TLS, scores, decides
a limit on that recorded score with the account sealed, and reports an event with its figures
sealed."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from service.config import DataLayout
from service.security.certs import CertPaths
from tests.conftest import REPO_ROOT, ServerProcess, applicants

CLIENT_PROJECT = REPO_ROOT / "clients" / "python"

# Run inside the fresh environment: nothing of the server may be importable there.
CALLER = """
import importlib.util, json, sys
from privscore.client import (
    PrivscoreClient, Pseudonymiser, certificate_identity, secure_channel,
)
from privscore.v1 import alert_service_pb2, common_pb2, limit_service_pb2
absent = [m for m in ("service", "onnxruntime", "numpy", "structlog", "model_export")
          if importlib.util.find_spec(m) is not None]
args = json.loads(sys.argv[1])
read = lambda p: open(p, "rb").read()
cert = read(args["cert"])
channel = secure_channel(args["target"], root_certificates=read(args["ca"]),
                         private_key=read(args["key"]), certificate_chain=cert)
client = PrivscoreClient.discovered(
    channel, Pseudonymiser(read(args["pseudonym_key"])), identity=certificate_identity(cert)
)
response = client.score("t", "client-package-1", args["features"])
money = common_pb2.Money(currency_code="CNY", minor_units=500_000)
limit = client.adjust_limit("t", "client-package-1", limit_service_pb2.AccountState(
    current_limit=money, balance=money, account_age_days=400))
event = alert_service_pb2.BehaviourEvent(
    event_id="client-package-event", purchase=alert_service_pb2.Purchase(amount=money))
event.occurred_at.FromSeconds(1_790_000_000)
evaluated = client.evaluate_event("t", "client-package-1", event)
print(json.dumps({"importable": absent, "score": response.score.score,
                  "decision_id": response.metadata.decision_id,
                  "limit_scored_on": limit.score_decision_id,
                  "event_recorded": evaluated.metadata.audit_sequence > 0}))
"""


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        if "No matching distribution" in done.stderr or "Could not find" in done.stderr:
            pytest.skip(f"no package index reachable to install the client's dependencies: {args}")
        raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])


def test_the_client_wheel_installs_alone_and_scores(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _pip(Path(sys.executable), "wheel", "--no-deps", "-w", str(wheels), str(CLIENT_PROJECT))
    (wheel,) = wheels.glob("privscore_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.endswith(".dist-info/")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"privscore"}
    assert "privscore/client/sdk.py" in names and "privscore/v1/scoring_service_pb2.py" in names
    assert "privscore/client/figures.py" in names and "privscore/v1/privacy_service_pb2.py" in names

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    _pip(python, "install", str(wheel))

    server = ServerProcess(tmp_path / "var")
    try:
        layout = DataLayout(server.data_dir)
        certs = CertPaths(layout.certs_dir)
        arguments = {
            "target": server.target,
            "ca": str(certs.ca),
            "cert": str(certs.client_cert("dev")),
            "key": str(certs.client_key("dev")),
            "pseudonym_key": str(layout.pseudonym_key),
            "features": applicants()[0],
        }
        done = subprocess.run(
            [str(python), "-c", CALLER, json.dumps(arguments)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # not the repository: its packages must not be importable
            check=False,
        )
    finally:
        assert server.terminate() == 0
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["importable"] == []
    assert result["score"] > 0 and result["decision_id"]
    assert result["limit_scored_on"] == result["decision_id"]  # the score privscore recorded
    assert result["event_recorded"]
