"""Caller-side pseudonymisation of customer ids: HMAC-SHA256 over tenant and raw id.

The key belongs to the calling service and never reaches privscore, so privscore (and anyone
who steals its data) cannot turn a pseudonym back into a customer: re-identification needs the
caller's key and a candidate raw id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from privscore.client.encoding import length_prefixed

PSEUDONYM_SHAPE = re.compile(r"[0-9a-f]{64}")
KEY_BYTES = 32
_LABEL = b"privscore.v1/pseudonym\x00"


class Pseudonymiser:
    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"pseudonymisation key must be at least {KEY_BYTES} bytes")
        self._key = key

    def pseudonym(self, tenant: str, raw_customer_id: str) -> str:
        """64 lowercase hex characters; the same tenant and id always give the same pseudonym."""
        if not raw_customer_id:
            raise ValueError("customer id must not be empty")
        message = length_prefixed(_LABEL, tenant, raw_customer_id)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymiser:
        return cls(path.read_bytes())
