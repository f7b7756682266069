"""`privscore serve --workers N` (service.workers): the supervisor over real processes.

Most tests supervise a small worker of their own (WORKER below) rather than a server: what is
checked is the supervision (restart, give-up, signals, no process left behind), and a server's
start-up would only slow it down. The command line's refusals run the real `privscore serve`,
and one test runs real servers sharing one port on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from privscore.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from service.cli import build_parser
from service.client.channel import open_channel
from service.client.sdk import SCORE_METHOD, PrivscoreClient
from service.config import DataLayout
from service.security.certs import CertPaths
from service.workers import RestartPolicy, worker_command
from tests.conftest import (
    LOOPBACK,
    REPO_ROOT,
    applicants,
    init_dev_keys,
    privscore_cli,
    served_manifest,
)

WAIT_S = 15.0
START_S = 60.0  # real servers, started together on a busy machine

# The supervisor, logging JSON lines, over the command and policy given as JSON in argv[1].
SUPERVISOR = """
import asyncio, json, os, sys
from service.logs import configure_logging
from service.workers import RestartPolicy, Supervisor
spec = json.loads(sys.argv[1])
configure_logging("json", "info")
supervisor = Supervisor(
    spec["count"],
    spec["command"],
    os.environ,
    stop_timeout=spec["stop_timeout"],
    policy=RestartPolicy(**spec["policy"]),
)
sys.exit(asyncio.run(supervisor.run()))
"""

# A worker: joins the supervisor as `privscore serve` does, then behaves as argv[2] says (a
# chatty one first logs argv[3] lines), and leaves files in the directory argv[1] for the test
# to see: ready-PID once its handlers are in place, hup-PID for each SIGHUP it receives.
WORKER = """
import os, signal, sys, time
from pathlib import Path
from service.workers import join_supervisor
run, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "slow-start":
    time.sleep(1.0)  # a SIGHUP sent now must wait, not kill this worker
join_supervisor()
if mode == "fail":
    sys.exit(3)
if mode == "chatty":
    import structlog
    from service.logs import configure_logging
    configure_logging("json", "info")
    for n in range(int(sys.argv[3])):
        structlog.get_logger("test").info("chatty.line", n=n)
index = os.environ["PRIVSCORE_WORKER_INDEX"]
if mode == "fail-once" and not (run / f"failed-{index}").exists():
    (run / f"failed-{index}").touch()
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else lambda *_: sys.exit(0))
signal.signal(signal.SIGHUP, lambda *_: (run / f"hup-{os.getpid()}").touch())
(run / f"ready-{os.getpid()}").touch()
while True:
    time.sleep(0.05)
"""

FAST = RestartPolicy(first_backoff=0.1, max_backoff=0.4, settled_seconds=5.0, give_up_after=3)


def eventually(predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """The first true value of `predicate`, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def gone(pid: int) -> bool:
    """No such process, or only its exit status waiting to be collected (a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(FileNotFoundError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    return True


class Supervised:
    """A supervisor in its own process; its JSON log lines collected as they arrive. It and
    its workers run with unbuffered output (PYTHONUNBUFFERED), as in many container images."""

    def __init__(self, command: list[str], *, count: int = 2, **spec: Any) -> None:
        self.records: list[dict[str, Any]] = []
        self.unparsed: list[str] = []
        spec = {
            "count": count,
            "command": command,
            "stop_timeout": 10.0,
            "policy": dataclasses.asdict(FAST),
            **spec,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, json.dumps(spec)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                self.unparsed.append(line)

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r for r in list(self.records) if r.get("event") == event and fields.items() <= r.items()
        ]

    def started_pids(self) -> dict[int, int]:
        """The latest pid of each worker."""
        return {r["worker"]: r["pid"] for r in self.events("worker.started")}

    def all_pids(self) -> set[int]:
        return {r["pid"] for r in self.events("worker.started")}

    def wait(self, timeout: float = WAIT_S) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.all_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start supervisors of WORKER in `mode`; whatever is left is killed after the test."""
    started: list[Supervised] = []

    def start(mode: str, *args: str, **spec: Any) -> Supervised:
        command = [sys.executable, "-c", WORKER, str(tmp_path), mode, *args]
        supervisor = Supervised(command, **spec)
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.close()


