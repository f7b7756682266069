"""Channels to a privscore server: mutual TLS with a client certificate, or plaintext loopback."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from privscore.v1 import (
    alert_service_pb2,
    audit_service_pb2,
    discovery_service_pb2,
    limit_service_pb2,
)
from service.config import DataLayout
from service.security.certs import CertPaths

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


def open_channel(
    target: str, data_dir: Path, cert_name: str = "dev", *, insecure: bool = False
) -> grpc.Channel:
    """A channel that presents the `cert_name` client certificate from `privscore certs init`
    and retries the idempotent calls on UNAVAILABLE (`service_config`)."""
    options = [("grpc.service_config", service_config()), ("grpc.enable_retries", 1)]
    if insecure:
        return grpc.insecure_channel(target, options=options)
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key(cert_name).read_bytes(),
        certificate_chain=certs.client_cert(cert_name).read_bytes(),
    )
    return grpc.secure_channel(target, credentials, options=options)
