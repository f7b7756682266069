"""The privacy envelope, caller side and wire constants: how a caller seals features for privscore.

Sealing format 2 (the `.v2` labels below; format 1 bound the request id into the HPKE info
and is refused, as format 2 is by a format-1 server: the labels differ, so nothing opens
across formats):

- A caller draws an AES-256 data key and seals it with HPKE (RFC 9180 base mode:
  DHKEM(X25519), HKDF-SHA256, AES-256-GCM) to the server's primary X25519 key, with the RPC
  method and the caller's identity (the SPIFFE id of its client certificate, as the server
  reads it) as HPKE `info`. The sealed plaintext is the key and its *grant*: when it was made
  and how long, for how many requests and for how many plaintext bytes it may be used
  (`GRANT`). A caller may reuse one sealed key for many requests within its grant (the SDK's
  data-key cache); the server keeps opened keys in a bounded cache keyed by everything the
  open depends on, and honours a key only within its grant.
- Each feature value is a typed `FeatureValue`, encrypted under the data key with
  AES-256-GCM, a fresh random 12-byte nonce, and associated data binding the schema version,
  the request id, the subject (tenant and pseudonym) and the field name: a field ciphertext
  from one request never opens in another, even under the same data key.

Every label, size and limit of the format is defined here and nowhere else; the server's side
(opening, the cache of opened keys, the checks) is service/privacy/sealing.py, and
docs/envelope.md is the written specification. It needs only `cryptography`, the generated
messages and the standard library: it is part of the client distribution (clients/python).
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import re
import secrets
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from privscore.client.encoding import length_prefixed
from privscore.v1 import common_pb2

# -- the format: labels and sizes ----------------------------------------------------------

SEALING_FORMAT = 2
# A request id as the contract allows it (it is bound into every field's associated data, and
# travels as the x-request-id metadata): the server refuses any other in a message and makes
# its own for metadata that does not fit.
REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# The metadata key of the request id: sent by callers, returned in every call's trailers.
REQUEST_ID_METADATA = "x-request-id"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
ENCAPSULATED_KEY_BYTES = hpke.KEM.X25519.enc_length()
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# The sealed plaintext: data key, made at (ms since the Unix epoch, the caller's clock),
# maximum age (ms), maximum requests, maximum plaintext bytes; big-endian.
GRANT = struct.Struct(">32sQIIQ")
SEALED_DATA_KEY_BYTES = GRANT.size + TAG_BYTES
_INFO_LABEL = b"privscore.v1/data-key.v2\x00"
_AAD_LABEL = b"privscore.v1/field.v2\x00"
# Format 1: a bare data key per request, HPKE info = method + request id, field associated data
# without the request id. Never accepted on the wire; opened only to replay audit records
# written before format 2.
_FORMAT1_INFO_LABEL = b"privscore.v1/data-key\x00"
_FORMAT1_AAD_LABEL = b"privscore.v1/field\x00"

# -- reuse limits ---------------------------------------------------------------------------
#
# The SDK's defaults for reusing one sealed data key (as the AWS Encryption SDK caches data
# keys): whichever is reached first retires the key. A caller may choose others (0 turns
# reuse off: one key per request) up to the ceilings, which the server enforces on every
# grant it opens.
DEFAULT_MAX_AGE_S = 300.0
DEFAULT_MAX_REQUESTS = 10_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
CEILING_MAX_AGE_S = 3_600.0
CEILING_MAX_REQUESTS = 1_000_000
CEILING_MAX_BYTES = 1 << 30
# AES-GCM with random 96-bit nonces (NIST SP 800-38D, 8.3): at most 2^32 encryptions per key,
# which keeps the chance that any two nonces collide below q^2 / 2^97 = 2^-33. One data key
# encrypts at most 2^24 fields, whatever the limits above: a collision chance below 2^-49.
MAX_ENCRYPTIONS_PER_KEY = 1 << 24
# How far apart the caller's clock (which dates a grant) and the server's may be.
CLOCK_SKEW_S = 60.0

# -- sealed account state and event figures ------------------------------------------------
#
# AdjustLimit's account state and EvaluateEvent's figures travel in the same envelope as the
# features (EncryptedFeatures, same data key rules, same associated data), under these schema
# versions and field names; amounts are `Money` values, counts whole numbers.
ACCOUNT_SCHEMA_VERSION = "account/1"
ACCOUNT_MONEY_FIELDS = ("current_limit", "balance")
ACCOUNT_COUNT_FIELDS = ("on_time_repayments_in_row", "days_past_due", "account_age_days")
EVENT_SCHEMA_VERSION = "event/1"
# The figures each event kind carries (besides the optional "balance_after").
EVENT_MONEY_FIELDS = {
    "purchase": ("amount",),
    "repayment": ("amount",),
    "missed_payment": ("amount",),
    "limit_change": ("new_limit",),
    "login": (),
}
EVENT_COUNT_FIELDS = {"missed_payment": ("days_past_due",)}
EVENT_BALANCE_FIELD = "balance_after"
# Where each sealed figure was carried in clear before (the deprecated, refused fields), by kind
# and sealed name: the SDK moves a caller's in-process figures from these into the sealed ones.
# "balance_after" is BehaviourEvent.balance_after for every kind.
EVENT_CLEAR_FIELDS = {
    "purchase": {"amount": "amount"},
    "repayment": {"amount": "amount"},
    "missed_payment": {"amount": "amount_due", "days_past_due": "days_past_due"},
    "limit_change": {"new_limit": "new_limit"},
    "login": {},
}


@dataclass(frozen=True)
class Money:
    """An amount sealed as a `FeatureValue.money_value`: integer minor units of one currency."""

    currency_code: str
    minor_units: int


FeatureInput = float | int | str | bool
# What a sealed field may hold: a feature's value, or an amount (account state, event figures).
SealedValue = FeatureInput | Money


@functools.lru_cache(maxsize=1024)
def hpke_info(method: str, identity: str) -> bytes:
    """HPKE info: a data key sealed by one caller for one method opens for no other of either."""
    return length_prefixed(_INFO_LABEL, method, identity)


def field_aad_prefix(schema_version: str, request_id: str, subject: common_pb2.SubjectRef) -> bytes:
    """The associated data every field of one subject's features in one request shares;
    `field_aad` adds the field name. Split so a request's 18 fields encode the shared part
    once."""
    return length_prefixed(
        _AAD_LABEL, schema_version, request_id, subject.tenant, subject.pseudonym
    )


def field_aad(prefix: bytes, name: str) -> bytes:
    return prefix + length_prefixed(b"", name)


def encode_value(value: SealedValue) -> bytes:
    # bool is an int in Python: test it first so True does not travel as 1.0.
    if isinstance(value, bool):
        message = common_pb2.FeatureValue(bool_value=value)
    elif isinstance(value, int | float):
        message = common_pb2.FeatureValue(number_value=float(value))
    elif isinstance(value, str):
        message = common_pb2.FeatureValue(string_value=value)
    elif isinstance(value, Money):
        message = common_pb2.FeatureValue(
            money_value=common_pb2.Money(
                currency_code=value.currency_code, minor_units=value.minor_units
            )
        )
    else:
        raise TypeError(
            f"sealed values are numbers, strings, booleans or Money, not {type(value).__name__}"
        )
    return message.SerializeToString()


def decode_value(plaintext: bytes) -> SealedValue | None:
    """The typed value, or None when the bytes are no FeatureValue with exactly one kind set."""
    try:
        message = common_pb2.FeatureValue.FromString(plaintext)
    except DecodeError:
        return None
    kind = message.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "money_value":
        money = message.money_value
        return Money(money.currency_code, money.minor_units)
    value: SealedValue = getattr(message, kind)
    return value


@dataclass(frozen=True)
class KeyLimits:
    """How long, for how many requests and for how many plaintext bytes one data key serves.

    Any limit 0 means no reuse: the SDK seals a fresh key for every request (a grant of one
    request). Limits above the ceilings are refused here, as the server refuses such a grant.
    """

    max_age_s: float = DEFAULT_MAX_AGE_S
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        for name, value, ceiling in (
            ("max_age_s", self.max_age_s, CEILING_MAX_AGE_S),
            ("max_requests", self.max_requests, CEILING_MAX_REQUESTS),
            ("max_bytes", self.max_bytes, CEILING_MAX_BYTES),
        ):
            if not 0 <= value <= ceiling:  # NaN compares false: refused too
                raise ValueError(f"{name} must be between 0 and {ceiling}")

    @property
    def reuse(self) -> bool:
        return self.max_age_s > 0 and self.max_requests > 0 and self.max_bytes > 0


def _grant_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


# -- caller side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerPublicKey:
    key_id: str
    public_key: x25519.X25519PublicKey


def load_public_keyset(path: Path) -> ServerPublicKey:
    """The primary key from a public keyset file that `privscore keys` writes."""
    data = json.loads(path.read_text(encoding="utf-8"))
    primary = next(k for k in data["keys"] if k["primary"])
    raw = base64.b64decode(primary["public_key"], validate=True)
    return ServerPublicKey(primary["key_id"], x25519.X25519PublicKey.from_public_bytes(raw))


class DataKeyExhausted(RuntimeError):
    """A data key has encrypted `MAX_ENCRYPTIONS_PER_KEY` fields; seal a new one."""


class DataKey:
    """A data key sealed to the server for one caller identity and one method, with its grant.

    It may seal the features of many requests (each under its own request id) within its
    limits; the SDK's cache counts requests and bytes, and the key itself refuses to encrypt
    more than `MAX_ENCRYPTIONS_PER_KEY` fields. Thread-safe.
    """

    def __init__(
        self,
        server_key: ServerPublicKey,
        method: str,
        *,
        identity: str,
        limits: KeyLimits | None = None,
        created_at: float | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """`random_bytes` draws the data key and every field's nonce (the OS's CSPRNG; the
        test vectors pass fixed bytes to check the field layer byte for byte)."""
        limits = KeyLimits() if limits is None else limits
        if not limits.reuse:
            raise ValueError("a data key's grant needs every limit above 0")
        self.limits = limits
        self.created_at = time.time() if created_at is None else created_at
        self._random_bytes = random_bytes
        key = random_bytes(DATA_KEY_BYTES)
        grant = GRANT.pack(
            key,
            round(self.created_at * 1000),
            _grant_ms(limits.max_age_s),
            limits.max_requests,
            limits.max_bytes,
        )
        sealed = SUITE.encrypt(grant, server_key.public_key, info=hpke_info(method, identity))
        self.sealed = common_pb2.SealedDataKey(
            key_id=server_key.key_id,
            encapsulated_key=sealed[:ENCAPSULATED_KEY_BYTES],
            sealed_key=sealed[ENCAPSULATED_KEY_BYTES:],
        )
        self._aead = AESGCM(key)
        self._encryptions = itertools.count(1)  # next() is atomic: threads share the key

    def seal(
        self,
        schema_version: str,
        subject: common_pb2.SubjectRef,
        values: Mapping[str, SealedValue],
        *,
        request_id: str,
    ) -> common_pb2.EncryptedFeatures:
        return self.seal_encoded(
            schema_version,
            subject,
            [(name, encode_value(v)) for name, v in values.items()],
            request_id=request_id,
        )

    def seal_encoded(
        self,
        schema_version: str,
        subject: common_pb2.SubjectRef,
        plaintexts: Sequence[tuple[str, bytes]],
        *,
        request_id: str,
    ) -> common_pb2.EncryptedFeatures:
        """Seal already-encoded plaintexts (tests use it to send malformed ones)."""
        fields = []
        aad_prefix = field_aad_prefix(schema_version, request_id, subject)
        for name, plaintext in plaintexts:
            if next(self._encryptions) > MAX_ENCRYPTIONS_PER_KEY:
                raise DataKeyExhausted("this data key has sealed as many fields as it may")
            nonce = self._random_bytes(NONCE_BYTES)
            ciphertext = self._aead.encrypt(nonce, plaintext, field_aad(aad_prefix, name))
            fields.append(
                common_pb2.EncryptedField(
                    name=name, key_id=self.sealed.key_id, nonce=nonce, ciphertext=ciphertext
                )
            )
        return common_pb2.EncryptedFeatures(
            schema_version=schema_version, data_key=self.sealed, fields=fields
        )