def ready(run: Path, pids: set[int] | dict[int, int]) -> bool:
    wanted = set(pids.values()) if isinstance(pids, dict) else pids
    return bool(wanted) and all((run / f"ready-{pid}").exists() for pid in wanted)


def test_a_killed_worker_is_restarted_with_a_new_pid(supervise, tmp_path) -> None:
    supervisor = supervise("run")
    first = eventually(lambda: len(supervisor.started_pids()) == 2 and supervisor.started_pids())
    eventually(lambda: ready(tmp_path, first))
    os.kill(first[1], signal.SIGKILL)
    exited = eventually(lambda: supervisor.events("worker.exited", worker=1))
    assert exited[0]["pid"] == first[1]
    assert exited[0]["signal"] == "SIGKILL"
    again = eventually(
        lambda: supervisor.started_pids()[1] != first[1] and supervisor.started_pids()
    )
    assert again[0] == first[0]  # the other worker went on
    eventually(lambda: ready(tmp_path, again))
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0
    assert all(gone(pid) for pid in supervisor.all_pids())


def test_a_worker_that_fails_once_is_restarted_and_the_supervisor_carries_on(
    supervise, tmp_path
) -> None:
    supervisor = supervise("fail-once")
    eventually(lambda: len(supervisor.events("worker.exited", exit_code=3)) == 2)
    eventually(
        lambda: len(supervisor.all_pids()) == 4 and ready(tmp_path, supervisor.started_pids())
    )
    assert not supervisor.events("workers.giving_up")
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0


def test_workers_failing_at_start_make_the_supervisor_give_up(supervise) -> None:
    started = time.monotonic()
    supervisor = supervise("fail")
    assert supervisor.wait() == 1
    assert time.monotonic() - started < WAIT_S
    (giving_up,) = supervisor.events("workers.giving_up")
    assert giving_up["exit_code"] == 3
    assert giving_up["early_exits"] == FAST.give_up_after
    # Before giving up, the worker was restarted after waits that doubled.
    exited = supervisor.events("worker.exited", worker=giving_up["worker"])
    assert [r["restart_in_seconds"] for r in exited] == [
        min(FAST.first_backoff * 2**n, FAST.max_backoff) for n in range(FAST.give_up_after - 1)
    ]
    assert supervisor.events("workers.stopped", exit_code=1)
    assert all(gone(pid) for pid in supervisor.all_pids())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_every_worker_and_exits_zero(supervise, tmp_path, signum) -> None:
    supervisor = supervise("run", count=3)
    pids = eventually(lambda: len(supervisor.started_pids()) == 3 and supervisor.started_pids())
    eventually(lambda: ready(tmp_path, pids))
    supervisor.process.send_signal(signum)
    assert supervisor.wait() == 0
    stopped = supervisor.events("worker.stopped", exit_code=0)
    assert {r["pid"] for r in stopped} == set(pids.values())
    assert not supervisor.events("worker.exited")
    assert all(gone(pid) for pid in pids.values())


def test_a_worker_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    supervise, tmp_path
) -> None:
    supervisor = supervise("stubborn", count=1, stop_timeout=0.5)
    pids = eventually(lambda: supervisor.started_pids())
    eventually(lambda: ready(tmp_path, pids))
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 1
    assert supervisor.events("worker.killed", pid=pids[0])
    assert supervisor.events("worker.stopped", signal="SIGKILL")
    assert gone(pids[0])


def test_sighup_is_forwarded_to_every_worker(supervise, tmp_path) -> None:
    supervisor = supervise("run")
    pids = eventually(lambda: len(supervisor.started_pids()) == 2 and supervisor.started_pids())
    eventually(lambda: ready(tmp_path, pids))
    supervisor.process.send_signal(signal.SIGHUP)
    eventually(lambda: all((tmp_path / f"hup-{pid}").exists() for pid in pids.values()))
    assert supervisor.process.poll() is None
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0


