"""The ceilings for Python gRPC alone: a bare grpc.aio server that answers each message with a
reply of a fixed size. No validation, no model, no disk, no interceptor.

By default it listens with the same mutual TLS credentials as the privscore server (its
certificate and key, client certificates required from the same CA: service/server.py `_tls`,
from the data directory's dev certificates), so the mTLS echo is the ceiling a Score is measured
against; `--plaintext` listens without TLS, the ceiling for gRPC without the TLS cost."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc

from service.config import DataLayout
from service.security.certs import CertPaths

METHOD = "/bench.Echo/Echo"


def _identity(data: bytes) -> bytes:
    return data


def mutual_tls(data_dir: Path) -> grpc.ServerCredentials:
    """The privscore server's credentials for `data_dir`'s dev certificates."""
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    return grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes(),
        require_client_auth=True,
    )


async def serve(data_dir: Path, reply_bytes: int, plaintext: bool = False) -> None:
    reply = b"\x00" * reply_bytes

    async def echo(_request: bytes, _context: Any) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if plaintext:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", mutual_tls(data_dir))
    await server.start()
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--reply-bytes", type=int, required=True)
    parser.add_argument("--plaintext", action="store_true", help="listen without TLS")
    args = parser.parse_args()
    asyncio.run(serve(args.data_dir, args.reply_bytes, args.plaintext))


if __name__ == "__main__":
    main()
