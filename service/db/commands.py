"""`privscore db migrate|status`: apply the shipped migrations, or show where a database is.

Exit codes: 0 the database is at this code's schema version; 1 it is not (migrations pending,
refused, or the database unreachable); 2 the settings are wrong. Nothing printed holds the
password: messages name the database by `ConnectionKwargs.describe` and are scrubbed.
"""

from __future__ import annotations

import argparse
import sys

from service.db.connect import DatabaseUnavailable, connect
from service.db.schema import SCHEMA_VERSION, SchemaError, SchemaStatus, migrate, schema_status
from service.db.settings import (
    ConnectionKwargs,
    connection_kwargs,
    database_settings_from,
    declared,
)
from service.settings import ConfigError


def run(args: argparse.Namespace) -> int:
    command = f"privscore db {args.db_command}"
    try:
        kwargs = connection_kwargs(database_settings_from(args))
    except ConfigError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 2
    if kwargs is None:
        url = declared()[0]
        print(f"{command}: no database: set {url.flag} or {url.env}", file=sys.stderr)
        return 2
    from service.logs import configure_logging

    configure_logging()
    try:
        status = _run(args.db_command, kwargs)
    except (DatabaseUnavailable, SchemaError) as error:
        print(f"{command}: {kwargs.scrub(str(error))}", file=sys.stderr)
        return 1
    for line in report(kwargs, status):
        print(line)
    return 0 if status.current else 1


def _run(db_command: str, kwargs: ConnectionKwargs) -> SchemaStatus:
    import psycopg

    with connect(kwargs) as conn:
        try:
            if db_command == "migrate":
                migrate(conn)
            return schema_status(conn)
        except psycopg.Error as error:
            raise DatabaseUnavailable(
                f"{kwargs.describe()}: {str(error).strip().splitlines()[0]}"
            ) from None


def report(kwargs: ConnectionKwargs, status: SchemaStatus) -> list[str]:
    lines = [
        f"database: {kwargs.describe()}",
        f"schema version: {status.version} (this privscore: {SCHEMA_VERSION})",
    ]
    rows = [
        (f"{a.version:04d}_{a.name}", f"applied {a.applied_at.isoformat()}") for a in status.applied
    ]
    rows += [(pending.label, "pending") for pending in status.pending]
    width = max((len(label) for label, _ in rows), default=0)
    lines.extend(f"  {label:<{width}}  {state}" for label, state in rows)
    if status.problems:
        lines.extend(f"refused: {problem}" for problem in status.problems)
    elif status.pending:
        lines.append(f"{len(status.pending)} pending: run `privscore db migrate`")
    else:
        lines.append("up to date")
    return lines
