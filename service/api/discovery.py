"""DiscoveryService: what a caller needs to seal and send requests, over the wire.

Everything here is public by design: public keys, the schema (names, kinds, categories,
ranges) and versions. It is served to any identity the authorisation policy lists, so a
caller in any language needs nothing from the server's disk (`docs/envelope.md`).
"""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import timestamp_pb2

from privscore.v1 import discovery_service_pb2 as pb
from privscore.v1 import discovery_service_pb2_grpc
from service.api.runtime import Runtime, RuntimeSlot
from service.model.schema import FeatureSpec
from service.privacy.keyring import FIELD_ENCRYPTION
from service.privacy.sealing import SEALING_FORMAT

GET_SERVER_INFO_METHOD = "/privscore.v1.DiscoveryService/GetServerInfo"
_STATUSES = {"primary": pb.SEALING_KEY_STATUS_PRIMARY, "active": pb.SEALING_KEY_STATUS_ACTIVE}


def server_info(runtime: Runtime) -> pb.GetServerInfoResponse:
    """The keys, schema and versions served now (a keyring reload shows at the next call)."""
    scorer = runtime.scorer
    keys = [
        entry
        for entry in runtime.keyring.entries
        if entry.purpose == FIELD_ENCRYPTION and entry.status in _STATUSES
    ]
    keys.sort(key=lambda entry: entry.status != "primary")
    return pb.GetServerInfoResponse(
        sealing_keys=[
            pb.SealingKey(
                key_id=entry.key_id,
                public_key=entry.public_key,
                status=_STATUSES[entry.status],
                created_at=_timestamp(entry.made_at),
            )
            for entry in keys
        ],
        sealing_format=SEALING_FORMAT,
        model_version=scorer.model_version,
        schema_version=scorer.schema_version,
        policy_version=runtime.policy.version,
        features=[_feature(spec) for spec in scorer.manifest.schema.model_features],
        model_manifest_sha256=scorer.manifest_sha256,
    )


def _feature(spec: FeatureSpec) -> pb.FeatureSpec:
    feature = pb.FeatureSpec(
        name=spec.name,
        kind=pb.FEATURE_KIND_NUMERIC if spec.is_numeric else pb.FEATURE_KIND_CATEGORICAL,
        categories=list(spec.categories or ()),
        integer=bool(spec.integer),
        reason_code=spec.reason_code or "",
        description=spec.description or "",
    )
    if spec.min is not None:
        feature.min = spec.min
    if spec.max is not None:
        feature.max = spec.max
    return feature


def _timestamp(made: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(made)
    return stamp


class DiscoveryServicer(discovery_service_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, slot: RuntimeSlot) -> None:
        self._slot = slot

    async def GetServerInfo(
        self,
        request: pb.GetServerInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetServerInfoRequest, pb.GetServerInfoResponse],
    ) -> pb.GetServerInfoResponse:
        return server_info(self._slot.runtime)
