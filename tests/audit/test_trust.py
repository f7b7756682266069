"""The attacks on a stopped server's log directory: appended records, foreign or broken
checkpoints, a rotated key, and what a witness needs (verifier keys, extension lines)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import (
    AuditError,
    CheckpointError,
    LogCorruptError,
    VerifierKey,
    establish_identity,
    format_checkpoint,
    iter_records,
    parse_checkpoint,
    read_identity,
    verify_log,
)
from service.audit.checkpoint import key_id
from service.audit.storage import (
    CHECKPOINT_FILE,
    canonical_json,
    frame,
    list_segments,
    seal_envelope,
)

from .conftest import (
    KEY_NAME,
    MAC_KEY,
    ORIGIN,
    copy_log,
    latest,
    make_record,
    signer,
    verifier,
)

ATTACKER_MAC_KEY = bytes(32)  # anything but the server's


def last_segment(directory: Path) -> Path:
    return list_segments(directory)[-1][1]


def append_forged(directory: Path, record: dict[str, Any], mac_key: bytes | None) -> int:
    """What an attacker with write access and our code does: a correctly framed and chained
    record at the end, with a MAC under a key of their own (or none, as old records had)."""
    stored = list(iter_records(directory))
    sequence = len(stored)
    chain = stored[-1].chain
    record_json = canonical_json(record)
    if mac_key is None:
        seq = str(sequence).encode()
        chain = hashlib.sha256(
            chain + b'{"record":' + record_json + b',"seq":' + seq + b"}"
        ).digest()
        envelope = (
            b'{"chain":"'
            + base64.b64encode(chain)
            + b'","record":'
            + record_json
            + b',"seq":'
            + seq
            + b"}"
        )
    else:
        envelope, _ = seal_envelope(sequence, record_json, chain, mac_key)
    with last_segment(directory).open("ab") as segment:
        segment.write(frame(envelope))
    return sequence


def append_note(directory: Path, note: str) -> None:
    with (directory / CHECKPOINT_FILE).open("ab") as notes:
        notes.write(frame(note.encode()))


@pytest.mark.parametrize("mac_key", [ATTACKER_MAC_KEY, None], ids=["own-mac", "no-mac"])
def test_a_record_appended_by_someone_else_is_refused_at_open_and_reported(
    tmp_path, write_log, open_log, signing_key, mac_key
):
    log_dir = write_log(tmp_path / "log", 12, checkpoint_every=5)  # closed: checkpoint at 12
    forged = append_forged(log_dir, make_record(99), mac_key)
    assert forged == 12
    segment = last_segment(log_dir)

    # Frame, chain and every checkpoint are fine: only the MAC gives it away.
    with pytest.raises(LogCorruptError) as raised:
        open_log(log_dir)
    assert raised.value.sequence == forged
    assert str(segment) in str(raised.value) and "did not write it" in str(raised.value)

    report = verify_log(log_dir, verifier(signing_key), ORIGIN, mac_key=MAC_KEY)
    assert not report.ok and report.first_bad_sequence == forged
    assert "does not carry the server's MAC" in (report.reason or "")
    assert report.mac_checked and report.unauthenticated_records == 1

    # A reviewer without the secret: the signatures still hold, and the report says how
    # many records nothing vouches for.
    blind = verify_log(log_dir, verifier(signing_key), ORIGIN)
    assert blind.ok and not blind.mac_checked
    assert (blind.proven_size, blind.unauthenticated_records) == (12, 1)


def test_records_written_by_the_server_after_the_last_checkpoint_open_and_verify(
    tmp_path, open_log, signing_key
):
    log = open_log(tmp_path, checkpoint_every=1000)
    for n in range(6):
        log.append_sync(make_record(n))
    # What a crash leaves: records after the last checkpoint (none), all with the server's MAC.
    crashed = copy_log(tmp_path, tmp_path.parent / f"{tmp_path.name}-crashed")
    log.close_sync()
    report = verify_log(crashed, verifier(signing_key), ORIGIN, mac_key=MAC_KEY)
    assert report.ok and report.proven_size == 0 and report.unauthenticated_records == 0
    reopened = open_log(crashed)
    assert reopened.recovery.size == 6 and reopened.append_sync(make_record(6)).sequence == 6


def test_a_wrong_mac_key_fails_every_record(tmp_path, write_log, signing_key):
    log_dir = write_log(tmp_path / "log", 3)
    report = verify_log(log_dir, verifier(signing_key), ORIGIN, mac_key=ATTACKER_MAC_KEY)
    assert not report.ok and report.first_bad_sequence == 0


def test_a_log_from_before_macs_stays_valid_where_checkpoints_cover_it(
    tmp_path, open_log, signing_key
):
    """Old logs have envelopes without a MAC: signed checkpoints vouch for them."""
    directory = tmp_path / "old"
    directory.mkdir()
    from service.audit.merkle import MerkleFrontier, leaf_hash

    frontier, chain, payloads = MerkleFrontier(), bytes(32), []
    for n in range(4):
        record_json = canonical_json(make_record(n))
        seq = str(n).encode()
        chain = hashlib.sha256(
            chain + b'{"record":' + record_json + b',"seq":' + seq + b"}"
        ).digest()
        envelope = (
            (b'{"chain":"' + base64.b64encode(chain) + b'","record":' + record_json + b',"seq":')
            + seq
            + b"}"
        )
        payloads.append(envelope)
        frontier.append(leaf_hash(envelope))
    (directory / "segment-00000000000000000000.log").write_bytes(
        b"".join(frame(p) for p in payloads)
    )
    append_note(
        directory,
        format_checkpoint(ORIGIN, 4, frontier.root(), signers=[signer(signing_key)]),
    )
    assert verify_log(directory, verifier(signing_key), ORIGIN, mac_key=MAC_KEY).ok
    log = open_log(directory)
    assert log.append_sync(make_record(4)).sequence == 4  # new records carry the MAC
    log.close_sync()
    assert verify_log(directory, verifier(signing_key), ORIGIN, mac_key=MAC_KEY).ok
    # An old-style record appended after the last checkpoint is not accepted.
    append_forged(directory, make_record(5), None)
    with pytest.raises(LogCorruptError, match="did not write it"):
        open_log(directory)


def test_open_refuses_a_latest_checkpoint_with_a_broken_signature(tmp_path, write_log, open_log):
    log_dir = write_log(tmp_path / "log", 5)
    notes = (log_dir / CHECKPOINT_FILE).read_bytes()
    length = int.from_bytes(notes[:4], "big")
    text = notes[4 : 4 + length].decode()
    body, signature_line = text.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(signature_line))
    raw[-1] ^= 1  # our key id, a signature that does not verify
    (log_dir / CHECKPOINT_FILE).write_bytes(
        frame(f"{body} {base64.b64encode(raw).decode()}\n".encode())
    )
    with pytest.raises(LogCorruptError) as raised:
        open_log(log_dir)
    message = str(raised.value)
    assert str(log_dir / CHECKPOINT_FILE) in message and "does not verify" in message


def test_open_refuses_a_checkpoint_signed_by_a_foreign_key(tmp_path, write_log, open_log):
    """An attacker who forges records and signs a new checkpoint over them with a key of their
    own, under our key's name: the server does not take it for its own."""
    log_dir = write_log(tmp_path / "log", 5)
    append_forged(log_dir, make_record(5), ATTACKER_MAC_KEY)
    root = verify_log(log_dir, verifier(Ed25519PrivateKey.generate()), ORIGIN).root_hash
    stranger = Ed25519PrivateKey.generate()
    append_note(log_dir, format_checkpoint(ORIGIN, 6, root, signers=[signer(stranger)]))
    with pytest.raises(LogCorruptError) as raised:
        open_log(log_dir)
    message = str(raised.value)
    assert str(log_dir / CHECKPOINT_FILE) in message
    assert "not signed by the expected key" in message and "this server's key" in message


