"""`make bench` keeps working: a one-second-per-step smoke run, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.db import connect
from tests.conftest import REPO_ROOT, PostgresServer


def test_the_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out, plot = tmp_path / "results.json", tmp_path / "latency.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--warmup",
            "0.2",
            "--duration",
            "0.8",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--plot",
            str(plot),
            "--skip",
            "scale-out",  # its own test, below
        ],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    report = json.loads(out.read_text())
    keys = {
        "target",
        "rpc",
        "concurrency",
        "batch_size",
        "rps",
        "rows_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "errors",
    }
    assert all(keys <= set(step) for step in report["steps"])
    assert {(s["target"], s["rpc"]) for s in report["steps"]} >= {
        ("privscore", "score"),
        ("privscore", "score_batch"),
        ("privscore", "adjust_limit"),
        ("privscore", "evaluate_event"),
        ("privscore-no-fsync", "score"),
        ("privscore-metrics", "score"),
        ("privscore-champion", "score"),
        ("privscore-shadow", "score"),
        ("mtls-echo", "echo"),
        ("plaintext-echo", "echo"),
        ("onnxruntime", "onnxruntime"),
    }
    assert all(step["errors"] == 0 and step["count"] > 0 for step in report["steps"])
    rounds = [(s["target"], s["round"]) for s in report["steps"] if "round" in s]
    assert sorted(rounds).count(("mtls-echo", 2)) == 1 and len(rounds) == 18  # 9 steps, 2 rounds
    assert set(report["ratios"]) == {
        "score_c32_server_cpu_vs_mtls_echo",
        "score_c32_rps_vs_mtls_echo",
        "score_c32_p99_fsync_on_vs_off",
        "batch128_server_cpu_us_per_row",
        "score_c32_rps_metrics_on_vs_off",
        "score_c32_server_cpu_metrics_on_vs_off",
        "score_c32_p99_vs_mtls_echo",
        "batch128_rows_vs_onnxruntime",
        "audit_fsync_on_vs_off_rps",
        "mtls_echo_vs_plaintext_rps",
        "mtls_echo_vs_plaintext_server_cpu",
        "score_c32_rps_shadow_on_vs_off",
        "score_c32_server_cpu_shadow_on_vs_off",
        "score_c32_p99_shadow_on_vs_off",
    }
    assert report["peak_rss_mb"]["privscore"] > 0
    assert [set(r) for r in report["ratios_by_round"]] == [set(report["ratios"])] * 2
    # Issues 14, 15 and 18's targets: each measured, with every round's value and a verdict.
    targets = {t["measure"]: t for t in report["targets"]}
    assert list(targets) == [
        "score_c32_server_cpu_vs_mtls_echo",
        "score_c32_rps_vs_mtls_echo",
        "score_c32_p99_fsync_on_vs_off",
        "batch128_server_cpu_us_per_row",
        "peak_rss_mb",
        "score_c32_rps_metrics_on_vs_off",
        "score_c32_rps_shadow_on_vs_off",
    ]
    assert all(t["measured"] > 0 and len(t["rounds"]) == 2 for t in targets.values())
    assert all(isinstance(t["met"], bool) for t in targets.values())
    assert targets["peak_rss_mb"]["measured"] == max(report["peak_rss_mb"].values())
    cpu = targets["score_c32_server_cpu_vs_mtls_echo"]["from_medians"]
    assert cpu["score_server_cpu_us_per_call"] > cpu["mtls_echo_server_cpu_us_per_call"] > 0
    printed = done.stdout
    assert printed.count("PASS") + printed.count("MISS") >= 7 and "mTLS echo" in printed
    assert report["metrics_scrapes"] >= 1  # the metrics server was scraped while measured
    served = [s for s in report["steps"] if s["target"] != "onnxruntime"]
    assert all(s["server_cpu_us_per_call"] > 0 and s["client_cpu_us_per_call"] > 0 for s in served)
    assert report["cpu_budget"]["score_server_cpu_us_measured"] > 0
    stages = report["score_stages"]
    assert set(stages["stages_us"]) == {
        "validate_request",
        "hpke_open_data_key",
        "open_and_check_fields",
        "model_one_row",
        "reasons_one_adverse_row",
        "audit_record_encode_and_hash",
        "log_line",
    }
    assert all(micros > 0 for micros in stages["stages_us"].values())
    assert stages["fields_per_request"] == 18 and 0 < stages["adverse_share"] < 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_shadow(report, rounds=2)
    assert "the shadow's cost" in printed


def _check_shadow(report: dict[str, Any], rounds: int) -> None:
    """The shadow's part of a report: both sides measured in every round, in swapped order, the
    challenger's score recorded for every Score of the one server and none of the other's."""
    champion, shadow = "privscore-champion", "privscore-shadow"
    pair = [(s["target"], s["round"]) for s in report["steps"] if s["target"] in (champion, shadow)]
    assert pair == [(champion, 1), (shadow, 1), (shadow, 2), (champion, 2)][: 2 * rounds]
    summary = report["shadow"]
    measures = {"rps", "server_cpu_us_per_call", "p99_ms"}
    assert set(summary["with_vs_without"]) == measures
    assert all(summary[side][m] > 0 for side in ("with", "without") for m in measures)
    assert all(len(r["rounds"]) == rounds for r in summary["with_vs_without"].values())
    records = report["shadow_score_records"]
    assert records[champion] > 0 and records[shadow] > 0
    assert report["peak_rss_mb"][shadow] > 0


def test_the_shadow_part_runs_alone(tmp_path: Path) -> None:
    """`--only shadow`: the two servers with and without a challenger, one short round; the
    report has the same keys as the whole bench's, with the shadow's steps, ratios and target
    alone, and no plot."""
    out, plot = tmp_path / "results.json", tmp_path / "latency.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--only",
            "shadow",
            "--warmup",
            "0.2",
            "--duration",
            "0.8",
            "--rounds",
            "1",
            "--out",
            str(out),
            "--plot",
            str(plot),
        ],
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    report = json.loads(out.read_text())
    assert report["parts"] == ["shadow"] and not plot.exists()
    assert {s["target"] for s in report["steps"]} == {"privscore-champion", "privscore-shadow"}
    assert all(s["errors"] == 0 and s["round"] == 1 for s in report["steps"])
    assert set(report["ratios"]) == {
        "score_c32_rps_shadow_on_vs_off",
        "score_c32_server_cpu_shadow_on_vs_off",
        "score_c32_p99_shadow_on_vs_off",
    }
    assert [t["measure"] for t in report["targets"]] == [
        "peak_rss_mb",
        "score_c32_rps_shadow_on_vs_off",
    ]
    _check_shadow(report, rounds=1)
    assert "the shadow's cost" in done.stdout


def _worktrees() -> set[str]:
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "list", "--porcelain"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {line.split(" ", 1)[1] for line in listed.splitlines() if line.startswith("worktree ")}


def test_the_ab_mode_compares_a_revision_with_this_checkout(tmp_path: Path) -> None:
    """bench/ab.py: HEAD in a temporary git worktree against this checkout, one short round;
    the worktree is gone after."""
    out = tmp_path / "ab.json"
    before = _worktrees()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ab",
            "--before",
            "HEAD",
            "--rounds",
            "1",
            "--warmup",
            "0.2",
            "--duration",
            "0.8",
            "--workdir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    report = json.loads(out.read_text())
    assert report["sides"]["before"]["spec"] == "HEAD"
    assert report["sides"]["after"]["tree"].startswith("this checkout")
    steps = report["steps"]
    assert [(s["target"], s["rpc"]) for s in steps] == [
        ("before", "score"),
        ("after", "score"),
        ("before", "score_batch"),
        ("after", "score_batch"),
    ]
    assert all(
        s["errors"] == 0 and s["count"] > 0 and s["server_cpu_us_per_call"] > 0 for s in steps
    )
    assert [s["batch_size"] for s in steps] == [1, 1, 128, 128]
    compared = {row["key"]: row for row in report["compared"]}
    assert set(compared) == {
        "rps",
        "server_cpu_us_per_call",
        "p99_ms",
        "server_cpu_us_per_row",
        "rows_per_s",
    }
    assert all(row["after_vs_before"] > 0 and len(row["rounds"]) == 1 for row in compared.values())
    assert all(row["median_of_rounds"] == row["rounds"][0] for row in compared.values())
    assert all(mb > 0 for mb in report["peak_rss_mb"].values())
    assert "after / before" in done.stdout and "rounds med" in done.stdout
    assert _worktrees() <= before  # ours removed (others may come and go)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("privscore-ab-")]


def test_the_soak_samples_server_memory(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, "-m", "bench.run", "--soak", "2", "--out", str(out)],
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["load"]["count"] > 0 and report["load"]["errors"] == 0
    assert len(report["rss_mb_samples"]) >= 2 and report["rss_mb_max"] > 0
    assert report["rss_growth_second_half_vs_first"] > 0


def _scale_out(out: Path, database_server: str) -> str:
    """`make bench`'s scale-out part alone, one short round; its output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--only",
            "scale-out",
            "--warmup",
            "0.2",
            "--duration",
            "0.8",
            "--rounds",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
        env={**os.environ, "PRIVSCORE_BENCH_DATABASE_URL": database_server},
    )
    return done.stdout


