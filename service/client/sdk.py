"""The client SDK in this repository: `privscore.client` (the client distribution's code,
privscore/client/sdk.py) with the server's dev-key conveniences, which read the files
`privscore keys init` and `privscore certs init` put under a data directory."""

from __future__ import annotations

from pathlib import Path

import grpc

from privscore.client.pseudonym import Pseudonymiser
from privscore.client.sdk import (
    ADJUST_LIMIT_METHOD,
    EVALUATE_EVENT_METHOD,
    SCORE_BATCH_METHOD,
    SCORE_METHOD,
    DataKeyCache,
    DiscoveryRefused,
    Features,
    call_metadata,
    certificate_identity,
    discover,
    new_request_id,
    sealing_key,
    trace_metadata,
)
from privscore.client.sdk import PrivscoreClient as _PrivscoreClient
from service.config import DataLayout
from service.privacy.sealing import KeyLimits, load_public_keyset
from service.security.certs import CertPaths

__all__ = [
    "ADJUST_LIMIT_METHOD",
    "EVALUATE_EVENT_METHOD",
    "SCORE_BATCH_METHOD",
    "SCORE_METHOD",
    "DataKeyCache",
    "DiscoveryRefused",
    "Features",
    "PrivscoreClient",
    "call_metadata",
    "certificate_identity",
    "discover",
    "new_request_id",
    "sealing_key",
    "trace_metadata",
]


class PrivscoreClient(_PrivscoreClient):
    @classmethod
    def from_data_dir(
        cls,
        channel: grpc.Channel,
        data_dir: Path | str,
        schema_version: str,
        *,
        cert_name: str = "dev",
        key_limits: KeyLimits | None = None,
    ) -> PrivscoreClient:
        """Use the dev keys `privscore keys init` put under the data directory, sealing for the
        identity of the `cert_name` client certificate (the one the channel presents)."""
        layout = DataLayout(Path(data_dir))
        certificate = CertPaths(layout.certs_dir).client_cert(cert_name)
        identity = certificate_identity(certificate.read_bytes()) if certificate.exists() else None
        return cls(
            channel,
            load_public_keyset(layout.public_keyset),
            Pseudonymiser.from_file(layout.pseudonym_key),
            schema_version,
            identity=identity,
            key_limits=key_limits,
        )
