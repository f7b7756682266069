"""Keys derived from the server's audit signing key, and keyed digests of decrypted inputs.

A reviewer holding the key can check that a replay saw the same inputs, while the log holds
no plaintext value. Keyed, because an unkeyed hash of a few small feature values could be
brute-forced back to the values.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INPUT_DIGEST_INFO = b"privscore.v1/audit-input-digest"
_STATE_INFO = b"privscore.v1/state-encryption"
_RECORD_INFO = b"privscore.v1/audit-record-sealing"


def _derive(audit_signing_key: Ed25519PrivateKey, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(
        audit_signing_key.private_bytes_raw()
    )


def derive_input_digest_key(audit_signing_key: Ed25519PrivateKey) -> bytes:
    """Derived from the audit signing key, so whoever may sign the log may also check it."""
    return _derive(audit_signing_key, _INPUT_DIGEST_INFO)


def derive_state_key(audit_signing_key: Ed25519PrivateKey) -> bytes:
    """The decision store's AES-256 key: the server's own secret, separate by HKDF label."""
    return _derive(audit_signing_key, _STATE_INFO)


def derive_record_key(audit_signing_key: Ed25519PrivateKey) -> bytes:
    """The AES-256 key of audit records' sealed fields (a person's amounts): the server's own
    secret, separate by HKDF label, so a reviewer with the keyring and KEK can open them."""
    return _derive(audit_signing_key, _RECORD_INFO)


def input_digest(key: bytes, inputs: Mapping[str, Any]) -> str:
    body = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()
