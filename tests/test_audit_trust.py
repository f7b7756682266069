"""The audit log's trust properties on a real server, attacked as someone with write access to
a stopped server's data directory would: a forged record appended after the last checkpoint, a
checkpoint signed by a foreign key, a log cut shorter than a signed checkpoint; and the signing
key rotated with `privscore audit rotate-key`, across restarts, with `audit verify` over both
keys. Each attack goes through the real server start and the real CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from service.audit import VerifierKey, format_checkpoint, iter_records, read_identity
from service.audit.storage import CHECKPOINT_FILE, canonical_json, frame, seal_envelope
from service.config import DataLayout
from tests.audit.test_trust import last_segment
from tests.conftest import ServerProcess, applicants, audit_log_key
from tests.conftest import privscore_cli as privscore
from tests.test_limits import GOOD_SCORE, account
from tests.test_model_serving import serve_once


def run_decisions(data_dir: Path, *, start: int = 0, count: int = 3) -> list[str]:
    """Start a server, make a few decisions, stop it cleanly; their decision ids."""
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            ids = [
                client.score("t", f"s-{n}", applicants()[n]).metadata.decision_id
                for n in range(start, start + count)
            ]
            limit = client.adjust_limit(
                "t", f"l-{start}", account(), latest_score=GOOD_SCORE, request_id=f"r-{start}"
            )
            ids.append(limit.metadata.decision_id)
    finally:
        assert server.terminate() == 0
    return ids


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The reason a server gave for refusing to start."""
    assert result.returncode == 1, result.stdout[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "server.ready" not in [e["event"] for e in events]
    [refusal] = [e for e in events if e["event"] == "server.refused_to_start"]
    return str(refusal["reason"])


def verify(data_dir: Path, *flags: str) -> dict[str, Any]:
    result = privscore(data_dir, "audit", "verify", *flags)
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if report["ok"] else 1)
    return report


