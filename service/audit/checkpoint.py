"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed-note envelopes, Ed25519.

    privscore.audit/instance-1          origin
    1042                                tree size
    Q2Zy...b9w=                         base64 root hash
                                        blank line
    — <key name> base64(key ID || Ed25519 signature over the three body lines)

The key ID is the first 4 bytes of SHA-256(key name || 0x0A || 0x01 || public key). A verifier
holds only the public key, so a signature line is "ours" when its key ID matches the ID our key
would have under the name on that line; per the signed-note spec, other lines are ignored, a
failing line of ours rejects the whole note, and a note with no line of ours is rejected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.audit.errors import AuditError
from service.audit.merkle import HASH_SIZE

SIGNATURE_PREFIX = "\u2014 "
ED25519_SIGNATURE_TYPE = b"\x01"
MAX_NOTE_CHARS = 64 * 1024
MAX_SIGNATURES = 100  # the spec requires accepting at least 16
_TREE_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


class CheckpointError(AuditError, ValueError):
    """A checkpoint is malformed, from another log, or not signed by the expected key."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose signature has been verified; `text` is the signed note as written."""

    origin: str
    size: int
    root_hash: bytes
    text: str


def key_id(key_name: str, public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(key_name.encode() + b"\n" + ED25519_SIGNATURE_TYPE + raw).digest()[:4]


def _b64decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise CheckpointError(f"{what} is not base64") from None
    if base64.b64encode(raw).decode() != text:
        raise CheckpointError(f"{what} is not canonical base64")
    return raw


def check_key_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() or ord(c) < 0x20 for c in name):
        raise CheckpointError("a key name must be non-empty, without spaces or '+'")


def check_origin(origin: str) -> None:
    if not origin or any(ord(c) < 0x20 for c in origin):
        raise CheckpointError("an origin must be one non-empty line")


def format_checkpoint(
    origin: str, size: int, root_hash: bytes, *, key_name: str, signing_key: Ed25519PrivateKey
) -> str:
    """The signed note for a tree of `size` leaves with `root_hash`."""
    check_origin(origin)
    check_key_name(key_name)
    if len(root_hash) != HASH_SIZE or not _TREE_SIZE.fullmatch(str(size)):
        raise CheckpointError("a checkpoint needs a tree size and a 32-byte root hash")
    body = f"{origin}\n{size}\n{base64.b64encode(root_hash).decode()}\n"
    signature = key_id(key_name, signing_key.public_key()) + signing_key.sign(body.encode())
    return f"{body}\n{SIGNATURE_PREFIX}{key_name} {base64.b64encode(signature).decode()}\n"


def split_note(text: str) -> tuple[str, list[str]]:
    """The note text (with its final newline) and its signature lines; checks only the shape."""
    if len(text) > MAX_NOTE_CHARS:
        raise CheckpointError("note is too long")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise CheckpointError("note contains control characters")
    if not text.endswith("\n"):
        raise CheckpointError("note does not end with a newline")
    # The text is separated from the signatures by the last blank line.
    split = text.rfind("\n\n")
    if split < 0:
        raise CheckpointError("note has no signatures")
    lines = text[split + 2 : -1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError("note has too many signatures")
    return text[: split + 1], lines


def parse_body(body: str) -> tuple[str, int, bytes]:
    """(origin, tree size, root hash) of a checkpoint body; says nothing about who signed it."""
    lines = body[:-1].split("\n") if body.endswith("\n") else []
    if len(lines) != 3:
        raise CheckpointError("checkpoint body must be exactly origin, tree size and root hash")
    origin, size, root = lines
    check_origin(origin)
    if not _TREE_SIZE.fullmatch(size):
        raise CheckpointError("tree size is not a decimal number without leading zeros")
    root_hash = _b64decode(root, "root hash")
    if len(root_hash) != HASH_SIZE:
        raise CheckpointError("root hash is not 32 bytes")
    return origin, int(size), root_hash


def parse_checkpoint(text: str, public_key: Ed25519PublicKey, origin: str) -> Checkpoint:
    """Verify `text` is a checkpoint of log `origin` signed by `public_key`, and parse it."""
    body, signature_lines = split_note(text)
    verified = False
    for line in signature_lines:
        fields = line.removeprefix(SIGNATURE_PREFIX).split(" ")
        if not line.startswith(SIGNATURE_PREFIX) or len(fields) != 2:
            raise CheckpointError("malformed signature line")
        name, encoded = fields
        check_key_name(name)
        signature = _b64decode(encoded, "signature")
        if len(signature) < 5:
            raise CheckpointError("signature too short")
        if signature[:4] != key_id(name, public_key):
            continue  # someone else's signature, e.g. a witness: ignored, as the spec requires
        try:
            public_key.verify(signature[4:], body.encode())
        except InvalidSignature:
            raise CheckpointError(f"signature by {name!r} does not verify") from None
        verified = True
    if not verified:
        raise CheckpointError("checkpoint is not signed by the expected key")
    checkpoint_origin, size, root_hash = parse_body(body)
    if checkpoint_origin != origin:
        raise CheckpointError(f"checkpoint is for log {checkpoint_origin!r}, not {origin!r}")
    return Checkpoint(origin=origin, size=size, root_hash=root_hash, text=text)
