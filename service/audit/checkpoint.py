"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed-note envelopes, Ed25519.

    privscore.audit/3f9a1c2e7b4d5a60    origin (one per deployment)
    1042                                tree size
    Q2Zy...b9w=                         base64 root hash
    [extension lines]                   allowed by tlog-checkpoint, signed, not interpreted
                                        blank line
    — <key name> base64(key ID || Ed25519 signature over the body lines)

The key ID is the first 4 bytes of SHA-256(key name || 0x0A || 0x01 || public key). A verifier
holds a *verifier key* in the signed-note text form `<name>+<hex key ID>+<base64(0x01 || public
key)>`, so it knows the name as well as the key: a signature line is "ours" when it carries that
name and that key ID. Per the signed-note spec, other lines are ignored, a failing line of ours
rejects the whole note, and a note with no line of ours is rejected. A witness names the log's
key by the log's origin, so privscore signs under its origin as the key name.

A key rotation is a statement naming the old and the new verifier key and the sequence of the
log record that carries it, signed by both keys (`rotation_statement`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
class VerifierKey:
    """A named Ed25519 public key, as a signed-note verifier knows it."""

    name: str
    public_key: Ed25519PublicKey

    def __post_init__(self) -> None:
        check_key_name(self.name)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    @property
    def text(self) -> str:
        """The signed-note verifier key: `name+hex key ID+base64(0x01 || public key)`."""
        raw = self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        encoded = base64.b64encode(ED25519_SIGNATURE_TYPE + raw).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Read a verifier key; its key ID must be the one its name and key give."""
        name, _, rest = text.strip().partition("+")
        hex_id, _, encoded = rest.partition("+")
        raw = _b64decode(encoded, "verifier key")
        if len(raw) != 33 or raw[:1] != ED25519_SIGNATURE_TYPE:
            raise CheckpointError("verifier key is not an Ed25519 key in signed-note form")
        verifier = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if verifier.key_id.hex() != hex_id:
            raise CheckpointError("verifier key's ID does not match its name and key")
        return verifier

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifierKey) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)


@dataclass(frozen=True)
class Signer:
    """A named Ed25519 private key that signs notes."""

    name: str
    key: Ed25519PrivateKey

    @property
    def verifier(self) -> VerifierKey:
        return VerifierKey(self.name, self.key.public_key())

    def signature_line(self, text: bytes) -> str:
        signature = self.verifier.key_id + self.key.sign(text)
        return f"{SIGNATURE_PREFIX}{self.name} {base64.b64encode(signature).decode()}\n"


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
    origin: str, size: int, root_hash: bytes, *, signers: Sequence[Signer]
) -> str:
    """The signed note for a tree of `size` leaves with `root_hash`, one line per signer."""
    check_origin(origin)
    if not signers:
        raise CheckpointError("a checkpoint needs at least one signer")
    if len(root_hash) != HASH_SIZE or not _TREE_SIZE.fullmatch(str(size)):
        raise CheckpointError("a checkpoint needs a tree size and a 32-byte root hash")
    body = f"{origin}\n{size}\n{base64.b64encode(root_hash).decode()}\n"
    return body + "\n" + "".join(signer.signature_line(body.encode()) for signer in signers)


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
    """(origin, tree size, root hash) of a checkpoint body; says nothing about who signed it.
    Extension lines after the root hash are allowed (tlog-checkpoint), but none may be empty."""
    lines = body[:-1].split("\n") if body.endswith("\n") else []
    if len(lines) < 3 or not all(lines[3:]):
        raise CheckpointError(
            "checkpoint body must be origin, tree size, root hash and non-empty extension lines"
        )
    origin, size, root = lines[:3]
    check_origin(origin)
    if not _TREE_SIZE.fullmatch(size):
        raise CheckpointError("tree size is not a decimal number without leading zeros")
    root_hash = _b64decode(root, "root hash")
    if len(root_hash) != HASH_SIZE:
        raise CheckpointError("root hash is not 32 bytes")
    return origin, int(size), root_hash


def signer_names(text: str) -> list[str]:
    """The key names on a note's signature lines, unverified: to say who signed a foreign note."""
    return [line.removeprefix(SIGNATURE_PREFIX).split(" ")[0] for line in split_note(text)[1]]


def parse_checkpoint(
    text: str, verifiers: VerifierKey | Sequence[VerifierKey], origin: str
) -> Checkpoint:
    """Verify `text` is a checkpoint of log `origin` signed by one of `verifiers` (name and
    key), and parse it."""
    ours = {v.key_id: v for v in ([verifiers] if isinstance(verifiers, VerifierKey) else verifiers)}
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
        verifier = ours.get(signature[:4])
        if verifier is None or verifier.name != name:
            continue  # someone else's signature, e.g. a witness: ignored, as the spec requires
        try:
            verifier.public_key.verify(signature[4:], body.encode())
        except InvalidSignature:
            raise CheckpointError(f"signature by {name!r} does not verify") from None
        verified = True
    if not verified:
        raise CheckpointError("checkpoint is not signed by the expected key")
    checkpoint_origin, size, root_hash = parse_body(body)
    if checkpoint_origin != origin:
        raise CheckpointError(f"checkpoint is for log {checkpoint_origin!r}, not {origin!r}")
    return Checkpoint(origin=origin, size=size, root_hash=root_hash, text=text)


ROTATION_LABEL = "privscore.v1/audit-key-rotation"


def rotation_statement(origin: str, sequence: int, old: VerifierKey, new: VerifierKey) -> bytes:
    """What both keys of a rotation sign: the log, the record that carries the rotation, and
    the two verifier keys. Checkpoints of more than `sequence` records are signed by `new`."""
    return f"{ROTATION_LABEL}\n{origin}\n{sequence}\n{old.text}\n{new.text}\n".encode()


def check_rotation(
    origin: str, sequence: int, old_text: object, new_text: object, signatures: object
) -> tuple[VerifierKey, VerifierKey]:
    """(old, new) of a rotation record whose statement both keys signed; else CheckpointError."""
    if not (isinstance(old_text, str) and isinstance(new_text, str)):
        raise CheckpointError("a key rotation names its old and new verifier keys")
    old, new = VerifierKey.parse(old_text), VerifierKey.parse(new_text)
    if not (isinstance(signatures, list) and len(signatures) == 2):
        raise CheckpointError("a key rotation carries two signatures, the old key's and the new")
    statement = rotation_statement(origin, sequence, old, new)
    for verifier, encoded in zip((old, new), signatures, strict=True):
        if not isinstance(encoded, str):
            raise CheckpointError("a key rotation's signature is not base64")
        try:
            verifier.public_key.verify(_b64decode(encoded, "rotation signature"), statement)
        except InvalidSignature:
            raise CheckpointError(
                f"the key rotation is not signed by {verifier.text.split('+')[0]!r} key "
                f"{verifier.key_id.hex()}"
            ) from None
    return old, new


ROTATE_KEY_RPC = "privscore.audit/RotateKey"
# Cheap pre-filter for a pass over stored envelopes: a rotation record's envelope holds these
# bytes (a value that quotes them holds them escaped); `rotation_in` decides on the parsed record.
ROTATION_MARK = b'"rpc":"' + ROTATE_KEY_RPC.encode() + b'"'


def rotation_record(
    origin: str, sequence: int, old: Signer, new: Signer, time: str
) -> dict[str, object]:
    """The log record that hands the log from `old` to `new`, signed by both."""
    statement = rotation_statement(origin, sequence, old.verifier, new.verifier)
    return {
        "rpc": ROTATE_KEY_RPC,
        "time": time,
        "old_key": old.verifier.text,
        "new_key": new.verifier.text,
        "signatures": [
            base64.b64encode(signer.key.sign(statement)).decode() for signer in (old, new)
        ],
    }


def rotation_in(origin: str, sequence: int, record: Mapping[str, Any]) -> VerifierKey | None:
    """The key a log record at `sequence` hands the log to, once both keys' signatures check
    (CheckpointError if they do not); None for a record that is no key rotation."""
    if record.get("rpc") != ROTATE_KEY_RPC:
        return None
    _, new = check_rotation(
        origin, sequence, record.get("old_key"), record.get("new_key"), record.get("signatures")
    )
    return new
