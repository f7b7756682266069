"""Field sealing, the server's side: opening what callers sealed (privscore/client/envelope.py,
the format's one home, has the caller's side, every label and size, and the written
specification is docs/envelope.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privscore.client.encoding import length_prefixed
from privscore.client.envelope import (
    _FORMAT1_AAD_LABEL,
    _FORMAT1_INFO_LABEL,
    CEILING_MAX_AGE_S,
    CEILING_MAX_BYTES,
    CEILING_MAX_REQUESTS,
    CLOCK_SKEW_S,
    DATA_KEY_BYTES,
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REQUESTS,
    ENCAPSULATED_KEY_BYTES,
    GRANT,
    MAX_ENCRYPTIONS_PER_KEY,
    NONCE_BYTES,
    SEALED_DATA_KEY_BYTES,
    SEALING_FORMAT,
    SUITE,
    TAG_BYTES,
    DataKey,
    DataKeyExhausted,
    FeatureInput,
    KeyLimits,
    Money,
    SealedValue,
    ServerPublicKey,
    decode_value,
    encode_value,
    field_aad,
    field_aad_prefix,
    hpke_info,
    load_public_keyset,
)
from privscore.v1 import common_pb2
from service.errors import FailedPrecondition, FieldViolation, InvalidArgument
from service.privacy.keyring import Keyring

# The caller's side, for the server's modules and tests that import it from here.
__all__ = [
    "CEILING_MAX_AGE_S",
    "CEILING_MAX_BYTES",
    "CEILING_MAX_REQUESTS",
    "CLOCK_SKEW_S",
    "DATA_KEY_BYTES",
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_REQUESTS",
    "ENCAPSULATED_KEY_BYTES",
    "GRANT",
    "MAX_ENCRYPTIONS_PER_KEY",
    "NONCE_BYTES",
    "OPENED_KEY_CACHE_ENTRIES",
    "SEALED_DATA_KEY_BYTES",
    "SEALING_FORMAT",
    "SUITE",
    "TAG_BYTES",
    "DataKey",
    "DataKeyExhausted",
    "DataKeyExpired",
    "DataKeyLimitReached",
    "DataKeyNotYetValid",
    "FeatureInput",
    "FeatureOpener",
    "Grant",
    "KeyLimits",
    "Money",
    "OpenedDataKey",
    "RequestKeys",
    "SealedValue",
    "ServerPublicKey",
    "decode_value",
    "encode_value",
    "field_aad",
    "field_aad_prefix",
    "hpke_info",
    "load_public_keyset",
]

# Opened data keys the server keeps (each about 0.9 kB with its cache key: some 3.5 MB in all).
OPENED_KEY_CACHE_ENTRIES = 4_096
_DOES_NOT_DECRYPT = "does not decrypt for this field name, request, subject and schema version"
_log = structlog.get_logger("privscore.sealing")


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
    ) -> dict[str, SealedValue]:
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
        values: dict[str, SealedValue] = {}
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
