"""Scale-out: Score at 32 callers with the audit log in PostgreSQL against the file log, and
`serve --workers 2` against one worker on the database, measured in one run.

    .venv/bin/python -m bench.scale_out [--warmup 2] [--duration 6] [--rounds 3] [--out FILE]
    .venv/bin/python -m bench.run --only scale-out     (the same; `make bench` runs it last)

Needs a PostgreSQL server (PRIVSCORE_BENCH_DATABASE_URL, default
postgresql://postgres@127.0.0.1:5432/postgres; a password from PRIVSCORE_DATABASE_PASSWORD); if
none answers it prints one line saying why and is skipped. It makes two fresh databases, one
for each PostgreSQL server, migrates them, and starts three servers as `make serve` would (same
keys, same model, mutual TLS, durable: the file log with fsync on, PostgreSQL with its own
fsync and synchronous_commit as configured, reported): the embedded one (SQLite and the file
log), one with the database (`--workers 1`), and `--workers 2` on the other database (one port,
SO_REUSEPORT). The same load generator as the rest of the bench (bench/loadgen.py) drives each
with Score at 32 callers, in alternating rounds, all servers up; the ratios are taken from the
medians. The callers' calls go in turn over 32 connections: the kernel hands each worker
connections, not calls, so one connection would reach one worker.

Is the load generator the limit? Every step reports the cores the load generator used (one
process runs on one core at most) and how busy the whole machine was; and each round also
drives the two workers from two load-generator processes of 16 callers each: if one process
were the limit, two would get more. It also reports, from the server's log, how the calls were
shared between the workers, and from PostgreSQL's statistics, how many records each commit
carried (group commit). Drops the databases at the end. About two minutes at the defaults; the
report goes under `scale_out` in bench/results.json (or `--out`), beside the rest of the
bench's results. Not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import logging
import os
import shutil
import socket
import statistics
import tempfile
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bench.loadgen import summary
from bench.run import (
    REPO,
    ROUNDS,
    TABLE_HEADER,
    Server,
    find_step,
    load,
    start_privscore,
    table_row,
)
from service.config import ConfigError, DataLayout
from service.db import (
    ConnectionKwargs,
    DatabaseSettings,
    DatabaseUnavailable,
    connect,
    connection_kwargs,
    migrate,
)
from service.privacy.admin import init_keys
from service.security.certs import init_certs

SERVER_ENV = "PRIVSCORE_BENCH_DATABASE_URL"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_URL_ENV = "PRIVSCORE_DATABASE_URL"  # the server's --database-url, kept out of `ps`
RESULTS = REPO / "bench" / "results.json"  # under the key scale_out
CALLERS = 32
LOAD_PROCESSES = 2  # for the check that one load-generator process is not the limit
REACH_TIMEOUT_S = 3
TARGETS = {"pg_vs_file_rps": 0.8, "workers2_vs_1_rps": 1.3}
FILE, PG1, PG2, PG2_SPLIT = "file-log", "pg-w1", "pg-w2", "pg-w2-2gen"

HEADER = TABLE_HEADER + f"{'cli CPU':>8}{'db CPU':>8}{'cli cores':>10}{'busy':>6}{'other':>6}"


def row(step: dict[str, Any]) -> str:
    return table_row(step) + (
        f"{step['client_cpu_us_per_call']:>8.0f}{step.get('db_cpu_us_per_call') or 0:>8.0f}"
        f"{step['client_cores']:>10.2f}{step['machine_busy_cores']:>6.2f}{step['other_cores']:>6.2f}"
    )


def admin_kwargs() -> tuple[ConnectionKwargs | None, str]:
    """The PostgreSQL server to use, or None and why it cannot be used."""
    url = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    try:
        import psycopg  # noqa: F401 - only to say clearly that it is missing
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        kwargs = connection_kwargs(DatabaseSettings(url))
    except ConfigError as error:
        return None, f"{SERVER_ENV}: {error}"
    assert kwargs is not None
    kwargs = ConnectionKwargs({**kwargs, "connect_timeout": str(REACH_TIMEOUT_S)})
    try:
        with connect(kwargs) as conn:
            conn.execute("SELECT 1")
    except DatabaseUnavailable as error:
        return None, str(error)
    return kwargs, url


def database_url(url: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{name}"))


def free_port() -> int:
    """A port for `--workers`, which refuses port 0 (each worker would pick its own)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def counters(kwargs: ConnectionKwargs) -> tuple[int, int]:
    """The database's committed transactions so far and its log's size."""
    with connect(kwargs) as conn:
        found = conn.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),"
            " (SELECT size FROM audit_log_state)"
        ).fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def served_by_worker(server: Server, offset: int) -> list[int]:
    """Calls each worker finished since `offset` in the server's log (warm-up included)."""
    served: collections.Counter[int] = collections.Counter()
    decoder = json.JSONDecoder()
    with server.log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    for line in text.splitlines():
        at = line.find("{")
        while at >= 0:  # two workers' lines can meet on one line of the shared file
            try:
                record, end = decoder.raw_decode(line, at)
            except ValueError:
                break
            if record.get("event") == "rpc.finished":
                served[int(record.get("worker", 0))] += 1
            at = line.find("{", end)
    return [served[n] for n in range(len(server.pids))]


