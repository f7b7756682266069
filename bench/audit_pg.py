"""The audit log in PostgreSQL at scale: appends, open, lookups with proofs, export.

    .venv/bin/python -m bench.audit_pg [--records 100000] [--lookups 200] [--appenders 32]
        [--server postgresql://postgres@127.0.0.1:5432/postgres] [--database NAME] [--keep]

Makes a database (or reuses `--database`, migrated, built by an earlier run of the same size),
builds a log of `--records` records shaped like the server's (about 1.9 kB each) through
`PgAuditLog`, then times: appends from `--appenders` concurrent callers one record each (what a
server's requests do), opening the log (every check a replica makes before it appends),
a quick open (the pass over the checkpointed records left to the background),
`prove` for random decision ids (median and 99th percentile over `--lookups`), and an export to
a file-log directory. Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.audit_lookup import decision_id, record
from service.audit import Signer, verify_inclusion
from service.audit.pg import PgAuditLog, export_log
from service.db import DatabaseSettings, connect, connection_kwargs, migrate, open_async_pool

ORIGIN = "privscore.audit/bench-pg"
MAC_KEY = bytes(range(32))
# A fixed key, so that a database built by an earlier run opens under it.
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"bench-pg").digest())
CHUNK = 1000


async def build(pool: Any, signer: Signer, records: int) -> float:
    """Append `records` records in chunks from four writers; seconds taken."""
    log = await PgAuditLog.open(pool, signer=signer, mac_key=MAC_KEY, origin=ORIGIN)
    rng = random.Random(1)
    started = time.perf_counter()

    async def writer(first_chunk: int) -> None:
        for start in range(first_chunk * CHUNK, records, 4 * CHUNK):
            await log.append_all(
                [record(n, rng) for n in range(start, min(start + CHUNK, records))]
            )

    await asyncio.gather(*(writer(number) for number in range(4)))
    await log.close()
    return time.perf_counter() - started


async def appends(pool: Any, signer: Signer, appenders: int, per_appender: int, first: int) -> str:
    log = await PgAuditLog.open(pool, signer=signer, mac_key=MAC_KEY, origin=ORIGIN)
    rng = random.Random(2)
    latencies: list[float] = []

    async def appender(number: int) -> None:
        for k in range(per_appender):
            item = record(first + number * per_appender + k, rng)
            started = time.perf_counter()
            await log.append(item)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(appender(number) for number in range(appenders)))
    elapsed = time.perf_counter() - started
    stats = log.stats
    await log.close()
    count = appenders * per_appender
    return (
        f"{count / elapsed:,.0f} appends/s at {appenders} appenders "
        f"(median {1000 * statistics.median(latencies):.2f} ms, "
        f"{stats.records / stats.batches:.1f} records per transaction)"
    )


async def measure(kwargs: Any, records: int, lookups: int, appenders: int, built: bool) -> None:
    signer = Signer(ORIGIN, SIGNING_KEY)
    pool = await open_async_pool(kwargs, min_size=2, max_size=6)
    try:
        if not built:
            seconds = await build(pool, signer, records)
            print(f"built {records:,} records in {seconds:.1f} s ({records / seconds:,.0f}/s)")
        started = time.perf_counter()
        log = await PgAuditLog.open(pool, signer=signer, mac_key=MAC_KEY, origin=ORIGIN)
        opened = time.perf_counter() - started
        size = log.recovery.size
        print(f"open (every check) at {size:,} records: {opened:.2f} s")
        await log.close()
        started = time.perf_counter()
        log = await PgAuditLog.open(
            pool, signer=signer, mac_key=MAC_KEY, origin=ORIGIN, full_check=False
        )
        quick = time.perf_counter() - started
        while not log.verified and not log.failed:
            await asyncio.sleep(0.05)
        print(
            f"quick open at {size:,} records: {quick:.3f} s (the full check done in the "
            f"background {time.perf_counter() - started:.1f} s after it began)"
        )
        rng = random.Random(3)
        times = []
        for _ in range(lookups):
            wanted = decision_id(rng.randrange(records))
            started = time.perf_counter()
            checkpoint, stored, proof = await log.prove(wanted)
            times.append(time.perf_counter() - started)
            verify_inclusion(
                stored.envelope, stored.sequence, checkpoint.size, proof, checkpoint.root_hash
            )
        times.sort()
        print(
            f"prove (record + inclusion proof, checked) at {size:,} records: median "
            f"{1000 * statistics.median(times):.2f} ms, p99 "
            f"{1000 * times[int(len(times) * 0.99) - 1]:.2f} ms over {lookups}"
        )
        await log.close()
        print(await appends(pool, signer, appenders, 100, 10**9 + size))
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--appenders", type=int, default=32)
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--database", help="reuse this database (made and kept if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the database made")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    admin = connection_kwargs(DatabaseSettings(args.server), environ={})
    assert admin is not None
    name = args.database or f"privscore_bench_{uuid.uuid4().hex[:8]}"
    with connect(admin) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    kwargs = type(admin)({**admin, "dbname": name})
    try:
        with connect(kwargs) as conn:
            migrate(conn)
            (size,) = conn.execute("SELECT size FROM audit_log_state").fetchone() or (0,)
        asyncio.run(measure(kwargs, args.records, args.lookups, args.appenders, size > 0))
        out = tempfile.mkdtemp(prefix="privscore-export-")
        started = time.perf_counter()
        with connect(kwargs) as conn:
            report = export_log(conn, f"{out}/log")
        print(
            f"export of {report.records:,} records ({report.bytes / 1e6:,.0f} MB): "
            f"{time.perf_counter() - started:.1f} s"
        )
        shutil.rmtree(out)
    finally:
        if not (args.keep or args.database):
            with connect(admin) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
