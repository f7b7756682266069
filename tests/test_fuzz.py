"""The coverage-guided fuzz target runs for a bounded time and finds no crash.

tests/fuzz/fuzz_requests.py takes bytes through request parsing, validation and decryption the
way the server does; here it runs in a child process (libFuzzer owns the process and exits it)
with a time and run budget, from seeds it seals to its own fresh keyring.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytest.importorskip("atheris")

FUZZ_SECONDS = 20
MAX_RUNS = 500_000


def test_the_request_fuzzer_finds_no_crash(tmp_path: Path) -> None:
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_requests",
            f"-max_total_time={FUZZ_SECONDS}",
            f"-runs={MAX_RUNS}",
            "-seed=20261126",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-max_len=16384",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 100,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Uncaught Python exception" not in output
    assert list(artifacts.iterdir()) == []  # no crash, timeout or leak input saved
    runs = re.search(r"Done (\d+) runs", output)
    assert runs is not None and int(runs.group(1)) > 1000, output[-2000:]
    assert len(list(corpus.glob("seed-*"))) >= 8  # the seeds were sealed and read
