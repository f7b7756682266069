"""What the servicers share: the loaded model, keys, policy, store, alert stream and audit log.

Built once by the server after everything has loaded and verified; servicers receive it whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.protobuf import timestamp_pb2

from privscore.v1 import common_pb2
from service.decisions.alert_stream import AlertStream
from service.decisions.policy import DecisionPolicy
from service.decisions.store import DecisionStore
from service.errors import Unavailable
from service.model.scorer import Scorer
from service.privacy.sealing import FeatureOpener

T = TypeVar("T")


class AuditSink(Protocol):
    async def append(self, record: Mapping[str, Any]) -> int:
        """Append durably (fsynced) and return the record's sequence number."""
        ...


class KeyedLocks:
    """One asyncio lock per key, dropped when no call holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class Runtime:
    scorer: Scorer
    opener: FeatureOpener
    policy: DecisionPolicy
    store: DecisionStore
    alerts: AlertStream
    audit: AuditSink
    input_digest_key: bytes
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    subject_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # SQLite is used from this one thread only: it serialises writers and keeps the loop free.
    store_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
    )

    async def in_store(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.store_thread, call, *args)

    def input_digest(self, inputs: Mapping[str, Any]) -> str:
        """Keyed digest of decrypted inputs: lets a reviewer with the key check a replay
        without the log holding a plaintext value (an unkeyed hash could be brute-forced)."""
        body = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hmac.new(self.input_digest_key, body.encode(), hashlib.sha256).hexdigest()

    def metadata(self, request_id: str, decided_at: dt.datetime) -> common_pb2.DecisionMetadata:
        """Decision metadata without its audit sequence, which the audit append assigns."""
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(decided_at)
        return common_pb2.DecisionMetadata(
            decision_id=str(uuid.uuid4()),
            model_version=self.scorer.model_version,
            policy_version=self.policy.version,
            decided_at=stamp,
            request_id=request_id,
        )

    def close(self) -> None:
        self.store_thread.shutdown(wait=True)
        self.store.close()


class RuntimeSlot:
    """Holds the runtime once loaded; calls before then (or after shutdown) are UNAVAILABLE."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None

    def fill(self, runtime: Runtime | None) -> None:
        self._runtime = runtime

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise Unavailable(
                "privscore is starting or stopping; retry shortly", reason="NOT_READY"
            )
        return self._runtime

    def peek(self) -> Runtime | None:
        """The runtime if loaded, for shutdown; servicers use `runtime`."""
        return self._runtime
