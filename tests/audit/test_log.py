"""The writer: durability, group commit, rotation, checkpoints, recovery, failing closed."""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import json
import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from service.audit import (
    Appended,
    AuditError,
    AuditRecordError,
    AuditWriteError,
    LogCorruptError,
    iter_records,
    verify_log,
)
from service.audit.storage import CHECKPOINT_FILE, frame, list_segments

from .conftest import MAC_KEY, ORIGIN, copy_log, latest, make_record, signer, verifier


def slow_fsync(delay: float):
    """A real fsync that takes at least `delay`, so appends pile up behind it."""

    def fsync(fd: int) -> None:
        time.sleep(delay)
        os.fsync(fd)

    return fsync


def test_records_are_numbered_in_order_and_stored_as_canonical_envelopes(tmp_path, open_log):
    log = open_log(tmp_path)
    appended = [log.append_sync(make_record(n)) for n in range(5)]
    assert [a.sequence for a in appended] == [0, 1, 2, 3, 4]
    stored = list(iter_records(tmp_path))
    assert [s.record for s in stored] == [make_record(n) for n in range(5)]
    assert [s.leaf_hash for s in stored] == [a.leaf_hash for a in appended]
    envelope = json.loads(stored[2].envelope)
    assert set(envelope) == {"chain", "mac", "record", "seq"} and envelope["seq"] == 2
    assert stored[2].envelope == json.dumps(
        envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    # The MAC is HMAC-SHA256 under the server's key over a label and the record's chain value.
    chain = base64.b64decode(envelope["chain"])
    expected = hmac.digest(MAC_KEY, b"privscore.v1/audit-record-mac\x00" + chain, "sha256")
    assert base64.b64decode(envelope["mac"]) == expected
    assert all(s.authentic(MAC_KEY) for s in stored)
    assert not stored[2].authentic(bytes(32))


def test_appends_made_during_an_fsync_share_the_next_one(tmp_path, open_log):
    log = open_log(tmp_path, fsync=slow_fsync(0.005))

    async def appender(task: int) -> list[int]:
        # Each appender waits for its record before sending the next, as a server handler does.
        return [(await log.append(make_record(task * 100 + n))).sequence for n in range(10)]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(appender(task) for task in range(20)))

    sequences = [s for per_task in asyncio.run(main()) for s in per_task]
    assert sorted(sequences) == list(range(200))
    stats = log.stats
    assert stats.records == 200
    assert stats.batches <= 40 and stats.fsyncs <= 45  # about one batch per appender round


def test_one_fsync_per_record_when_batches_are_one_record(tmp_path, open_log):
    log = open_log(tmp_path, max_batch=1)

    async def main() -> None:
        await asyncio.gather(*(log.append(make_record(n)) for n in range(50)))

    asyncio.run(main())
    assert log.stats.batches == 50 and log.stats.fsyncs >= 50


def test_sequences_follow_the_order_of_append_calls(tmp_path, open_log):
    log = open_log(tmp_path, fsync=slow_fsync(0.05))

    async def main() -> tuple[Appended, Appended]:
        first = asyncio.ensure_future(log.append(make_record(0)))
        second = asyncio.ensure_future(log.append(make_record(1)))
        return await first, await second

    first, second = asyncio.run(main())
    assert (first.sequence, second.sequence) == (0, 1)


def test_segments_rotate_by_size_and_reopen_continues(tmp_path, open_log, write_log, signing_key):
    write_log(tmp_path, 60, segment_bytes=2048)
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    assert all(path.stat().st_size <= 2048 for _, path in segments)
    assert [first for first, _ in segments] == sorted(first for first, _ in segments)

    log = open_log(tmp_path, segment_bytes=2048)
    assert log.recovery.size == 60 and log.recovery.torn_tails == ()
    assert log.append_sync(make_record(60)).sequence == 60
    log.close_sync()
    report = verify_log(tmp_path, verifier(signing_key), ORIGIN)
    assert report.ok and report.size == 61 and report.proven_size == 61


