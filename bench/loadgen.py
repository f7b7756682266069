"""The load generator: one process, grpc.aio, N concurrent callers for a bounded time.

Score requests are sealed before the clock starts (as a caller's own process would), so the
numbers measure the server. AdjustLimit and EvaluateEvent need a fresh request or event id per
call (a repeated one replays or is a duplicate), so each is built and its account state or
figures sealed per call, under one data key per method (two or three AES-GCM fields: tens of
microseconds of client CPU). Prints one JSON line: count, errors, rps, rows_per_s, p50/p90/p99
in ms.
"""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # the in-process ceiling loads onnxruntime

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from privscore.client.figures import seal_account, seal_event
from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    common_pb2,
    limit_service_pb2,
    limit_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)
from service.client.sdk import (
    ADJUST_LIMIT_METHOD,
    EVALUATE_EVENT_METHOD,
    SCORE_BATCH_METHOD,
    SCORE_METHOD,
    certificate_identity,
)
from service.config import DEFAULT_MODEL_DIR, DataLayout
from service.model.manifest import load_unverified_manifest
from service.model.schema import parse_text
from service.privacy.pseudonym import Pseudonymiser
from service.privacy.sealing import CEILING_MAX_AGE_S, DataKey, KeyLimits, load_public_keyset
from service.security.certs import CertPaths

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "model_export" / "data" / "german_credit.csv"
POOL = 512  # distinct pre-sealed requests per step
# Score requests of the pool share a data key per 64 (as the SDK shares one per 10,000 fresh
# requests): the pool is sent over and over, and each send counts against its key's limits.
REQUESTS_PER_KEY = 64


def applicants() -> list[dict[str, Any]]:
    schema = load_unverified_manifest(DEFAULT_MODEL_DIR).schema
    with DATA.open(newline="") as handle:
        return [
            {s.name: parse_text(s, row[s.name]) for s in schema.model_features}
            for row in csv.DictReader(handle)
        ]


