"""From encrypted request fields to one validated model row, held in memory for the call only."""

from __future__ import annotations

import base64

from privscore.v1 import common_pb2
from service.callctx import CALLER
from service.errors import FailedPrecondition, FieldViolation, InvalidArgument
from service.model.schema import validate_record
from service.model.scorer import Row, Scorer
from service.privacy.sealing import FeatureOpener, Money, RequestKeys, SealedValue


class SchemaVersionMismatch(FailedPrecondition):
    reason = "SCHEMA_VERSION_MISMATCH"


def request_scorer(
    champion: Scorer, challenger: Scorer | None, version: str, path: str = "features"
) -> Scorer:
    """The scorer whose schema a request under `version` is validated against.

    The champion's own schema, as always; and, while a challenger on a newer schema runs in
    shadow, the challenger's, provided the champion's inputs are all in it: a caller that has
    moved to the new schema (e.g. a feature from a new data source) is answered by the
    champion on the features it knows and scored by the challenger on all of them, so callers
    can migrate before the promotion. Anything else is refused, saying what is served and, for
    a caller still on an older schema, which features it lacks."""
    if version == champion.schema_version:
        return champion
    needed = champion.manifest.schema.model_feature_names
    if (
        challenger is not None
        and version == challenger.schema_version
        and needed <= {spec.name for spec in challenger.manifest.schema.features}
    ):
        return challenger
    accepted = [champion.schema_version]
    if challenger is not None and challenger.schema_version != champion.schema_version:
        accepted.append(challenger.schema_version)
    message = f"{path}.schema_version is not a schema served here ({', '.join(accepted)})"
    if challenger is None or version != challenger.schema_version:
        names = sorted(spec.name for spec in champion.manifest.schema.features)
        message += f"; the served schema's features are {', '.join(names)}"
    raise SchemaVersionMismatch(message)


def open_row(
    scorer: Scorer,
    opener: FeatureOpener,
    features: common_pb2.EncryptedFeatures,
    subject: common_pb2.SubjectRef,
    *,
    method: str,
    request_id: str,
    identity: str | None = None,
    path: str = "features",
    opened_keys: RequestKeys | None = None,
    at: float | None = None,
) -> Row:
    """Decrypt and validate against the served model's schema; errors name fields only.

    The data key must have been sealed by `identity`: by default the verified caller of the
    current call (`CALLER`, which the interceptor sets before any servicer runs). `at` opens
    a recorded request as of its decision time (replay; see `FeatureOpener.open`).
    """
    served = scorer.schema_version
    if features.schema_version != served:
        raise SchemaVersionMismatch(
            f"{path}.schema_version does not match the served model's schema {served}"
        )
    values = opener.open(
        features,
        subject,
        method=method,
        identity=CALLER.get() if identity is None else identity,
        request_id=request_id,
        path=path,
        opened_keys=opened_keys,
        at=at,
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


def _model_row(values: dict[str, SealedValue]) -> Row:
    # validate_record has checked every type, so only str and numbers remain.
    assert not any(isinstance(value, Money) for value in values.values())
    return {
        name: value if isinstance(value, str) else float(value)  # type: ignore[arg-type]
        for name, value in values.items()
    }


def encrypted_inputs(features: common_pb2.EncryptedFeatures) -> str:
    """The encrypted inputs as received, for the audit record (no plaintext): the serialised
    `EncryptedFeatures`, base64. One opaque string rather than the JSON mapping because it
    is kept for every decision, and encoding and hashing 18 fields' JSON cost more than
    the rest of the record; `read_encrypted_inputs` reads it back."""
    return base64.b64encode(features.SerializeToString(deterministic=True)).decode("ascii")


def read_encrypted_inputs(recorded: str) -> common_pb2.EncryptedFeatures:
    return common_pb2.EncryptedFeatures.FromString(base64.b64decode(recorded, validate=True))
