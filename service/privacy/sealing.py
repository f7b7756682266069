"""Field sealing, both ends: callers seal, the server opens.

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

Every label, size and limit of the format is defined here and nowhere else.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import math
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from privscore.v1 import common_pb2
from service.errors import FailedPrecondition, FieldViolation, InvalidArgument
from service.privacy.encoding import length_prefixed
from service.privacy.keyring import Keyring

# -- the format: labels and sizes ----------------------------------------------------------

SEALING_FORMAT = 2
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
# Opened data keys the server keeps (each about 0.9 kB with its cache key: some 3.5 MB in all).
OPENED_KEY_CACHE_ENTRIES = 4_096

FeatureInput = float | int | str | bool
_DOES_NOT_DECRYPT = "does not decrypt for this field name, request, subject and schema version"
_log = structlog.get_logger("privscore.sealing")


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


def encode_value(value: FeatureInput) -> bytes:
    # bool is an int in Python: test it first so True does not travel as 1.0.
    if isinstance(value, bool):
        message = common_pb2.FeatureValue(bool_value=value)
    elif isinstance(value, int | float):
        message = common_pb2.FeatureValue(number_value=float(value))
    elif isinstance(value, str):
        message = common_pb2.FeatureValue(string_value=value)
    else:
        raise TypeError(
            f"feature values are numbers, strings or booleans, not {type(value).__name__}"
        )
    return message.SerializeToString()


def decode_value(plaintext: bytes) -> FeatureInput | None:
    """The typed value, or None when the bytes are no FeatureValue with exactly one kind set."""
    try:
        message = common_pb2.FeatureValue.FromString(plaintext)
    except DecodeError:
        return None
    kind = message.WhichOneof("kind")
    if kind is None:
        return None
    value: FeatureInput = getattr(message, kind)
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
        values: Mapping[str, FeatureInput],
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


# -- server side -------------------------------------------------------------------------------


class DataKeyExpired(FailedPrecondition):
    reason = "DATA_KEY_EXPIRED"


class DataKeyNotYetValid(FailedPrecondition):
    reason = "DATA_KEY_NOT_YET_VALID"


class DataKeyLimitReached(FailedPrecondition):
    reason = "DATA_KEY_EXHAUSTED"


@dataclass(frozen=True)
class Grant:
    """What the caller sealed with a data key: when it was made (the caller's clock, seconds
    since the epoch) and its limits."""

    created_at: float
    max_age_s: float
    max_requests: int
    max_bytes: int

    def check_time(self, at: float, path: str) -> None:
        """Refuse a key used outside [made - skew, made + max age + skew] at time `at`."""
        if at < self.created_at - CLOCK_SKEW_S:
            raise DataKeyNotYetValid(
                f"{path}.data_key was made later than now by more than the allowed clock skew "
                f"({CLOCK_SKEW_S:g} s); check the caller's clock"
            )
        if at > self.created_at + self.max_age_s + CLOCK_SKEW_S:
            raise DataKeyExpired(f"{path}.data_key is past its maximum age; seal a new data key")


class OpenedDataKey:
    """An opened data key and what the server has counted against its grant since it opened
    it (the count restarts if the key leaves the cache, the grant's time limit does not)."""

    __slots__ = ("aead", "bytes", "expires", "grant", "requests")

    def __init__(self, aead: AESGCM, grant: Grant, expires: float) -> None:
        self.aead = aead
        self.grant = grant
        self.expires = expires  # server monotonic clock: first opened + maximum age
        self.requests = 0
        self.bytes = 0


# A request's memo of the keys it has charged: a batch of items under one key is one request.
RequestKeys = dict[Any, OpenedDataKey]
_CacheKey = tuple[bytes, str, bytes, bytes]


class FeatureOpener:
    """Opens request features in memory; callers drop the result when the request is done.

    Keeps up to `cache_entries` opened data keys, least recently used first out, keyed by the
    HPKE info (method and caller identity) and the exact sealed bytes, so a hit skips the HPKE
    open and a key sealed by one identity is never found for another. A key is honoured only
    within its grant: until its maximum age (from the server's first open, and never beyond
    the caller's date plus the age and the clock skew), for at most its maximum requests and
    bytes; a spent or expired key stays in the cache as a refusal until it falls out. The
    server builds a new opener, so an empty cache, whenever it reloads its keyring: a retired
    server key stops opening even for keys cached before.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        cache_entries: int = OPENED_KEY_CACHE_ENTRIES,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyring = keyring
        self._capacity = cache_entries
        self._clock = clock
        self._monotonic = monotonic
        self._cache: OrderedDict[_CacheKey, OpenedDataKey] = OrderedDict()
        self._lock = threading.Lock()
        self.hpke_opens = 0

    def open_data_key(
        self, sealed: common_pb2.SealedDataKey, info: bytes, path: str, *, at: float | None = None
    ) -> OpenedDataKey:
        """The full HPKE open, uncached: INVALID_ARGUMENT if the key does not open for this
        server key, method and caller; its grant checked at time `at` (default now)."""
        private_key = self._keyring.field_private_key(sealed.key_id)
        try:
            plaintext = SUITE.decrypt(
                sealed.encapsulated_key + sealed.sealed_key, private_key, info=info
            )
        except InvalidTag:
            raise _does_not_open(path) from None
        self.hpke_opens += 1
        if len(plaintext) != GRANT.size:
            raise _bad_grant(path, f"is not a sealing format {SEALING_FORMAT} data key")
        key, created_ms, max_age_ms, max_requests, max_bytes = GRANT.unpack(plaintext)
        grant = Grant(created_ms / 1000, max_age_ms / 1000, max_requests, max_bytes)
        if not (
            0 < grant.max_age_s <= CEILING_MAX_AGE_S
            and 0 < max_requests <= CEILING_MAX_REQUESTS
            and 0 < max_bytes <= CEILING_MAX_BYTES
        ):
            raise _bad_grant(path, "grants limits outside the allowed ranges")
        grant.check_time(self._clock() if at is None else at, path)
        return OpenedDataKey(AESGCM(key), grant, self._monotonic() + grant.max_age_s)

    def _cached(
        self, sealed: common_pb2.SealedDataKey, method: str, identity: str, path: str
    ) -> OpenedDataKey:
        info = hpke_info(method, identity)
        cache_key = (info, sealed.key_id, sealed.encapsulated_key, sealed.sealed_key)
        with self._lock:
            opened = self._cache.get(cache_key)
            if opened is not None:
                self._cache.move_to_end(cache_key)
                return opened
        opened = self.open_data_key(sealed, info, path)
        _log.debug("sealing.data_key_opened", key_id=sealed.key_id, method=method)
        with self._lock:
            opened = self._cache.setdefault(cache_key, opened)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return opened

    def _charge(self, opened: OpenedDataKey, new_request: bool, size: int, path: str) -> None:
        grant = opened.grant
        if self._monotonic() > opened.expires:
            raise DataKeyExpired(f"{path}.data_key is past its maximum age; seal a new data key")
        grant.check_time(self._clock(), path)
        with self._lock:
            if new_request and opened.requests >= grant.max_requests:
                raise DataKeyLimitReached(
                    f"{path}.data_key has served its maximum requests; seal a new data key"
                )
            if opened.bytes + size > grant.max_bytes:
                raise DataKeyLimitReached(
                    f"{path}.data_key has sealed its maximum bytes; seal a new data key"
                )
            opened.requests += new_request
            opened.bytes += size

    def open(
        self,
        features: common_pb2.EncryptedFeatures,
        subject: common_pb2.SubjectRef,
        *,
        method: str,
        identity: str,
        request_id: str,
        path: str = "features",
        opened_keys: RequestKeys | None = None,
        at: float | None = None,
    ) -> dict[str, FeatureInput]:
        """Decrypt every field; raises INVALID_ARGUMENT naming each field that fails.

        `opened_keys` is one request's memo across the items of a batch: a key charges the
        request once, and a batch sealed with one data key costs at most one HPKE open. With
        `at` (a replay of a recorded request: when it was decided), the key is opened afresh
        and its grant checked at that time, outside the cache and its counts.
        """
        sealed = features.data_key
        fields = features.fields
        aad_prefix = field_aad_prefix(features.schema_version, request_id, subject)
        if at is not None:
            try:
                aead = self.open_data_key(sealed, hpke_info(method, identity), path, at=at).aead
            except InvalidArgument as error:
                if error.violations[0].reason != "DECRYPTION_FAILED":
                    raise
                aead, aad_prefix = self._open_format1(features, subject, method, request_id, path)
        else:
            memo = (sealed.key_id, sealed.encapsulated_key, sealed.sealed_key)
            opened = None if opened_keys is None else opened_keys.get(memo)
            new_request = opened is None
            if opened is None:
                opened = self._cached(sealed, method, identity, path)
            size = sum(len(f.ciphertext) for f in fields) - TAG_BYTES * len(fields)
            self._charge(opened, new_request, max(size, 0), path)
            if opened_keys is not None:
                opened_keys[memo] = opened
            aead = opened.aead
        values: dict[str, FeatureInput] = {}
        violations = []
        decrypt = aead.decrypt
        for index, field in enumerate(fields):
            try:
                plaintext = decrypt(
                    field.nonce, field.ciphertext, field_aad(aad_prefix, field.name)
                )
            except InvalidTag:
                problem = _DOES_NOT_DECRYPT
                reason = "DECRYPTION_FAILED"
            else:
                value = decode_value(plaintext)
                if value is None:
                    problem, reason = "is not a typed FeatureValue", "MALFORMED_VALUE"
                elif isinstance(value, float) and not math.isfinite(value):
                    problem, reason = "is not a finite number", "MALFORMED_VALUE"
                else:
                    values[field.name] = value
                    continue
            violations.append(
                FieldViolation(
                    f"{path}.fields[{index}].ciphertext", f"field {field.name} {problem}", reason
                )
            )
        if violations:
            raise InvalidArgument(violations)
        return values

    def _open_format1(
        self,
        features: common_pb2.EncryptedFeatures,
        subject: common_pb2.SubjectRef,
        method: str,
        request_id: str,
        path: str,
    ) -> tuple[AESGCM, bytes]:
        """A recorded request sealed in format 1 (before data-key reuse): its data key and the
        fields' associated-data prefix. For replay only; the wire takes format 2 alone."""
        sealed = features.data_key
        info = length_prefixed(_FORMAT1_INFO_LABEL, method, request_id)
        try:
            key = SUITE.decrypt(
                sealed.encapsulated_key + sealed.sealed_key,
                self._keyring.field_private_key(sealed.key_id),
                info=info,
            )
        except InvalidTag:
            key = b""
        if len(key) != DATA_KEY_BYTES:
            raise _does_not_open(path)
        prefix = length_prefixed(
            _FORMAT1_AAD_LABEL, features.schema_version, subject.tenant, subject.pseudonym
        )
        return AESGCM(key), prefix

    @property
    def cached_keys(self) -> int:
        return len(self._cache)


def _does_not_open(path: str) -> InvalidArgument:
    return InvalidArgument(
        [
            FieldViolation(
                f"{path}.data_key",
                "does not open for this server key, method and caller",
                "DECRYPTION_FAILED",
            )
        ]
    )


def _bad_grant(path: str, problem: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(f"{path}.data_key", problem, "INVALID_DATA_KEY")])
