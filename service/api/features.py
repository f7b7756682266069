"""From encrypted request fields to one validated model row, held in memory for the call only."""

from __future__ import annotations

import base64
from typing import Any

from privscore.v1 import common_pb2
from service.errors import FailedPrecondition, FieldViolation, InvalidArgument
from service.model.schema import validate_record
from service.model.scorer import Row, Scorer
from service.privacy.sealing import FeatureInput, FeatureOpener


class SchemaVersionMismatch(FailedPrecondition):
    reason = "SCHEMA_VERSION_MISMATCH"


def open_row(
    scorer: Scorer,
    opener: FeatureOpener,
    features: common_pb2.EncryptedFeatures,
    subject: common_pb2.SubjectRef,
    *,
    method: str,
    request_id: str,
    path: str = "features",
    opened_keys: dict[bytes, Any] | None = None,
) -> Row:
    """Decrypt and validate against the served model's schema; errors name fields only."""
    served = scorer.schema_version
    if features.schema_version != served:
        raise SchemaVersionMismatch(
            f"{path}.schema_version does not match the served model's schema {served}"
        )
    values = opener.open(
        features,
        subject,
        method=method,
        request_id=request_id,
        path=path,
        opened_keys=opened_keys,
    )
    problems = validate_record(scorer.manifest.schema, values)
    if problems:
        index = {field.name: i for i, field in enumerate(features.fields)}
        raise InvalidArgument(
            [
                FieldViolation(
                    f"{path}.fields[{index[name]}]" if name in index else f"{path}.fields",
                    f"feature {name} {problem.description}",
                    problem.reason,
                )
                for name, problem in problems
            ]
        )
    return _model_row(values)


def _model_row(values: dict[str, FeatureInput]) -> Row:
    # validate_record has checked every type, so only str and numbers remain.
    return {
        name: value if isinstance(value, str) else float(value) for name, value in values.items()
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encrypted_inputs(features: common_pb2.EncryptedFeatures) -> dict[str, Any]:
    """The encrypted inputs exactly as received, for the audit record (no plaintext), in the
    protobuf JSON mapping (`json_format.ParseDict` reads it back), built by hand because
    this runs for every decision and `MessageToDict` is several times slower."""
    key = features.data_key
    return {
        "schema_version": features.schema_version,
        "data_key": {
            "key_id": key.key_id,
            "encapsulated_key": _b64(key.encapsulated_key),
            "sealed_key": _b64(key.sealed_key),
        },
        "fields": [
            {
                "name": f.name,
                "key_id": f.key_id,
                "nonce": _b64(f.nonce),
                "ciphertext": _b64(f.ciphertext),
            }
            for f in features.fields
        ],
    }
