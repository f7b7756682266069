"""The SDK's channel retries what is safe to retry: a stand-in server over the same mutual TLS
answers UNAVAILABLE to the first attempts and counts them."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from privscore.v1 import limit_service_pb2, limit_service_pb2_grpc, scoring_service_pb2_grpc
from privscore.v1 import scoring_service_pb2 as scoring_pb
from service.client.channel import open_channel
from service.config import DataLayout
from service.security.certs import CertPaths
from tests.conftest import LOOPBACK, init_dev_keys

FAILURES_BEFORE_SUCCESS = 2


class Flaky:
    """AdjustLimit fails FAILURES_BEFORE_SUCCESS times, then answers; Score always fails."""

    def __init__(self) -> None:
        self.attempts = {"AdjustLimit": 0, "Score": 0}

    def adjust_limit(
        self, request: limit_service_pb2.AdjustLimitRequest, context: grpc.ServicerContext
    ) -> limit_service_pb2.AdjustLimitResponse:
        self.attempts["AdjustLimit"] += 1
        if self.attempts["AdjustLimit"] <= FAILURES_BEFORE_SUCCESS:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return limit_service_pb2.AdjustLimitResponse(rule="hold.test")

    def score(
        self, request: scoring_pb.ScoreRequest, context: grpc.ServicerContext
    ) -> scoring_pb.ScoreResponse:
        self.attempts["Score"] += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def handlers(self) -> tuple[Any, ...]:
        limit = grpc.unary_unary_rpc_method_handler(
            self.adjust_limit,
            request_deserializer=limit_service_pb2.AdjustLimitRequest.FromString,
            response_serializer=limit_service_pb2.AdjustLimitResponse.SerializeToString,
        )
        score = grpc.unary_unary_rpc_method_handler(
            self.score,
            request_deserializer=scoring_pb.ScoreRequest.FromString,
            response_serializer=scoring_pb.ScoreResponse.SerializeToString,
        )
        return (
            grpc.method_handlers_generic_handler(
                "privscore.v1.LimitService", {"AdjustLimit": limit}
            ),
            grpc.method_handlers_generic_handler("privscore.v1.ScoringService", {"Score": score}),
        )


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[tuple[Flaky, str, Path]]:
    data_dir = tmp_path / "var"
    init_dev_keys(data_dir)
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = Flaky()
    server.add_generic_rpc_handlers(servicer.handlers())
    port = server.add_secure_port(f"{LOOPBACK}:0", credentials)
    server.start()
    try:
        yield servicer, f"{LOOPBACK}:{port}", data_dir
    finally:
        server.stop(0)


def test_idempotent_calls_are_retried_on_unavailable_and_score_is_not(
    flaky: tuple[Flaky, str, Path],
) -> None:
    servicer, target, data_dir = flaky
    with open_channel(target, data_dir) as channel:
        limits = limit_service_pb2_grpc.LimitServiceStub(channel)
        answer = limits.AdjustLimit(limit_service_pb2.AdjustLimitRequest(), timeout=20)
        assert answer.rule == "hold.test"
        with pytest.raises(grpc.RpcError) as refused:
            scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(
                scoring_pb.ScoreRequest(), timeout=20
            )
    assert servicer.attempts["AdjustLimit"] == FAILURES_BEFORE_SUCCESS + 1
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["Score"] == 1  # a second Score could be a second decision