def test_a_sighup_while_a_worker_starts_does_not_kill_it(supervise, tmp_path) -> None:
    supervisor = supervise("slow-start", count=1)
    pids = eventually(lambda: supervisor.started_pids())
    supervisor.process.send_signal(signal.SIGHUP)  # the worker is still in its first second
    eventually(lambda: ready(tmp_path, pids))
    assert not supervisor.events("worker.exited")
    assert supervisor.started_pids() == pids
    supervisor.process.send_signal(signal.SIGHUP)  # once it has its handler, it gets them
    eventually(lambda: (tmp_path / f"hup-{pids[0]}").exists())
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0


def test_workers_stop_when_their_supervisor_is_killed(supervise, tmp_path) -> None:
    supervisor = supervise("run")
    pids = eventually(lambda: len(supervisor.started_pids()) == 2 and supervisor.started_pids())
    eventually(lambda: ready(tmp_path, pids))
    supervisor.process.kill()
    supervisor.wait()
    eventually(lambda: all(gone(pid) for pid in pids.values()), timeout=5)


def test_workers_sharing_stdout_write_whole_log_lines_naming_the_worker(
    supervise, tmp_path
) -> None:
    supervisor = supervise("chatty", "3000", count=3)
    pids = eventually(lambda: len(supervisor.started_pids()) == 3 and supervisor.started_pids())
    eventually(lambda: ready(tmp_path, pids))  # each has written its lines
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0  # and every line is read
    assert len(supervisor.unparsed) == 0, supervisor.unparsed[:3]
    for worker in range(3):
        lines = supervisor.events("chatty.line", worker=worker)
        assert sorted(r["n"] for r in lines) == list(range(3000))


