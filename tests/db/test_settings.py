"""Database settings: the URL and the password, parsed into connection kwargs without ever
echoing a secret (no PostgreSQL needed)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser
from service.db import (
    DATABASE_PASSWORD_ENV,
    ConnectionKwargs,
    DatabaseSettings,
    connection_kwargs,
    database_settings_from,
)
from service.settings import ConfigError
from tests.conftest import REPO_ROOT

SECRET = "s3cr/et?p@ss#w0rd:%"  # every character a URL parser might trip on
ENCODED = "s3cr%2Fet%3Fp%40ss%23w0rd%3A%25"


def kwargs_for(url: str | None, env: dict[str, str] | None = None, file: Path | None = None):
    return connection_kwargs(DatabaseSettings(url, file), environ=env or {})


def test_unset_means_the_embedded_default() -> None:
    assert kwargs_for(None) is None
    args = argparse.Namespace(database_url=None, database_password_file=None)
    assert database_settings_from(args, {}) == DatabaseSettings(None, None)


def test_flag_wins_over_environment(tmp_path: Path) -> None:
    args = argparse.Namespace(database_url="postgresql://a@h1/db1", database_password_file=None)
    env = {
        "PRIVSCORE_DATABASE_URL": "postgresql://b@h2/db2",
        "PRIVSCORE_DATABASE_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    settings = database_settings_from(args, env)
    assert settings == DatabaseSettings("postgresql://a@h1/db1", tmp_path / "pw")


def test_url_parts_become_libpq_kwargs() -> None:
    kwargs = kwargs_for(
        "postgresql://svc@db.internal:6432/privscore?sslmode=verify-full&application_name=x"
    )
    assert kwargs == {
        "user": "svc",
        "host": "db.internal",
        "port": "6432",
        "dbname": "privscore",
        "sslmode": "verify-full",
        "application_name": "x",
    }
    assert kwargs.describe() == "postgresql://svc@db.internal:6432/privscore"
    assert kwargs_for("postgres:///db?host=/run/postgresql") == {
        "dbname": "db",
        "host": "/run/postgresql",
    }


@pytest.mark.parametrize(
    ("url", "env", "source"),
    [
        (f"postgresql://svc:{ENCODED}@h/db", {}, "url"),
        ("postgresql://svc@h/db", {DATABASE_PASSWORD_ENV: SECRET}, "env"),
        ("postgresql://svc@h/db", {}, "file"),
    ],
)
def test_the_password_from_each_source(tmp_path: Path, url, env, source) -> None:
    file = None
    if source == "file":
        file = tmp_path / "password"
        file.write_text(SECRET + "\n")  # the trailing newline is not part of it
    kwargs = kwargs_for(url, env, file)
    assert kwargs.password == SECRET
    assert kwargs["user"] == "svc" and kwargs["dbname"] == "db"
    for shown in (repr(kwargs), str(kwargs), kwargs.describe(), f"{kwargs!r}"):
        assert SECRET not in shown and ENCODED not in shown and "[redacted]" in repr(kwargs)


def test_a_password_given_twice_is_refused_naming_the_sources(tmp_path: Path) -> None:
    file = tmp_path / "password"
    file.write_text("other")
    with pytest.raises(ConfigError) as raised:
        kwargs_for(f"postgresql://u:{ENCODED}@h/db", {DATABASE_PASSWORD_ENV: "x"}, file)
    message = str(raised.value)
    assert "the URL" in message and DATABASE_PASSWORD_ENV in message
    assert "--database-password-file" in message
    assert SECRET not in message and ENCODED not in message and "other" not in message


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://u:{SECRET}@h/db",  # wrong scheme
        f"postgresql://u:{SECRET}@h/db",  # '/', '?', '#', '@' not percent-encoded
        f"postgresql://u:{ENCODED}@h/db?password={ENCODED}",
        f"postgresql://u@h/db?PassWord={ENCODED}",
        f"postgresql://u@h/db?pass%77ord={ENCODED}",
        f"postgresql://u@h/db?passfile=/tmp/{ENCODED}",
        f"postgresql://u:{ENCODED}@h/db?sslmode=%zz",  # libpq's own refusal
        f"postgresql://u:{ENCODED}@h/db?no_such_option=1",
        f"postgresql://u:{ENCODED}@h:not-a-port/db?connect_timeout=x%zz",
    ],
)
def test_a_refused_url_is_never_echoed(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        kwargs_for(url)
    message = str(raised.value)
    assert message.startswith("--database-url")
    for part in (SECRET, ENCODED, "s3cr", "w0rd"):
        assert part not in message, message


def test_password_file_errors_name_the_setting_not_the_path(tmp_path: Path) -> None:
    # A secret given as the file "name" by mistake must not be echoed back.
    with pytest.raises(ConfigError) as raised:
        kwargs_for("postgresql://u@h/db", file=tmp_path / SECRET.replace("/", "_"))
    assert "--database-password-file cannot be read" in str(raised.value)
    assert "s3cr" not in str(raised.value)
    two_lines = tmp_path / "two"
    two_lines.write_text("first\nsecond\n")
    with pytest.raises(ConfigError, match="one line"):
        kwargs_for("postgresql://u@h/db", file=two_lines)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        kwargs_for("postgresql://u@h/db", file=empty)


def test_scrub_removes_the_password_in_every_form() -> None:
    kwargs = ConnectionKwargs(user="u", password=SECRET)
    text = f"server said {SECRET} and {ENCODED}"
    assert kwargs.scrub(text) == "server said [redacted] and [redacted]"
    assert ConnectionKwargs(user="u").scrub(text) == text


def test_no_flag_takes_the_password_itself() -> None:
    """`--database-password VALUE` is not an abbreviation of `--database-password-file`: argparse
    would otherwise take the secret as a file name, and it would have been in `ps`."""
    parser = build_parser()
    commands = [
        ["db", "migrate"],
        ["db", "status"],
        ["audit", "verify"],
        ["audit", "prove", "--decision", "d"],
        ["audit", "show"],
        ["audit", "export"],
        ["audit", "replay", "--decision", "d"],
        ["db", "import"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*command, "--database-password", "x"])
        assert exited.value.code == 2
        parsed = parser.parse_args([*command, "--database-password-file", "f"])
        assert parsed.database_password_file == "f"


def test_the_command_line_and_settings_need_no_driver() -> None:
    """Without the `postgres` extra, `privscore` still runs and only a configured database
    asks for it."""
    code = """
import sys
sys.modules["psycopg"] = None
import service.db, service.cli
service.cli.build_parser()
from service.db import DatabaseSettings, connection_kwargs
from service.settings import ConfigError
assert connection_kwargs(DatabaseSettings(None), {}) is None
try:
    connection_kwargs(DatabaseSettings("postgresql://u@h/db"), {})
except ConfigError as error:
    print(error)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'privscore[postgres]'" in done.stdout
