"""Transport identity, authorisation and limits over real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)
from service.api.scoring import SCORE_METHOD
from service.audit import iter_records
from service.client.probe import health_status
from service.config import DataLayout
from service.security.authz import missing_identity, peer_identity
from service.security.certs import CertPaths, client_identity, init_certs
from tests.conftest import LOOPBACK, REPO_ROOT, ServerProcess, applicants
from tests.test_privacy import sealed_request
from tests.test_server import error_reason


def refusals(data_dir: Path) -> list[dict[str, object]]:
    return [
        s.record
        for s in iter_records(DataLayout(data_dir).audit_dir)
        if s.record.get("outcome") == "refused"
    ]


def test_calls_run_over_tls_1_3_as_the_certificate_identity(shared_server: ServerProcess) -> None:
    with shared_server.channel() as channel:
        shared_server.client(channel).score("t", "tls-1", applicants()[0])
    line = shared_server.wait_for_record(
        lambda r: r.get("event") == "rpc.finished" and r.get("method", "").endswith("/Score")
    )
    assert line["caller"] == "spiffe://privscore.dev/client/dev"


def test_identity_needs_tls_1_3_and_exactly_one_spiffe_id() -> None:
    tls13 = {"ssl_tls_version": [b"TLSv1.3"], "peer_spiffe_id": [b"spiffe://x/client/a"]}
    assert peer_identity(tls13) == "spiffe://x/client/a"
    assert peer_identity({**tls13, "ssl_tls_version": [b"TLSv1.2"]}) is None
    assert peer_identity({"ssl_tls_version": [b"TLSv1.3"]}) is None
    assert peer_identity({}) is None  # plaintext
    assert "TLS 1.3 is required" in missing_identity({**tls13, "ssl_tls_version": [b"TLSv1.2"]})
    assert "SPIFFE" in missing_identity({"ssl_tls_version": [b"TLSv1.3"]})
    assert "not mutual TLS" in missing_identity({})


def _call_over_tls_1_2(
    port: int, certs: CertPaths, method: str, message: bytes = b""
) -> dict[str, str]:
    """One gRPC call made by hand over a TLS 1.2 connection with a valid client certificate
    (no gRPC client offers TLS 1.2 on purpose; h2 speaks HTTP/2 itself): the response's
    headers and trailers."""
    import ssl
    import urllib.parse

    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(certs.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certs.client_cert("dev")), str(certs.client_key("dev")))
    context.set_alpn_protocols(["h2"])
    context.check_hostname = False
    with (
        socket.create_connection((LOOPBACK, port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        assert tls.version() == "TLSv1.2"
        connection = h2.connection.H2Connection()
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", method),
                (":authority", f"localhost:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        # One length-prefixed, uncompressed gRPC message.
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        connection.send_data(stream, framed, end_stream=True)
        tls.sendall(connection.data_to_send())
        found: dict[str, str] = {}
        ended = False
        while not ended:
            data = tls.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    found.update((name.decode(), value.decode()) for name, value in event.headers)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            tls.sendall(connection.data_to_send())
    if "grpc-message" in found:
        found["grpc-message"] = urllib.parse.unquote(found["grpc-message"])
    return found


def test_a_tls_1_2_caller_is_told_tls_1_3_is_required(shared_server: ServerProcess) -> None:
    certs = CertPaths(DataLayout(shared_server.data_dir).certs_dir)
    probe = scoring_service_pb2.ScoreRequest(request_id="tls12-probe-1")
    answer = _call_over_tls_1_2(shared_server.port, certs, SCORE_METHOD, probe.SerializeToString())
    assert answer["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    assert "TLS 1.3 is required" in answer["grpc-message"]
    assert "TLSv1.2" in answer["grpc-message"]
    # The refusal is audited, under the request id the message carried.
    deadline = time.monotonic() + 10
    while not (
        found := [
            r for r in refusals(shared_server.data_dir) if r["request_id"] == probe.request_id
        ]
    ):
        assert time.monotonic() < deadline, "the refusal was not audited"
        time.sleep(0.05)
    assert found[0]["code"] == "UNAUTHENTICATED"
    assert str(found[0]["caller"]).startswith("unauthenticated:")


def test_a_client_without_a_certificate_from_the_ca_cannot_connect(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    certs = CertPaths(DataLayout(shared_server.data_dir).certs_dir)
    no_cert = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    init_certs(tmp_path / "other-ca")
    other = CertPaths(tmp_path / "other-ca")
    foreign = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(),
        other.client_key("dev").read_bytes(),
        other.client_cert("dev").read_bytes(),
    )
    for credentials in (no_cert, foreign):
        with grpc.secure_channel(shared_server.target, credentials) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                health_status(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("cert_name", "allowed"),
    [
        ("scorer", True),
        ("monitor", False),
        ("auditor", False),
        ("nobody", False),
    ],
)
def test_each_identity_may_call_only_its_roles_methods(
    shared_server: ServerProcess, cert_name: str, allowed: bool
) -> None:
    request = sealed_request(
        shared_server, f"role-{cert_name}", identity=client_identity(cert_name)
    )
    with shared_server.channel(cert_name) as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        if allowed:
            assert stub.Score(request, timeout=10).score.score > 0
            return
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(caught.value) == "PERMISSION_DENIED"
    denied = shared_server.wait_for_record(
        lambda r: (
            r.get("event") == "rpc.finished"
            and r.get("code") == "PERMISSION_DENIED"
            and r.get("caller") == f"spiffe://privscore.dev/client/{cert_name}"
        )
    )
    assert denied["method"] == "/privscore.v1.ScoringService/Score"


def test_refusals_are_audited_with_identity_and_method(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var")
    with server.channel("monitor") as channel, pytest.raises(grpc.RpcError):
        scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(
            sealed_request(server, "denied-1"), timeout=10
        )
    assert server.terminate() == 0
    (record,) = refusals(tmp_path / "var")
    assert record["caller"] == "spiffe://privscore.dev/client/monitor"
    assert record["rpc"] == "/privscore.v1.ScoringService/Score"
    assert record["code"] == "PERMISSION_DENIED" and record["request_id"] == "denied-1"


def test_insecure_mode_is_loopback_only_and_unauthenticated(tmp_path: Path) -> None:
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--insecure",
            "--bind",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path / "var"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "--insecure is allowed only with a loopback --bind" in refused.stderr

    server = ServerProcess(tmp_path / "var", "--insecure")
    try:
        assert server.wait_for_record(lambda r: r.get("event") == "server.insecure")
        with grpc.insecure_channel(server.target) as channel:
            assert health_status(channel) == "SERVING"  # probes need no identity
            with pytest.raises(grpc.RpcError) as caught:
                scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(
                    sealed_request(server, "plain-1"), timeout=10
                )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert server.terminate() == 0
    (record,) = refusals(tmp_path / "var")
    assert record["code"] == "UNAUTHENTICATED"
    assert str(record["caller"]).startswith("unauthenticated:ipv4:127.0.0.1:")


def test_rate_and_concurrency_limits_are_per_identity(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "var",
        "--calls-per-second-per-caller",
        "0.01",  # one token per 100 s: no refill during the test, however slow the machine
        "--burst-per-caller",
        "3",
        "--max-in-flight-per-caller",
        "1",
        "--max-alert-subscribers",
        "1",
    )
    try:
        with server.channel("scorer") as scorer_channel, server.channel() as dev_channel:
            scorer = scoring_service_pb2_grpc.ScoringServiceStub(scorer_channel)
            as_scorer = client_identity("scorer")  # data keys open only for their sealer
            for n in range(3):
                scorer.Score(sealed_request(server, f"burst-{n}", identity=as_scorer), timeout=10)
            with pytest.raises(grpc.RpcError) as limited:
                scorer.Score(sealed_request(server, "burst-3", identity=as_scorer), timeout=10)
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(limited.value) == "RATE_LIMITED"

            # The dev identity has its own budget, and an open stream holds none of its
            # in-flight slots (tests/test_alert_subscribers.py): its one call still fits.
            alerts = alert_service_pb2_grpc.AlertServiceStub(dev_channel)
            stream = alerts.WatchAlerts(alert_service_pb2.WatchAlertsRequest(), timeout=30)
            stream.initial_metadata()  # sent once the server has admitted the stream
            assert server.client(dev_channel).score("t", "second", applicants()[0]).score.score
            stream.cancel()
    finally:
        assert server.terminate() == 0


def test_subscribers_are_bounded(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var", "--max-alert-subscribers", "1")
    try:
        with server.channel("monitor") as first, server.channel() as second:
            stream = alert_service_pb2_grpc.AlertServiceStub(first).WatchAlerts(
                alert_service_pb2.WatchAlertsRequest(), timeout=30
            )
            stream.initial_metadata()  # admitted; it subscribes right after
            error = None
            for _ in range(50):
                extra = alert_service_pb2_grpc.AlertServiceStub(second).WatchAlerts(
                    alert_service_pb2.WatchAlertsRequest(), timeout=0.5
                )
                try:
                    next(iter(extra))
                except grpc.RpcError as caught:
                    if caught.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        error = caught
                        break
            assert error is not None and error_reason(error) == "TOO_MANY_SUBSCRIBERS"
            stream.cancel()
    finally:
        assert server.terminate() == 0


def test_calls_without_a_deadline_get_the_default_and_long_ones_are_cut(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "var", "--default-deadline-seconds", "0.01", "--max-deadline-seconds", "0.01"
    )
    try:
        with server.channel() as channel:
            big_batch = server.client(channel)
            for timeout in (None, 30.0):
                with pytest.raises(grpc.RpcError) as caught:
                    big_batch.score_batch(
                        "t",
                        [(f"d-{i}", applicants()[i % 100]) for i in range(256)],
                        timeout=timeout,  # type: ignore[arg-type]
                    )
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        assert server.terminate() == 0
