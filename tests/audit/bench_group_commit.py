"""Group commit against one fsync per record: appends/s and append latency under concurrency.

    .venv/bin/python -m tests.audit.bench_group_commit [--appenders 32] [--seconds 2] [--dir DIR]

Each appender awaits its append before sending the next, as a server handler does. Not a test:
the numbers depend on the disk, so it prints them and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import AuditLog, AuditStats, Signer

ORIGIN = "privscore.audit/bench"


def record(task: int, n: int) -> dict[str, object]:
    """About 1 KiB, shaped like a decision record with sealed inputs."""
    return {
        "decision_id": f"bench-{task}-{n}",
        "subject": f"pseudo-{task}",
        "time": "2026-11-26T10:00:00Z",
        "rpc": "Score",
        "inputs": base64.b64encode(os.urandom(600)).decode(),
        "outputs": {"score": 640, "grade": "B", "reasons": ["R1", "R7", "R12"]},
    }


async def measure(
    directory: Path, max_batch: int, appenders: int, seconds: float
) -> tuple[float, list[float], AuditStats]:
    log = await asyncio.to_thread(
        AuditLog,
        directory,
        signer=Signer(ORIGIN, Ed25519PrivateKey.generate()),
        mac_key=bytes(32),
        origin=ORIGIN,
        max_batch=max_batch,
    )
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def appender(task: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await log.append(record(task, n))
            latencies.append(time.perf_counter() - started)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(appender(task) for task in range(appenders)))
    elapsed = time.perf_counter() - started
    await log.close()
    return len(latencies) / elapsed, latencies, log.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appenders", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--dir", help="where to write the logs (default: a temporary directory)")
    args = parser.parse_args()
    print(f"{args.appenders} concurrent appenders, {args.seconds:g} s each mode")
    print(f"{'mode':<24}{'appends/s':>11}{'median ms':>11}{'p99 ms':>9}{'records':>9}{'fsyncs':>8}")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for mode, max_batch in (("group commit", 1024), ("fsync per record", 1)):
            rate, latencies, stats = asyncio.run(
                measure(
                    Path(scratch) / mode.replace(" ", "-"), max_batch, args.appenders, args.seconds
                )
            )
            median = statistics.median(latencies) * 1000
            p99 = statistics.quantiles(latencies, n=100)[98] * 1000
            print(
                f"{mode:<24}{rate:>11.0f}{median:>11.2f}{p99:>9.2f}{stats.records:>9}{stats.fsyncs:>8}"
            )


if __name__ == "__main__":
    main()