def test_a_record_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path, open_log):
    log = open_log(tmp_path, segment_bytes=256)
    big = {"decision_id": "big", "blob": "x" * 1000}
    for record in (make_record(0), big, make_record(1)):
        log.append_sync(record)
    log.close_sync()
    assert len(list_segments(tmp_path)) == 3
    assert [s.record for s in iter_records(tmp_path)][1] == big


def test_checkpoints_every_n_records_and_on_close(tmp_path, open_log, signing_key):
    log = open_log(tmp_path, checkpoint_every=10)
    for n in range(35):
        log.append_sync(make_record(n))
    assert latest(tmp_path, signing_key).size == 30
    log.close_sync()
    assert latest(tmp_path, signing_key).size == 35
    assert log.stats.checkpoints == 4


def test_checkpoints_after_t_seconds_only_when_the_log_grew(tmp_path, open_log, signing_key):
    log = open_log(tmp_path, checkpoint_seconds=0.2)
    log.append_sync(make_record(0))
    deadline = time.monotonic() + 5
    while log.stats.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert latest(tmp_path, signing_key).size == 1
    time.sleep(0.5)
    assert log.stats.checkpoints == 1  # nothing new, nothing signed


def test_close_is_final(tmp_path, open_log):
    log = open_log(tmp_path)
    log.append_sync(make_record(0))

    async def main() -> None:
        await log.close()
        await log.close()
        with pytest.raises(AuditWriteError, match="closed"):
            await log.append(make_record(1))

    asyncio.run(main())


def test_unloggable_records_use_no_sequence(tmp_path, open_log):
    log = open_log(tmp_path)
    for bad in ({"x": {1, 2}}, {"x": float("nan")}, {"x": "\ud800"}):
        with pytest.raises(AuditRecordError):
            log.append_sync(bad)
    assert log.append_sync(make_record(0)).sequence == 0


def test_append_all_keeps_order_and_a_bad_record_leaves_the_earlier_ones_durable(
    tmp_path, open_log
):
    log = open_log(tmp_path)

    async def main() -> tuple[list[Appended], list[int]]:
        batch = await log.append_all([make_record(n) for n in range(4)])
        with pytest.raises(AuditRecordError):
            await log.append_all([make_record(10), {"x": float("nan")}, make_record(11)])
        return batch, [(await log.append(make_record(12))).sequence]

    batch, after = asyncio.run(main())
    assert [a.sequence for a in batch] == [0, 1, 2, 3]
    assert after == [5]  # record 10 took sequence 4; the bad one and those after it, none
    assert [s.record for s in iter_records(tmp_path)] == [
        *(make_record(n) for n in range(4)),
        make_record(10),
        make_record(12),
    ]


def test_one_writer_per_directory(tmp_path, open_log):
    open_log(tmp_path)
    with pytest.raises(AuditError, match="in use"):
        open_log(tmp_path)


def test_a_directory_of_another_log_is_refused(tmp_path, open_log, signing_key):
    from service.audit import AuditLog

    log = AuditLog(tmp_path, signer=signer(signing_key), mac_key=MAC_KEY, origin="other/log")
    log.close_sync()
    with pytest.raises(AuditError, match="holds the log of"):
        open_log(tmp_path)


class Disk:
    """An fsync that works until the test breaks the disk."""

    def __init__(self) -> None:
        self.broken: OSError | None = None

    def fsync(self, fd: int) -> None:
        if self.broken is not None:
            raise self.broken
        os.fsync(fd)


