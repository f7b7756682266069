"""Offline verification and proofs over a log directory: no server, no private key.

What `verify_log` guarantees, assuming SHA-256 and Ed25519 hold:

- Records [0, proven_size) are byte-for-byte the records a trusted checkpoint (a stored one that
  verifies under the public key and origin, or `against`) was signed over.
- When `ok` is false, the earliest altered, inserted, missing or moved record has a sequence in
  [proven_size, first_bad_sequence]: `first_bad_sequence` is where the stored log demonstrably
  stops being the signed one, never before the real first damage.
- Tampering done without re-sealing envelopes (a changed byte with or without a recomputed CRC,
  existing records inserted, deleted or moved, a segment removed) breaks the frame, the sequence
  number or the hash chain at the damaged record itself: `first_bad_sequence` is exactly it.
- A forger who re-seals envelopes with our code is caught at the first record after the forgery
  that was not re-sealed (so a forged insertion is reported at the record it displaced). One who
  re-seals everything to the end leaves a self-consistent log that only signed checkpoints give
  away: the damage lies between the last checkpoint that still matches (`proven_size`) and the
  last record of the first one that does not (`first_bad_sequence`).
- A truncated tail shows only against a checkpoint larger than what is left, stored or exported
  (`against`): `first_bad_sequence` is then the first missing record.
- Records after the last checkpoint are chained but not signed. With the server's record MAC
  key (`mac_key`), each of them is checked to carry the server's MAC, so a record appended or
  rewritten by anyone without that secret is reported at its own sequence. Without it, a forger
  can rewrite them undetectably until the next checkpoint: `proven_size` says how far the
  signatures reach and `unauthenticated_records` how many records nothing vouches for.
- A log that spans several signing keys is checked key by key: a rotation record at sequence R,
  signed by the old and the new key, hands every checkpoint of more than R records to the new
  key. Given any one key of the chain, the rotations name the others; a checkpoint signed by a
  key other than the one in charge at its size does not count.
- A torn final record (an interrupted append, never acknowledged) is not a problem: it is left
  out and counted in `torn_tail_bytes`, unless a checkpoint covers it.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from service.audit.checkpoint import (
    ROTATE_KEY_RPC,
    Checkpoint,
    CheckpointError,
    VerifierKey,
    check_rotation,
    parse_body,
    parse_checkpoint,
    split_note,
)
from service.audit.errors import LogCorruptError, NotProvable
from service.audit.index import IndexUnusable, find_decision
from service.audit.merkle import (
    EMPTY_ROOT,
    ProofError,
    Range,
    SubtreeCollector,
    consistency_path,
    inclusion_path,
    leaf_hash,
    subtree_hashes,
    verify_consistency,
)
from service.audit.storage import (
    LogReader,
    StoredRecord,
    read_checkpoint_notes,
    read_latest_note,
)

_log = structlog.get_logger("privscore.audit")


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    size: int  # records read and checked, from sequence 0
    root_hash: bytes  # Merkle root over those records
    checkpoints: int  # stored checkpoints whose signature and origin verified
    proven_size: int  # records [0, proven_size) are exactly what a trusted checkpoint signed
    first_bad_sequence: int | None
    reason: str | None  # the problem at first_bad_sequence (or the first problem found)
    problems: tuple[str, ...]
    torn_tail_bytes: int  # an interrupted final append, not counted as a record
    mac_checked: bool = False  # whether records were checked against the server's MAC key
    unauthenticated_records: int = 0  # records no signature (and no checked MAC) vouches for
    keys: tuple[tuple[int, str], ...] = ()  # (first size it signs, verifier key), oldest first


class KeyChain:
    """Which key signs the checkpoints of each size: the first key until the first rotation
    record at sequence R, the next for sizes above R, and so on."""

    def __init__(self, first: VerifierKey) -> None:
        self.keys: list[tuple[int, VerifierKey]] = [(0, first)]

    def rotate(self, sequence: int, old: VerifierKey, new: VerifierKey) -> None:
        if old != self.keys[-1][1]:
            raise CheckpointError("the key rotation does not start from the key in use")
        self.keys.append((sequence + 1, new))

    def at(self, size: int) -> VerifierKey:
        return next(key for first, key in reversed(self.keys) if size >= first)

    def trusts(self, verifier: VerifierKey) -> bool:
        return any(key == verifier for _, key in self.keys)


def _last(size: int) -> int | None:
    """The last record a checkpoint of `size` covers, if any."""
    return size - 1 if size else None


def _stored_checkpoints(
    directory: Path,
    keys: KeyChain,
    origin: str,
    problems: list[tuple[int | None, str]],
) -> list[Checkpoint]:
    """The log's own checkpoints that verify, each under the key in charge at its size, oldest
    first; the others go to `problems`."""
    try:
        notes, _ = read_checkpoint_notes(directory)
    except LogCorruptError as error:
        problems.append((None, str(error)))
        return []
    stored: list[Checkpoint] = []
    for number, note in enumerate(notes):
        try:
            checkpoint = _parse_under(note.decode("utf-8"), keys, origin)
        except (UnicodeDecodeError, CheckpointError) as error:
            problems.append((None, f"stored checkpoint #{number}: {error}"))
            continue
        if stored and checkpoint.size < stored[-1].size:
            problems.append((None, f"stored checkpoint #{number} rolls the size back"))
        stored.append(checkpoint)
    return stored


def _parse_under(text: str, keys: KeyChain, origin: str) -> Checkpoint:
    """A checkpoint verified under the key in charge at the size its body claims."""
    size = parse_body(split_note(text)[0])[1]
    return parse_checkpoint(text, keys.at(size), origin)


_MAC_OK, _NO_MAC, _BAD_MAC = 0, 1, 2


@dataclass
class _Scan:
    """One pass over the records: their leaf hashes (32 bytes each), each one's MAC status (a
    byte each), and the key chain the rotation records give."""

    keys: KeyChain
    leaves: bytearray
    macs: bytearray
    torn_tail_bytes: int
    readable: bool

    @property
    def size(self) -> int:
        return len(self.macs)

    def leaf_hashes(self) -> Iterator[bytes]:
        return (bytes(self.leaves[i : i + 32]) for i in range(0, len(self.leaves), 32))


def _scan(
    directory: Path,
    verifier: VerifierKey,
    origin: str,
    mac_key: bytes | None,
    problems: list[tuple[int | None, str]],
) -> _Scan:
    reader = LogReader(directory)
    leaves, macs = bytearray(), bytearray()
    chain: KeyChain | None = None
    readable = True
    try:
        for record in reader:
            leaves += record.leaf_hash
            if record.mac is None:
                macs.append(_NO_MAC)
            else:
                ok = mac_key is None or record.authentic(mac_key)
                macs.append(_MAC_OK if ok else _BAD_MAC)
            if record.record.get("rpc") != ROTATE_KEY_RPC:
                continue
            try:
                old, new = check_rotation(
                    origin,
                    record.sequence,
                    record.record.get("old_key"),
                    record.record.get("new_key"),
                    record.record.get("signatures"),
                )
                chain = chain or KeyChain(old)
                chain.rotate(record.sequence, old, new)
            except CheckpointError as error:
                problems.append((record.sequence, f"record {record.sequence}: {error}"))
    except LogCorruptError as error:
        readable = False
        problems.append((error.sequence, str(error)))
    chain = chain or KeyChain(verifier)
    if not chain.trusts(verifier):
        problems.append((None, f"the key {verifier.text} is not one of this log's signing keys"))
    torn = reader.torn.length if reader.torn else 0
    return _Scan(chain, leaves, macs, torn, readable)


def verify_log(
    directory: str | os.PathLike[str],
    verifier: VerifierKey,
    origin: str,
    *,
    against: Checkpoint | str | None = None,
    mac_key: bytes | None = None,
) -> VerifyReport:
    """Recompute the log's tree and check it against every signed checkpoint, and each record
    against the server's MAC when `mac_key` is given (see module doc)."""
    directory = Path(directory)
    problems: list[tuple[int | None, str]] = []  # (upper bound on the first bad record, what)
    scan = _scan(directory, verifier, origin, mac_key, problems)
    keys, readable = scan.keys, scan.readable
    trusted: list[Checkpoint] = []
    stored: list[Checkpoint] = []
    if keys.trusts(verifier):
        stored = _stored_checkpoints(directory, keys, origin, problems)
        if against is not None:  # an exported note, or a Checkpoint: trust only what verifies
            text = against if isinstance(against, str) else against.text
            exported = _parse_under(text, keys, origin)
            trusted = [*stored, exported]
        else:
            trusted = list(stored)
    successive = [(old, new) for old, new in itertools.pairwise(stored) if old != new]
    wanted: set[Range] = {(0, checkpoint.size) for checkpoint in trusted if checkpoint.size}
    for old, new in successive:
        if old.size <= new.size:
            wanted.update(consistency_path(old.size, new.size))

    collector = SubtreeCollector(wanted)
    for leaf in scan.leaf_hashes():
        collector.append(leaf)
    size = collector.size
    roots = {0: EMPTY_ROOT} | {end: h for (start, end), h in collector.hashes.items() if not start}

    proven = 0
    for checkpoint in trusted:
        name = (
            "stored checkpoint" if any(checkpoint is c for c in stored) else "exported checkpoint"
        )
        if checkpoint.size > size:
            if readable:  # else the damage found while reading already bounds it
                problems.append(
                    (
                        size,
                        f"{name} covers {checkpoint.size} records but the log holds {size}: "
                        f"records from {size} are missing",
                    )
                )
        elif roots[checkpoint.size] != checkpoint.root_hash:
            problems.append(
                (
                    _last(checkpoint.size),
                    f"{name} of size {checkpoint.size} does not match the records: a record "
                    f"before {checkpoint.size} was altered",
                )
            )
        else:
            proven = max(proven, checkpoint.size)

    for old, new in successive:
        if old.size > new.size or new.size > size:
            continue
        proof = [collector.hashes[node] for node in consistency_path(old.size, new.size)]
        try:
            verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
        except ProofError as error:
            problems.append(
                (_last(new.size), f"stored checkpoints {old.size} -> {new.size}: {error}")
            )

    if mac_key is not None:
        # Records the signatures vouch for may predate MACs; every later one needs the server's.
        forged = next(
            (
                sequence
                for sequence, status in enumerate(scan.macs)
                if status == _BAD_MAC or (status == _NO_MAC and sequence >= proven)
            ),
            None,
        )
        if forged is not None:
            problems.append(
                (
                    forged,
                    f"record {forged} does not carry the server's MAC: the server did not "
                    "write it (or the MAC key given is not the server's)",
                )
            )

    bounded = [(sequence, text) for sequence, text in problems if sequence is not None]
    first = min(bounded, key=lambda problem: problem[0]) if bounded else None
    first_bad = first[0] if first else None
    reason = first[1] if first else (problems[0][1] if problems else None)
    proven = min(proven, first_bad) if first_bad is not None else proven
    return VerifyReport(
        ok=not problems,
        size=size,
        root_hash=collector.root(),
        checkpoints=len(stored),
        proven_size=proven,
        first_bad_sequence=first_bad,
        reason=reason,
        problems=tuple(text for _, text in problems),
        torn_tail_bytes=scan.torn_tail_bytes,
        mac_checked=mac_key is not None,
        unauthenticated_records=(
            size - proven
            if mac_key is None
            else sum(status != _MAC_OK for status in scan.macs[proven:])
        ),
        keys=tuple((first, key.text) for first, key in keys.keys),
    )


