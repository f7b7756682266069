"""The server over a real loopback socket: health, reflection, errors, request ids, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    common_pb2,
    limit_service_pb2,
    limit_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)
from service.cli import build_parser
from service.client.probe import health_status, list_services
from service.config import settings_from
from service.privacy.sealing import ENCAPSULATED_KEY_BYTES, SEALED_DATA_KEY_BYTES
from service.server import SERVICE_NAMES, PrivscoreServer
from tests.conftest import (
    REPO_ROOT,
    ServerProcess,
    aio_channel,
    applicants,
    init_dev_keys,
    privscore_cli,
)

PSEUDONYM = "ab" * 32
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def valid_features() -> common_pb2.EncryptedFeatures:
    return common_pb2.EncryptedFeatures(
        schema_version="german-credit-1",
        data_key=common_pb2.SealedDataKey(
            key_id="k1",
            encapsulated_key=bytes(ENCAPSULATED_KEY_BYTES),
            sealed_key=bytes(SEALED_DATA_KEY_BYTES),
        ),
        fields=[
            common_pb2.EncryptedField(
                name="age", key_id="k1", nonce=bytes(12), ciphertext=bytes(20)
            )
        ],
    )


def violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status details"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


def error_reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "privscore.v1"
            return str(info.reason)
    raise AssertionError("no ErrorInfo detail")


def test_health_is_serving_for_the_server_and_each_service(shared_server: ServerProcess) -> None:
    for name in ("", *SERVICE_NAMES):
        with shared_server.channel() as channel:
            assert health_status(channel, name) == "SERVING"


def test_reflection_lists_the_three_services(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        names = list_services(channel)
    for name in (
        "privscore.v1.ScoringService",
        "privscore.v1.LimitService",
        "privscore.v1.AlertService",
        "grpc.health.v1.Health",
    ):
        assert name in names


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_in_v1_and_v1alpha(shared_server: ServerProcess, version: str) -> None:
    """Both reflection versions list the services and describe them. The v1 messages are the
    v1alpha ones field for field (grpc/reflection/v1/reflection.proto), so a v1 client's
    bytes are these."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="privscore.v1.ScoringService"
        ),
    ]
    with shared_server.channel() as channel:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed, described = list(call(iter(requests), timeout=5))
    names = {service.name for service in listed.list_services_response.service}
    assert {"privscore.v1.ScoringService", "grpc.reflection.v1.ServerReflection"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(service.name == "ScoringService" for file in files for service in file.service)


def test_malformed_request_names_the_field_never_the_value(shared_server: ServerProcess) -> None:
    secret_looking = "CANARY-raw-customer-4711"
    request = scoring_service_pb2.ScoreRequest(
        request_id="req-1",
        subject=common_pb2.SubjectRef(tenant="baitiao", pseudonym=secret_looking),
        features=valid_features(),
    )
    with shared_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(request, timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(error)
    assert set(found) == {"subject.pseudonym"}
    assert "64 lowercase hex" in found["subject.pseudonym"]
    assert error_reason(error) == "INVALID_ARGUMENT"
    assert secret_looking not in str(error.details()) and "Traceback" not in str(error.details())
    assert not any(secret_looking in line for line in shared_server.lines)


def test_every_violation_of_a_request_is_reported_at_once(shared_server: ServerProcess) -> None:
    features = valid_features()
    features.fields.append(
        common_pb2.EncryptedField(name="age", key_id="other", nonce=b"short", ciphertext=b"")
    )
    request = limit_service_pb2.AdjustLimitRequest(
        request_id="has space",
        subject=common_pb2.SubjectRef(tenant="Bad_Tenant", pseudonym=PSEUDONYM),
        account=limit_service_pb2.AccountState(
            current_limit=common_pb2.Money(currency_code="CNY", minor_units=-5),
            balance=common_pb2.Money(currency_code="usd", minor_units=100),
        ),
        features=features,
    )
    with shared_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        limit_service_pb2_grpc.LimitServiceStub(channel).AdjustLimit(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The clear account is refused whole (its figures are never read, nor repeated), and the
    # sealed one it should have been is missing.
    assert set(violations(caught.value)) == {
        "request_id",
        "subject.tenant",
        "account",
        "sealed_account",
        "features.fields[1].name",
        "features.fields[1].key_id",
        "features.fields[1].nonce",
        "features.fields[1].ciphertext",
    }


def test_unknown_enum_value_and_missing_oneof_are_invalid(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        alerts = alert_service_pb2_grpc.AlertServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            next(
                iter(
                    alerts.WatchAlerts(
                        alert_service_pb2.WatchAlertsRequest(
                            min_severity=alert_service_pb2.Severity.ValueType(99)
                        ),
                        timeout=5,
                    )
                )
            )
        assert violations(caught.value) == {"min_severity": "is not a known Severity value"}

        event = alert_service_pb2.EvaluateEventRequest(
            request_id="r",
            subject=common_pb2.SubjectRef(tenant="t", pseudonym=PSEUDONYM),
            event=alert_service_pb2.BehaviourEvent(event_id="e1"),
        )
        with pytest.raises(grpc.RpcError) as caught:
            alerts.EvaluateEvent(event, timeout=5)
        assert set(violations(caught.value)) == {"event.occurred_at", "event.kind"}


def test_oversized_batch_is_refused(shared_server: ServerProcess) -> None:
    item = scoring_service_pb2.ScoreBatchItem(
        subject=common_pb2.SubjectRef(tenant="t", pseudonym=PSEUDONYM), features=valid_features()
    )
    request = scoring_service_pb2.ScoreBatchRequest(request_id="b", items=[item] * 257)
    with shared_server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        scoring_service_pb2_grpc.ScoringServiceStub(channel).ScoreBatch(request, timeout=5)
    assert violations(caught.value) == {"items": "must hold at most 256 items"}


def test_request_id_is_echoed_in_the_trailers_and_bound_to_the_log_line(
    shared_server: ServerProcess,
) -> None:
    """In the trailers, whatever the outcome (a refusal here, a decision below), and never as
    an early header of a unary call (a HEADERS write of its own)."""
    # Imported here: tests.test_privacy imports this module's helpers.
    from tests.test_privacy import sealed_request

    request = scoring_service_pb2.ScoreRequest(request_id="x")  # invalid: no subject/features
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        call = stub.Score.future(request, metadata=(("x-request-id", "trace-abc.123"),), timeout=5)
        with pytest.raises(grpc.RpcError):
            call.result()
        assert ("x-request-id", "trace-abc.123") in call.trailing_metadata()
        assert not any(key == "x-request-id" for key, _ in call.initial_metadata())
        _, ok = stub.Score.with_call(
            sealed_request(shared_server, "trace-ok.1"),
            metadata=(("x-request-id", "trace-ok.1"),),
            timeout=10,
        )
        assert ("x-request-id", "trace-ok.1") in ok.trailing_metadata()
        assert not any(key == "x-request-id" for key, _ in ok.initial_metadata())
    line = shared_server.wait_for_record(lambda r: r.get("request_id") == "trace-abc.123")
    assert line["event"] == "rpc.finished"
    assert line["method"] == "/privscore.v1.ScoringService/Score"
    assert line["code"] == "INVALID_ARGUMENT"


def test_health_moves_from_not_serving_to_serving(tmp_path: Path) -> None:
    init_dev_keys(tmp_path)
    settings = settings_from(
        build_parser().parse_args(["serve", "--port", "0", "--data-dir", str(tmp_path)])
    )

    async def scenario() -> list[int]:
        server = PrivscoreServer(settings)
        try:
            return await observe(server)
        finally:
            await server.stop()

    async def observe(server: PrivscoreServer) -> list[int]:
        await server.listen()
        seen = []
        async with aio_channel(tmp_path, server.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="privscore.v1.ScoringService")
            seen.append((await health.Check(check, timeout=5)).status)
            scoring = scoring_service_pb2_grpc.ScoringServiceStub(channel)
            early_request = scoring_service_pb2.ScoreRequest(
                request_id="early",
                subject=common_pb2.SubjectRef(tenant="t", pseudonym=PSEUDONYM),
                features=valid_features(),
            )
            with pytest.raises(grpc.aio.AioRpcError) as early:
                await scoring.Score(early_request, timeout=5)
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            await server.become_ready()
            seen.append((await health.Check(check, timeout=5)).status)
        return seen

    assert asyncio.run(scenario()) == [NOT_SERVING, SERVING]


def test_sigterm_drains_in_flight_calls_and_exits_zero(server_process: ServerProcess) -> None:
    outcome: dict[str, object] = {}
    with server_process.channel() as channel:
        stub = alert_service_pb2_grpc.AlertServiceStub(channel)
        stream = stub.WatchAlerts(alert_service_pb2.WatchAlertsRequest(), timeout=30)

        def consume() -> None:
            outcome["received"] = list(stream)  # ends when the server closes the stream
            outcome["code"] = stream.code()

        consumer = threading.Thread(target=consume)
        consumer.start()
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == SERVING
        server_process.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        consumer.join(timeout=15)
        assert not consumer.is_alive()
    assert outcome == {"received": [], "code": grpc.StatusCode.OK}
    assert server_process.terminate() == 0
    records = server_process.records()
    events = [r["event"] for r in records]
    assert events[-1] == "server.stopped"
    after_stop_began = records[events.index("server.stopping") :]
    assert {
        "event": "rpc.finished",
        "method": "/privscore.v1.AlertService/WatchAlerts",
        "code": "OK",
    }.items() <= next(r for r in after_stop_began if r["event"] == "rpc.finished").items()
    with server_process.channel() as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "70000"], {}, "--port must be between 0 and 65535"),
        (["--bind", "example.com"], {}, "--bind must be an IP address literal"),
        ([], {"PRIVSCORE_GRACE_SECONDS": "nan"}, "--grace-seconds must be between"),
        ([], {"PRIVSCORE_PORT": "http"}, "--port must be an integer"),
    ],
)
def test_invalid_settings_fail_fast_with_a_clear_error(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(tmp_path), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "expected"), [([], 2.0), (["--grace-seconds", "3"], 3.0)])
def test_flag_beats_environment_beats_default(
    tmp_path: Path, args: list[str], expected: float
) -> None:
    server = ServerProcess(tmp_path / "var", *args, env={"PRIVSCORE_GRACE_SECONDS": "2"})
    assert server.terminate() == 0
    stopping = next(r for r in server.records() if r["event"] == "server.stopping")
    assert stopping["grace_seconds"] == expected