def split_load(
    server: Server, data_dir: Path, db_name: str | None, warmup: float, duration: float, temp: Path
) -> dict[str, Any]:
    """Score at CALLERS callers from LOAD_PROCESSES load generators at once, merged: calls and
    latencies pooled, the clients' CPU summed, the server's (seen by each) averaged."""
    share = CALLERS // LOAD_PROCESSES
    raws = [temp / f"load-{n}-{time.monotonic_ns()}.json" for n in range(LOAD_PROCESSES)]
    with ThreadPoolExecutor(LOAD_PROCESSES) as pool:
        runs = [
            pool.submit(
                load,
                server,
                data_dir,
                "score",
                concurrency=share,
                channels=share,
                warmup=warmup,
                duration=duration,
                db_name=db_name,
                raw=raw,
            )
            for raw in raws
        ]
        results = [run.result() for run in runs]
    details = [json.loads(raw.read_text()) for raw in raws]
    latencies = [x for detail in details for x in detail["latencies_s"]]
    merged = summary(latencies, sum(r["errors"] for r in results), duration, 1)
    cpu = {key: [d["cpu_s"][key] for d in details] for key in details[0]["cpu_s"]}
    count, wall = max(1, merged["count"]), statistics.mean(cpu["wall"])
    merged["client_cpu_us_per_call"] = round(sum(cpu["client"]) / count * 1e6, 1)
    for key in ("server", "db"):
        if key in cpu:
            merged[f"{key}_cpu_us_per_call"] = round(statistics.mean(cpu[key]) / count * 1e6, 1)
    merged["client_cores"] = round(sum(cpu["client"]) / wall, 2)
    merged["machine_busy_cores"] = round(statistics.mean(cpu["machine"]) / wall, 2)
    return merged


def ratios(steps: list[dict[str, Any]]) -> dict[str, float]:
    """The target ratios and the load check, from the medians of the rounds (or one round's)."""
    rps = {t: find_step(steps, t, "score", concurrency=CALLERS)["rps"] for t in (FILE, PG1, PG2)}
    split = find_step(steps, PG2_SPLIT, "score", concurrency=CALLERS)["rps"]
    return {
        "pg_vs_file_rps": round(rps[PG1] / rps[FILE], 3),
        "workers2_vs_1_rps": round(rps[PG2] / rps[PG1], 3),
        # Not targets: one load generator against two (about 1: it is not the limit), and
        # the workers' ratio with two load generators.
        "load_2gen_vs_1gen_rps": round(split / rps[PG2], 3),
        "workers2_2gen_vs_1_rps": round(split / rps[PG1], 3),
    }


@dataclass
class Target:
    name: str
    server: Server
    data_dir: Path
    database: ConnectionKwargs | None  # the server's, for its statistics
    load_processes: int = 1