def test_open_refuses_a_log_shorter_than_its_signed_checkpoint(tmp_path, write_log, open_log):
    log_dir = write_log(tmp_path / "log", 8)
    segment = last_segment(log_dir)
    data = segment.read_bytes()
    offset = 0
    for _ in range(6):  # keep six whole records: a cut at a record boundary
        offset += 8 + int.from_bytes(data[offset : offset + 4], "big")
    segment.write_bytes(data[:offset])
    with pytest.raises(LogCorruptError) as raised:
        open_log(log_dir)
    assert str(log_dir / CHECKPOINT_FILE) in str(raised.value)
    assert "covers 8 records but the segments hold only 6" in str(raised.value)


def test_rotation_hands_the_log_to_a_new_key_signed_by_both(tmp_path, open_log, signing_key):
    new_key = Ed25519PrivateKey.generate()
    log = open_log(tmp_path, checkpoint_every=1000)
    for n in range(5):
        log.append_sync(make_record(n))
    rotation = log.rotate_key_sync(signer(new_key), "2026-12-01T12:00:00Z")
    assert rotation.sequence == 5
    assert log.verifier == verifier(new_key)
    for n in range(6, 9):
        log.append_sync(make_record(n))
    log.close_sync()

    # The transition checkpoint (size 6) carries both signatures; the final one only the new.
    notes = [cp for cp in _notes(tmp_path)]
    transition = next(note for note in notes if "\n6\n" in note)
    assert parse_checkpoint(transition, verifier(signing_key), ORIGIN).size == 6
    assert parse_checkpoint(transition, verifier(new_key), ORIGIN).size == 6
    with pytest.raises(CheckpointError):
        parse_checkpoint(notes[-1], verifier(signing_key), ORIGIN)

    # Either key of the chain verifies the whole log; the report lists the chain.
    for given in (signing_key, new_key):
        report = verify_log(tmp_path, verifier(given), ORIGIN, mac_key=MAC_KEY)
        assert report.ok, report.problems
        assert report.proven_size == 9
        assert report.keys == ((0, verifier(signing_key).text), (6, verifier(new_key).text))
    assert not verify_log(tmp_path, verifier(Ed25519PrivateKey.generate()), ORIGIN).ok

    # The old key can no longer open the log, and no longer signs for it.
    with pytest.raises(LogCorruptError, match="not signed by the expected key"):
        open_log(tmp_path)
    reopened = open_log(tmp_path, signer=signer(new_key))
    assert reopened.append_sync(make_record(9)).sequence == 9
    reopened.close_sync()
    root = verify_log(tmp_path, verifier(new_key), ORIGIN).root_hash
    append_note(tmp_path, format_checkpoint(ORIGIN, 10, root, signers=[signer(signing_key)]))
    report = verify_log(tmp_path, verifier(new_key), ORIGIN)
    assert not report.ok and "not signed by the expected key" in (report.reason or "")


