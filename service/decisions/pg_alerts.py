"""Alerts raised on any replica reach the subscribers of every replica: a listener on
`NOTIFY privscore_alerts` (service/decisions/pg_store.py sends it) advances this process's
alert stream, and its subscribers read the new alerts from the database.

An erasure on any replica blanks the subject's alerts in the table; its notification on
`privscore_alerts_erased` names their numbers, and the listener blanks them in this process's
cache of recent alerts too, which would otherwise go on sending them to subscribers that resume.
A notification lost while the listener reconnects leaves those entries until they age out of the
cache.

Why no alert is ever skipped: a notification carries only the highest number its transaction
gave; subscribers read every alert after their cursor from the table, and alerts become visible
in the order of their numbers (the counter row is held to COMMIT). Notifications can still be
lost (the listener's connection drops, or the database restarts): after each (re)connection,
and whenever no notification came for a while, the listener reads the counter itself
(`last_sequence`), so a subscriber waits at most that while.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from privscore.v1 import alert_service_pb2
from service.db.connect import connect_async
from service.db.settings import ConnectionKwargs
from service.decisions.alert_stream import AlertStream
from service.decisions.pg_store import ALERTS_CHANNEL, ERASED_CHANNEL

DEFAULT_POLL_SECONDS = 1.0  # a missed notification is made up within this
DEFAULT_RETRY_SECONDS = 1.0

_log = structlog.get_logger("privscore.alerts")


class AlertListener:
    def __init__(
        self,
        kwargs: ConnectionKwargs,
        stream: AlertStream,
        last_sequence: Callable[[], Awaitable[int]],
        *,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        self._kwargs = kwargs
        self._stream = stream
        self._last_sequence = last_sequence
        self._poll_seconds = poll_seconds
        self._retry_seconds = retry_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alert-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the database: reconnect and catch up
                _log.warning(
                    "alerts.listener_lost",
                    error=type(error).__name__,
                    retry_seconds=self._retry_seconds,
                )
                await asyncio.sleep(self._retry_seconds)

    async def _listen(self) -> None:
        conn: Any = await connect_async(self._kwargs)
        async with conn:
            await conn.execute(f"LISTEN {ALERTS_CHANNEL}")
            await conn.execute(f"LISTEN {ERASED_CHANNEL}")
            while True:
                # After LISTEN, and after every quiet while: what committed unheard.
                self._stream.advance(await self._last_sequence())
                async for notice in conn.notifies(timeout=self._poll_seconds):
                    try:
                        numbers = [int(part) for part in notice.payload.split(",")]
                    except ValueError:
                        _log.warning("alerts.notification_not_a_sequence")
                        continue
                    if notice.channel == ERASED_CHANNEL:
                        self._erased(numbers)
                    else:
                        self._stream.advance(max(numbers))

    def _erased(self, sequences: list[int]) -> None:
        """Blank erased alerts in the stream as the table holds them now: an empty message
        under its number, which subscribers pass over. The erasure committed after every one
        of them, so each is announced as stored."""
        self._stream.publish(alert_service_pb2.Alert(sequence=sequence) for sequence in sequences)