def measure(
    target: Target, round_: int, warmup: float, duration: float, temp: Path
) -> dict[str, Any]:
    """One step: Score at CALLERS callers against `target`, with what the machine did."""
    server, database = target.server, target.database
    db_name = None if database is None else str(database["dbname"])
    before = counters(database) if database is not None else None
    offset = server.log.stat().st_size
    if target.load_processes == 1:
        result = load(
            server,
            target.data_dir,
            "score",
            concurrency=CALLERS,
            channels=CALLERS,
            warmup=warmup,
            duration=duration,
            db_name=db_name,
        )
    else:
        result = split_load(server, target.data_dir, db_name, warmup, duration, temp)
    step: dict[str, Any] = {
        "target": target.name,
        "rpc": "score",
        "concurrency": CALLERS,
        "batch_size": 1,
        "round": round_,
        "load_processes": target.load_processes,
        "workers": len(server.pids),
        **result,
    }
    ours = sum(step.get(f"{key}_cpu_us_per_call") or 0 for key in ("server", "client", "db"))
    # What else the machine did meanwhile: other work on a shared machine.
    step["other_cores"] = round(step["machine_busy_cores"] - ours * step["rps"] / 1e6, 2)
    if database is not None and before is not None:
        commits, size = counters(database)
        # Every transaction of the database counts (the log's batches, checkpoints, health
        # checks, these reads): records per commit is at least this.
        step["db_records_per_commit"] = round((size - before[1]) / max(1, commits - before[0]), 1)
    if len(server.pids) > 1:
        step["calls_by_worker"] = served_by_worker(server, offset)
    return step


def start_servers(temp: Path, url: str, names: list[str]) -> list[Server]:
    """The embedded server, one on database `names[0]` and two workers on `names[1]`, each on
    a data directory of its own with the same keys; the embedded one never sees a database."""
    data_dir = temp / "var"
    layout = DataLayout(data_dir)
    init_keys(layout, layout.keyring, layout.dev_kek)
    init_certs(layout.certs_dir)
    dirs = [temp / f"var-{name}" for name in (FILE, PG1, PG2)]
    for target_dir in dirs:
        shutil.copytree(data_dir, target_dir)  # the same keys, a log of its own
    embedded = {k: v for k, v in os.environ.items() if k != DATABASE_URL_ENV}
    servers = [start_privscore(dirs[0], env=embedded)]
    try:
        for target_dir, name, workers in ((dirs[1], names[0], 1), (dirs[2], names[1], 2)):
            servers.append(
                start_privscore(
                    target_dir,
                    "--workers",
                    str(workers),
                    port=free_port() if workers > 1 else 0,
                    workers=workers,
                    env={**embedded, DATABASE_URL_ENV: database_url(url, name)},
                )
            )
    except BaseException:
        for running in servers:
            running.stop()
        raise
    return servers