def test_a_record_appended_to_a_stopped_servers_log_is_refused_and_reported(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    run_decisions(data_dir)
    audit_dir = DataLayout(data_dir).audit_dir
    records = list(iter_records(audit_dir))
    # The forger copies a real record, changes the outcome, and frames and chains it properly,
    # with a MAC under a key of their own: the server's secret is not on the disk in clear.
    forged = {**records[0].record, "decision_id": "00000000-0000-4000-8000-000000000000"}
    envelope, _ = seal_envelope(len(records), canonical_json(forged), records[-1].chain, bytes(32))
    segment = last_segment(audit_dir)
    with segment.open("ab") as handle:
        handle.write(frame(envelope))

    reason = refused(serve_once(data_dir))
    assert str(segment) in reason and f"record {len(records)}" in reason
    assert "did not write it" in reason

    report = verify(data_dir)  # with the server's keyring: every record's MAC is checked
    assert report["ok"] is False and report["first_bad_sequence"] == len(records)
    assert report["mac_checked"] is True
    blind = verify(data_dir, "--no-mac")  # a reviewer without the secret
    assert blind["ok"] is True and blind["unauthenticated_records"] == 1


def test_a_checkpoint_signed_by_a_foreign_key_is_refused_at_start(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from service.audit import Signer, verify_log

    data_dir = tmp_path / "var"
    run_decisions(data_dir)
    layout = DataLayout(data_dir)
    verifier, origin = audit_log_key(data_dir)
    root = verify_log(layout.audit_dir, verifier, origin).root_hash
    size = len(list(iter_records(layout.audit_dir)))
    stranger = Signer(verifier.name, Ed25519PrivateKey.generate())
    note = format_checkpoint(origin, size, root, signers=[stranger])
    with (layout.audit_dir / CHECKPOINT_FILE).open("ab") as handle:
        handle.write(frame(note.encode()))
    reason = refused(serve_once(data_dir))
    assert str(layout.audit_dir / CHECKPOINT_FILE) in reason
    assert "not signed by the expected key" in reason and verifier.key_id.hex() in reason


def test_a_log_cut_shorter_than_its_signed_checkpoint_is_refused_at_start(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    run_decisions(data_dir)
    segment = last_segment(DataLayout(data_dir).audit_dir)
    data = segment.read_bytes()
    first = 8 + int.from_bytes(data[:4], "big")
    segment.write_bytes(data[:first])  # one whole record left: a cut at a record boundary
    reason = refused(serve_once(data_dir))
    assert str(DataLayout(data_dir).audit_dir / CHECKPOINT_FILE) in reason
    assert "segments hold only 1" in reason


def test_each_deployment_signs_under_its_own_origin_and_publishes_its_verifier_key(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    run_decisions(first, count=1)
    run_decisions(second, count=1)
    (key_a, origin_a), (key_b, origin_b) = audit_log_key(first), audit_log_key(second)
    assert origin_a != origin_b and origin_a.startswith("privscore.audit/")
    assert key_a.name == origin_a and key_b.name == origin_b  # a witness's convention
    # The published verifier key is the signed-note form a witness configures.
    assert DataLayout(first).audit_verifier_key.read_text() == key_a.text + "\n"
    assert VerifierKey.parse(key_a.text) == key_a
    assert verify(first)["ok"] is True
    # Verify checks the key's name too: the right key under another name does not verify.
    renamed = VerifierKey("someone.else/log", key_a.public_key)
    report = verify(first, "--verifier-key", renamed.text)
    assert report["ok"] is False

    configured = tmp_path / "c"
    server = ServerProcess(configured, "--audit-origin", "lender.example/privscore")
    assert server.terminate() == 0
    identity = read_identity(DataLayout(configured).audit_dir)
    assert identity is not None and identity.origin == "lender.example/privscore"
    # A data directory keeps its origin: another one configured later is refused by name.
    reason = refused(serve_once(configured, "--audit-origin", "other.example/log"))
    assert "lender.example/privscore" in reason and "other.example/log" in reason


def test_rotating_the_signing_key_keeps_the_log_verifiable_across_both_keys(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    before = run_decisions(data_dir)
    old_key, origin = audit_log_key(data_dir)

    result = privscore(data_dir, "audit", "rotate-key")
    assert result.returncode == 0, result.stderr
    rotated = json.loads(result.stdout)
    new_key = VerifierKey.parse(rotated["new_verifier_key"])
    assert rotated["old_verifier_key"] == old_key.text and new_key != old_key
    assert new_key.name == old_key.name == origin
    assert DataLayout(data_dir).audit_verifier_key.read_text() == new_key.text + "\n"
    listing = json.loads(privscore(data_dir, "keys", "list").stdout)
    statuses = {k["key_id"]: k["status"] for k in listing if k["purpose"] == "audit-signing"}
    assert statuses == {rotated["old_key_id"]: "retired", rotated["new_key_id"]: "primary"}

    # The server restarts under the new key; the decision store (sealed under the server's
    # secret, not the signing key) still opens: a retried limit request replays.
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            again = client.adjust_limit(
                "t", "l-0", account(), latest_score=GOOD_SCORE, request_id="r-0"
            )
            assert again.replayed
            after = client.score("t", "s-after", applicants()[5]).metadata.decision_id
    finally:
        assert server.terminate() == 0

    report = verify(data_dir)
    assert report["ok"] is True, report["problems"]
    assert [k["verifier_key"] for k in report["keys"]] == [old_key.text, new_key.text]
    # A reviewer who kept the old key verifies the whole log too: the rotation record,
    # signed by both keys, introduces the new one.
    assert verify(data_dir, "--verifier-key", old_key.text)["ok"] is True
    for decision in (before[0], after):
        proof = privscore(data_dir, "audit", "prove", "--decision", decision)
        assert proof.returncode == 0, proof.stderr
