"""Field sealing, both ends: callers seal, the server opens.

A caller draws a fresh AES-256 data key per request (or per batch) and seals it to the
server's primary X25519 key with HPKE (RFC 9180: DHKEM(X25519), HKDF-SHA256, AES-256-GCM),
with the RPC method and request id as HPKE `info`. Each feature value is then encrypted under
the data key with AES-256-GCM, a fresh 12-byte nonce, and associated data binding the schema
version, the subject (tenant and pseudonym) and the field name. Values are typed
`FeatureValue` protobufs, so their encoding is unambiguous.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from privscore.v1 import common_pb2
from service.errors import FieldViolation, InvalidArgument
from service.privacy.encoding import length_prefixed
from service.privacy.keyring import Keyring

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
ENCAPSULATED_KEY_BYTES = hpke.KEM.X25519.enc_length()
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
_INFO_LABEL = b"privscore.v1/data-key\x00"
_AAD_LABEL = b"privscore.v1/field\x00"

FeatureInput = float | int | str | bool


def hpke_info(method: str, request_id: str) -> bytes:
    """HPKE info: a data key sealed for one call opens for no other method or request id."""
    return length_prefixed(_INFO_LABEL, method, request_id)


def field_aad_prefix(schema_version: str, subject: common_pb2.SubjectRef) -> bytes:
    """The associated data every field of one subject's features shares; `field_aad` adds the
    field name. Split so a request's 18 fields encode the shared part once."""
    return length_prefixed(_AAD_LABEL, schema_version, subject.tenant, subject.pseudonym)


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


class DataKey:
    """A fresh data key sealed to the server for one request (or one batch)."""

    def __init__(self, server_key: ServerPublicKey, method: str, request_id: str) -> None:
        key = AESGCM.generate_key(bit_length=8 * DATA_KEY_BYTES)
        sealed = SUITE.encrypt(key, server_key.public_key, info=hpke_info(method, request_id))
        self.sealed = common_pb2.SealedDataKey(
            key_id=server_key.key_id,
            encapsulated_key=sealed[:ENCAPSULATED_KEY_BYTES],
            sealed_key=sealed[ENCAPSULATED_KEY_BYTES:],
        )
        self._aead = AESGCM(key)

    def seal(
        self,
        schema_version: str,
        subject: common_pb2.SubjectRef,
        values: Mapping[str, FeatureInput],
    ) -> common_pb2.EncryptedFeatures:
        return self.seal_encoded(
            schema_version, subject, [(name, encode_value(v)) for name, v in values.items()]
        )

    def seal_encoded(
        self,
        schema_version: str,
        subject: common_pb2.SubjectRef,
        plaintexts: Sequence[tuple[str, bytes]],
    ) -> common_pb2.EncryptedFeatures:
        """Seal already-encoded plaintexts (tests use it to send malformed ones)."""
        fields = []
        aad_prefix = field_aad_prefix(schema_version, subject)
        for name, plaintext in plaintexts:
            nonce = secrets.token_bytes(NONCE_BYTES)
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


class FeatureOpener:
    """Opens request features in memory; callers drop the result when the request is done."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def open_data_key(self, sealed: common_pb2.SealedDataKey, info: bytes, path: str) -> AESGCM:
        private_key = self._keyring.field_private_key(sealed.key_id)
        try:
            key = SUITE.decrypt(sealed.encapsulated_key + sealed.sealed_key, private_key, info=info)
        except InvalidTag:
            raise InvalidArgument(
                [
                    FieldViolation(
                        f"{path}.data_key",
                        "does not open for this server key, method and request id",
                        "DECRYPTION_FAILED",
                    )
                ]
            ) from None
        return AESGCM(key)

    def open(
        self,
        features: common_pb2.EncryptedFeatures,
        subject: common_pb2.SubjectRef,
        *,
        method: str,
        request_id: str,
        path: str = "features",
        opened_keys: dict[bytes, AESGCM] | None = None,
    ) -> dict[str, FeatureInput]:
        """Decrypt every field; raises INVALID_ARGUMENT naming each field that fails.

        `opened_keys` caches data keys across the items of one batch, so a batch sealed with
        one data key costs one HPKE open.
        """
        sealed = features.data_key
        if opened_keys is None:  # a single request: nothing to share the key with
            aead = self.open_data_key(sealed, hpke_info(method, request_id), path)
        else:
            cache_key = sealed.SerializeToString(deterministic=True)
            cached = opened_keys.get(cache_key)
            if cached is None:
                cached = self.open_data_key(sealed, hpke_info(method, request_id), path)
                opened_keys[cache_key] = cached
            aead = cached
        values: dict[str, FeatureInput] = {}
        violations = []
        aad_prefix = field_aad_prefix(features.schema_version, subject)
        decrypt = aead.decrypt
        for index, field in enumerate(features.fields):
            try:
                plaintext = decrypt(
                    field.nonce, field.ciphertext, field_aad(aad_prefix, field.name)
                )
            except InvalidTag:
                problem = "does not decrypt for this field name, subject and schema version"
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