def run(warmup: float, duration: float, rounds: int = ROUNDS) -> dict[str, Any]:
    """The scale-out steps; the report (with `skipped` and why, when there is no PostgreSQL)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    admin, url = admin_kwargs()
    if admin is None:
        print(f"scale-out part skipped: no PostgreSQL to use ({url}); set {SERVER_ENV}")
        return {"skipped": url}
    with connect(admin) as conn:
        postgresql = {
            name: str((conn.execute(f"SHOW {name}").fetchone() or ("?",))[0])
            for name in ("server_version", "fsync", "synchronous_commit")
        }
    print(
        f"\nscale-out: Score at {CALLERS} callers over {CALLERS} connections, file log vs "
        f"PostgreSQL ({admin.describe()}, PostgreSQL {postgresql['server_version']}, fsync "
        f"{postgresql['fsync']}, synchronous_commit {postgresql['synchronous_commit']}), and "
        f"--workers 2 vs 1 on it; {rounds} alternating rounds (#n), ratios of their medians; "
        f"{PG2_SPLIT}: the two workers driven by {LOAD_PROCESSES} load generators of "
        f"{CALLERS // LOAD_PROCESSES} callers; CPU in us per call, cores busy in the window"
    )
    print(HEADER, flush=True)
    tag = uuid.uuid4().hex[:8]
    names = [f"privscore_bench_{tag}_w1", f"privscore_bench_{tag}_w2"]
    databases = [ConnectionKwargs({**admin, "dbname": name}) for name in names]
    steps: list[dict[str, Any]] = []
    try:
        for name, database in zip(names, databases, strict=True):
            with connect(admin) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            with connect(database) as conn:
                migrate(conn)
        with tempfile.TemporaryDirectory(prefix="privscore-bench-scale-") as temp_name:
            temp = Path(temp_name)
            servers = start_servers(temp, url, names)
            try:
                dirs = [Path(s.log).parent for s in servers]
                targets = [
                    Target(FILE, servers[0], dirs[0], None),
                    Target(PG1, servers[1], dirs[1], databases[0]),
                    Target(PG2, servers[2], dirs[2], databases[1]),
                    Target(PG2_SPLIT, servers[2], dirs[2], databases[1], LOAD_PROCESSES),
                ]
                for n in range(1, rounds + 1):
                    for target in targets:
                        steps.append(measure(target, n, warmup, duration, temp))
                        print(row(steps[-1]), flush=True)
            finally:
                for running in servers:
                    running.stop()
    finally:
        for name in names:
            with connect(admin) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    measured = ratios(steps)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "database_server": admin.describe(),
        "databases": names,  # made for this run, dropped after it
        "postgresql": postgresql,
        "cpus": os.cpu_count(),
        "callers": CALLERS,
        "connections": CALLERS,
        "warmup_s": warmup,
        "duration_s": duration,
        "rounds": rounds,
        "steps": steps,
        "ratios": measured,
        "ratios_by_round": [
            ratios([s for s in steps if s["round"] == n]) for n in range(1, rounds + 1)
        ],
        "targets": {name: f">= {value}" for name, value in TARGETS.items()},
        "met": {name: measured[name] >= value for name, value in TARGETS.items()},
    }
    print_summary(report)
    return report


def print_summary(report: dict[str, Any]) -> None:
    print()
    for name, value in report["ratios"].items():
        spread = ", ".join(f"{r[name]:.3f}" for r in report["ratios_by_round"])
        if name in TARGETS:
            verdict = f"target >= {TARGETS[name]:<4} {'PASS' if report['met'][name] else 'MISS'}"
        else:
            verdict = f"{'(check)':<19}"
        print(f"  {name:<32} {value:>7.3f}   {verdict}   rounds: {spread}")
    steps = report["steps"]
    one = [s for s in steps if s["load_processes"] == 1]
    busiest = max(s["client_cores"] for s in one)
    split = report["ratios"]["load_2gen_vs_1gen_rps"]
    print(
        f"\nload generator: one process of {CALLERS} callers used at most {busiest:.2f} of the "
        f"one core it can use (median machine busy "
        f"{statistics.median(s['machine_busy_cores'] for s in one):.2f} of {report['cpus']} "
        f"cores, of which other work {statistics.median(s['other_cores'] for s in one):.2f}); "
        f"{LOAD_PROCESSES} processes of {CALLERS // LOAD_PROCESSES} callers against the two "
        f"workers got {split:.2f}x one process's requests/s. "
        + (
            "One process is not the limit."
            if busiest < 0.6 and split < 1.15
            else "One process may be a limit: compare workers2_2gen_vs_1_rps."
        )
    )
    shares = [s["calls_by_worker"] for s in steps if "calls_by_worker" in s]
    if shares:
        print(
            "calls per worker (each step, warm-up included): "
            + ", ".join("/".join(str(x) for x in share) for share in shares)
        )
    per_commit = {
        t: statistics.median(s["db_records_per_commit"] for s in steps if s["target"] == t)
        for t in (PG1, PG2)
    }
    print(
        "records per PostgreSQL commit (median; every transaction counted, so at least): "
        + ", ".join(f"{t} {v:.1f}" for t, v in per_commit.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per step")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to add it to")
    args = parser.parse_args()
    write(run(args.warmup, args.duration, args.rounds), args.out)
    print(f"\nwrote the key scale_out of {args.out}")


def write(report: dict[str, Any], out: Path) -> None:
    """Put `report` under `scale_out` in `out`, keeping what else it holds (the rest of the
    bench's results, from the same run or an earlier one)."""
    results = json.loads(out.read_text()) if out.exists() else {}
    results["scale_out"] = report
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
