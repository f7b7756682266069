"""Sealed fields of an audit record: a person's amounts, readable only with the server's keys.

The audit log is read by reviewers, exported and proven to third parties; a customer's
balances, limits and purchase amounts are personal financial data and must not sit in it in
clear. A record keeps what a reviewer needs to read (decision, action, rule, reason codes,
score, currency, ids and times) and seals the rest into one field, `sealed`: AES-256-GCM under
the record key (`derive_record_key`), a fresh 12-byte nonce, and associated data binding the
RPC, decision id and request id, so sealed fields moved to another record do not open.
Encoded as base64 of nonce || ciphertext; the plaintext is a JSON object.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privscore.client.encoding import length_prefixed

SEALED = "sealed"  # the record field that holds the sealed payload
_LABEL = b"privscore.v1/audit-record-sealed\x00"
_NONCE_BYTES = 12
_TAG_BYTES = 16


class RecordSealError(ValueError):
    """A record's sealed fields do not open: wrong key, moved from another record, or altered."""


def _aead(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise ValueError("the record key is 32 bytes (AES-256)")
    return AESGCM(key)


def _associated_data(rpc: str, decision_id: str, request_id: str) -> bytes:
    return length_prefixed(_LABEL, rpc, decision_id, request_id)


def seal_record_fields(
    key: bytes, rpc: str, decision_id: str, request_id: str, payload: Mapping[str, Any]
) -> str:
    """`payload` (JSON-serialisable) sealed to one record's identity, as base64 text."""
    plaintext = json.dumps(
        dict(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = _aead(key).encrypt(
        nonce, plaintext, _associated_data(rpc, decision_id, request_id)
    )
    return base64.b64encode(nonce + ciphertext).decode("ascii")


def open_record_fields(
    key: bytes, rpc: str, decision_id: str, request_id: str, sealed: str
) -> dict[str, Any]:
    """The payload `seal_record_fields` sealed for this identity, or RecordSealError."""
    try:
        blob = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise RecordSealError(f"sealed fields of decision {decision_id} are not base64") from None
    if len(blob) < _NONCE_BYTES + _TAG_BYTES:
        raise RecordSealError(f"sealed fields of decision {decision_id} are too short")
    try:
        plaintext = _aead(key).decrypt(
            blob[:_NONCE_BYTES],
            blob[_NONCE_BYTES:],
            _associated_data(rpc, decision_id, request_id),
        )
    except InvalidTag:
        raise RecordSealError(
            f"sealed fields of decision {decision_id} do not open: wrong key (another server's "
            "keyring?), or moved from another record, or altered"
        ) from None
    try:
        payload = json.loads(plaintext)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise RecordSealError(f"sealed fields of decision {decision_id} are not a JSON object")
    return payload


class Shredded(RecordSealError):
    """The record's personal fields were sealed under a subject key that is destroyed (the
    subject erased, or the period past retention): they can never be read again."""


def open_personal(
    record: Mapping[str, Any],
    *,
    record_key: bytes,
    subject_key: Callable[[str], bytes | None],
) -> dict[str, Any]:
    """A decision record's personal fields, whatever its format: the subject's pseudonym,
    the input digest, the encrypted inputs and the sealed payload (amounts, the stored reply).

    Format 3 seals them all under the subject key the record names (`subject_key(key_id)`,
    None once destroyed: Shredded); earlier formats kept the first three in clear and sealed
    the payload under the server's record key."""
    key_id = record.get("subject_key")
    if key_id is None and isinstance(record.get("format"), int) and record["format"] >= 3:
        # The format, not the key's absence, says how to read it: a format-3 record edited
        # into an older shape must not be read from clear fields.
        raise RecordSealError(
            f"the record of decision {record.get('decision_id')} names no subject key"
        )
    if key_id is None:
        payload = open_record(record_key, record) if SEALED in record else {}
        clear = {
            name: record[name]
            for name in ("subject", "input_digest", "encrypted_inputs")
            if name in record
        }
        return {**clear, **payload}
    key = subject_key(str(key_id))
    if key is None:
        raise Shredded(
            f"the personal fields of decision {record.get('decision_id')} are sealed under a "
            "destroyed subject key (erased, or past retention)"
        )
    return open_record(key, record)


def open_record(key: bytes, record: Mapping[str, Any]) -> dict[str, Any]:
    """The opened `sealed` field of an audit record, checked against the record's own identity."""
    sealed = record.get(SEALED)
    identity = [record.get(name) for name in ("rpc", "decision_id", "request_id")]
    if not isinstance(sealed, str):
        raise RecordSealError(f"the record of decision {identity[1]} has no sealed fields")
    if not all(isinstance(part, str) for part in identity):
        raise RecordSealError("the record lacks its rpc, decision_id or request_id")
    rpc, decision_id, request_id = (str(part) for part in identity)
    return open_record_fields(key, rpc, decision_id, request_id, sealed)
