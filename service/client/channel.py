"""Channels to a privscore server: mutual TLS with a client certificate, or plaintext loopback."""

from __future__ import annotations

from pathlib import Path

import grpc

from service.config import DataLayout
from service.security.certs import CertPaths


def open_channel(
    target: str, data_dir: Path, cert_name: str = "dev", *, insecure: bool = False
) -> grpc.Channel:
    """A channel that presents the `cert_name` client certificate from `privscore certs init`."""
    if insecure:
        return grpc.insecure_channel(target)
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key(cert_name).read_bytes(),
        certificate_chain=certs.client_cert(cert_name).read_bytes(),
    )
    return grpc.secure_channel(target, credentials)
