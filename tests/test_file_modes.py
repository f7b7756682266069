"""Everything the server and the CLI create under the data directory is owner-only, whatever the
umask: files 0600, directories 0700. The real server and the real commands run under umask 022
(the usual default, which leaves new files world-readable), then every path is checked."""

from __future__ import annotations

import base64
import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from privscore.v1 import alert_service_pb2 as alert_pb
from service.config import DataLayout
from service.decisions.store import DecisionStore
from service.files import private_dir, write_private
from service.privacy.admin import init_keys
from service.security.certs import init_certs
from tests.conftest import REPO_ROOT, ServerProcess, applicants
from tests.test_alerts import cny, event
from tests.test_limits import GOOD_SCORE, account

OPEN_UMASK = 0o022


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def set_open_umask() -> None:
    os.umask(OPEN_UMASK)


def modes_under(root: Path) -> dict[str, str]:
    """Every path under `root` (itself included) that is not owner-only, with its mode."""
    wrong = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            expected = 0o700
        elif stat.S_ISREG(info.st_mode):
            expected = 0o600
        else:
            wrong[str(path.relative_to(root))] = f"not a file or directory ({oct(info.st_mode)})"
            continue
        if mode != expected:
            wrong[str(path.relative_to(root))] = oct(mode)
    return wrong


def test_the_running_server_creates_only_owner_only_paths(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    with umask(OPEN_UMASK):  # keys and certificates are made in this process, as `make serve`
        server = ServerProcess(data_dir, preexec_fn=set_open_umask)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            client.score("t", "modes-1", applicants()[0])
            client.adjust_limit("t", "modes-1", account(), latest_score=GOOD_SCORE)
            missed = alert_pb.MissedPayment(amount_due=cny(5000), days_past_due=45)
            raised = client.evaluate_event("t", "modes-1", event(0, missed_payment=missed))
            assert raised.alerts  # the alerts table is written too
        # While it runs: SQLite's -wal and -shm exist only now (a clean close removes them).
        running = {path.name for path in data_dir.iterdir()}
        assert {"decisions.sqlite3-wal", "decisions.sqlite3-shm"} <= running
        assert modes_under(data_dir) == {}
    finally:
        assert server.terminate() == 0
    assert {"keys", "certs", "client", "audit", "decisions.sqlite3"} <= {
        path.name for path in data_dir.iterdir()
    }
    assert list((data_dir / "audit").iterdir())
    assert modes_under(data_dir) == {}


def run_cli(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        preexec_fn=set_open_umask,
    )


def test_the_key_and_certificate_commands_create_only_owner_only_paths(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "var"  # missing parents are created owner-only too
    run_cli("keys", "init", "--data-dir", str(data_dir))
    assert modes_under(tmp_path / "nested") == {}
    run_cli("certs", "init", "--data-dir", str(data_dir))
    assert modes_under(tmp_path / "nested") == {}
    layout = DataLayout(data_dir)
    before = layout.public_keyset.read_bytes()
    run_cli("keys", "rotate", "--data-dir", str(data_dir))
    assert layout.public_keyset.read_bytes() != before  # rewritten, and still owner-only
    new_kek = tmp_path / "new-kek"
    new_kek.write_text(base64.b64encode(os.urandom(32)).decode())
    run_cli("keys", "rewrap", "--data-dir", str(data_dir), "--new-kek-file", str(new_kek))
    assert modes_under(tmp_path / "nested") == {}
    assert sorted(path.name for path in layout.keys_dir.iterdir()) == [
        "audit-signing.pub",
        "kek",
        "keyring.json",
        "public-keys.json",
    ]  # no temporary file left behind


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o022, 0o077])
def test_owner_only_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    data_dir = tmp_path / "var"
    layout = DataLayout(data_dir)
    with umask(mask):
        init_keys(layout, layout.keyring, layout.dev_kek)
        init_certs(layout.certs_dir)
        store = DecisionStore(layout.decision_store, bytes(32))
        try:
            assert store.last_alert_sequence() == 0  # opens WAL: -wal and -shm exist now
            assert modes_under(data_dir) == {}
        finally:
            store.close()
    assert modes_under(data_dir) == {}


def test_an_older_world_readable_store_is_tightened_at_open(tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite3"
    DecisionStore(path, bytes(32)).close()
    path.chmod(0o644)
    DecisionStore(path, bytes(32)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_existing_directory_is_left_as_the_operator_made_it(tmp_path: Path) -> None:
    """`--data-dir` or `--keyring` may name a directory someone else shares: not ours to chmod."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    write_private(shared / "file", b"x")
    assert private_dir(shared) == shared
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "file").stat().st_mode) == 0o600
