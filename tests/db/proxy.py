"""A TCP proxy a test controls, to take a database away from a server and give it back.

`TcpProxy` listens on 127.0.0.1 and forwards every connection to a target (PostgreSQL). `cut`
closes the listening socket and aborts every forwarded connection, so the server sees its
connections drop and new ones refused; `restore` listens again on the same port. Everything
runs on an asyncio loop in a thread of its own, so tests drive it from plain synchronous code.

The port is picked below the kernel's ephemeral range (`ip_local_port_range`): a port the
kernel hands out for outgoing connections could be taken by one while the proxy is cut, and
`restore` would then fail to bind it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_CHUNK = 64 * 1024
_COMMAND_TIMEOUT_S = 10.0
T = TypeVar("T")


def _below_ephemeral_range() -> tuple[int, int]:
    """Ports the kernel never gives to an outgoing connection (bind(0) takes them from the
    ephemeral range, so they could be)."""
    try:
        low = int(_PORT_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1025, low - 12000), low - 1


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` until `cut`; `restore` forwards
    again on the same port. Use as a context manager (or `start`, then `close`)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  # connections accepted since start, for tests to see traffic passed
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        self._thread.start()
        try:
            self._run(self._listen_anywhere())
        except BaseException:
            self.close()
            raise

    def cut(self) -> None:
        """Stop listening (new connections are refused) and abort every forwarded connection."""
        self._run(self._cut())

    def restore(self) -> None:
        """Listen again on the same port."""
        self._run(self._listen(self.port))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=_COMMAND_TIMEOUT_S)
        self._loop.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(_COMMAND_TIMEOUT_S)

    async def _listen_anywhere(self) -> None:
        low, high = _below_ephemeral_range()
        candidates = random.sample(range(low, high + 1), 50)
        for port in candidates:
            with contextlib.suppress(OSError):
                await self._listen(port)
                return
        raise OSError(f"no free port below the ephemeral range ({low}-{high})")

    async def _listen(self, port: int) -> None:
        if self._server is not None:
            return
        # reuse_address: connections the proxy closed first leave TIME_WAIT on this port.
        self._server = await asyncio.start_server(self._forward, LOOPBACK, port, reuse_address=True)
        self.port = port

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket: connecting is refused from now on
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _COMMAND_TIMEOUT_S / 2)

    async def _forward(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._transports.add(client.transport)
        try:
            upstream_in, upstream = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client.transport.abort()
            self._transports.discard(client.transport)
            return
        if self._server is None:  # cut while connecting
            client.transport.abort()
            upstream.transport.abort()
            return
        self._transports.add(upstream.transport)
        try:
            await asyncio.gather(_pump(client_in, upstream), _pump(upstream_in, client))
        finally:
            for writer in (client, upstream):
                writer.transport.abort()
                self._transports.discard(writer.transport)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy `source` to `sink` until either side closes; then close `sink` for writing."""
    try:
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (OSError, RuntimeError):
        # The other direction or a cut aborted the transport; ending this one is enough.
        sink.transport.abort()
