"""`privscore audit verify|prove|show|export` against the database log, through the real command
line (each call its own process), on a log PgAuditLog wrote under a data directory's keys: the
export a reviewer verifies offline, proofs checked by `audit verify-proof`, lookups, tampering
named by its sequence, and the database's settings and password handled as `db migrate` handles
them. (`audit replay` against the database: tests/db/test_import.py, on a real server's
decisions.)"""

from __future__ import annotations

import asyncio
import json
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.audit import Signer, VerifierKey, iter_records
from service.audit.pg import PgAuditLog
from service.config import DataLayout
from service.db import migrate, open_async_pool
from service.files import write_private
from service.privacy.admin import init_keys
from service.privacy.digest import derive_audit_mac_key
from service.privacy.keyring import Keyring, load_kek
from tests.conftest import privscore_cli
from tests.db.fake_postgres import PasswordRefusingServer

ORIGIN = "privscore.audit/cli-db-test"
SECRET = "Pw-0f-the-audit-db-4417"
LEGACY_ID = "dec-legacy-0007"  # not a UUID: the database's index does not hold it
CANARY = "CANARY-review-3c1e"  # record content that must not reach an error


@dataclass(frozen=True)
class Deployment:
    data_dir: Path
    database: Any
    records: list[dict[str, Any]]
    verifier: VerifierKey

    def cli(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return privscore_cli(self.data_dir, *args, env=env)

    def audit(self, command: str, *args: str, env: dict[str, str] | None = None) -> Any:
        """`privscore audit COMMAND --database-url URL ARGS`."""
        return self.cli("audit", command, "--database-url", self.database.url, *args, env=env)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.database.connect() as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []


def record(n: int) -> dict[str, Any]:
    return {
        "decision_id": LEGACY_ID if n == 7 else str(uuid.uuid4()),
        "rpc": "privscore.v1.ScoringService/Score",
        "subject": f"pseudo-{n % 3}",
        "time": f"2026-12-02T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "outputs": {"score": 600 + n, "reasons": ["R1", "R7"]},
        "note": CANARY,
    }


@pytest.fixture
def deployment(postgres_database: Any, tmp_path: Path) -> Deployment:
    """A data directory with the server's keys and its published verifier key, and a migrated
    database holding 40 records PgAuditLog appended under those keys (checkpointed at 30 and,
    at close, at 40)."""
    data_dir = tmp_path / "var"
    layout = DataLayout(data_dir)
    init_keys(layout, layout.keyring, layout.dev_kek)
    keyring = Keyring.load(layout.keyring, load_kek(layout.dev_kek))
    signer = Signer(ORIGIN, keyring.audit_signing_key()[1])
    mac_key = derive_audit_mac_key(keyring.server_secret())
    with postgres_database.connect() as conn:
        migrate(conn)
    records = [record(n) for n in range(40)]

    async def main() -> None:
        pool = await open_async_pool(postgres_database.kwargs, min_size=1, max_size=4)
        try:
            log = await PgAuditLog.open(pool, signer=signer, mac_key=mac_key, origin=ORIGIN)
            await log.append_all(records[:30])
            await log.checkpoint()
            await log.append_all(records[30:])
            await log.close()
        finally:
            await pool.close()

    asyncio.run(main())
    # What the server publishes for reviewers beside its keys.
    write_private(layout.audit_verifier_key, (signer.verifier.text + "\n").encode())
    return Deployment(data_dir, postgres_database, records, signer.verifier)


def report(done: Any) -> dict[str, Any]:
    assert CANARY not in done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_export_writes_a_copy_a_reviewer_verifies_offline(deployment, tmp_path) -> None:
    out = tmp_path / "for-the-reviewer"
    exported = deployment.audit("export", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert report(exported) == {
        "directory": str(out),
        "records": 40,
        "checkpoints": 2,
        "segments": 1,
        "bytes": report(exported)["bytes"],
    }
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()} == {0o600}
    rows = deployment.sql("SELECT envelope FROM audit_entries ORDER BY sequence")
    assert [stored.envelope for stored in iter_records(out)] == [bytes(row[0]) for row in rows]

    # The reviewer's command: the copy, the key and origin they were given; the keyring under
    # the data directory makes it check every record's MAC too.
    verified = deployment.cli(
        "audit",
        "verify",
        "--audit-dir",
        str(out),
        "--verifier-key",
        deployment.verifier.text,
        "--origin",
        ORIGIN,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checked = report(verified)
    assert checked["ok"] and checked["size"] == 40 and checked["proven_size"] == 40
    assert checked["mac_checked"] and checked["unauthenticated_records"] == 0

    again = deployment.audit("export", "--out", str(out))
    assert again.returncode == 1 and "is not empty" in again.stderr


def test_verify_reads_the_database_with_its_identity_and_the_published_key(
    deployment, tmp_path
) -> None:
    """No --origin (the identity row's) and no --verifier-key (the data directory's published
    file); the temporary export is gone afterwards."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = deployment.audit("verify", env={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stdout + done.stderr
    checked = report(done)
    assert checked["ok"] and checked["size"] == 40 and checked["proven_size"] == 40
    assert checked["checkpoints"] == 2 and checked["mac_checked"]
    assert list(scratch.iterdir()) == []
    # The whole stream of records, as `audit export` prints a file log's.
    printed = deployment.audit("export")
    assert printed.returncode == 0, printed.stderr
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    assert [line["record"] for line in lines] == deployment.records


def test_prove_from_the_database_and_check_the_proof_offline(deployment, tmp_path) -> None:
    for n in (0, 29, LEGACY_ID):
        decision = n if isinstance(n, str) else deployment.records[n]["decision_id"]
        proved = deployment.audit("prove", "--decision", decision)
        assert proved.returncode == 0, proved.stderr
        proof = report(proved)
        assert proof["sequence"] == (7 if n == LEGACY_ID else n) and proof["tree_size"] == 40
        if n == LEGACY_ID:  # not in the index: found by reading the whole log
            assert "the database's decision index does not hold it" in proved.stderr
        else:
            assert proved.stderr == ""
        proof_file = tmp_path / f"proof-{n}.json"
        proof_file.write_text(proved.stdout)
        checked = deployment.cli(
            "audit",
            "verify-proof",
            "--verifier-key",
            deployment.verifier.text,
            "--origin",
            ORIGIN,
            str(proof_file),
        )
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["ok"]

    unknown = deployment.audit("prove", "--decision", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no record has decision_id" in unknown.stderr


def test_checkpoint_and_consistency_from_the_database(deployment, tmp_path) -> None:
    """The latest signed checkpoint exported from the database, and a consistency proof from
    the earlier one to it, checked as the file log's are."""
    latest = tmp_path / "latest.note"
    exported = deployment.audit("checkpoint", "--out", str(latest))
    assert exported.returncode == 0, exported.stderr
    note = latest.read_text()
    [(stored,)] = deployment.sql("SELECT note FROM audit_checkpoints WHERE tree_size = 40")
    assert note.encode() == bytes(stored) and "\n40\n" in note
    [(older,)] = deployment.sql("SELECT note FROM audit_checkpoints WHERE tree_size = 30")
    earlier = tmp_path / "earlier.note"
    earlier.write_bytes(bytes(older))
    proved = deployment.audit("consistency", "--old", str(earlier), "--new", str(latest))
    assert proved.returncode == 0, proved.stderr
    assert report(proved)["ok"] and report(proved)["old_size"] == 30
    # A checkpoint of another tree of size 40 does not extend the earlier one.
    forged = tmp_path / "forged.note"
    forged.write_text(note.replace(note.splitlines()[2], "A" * 43 + "="))
    refused = deployment.audit("consistency", "--old", str(earlier), "--new", str(forged))
    assert refused.returncode == 1


def test_show_finds_the_record_in_the_database(deployment) -> None:
    wanted = deployment.records[12]["decision_id"]
    shown = deployment.audit("show", "--decision", wanted)
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(line["seq"], line["record"]) for line in lines] == [(12, deployment.records[12])]
    by_subject = deployment.audit("show", "--subject", "pseudo-2")
    assert [json.loads(line)["seq"] for line in by_subject.stdout.splitlines()] == list(
        range(2, 40, 3)
    )
    opened = deployment.audit("show", "--open", "--decision", wanted)
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["seq"] == 12


def test_a_tampered_row_fails_verify_naming_its_sequence(deployment, tmp_path) -> None:
    (row,) = deployment.sql("SELECT envelope FROM audit_entries WHERE sequence = 12")
    edited = bytes(row[0]).replace(b'"score":612', b'"score":712')
    deployment.sql("UPDATE audit_entries SET envelope = %s WHERE sequence = 12", (edited,))

    done = deployment.audit("verify")
    assert done.returncode == 1
    checked = report(done)
    assert not checked["ok"] and checked["first_bad_sequence"] == 12
    assert "record 12" in checked["reason"]
    # The lookup reads the edited record and refuses it against the signed checkpoint.
    proved = deployment.audit("prove", "--decision", deployment.records[12]["decision_id"])
    assert proved.returncode == 1 and "record 12" in proved.stderr
    assert CANARY not in proved.stdout + proved.stderr


def test_an_explicit_audit_dir_beats_the_environment_and_both_flags_are_refused(
    deployment, tmp_path
) -> None:
    out = tmp_path / "copy"
    assert deployment.audit("export", "--out", str(out)).returncode == 0
    flags = ["--verifier-key", deployment.verifier.text, "--origin", ORIGIN]
    by_directory = deployment.cli(
        "audit",
        "verify",
        "--audit-dir",
        str(out),
        *flags,
        env={"PRIVSCORE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert by_directory.returncode == 0, by_directory.stderr
    both = deployment.audit("verify", "--audit-dir", str(out), *flags)
    assert both.returncode == 2 and "not both" in both.stderr


def test_a_database_without_a_log_is_named(postgres_database, tmp_path) -> None:
    with postgres_database.connect() as conn:
        migrate(conn)
    done = privscore_cli(
        tmp_path / "var", "audit", "verify", "--database-url", postgres_database.url
    )
    assert done.returncode == 1
    assert "audit_log_identity has no row" in done.stderr
    assert "holds no audit log" in done.stderr


def test_the_database_password_is_never_shown(tmp_path) -> None:
    password_file = tmp_path / "db-password"
    password_file.write_text(SECRET + "\n")
    with PasswordRefusingServer(echo_password=True) as server:
        for command in (["verify"], ["prove", "--decision", "d"], ["show"], ["export"]):
            done = privscore_cli(
                tmp_path / "var",
                "audit",
                *command,
                "--database-url",
                server.url(),
                "--database-password-file",
                str(password_file),
            )
            assert done.returncode == 1, done.stderr
            assert "password authentication failed" in done.stderr
            assert SECRET not in done.stdout + done.stderr
        assert server.received == [SECRET] * 4
