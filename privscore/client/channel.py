"""Channels to a privscore server: mutual TLS 1.3 with a client certificate, or plaintext
loopback, both with the retry policy of the idempotent calls."""

from __future__ import annotations

import json

import grpc

from privscore.v1 import (
    alert_service_pb2,
    audit_service_pb2,
    discovery_service_pb2,
    limit_service_pb2,
)

# Calls that are safe to send again after UNAVAILABLE (the server down, restarting, not ready,
# or its audit log or database unreachable, which decide nothing): AdjustLimit answers a
# repeated request id with the decision it stored, EvaluateEvent a repeated event id as a
# duplicate, and the reads change nothing. Score and ScoreBatch are not retried: a second
# attempt after a lost reply would be a second decision.
IDEMPOTENT_METHODS = (
    (limit_service_pb2, "LimitService", "AdjustLimit"),
    (alert_service_pb2, "AlertService", "EvaluateEvent"),
    (discovery_service_pb2, "DiscoveryService", "GetServerInfo"),
    (audit_service_pb2, "AuditService", "GetDecisionRecord"),
)
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> str:
    """The channel's gRPC service config: the retry policy for the idempotent methods, named
    from the generated descriptors."""
    names = []
    for module, service, method in IDEMPOTENT_METHODS:
        found = module.DESCRIPTOR.services_by_name[service]
        names.append({"service": found.full_name, "method": found.methods_by_name[method].name})
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


def channel_options(retries: bool = True) -> list[tuple[str, object]]:
    """The retry policy of `service_config`; `retries=False` turns gRPC's retries off (to
    see each refusal as the server gives it)."""
    if not retries:
        return [("grpc.enable_retries", 0)]
    return [("grpc.service_config", service_config()), ("grpc.enable_retries", 1)]


def secure_channel(
    target: str,
    *,
    root_certificates: bytes,
    private_key: bytes,
    certificate_chain: bytes,
    retries: bool = True,
) -> grpc.Channel:
    """Mutual TLS with this client certificate (PEM), trusting `root_certificates`."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )
    return grpc.secure_channel(target, credentials, options=channel_options(retries))


def insecure_channel(target: str) -> grpc.Channel:
    """Plaintext, for a server run with --insecure on loopback only."""
    return grpc.insecure_channel(target, options=channel_options())