def test_write_failure_fails_the_batch_and_every_later_append(tmp_path, open_log):
    disk = Disk()
    log = open_log(tmp_path, fsync=disk.fsync)
    log.append_sync(make_record(0))
    disk.broken = OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        results = await asyncio.gather(
            *(log.append(make_record(n)) for n in range(1, 6)), return_exceptions=True
        )
        assert all(isinstance(result, AuditWriteError) for result in results)
        assert log.failed
        disk.broken = None  # the disk is back, but a failed log stays failed
        with pytest.raises(AuditWriteError, match="has failed"):
            await log.append(make_record(6))

    with capture_logs() as logs:
        asyncio.run(main())
    assert [entry["event"] for entry in logs] == ["audit.write_failed"]
    assert "record" not in logs[0]


def test_close_fails_when_the_final_checkpoint_cannot_be_written(tmp_path, open_log):
    disk = Disk()
    log = open_log(tmp_path, fsync=disk.fsync)
    log.append_sync(make_record(0))
    disk.broken = OSError(errno.ENOSPC, "No space left on device")
    with capture_logs(), pytest.raises(AuditWriteError, match="No space left"):
        log.close_sync()
    assert log.failed


def test_torn_final_record_is_cut_off_with_a_warning(tmp_path, open_log, write_log, signing_key):
    write_log(tmp_path, 12, segment_bytes=1024)
    _, last = list_segments(tmp_path)[-1]
    size = last.stat().st_size
    torn = frame(b'{"chain":"...","record":{"decision_id":"never-acknowledged"},"seq":12}')
    with last.open("ab") as file:
        file.write(torn[:30])

    with capture_logs() as logs:
        log = open_log(tmp_path)
    assert logs == [
        {
            "event": "audit.torn_tail_truncated",
            "log_level": "warning",
            "file": last.name,
            "offset": size,
            "bytes": 30,
            "sequence": 12,
        }
    ]
    assert log.recovery.size == 12 and log.recovery.torn_tails[0].length == 30
    assert last.stat().st_size == size
    assert log.append_sync(make_record(12)).sequence == 12
    log.close_sync()
    assert verify_log(tmp_path, verifier(signing_key), ORIGIN).ok


def test_zero_filled_tail_is_torn_too(tmp_path, open_log, write_log):
    write_log(tmp_path, 3)
    _, last = list_segments(tmp_path)[-1]
    with last.open("ab") as file:
        file.write(bytes(4096))
    with capture_logs():
        log = open_log(tmp_path)
    assert log.recovery.torn_tails[0].length == 4096


def test_torn_checkpoint_is_cut_off(tmp_path, open_log, write_log, signing_key):
    write_log(tmp_path, 3)
    with (tmp_path / CHECKPOINT_FILE).open("ab") as file:
        file.write(frame(b"privscore.audit/x\n3\n")[:12])
    with capture_logs() as logs:
        log = open_log(tmp_path)
    assert logs[0]["event"] == "audit.torn_tail_truncated"
    assert logs[0]["file"] == CHECKPOINT_FILE and logs[0]["sequence"] is None
    log.close_sync()
    assert verify_log(tmp_path, verifier(signing_key), ORIGIN).ok


def corrupt_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_bad_record_before_the_end_is_refused_not_repaired(
    tmp_path, open_log, write_log, signing_key
):
    """Open reads the whole log: damage anywhere, even long checkpointed, is refused."""
    write_log(tmp_path, 12, segment_bytes=1024)
    _, first = list_segments(tmp_path)[0]
    corrupt_byte(first, 40)  # inside record 0's payload
    with pytest.raises(LogCorruptError) as raised:
        open_log(tmp_path)
    assert raised.value.sequence == 0 and "CRC" in str(raised.value)
    assert first.name in str(raised.value)
    assert verify_log(tmp_path, verifier(signing_key), ORIGIN).first_bad_sequence == 0


def test_a_bad_frame_followed_by_intact_ones_in_the_last_segment_is_refused(
    tmp_path, open_log, write_log
):
    write_log(tmp_path, 6)
    _, only = list_segments(tmp_path)[0]
    before = only.read_bytes()
    # A length field bent to point past the end would look like a torn tail, but intact frames
    # follow it: acknowledged records, which must never be cut off.
    data = bytearray(before)
    second_frame = 8 + int.from_bytes(data[:4], "big")
    data[second_frame + 1] = 0x7F
    only.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError) as raised:
        open_log(tmp_path)
    assert raised.value.sequence == 1
    assert only.read_bytes() == bytes(data)  # nothing was truncated


