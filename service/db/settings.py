"""Where the PostgreSQL database is, and its password: parsed once into connection kwargs.

Two settings, declared like every other (service/settings.py), so they can join
ServerSettings as they are:

    --database-url            PRIVSCORE_DATABASE_URL            postgresql://[user@]host[:port]/db[?...]
    --database-password-file  PRIVSCORE_DATABASE_PASSWORD_FILE  a file holding the password

and one variable without a flag, PRIVSCORE_DATABASE_PASSWORD: a secret must never be a flag's
value, which `ps` shows to every user of the machine. The URL may carry the password itself
(`postgresql://user:password@host/db`, as a Kubernetes Secret often holds it); then it is taken
out before anything else reads the URL. A password given in two places is refused rather than
one silently chosen.

Nothing here echoes a value it refuses: messages name the setting. The password is kept only in
`ConnectionKwargs`, whose `repr` and `str` mask it, and `scrub` removes it from any text (an
error from libpq or the server) before that text is shown or logged.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from service.settings import SETTING, ConfigError, Resolved, Setting, setting

DATABASE_PASSWORD_ENV = "PRIVSCORE_DATABASE_PASSWORD"
REDACTED = "[redacted]"
_URL = re.compile(r"(postgres(?:ql)?)://([^/?#]*)(.*)", re.DOTALL)
# libpq reads these from a URL; we refuse them there: the password has its own sources, and a
# password file named in the URL would bypass the one we read.
_REFUSED_PARAMETERS = frozenset({"password", "passfile"})


def _parse_url(flag: str, text: str, _: Resolved) -> str | None:
    """Only the scheme is checked here; `connection_kwargs` parses the rest."""
    if not text:
        return None
    if not _URL.fullmatch(text):
        raise ConfigError(f"{flag} must be a postgresql:// URL")
    return text


def _parse_password_file(flag: str, text: str, _: Resolved) -> Path | None:
    return Path(text).expanduser() if text else None


@dataclass(frozen=True)
class DatabaseSettings:
    """The database settings; both unset means the embedded store and file log."""

    database_url: str | None = setting(
        "--database-url",
        "PostgreSQL for the decision store and audit log, postgresql://[user@]host[:port]/"
        "dbname[?sslmode=...]; the password from PRIVSCORE_DATABASE_PASSWORD or "
        "--database-password-file, not a flag",
        _parse_url,
        "",
        default_doc="unset: SQLite and the file log under --data-dir",
        value=None,
    )
    database_password_file: Path | None = setting(
        "--database-password-file",
        "file holding the database password (one line), e.g. a mounted Secret",
        _parse_password_file,
        "",
        default_doc="none",
        value=None,
    )


def declared() -> list[Setting]:
    """The database settings in resolution order."""
    return [f.metadata[SETTING] for f in fields(DatabaseSettings)]


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare --database-url and --database-password-file on an argparse parser. Build the
    parser with allow_abbrev=False: argparse would otherwise take `--database-password SECRET`
    as an abbreviation of `--database-password-file`, and the secret would sit in `ps`."""
    for item in declared():
        item.add_to(parser)


def database_settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> DatabaseSettings:
    """Flag, else environment variable, else unset; ConfigError names the setting."""
    resolved: dict[str, Any] = {}
    for item in declared():
        resolved[item.dest] = item.resolve(args, environ, resolved)
    return DatabaseSettings(**resolved)


class ConnectionKwargs(dict[str, Any]):
    """libpq connection parameters for `psycopg.connect(**kwargs)`: host, port, dbname, user,
    sslmode... and the password. `repr` and `str` mask the password, so a traceback's locals
    or a debug print never show it."""

    @property
    def password(self) -> str | None:
        return self.get("password")

    def __repr__(self) -> str:
        shown = {k: (REDACTED if k == "password" else v) for k, v in self.items()}
        return f"ConnectionKwargs({shown!r})"

    __str__ = __repr__

    def describe(self) -> str:
        """Where this connects, for messages: `postgresql://user@host:port/dbname`, never the
        password nor any other parameter."""
        user = self.get("user")
        host = self.get("host") or self.get("hostaddr") or "(libpq default host)"
        port = self.get("port")
        where = f"{user}@" if user else ""
        where += f"[{host}]" if ":" in host and "," not in host else host
        where += f":{port}" if port else ""
        return f"postgresql://{where}/{self.get('dbname', '')}"

    def scrub(self, text: str) -> str:
        """`text` with the password removed wherever it appears, raw or percent-encoded."""
        password = self.password
        if not password:
            return text
        for form in {password, urllib.parse.quote(password, safe=""), urllib.parse.quote(password)}:
            text = text.replace(form, REDACTED)
        return text


