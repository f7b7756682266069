"""Channels for the tools in this repository: the client certificates `privscore certs init`
puts under a data directory, over privscore/client/channel.py."""

from __future__ import annotations

from pathlib import Path

import grpc

from privscore.client.channel import insecure_channel, secure_channel, service_config
from service.config import DataLayout
from service.security.certs import CertPaths

__all__ = ["open_channel", "service_config"]


def open_channel(
    target: str,
    data_dir: Path,
    cert_name: str = "dev",
    *,
    insecure: bool = False,
    retries: bool = True,
) -> grpc.Channel:
    """A channel that presents the `cert_name` client certificate from `privscore certs init`
    and retries the idempotent calls on UNAVAILABLE (`service_config`)."""
    if insecure:
        return insecure_channel(target)
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    return secure_channel(
        target,
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key(cert_name).read_bytes(),
        certificate_chain=certs.client_cert(cert_name).read_bytes(),
        retries=retries,
    )
