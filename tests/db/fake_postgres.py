"""A listener that speaks just enough of the PostgreSQL wire protocol (v3) to ask a client for
its password in clear text, keep what it was sent, and refuse it as a real server would.

PostgreSQL on the test machine trusts every local connection, so no real server there checks a
password; this one does, through the real client path (psycopg, libpq, the socket).
"""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_AUTH_CLEARTEXT = 3


class PasswordRefusingServer:
    def __init__(self, *, echo_password: bool = False) -> None:
        """`echo_password`: put the password it was sent in its error message, as no real
        server does, to show that our messages scrub it anyway."""
        self.echo_password = echo_password
        self.received: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, user: str = "svc", dbname: str = "privscore") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> PasswordRefusingServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                self._handshake(connection)
            except (OSError, ConnectionError):
                return

    def _handshake(self, connection: socket.socket) -> None:
        while True:  # SSL and GSS encryption requests are declined; then the startup packet
            (length,) = struct.unpack("!i", _read(connection, 4))
            body = _read(connection, length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                connection.sendall(b"N")
                continue
            if code == _CANCEL_REQUEST:
                return
            break
        parameters = body[4:].split(b"\x00")
        user = dict(zip(parameters[::2], parameters[1::2], strict=False)).get(b"user", b"?")
        connection.sendall(b"R" + struct.pack("!ii", 8, _AUTH_CLEARTEXT))
        if _read(connection, 1) != b"p":
            return
        (length,) = struct.unpack("!i", _read(connection, 4))
        password = _read(connection, length - 4).rstrip(b"\x00").decode("utf-8")
        self.received.append(password)
        message = f'password authentication failed for user "{user.decode()}"'
        if self.echo_password:
            message += f' (the password "{password}" is wrong)'
        fields = b"".join(
            tag + value.encode() + b"\x00"
            for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"), (b"M", message))
        )
        fields += b"\x00"
        connection.sendall(b"E" + struct.pack("!i", 4 + len(fields)) + fields)


def _read(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data