def test_a_second_server_on_a_port_in_use_is_refused(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    """Only a supervisor's workers share a port (SO_REUSEPORT); a second server started on a
    port in use by mistake fails instead of quietly taking some of the connections."""
    second = privscore_cli(
        tmp_path / "other",
        "serve",
        "--insecure",
        "--port",
        str(shared_server.port),
        "--data-dir",
        str(tmp_path / "other"),
    )
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{shared_server.port}" in second.stderr


def test_the_cli_shows_every_field_violation_and_the_request_id(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    """A refused `privscore score` prints each failing field with what is wrong (never the
    value sent), not only the status line."""
    features = json.loads((REPO_ROOT / "examples" / "applicant.json").read_text())
    features["purpose"] = "CANARY-not-a-purpose"
    features["duration_in_month"] = 4000
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(features))
    done = privscore_cli(
        shared_server.data_dir,
        "score",
        "--target",
        shared_server.target,
        "--tenant",
        "t",
        "--customer-id",
        "cli-violations",
        "--features",
        str(path),
    )
    assert done.returncode == 1
    head, *details = done.stderr.strip().splitlines()
    assert head.startswith("privscore score: INVALID_ARGUMENT: ")
    fields = {line.split(":")[0].strip() for line in details if "fields[" in line}
    assert len(fields) == 2  # both features, each by its path
    assert any("purpose" in line and "one of" in line for line in details)
    assert any("duration_in_month" in line for line in details)
    assert details[-1].startswith("  request id: ")
    assert "CANARY" not in done.stderr and "4000" not in done.stderr


def test_audit_verify_finds_the_log_key_and_origin_under_data_dir(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    """`--data-dir` alone is enough, whatever PRIVSCORE_DATA_DIR says (here: elsewhere)."""
    with shared_server.channel() as channel:
        shared_server.client(channel).score("t", "verify-data-dir", applicants()[0])
    done = privscore_cli(
        tmp_path / "elsewhere", "audit", "verify", "--data-dir", str(shared_server.data_dir)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["size"] >= 1 and report["mac_checked"]