def _hashes(directory: Path, wanted: list[Range], size: int) -> dict[Range, bytes]:
    collector = SubtreeCollector(wanted)
    for envelope in LogReader(directory).envelopes():
        if collector.size == size:
            break
        collector.append(leaf_hash(envelope))
    if collector.size < size:
        raise ProofError(f"the log holds {collector.size} records, fewer than {size}")
    return collector.hashes


def inclusion_proof(directory: str | os.PathLike[str], sequence: int, at_size: int) -> list[bytes]:
    """The audit path of record `sequence` in the tree of the first `at_size` records."""
    path = inclusion_path(sequence, at_size)
    hashes = _hashes(Path(directory), path, at_size)
    return [hashes[node] for node in path]


def consistency_proof(
    directory: str | os.PathLike[str], old_size: int, new_size: int
) -> list[bytes]:
    """The proof that the tree at `old_size` is a prefix of the tree at `new_size`."""
    path = consistency_path(old_size, new_size)
    hashes = _hashes(Path(directory), path, new_size)
    return [hashes[node] for node in path]


def latest_checkpoint(
    directory: str | os.PathLike[str], verifier: VerifierKey, origin: str
) -> Checkpoint | None:
    """The newest stored checkpoint, verified; None if none was written yet."""
    note = read_latest_note(Path(directory))
    if note is None:
        return None
    try:
        return parse_checkpoint(note.decode("utf-8"), verifier, origin)
    except UnicodeDecodeError:
        raise CheckpointError("latest checkpoint is not UTF-8") from None