def test_the_scale_out_part_runs_on_postgresql(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"steps": []}))  # the rest of an earlier run's results
    printed = _scale_out(out, postgres_server.url)
    results = json.loads(out.read_text())
    assert results["steps"] == []  # kept
    report = results["scale_out"]
    steps = report["steps"]
    assert [s["target"] for s in steps] == ["file-log", "pg-w1", "pg-w2", "pg-w2-2gen"]
    assert all(s["errors"] == 0 and s["count"] > 0 for s in steps)
    assert all(s["server_cpu_us_per_call"] > 0 and s["client_cpu_us_per_call"] > 0 for s in steps)
    assert all(s["db_cpu_us_per_call"] > 0 and s["db_records_per_commit"] > 0 for s in steps[1:])
    assert [s["workers"] for s in steps] == [1, 1, 2, 2]
    assert [s["load_processes"] for s in steps] == [1, 1, 1, 2]
    assert all(len(s["calls_by_worker"]) == 2 for s in steps[2:])
    assert set(report["met"]) == {"pg_vs_file_rps", "workers2_vs_1_rps"}
    assert set(report["ratios"]) == set(report["ratios_by_round"][0]) >= set(report["met"])
    assert "pg_vs_file_rps" in printed and ("PASS" in printed or "MISS" in printed)
    with connect(postgres_server.kwargs) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", (report["databases"],)
        ).fetchone()
    assert left == (0,)  # dropped


def test_the_scale_out_part_says_why_it_is_skipped(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    printed = _scale_out(out, "postgresql://postgres@127.0.0.1:1/postgres")
    assert "scale-out part skipped" in printed and "127.0.0.1:1" in printed
    assert "cannot connect" in json.loads(out.read_text())["scale_out"]["skipped"]
