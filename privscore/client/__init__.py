"""privscore's Python client: seal features, pseudonymise customer ids and call the service.

Installable alone (the `privscore-client` distribution, clients/python): it needs grpcio,
protobuf, googleapis-common-protos, grpcio-status and cryptography, never the server, its
model runtime or numpy.

    from privscore.client import PrivscoreClient, Pseudonymiser, secure_channel

    channel = secure_channel("scoring.internal:50051", root_certificates=ca,
                             private_key=key, certificate_chain=cert)
    client = PrivscoreClient.discovered(channel, Pseudonymiser(pseudonym_key),
                                        identity=certificate_identity(cert))
    client.score("baitiao-cn", "CN-0001", {"duration_in_month": 24, ...})
"""

from privscore.client.channel import insecure_channel, secure_channel, service_config
from privscore.client.envelope import SEALING_FORMAT, KeyLimits, ServerPublicKey
from privscore.client.errors import Refusal, refusal
from privscore.client.pseudonym import Pseudonymiser
from privscore.client.sdk import (
    DiscoveryRefused,
    PrivscoreClient,
    certificate_identity,
    discover,
    sealing_key,
)

__all__ = [
    "SEALING_FORMAT",
    "DiscoveryRefused",
    "KeyLimits",
    "PrivscoreClient",
    "Pseudonymiser",
    "Refusal",
    "ServerPublicKey",
    "certificate_identity",
    "discover",
    "insecure_channel",
    "refusal",
    "sealing_key",
    "secure_channel",
    "service_config",
]
