"""Fixtures of the tests that run real servers on a test database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PostgresDatabase, ServerProcess
from tests.db.replicas import migrate, replica


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def replicas(
    postgres_database: PostgresDatabase, data_dir: Path
) -> Iterator[Callable[[int], list[ServerProcess]]]:
    """Start N replicas on the migrated test database; all are stopped after the test."""
    migrate(postgres_database, data_dir)
    started: list[ServerProcess] = []

    def start(count: int) -> list[ServerProcess]:
        # One after another: each also (re)publishes the shared data directory's keys.
        servers = []
        for _ in range(count):
            servers.append(replica(postgres_database, data_dir))
            started.append(servers[-1])
        return servers

    try:
        yield start
    finally:
        for server in started:
            if server.process.poll() is None:
                server.terminate()
