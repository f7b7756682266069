"""Offline verification: each kind of tampering is found, at the right sequence."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import (
    CheckpointError,
    ProofError,
    consistency_proof,
    find_records,
    find_with_inclusion_proof,
    format_checkpoint,
    inclusion_proof,
    iter_records,
    parse_checkpoint,
    verify_consistency,
    verify_inclusion,
    verify_log,
)
from service.audit.storage import (
    CHECKPOINT_FILE,
    GENESIS_CHAIN,
    canonical_json,
    frame,
    list_segments,
    seal_envelope,
)
from service.audit.verify import parse_time

from .conftest import KEY_NAME, MAC_KEY, ORIGIN, latest, make_record, signer, verifier

RECORDS = 40
EVERY = 10  # checkpoints at 10, 20, 30 and 40


@pytest.fixture
def log_dir(tmp_path, write_log) -> Path:
    directory: Path = write_log(tmp_path / "log", RECORDS, checkpoint_every=EVERY)
    return directory


def only_segment(directory: Path) -> Path:
    [(_, path)] = list_segments(directory)
    return path


def read_payloads(path: Path) -> list[bytes]:
    data, payloads, offset = path.read_bytes(), [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        payloads.append(data[offset + 4 : offset + 4 + length])
        offset += length + 8
    return payloads


def write_payloads(path: Path, payloads: list[bytes]) -> None:
    """Rewrite a segment with valid framing: what a tamperer with a CRC calculator does."""
    path.write_bytes(b"".join(frame(payload) for payload in payloads))


def rechain(payloads: list[bytes], start: int) -> list[bytes]:
    """What a forger with our code does: reseal every envelope from `start` on."""
    chain = base64.b64decode(json.loads(payloads[start - 1])["chain"]) if start else GENESIS_CHAIN
    out = payloads[:start]
    for sequence in range(start, len(payloads)):
        record_json = canonical_json(json.loads(payloads[sequence])["record"])
        envelope, chain = seal_envelope(sequence, record_json, chain, MAC_KEY)
        out.append(envelope)
    return out


def verify(directory: Path, key: Ed25519PrivateKey, **kwargs):
    return verify_log(directory, verifier(key), ORIGIN, **kwargs)


def test_an_intact_log_verifies(log_dir, signing_key):
    report = verify(log_dir, signing_key)
    assert report.ok, report.problems
    assert (report.size, report.checkpoints, report.proven_size) == (RECORDS, 4, RECORDS)
    assert report.first_bad_sequence is None and report.torn_tail_bytes == 0
    assert report.root_hash == latest(log_dir, signing_key).root_hash


def test_modified_record_with_recomputed_crc(log_dir, signing_key):
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)
    payloads[17] = payloads[17].replace(b"dec-0017", b"dec-9999")
    write_payloads(segment, payloads)
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == 17
    assert "chain" in report.reason and report.proven_size == 10


def test_modified_raw_bytes(log_dir, signing_key):
    segment = only_segment(log_dir)
    data = bytearray(segment.read_bytes())
    data[data.index(b"dec-0017") + 5] ^= 1
    segment.write_bytes(bytes(data))
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == 17 and "CRC" in report.reason


def test_inserted_copy_of_a_record(log_dir, signing_key):
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)
    write_payloads(segment, [*payloads[:17], payloads[5], *payloads[17:]])
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == 17 and "sequence" in report.reason


def test_inserted_forged_record_is_caught_at_the_next_one(log_dir, signing_key):
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)
    chain = base64.b64decode(json.loads(payloads[16])["chain"])
    forged, _ = seal_envelope(17, canonical_json(make_record(999)), chain, MAC_KEY)
    write_payloads(segment, [*payloads[:17], forged, *payloads[17:]])
    report = verify(log_dir, signing_key)
    # The forgery itself fits its predecessors; the record it displaced does not.
    assert not report.ok and report.first_bad_sequence == 18
    assert report.proven_size <= 17 <= report.first_bad_sequence


def test_deleted_record(log_dir, signing_key):
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)
    write_payloads(segment, payloads[:17] + payloads[18:])
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == 17 and "sequence" in report.reason


def test_reordered_records(log_dir, signing_key):
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)
    payloads[17], payloads[18] = payloads[18], payloads[17]
    write_payloads(segment, payloads)
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == 17


def test_rewritten_and_rechained_log_is_bounded_by_checkpoints(log_dir, signing_key):
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)
    payloads[17] = payloads[17].replace(b"dec-0017", b"dec-9999")
    write_payloads(segment, rechain(payloads, 17))
    report = verify(log_dir, signing_key)
    # Self-consistent, so only the checkpoint at 20 gives it away: the damage is in [10, 19].
    assert not report.ok
    assert (report.proven_size, report.first_bad_sequence) == (10, 19)


def test_truncated_tail_with_its_checkpoint_still_stored(log_dir, signing_key):
    segment = only_segment(log_dir)
    write_payloads(segment, read_payloads(segment)[:35])
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == 35 and "missing" in report.reason


def test_truncated_tail_is_only_visible_against_an_exported_checkpoint(log_dir, signing_key):
    exported = latest(log_dir, signing_key)
    segment = only_segment(log_dir)
    write_payloads(segment, read_payloads(segment)[:35])
    # The tamperer also drops the checkpoint of size 40 from the log's own file.
    notes = read_payloads(log_dir / CHECKPOINT_FILE)
    write_payloads(log_dir / CHECKPOINT_FILE, notes[:-1])
    assert verify(log_dir, signing_key).ok

    report = verify(log_dir, signing_key, against=exported)
    assert not report.ok and report.first_bad_sequence == 35
    assert "exported checkpoint covers 40" in report.reason


def test_truncated_and_regrown_tail_differs_from_an_exported_checkpoint(log_dir, signing_key):
    exported = latest(log_dir, signing_key)
    segment = only_segment(log_dir)
    payloads = read_payloads(segment)[:35]
    payloads += [canonical_json({"record": make_record(n)}) for n in range(5)]
    write_payloads(segment, rechain(payloads, 35))
    write_payloads(log_dir / CHECKPOINT_FILE, read_payloads(log_dir / CHECKPOINT_FILE)[:-1])
    report = verify(log_dir, signing_key, against=exported)
    assert not report.ok and (report.proven_size, report.first_bad_sequence) == (30, 39)


def test_deleted_segment(tmp_path, write_log, signing_key):
    directory = write_log(tmp_path / "log", RECORDS, checkpoint_every=EVERY, segment_bytes=1024)
    segments = list_segments(directory)
    first, path = segments[2]
    path.unlink()
    report = verify(directory, signing_key)
    assert not report.ok and report.first_bad_sequence == first and "missing" in report.reason


def append_note(directory: Path, note: str) -> None:
    with (directory / CHECKPOINT_FILE).open("ab") as file:
        file.write(frame(note.encode()))


def test_checkpoint_signed_by_another_key_is_rejected(log_dir, signing_key):
    root = verify(log_dir, signing_key).root_hash
    append_note(
        log_dir,
        format_checkpoint(
            ORIGIN, RECORDS, root, signers=[signer(Ed25519PrivateKey.generate(), KEY_NAME)]
        ),
    )
    report = verify(log_dir, signing_key)
    assert not report.ok and "not signed by the expected key" in report.reason


def test_checkpoint_for_another_origin_is_rejected(log_dir, signing_key):
    root = verify(log_dir, signing_key).root_hash
    note = format_checkpoint(
        "privscore.audit/elsewhere", RECORDS, root, signers=[signer(signing_key, KEY_NAME)]
    )
    append_note(log_dir, note)
    report = verify(log_dir, signing_key)
    assert not report.ok and "elsewhere" in report.reason
    with pytest.raises(CheckpointError):
        parse_checkpoint(note, verifier(signing_key), ORIGIN)


def test_checkpoint_claiming_more_records_than_the_log_is_rejected(log_dir, signing_key):
    root = verify(log_dir, signing_key).root_hash
    append_note(
        log_dir, format_checkpoint(ORIGIN, 1000, root, signers=[signer(signing_key, KEY_NAME)])
    )
    report = verify(log_dir, signing_key)
    assert not report.ok and report.first_bad_sequence == RECORDS
    assert "covers 1000 records" in report.reason


def test_checkpoint_that_rolls_the_log_back_is_rejected(log_dir, signing_key):
    root = verify(log_dir, signing_key).root_hash
    append_note(
        log_dir, format_checkpoint(ORIGIN, 20, root, signers=[signer(signing_key, KEY_NAME)])
    )
    report = verify(log_dir, signing_key)
    assert not report.ok
    assert any("rolls the size back" in problem for problem in report.problems)
    assert report.first_bad_sequence == 19  # and its root is not the tree's at 20


def test_torn_tail_is_reported_but_not_counted(log_dir, signing_key):
    with only_segment(log_dir).open("ab") as file:
        file.write(b"\x00\x00\x01")
    report = verify(log_dir, signing_key)
    assert report.ok and report.torn_tail_bytes == 3 and report.size == RECORDS


def test_proofs_from_the_directory_verify(log_dir, signing_key):
    checkpoint = latest(log_dir, signing_key)
    records = list(iter_records(log_dir))
    for sequence in (0, 13, 39):
        proof = inclusion_proof(log_dir, sequence, checkpoint.size)
        verify_inclusion(
            records[sequence].envelope, sequence, checkpoint.size, proof, checkpoint.root_hash
        )
        with pytest.raises(ProofError):
            verify_inclusion(
                records[sequence - 1].envelope,
                sequence,
                checkpoint.size,
                proof,
                checkpoint.root_hash,
            )
    old = parse_checkpoint(
        read_payloads(log_dir / CHECKPOINT_FILE)[0].decode(), verifier(signing_key), ORIGIN
    )
    proof = consistency_proof(log_dir, old.size, checkpoint.size)
    verify_consistency(old.size, checkpoint.size, old.root_hash, checkpoint.root_hash, proof)
    with pytest.raises(ProofError):
        inclusion_proof(log_dir, 3, RECORDS + 1)


def test_find_with_inclusion_proof_in_one_pass(log_dir, signing_key, open_log):
    checkpoint = latest(log_dir, signing_key)
    for sequence in (0, 13, 39):
        found = find_with_inclusion_proof(
            log_dir, checkpoint.size, equals={"decision_id": f"dec-{sequence:04d}"}
        )
        assert found is not None and found[1] is not None
        stored, proof = found
        assert stored.sequence == sequence and stored.record == make_record(sequence)
        assert proof == inclusion_proof(log_dir, sequence, checkpoint.size)
        verify_inclusion(stored.envelope, sequence, checkpoint.size, proof, checkpoint.root_hash)
    # The value appears in an earlier record, but under another key: that one is no match.
    writer = open_log(log_dir, checkpoint_every=1000)
    writer.append_sync({"request_id": "dec-0041"})
    writer.append_sync(make_record(41))  # after the checkpoint: found, but not provable yet
    assert find_with_inclusion_proof(
        log_dir, checkpoint.size, equals={"decision_id": "dec-0041"}
    ) == (next(s for s in iter_records(log_dir) if s.sequence == RECORDS + 1), None)
    assert find_with_inclusion_proof(log_dir, checkpoint.size, equals={"decision_id": "x"}) is None
    with pytest.raises(ProofError):
        find_with_inclusion_proof(log_dir, RECORDS + 5, equals={"decision_id": "dec-0001"})


def test_find_records_by_field_and_time(log_dir):
    found = list(find_records(log_dir, equals={"decision_id": "dec-0007"}))
    assert [s.sequence for s in found] == [7]
    subject = list(find_records(log_dir, equals={"subject": "pseudo-1"}))
    assert [s.sequence for s in subject] == list(range(1, RECORDS, 3))
    since, until = parse_time("2026-11-26T10:00:10Z"), parse_time("2026-11-26T10:00:15+00:00")
    window = list(find_records(log_dir, since=since, until=until))
    assert [s.sequence for s in window] == [10, 11, 12, 13, 14]
