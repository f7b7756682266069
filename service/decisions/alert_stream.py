"""The alert stream: numbered alerts fanned out to any number of subscribers.

Alerts are numbered and kept by the decision store; this stream adds a bounded in-memory
cache of recent ones and wakes subscribers. Publishing never waits for a subscriber: each
subscriber reads at its own cursor (from the cache, or from the store when it has fallen
behind), so a slow subscriber can never block the decision path. A subscriber that
reconnects with its last sequence number gets every alert it missed, across restarts.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable

from privscore.v1 import alert_service_pb2 as pb
from service.errors import OutOfRange, ResourceExhausted

CACHED_ALERTS = 10_000
FETCH_BATCH = 500

FetchAfter = Callable[[int, int], Awaitable[list[pb.Alert]]]
LastStored = Callable[[], Awaitable[int]]


class AlertStream:
    def __init__(
        self,
        fetch_after: FetchAfter,
        last_sequence: int,
        max_subscribers: int,
        max_subscribers_per_identity: int,
        last_stored: LastStored | None = None,
    ) -> None:
        """`fetch_after(cursor, limit)` returns stored alerts with sequence > cursor, in order.
        At most `max_subscribers` subscriptions at once, and at most
        `max_subscribers_per_identity` of them for any one caller identity, so one caller
        cannot take every slot and lock the other monitors out. `last_stored()` reads the
        highest stored sequence: where other processes also raise alerts, a cursor ahead of
        what this stream has heard of is checked against it before being refused."""
        self._fetch_after = fetch_after
        self._last_stored = last_stored
        self._max_subscribers = max_subscribers
        self._max_per_identity = max_subscribers_per_identity
        self._subscribers = 0
        self._by_identity: dict[str, int] = {}
        self._cache: OrderedDict[int, pb.Alert] = OrderedDict()
        self._last_sequence = last_sequence
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def last_sequence(self) -> int:
        return self._last_sequence

    def publish(self, alerts: Iterable[pb.Alert]) -> None:
        """Announce stored alerts; call on the event loop's thread, in any order."""
        for alert in alerts:
            self._cache[alert.sequence] = alert
            self._last_sequence = max(self._last_sequence, alert.sequence)
        while len(self._cache) > CACHED_ALERTS:
            self._cache.popitem(last=False)
        self._wake()

    def advance(self, sequence: int) -> None:
        """Announce that alerts up to `sequence` are stored (raised elsewhere: another worker
        or replica), without their content: subscribers read them from the store."""
        if sequence > self._last_sequence:
            self._last_sequence = sequence
            self._wake()

    def close(self) -> None:
        """End every subscription cleanly once it has delivered what is already published."""
        self._closed = True
        self._wake()

    def erase_subject(self, tenant: str, pseudonym: str) -> None:
        """Blank an erased subject's alerts in the cache, as the store has (their places
        stay). Other replicas' caches keep theirs until they age out (SECURITY.md)."""
        for sequence, alert in self._cache.items():
            if (alert.subject.tenant, alert.subject.pseudonym) == (tenant, pseudonym):
                self._cache[sequence] = pb.Alert(sequence=sequence)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _next_batch(self, cursor: int) -> list[pb.Alert]:
        cached: list[pb.Alert] = []
        sequence = cursor + 1
        while sequence in self._cache and len(cached) < FETCH_BATCH:
            cached.append(self._cache[sequence])
            sequence += 1
        if cached:
            return cached
        stored = await self._fetch_after(cursor, FETCH_BATCH)
        if stored and stored[0].sequence > cursor + 1 and cursor > 0:
            raise OutOfRange(
                f"alerts after sequence {cursor} are no longer retained; "
                f"oldest is {stored[0].sequence}",
                reason="CURSOR_OUT_OF_RANGE",
            )
        return stored

    def subscribers(self, identity: str | None = None) -> int:
        """Open subscriptions: all of them, or `identity`'s."""
        if identity is None:
            return self._subscribers
        return self._by_identity.get(identity, 0)

    async def subscribe(
        self, identity: str, min_severity: int, after_sequence: int | None
    ) -> AsyncGenerator[pb.Alert, None]:
        """Yield alerts of at least `min_severity` after `after_sequence` (None: from now on)
        to the caller `identity`; its slot is freed when the subscription ends, however."""
        if (
            after_sequence is not None
            and after_sequence > self._last_sequence
            and self._last_stored is not None
        ):
            self.advance(await self._last_stored())
        if after_sequence is not None and after_sequence > self._last_sequence:
            raise OutOfRange(
                f"cursor {after_sequence} is ahead of the stream (last is {self._last_sequence})",
                reason="CURSOR_OUT_OF_RANGE",
            )
        held = self._by_identity.get(identity, 0)
        if held >= self._max_per_identity:
            raise ResourceExhausted(
                f"{identity} holds {held} alert subscriptions already; retry later",
                reason="TOO_MANY_SUBSCRIBERS_PER_CALLER",
            )
        if self._subscribers >= self._max_subscribers:
            raise ResourceExhausted(
                f"{self._subscribers} alert subscribers already; retry later",
                reason="TOO_MANY_SUBSCRIBERS",
            )
        self._subscribers += 1
        self._by_identity[identity] = held + 1
        try:
            async for alert in self._follow(min_severity, after_sequence):
                yield alert
        finally:
            self._subscribers -= 1
            remaining = self._by_identity[identity] - 1
            if remaining:
                self._by_identity[identity] = remaining
            else:
                del self._by_identity[identity]  # no entry left behind per identity ever seen

    async def _follow(
        self, min_severity: int, after_sequence: int | None
    ) -> AsyncIterator[pb.Alert]:
        cursor = self._last_sequence if after_sequence is None else after_sequence
        while True:
            changed = self._changed  # taken before reading, so no publish is missed
            while cursor < self._last_sequence:
                batch = await self._next_batch(cursor)
                if not batch:
                    break
                for alert in batch:
                    cursor = alert.sequence
                    # An erased alert (no subject left) keeps its place but is not sent.
                    if alert.severity >= min_severity and alert.HasField("subject"):
                        yield alert
            if self._closed:
                return
            await changed.wait()
