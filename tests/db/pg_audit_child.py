"""One replica for tests/db/test_pg_audit_log.py: opens the database log in its own process and
pool, appends records from several concurrent callers, closes, and prints what it was given.

    python -m tests.db.pg_audit_child URL KEY_HEX ORIGIN REPLICA RECORDS

Prints one JSON object: {"sequences": [...], "decision_ids": [...]} in the order appended.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import Signer
from service.audit.pg import PgAuditLog
from service.db import DatabaseSettings, connection_kwargs, open_async_pool

MAC_KEY = bytes(range(32))
CALLERS = 8


async def main(url: str, key_hex: str, origin: str, replica: int, records: int) -> None:
    kwargs = connection_kwargs(DatabaseSettings(url), environ={})
    assert kwargs is not None
    signer = Signer(origin, Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex)))
    pool = await open_async_pool(kwargs, min_size=1, max_size=3)
    log = await PgAuditLog.open(
        pool, signer=signer, mac_key=MAC_KEY, origin=origin, checkpoint_every=50
    )
    ids = [str(uuid.uuid4()) for _ in range(records)]
    sequences: dict[str, int] = {}

    async def caller(number: int) -> None:
        for decision_id in ids[number::CALLERS]:
            record = {"decision_id": decision_id, "replica": replica, "rpc": "Score"}
            sequences[decision_id] = (await log.append(record)).sequence

    await asyncio.gather(*(caller(number) for number in range(CALLERS)))
    await log.close()
    await pool.close()
    print(json.dumps({"sequences": [sequences[i] for i in ids], "decision_ids": ids}))


if __name__ == "__main__":
    url, key_hex, origin, replica, records = sys.argv[1:]
    asyncio.run(main(url, key_hex, origin, int(replica), int(records)))
