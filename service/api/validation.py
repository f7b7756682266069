"""Request validation: the one place each wire constraint is checked.

Checks collect every violation of a request before failing, name each field by its path in
the request (e.g. `features.fields[2].nonce`) and never quote the offending value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor

from privscore.client.envelope import (  # crypto sizes have one home: the sealing format
    ENCAPSULATED_KEY_BYTES as X25519_ENCAPSULATED_KEY_BYTES,
)
from privscore.client.envelope import NONCE_BYTES as AES_GCM_NONCE_BYTES
from privscore.client.envelope import REQUEST_ID_SHAPE, SEALED_DATA_KEY_BYTES
from privscore.client.envelope import TAG_BYTES as AES_GCM_TAG_BYTES
from privscore.v1 import common_pb2
from service.errors import FailedPrecondition, FieldViolation, InvalidArgument

REQUEST_ID = REQUEST_ID_SHAPE
TENANT = re.compile(r"[a-z][a-z0-9-]{0,62}")
PSEUDONYM = re.compile(r"[0-9a-f]{64}")
CURRENCY_CODE = re.compile(r"[A-Z]{3}")
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
SCHEMA_VERSION = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# A reason given with a state change: a code, never free text (which could carry personal data).
REASON_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

MAX_BATCH_ITEMS = 256
MAX_FIELDS = 64
MAX_FIELD_CIPHERTEXT_BYTES = 1024
# Times privscore accepts: 1900-01-01 to 2200-01-01 UTC. Narrower than Timestamp's own range
# (years 1-9999), so window and retention arithmetic on any accepted time stays in range.
_MIN_SECONDS, _MAX_SECONDS = -2208988800, 7258118400


class CurrencyNotSupported(FailedPrecondition):
    """A currency the limit policy has no limits for (AdjustLimit's ceilings, Score's offers)."""

    reason = "CURRENCY_NOT_SUPPORTED"


class Violations:
    """Collects field violations; `raise_if_any` turns them into one INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str, reason: str = "INVALID_FIELD") -> None:
        self.items.append(FieldViolation(field, description, reason))

    def require(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def check_pattern(
    v: Violations, field: str, text: str, pattern: re.Pattern[str], shape: str
) -> bool:
    if not text:
        v.add(field, "is required", "REQUIRED_FIELD")
        return False
    return v.require(pattern.fullmatch(text) is not None, field, f"must be {shape}")


def check_request_id(v: Violations, field: str, request_id: str) -> None:
    check_pattern(v, field, request_id, REQUEST_ID, "1-64 characters of [A-Za-z0-9._:-]")


def check_subject(v: Violations, field: str, present: bool, subject: common_pb2.SubjectRef) -> None:
    if not present:
        v.add(field, "is required", "REQUIRED_FIELD")
        return
    check_pattern(
        v,
        f"{field}.tenant",
        subject.tenant,
        TENANT,
        "1-63 characters of [a-z0-9-] starting with a letter",
    )
    check_pattern(
        v,
        f"{field}.pseudonym",
        subject.pseudonym,
        PSEUDONYM,
        "an HMAC-SHA256 pseudonym: 64 lowercase hex characters",
    )


def check_offer_currency(v: Violations, field: str, currency: str) -> None:
    """An initial-limit offer's currency: empty (no offer) or an ISO 4217 code."""
    if currency:
        check_pattern(
            v, field, currency, CURRENCY_CODE, "an ISO 4217 code of three upper-case letters"
        )


def check_money(
    v: Violations, field: str, present: bool, money: common_pb2.Money, *, allow_zero: bool
) -> None:
    if not present:
        v.add(field, "is required", "REQUIRED_FIELD")
        return
    check_pattern(
        v,
        f"{field}.currency_code",
        money.currency_code,
        CURRENCY_CODE,
        "an ISO 4217 code of three upper-case letters",
    )
    if allow_zero:
        v.require(money.minor_units >= 0, f"{field}.minor_units", "must not be negative")
    else:
        v.require(money.minor_units > 0, f"{field}.minor_units", "must be positive")


def check_same_currency(v: Violations, fields: Iterable[tuple[str, common_pb2.Money]]) -> None:
    """Amounts that are there must share one currency (a missing one is reported elsewhere)."""
    present = [(field, money) for field, money in fields if money.currency_code]
    if len({money.currency_code for _, money in present}) > 1:
        for field, _ in present:
            v.add(f"{field}.currency_code", "must be the same currency as the other amounts")


def check_timestamp(
    v: Violations, field: str, present: bool, timestamp: timestamp_pb2.Timestamp
) -> None:
    if not present:
        v.add(field, "is required", "REQUIRED_FIELD")
        return
    v.require(
        _MIN_SECONDS <= timestamp.seconds <= _MAX_SECONDS,
        f"{field}.seconds",
        "must be between 1900-01-01 and 2200-01-01 UTC",
    )
    v.require(0 <= timestamp.nanos <= 999_999_999, f"{field}.nanos", "must be 0-999999999")


def check_enum(
    v: Violations, field: str, value: int, enum: EnumDescriptor, *, allow_unspecified: bool = False
) -> None:
    if value not in enum.values_by_number:
        v.add(field, f"is not a known {enum.name} value")
    elif value == 0 and not allow_unspecified:
        v.add(field, "must be specified", "REQUIRED_FIELD")


def check_encrypted_features(
    v: Violations, field: str, present: bool, features: common_pb2.EncryptedFeatures
) -> None:
    """Structure only: key ids, sizes and names. Decryption checks the contents later."""
    if not present:
        v.add(field, "is required", "REQUIRED_FIELD")
        return
    check_pattern(
        v,
        f"{field}.schema_version",
        features.schema_version,
        SCHEMA_VERSION,
        "1-128 characters of [A-Za-z0-9._:/-]",
    )
    key_field = f"{field}.data_key"
    data_key = features.data_key
    if not features.HasField("data_key"):
        v.add(key_field, "is required", "REQUIRED_FIELD")
    else:
        check_pattern(
            v, f"{key_field}.key_id", data_key.key_id, KEY_ID, "1-64 characters of [A-Za-z0-9._-]"
        )
        v.require(
            len(data_key.encapsulated_key) == X25519_ENCAPSULATED_KEY_BYTES,
            f"{key_field}.encapsulated_key",
            f"must be {X25519_ENCAPSULATED_KEY_BYTES} bytes",
        )
        v.require(
            len(data_key.sealed_key) == SEALED_DATA_KEY_BYTES,
            f"{key_field}.sealed_key",
            f"must be {SEALED_DATA_KEY_BYTES} bytes",
        )
    if not features.fields:
        v.add(f"{field}.fields", "must hold at least one field", "REQUIRED_FIELD")
    if not v.require(
        len(features.fields) <= MAX_FIELDS,
        f"{field}.fields",
        f"must hold at most {MAX_FIELDS} fields",
    ):
        return
    seen: set[str] = set()
    for index, encrypted in enumerate(features.fields):
        # Checked first, described only on failure: this loop runs for every field of every
        # request, and building the paths and messages would cost more than the checks.
        name = encrypted.name
        well_named = FEATURE_NAME.fullmatch(name) is not None
        repeated = well_named and name in seen
        seen.add(name)
        same_key = encrypted.key_id == data_key.key_id
        nonce_ok = len(encrypted.nonce) == AES_GCM_NONCE_BYTES
        sized = AES_GCM_TAG_BYTES < len(encrypted.ciphertext) <= MAX_FIELD_CIPHERTEXT_BYTES
        if well_named and not repeated and same_key and nonce_ok and sized:
            continue
        path = f"{field}.fields[{index}]"
        if not name:
            v.add(f"{path}.name", "is required", "REQUIRED_FIELD")
        elif not well_named:
            v.add(f"{path}.name", "must be a feature name of [A-Za-z0-9_], at most 64 characters")
        elif repeated:
            v.add(f"{path}.name", "repeats an earlier field name")
        v.require(same_key, f"{path}.key_id", "must equal data_key.key_id")
        v.require(nonce_ok, f"{path}.nonce", f"must be {AES_GCM_NONCE_BYTES} bytes")
        v.require(
            sized,
            f"{path}.ciphertext",
            f"must be {AES_GCM_TAG_BYTES + 1}-{MAX_FIELD_CIPHERTEXT_BYTES} bytes",
        )


def well_formed_request_id(request: Any) -> str:
    """The request's id if it has the contract's shape, else "": a malformed one may hold
    anything, a raw customer id included, and must not reach the audit log."""
    request_id = getattr(request, "request_id", "")
    return request_id if isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id) else ""


def well_formed_subject(request: Any) -> common_pb2.SubjectRef | None:
    """The request's subject if tenant and pseudonym have the contract's shape, else None."""
    if not isinstance(getattr(request, "subject", None), common_pb2.SubjectRef):
        return None
    subject: common_pb2.SubjectRef = request.subject
    if TENANT.fullmatch(subject.tenant) and PSEUDONYM.fullmatch(subject.pseudonym):
        return subject
    return None
