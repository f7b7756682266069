"""The server's keyring: X25519 keys that callers seal data keys to, the audit signing key, and
the server's secret (from which the keys of its own records derive: store rows, audit record
MACs and sealed fields, input digests).

Private keys rest wrapped (AES-256-GCM) under a key-encryption key (KEK) that the server is
given by environment or file and that is never written into the keyring. One field-encryption
key is primary (callers seal new requests to it); older ones still open requests until they are
retired; a retired key opens nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from privscore.client.encoding import length_prefixed
from service.errors import FailedPrecondition
from service.files import create_private, write_private

KEK_ENV = "PRIVSCORE_KEK"
KEK_BYTES = 32
KEYRING_FORMAT = 1
FIELD_ENCRYPTION: Final = "field-encryption"
AUDIT_SIGNING: Final = "audit-signing"
SERVER_SECRET: Final = "server-secret"
SERVER_SECRET_BYTES = 32
Purpose = Literal["field-encryption", "audit-signing", "server-secret"]
Status = Literal["primary", "active", "retired"]
_WRAP_LABEL = b"privscore.v1/keyring\x00"


class KeyringError(Exception):
    """The keyring or KEK is missing, malformed or does not match; names no secret."""


class UnknownKeyError(FailedPrecondition):
    reason = "KEY_UNKNOWN"


class RetiredKeyError(FailedPrecondition):
    reason = "KEY_RETIRED"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def load_kek(kek_file: Path, environ: dict[str, str] | None = None) -> bytes:
    """The KEK from PRIVSCORE_KEK (base64) if set, else from `kek_file` (base64 text)."""
    env = os.environ if environ is None else environ
    source = f"environment {KEK_ENV}" if KEK_ENV in env else f"file {kek_file}"
    try:
        text = env[KEK_ENV] if KEK_ENV in env else kek_file.read_text(encoding="ascii")
        kek = base64.b64decode(text.strip(), validate=True)
    except FileNotFoundError:
        raise KeyringError(f"no KEK: set {KEK_ENV} or create {kek_file}") from None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise KeyringError(f"KEK in {source} is not base64") from None
    if len(kek) != KEK_BYTES:
        raise KeyringError(f"KEK in {source} must decode to {KEK_BYTES} bytes")
    return kek


def create_kek_file(path: Path) -> None:
    """A fresh dev KEK, owner-readable only. Production passes the KEK by environment."""
    create_private(path, (_b64(secrets.token_bytes(KEK_BYTES)) + "\n").encode("ascii"))


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    purpose: Purpose
    status: Status
    created_at: str
    public_key: bytes
    wrapped_private_key: bytes  # 12-byte nonce || AES-GCM ciphertext of the raw private key
    retired_at: str | None = None

    @property
    def made_at(self) -> dt.datetime:
        """`created_at` as an aware UTC datetime (the keyring writes ISO 8601 with a Z)."""
        made = dt.datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))
        return made if made.tzinfo else made.replace(tzinfo=dt.UTC)

    @property
    def fingerprint(self) -> str:
        """A short public-key digest to compare keys by eye; reveals nothing secret."""
        return hashlib.sha256(self.public_key).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "purpose": self.purpose,
            "status": self.status,
            "created_at": self.created_at,
            "retired_at": self.retired_at,
            "public_key": _b64(self.public_key),
            "wrapped_private_key": _b64(self.wrapped_private_key),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyEntry:
        return cls(
            key_id=data["key_id"],
            purpose=data["purpose"],
            status=data["status"],
            created_at=data["created_at"],
            retired_at=data.get("retired_at"),
            public_key=_unb64(data["public_key"]),
            wrapped_private_key=_unb64(data["wrapped_private_key"]),
        )


def _wrap_aad(key_id: str, purpose: str) -> bytes:
    return length_prefixed(_WRAP_LABEL, key_id, purpose)


class Keyring:
    """Keys by id; private keys are unwrapped into memory once, at load."""

    def __init__(self, path: Path, kek: bytes, entries: list[KeyEntry]) -> None:
        self.path = path
        self._kek = AESGCM(kek)
        self.entries = entries
        self._field_keys: dict[str, x25519.X25519PrivateKey] = {}
        self._audit_keys: dict[str, ed25519.Ed25519PrivateKey] = {}
        self._server_secret: bytes | None = None
        for entry in entries:
            if entry.status == "retired":
                continue
            raw = self._unwrap(entry)
            if entry.purpose == FIELD_ENCRYPTION:
                self._field_keys[entry.key_id] = x25519.X25519PrivateKey.from_private_bytes(raw)
            elif entry.purpose == SERVER_SECRET:
                self._server_secret = raw
            else:
                self._audit_keys[entry.key_id] = ed25519.Ed25519PrivateKey.from_private_bytes(raw)

    # -- loading and saving -------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, kek: bytes) -> Keyring:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyringError(f"no keyring at {path}: run `privscore keys init`") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise KeyringError(f"keyring {path} is not valid JSON") from None
        if data.get("format") != KEYRING_FORMAT:
            raise KeyringError(f"keyring {path} has an unknown format")
        try:
            entries = [KeyEntry.from_json(item) for item in data["keys"]]
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise KeyringError(f"keyring {path} has a malformed key entry") from None
        return cls(path, kek, entries)

    @classmethod
    def create(cls, path: Path, kek: bytes) -> Keyring:
        """A new keyring with one primary key of each purpose; refuses to overwrite."""
        if path.exists():
            raise KeyringError(f"keyring {path} already exists")
        keyring = cls(path, kek, [])
        keyring._add(FIELD_ENCRYPTION)
        keyring._add(AUDIT_SIGNING)
        keyring._add(SERVER_SECRET)
        keyring.save()
        return keyring

    def save(self) -> None:
        """Write atomically (temp file, fsync, rename, directory fsync), owner-readable only."""
        body = json.dumps(
            {"format": KEYRING_FORMAT, "keys": [e.to_json() for e in self.entries]}, indent=2
        )
        write_private(self.path, (body + "\n").encode("utf-8"))

    # -- management -----------------------------------------------------------------------

    def rotate(self, purpose: Purpose = FIELD_ENCRYPTION) -> KeyEntry:
        """Make a new primary key; the old primary stays active (it still decrypts).

        For field keys. The audit signing key rotates with `add_audit_key` and
        `promote_audit_key`, around a rotation record in the log (`privscore audit rotate-key`).
        """
        self.entries = [
            replace(e, status="active") if e.purpose == purpose and e.status == "primary" else e
            for e in self.entries
        ]
        entry = self._add(purpose)
        self.save()
        return entry

    def retire(self, key_id: str) -> KeyEntry:
        """Stop a non-primary key from opening anything; its wrapped copy stays for reviewers."""
        entry = self._entry(key_id)
        if entry.status == "primary":
            raise KeyringError(f"key {key_id} is primary: rotate before retiring it")
        retired = replace(entry, status="retired", retired_at=_now())
        self.entries = [retired if e.key_id == key_id else e for e in self.entries]
        self._field_keys.pop(key_id, None)
        self._audit_keys.pop(key_id, None)
        self.save()
        return retired

    def rewrap(self, new_kek: bytes) -> None:
        """Wrap every key, retired ones included, under `new_kek` and save: the KEK rotates,
        the keys do not. The old KEK opens nothing afterwards."""
        if len(new_kek) != KEK_BYTES:
            raise KeyringError(f"the new KEK must be {KEK_BYTES} bytes")
        new_aead = AESGCM(new_kek)
        rewrapped = []
        for entry in self.entries:
            raw = self._unwrap(entry)
            nonce = secrets.token_bytes(12)
            wrapped = nonce + new_aead.encrypt(nonce, raw, _wrap_aad(entry.key_id, entry.purpose))
            rewrapped.append(replace(entry, wrapped_private_key=wrapped))
        self.entries = rewrapped
        self._kek = new_aead
        self.save()

    def listing(self) -> list[dict[str, str | None]]:
        """What `privscore keys list` shows: ids, purposes, states, dates, fingerprints."""
        return [
            {
                "key_id": e.key_id,
                "purpose": e.purpose,
                "status": e.status,
                "created_at": e.created_at,
                "retired_at": e.retired_at,
                "fingerprint": e.fingerprint,
            }
            for e in self.entries
        ]

    # -- use --------------------------------------------------------------------------------

    def field_private_key(self, key_id: str) -> x25519.X25519PrivateKey:
        """The private key a data key was sealed to; FAILED_PRECONDITION if unknown or retired."""
        key = self._field_keys.get(key_id)
        if key is not None:
            return key
        if any(e.key_id == key_id and e.purpose == FIELD_ENCRYPTION for e in self.entries):
            raise RetiredKeyError(f"key id {key_id} is retired; seal to a current key")
        raise UnknownKeyError(f"key id {key_id} is not in the server's keyring")

    def primary(self, purpose: Purpose) -> KeyEntry:
        return next(e for e in self.entries if e.purpose == purpose and e.status == "primary")

    def audit_signing_key(self) -> tuple[str, ed25519.Ed25519PrivateKey]:
        entry = self.primary(AUDIT_SIGNING)
        return entry.key_id, self._audit_keys[entry.key_id]

    def pending_audit_key(self) -> tuple[str, ed25519.Ed25519PrivateKey] | None:
        """A new audit signing key made for a rotation that has not been promoted yet."""
        entry = next(
            (e for e in self.entries if e.purpose == AUDIT_SIGNING and e.status == "active"), None
        )
        return (entry.key_id, self._audit_keys[entry.key_id]) if entry else None

    def add_audit_key(self) -> tuple[str, ed25519.Ed25519PrivateKey]:
        """Make and save a new audit signing key, not yet in use: saved first, so that a log
        handed to it can never name a key nobody holds."""
        entry = self._add(AUDIT_SIGNING, status="active")
        self.save()
        return entry.key_id, self._audit_keys[entry.key_id]

    def promote_audit_key(self, key_id: str) -> None:
        """Sign with `key_id` from now on; the old signing key is retired (its wrapped copy
        stays, and the log's rotation record keeps its public key for verifiers)."""
        entry = self._entry(key_id)
        if entry.purpose != AUDIT_SIGNING or entry.status != "active":
            raise KeyringError(f"key {key_id} is not a new audit signing key")
        now = _now()
        self.entries = [
            replace(e, status="retired", retired_at=now)
            if e.purpose == AUDIT_SIGNING and e.status == "primary"
            else replace(e, status="primary")
            if e.key_id == key_id
            else e
            for e in self.entries
        ]
        self._audit_keys = {key_id: self._audit_keys[key_id]}
        self.save()

    def server_secret(self) -> bytes:
        """The secret the server's own record keys derive from. It does not change when the
        audit signing key rotates. A keyring made before it existed keeps deriving them from
        its first audit signing key, as it always did, so existing stores and logs still open."""
        if self._server_secret is not None:
            return self._server_secret
        first = next(e for e in self.entries if e.purpose == AUDIT_SIGNING)
        return self._unwrap(first)

    def public_keyset(self) -> dict[str, Any]:
        """What callers need to seal to the server: current field keys, primary first."""
        usable = [
            e for e in self.entries if e.purpose == FIELD_ENCRYPTION and e.status != "retired"
        ]
        usable.sort(key=lambda e: e.status != "primary")
        return {
            "format": KEYRING_FORMAT,
            "keys": [
                {
                    "key_id": e.key_id,
                    "public_key": _b64(e.public_key),
                    "primary": e.status == "primary",
                }
                for e in usable
            ],
        }

    # -- internals ----------------------------------------------------------------------------

    def _entry(self, key_id: str) -> KeyEntry:
        for entry in self.entries:
            if entry.key_id == key_id:
                return entry
        raise KeyringError(f"no key {key_id} in the keyring")

    def _unwrap(self, entry: KeyEntry) -> bytes:
        nonce, ciphertext = entry.wrapped_private_key[:12], entry.wrapped_private_key[12:]
        try:
            return self._kek.decrypt(nonce, ciphertext, _wrap_aad(entry.key_id, entry.purpose))
        except InvalidTag:
            raise KeyringError(
                f"key {entry.key_id} does not unwrap: wrong KEK or tampered keyring"
            ) from None

    def _add(self, purpose: Purpose, status: Status = "primary") -> KeyEntry:
        prefix = {FIELD_ENCRYPTION: "fk", AUDIT_SIGNING: "ak", SERVER_SECRET: "ss"}[purpose]
        key_id = f"{prefix}-{dt.datetime.now(dt.UTC):%Y%m%d}-{secrets.token_hex(4)}"
        raw_public: bytes
        if purpose == SERVER_SECRET:
            raw_private = self._server_secret = secrets.token_bytes(SERVER_SECRET_BYTES)
            raw_public = b""
        elif purpose == FIELD_ENCRYPTION:
            field_key = x25519.X25519PrivateKey.generate()
            raw_private = field_key.private_bytes_raw()
            raw_public = field_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self._field_keys[key_id] = field_key
        else:
            audit_key = ed25519.Ed25519PrivateKey.generate()
            raw_private = audit_key.private_bytes_raw()
            raw_public = audit_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self._audit_keys[key_id] = audit_key
        nonce = secrets.token_bytes(12)
        wrapped = nonce + self._kek.encrypt(nonce, raw_private, _wrap_aad(key_id, purpose))
        entry = KeyEntry(key_id, purpose, status, _now(), raw_public, wrapped)
        self.entries.append(entry)
        return entry
