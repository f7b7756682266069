"""Audit lookups at scale: a decision's record with its inclusion proof, and the log's open time.

    .venv/bin/python -m bench.audit_lookup [--records 1000000] [--lookups 200] [--dir DIR]

Builds a log of `--records` records shaped like the server's (about 1.9 kB each: ids, pseudonym,
model and policy, sealed inputs, outputs) through `AuditLog` with fsync off, as the server
writes it, then times: opening it (what a server start pays: every record hashed against the
latest checkpoint, chain and MAC after it, the lookup index checked), `prove_record` for random
decision ids (median over `--lookups`), a few lookups that find no index (the one-pass scan an
offline reviewer's copy without the index falls back to), and opening after the index was
deleted (rebuilt in the pass). With `--dir`, a log built by an earlier run of the same size is
reused. Not a test: it prints numbers and asserts nothing. 1,000,000 records take about 2.2 GB
of disk and a few minutes to build.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from service.audit import (
    AuditLog,
    NotProvable,
    Signer,
    VerifierKey,
    prove_record,
    verify_inclusion,
)
from service.audit.index import CHUNKS_FILE, INDEX_DIR

ORIGIN = "privscore.audit/bench-lookup"
MAC_KEY = bytes(range(32))
CHUNK = 1000  # records handed to the writer at once (it batches up to 1024)
_T = TypeVar("_T")


def decision_id(n: int) -> str:
    """A UUID-shaped id derived from n, so lookups can name records without storing ids."""
    return str(uuid.UUID(bytes=hashlib.sha256(n.to_bytes(8, "big")).digest()[:16], version=4))


def record(n: int, rng: random.Random) -> dict[str, Any]:
    """About 1.9 kB once sealed in its envelope, like a server Score record."""
    return {
        "rpc": "privscore.v1.ScoringService/Score",
        "decision_id": decision_id(n),
        "request_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "time": f"2026-12-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "caller": "scorer",
        "tenant": "baitiao-cn",
        "subject": base64.urlsafe_b64encode(rng.randbytes(32)).decode(),
        "model_version": "german-credit-2026.11",
        "model_manifest_sha256": rng.randbytes(32).hex(),
        "policy_version": "2026-11-01",
        "input_digest": rng.randbytes(32).hex(),
        "encrypted_inputs": base64.b64encode(rng.randbytes(860)).decode(),
        "outputs": {
            "score": 500 + n % 300,
            "grade": "B",
            "decision": "APPROVE",
            "probability_of_default_ppb": 81_200_000,
            "reasons": ["R1", "R7", "R12"],
        },
    }


def open_log(directory: Path, key: Ed25519PrivateKey) -> AuditLog:
    return AuditLog(
        directory,
        signer=Signer(ORIGIN, key),
        mac_key=MAC_KEY,
        origin=ORIGIN,
        fsync=lambda fd: None,
    )


def build(directory: Path, records: int, key: Ed25519PrivateKey) -> None:
    rng = random.Random(7)
    log = open_log(directory, key)

    async def write() -> None:
        for start in range(0, records, CHUNK):
            chunk = range(start, min(records, start + CHUNK))
            await log.append_all([record(n, rng) for n in chunk])
            if start % 100_000 == 0:
                print(f"  {start:>9,} records", flush=True)

    asyncio.run(write())
    log.close_sync()


def timed(call: Callable[[], _T]) -> tuple[float, _T]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def must_not_fall_back(reason: str) -> None:
    raise AssertionError(f"the lookup fell back to the scan: {reason}")


def lookups(
    directory: Path,
    verifier: VerifierKey,
    records: int,
    count: int,
    rng: random.Random,
    *,
    indexed: bool = True,
) -> list[float]:
    """Seconds per `prove_record` of a random decision; each proof is checked."""
    seconds = []
    on_fallback = must_not_fall_back if indexed else (lambda reason: None)
    for _ in range(count):
        n = rng.randrange(records)
        wanted = {"decision_id": decision_id(n)}
        elapsed, (checkpoint, found, proof) = timed(
            functools.partial(
                prove_record, directory, verifier, ORIGIN, equals=wanted, on_fallback=on_fallback
            )
        )
        root = checkpoint.root_hash
        verify_inclusion(found.envelope, found.sequence, checkpoint.size, proof, root)
        assert found.sequence == n
        seconds.append(elapsed)
    return seconds


def absent_lookups(directory: Path, verifier: VerifierKey, count: int) -> list[float]:
    seconds = []
    for n in range(count):
        wanted = {"decision_id": f"absent-{n}"}
        started = time.perf_counter()
        try:
            prove_record(directory, verifier, ORIGIN, equals=wanted, on_fallback=must_not_fall_back)
        except NotProvable as error:
            assert error.why == "NOT_FOUND"
        seconds.append(time.perf_counter() - started)
    return seconds


def timed_open(directory: Path, key: Ed25519PrivateKey) -> float:
    seconds, log = timed(lambda: open_log(directory, key))
    log.close_sync()
    return seconds


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} x {model}, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--scans", type=int, default=3, help="lookups without the index")
    parser.add_argument("--dir", help="where to build the log (kept); default: a temporary one")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet

    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    scratch = None
    if args.dir:
        base = Path(args.dir)
    else:
        scratch = tempfile.TemporaryDirectory()
        base = Path(scratch.name)
    directory, key_file = base / "audit", base / "audit.key"
    try:
        if key_file.exists() and (base / f"built-{args.records}").exists():
            loaded = load_pem_private_key(key_file.read_bytes(), password=None)
            assert isinstance(loaded, Ed25519PrivateKey)
            key = loaded
            print(f"reusing the {args.records:,}-record log in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
            for stale in base.glob("built-*"):
                stale.unlink()
            base.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            key_file.write_bytes(
                key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            )
            print(f"building {args.records:,} records in {directory} (fsync off)")
            seconds, _ = timed(lambda: build(directory, args.records, key))
            (base / f"built-{args.records}").touch()
            print(f"built in {seconds:.1f} s")
        verifier = VerifierKey(ORIGIN, key.public_key())
        segments = sorted(directory.glob("segment-*.log"))
        log_bytes = sum(path.stat().st_size for path in segments)
        index = directory / INDEX_DIR
        timed_open(directory, key)  # the page cache holds the log for every open below
        print(
            f"log: {log_bytes / 1e6:,.0f} MB in {len(segments)} segments "
            f"({log_bytes / args.records:,.0f} bytes per record); "
            f"index: {disk_bytes(index) / 1e6:,.1f} MB"
        )

        opens = [timed_open(directory, key) for _ in range(3)]
        print(f"open: {min(opens):.2f} s (best of 3: {', '.join(f'{s:.2f}' for s in opens)})")

        rng = random.Random(11)
        lookups(directory, verifier, args.records, 3, rng)  # warm the imports
        times = lookups(directory, verifier, args.records, args.lookups, rng)
        quantiles = statistics.quantiles(times, n=100)
        print(
            f"lookup with proof, {args.lookups} random decisions: median "
            f"{statistics.median(times) * 1e3:.2f} ms, p95 {quantiles[94] * 1e3:.2f} ms, "
            f"max {max(times) * 1e3:.2f} ms"
        )
        absent = absent_lookups(directory, verifier, 50)
        print(f"lookup of an absent decision, 50: median {statistics.median(absent) * 1e3:.2f} ms")

        if args.scans:
            hidden = base / "index-hidden"
            index.rename(hidden)  # a reviewer's copy without the index
            try:
                scans = lookups(directory, verifier, args.records, args.scans, rng, indexed=False)
            finally:
                hidden.rename(index)
            print(
                f"lookup with proof without the index (one-pass scan), {args.scans} decisions: "
                f"median {statistics.median(scans):.2f} s"
            )

        (index / CHUNKS_FILE).unlink()
        untagged = timed_open(directory, key)
        print(f"open without the chunk tags (every decision id read): {untagged:.2f} s")
        shutil.rmtree(index)
        print(f"open with the index deleted (rebuilt): {timed_open(directory, key):.2f} s")
        print(f"open after that: {timed_open(directory, key):.2f} s")
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    main()
