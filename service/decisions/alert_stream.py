"""The alert stream: numbered alerts fanned out to any number of subscribers.

Publishing never waits for a subscriber: alerts go into one bounded retained log and each
subscriber reads from it at its own cursor, so a slow subscriber costs memory for nothing but
its cursor and can never block the decision path. A subscriber that reconnects with its last
sequence number gets every retained alert it missed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from privscore.v1 import alert_service_pb2 as pb
from service.errors import OutOfRange

DEFAULT_RETAINED_ALERTS = 100_000


class AlertStream:
    def __init__(self, retained: int = DEFAULT_RETAINED_ALERTS) -> None:
        self._alerts: deque[pb.Alert] = deque(maxlen=retained)
        self._last_sequence = 0
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def last_sequence(self) -> int:
        return self._last_sequence

    def publish(self, alert: pb.Alert) -> pb.Alert:
        """Number `alert`, retain it and wake subscribers; call on the event loop's thread."""
        self._last_sequence += 1
        alert.sequence = self._last_sequence
        self._alerts.append(alert)
        self._wake()
        return alert

    def close(self) -> None:
        """End every subscription cleanly once it has delivered what is already retained."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _after(self, cursor: int) -> list[pb.Alert]:
        if not self._alerts or cursor >= self._last_sequence:
            return []
        first = self._alerts[0].sequence
        if cursor + 1 < first:
            raise OutOfRange(
                f"alerts after sequence {cursor} are no longer retained; oldest is {first}",
                reason="CURSOR_OUT_OF_RANGE",
            )
        return [self._alerts[i] for i in range(cursor + 1 - first, len(self._alerts))]

    async def subscribe(
        self, min_severity: int, after_sequence: int | None
    ) -> AsyncIterator[pb.Alert]:
        """Yield alerts of at least `min_severity` after `after_sequence` (None: from now on)."""
        if after_sequence is not None and after_sequence > self._last_sequence:
            raise OutOfRange(
                f"cursor {after_sequence} is ahead of the stream (last is {self._last_sequence})",
                reason="CURSOR_OUT_OF_RANGE",
            )
        cursor = self._last_sequence if after_sequence is None else after_sequence
        while True:
            changed = self._changed  # taken before reading, so no publish is missed
            pending = self._after(cursor)
            for alert in pending:
                cursor = alert.sequence
                if alert.severity >= min_severity:
                    yield alert
            if self._closed:
                return
            if not pending:
                await changed.wait()
