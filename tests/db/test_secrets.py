"""The database password reaches the server and nothing else: no error message, log line,
`repr` or command output holds it.

A server that requires a password is needed to see a real refusal: PostgreSQL on this machine
trusts local connections, so those tests use `PasswordRefusingServer` (the real libpq client
path against a listener that asks for the password and refuses it). The real PostgreSQL covers
errors raised after the password was sent (a missing database) and a successful migration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import structlog

from service.db import (
    DATABASE_PASSWORD_ENV,
    DatabaseSettings,
    DatabaseUnavailable,
    connect,
    connection_kwargs,
    migrate,
    open_async_pool,
)
from tests.conftest import REPO_ROOT
from tests.db.fake_postgres import PasswordRefusingServer

SECRET = "Pw-0f-the-privscore-db-7731"


def privscore_db(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "db", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
    )


def sources(server_url: str, tmp_path: Path) -> list[tuple[list[str], dict[str, str]]]:
    """The password in each of its three places: (arguments, environment)."""
    password_file = tmp_path / "db-password"
    password_file.write_text(SECRET + "\n")
    with_password = server_url.replace("svc@", f"svc:{SECRET}@")
    return [
        (["--database-url", server_url, "--database-password-file", str(password_file)], {}),
        (["--database-url", server_url], {DATABASE_PASSWORD_ENV: SECRET}),
        ([], {"PRIVSCORE_DATABASE_URL": with_password}),
    ]


def test_a_refused_password_is_not_in_the_error(tmp_path: Path) -> None:
    with PasswordRefusingServer(echo_password=True) as server:
        kwargs = connection_kwargs(DatabaseSettings(server.url()), {DATABASE_PASSWORD_ENV: SECRET})
        assert kwargs is not None
        with structlog.testing.capture_logs() as logs, pytest.raises(DatabaseUnavailable) as raised:
            connect(kwargs)
    assert server.received == [SECRET]  # it was sent, and the server's refusal quoted it
    error = raised.value
    assert "password authentication failed" in str(error)
    assert error.__suppress_context__  # the unscrubbed original is not chained into tracebacks
    shown = [str(error), repr(error), "".join(traceback.format_exception(error)), repr(kwargs)]
    shown += [repr(entry) for entry in logs]
    assert all(SECRET not in text for text in shown)


def test_the_command_line_never_prints_the_password(tmp_path: Path) -> None:
    with PasswordRefusingServer(echo_password=True) as server:
        for arguments, env in sources(server.url(), tmp_path):
            for command in ("status", "migrate"):
                done = privscore_db(command, *arguments, env=env)
                assert done.returncode == 1, done.stderr
                assert "password authentication failed" in done.stderr
                assert SECRET not in done.stdout + done.stderr
        assert server.received == [SECRET] * 6


def test_a_pool_that_cannot_open_says_why_without_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def open_pool(url: str) -> None:
        kwargs = connection_kwargs(DatabaseSettings(url), {DATABASE_PASSWORD_ENV: SECRET})
        assert kwargs is not None
        await open_async_pool(kwargs, timeout_s=1.0)

    caplog.set_level(logging.DEBUG)
    with PasswordRefusingServer() as server, pytest.raises(DatabaseUnavailable) as raised:
        asyncio.run(open_pool(server.url()))
    assert server.received and set(server.received) == {SECRET}
    assert "password authentication failed" in str(raised.value)
    assert SECRET not in str(raised.value)
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_on_the_real_server_no_output_holds_the_password(postgres_database, tmp_path: Path) -> None:
    """PostgreSQL here trusts the connection, so the password is sent and ignored: a successful
    migration and a refusal after the handshake (no such database) must not show it."""
    password_file = tmp_path / "db-password"
    password_file.write_text(SECRET)
    migrated = privscore_db(
        "migrate",
        "--database-url",
        postgres_database.url,
        "--database-password-file",
        str(password_file),
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "db.migration_applied" in migrated.stdout and "up to date" in migrated.stdout
    missing = postgres_database.server.database_url(postgres_database.name + "_missing")
    refused = privscore_db("status", "--database-url", missing, env={DATABASE_PASSWORD_ENV: SECRET})
    assert refused.returncode == 1
    assert "does not exist" in refused.stderr
    for done in (migrated, refused):
        assert SECRET not in done.stdout + done.stderr

    kwargs = connection_kwargs(
        DatabaseSettings(postgres_database.url), {DATABASE_PASSWORD_ENV: SECRET}
    )
    assert kwargs is not None
    with structlog.testing.capture_logs() as logs, connect(kwargs) as conn:
        migrate(conn)  # nothing pending: logs nothing, but must not fail with the password set
        assert SECRET not in repr(conn) and SECRET not in str(conn.info.dsn)
    assert all(SECRET not in repr(entry) for entry in logs)
