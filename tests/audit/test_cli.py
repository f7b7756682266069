"""`privscore audit ...` commands, called in-process on logs the tests write."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import establish_identity
from service.audit.cli import add_audit_commands
from service.audit.storage import CHECKPOINT_FILE, frame, list_segments

from .conftest import ORIGIN, make_record, verifier


def run(argv: list[str], **defaults: Any) -> int:
    parser = argparse.ArgumentParser(prog="privscore")
    add_audit_commands(parser.add_subparsers(dest="command", required=True), **defaults)
    args = parser.parse_args(argv)
    return int(args.run(args))


def write_vkey(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_text(verifier(key).text + "\n")
    return path


@pytest.fixture
def env(tmp_path, write_log, signing_key):
    log = write_log(tmp_path / "log", 25, checkpoint_every=10)
    key = write_vkey(tmp_path / "audit.vkey", signing_key)
    return log, ["--audit-dir", str(log), "--verifier-key", str(key), "--origin", ORIGIN]


def test_verify_prints_the_report(env, capsys):
    _, flags = env
    assert run(["audit", "verify", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["size"] == 25 and report["proven_size"] == 25


def test_verify_against_an_exported_checkpoint_catches_truncation(env, tmp_path, capsys):
    log, flags = env
    exported = tmp_path / "kept-elsewhere.checkpoint"
    assert run(["audit", "checkpoint", *flags, "--out", str(exported)]) == 0
    assert exported.read_text().startswith(f"{ORIGIN}\n25\n")
    assert run(["audit", "verify", *flags, "--against", str(exported)]) == 0

    # Drop the last record and the checkpoints that cover it.
    _, segment = list_segments(log)[-1]
    data = segment.read_bytes()
    offset = 0
    for _ in range(24):
        offset += 8 + int.from_bytes(data[offset : offset + 4], "big")
    segment.write_bytes(data[:offset])
    (log / CHECKPOINT_FILE).write_bytes(b"")
    capsys.readouterr()
    assert run(["audit", "verify", *flags]) == 0
    capsys.readouterr()
    assert run(["audit", "verify", *flags, "--against", str(exported)]) == 1
    assert json.loads(capsys.readouterr().out)["first_bad_sequence"] == 24


def test_prove_then_verify_proof_offline(env, tmp_path, capsys):
    _, flags = env
    assert run(["audit", "prove", *flags, "--decision", "dec-0013"]) == 0
    printed = capsys.readouterr().out
    proof = json.loads(printed)
    assert proof["sequence"] == 13 and proof["tree_size"] == 25
    assert json.loads(proof["leaf"])["record"] == make_record(13)
    proof_file = tmp_path / "proof.json"
    proof_file.write_text(printed)
    key_flags = flags[2:]  # verify-proof needs no log
    assert run(["audit", "verify-proof", *key_flags, str(proof_file)]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "sequence": 13, "tree_size": 25}

    other = dict(proof, leaf=json.dumps(json.loads(proof["leaf"]) | {"record": make_record(14)}))
    forgeries = [
        other,  # another record under this record's proof
        dict(proof, sequence=14),
        dict(proof, tree_size=24),
        dict(proof, inclusion_proof=proof["inclusion_proof"][:-1]),
        dict(proof, inclusion_proof=[*proof["inclusion_proof"], proof["leaf_hash"]]),
        dict(proof, checkpoint=proof["checkpoint"].replace("\n25\n", "\n26\n")),
        dict(proof, sequence=True),
        {"sequence": 13},
        [proof],
    ]
    for forged in forgeries:
        proof_file.write_text(json.dumps(forged))
        assert run(["audit", "verify-proof", *key_flags, str(proof_file)]) == 1, forged
    stranger = write_vkey(tmp_path / "stranger.vkey", Ed25519PrivateKey.generate())
    proof_file.write_text(printed)
    assert (
        run(
            [
                "audit",
                "verify-proof",
                "--verifier-key",
                str(stranger),
                "--origin",
                ORIGIN,
                str(proof_file),
            ]
        )
        == 1
    )
    assert "not signed by the expected key" in capsys.readouterr().err


def test_prove_refuses_unknown_and_uncheckpointed_decisions(env, open_log, capsys):
    log, flags = env
    assert run(["audit", "prove", *flags, "--decision", "nope"]) == 1
    writer = open_log(log, checkpoint_every=1000)
    writer.append_sync(make_record(25))  # durable, but no checkpoint covers it yet
    assert run(["audit", "prove", *flags, "--decision", "dec-0025"]) == 1
    assert "newer than the latest checkpoint" in capsys.readouterr().err


def test_consistency_between_two_checkpoints(env, tmp_path, capsys):
    log, flags = env
    notes = []
    data, offset = (log / CHECKPOINT_FILE).read_bytes(), 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        notes.append(data[offset + 4 : offset + 4 + length].decode())
        offset += 8 + length
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text(notes[0])
    new.write_text(notes[-1])
    assert run(["audit", "consistency", *flags, "--old", str(old), "--new", str(new)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["old_size"], result["new_size"]) == (10, 25) and result["consistency_proof"]
    assert run(["audit", "consistency", *flags, "--old", str(new), "--new", str(old)]) == 1


def test_show_and_export(env, capsys):
    _, flags = env
    log_flag = flags[:2]

    def lines(argv: list[str]) -> list[dict[str, Any]]:
        capsys.readouterr()
        assert run(argv) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [e["seq"] for e in lines(["audit", "show", *log_flag, "--decision", "dec-0004"])] == [4]
    by_subject = lines(["audit", "show", *log_flag, "--subject", "pseudo-2"])
    assert [e["seq"] for e in by_subject] == list(range(2, 25, 3))
    window = ["--since", "2026-11-26T10:00:20Z", "--until", "2026-11-26T10:00:22Z"]
    assert [e["seq"] for e in lines(["audit", "show", *log_flag, *window])] == [20, 21]
    exported = lines(["audit", "export", *log_flag])
    assert [e["record"] for e in exported] == [make_record(n) for n in range(25)]
    with pytest.raises(SystemExit):
        run(["audit", "show", *log_flag, "--since", "yesterday"])


def test_defaults_can_be_injected(env, tmp_path, capsys):
    log, _ = env
    defaults = {
        "default_audit_dir": str(log),
        "default_verifier_key": str(tmp_path / "audit.vkey"),
        "default_origin": ORIGIN,
    }
    assert run(["audit", "verify"], **defaults) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    with pytest.raises(SystemExit):
        run(["audit", "verify"])  # without defaults the flags are required


def test_damaged_log_is_reported_not_raised(env, capsys):
    log, flags = env
    with (log / CHECKPOINT_FILE).open("ab") as file:
        file.write(frame(b"not a checkpoint"))
    assert run(["audit", "checkpoint", *flags]) == 1
    assert "privscore audit checkpoint:" in capsys.readouterr().err


def test_export_out_copies_what_verify_reads(env, tmp_path, capsys):
    log, flags = env
    establish_identity(log, ORIGIN)  # as the server writes it
    (log / "index").mkdir(exist_ok=True)  # derived data: not part of the copy
    out = tmp_path / "copy"
    capsys.readouterr()
    assert run(["audit", "export", *flags[:2], "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["records"], summary["checkpoints"]) == (25, 3)
    copied = sorted(path.name for path in out.iterdir())
    assert copied == sorted(
        [CHECKPOINT_FILE, "identity.json", *(path.name for _, path in list_segments(log))]
    )
    for name in copied:
        assert (out / name).read_bytes() == (log / name).read_bytes()
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert run(["audit", "verify", "--audit-dir", str(out), *flags[2:]]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert run(["audit", "export", *flags[:2], "--out", str(out)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert run(["audit", "export", "--audit-dir", str(tmp_path / "none"), "--out", "x"]) == 1
    assert "no audit log in" in capsys.readouterr().err
