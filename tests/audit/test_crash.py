"""SIGKILL under concurrent load: every acknowledged record survives and the log verifies."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from structlog.testing import capture_logs

from service.audit import (
    AuditLog,
    Signer,
    VerifierKey,
    find_with_inclusion_proof,
    iter_records,
    latest_checkpoint,
    verify_log,
)
from service.audit.index import INDEX_DIR, find_decision

from .append_child import ORIGIN
from .conftest import MAC_KEY, index_contents

REPO_ROOT = Path(__file__).resolve().parents[2]
WANTED_ACKS = 1500
TIMEOUT_S = 30.0


def test_sigkill_loses_no_acknowledged_record(tmp_path):
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    directory = tmp_path / "log"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.audit.append_child", str(directory), str(key_file)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    enough = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.endswith("\n"):  # a line cut by the kill was never fully printed
                acknowledged.append(line)
            if len(acknowledged) >= WANTED_ACKS:
                enough.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    while not enough.wait(0.1):
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() - started < TIMEOUT_S, "child too slow"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    reader.join(timeout=10)  # lines already in the pipe were acknowledged before the kill

    with capture_logs():
        log = AuditLog(directory, signer=Signer(ORIGIN, key), mac_key=MAC_KEY, origin=ORIGIN)
    log.close_sync()
    stored = {record.sequence: record.record["decision_id"] for record in iter_records(directory)}
    for line in acknowledged:
        sequence, decision_id = line.split()
        assert stored.get(int(sequence)) == decision_id
    report = verify_log(directory, VerifierKey(ORIGIN, key.public_key()), ORIGIN, mac_key=MAC_KEY)
    assert report.ok, report.problems
    assert report.size == log.recovery.size >= len(acknowledged)
    assert report.checkpoints > 1

    # The lookup index the killed writer left was brought up to date at open: lookups answer
    # from it as the scan does, and it is what a rebuild from the records makes.
    checkpoint = latest_checkpoint(directory, VerifierKey(ORIGIN, key.public_key()), ORIGIN)
    assert checkpoint is not None and checkpoint.size == report.size
    for line in random.Random(5).sample(acknowledged, 100):
        sequence, decision_id = line.split()
        found = find_decision(directory, decision_id, checkpoint.size, checkpoint.root_hash)
        equals = {"decision_id": decision_id}
        assert found == find_with_inclusion_proof(directory, checkpoint.size, equals=equals)
        assert found is not None and found[0].sequence == int(sequence)
    kept = index_contents(directory)
    shutil.rmtree(directory / INDEX_DIR)
    with capture_logs():
        AuditLog(directory, signer=Signer(ORIGIN, key), mac_key=MAC_KEY, origin=ORIGIN).close_sync()
    assert index_contents(directory) == kept
