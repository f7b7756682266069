"""Builds and runs the grpc.aio server: interceptors, servicers, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import signal

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    limit_service_pb2,
    limit_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)
from service.api.alerts import AlertServicer
from service.api.limits import LimitServicer
from service.api.scoring import ScoringServicer
from service.config import ServerSettings
from service.decisions.alert_stream import AlertStream
from service.interceptors import RequestContextInterceptor

SERVICE_NAMES = (
    scoring_service_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
    limit_service_pb2.DESCRIPTOR.services_by_name["LimitService"].full_name,
    alert_service_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name,
)
# "" is the whole server's status, as grpc_health_probe and Kubernetes ask by default.
HEALTH_NAMES = ("", *SERVICE_NAMES)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

log = structlog.get_logger("privscore.server")


class StartupError(RuntimeError):
    """The server cannot start; the message says why, without secrets."""


class PrivscoreServer:
    """One running server; `start`, then `wait_for_termination` or `stop`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.health = health_aio.HealthServicer()
        self.alert_stream = AlertStream()
        self.port = 0
        self._server = grpc.aio.server(
            interceptors=[RequestContextInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        scoring_service_pb2_grpc.add_ScoringServiceServicer_to_server(
            ScoringServicer(), self._server
        )
        limit_service_pb2_grpc.add_LimitServiceServicer_to_server(LimitServicer(), self._server)
        alert_service_pb2_grpc.add_AlertServiceServicer_to_server(
            AlertServicer(self.alert_stream), self._server
        )
        if settings.reflection:
            reflection.enable_server_reflection(
                (
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                self._server,
            )

    async def start(self) -> None:
        await self.listen()
        await self.become_ready()

    async def listen(self) -> None:
        """Accept connections with health NOT_SERVING, so probes can watch start-up."""
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = self._server.add_insecure_port(self.settings.address)
        except RuntimeError:
            raise StartupError(f"cannot listen on {self.settings.address}") from None
        await self._server.start()
        log.info("server.listening", bind=self.settings.bind, port=self.port)

    async def become_ready(self) -> None:
        """Load what serving needs (model and keys, as they land), then turn health SERVING."""
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server.ready", port=self.port)

    async def stop(self) -> None:
        """Stop accepting, end alert streams, drain in-flight calls within the grace period."""
        log.info("server.stopping", grace_seconds=self.settings.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.alert_stream.close()
        await self._server.stop(self.settings.grace_seconds)
        log.info("server.stopped")


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = PrivscoreServer(settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await server.start()
    await stop_requested.wait()
    await server.stop()
