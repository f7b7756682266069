"""PostgreSQL, the shared store of scaled-out deployments (issue 13): settings, connections,
schema migrations and the schema check a server makes at start; `privscore db migrate|status`
(commands.py) and `privscore db import` (importer.py, loaded only by that command).

Importing this package does not import psycopg (the `postgres` extra): the embedded default and
the command line run without it, and psycopg is loaded when a connection is first made.
"""

from service.db.connect import DatabaseUnavailable, connect, connect_async, open_async_pool
from service.db.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SchemaError,
    SchemaStatus,
    check_schema,
    check_schema_async,
    migrate,
    schema_status,
)
from service.db.settings import (
    DATABASE_PASSWORD_ENV,
    ConnectionKwargs,
    DatabaseSettings,
    add_database_arguments,
    connection_kwargs,
    database_settings_from,
)

__all__ = [
    "DATABASE_PASSWORD_ENV",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ConnectionKwargs",
    "DatabaseSettings",
    "DatabaseUnavailable",
    "Migration",
    "SchemaError",
    "SchemaStatus",
    "add_database_arguments",
    "check_schema",
    "check_schema_async",
    "connect",
    "connect_async",
    "connection_kwargs",
    "database_settings_from",
    "migrate",
    "open_async_pool",
    "schema_status",
]
