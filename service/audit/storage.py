"""How the log lies on disk: framing, segment files, record envelopes, and a strict reader.

Every file is a sequence of frames: a 4-byte big-endian payload length, the payload, and a
4-byte big-endian CRC32 of the payload. Records live in segment files named
`segment-<first sequence, 20 digits>.log` (names sort by sequence); signed checkpoints, one note
per frame, in `checkpoints.log`.

A record's payload, which is also its Merkle leaf, is the canonical JSON (sorted keys, compact
separators, UTF-8) of its envelope:

    {"chain":"<base64 C>","mac":"<base64 HMAC-SHA256(K, label || C)>","record":{...},"seq":N}
    where C = SHA-256(previous chain || {"record":...,"seq":N})

`seq` numbers records from 0 without gaps; `chain` links each record to all before it (the first
record's predecessor chain is 32 zero bytes), so an edit to one record is caught at that record,
not only at the next signed checkpoint. `mac` authenticates the record, its place and everything
before it under K, a secret only the server holds: anyone can recompute a chain, only the server
can make a MAC, so a record appended by someone else is refused even before a checkpoint signs
it. Logs written before MACs existed have envelopes without `mac`; such a record is accepted only
where a signed checkpoint covers it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.audit.errors import AuditRecordError, LogCorruptError
from service.audit.merkle import leaf_hash

CHECKPOINT_FILE = "checkpoints.log"
# Where an earlier version resumed reading; open now reads the whole log and removes it.
LEGACY_RESUME_FILE = "resume.json"
GENESIS_CHAIN = bytes(32)
MAC_LABEL = b"privscore.v1/audit-record-mac\x00"
MAC_KEY_BYTES = 32
# Below 2**24, so every length field starts with a zero byte; canonical JSON never holds one.
MAX_PAYLOAD_BYTES = (1 << 24) - 1
MAX_RECORD_BYTES = MAX_PAYLOAD_BYTES - 1024  # leaves room for the envelope around the record
_SEGMENT_NAME = re.compile(r"segment-([0-9]{20})\.log")
_U32 = struct.Struct(">I")
# Where an intact frame could begin: a length field below 2**24 that is not zero.
_LENGTH_CANDIDATE = re.compile(rb"\x00(?!\x00\x00\x00)")


def frame(payload: bytes) -> bytes:
    return _U32.pack(len(payload)) + payload + _U32.pack(zlib.crc32(payload))


def segment_name(first_sequence: int) -> str:
    return f"segment-{first_sequence:020d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first sequence, path) of every segment file, in sequence order."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _SEGMENT_NAME.fullmatch(entry.name)
            if match:
                found.append((int(match[1]), Path(entry.path)))
    return sorted(found)


@dataclass(frozen=True)
class TornTail:
    """Bytes after the last whole frame of a file that an interrupted append left behind."""

    file: str
    offset: int
    length: int
    sequence: int | None  # the sequence the torn record would have had (None: checkpoints file)


def _frame_at(data: bytes, offset: int) -> bool:
    if offset + 8 > len(data):
        return False
    (length,) = _U32.unpack_from(data, offset)
    end = offset + 4 + length
    if not 0 < length <= MAX_PAYLOAD_BYTES or end + 4 > len(data):
        return False
    crc: int = _U32.unpack_from(data, end)[0]
    return zlib.crc32(data[offset + 4 : end]) == crc


def _frame_problem(rest: bytes) -> str:
    if len(rest) < 4:
        return "length field cut short"
    (length,) = _U32.unpack_from(rest)
    if not 0 < length <= MAX_PAYLOAD_BYTES:
        return f"impossible length {length}"
    return "frame cut short" if length + 8 > len(rest) else "CRC mismatch"


class FrameError(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class FrameFile:
    """The frames of one file. A bad frame raises `FrameError`, unless `may_be_torn` and no intact
    frame follows it: then it and everything after is an interrupted append, recorded in `torn`.

    "No intact frame follows" is what makes cutting safe: every acknowledged record was written
    whole and fsynced, so a valid frame after a bad one means damage, never a crash.
    """

    def __init__(self, path: Path, *, may_be_torn: bool, start: int = 0) -> None:
        self.path = path
        self.may_be_torn = may_be_torn
        self.torn: TornTail | None = None
        self.offset = start  # where the frame last yielded begins, then where the next one does

    def frames(self) -> Iterator[bytes]:
        with self.path.open("rb", buffering=1 << 20) as file:
            offset = self.offset
            file.seek(offset)
            while True:
                self.offset = offset
                header = file.read(4)
                if not header:
                    return
                if len(header) == 4:
                    (length,) = _U32.unpack(header)
                    if 0 < length <= MAX_PAYLOAD_BYTES:
                        payload = file.read(length)
                        trailer = file.read(4)
                        if len(trailer) == 4 and zlib.crc32(payload) == _U32.unpack(trailer)[0]:
                            yield payload
                            offset += 8 + length
                            continue
                file.seek(offset)
                rest = file.read()
                intact_after = any(
                    _frame_at(rest, match.start()) for match in _LENGTH_CANDIDATE.finditer(rest, 1)
                )
                if self.may_be_torn and not intact_after:
                    self.torn = TornTail(self.path.name, offset, len(rest), None)
                    return
                raise FrameError(offset, _frame_problem(rest))


def read_frame_at(path: Path, offset: int) -> bytes:
    """The payload of the one frame at byte `offset` of `path`; FrameError unless a whole frame
    with a matching CRC is there (for lookups that know where a record lies)."""
    with path.open("rb", buffering=0) as file:
        file.seek(offset)
        header = file.read(4)
        if len(header) < 4:
            raise FrameError(offset, "length field cut short")
        (length,) = _U32.unpack(header)
        if not 0 < length <= MAX_PAYLOAD_BYTES:
            raise FrameError(offset, f"impossible length {length}")
        rest = file.read(length + 4)
    if len(rest) < length + 4:
        raise FrameError(offset, "frame cut short")
    payload = rest[:length]
    if zlib.crc32(payload) != _U32.unpack_from(rest, length)[0]:
        raise FrameError(offset, "CRC mismatch")
    return payload


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a caller's record, or AuditRecordError before anything is used."""
    try:
        encoded = canonical_json(dict(record))
    except (TypeError, ValueError) as error:
        raise AuditRecordError(f"record is not JSON-serialisable: {error}") from None
    if len(encoded) > MAX_RECORD_BYTES:
        raise AuditRecordError(f"record is {len(encoded)} bytes; the limit is {MAX_RECORD_BYTES}")
    return encoded


