"""Child process for the crash test: appends concurrently forever, printing each acknowledgement.

    python -m tests.audit.append_child DIRECTORY PRIVATE_KEY_PEM

Prints "<sequence> <decision_id>" once `append` has returned, i.e. once the record is durable:
exactly what a server may reply after. The parent kills it with SIGKILL mid-stream.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from service.audit import AuditLog, Signer

from .conftest import MAC_KEY

APPENDERS = 16
ORIGIN = "privscore.audit/crash-test"


async def appender(log: AuditLog, task: int) -> None:
    n = 0
    while True:
        decision_id = f"task{task}-{n}"
        appended = await log.append({"decision_id": decision_id, "payload": "x" * (n % 200)})
        print(appended.sequence, decision_id, flush=True)
        n += 1


async def main(directory: Path, key: Ed25519PrivateKey) -> None:
    log = await asyncio.to_thread(
        AuditLog,
        directory,
        signer=Signer(ORIGIN, key),
        mac_key=MAC_KEY,
        origin=ORIGIN,
        segment_bytes=16 * 1024,
        checkpoint_every=50,
    )
    await asyncio.gather(*(appender(log, task) for task in range(APPENDERS)))


if __name__ == "__main__":
    private_key = load_pem_private_key(Path(sys.argv[2]).read_bytes(), password=None)
    assert isinstance(private_key, Ed25519PrivateKey)
    asyncio.run(main(Path(sys.argv[1]), private_key))
