"""Shared fixtures: a real privscore server on a free loopback port."""

from __future__ import annotations

import os

# onnxruntime keeps telemetry unless this is set before its first import, in any process.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import contextlib
import csv
import functools
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.client.channel import open_channel
from service.client.sdk import PrivscoreClient
from service.config import DEFAULT_MODEL_DIR, DataLayout
from service.model.manifest import Manifest, load_unverified_manifest
from service.model.schema import parse_text
from service.privacy.admin import init_keys
from service.privacy.sealing import FeatureInput
from service.security.certs import CertPaths, init_certs

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0


def init_dev_keys(data_dir: Path) -> None:
    """What `make serve` creates: dev keys and dev certificates."""
    layout = DataLayout(data_dir)
    init_keys(layout, layout.keyring, layout.dev_kek)
    init_certs(layout.certs_dir)


def aio_channel(data_dir: Path, port: int, cert_name: str = "dev") -> grpc.aio.Channel:
    """An asyncio channel presenting a dev client certificate."""
    certs = CertPaths(DataLayout(data_dir).certs_dir)
    credentials = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(),
        certs.client_key(cert_name).read_bytes(),
        certs.client_cert(cert_name).read_bytes(),
    )
    return grpc.aio.secure_channel(f"{LOOPBACK}:{port}", credentials)


@functools.cache
def served_manifest() -> Manifest:
    return load_unverified_manifest(DEFAULT_MODEL_DIR)


@functools.cache
def applicants() -> tuple[dict[str, FeatureInput], ...]:
    """German-credit applicants (model features only, typed) from the shipped data set."""
    schema = served_manifest().schema
    with open(REPO_ROOT / "model_export" / "data" / "german_credit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return tuple(
        {spec.name: parse_text(spec, row[spec.name]) for spec in schema.model_features}
        for row in rows
    )


class ServerProcess:
    """`privscore serve` in a child process; collects its JSON log lines as they arrive."""

    def __init__(
        self,
        data_dir: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        init_dev_keys(data_dir)
        self.lines: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--bind",
                LOOPBACK,
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                "--log-format",
                "json",
                *extra_args,
            ],
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        ready = self.wait_for("server.ready", START_TIMEOUT_S)
        self.port = int(ready["port"])
        self.target = f"{LOOPBACK}:{self.port}"

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                self._events.put(json.loads(line))

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = self._events.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None and self._events.empty():
                    stderr = self.process.stderr.read() if self.process.stderr else ""
                    raise AssertionError(f"server exited early: {stderr}") from None
                continue
            if record.get("event") == event:
                return record
        raise AssertionError(f"no {event!r} log line within {timeout}s")

    def channel(self, cert_name: str = "dev", *, retries: bool = True) -> grpc.Channel:
        """Mutual TLS as the named dev client (dev holds the scorer, limit and monitor roles),
        retrying the idempotent calls as the SDK's channel does unless `retries=False`."""
        return open_channel(self.target, self.data_dir, cert_name, retries=retries)

    def client(self, channel: grpc.Channel, cert_name: str = "dev") -> PrivscoreClient:
        """The SDK on `channel`, sealing for the identity of `cert_name`: the certificate the
        channel presents, or the server opens none of its data keys."""
        return PrivscoreClient.from_data_dir(
            channel, self.data_dir, served_manifest().schema_version, cert_name=cert_name
        )

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def wait_for_record(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first log record matching `predicate`; a call's line is written just after its
        reply leaves, so tests poll for it rather than race it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if predicate(record):
                    return record
            time.sleep(0.02)
        raise AssertionError("no matching log record")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "var")
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a module's read-only tests: starting a process per test costs seconds."""
    server = ServerProcess(tmp_path_factory.mktemp("shared") / "var")
    try:
        yield server
    finally:
        server.terminate()


def audit_log_key(data_dir: Path) -> tuple[Any, str]:
    """(verifier key, origin) of the audit log a server wrote under `data_dir`: what a
    reviewer is given, read from the files the server publishes."""
    from service.audit import VerifierKey, read_identity

    layout = DataLayout(data_dir)
    identity = read_identity(layout.audit_dir)
    assert identity is not None, "the server has not opened its audit log"
    return VerifierKey.parse(layout.audit_verifier_key.read_text()), identity.origin


