"""Operator probes of a running server: health status and the services it exposes."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) of `service`."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def list_services(channel: grpc.Channel) -> list[str]:
    """The fully qualified names of the services the server lists through reflection."""
    return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