def record_mac(mac_key: bytes, chain: bytes) -> bytes:
    """The MAC of the record whose chain value is `chain` (which covers it and its past)."""
    return hmac.digest(mac_key, MAC_LABEL + chain, "sha256")


def _envelope(sequence: bytes, record_json: bytes, chain: bytes, mac: bytes | None) -> bytes:
    # Assembled by hand rather than re-serialised: the keys are already in sorted order, and
    # the reader checks every envelope is byte-for-byte canonical.
    tagged = b'","mac":"' + base64.b64encode(mac) if mac is not None else b""
    return (
        b'{"chain":"'
        + base64.b64encode(chain)
        + tagged
        + b'","record":'
        + record_json
        + b',"seq":'
        + sequence
        + b"}"
    )


def _chain(previous_chain: bytes, record_json: bytes, sequence: bytes) -> bytes:
    body = previous_chain + b'{"record":' + record_json + b',"seq":' + sequence + b"}"
    return hashlib.sha256(body).digest()


def seal_envelope(
    sequence: int, record_json: bytes, previous_chain: bytes, mac_key: bytes
) -> tuple[bytes, bytes]:
    """(envelope bytes, chain) for a canonical record at `sequence`, authenticated."""
    seq = str(sequence).encode()
    chain = _chain(previous_chain, record_json, seq)
    return _envelope(seq, record_json, chain, record_mac(mac_key, chain)), chain


@dataclass(frozen=True)
class StoredRecord:
    sequence: int
    record: dict[str, Any]
    envelope: bytes  # the exact stored bytes: the Merkle leaf
    # Set where the envelope was checked against the chain (not by lookups that only search):
    chain: bytes = field(default=b"", compare=False)
    mac: bytes | None = field(default=None, compare=False)  # None: written before MACs existed

    @property
    def leaf_hash(self) -> bytes:
        return leaf_hash(self.envelope)

    def authentic(self, mac_key: bytes) -> bool:
        """Whether the server holding `mac_key` wrote this record at this place."""
        return self.mac is not None and hmac.compare_digest(
            self.mac, record_mac(mac_key, self.chain)
        )