def privscore_cli(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`privscore ARGS` as its own process, for the data directory `data_dir` (given as
    PRIVSCORE_DATA_DIR, so commands whose defaults follow it find the server's files), with
    `env` added to its otherwise bare environment."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PRIVSCORE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", **(env or {})},
    )


# -- PostgreSQL: a fresh database per test on a real server ------------------------------------
#
# Tests that use `postgres_server` or `postgres_database` are marked `postgres`. Without a
# reachable server they skip, saying how to run them; with PRIVSCORE_REQUIRE_POSTGRES=1 (CI,
# .ci/run) such a skip is reported as a failure instead.

POSTGRES_URL_ENV = "PRIVSCORE_TEST_DATABASE_URL"
REQUIRE_POSTGRES_ENV = "PRIVSCORE_REQUIRE_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_POSTGRES_FIXTURES = frozenset({"postgres_server", "postgres_database"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"postgres: needs a real PostgreSQL ({POSTGRES_URL_ENV}, default {DEFAULT_POSTGRES_URL})",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under PRIVSCORE_REQUIRE_POSTGRES=1, a test that needs PostgreSQL and skipped fails."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("postgres") is not None
        and os.environ.get(REQUIRE_POSTGRES_ENV) == "1"
    ):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_POSTGRES_ENV}=1, and this test needs PostgreSQL: {reason}"


class PostgresServer:
    """The server the tests may create databases on (as a role allowed to CREATE DATABASE)."""

    def __init__(self, url: str) -> None:
        from service.db import DatabaseSettings, connection_kwargs

        self.url = url
        kwargs = connection_kwargs(DatabaseSettings(url), environ={})
        assert kwargs is not None
        self.kwargs = kwargs

    def database_url(self, name: str) -> str:
        """This server's URL naming database `name` instead."""
        import urllib.parse

        return urllib.parse.urlsplit(self.url)._replace(path="/" + name).geturl()

    def database_kwargs(self, name: str) -> Any:
        from service.db import ConnectionKwargs

        return ConnectionKwargs({**self.kwargs, "dbname": name})


class PostgresDatabase:
    """A database of its own for one test, dropped after it."""

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name
        self.url = server.database_url(name)  # for `privscore db ... --database-url`
        self.kwargs = server.database_kwargs(name)

    def connect(self) -> Any:
        """An autocommit connection to this database (use as a context manager)."""
        from service.db import connect

        return connect(self.kwargs)


def _unreachable(url: str, why: str) -> str:
    return (
        f"PostgreSQL at {url} is not reachable ({why}). To run these tests, start it "
        "(`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or set "
        f"{POSTGRES_URL_ENV}=postgresql://USER@HOST:PORT/postgres (a role that may CREATE "
        f"DATABASE). CI sets {REQUIRE_POSTGRES_ENV}=1, which makes this skip a failure."
    )


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The test PostgreSQL server, or a skip saying how to provide one."""
    from service.db import DatabaseUnavailable
    from service.settings import ConfigError

    url = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    try:
        server = PostgresServer(url)
    except ConfigError as error:
        pytest.fail(f"{POSTGRES_URL_ENV}: {error}")
    try:
        with PostgresDatabase(server, server.kwargs.get("dbname", "postgres")).connect() as conn:
            conn.execute("SELECT 1")
    except DatabaseUnavailable as error:
        pytest.skip(_unreachable(server.kwargs.describe(), str(error)))
    return server


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty (unmigrated) database, uniquely named, dropped after the test."""
    import secrets

    from psycopg import sql

    name = f"privscore_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = PostgresDatabase(postgres_server, postgres_server.kwargs.get("dbname", "postgres"))
    with admin.connect() as conn:
        # template0: never connected to, so copying it cannot fail for a session left on it.
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield PostgresDatabase(postgres_server, name)
    finally:
        with admin.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
