"""Keys derived from the server's secret (`Keyring.server_secret`), and keyed digests of
decrypted inputs. Each key is separate by its HKDF label; none changes when the audit signing
key rotates.

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
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INPUT_DIGEST_INFO = b"privscore.v1/audit-input-digest"
_STATE_INFO = b"privscore.v1/state-encryption"
_AUDIT_MAC_INFO = b"privscore.v1/audit-record-mac"
_RECORD_INFO = b"privscore.v1/audit-record-sealing"


def _derive(server_secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(server_secret)


def derive_input_digest_key(server_secret: bytes) -> bytes:
    """The key of the audit records' input digests: whoever holds the server's secret can
    check that a replay saw the same inputs."""
    return _derive(server_secret, _INPUT_DIGEST_INFO)


def derive_state_key(server_secret: bytes) -> bytes:
    """The decision store's AES-256 key: the server's own secret, separate by HKDF label."""
    return _derive(server_secret, _STATE_INFO)


def derive_record_key(server_secret: bytes) -> bytes:
    """The AES-256 key of audit records' sealed fields (a person's amounts): the server's own
    secret, separate by HKDF label, so a reviewer with the keyring and KEK can open them."""
    return _derive(server_secret, _RECORD_INFO)


def input_digest(key: bytes, inputs: Mapping[str, Any]) -> str:
    body = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


def derive_audit_mac_key(server_secret: bytes) -> bytes:
    """The key of the audit records' MACs: only the server can make one, so a record appended
    by anyone else is refused."""
    return _derive(server_secret, _AUDIT_MAC_INFO)