class Requests:
    """Builds requests the way the SDK does, from the server's dev keys."""

    def __init__(self, data_dir: Path) -> None:
        layout = DataLayout(data_dir)
        self.server_key = load_public_keyset(layout.public_keyset)
        self.pseudonymiser = Pseudonymiser.from_file(layout.pseudonym_key)
        self.schema_version = load_unverified_manifest(DEFAULT_MODEL_DIR).schema_version
        self.rows = applicants()
        self.counter = itertools.count()
        certificate = CertPaths(layout.certs_dir).client_cert("dev").read_bytes()
        identity = certificate_identity(certificate)
        assert identity is not None
        self.identity = identity
        self._keys: dict[int, DataKey] = {}
        self._figure_keys: dict[str, DataKey] = {}

    def _key(self, method: str, group: int) -> DataKey:
        if group not in self._keys:
            self._keys[group] = DataKey(
                self.server_key,
                method,
                identity=self.identity,
                limits=KeyLimits(max_requests=1_000_000, max_bytes=1 << 30),
            )
        return self._keys[group]

    def _figure_key(self, method: str) -> DataKey:
        """One data key per method for the requests sealed per call, granted the longest age
        and the most requests the server allows, so a long run keeps one."""
        if method not in self._figure_keys:
            self._figure_keys[method] = DataKey(
                self.server_key,
                method,
                identity=self.identity,
                limits=KeyLimits(
                    max_age_s=CEILING_MAX_AGE_S, max_requests=1_000_000, max_bytes=1 << 30
                ),
            )
        return self._figure_keys[method]

    def subject(self, n: int) -> common_pb2.SubjectRef:
        return common_pb2.SubjectRef(
            tenant="bench", pseudonym=self.pseudonymiser.pseudonym("bench", f"c{n % 1000}")
        )

    def score(self, n: int) -> scoring_service_pb2.ScoreRequest:
        request_id = f"bench-{n}"
        subject = self.subject(n)
        key = self._key(SCORE_METHOD, n // REQUESTS_PER_KEY)
        return scoring_service_pb2.ScoreRequest(
            request_id=request_id,
            subject=subject,
            features=key.seal(
                self.schema_version, subject, self.rows[n % len(self.rows)], request_id=request_id
            ),
        )

    def batch(self, n: int, size: int) -> scoring_service_pb2.ScoreBatchRequest:
        request_id = f"bench-batch-{n}"
        key = self._key(SCORE_BATCH_METHOD, -1 - n)  # one key per pooled batch
        items = []
        for i in range(size):
            subject = self.subject(n * size + i)
            items.append(
                scoring_service_pb2.ScoreBatchItem(
                    subject=subject,
                    features=key.seal(
                        self.schema_version,
                        subject,
                        self.rows[(n * size + i) % len(self.rows)],
                        request_id=request_id,
                    ),
                )
            )
        return scoring_service_pb2.ScoreBatchRequest(request_id=request_id, items=items)

    def limit(self) -> limit_service_pb2.AdjustLimitRequest:
        """An AdjustLimit on a stated score (the dev identity may state one; the bench's
        subjects have no recorded Score decision), its account sealed."""
        n = next(self.counter)
        money = common_pb2.Money
        request_id = f"bench-limit-{n}-{time.monotonic_ns()}"
        subject = self.subject(n)
        account = limit_service_pb2.AccountState(
            current_limit=money(currency_code="CNY", minor_units=1_000_000),
            balance=money(currency_code="CNY", minor_units=200_000),
            on_time_repayments_in_row=3,
            account_age_days=400,
        )
        return limit_service_pb2.AdjustLimitRequest(
            request_id=request_id,
            subject=subject,
            sealed_account=seal_account(
                self._figure_key(ADJUST_LIMIT_METHOD), subject, account, request_id=request_id
            ),
            latest_score=540,
        )

    def event(self) -> alert_service_pb2.EvaluateEventRequest:
        n = next(self.counter)
        stamp = timestamp_pb2.Timestamp(seconds=1_790_000_000 + n)
        request_id = f"bench-event-{n}"
        subject = self.subject(n)
        event = alert_service_pb2.BehaviourEvent(
            event_id=f"bench-e-{n}-{time.monotonic_ns()}",
            occurred_at=stamp,
            purchase=alert_service_pb2.Purchase(
                amount=common_pb2.Money(currency_code="CNY", minor_units=5_000 + n % 900)
            ),
        )
        return alert_service_pb2.EvaluateEventRequest(
            request_id=request_id,
            subject=subject,
            event=seal_event(
                self._figure_key(EVALUATE_EVENT_METHOD), subject, event, request_id=request_id
            ),
        )


def _channel(
    target: str, data_dir: Path, *, own_connection: bool = False, plaintext: bool = False
) -> grpc.aio.Channel:
    # Channels of one process to one target share a connection (gRPC's global subchannel
    # pool) unless each keeps its own pool.
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    if plaintext:  # only the plaintext echo ceiling listens so
        return grpc.aio.insecure_channel(target, options=options)
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    credentials = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(),
        certs.client_key("dev").read_bytes(),
        certs.client_cert("dev").read_bytes(),
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


def _caller(
    args: argparse.Namespace, requests: Requests, channels: Sequence[grpc.aio.Channel]
) -> Callable[[], Any]:
    """One call of `args.rpc`, each on the next of `channels` in turn."""
    turn = itertools.cycle(range(len(channels)))
    if args.rpc == "score":
        cycle = itertools.cycle([requests.score(n) for n in range(POOL)])
        stubs = [scoring_service_pb2_grpc.ScoringServiceStub(c) for c in channels]
        return lambda: stubs[next(turn)].Score(next(cycle), timeout=30)
    if args.rpc == "score_batch":
        pool = [requests.batch(n, args.batch) for n in range(max(8, POOL // args.batch))]
        cycle_b = itertools.cycle(pool)
        stubs_b = [scoring_service_pb2_grpc.ScoringServiceStub(c) for c in channels]
        return lambda: stubs_b[next(turn)].ScoreBatch(next(cycle_b), timeout=30)
    if args.rpc == "adjust_limit":
        stubs_l = [limit_service_pb2_grpc.LimitServiceStub(c) for c in channels]
        return lambda: stubs_l[next(turn)].AdjustLimit(requests.limit(), timeout=30)
    if args.rpc == "evaluate_event":
        stubs_e = [alert_service_pb2_grpc.AlertServiceStub(c) for c in channels]
        return lambda: stubs_e[next(turn)].EvaluateEvent(requests.event(), timeout=30)
    # echo: a message of a Score request's size, a reply of a Score response's size
    payload = requests.score(0).SerializeToString()
    echoes = [
        c.unary_unary("/bench.Echo/Echo", request_serializer=bytes, response_deserializer=bytes)
        for c in channels
    ]
    return lambda: echoes[next(turn)](payload, timeout=30)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of a process, all threads: this one, or `pid` via /proc."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(databases: Sequence[str]) -> dict[int, float]:
    """CPU time, by pid, of the PostgreSQL processes that work for `databases` (on this
    machine): their backends and autovacuum workers, named in the process title, and the
    server's shared helpers (WAL writer, checkpointer, background writer), which other
    databases' work keeps busy too."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            words = title.split()
            serves_one = "(" in title or "[local]" in title or "autovacuum worker" in title
            if any(name in words for name in databases) or not serves_one:
                found[int(entry.name)] = cpu_seconds(int(entry.name))
        except OSError:  # it ended meanwhile
            continue
    return found


def machine_busy_seconds() -> float:
    """CPU time every core spent on anything but idling, since boot (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuWindow:
    """CPU used while measuring: by this process, the server's processes (summed: a supervisor's
    workers), PostgreSQL's for the databases `db_names` (postgres_cpu_seconds), and the whole
    machine (in busy cores)."""

    server_pids: Sequence[int] = ()
    db_names: Sequence[str] = ()
    started: dict[str, Any] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)

    def _now(self) -> dict[str, Any]:
        now: dict[str, Any] = {
            "client": cpu_seconds(),
            "machine": machine_busy_seconds(),
            "wall": time.monotonic(),
        }
        if self.server_pids:
            now["server"] = sum(cpu_seconds(pid) for pid in self.server_pids)
        if self.db_names:
            now["db"] = postgres_cpu_seconds(self.db_names)
        return now

    def start(self) -> None:
        self.started = self._now()

    def stop(self) -> None:
        now = self._now()
        self.used = {
            key: now[key] - self.started[key]
            for key in ("client", "machine", "wall", "server")
            if key in now
        }
        if "db" in now:  # a process that started meanwhile counts from zero
            before = self.started["db"]
            self.used["db"] = sum(cpu - before.get(pid, 0.0) for pid, cpu in now["db"].items())


async def drive(
    call: Callable[[], Any],
    concurrency: int,
    warmup: float,
    duration: float,
    cpu: CpuWindow | None = None,
) -> tuple[list[float], int]:
    """Run `call` from `concurrency` tasks: warm up, then measure for `duration` seconds."""
    latencies: list[float] = []
    errors = 0
    measuring = False
    end = time.monotonic() + warmup + duration

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError:
                if measuring:
                    errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    async def switch_on() -> None:
        nonlocal measuring
        await asyncio.sleep(warmup)
        measuring = True
        if cpu is not None:
            cpu.start()
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            cpu.stop()

    await asyncio.gather(switch_on(), *(worker() for _ in range(concurrency)))
    return latencies, errors


def summary(
    latencies: list[float], errors: int, duration: float, rows: int, cpu: CpuWindow | None = None
) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 3) if ms else float("nan")

    def per_call(seconds: float) -> float | None:
        return round(seconds / len(ms) * 1e6, 1) if ms else None

    result: dict[str, Any] = {
        "count": len(ms),
        "errors": errors,
        "rps": round(len(ms) / duration, 1),
        "rows_per_s": round(len(ms) * rows / duration, 1),
        "p50_ms": round(statistics.median(ms), 3) if ms else float("nan"),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
    }
    if cpu is not None:
        # CPU per call: what the ratios come down to on a machine whose cores are all busy.
        result["client_cpu_us_per_call"] = per_call(cpu.used["client"])
        if "server" in cpu.used:
            result["server_cpu_us_per_call"] = per_call(cpu.used["server"])
        if "db" in cpu.used:
            result["db_cpu_us_per_call"] = per_call(cpu.used["db"])
        wall = cpu.used["wall"]
        result["client_cores"] = round(cpu.used["client"] / wall, 2)
        result["machine_busy_cores"] = round(cpu.used["machine"] / wall, 2)
    return result


async def run_grpc(args: argparse.Namespace) -> dict[str, Any]:
    requests = Requests(args.data_dir)
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(
                _channel(
                    args.target,
                    args.data_dir,
                    own_connection=args.channels > 1,
                    plaintext=args.plaintext,
                )
            )
            for _ in range(args.channels)
        ]
        call = _caller(args, requests, channels)
        cpu = CpuWindow(args.server_pid, args.db_name)
        latencies, errors = await drive(call, args.concurrency, args.warmup, args.duration, cpu)
    rows = args.batch if args.rpc == "score_batch" else 1
    result = summary(latencies, errors, args.duration, rows, cpu)
    if args.raw is not None:  # for a caller that merges the runs of several processes
        args.raw.write_text(json.dumps({"latencies_s": latencies, "cpu_s": cpu.used}))
    return result


def run_onnxruntime(args: argparse.Namespace) -> dict[str, Any]:
    """The model alone, in process: one row per run, or `batch` rows per run."""
    from service.config import DEFAULT_MODEL_PUBLIC_KEY
    from service.model.scorer import Scorer

    scorer = Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)
    rows = applicants()
    batch = [rows[i % len(rows)] for i in range(args.batch)]
    latencies: list[float] = []
    end_warmup = time.monotonic() + args.warmup
    while time.monotonic() < end_warmup:
        scorer.probabilities(batch)
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        started = time.perf_counter()
        scorer.probabilities(batch)
        latencies.append(time.perf_counter() - started)
    return summary(latencies, 0, args.duration, args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rpc",
        required=True,
        choices=("score", "score_batch", "adjust_limit", "evaluate_event", "echo", "onnxruntime"),
    )
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="spread the calls over this many connections, in turn (SO_REUSEPORT workers "
        "share out connections, not calls)",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="also report the CPU per call of this process (repeat: summed, for workers)",
    )
    parser.add_argument(
        "--db-name",
        action="append",
        default=[],
        help="also report the CPU per call of the local PostgreSQL's processes for this "
        "database (its backends) and of its shared helpers (WAL writer, checkpointer)",
    )
    parser.add_argument(
        "--raw", type=Path, help="also write the latencies and CPU seconds to this JSON file"
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="call without TLS (the plaintext echo ceiling, bench/echo.py --plaintext)",
    )
    args = parser.parse_args()
    result = run_onnxruntime(args) if args.rpc == "onnxruntime" else asyncio.run(run_grpc(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