def open_envelope(
    payload: bytes, expected_sequence: int, previous_chain: bytes
) -> tuple[StoredRecord, bytes]:
    """Check one stored envelope against its position and predecessor; (record, its chain)."""

    def bad(reason: str) -> LogCorruptError:
        return LogCorruptError(expected_sequence, reason)

    try:
        envelope = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("envelope is not UTF-8 JSON") from None
    if not isinstance(envelope, dict) or set(envelope) - {"mac"} != {"chain", "record", "seq"}:
        raise bad("envelope does not have exactly the fields chain, mac, record, seq")
    sequence, record, chain = envelope["seq"], envelope["record"], envelope["chain"]
    mac = envelope.get("mac", "")
    if (
        type(sequence) is not int
        or not isinstance(record, dict)
        or not isinstance(chain, str)
        or not isinstance(mac, str)
    ):
        raise bad("envelope fields have the wrong types")
    if sequence != expected_sequence:
        raise bad(f"holds sequence {sequence}: a record was deleted, inserted or moved here")
    try:
        record_json = canonical_json(record)
        stored_chain = base64.b64decode(chain, validate=True)
        stored_mac = base64.b64decode(mac, validate=True) if "mac" in envelope else None
    except (ValueError, binascii.Error):
        raise bad("envelope is not canonical") from None
    seq = str(sequence).encode()
    expected_chain = _chain(previous_chain, record_json, seq)
    if stored_chain != expected_chain:
        raise bad("chain does not follow from the records before it: this record was altered")
    if _envelope(seq, record_json, expected_chain, stored_mac) != payload:
        raise bad("envelope is not canonical")
    return StoredRecord(sequence, record, payload, expected_chain, stored_mac), expected_chain


def stored_chain(payload: bytes, sequence: int) -> bytes:
    """The chain value an envelope stores, unchecked: for an envelope a checkpoint vouches for."""
    try:
        return base64.b64decode(json.loads(payload)["chain"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise LogCorruptError(sequence, "envelope has no readable chain value") from None


class LogReader:
    """Reads the records of a log directory in order, checking framing, sequence and chain.

    Raises LogCorruptError at the first record that does not fit; a torn final record of the last
    segment ends the iteration and is described in `torn`. `file` names the segment being read,
    for messages. Never writes.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.torn: TornTail | None = None
        self.size = 0
        self.chain = GENESIS_CHAIN
        self.file = ""
        self.offset = 0  # where the envelope last yielded is framed in `file`

    def __iter__(self) -> Iterator[StoredRecord]:
        for payload in self.envelopes():
            record, self.chain = open_envelope(payload, self.size, self.chain)
            yield record

    def envelopes(self) -> Iterator[bytes]:
        """Every stored envelope, in order, checking framing and that no file is missing, but
        neither the JSON nor the chain: for passes that only hash leaves, which is where
        their cost is."""
        segments = list_segments(self.directory)
        for index, (first_sequence, path) in enumerate(segments):
            self.file = path.name
            if first_sequence != self.size:
                raise LogCorruptError(
                    self.size, f"next file is {path.name}: records from {self.size} are missing"
                )
            frames = FrameFile(path, may_be_torn=index == len(segments) - 1)
            try:
                for payload in frames.frames():
                    # self.size and self.offset are this envelope's until it returns
                    self.offset = frames.offset
                    yield payload
                    self.size += 1
            except FrameError as error:
                raise LogCorruptError(self.size, f"{path.name} {error}") from None
            if frames.torn is not None:
                self.torn = TornTail(path.name, frames.torn.offset, frames.torn.length, self.size)


def read_checkpoint_notes(directory: Path) -> tuple[list[bytes], TornTail | None]:
    """The stored signed notes, oldest first, and any torn final note (never verified here)."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return [], None
    frames = FrameFile(path, may_be_torn=True)
    try:
        notes = list(frames.frames())
    except FrameError as error:
        raise LogCorruptError(None, f"{CHECKPOINT_FILE} {error}") from None
    return notes, frames.torn


_NOTE_TAIL_BYTES = 64 * 1024  # far more than one note, even signed by several keys


def read_latest_note(directory: Path) -> bytes | None:
    """The last stored note (never verified here), as `read_checkpoint_notes` gives it, but
    reading only the end of the file when it ends with a whole frame: a lookup's cost must not
    grow with the number of checkpoints the log has signed. Scanning back from the end, the
    first place a frame can start that ends exactly at the end of the file with a matching CRC
    is the last note's frame (a note is text, so a length field cannot start inside one). A
    torn or damaged end, or a note longer than the tail read, falls back to reading it all.
    Unlike that full read, damage to an earlier note is not looked for: it is `verify_log`'s to
    find, and the note returned is only trusted once its signature verifies."""
    path = directory / CHECKPOINT_FILE
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - _NOTE_TAIL_BYTES))
            tail = file.read()
    except FileNotFoundError:
        return None
    start = len(tail) - 8
    while (start := tail.rfind(b"\x00", 0, start)) >= 0:
        (length,) = _U32.unpack_from(tail, start)
        if start + 8 + length == len(tail) and _frame_at(tail, start):
            return tail[start + 4 : start + 4 + length]
    notes, _ = read_checkpoint_notes(directory)
    return notes[-1] if notes else None
