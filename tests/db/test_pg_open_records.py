"""A reviewer opens a database log's format-3 records offline: `audit show --open` and `audit
replay` find the subject keys in the database the log is in, and a subject erased there no
longer opens."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import PostgresDatabase, ServerProcess, applicants, privscore_cli

TENANT = "t"


def audit(
    data_dir: Path, database: PostgresDatabase, *args: str
) -> subprocess.CompletedProcess[str]:
    return privscore_cli(data_dir, "audit", *args, "--database-url", database.url)


def test_show_open_and_replay_use_the_databases_subject_keys(
    replicas: Callable[[int], list[ServerProcess]],
    postgres_database: PostgresDatabase,
    data_dir: Path,
) -> None:
    (server,) = replicas(1)
    with server.channel() as channel:
        client = server.client(channel)
        kept = client.score(TENANT, "kept", applicants()[0])
        gone = client.score(TENANT, "gone", applicants()[1])
        pseudonym = client.subject(TENANT, "kept").pseudonym
        client.erase_subject(TENANT, customer_id="gone")
    shown = audit(
        data_dir, postgres_database, "show", "--open", "--decision", kept.metadata.decision_id
    )
    assert shown.returncode == 0, shown.stderr
    opened = json.loads(shown.stdout)["record"]["opened"]
    assert opened["subject"] == pseudonym and opened["encrypted_inputs"]
    replayed = audit(data_dir, postgres_database, "replay", "--decision", kept.metadata.decision_id)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["matches"]
    erased = audit(
        data_dir, postgres_database, "show", "--open", "--decision", gone.metadata.decision_id
    )
    assert erased.returncode == 1
    assert "destroyed subject key" in erased.stderr