def test_the_workers_get_the_flags_they_were_given_less_workers() -> None:
    given = [
        "serve",
        "--workers",
        "3",
        "--port",
        "6000",
        "--insecure",
        "--database-url",
        "postgresql://127.0.0.1/x",
        "--audit-origin",
        "lender.example/privscore",
    ]
    args = build_parser().parse_args(given)
    command = worker_command(args)
    assert command[:4] == [sys.executable, "-m", "service.cli", "serve"]
    assert "--workers" not in " ".join(command)
    again = build_parser().parse_args(command[3:])
    assert {**vars(again), "workers": "3"} == {**vars(args), "run": again.run}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--insecure"], "--database-url"),
        (["--insecure", "--port", "0", "--database-url", "postgresql://127.0.0.1/x"], "--port 0"),
    ],
)
def test_workers_that_cannot_share_are_refused(tmp_path, args, message) -> None:
    result = privscore_cli(
        tmp_path, "serve", "--workers", "2", "--data-dir", str(tmp_path / "var"), *args
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- real servers sharing one port on PostgreSQL ---------------------------------------------


def free_port() -> int:
    """A port free now; the workers bind it by number, as port 0 cannot be shared."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


class ServingWorkers:
    """`privscore serve --workers N` on PostgreSQL, one port, mutual TLS; the log lines of
    the supervisor and its workers collected as they arrive (they share its stdout)."""

    def __init__(self, database: Any, data_dir: Path, count: int) -> None:
        self.data_dir = data_dir
        init_dev_keys(data_dir)
        migrated = privscore_cli(data_dir, "db", "migrate", "--database-url", database.url)
        assert migrated.returncode == 0, migrated.stderr
        self.target = f"{LOOPBACK}:{free_port()}"
        self.records: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                f"--workers={count}",
                f"--database-url={database.url}",
                f"--bind={LOOPBACK}",
                f"--port={self.target.rsplit(':', 1)[1]}",
                f"--data-dir={data_dir}",
                "--log-format=json",
                "--grace-seconds=2",
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.records.append(json.loads(line))

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r.get("event") == event]

    def ready(self) -> dict[int, int]:
        """{worker: pid} of the workers whose latest start logged `server.ready`."""
        if self.process.poll() is not None:
            raise AssertionError(f"the supervisor exited:\n{self.story()}")
        found: dict[int, tuple[int, bool]] = {}
        for record in list(self.records):
            if record.get("event") == "worker.started":
                found[record["worker"]] = (record["pid"], False)
            elif record.get("event") == "server.ready" and record.get("worker") in found:
                found[record["worker"]] = (found[record["worker"]][0], True)
        return {worker: pid for worker, (pid, up) in found.items() if up}

    def all_ready(self, count: int) -> dict[int, int]:
        try:
            ready: dict[int, int] = eventually(
                lambda: len(self.ready()) == count and self.ready(), START_S
            )
        except AssertionError:
            self.close()
            raise AssertionError(f"not all ready within {START_S}s:\n{self.story()}") from None
        return ready

    def pids(self) -> set[int]:
        return {r["pid"] for r in self.events("worker.started")}

    def story(self) -> str:
        """The supervisor's lines, the workers' readiness and refusals, and stderr (once the
        supervisor has exited), to show when an assertion fails."""
        shown = ("worker.", "workers.", "server.refused", "server.ready")
        lines = [
            " ".join(f"{k}={v}" for k, v in r.items() if k not in ("level", "timestamp"))
            for r in list(self.records)
            if str(r.get("event")).startswith(shown)
        ]
        if self.process.poll() is not None and self.process.stderr is not None:
            lines.append(self.process.stderr.read())
        return "\n".join(lines)

    def fresh_channel(self) -> grpc.Channel:
        """Mutual TLS as the dev client, on a connection of its own: channels of one process
        otherwise share a connection to the same target, and so one worker."""
        certs = CertPaths(DataLayout(self.data_dir).certs_dir)
        credentials = grpc.ssl_channel_credentials(
            certs.ca.read_bytes(),
            certs.client_key("dev").read_bytes(),
            certs.client_cert("dev").read_bytes(),
        )
        return grpc.secure_channel(
            self.target, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
        )

    def score_over_fresh_channels(self, calls: int) -> set[int]:
        """Score over `calls` channels of their own (a channel keeps to one worker); the
        workers whose log lines show the calls."""
        served = set()
        for n in range(calls):
            request_id = str(uuid.uuid4())
            with self.fresh_channel() as channel:
                client = PrivscoreClient.from_data_dir(
                    channel, self.data_dir, served_manifest().schema_version
                )
                subject = client.subject("t1", f"customer-{n}")
                request = scoring_service_pb2.ScoreRequest(
                    request_id=request_id,
                    subject=subject,
                    features=client.seal(SCORE_METHOD, request_id, subject, applicants()[n]),
                )
                # The header names the call in the serving worker's log line.
                reply = scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(
                    request, metadata=(("x-request-id", request_id),), timeout=10
                )
                assert reply.score.score > 0

            def logged(rid: str = request_id) -> dict[str, Any] | None:
                return next((r for r in list(self.records) if r.get("request_id") == rid), None)

            served.add(eventually(logged)["worker"])
        return served

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def serve_workers(postgres_database, tmp_path) -> Iterator[Callable[[int], ServingWorkers]]:
    started: list[ServingWorkers] = []

    def start(count: int) -> ServingWorkers:
        started.append(ServingWorkers(postgres_database, tmp_path / "var", count))
        return started[-1]

    yield start
    for workers in started:
        workers.close()


def test_workers_share_one_port_on_postgresql(serve_workers) -> None:
    workers = serve_workers(2)
    first = workers.all_ready(2)
    with open_channel(workers.target, workers.data_dir) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    assert workers.score_over_fresh_channels(16) == {0, 1}, workers.story()
    os.kill(first[1], signal.SIGKILL)
    eventually(lambda: workers.ready().get(1) not in (None, first[1]), timeout=START_S)
    (killed,) = [r for r in workers.events("worker.exited") if r["pid"] == first[1]]
    assert killed["signal"] == "SIGKILL"
    assert workers.score_over_fresh_channels(16) == {0, 1}, workers.story()
    last = workers.ready()
    assert workers.stop() == 0, workers.story()
    assert {(r["worker"], r["pid"]) for r in workers.events("worker.stopped")} == set(last.items())
    events = [r.get("event") for r in workers.records]
    after_stop = workers.records[events.index("workers.stopping") :]
    assert {r["worker"] for r in after_stop if r.get("event") == "server.stopped"} == {0, 1}
    assert all(gone(pid) for pid in workers.pids())


def test_workers_started_together_all_start_the_first_time(serve_workers) -> None:
    """Nothing a worker does at start-up may race another starting beside it on the same data
    directory and database: the supervisor would restart the loser and hide the fault."""
    workers = serve_workers(4)
    workers.all_ready(4)
    stopped = workers.stop()
    assert not workers.events("worker.exited"), workers.story()
    assert stopped == 0, workers.story()