def connection_kwargs(
    settings: DatabaseSettings, environ: Mapping[str, str] = os.environ
) -> ConnectionKwargs | None:
    """The connection kwargs for `settings`, with the password from its one source; None when
    no database is configured (the embedded default). ConfigError names the setting at fault and
    never quotes the URL or the password.

    The password is cut out of the URL here (`user:password@`), and only the rest goes to libpq
    to parse, so libpq's own messages about a malformed URL cannot hold it.
    """
    url = settings.database_url
    if url is None:
        return None
    match = _URL.fullmatch(url)
    if match is None:
        raise ConfigError("--database-url must be a postgresql:// URL")
    scheme, netloc, rest = match.groups()
    url_password: str | None = None
    if "@" in rest:
        # An '@' after the host part: most likely a password holding a '/', '?' or '#' that
        # was not percent-encoded, so libpq would read part of it as the host or port and might
        # quote it. Where the password ends cannot be known: nothing of the URL is shown.
        raise ConfigError(
            "--database-url has an '@' after its host: percent-encode '@' (%40), '/', '?' and "
            "'#' in the user name, the password and parameter values"
        )
    if "@" in netloc:
        userinfo, hostspec = netloc.rsplit("@", 1)
        user, has_password, raw_password = userinfo.partition(":")
        if has_password:
            url_password = urllib.parse.unquote(raw_password)
        netloc = f"{user}@{hostspec}" if user else hostspec
    query = rest.partition("?")[2].partition("#")[0]
    named = {key.lower() for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    if named & _REFUSED_PARAMETERS:
        raise ConfigError(
            "--database-url must not carry password or passfile parameters: give the password "
            f"in {DATABASE_PASSWORD_ENV} or --database-password-file"
        )
    kwargs = _libpq_parse(f"{scheme}://{netloc}{rest}", url_password)

    sources = []
    if url_password is not None:
        sources.append(("the URL", url_password))
    if DATABASE_PASSWORD_ENV in environ:
        sources.append((DATABASE_PASSWORD_ENV, environ[DATABASE_PASSWORD_ENV]))
    if settings.database_password_file is not None:
        sources.append(("--database-password-file", _read_password(settings)))
    if len(sources) > 1:
        raise ConfigError(
            "the database password is given more than once ("
            + ", ".join(name for name, _ in sources)
            + "): give it in one place"
        )
    if sources:
        name, password = sources[0]
        if not password:
            raise ConfigError(f"the database password in {name} is empty")
        if "\x00" in password:
            raise ConfigError(f"the database password in {name} holds a NUL byte")
        kwargs["password"] = password
    return kwargs


def _libpq_parse(url: str, password: str | None) -> ConnectionKwargs:
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(
            "--database-url needs the PostgreSQL driver: pip install 'privscore[postgres]'"
        ) from None
    try:
        parsed = conninfo_to_dict(url)
    except Exception as error:  # noqa: BLE001 - psycopg raises ProgrammingError and others
        # The URL given to libpq holds no password; scrubbed all the same (a user or database
        # name that equals the password).
        reason = ConnectionKwargs(password=password).scrub(str(error)) if password else str(error)
        raise ConfigError(f"--database-url is not a valid PostgreSQL URL: {reason}") from None
    return ConnectionKwargs({key: str(value) for key, value in parsed.items()})


def _read_password(settings: DatabaseSettings) -> str:
    path = settings.database_password_file
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        # The path is not shown: a password given here by mistake would be echoed.
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"--database-password-file cannot be read: {reason}") from None
    # One line; the newline a file usually ends with is not part of the password.
    password = text.removesuffix("\n").removesuffix("\r")
    if "\n" in password or "\r" in password:
        raise ConfigError("--database-password-file must hold the password on one line")
    return password
