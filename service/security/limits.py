"""Per-identity call limits: concurrency and rate, answering RESOURCE_EXHAUSTED at once.

One misbehaving caller must not slow the others: each identity has its own in-flight cap and
token bucket, and a refused call costs the server almost nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from service.errors import ResourceExhausted
from service.settings import Resolved, integer, number, setting


def _quarter_of_all(resolved: Resolved) -> str:
    return str(max(1, resolved["max_alert_subscribers"] // 4))


@dataclass(frozen=True)
class CallLimits:
    """The per-identity and subscriber limits; each field is a `privscore serve` setting."""

    default_deadline_seconds: float = setting(
        "--default-deadline-seconds",
        "deadline for calls that carry none",
        number(0.01, 3600),
        "10",
        value=10.0,
    )
    max_deadline_seconds: float = setting(
        "--max-deadline-seconds",
        "longer deadlines are cut to this",
        number(0.01, 86400),
        "60",
        value=60.0,
    )
    max_in_flight_per_identity: int = setting(
        "--max-in-flight-per-caller",
        "concurrent calls per identity",
        integer(1, 100_000),
        "64",
        value=64,
    )
    calls_per_second_per_identity: float = setting(
        "--calls-per-second-per-caller",
        "sustained call rate per identity",
        number(0.01, 1e7),
        "2000",
        value=2000.0,
    )
    burst_per_identity: int = setting(
        "--burst-per-caller", "rate burst per identity", integer(1, 10_000_000), "4000", value=4000
    )
    max_alert_subscribers: int = setting(
        "--max-alert-subscribers",
        "concurrent WatchAlerts streams",
        integer(1, 100_000),
        "64",
        value=64,
    )
    # One identity may hold only part of the subscriber slots, so it cannot lock out the other
    # monitors.
    max_alert_subscribers_per_identity: int = setting(
        "--max-alert-subscribers-per-caller",
        "concurrent WatchAlerts streams per identity, at most all of them",
        integer(1, lambda resolved: int(resolved["max_alert_subscribers"])),
        _quarter_of_all,
        default_doc="a quarter of --max-alert-subscribers, at least 1",
        value=16,
    )


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class IdentityLimiter:
    """Admission per identity; used on the event loop's thread only."""

    def __init__(self, limits: CallLimits) -> None:
        self._limits = limits
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def take_rate(self, identity: str) -> None:
        """Take one call from the identity's rate, or refuse; alone, for a stream, whose
        concurrency its own subscriber limits bound (it holds no in-flight slot)."""
        limits = self._limits
        bucket = self._buckets.setdefault(
            identity, _Bucket(limits.calls_per_second_per_identity, limits.burst_per_identity)
        )
        if not bucket.take():
            raise ResourceExhausted(
                f"{identity} is over its call rate; retry with backoff", reason="RATE_LIMITED"
            )

    @contextlib.contextmanager
    def admit(self, identity: str) -> Iterator[None]:
        """Take one call from the identity's rate and hold an in-flight slot while it runs."""
        limits = self._limits
        self.take_rate(identity)
        in_flight = self._in_flight.get(identity, 0)
        if in_flight >= limits.max_in_flight_per_identity:
            raise ResourceExhausted(
                f"{identity} has {in_flight} calls in flight; retry later",
                reason="TOO_MANY_IN_FLIGHT",
            )
        self._in_flight[identity] = in_flight + 1
        try:
            yield
        finally:
            self._in_flight[identity] -= 1
