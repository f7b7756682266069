"""Metrics with PostgreSQL and `--workers 2`: each worker serves its own metrics on
`--metrics-port + i`, the database log's commits are timed, and the workers' counts add up to
the calls made."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import LOOPBACK, PostgresDatabase, applicants
from tests.db.replicas import migrate, replica
from tests.monitoring.test_metrics import samples, scrape, total


def free_port_pair() -> int:
    """A port P with P + 1 also free (each bound and released here)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((LOOPBACK, 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((LOOPBACK, port + 1))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no two adjacent free ports")


def test_each_worker_serves_its_own_metrics_and_they_add_up(
    postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    data_dir = tmp_path / "var"
    migrate(postgres_database, data_dir)
    port = free_port_pair()
    grpc_port = next(p for p in iter(free_port_pair, None) if p not in (port - 1, port, port + 1))
    server = replica(
        postgres_database,
        data_dir,
        *("--workers", "2", "--port", str(grpc_port), "--metrics-port", str(port)),
    )
    try:
        server.wait_for("server.ready", 60)  # the second worker
        ready = [r for r in server.records() if r.get("event") == "server.ready"]
        assert sorted(int(r["metrics_port"]) for r in ready) == [port, port + 1]
        calls = 24
        # Each channel is one connection, which the kernel gives to one worker or the other.
        for n in range(calls):
            with server.channel() as channel:
                server.client(channel).score("t", f"worker-metrics-{n}", applicants()[n])
        scraped = [samples(scrape(p)) for p in (port, port + 1)]
    finally:
        assert server.terminate() == 0
    score = {"grpc_method": "Score", "grpc_code": "OK"}
    handled = [total(found, "grpc_server_handled_total", **score) for found in scraped]
    assert sum(handled) == calls
    records = [total(found, "privscore_audit_records_total") for found in scraped]
    assert sum(records) == calls
    commits = [total(found, "privscore_audit_commit_seconds_count") for found in scraped]
    assert sum(commits) >= 1 and all(c > 0 for c, h in zip(commits, handled, strict=True) if h)