def iter_records(directory: str | os.PathLike[str]) -> Iterator[StoredRecord]:
    """Every record with its sequence, in order; raises LogCorruptError at a damaged one."""
    yield from LogReader(Path(directory))


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime (naive means UTC); None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def find_with_inclusion_proof(
    directory: str | os.PathLike[str], at_size: int, *, equals: Mapping[str, str]
) -> tuple[StoredRecord, list[bytes] | None] | None:
    """The first record whose fields equal the strings in `equals`, with its inclusion proof
    in the tree of the first `at_size` records (None when the record is not among them:
    newer than that tree); None if no record matches.

    One pass that hashes leaves but parses only envelopes holding each wanted value as a
    JSON string, so a lookup costs a read of the log rather than a parse of it. The record is
    not checked against the chain here: the proof is what shows it is in the signed tree.
    """
    needles = [json.dumps(value, ensure_ascii=False).encode("utf-8") for value in equals.values()]
    leaves = bytearray()  # 32 bytes per record: compact, whatever the log's size
    found: StoredRecord | None = None
    for sequence, envelope in enumerate(LogReader(Path(directory)).envelopes()):
        if sequence < at_size:
            leaves += leaf_hash(envelope)
        elif found is not None:
            break
        if found is None and all(needle in envelope for needle in needles):
            record = json.loads(envelope)["record"]
            if all(record.get(key) == value for key, value in equals.items()):
                found = StoredRecord(sequence, record, envelope)
    if len(leaves) < 32 * at_size:
        raise ProofError(f"the log holds {len(leaves) // 32} records, fewer than {at_size}")
    if found is None or found.sequence >= at_size:
        return None if found is None else (found, None)
    path = inclusion_path(found.sequence, at_size)
    leaf_hashes = (bytes(leaves[i : i + 32]) for i in range(0, len(leaves), 32))
    hashes = subtree_hashes(leaf_hashes, path)
    return found, [hashes[node] for node in path]


