"""Connections to PostgreSQL whose failures name the database and never hold its password.

psycopg is imported when a connection is made, not when this module is, so the command line
and the embedded server run without the `postgres` extra installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.db.settings import ConnectionKwargs

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

APPLICATION_NAME = "privscore"  # how our sessions appear in pg_stat_activity
DEFAULT_CONNECT_TIMEOUT_S = 10
DEFAULT_RECONNECT_TIMEOUT_S = 10.0


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or refused the connection; the message names where it
    is (`ConnectionKwargs.describe`) and libpq's reason, with the password scrubbed out."""


def _with_defaults(kwargs: ConnectionKwargs) -> ConnectionKwargs:
    full = ConnectionKwargs(
        application_name=APPLICATION_NAME, connect_timeout=str(DEFAULT_CONNECT_TIMEOUT_S)
    )
    full.update(kwargs)
    return full


def unavailable(kwargs: ConnectionKwargs, error: BaseException) -> DatabaseUnavailable:
    """The error to raise for a failed connection (raise it `from None`: the original's
    message is not scrubbed)."""
    return DatabaseUnavailable(f"cannot connect to {kwargs.describe()}: {kwargs.scrub(str(error))}")


def connect(kwargs: ConnectionKwargs, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A connection (autocommit by default: transactions are opened explicitly with
    `conn.transaction()`), or DatabaseUnavailable."""
    import psycopg

    try:
        return psycopg.connect(**_with_defaults(kwargs), autocommit=autocommit)
    except psycopg.OperationalError as error:
        raise unavailable(kwargs, error) from None


async def connect_async(
    kwargs: ConnectionKwargs, *, autocommit: bool = True
) -> psycopg.AsyncConnection[Any]:
    """`connect` for asyncio: one connection (for a command; a server uses a pool)."""
    import psycopg

    try:
        return await psycopg.AsyncConnection.connect(
            **_with_defaults(kwargs), autocommit=autocommit
        )
    except psycopg.OperationalError as error:
        raise unavailable(kwargs, error) from None


async def open_async_pool(
    kwargs: ConnectionKwargs,
    *,
    min_size: int = 1,
    max_size: int = 8,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
) -> psycopg_pool.AsyncConnectionPool:
    """An open asyncio pool of autocommit connections, its first `min_size` connected, or
    DatabaseUnavailable. Close it with `await pool.close()`.

    A connection lost with the database is re-made in the background with a doubling delay;
    after `reconnect_timeout_s` that attempt gives up and the pool makes a fresh one (from the
    shortest delay) when a caller next waits. psycopg_pool's own default lets the delay grow to
    minutes, so a server would come back long after its database did."""
    import psycopg
    import psycopg_pool

    async def configure(connection: psycopg.AsyncConnection[Any]) -> None:
        await connection.set_autocommit(True)

    pool: psycopg_pool.AsyncConnectionPool = psycopg_pool.AsyncConnectionPool(
        kwargs=_with_defaults(kwargs),  # still a ConnectionKwargs: its repr masks the password
        configure=configure,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        reconnect_timeout=reconnect_timeout_s,
        name=APPLICATION_NAME,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=timeout_s)
    except (psycopg_pool.PoolTimeout, psycopg.OperationalError):
        await pool.close()
        # The pool's own message says only that it timed out: connect once to say why.
        try:
            connection = await psycopg.AsyncConnection.connect(**_with_defaults(kwargs))
        except psycopg.OperationalError as error:
            raise unavailable(kwargs, error) from None
        await connection.close()
        raise DatabaseUnavailable(
            f"cannot open a pool of {min_size} connections to {kwargs.describe()} "
            f"within {timeout_s:g} s"
        ) from None
    return pool
