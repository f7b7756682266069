"""Drift on a running server: `privscore monitor` reads it from the metrics endpoint, a real
shift in what applicants look like crosses "act" and is counted and logged, and no reported
bucket ever holds fewer than k decisions."""

from __future__ import annotations

import socket
import stat
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LOOPBACK, ServerProcess, applicants, privscore_cli, served_manifest

K = 10
WINDOW = 100


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_monitor_reports_drift_and_a_real_shift_crosses_act(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "var",
        "--metrics-port",
        "0",
        "--drift-min-count",
        str(K),
        "--drift-window",
        str(WINDOW),
    )
    try:
        (ready,) = [r for r in server.records() if r.get("event") == "server.ready"]
        port = int(ready["metrics_port"])
        url = f"http://{LOOPBACK}:{port}/metrics"
        rows = applicants()[:WINDOW]
        with server.channel() as channel:
            client = server.client(channel)
            client.score_batch("drift", [(f"before-{n}", row) for n, row in enumerate(rows)])

        png = tmp_path / "drift.png"
        done = privscore_cli(server.data_dir, "monitor", "--metrics-url", url, "--png", str(png))
        assert done.returncode == 0, done.stderr
        table = done.stdout
        features = [spec.name for spec in served_manifest().schema.model_features]
        *report, wrote = table.splitlines()
        assert wrote == f"wrote {png}"
        lines = {line.split()[0]: line.split()[1:] for line in report[4:]}
        assert set(lines) == {*features, "(score)"}
        assert f"{WINDOW} decisions" in table
        # Applicants drawn from the training data itself: nothing acts on the score.
        assert lines["(score)"][1] in ("ok", "watch")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert stat.S_IMODE(png.stat().st_mode) == 0o600

        # Now the same applicants, every one asking for the longest credit: a real shift.
        longest = served_manifest().schema.feature("duration_in_month").max
        shifted = [{**row, "duration_in_month": float(longest or 72)} for row in rows]
        with server.channel() as channel:
            client = server.client(channel)
            client.score_batch("drift", [(f"after-{n}", row) for n, row in enumerate(shifted)])
        after = privscore_cli(server.data_dir, "monitor", "--metrics-url", url)
        assert after.returncode == 0, after.stderr
        row = next(line for line in after.stdout.splitlines() if line.startswith("duration_in"))
        window_psi, window_status = row.split()[1:3]
        assert window_status == "act" and float(window_psi) >= 0.25

        # The watch counts and logs the crossing within its period, naming no value.
        deadline = time.monotonic() + 15
        crossed: list[float] = []
        while time.monotonic() < deadline and crossed != [1.0]:
            crossed = [
                value
                for name, labels, value in scrape(port)
                if name == "privscore_drift_crossings_total"
                and labels == {"window": "window", "feature": "duration_in_month", "level": "act"}
            ]
            time.sleep(0.5)
        assert crossed == [1.0]
        logged = server.wait_for_record(
            lambda r: r.get("event") == "drift.crossed" and r.get("feature") == "duration_in_month"
        )
        assert set(logged) <= {
            "event", "level", "timestamp", "window", "feature", "psi", "log_level", "logger",
        }  # fmt: skip

        # The k rule, end to end: every bucket a scrape shows holds at least k decisions.
        samples = scrape(port)
        decisions = {
            labels["window"]: value
            for name, labels, value in samples
            if name == "privscore_drift_decisions"
        }
        served = [
            (labels, value)
            for name, labels, value in samples
            if name == "privscore_drift_share" and labels["population"] == "served"
        ]
        assert served
        for labels, share in served:
            assert round(share * decisions[labels["window"]]) >= K, labels
    finally:
        assert server.terminate() == 0
    assert not [line for line in server.lines if "after-" in line or "before-" in line]


def test_monitor_says_why_it_cannot_read(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind((LOOPBACK, 0))
        port = unused.getsockname()[1]
    done = privscore_cli(tmp_path, "monitor", "--metrics-url", f"http://{LOOPBACK}:{port}/metrics")
    assert done.returncode == 1
    assert (
        done.stderr.startswith("privscore monitor: cannot read") and "Traceback" not in done.stderr
    )