def _log_fallback(reason: str) -> None:
    _log.warning("audit.lookup_index_unusable", reason=reason)


def prove_record(
    directory: str | os.PathLike[str],
    verifier: VerifierKey,
    origin: str,
    *,
    equals: Mapping[str, str],
    confirm_not_found: bool = False,
    on_fallback: Callable[[str], None] = _log_fallback,
) -> tuple[Checkpoint, StoredRecord, list[bytes]]:
    """The first record whose fields equal `equals`, with its inclusion proof against the
    latest verified checkpoint; raises NotProvable when there is no such proof yet or at all.

    A lookup by decision_id alone is answered from the log's index when it has one that covers
    the checkpoint (O(log n) reads; what it returns is checked, see `find_decision`); otherwise,
    or when the index disagrees with the log (`on_fallback` is told why), by one pass over the
    log. The index cannot show that a decision is absent: with `confirm_not_found` (a reviewer
    who does not take the index's word) the pass runs before answering NOT_FOUND.
    """
    checkpoint = latest_checkpoint(directory, verifier, origin)
    if checkpoint is None or checkpoint.size == 0:
        raise NotProvable(
            "NO_CHECKPOINT", "no signed checkpoint yet; records become provable within seconds"
        )
    wanted = ", ".join(f"{key} {value!r}" for key, value in equals.items())
    found: tuple[StoredRecord, list[bytes] | None] | None = None
    scan = True
    if list(equals) == ["decision_id"]:
        try:
            found = find_decision(
                Path(directory), equals["decision_id"], checkpoint.size, checkpoint.root_hash
            )
            scan = found is None and confirm_not_found
        except IndexUnusable as error:
            if not error.quiet:
                on_fallback(error.reason)
    if scan:
        found = find_with_inclusion_proof(directory, checkpoint.size, equals=equals)
    if found is None:
        raise NotProvable("NOT_FOUND", f"no record has {wanted}")
    record, proof = found
    if proof is None:
        raise NotProvable(
            "NEWER_THAN_CHECKPOINT",
            f"the record with {wanted} is newer than the latest checkpoint (size "
            f"{checkpoint.size}); it is provable after the next checkpoint",
        )
    return checkpoint, record, proof


def records_containing(
    directory: str | os.PathLike[str], needles: Iterable[bytes]
) -> Iterator[StoredRecord]:
    """Every record whose stored envelope contains one of `needles`, in order: one pass that
    parses only those, for scans that want one kind of record out of a large log."""
    wanted = tuple(needles)
    for sequence, envelope in enumerate(LogReader(Path(directory)).envelopes()):
        if any(needle in envelope for needle in wanted):
            yield StoredRecord(sequence, json.loads(envelope)["record"], envelope)


def find_records(
    directory: str | os.PathLike[str],
    *,
    equals: Mapping[str, object] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[StoredRecord]:
    """Records whose fields equal `equals` and whose `time` is in [since, until).

    With a time bound, records without a parseable `time` field are left out.
    """
    for stored in iter_records(directory):
        if equals and any(stored.record.get(key) != value for key, value in equals.items()):
            continue
        if since is not None or until is not None:
            time = parse_time(stored.record.get("time"))
            if time is None or (since and time < since) or (until and time >= until):
                continue
        yield stored