def reframe_with(path: Path, index: int, old: bytes, new: bytes) -> None:
    """Alter record `index` of a segment and give its frame a valid CRC again."""
    data, payloads, offset = path.read_bytes(), [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        payloads.append(data[offset + 4 : offset + 4 + length])
        offset += 8 + length
    assert old in payloads[index]
    payloads[index] = payloads[index].replace(old, new)
    path.write_bytes(b"".join(frame(payload) for payload in payloads))


@pytest.mark.parametrize("altered", [3, 8])
def test_an_altered_record_with_a_valid_frame_is_refused(
    tmp_path, open_log, write_log, signing_key, altered
):
    """Records the latest checkpoint covers are checked against its root, later ones against
    the chain: an alteration is refused either way."""
    write_log(tmp_path, 10, checkpoint_every=5)
    notes = tmp_path / CHECKPOINT_FILE
    first_note = 8 + int.from_bytes(notes.read_bytes()[:4], "big")
    notes.write_bytes(notes.read_bytes()[:first_note])  # the latest checkpoint is now at 5
    assert latest(tmp_path, signing_key).size == 5
    _, only = list_segments(tmp_path)[0]
    reframe_with(only, altered, b"pseudo-", b"PSEUDO-")
    with pytest.raises(LogCorruptError) as raised:
        open_log(tmp_path)
    message = str(raised.value)
    assert ("no longer give the latest signed checkpoint" in message) == (altered < 5)
    assert ("chain does not follow" in message) == (altered >= 5)


def test_a_log_shorter_than_its_latest_checkpoint_is_refused(tmp_path, open_log, write_log):
    write_log(tmp_path, 30, segment_bytes=1024)
    list_segments(tmp_path)[-1][1].unlink()
    with pytest.raises(LogCorruptError, match="latest signed checkpoint covers 30"):
        open_log(tmp_path)


def test_records_after_the_latest_checkpoint_are_checked_against_the_chain(
    tmp_path, open_log, write_log
):
    write_log(tmp_path / "log", 4)
    log = open_log(tmp_path / "log", checkpoint_every=1000)
    for n in range(4, 8):
        log.append_sync(make_record(n))
    crashed = copy_log(tmp_path / "log", tmp_path / "crashed")
    log.close_sync()
    _, only = list_segments(crashed)[0]
    reframe_with(only, 6, b"pseudo-", b"PSEUDO-")
    with pytest.raises(LogCorruptError, match="chain does not follow") as raised:
        open_log(crashed)
    assert raised.value.sequence == 6


def test_a_torn_tail_after_the_latest_checkpoint_is_cut_where_it_starts(
    tmp_path, open_log, write_log
):
    write_log(tmp_path / "log", 5)
    log = open_log(tmp_path / "log", checkpoint_every=1000)
    for n in range(5, 9):
        log.append_sync(make_record(n))
    crashed = copy_log(tmp_path / "log", tmp_path / "crashed")
    log.close_sync()
    _, only = list_segments(crashed)[0]
    intact = only.stat().st_size
    with only.open("ab") as segment:
        segment.write(frame(b'{"chain":"x","record":{},"seq":9}')[:-7])  # an interrupted append

    reopened = open_log(crashed)
    assert (reopened.recovery.checkpointed, reopened.recovery.size) == (5, 9)
    [torn] = reopened.recovery.torn_tails
    assert (torn.offset, torn.sequence) == (intact, 9)
    assert only.stat().st_size == intact
    assert reopened.append_sync(make_record(9)).sequence == 9
    reopened.close_sync()
    assert [s.record for s in iter_records(crashed)] == [make_record(n) for n in range(10)]