def test_a_rotation_left_half_done_is_named_at_open(tmp_path, open_log, signing_key):
    """Rotated in the log, but the server still holds the old key as its own (the keyring
    was not updated): the co-signed checkpoint verifies under the old key, the rotation
    record says the log is no longer its to sign."""
    log = open_log(tmp_path / "log", checkpoint_every=1000)
    log.append_sync(make_record(0))
    log.rotate_key_sync(signer(Ed25519PrivateKey.generate()), "2026-12-01T12:00:00Z")
    crashed = copy_log(tmp_path / "log", tmp_path / "crashed")
    log.close_sync()
    with pytest.raises(AuditError, match=r"handed to audit key .* rotate-key"):
        open_log(crashed)


def test_a_rotation_record_not_signed_by_the_old_key_is_refused(tmp_path, open_log):
    """A forged rotation (to a key the attacker holds) needs the old key's signature."""
    attacker = Ed25519PrivateKey.generate()
    log = open_log(tmp_path, checkpoint_every=1000)
    log.append_sync(make_record(0))
    log.close_sync()
    record = {
        "rpc": "privscore.audit/RotateKey",
        "time": "2026-12-01T12:00:00Z",
        "old_key": verifier(attacker).text,
        "new_key": verifier(attacker).text,
        "signatures": ["AAAA", "AAAA"],
    }
    append_forged(tmp_path, record, MAC_KEY)  # even with the MAC, the signatures do not hold
    with pytest.raises(LogCorruptError, match="bad key rotation"):
        open_log(tmp_path)


def _notes(directory: Path) -> list[str]:
    data, notes, offset = (directory / CHECKPOINT_FILE).read_bytes(), [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        notes.append(data[offset + 4 : offset + 4 + length].decode())
        offset += 8 + length
    return notes


def test_verifier_keys_are_the_signed_note_format():
    # golang.org/x/mod/sumdb/note's published example verifier key.
    vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    parsed = VerifierKey.parse(vkey)
    assert parsed.name == "PeterNeumann" and parsed.key_id.hex() == "c74f20a3"
    assert parsed.text == vkey
    with pytest.raises(CheckpointError, match="does not match"):
        VerifierKey.parse(vkey.replace("PeterNeumann", "PeterNeumanm"))


def test_the_key_name_is_checked_as_well_as_the_key(signing_key):
    root = hashlib.sha256(b"root").digest()
    note = format_checkpoint(ORIGIN, 3, root, signers=[signer(signing_key, "someone-else")])
    with pytest.raises(CheckpointError, match="not signed by the expected key"):
        parse_checkpoint(note, verifier(signing_key), ORIGIN)
    assert key_id(KEY_NAME, signing_key.public_key()) == verifier(signing_key).key_id


def test_extension_lines_are_accepted_and_signed(signing_key):
    root = base64.b64encode(hashlib.sha256(b"root").digest()).decode()
    body = f"{ORIGIN}\n3\n{root}\nextension line one\nanother\n"
    note = body + "\n" + signer(signing_key).signature_line(body.encode())
    checkpoint = parse_checkpoint(note, verifier(signing_key), ORIGIN)
    assert checkpoint.size == 3
    with pytest.raises(CheckpointError):  # an empty extension line is not allowed
        parse_checkpoint(note.replace("another\n", "\n"), verifier(signing_key), ORIGIN)


def test_each_data_directory_gets_its_own_origin_and_keeps_it(tmp_path):
    first = establish_identity(tmp_path / "a", None)
    second = establish_identity(tmp_path / "b", None)
    assert first.origin != second.origin and first.origin.startswith("privscore.audit/")
    assert first.key_name == first.origin
    assert establish_identity(tmp_path / "a", None) == first == read_identity(tmp_path / "a")
    assert (tmp_path / "a" / "identity.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(AuditError, match="holds the log of"):
        establish_identity(tmp_path / "a", "privscore.audit/another")
    configured = establish_identity(tmp_path / "c", "lender.example/privscore")
    assert configured.origin == configured.key_name == "lender.example/privscore"


def test_a_log_from_before_identities_keeps_its_origin_and_key_name(
    tmp_path, write_log, signing_key
):
    legacy = write_log(tmp_path / "log", 3)  # the test log's origin and key name
    identity = establish_identity(legacy, None)
    assert (identity.origin, identity.key_name) == (ORIGIN, KEY_NAME)
    assert json.loads((legacy / "identity.json").read_text())["origin"] == ORIGIN
    assert latest(legacy, signing_key).size == 3
