"""`make bench`: privscore against its ceilings, measured in one run on one machine.

Starts the server as `make serve` would (real keys, real model, audit on, mutual TLS), drives it
from a separate load-generator process, then measures the ceilings with the same generator: a
bare grpc.aio echo server with the privscore server's mutual TLS credentials (the mTLS echo) and
the same echo in plaintext (bench/echo.py), onnxruntime in process on the same model, and the
server with audit fsync off (the price of durability). The steps behind the targets run in
alternating rounds, all servers up, and each target's ratio is taken from the steps' medians, so
the drift of a shared machine weighs on both sides alike (each round's own value is reported
too). Then times each stage of a Score in process (bench/stages.py), to show where the server's
time goes. Writes bench/results.json and bench/latency.png and prints the steps, the targets of
issues 14, 15 and 18 with PASS/MISS (TARGETS) and the other ratios to the ceilings.

To measure one change's effect, before and after in one window: bench/ab.py.

Last, when PostgreSQL is reachable, the scale-out part (bench/scale_out.py): Score at 32
callers on the file log against PostgreSQL, and `--workers 2` against one worker; its results
go under `scale_out` in the same JSON. `--only scale-out` runs that part alone, `--skip
scale-out` leaves it out.

The shadow's cost (issue 18): two more servers, alike but for a challenger, take Score at 32
callers in the same alternating rounds (their order swapped each round). Both serve a copy of
the bundled artifact signed with a throwaway Ed25519 key made for the run (the model team's
private key is not needed) and trust only that key; one also runs a second copy, under another
model version, in shadow (`--challenger-dir`). The bench then reads both audit logs: every
Score record of the one holds the challenger's score in its `shadow`, none of the other's, or
the run fails (a challenger that fails leaves no score, and would look cheap). `--skip shadow`
leaves this out, `--only shadow` runs it alone (written to `--out` with the same keys, without
the other steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_export.sign import generate_keypair, sign_artifact
from service.audit import iter_records
from service.config import DEFAULT_MODEL_DIR, DataLayout
from service.privacy.admin import init_keys
from service.security.certs import init_certs

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3  # of the steps the target ratios compare, by default
RESULTS = REPO / "bench" / "results.json"
PLOT = REPO / "bench" / "latency.png"
SCALE_OUT = "scale-out"  # the part in bench/scale_out.py, when PostgreSQL is reachable
MTLS_ECHO, PLAIN_ECHO = "mtls-echo", "plaintext-echo"  # the two echo ceilings' step targets
METRICS_ON = "privscore-metrics"  # the same server with --metrics-port, scraped every second
SCRAPE_SECONDS = 1.0
SHADOW = "shadow"  # the part that measures a challenger in shadow (issue 18)
# Its two servers' step targets: the same signed champion, without and with a challenger.
CHAMPION_ONLY, WITH_SHADOW = "privscore-champion", "privscore-shadow"
SCORE_RPC = "/privscore.v1.ScoringService/Score"  # an audit record's `rpc`
# The shadow's ratios, with/without: (the ratio's name part, the step's measure).
SHADOW_MEASURES = (("rps", "rps"), ("server_cpu", "server_cpu_us_per_call"), ("p99", "p99_ms"))


@dataclass(frozen=True)
class Target:
    """One target of issues 14 and 15: `measure` (a key of `ratios`, or peak_rss_mb) `op`
    `limit`."""

    measure: str
    what: str
    op: str  # "<=", ">=" or "<"
    limit: float
    unit: str  # "x" for a ratio

    def met(self, value: float) -> bool:
        return {
            "<=": value <= self.limit,
            ">=": value >= self.limit,
            "<": value < self.limit,
        }[self.op]

    def text(self) -> str:
        return f"{self.op} {self.limit:g}{'x' if self.unit == 'x' else ' ' + self.unit}"


TARGETS = (
    Target(
        "score_c32_server_cpu_vs_mtls_echo",
        "Score at 32 callers: server CPU per call vs the mTLS echo's",
        "<=",
        3.0,
        "x",
    ),
    Target(
        "score_c32_rps_vs_mtls_echo",
        "Score at 32 callers: requests/s vs the mTLS echo's",
        ">=",
        0.33,
        "x",
    ),
    Target(
        "score_c32_p99_fsync_on_vs_off",
        "Score at 32 callers: p99 with audit fsync on vs off",
        "<=",
        1.5,
        "x",
    ),
    Target(
        "batch128_server_cpu_us_per_row",
        "ScoreBatch(128) at 4 callers: server CPU per row",
        "<=",
        150,
        "us",
    ),
    Target("peak_rss_mb", "peak RSS of a privscore server in the run", "<", 300, "MB"),
    # issue 15: what metrics cost, scraped as often as any scraper would
    Target(
        "score_c32_rps_metrics_on_vs_off",
        "Score at 32 callers: requests/s with metrics on (scraped every second) vs off",
        ">=",
        0.95,
        "x",
    ),
    # issue 18: what a challenger in shadow costs. It adds, per batch of concurrent calls, one
    # more model run of the same rows (no reasons: those are the champion's alone) with its
    # wake of the event loop, and a few fields to each audit record; not the per-call gRPC,
    # field opening, sealing or audit work, which make up most of a Score's CPU (the stages
    # below). So it should cost well under a fifth of the throughput; a fifth or more means the
    # shadow does more than a second model's share of the work. (Doubling all model work,
    # reasons included, would still leave far more than 0.6x: that floor would miss a shadow
    # costing several times what it should.)
    Target(
        "score_c32_rps_shadow_on_vs_off",
        "Score at 32 callers: requests/s with a challenger in shadow vs without",
        ">=",
        0.8,
        "x",
    ),
)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    # The processes that serve: the server itself, or a supervisor's workers.
    pids: list[int] = dataclasses.field(default_factory=list)
    plaintext: bool = False  # the plaintext echo: called without TLS

    def __post_init__(self) -> None:
        self.pids = self.pids or [self.process.pid]

    def _status_mb(self, field: str) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith(f"{field}:"))
        return int(line.split()[1]) / 1024

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM")

    def rss_mb(self) -> float:
        return self._status_mb("VmRSS")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)

    def metrics_port(self) -> int:
        """The port a server started with `--metrics-port` serves its metrics on."""
        ready = next(r for r in _log_records(self.log) if r.get("event") == "server.ready")
        return int(ready["metrics_port"])


class Scraper:
    """Scrapes a metrics endpoint every SCRAPE_SECONDS on a thread, as Prometheus would (at a
    shorter interval than most), so the metrics step pays for its scrapes too."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._stopping = threading.Event()
        self.scrapes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(SCRAPE_SECONDS):
            with urllib.request.urlopen(self._url, timeout=10) as response:
                response.read()
            self.scrapes += 1

    def stop(self) -> int:
        self._stopping.set()
        self._thread.join(timeout=15)
        return self.scrapes


def _log_records(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line) if line.startswith("{") else {})
        except ValueError:  # a line being written
            continue
    return records


def tree_env(tree: Path, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment of a process that runs `tree`'s code (another checkout of the
    repository, bench/ab.py) with this venv's Python: `env` (or this one's) with PYTHONPATH
    set to the tree, ahead of the venv's editable install of this checkout."""
    if tree == REPO:
        return None if env is None else dict(env)
    return {**(os.environ if env is None else env), "PYTHONPATH": str(tree)}


def start_privscore(
    data_dir: Path,
    *extra: str,
    port: int = 0,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    tree: Path = REPO,
) -> Server:
    """`privscore serve` on `data_dir` with `extra` flags, once `workers` processes are ready
    (with `--workers N` in `extra`, `port` must be a port number); the code of `tree`."""
    log = data_dir / f"server-{time.monotonic_ns()}.log"
    with log.open("wb") as out:  # a file, not a pipe: logging must never block the server
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--log-format",
                "json",
                *extra,
            ],
            cwd=tree,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tree_env(tree, env),
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = [r for r in _log_records(log) if r.get("event") == "server.ready"]
        if len(ready) >= workers:
            return Server(process, int(ready[0]["port"]), log, [int(r["pid"]) for r in ready])
        if process.poll() is not None:
            raise SystemExit(f"privscore did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit("privscore did not become ready within 60 s")


def start_echo(data_dir: Path, reply_bytes: int, *, plaintext: bool = False) -> Server:
    """The echo ceiling (bench/echo.py): with the privscore server's mutual TLS credentials
    for `data_dir`, or in plaintext."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.echo",
            "--data-dir",
            str(data_dir),
            "--reply-bytes",
            str(reply_bytes),
            *(["--plaintext"] if plaintext else []),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    port = int(process.stdout.readline().split()[1])
    return Server(process, port, Path(os.devnull), plaintext=plaintext)


def load(
    target: Server | None,
    data_dir: Path,
    rpc: str,
    *,
    concurrency: int = 1,
    batch: int = 1,
    warmup: float,
    duration: float,
    channels: int = 1,
    db_name: str | None = None,
    raw: Path | None = None,
    tree: Path = REPO,
) -> dict[str, Any]:
    """One run of the load generator (bench/loadgen.py, `tree`'s) in its own process; its JSON
    result."""
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--rpc",
        rpc,
        "--data-dir",
        str(data_dir),
        "--concurrency",
        str(concurrency),
        "--batch",
        str(batch),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        "--channels",
        str(channels),
    ]
    if target is not None:
        command += ["--target", f"127.0.0.1:{target.port}"]
        for pid in target.pids:
            command += ["--server-pid", str(pid)]
        if target.plaintext:
            command += ["--plaintext"]
    if db_name is not None:
        command += ["--db-name", db_name]
    if raw is not None:
        command += ["--raw", str(raw)]
    done = subprocess.run(
        command,
        cwd=tree,
        env=tree_env(tree),
        capture_output=True,
        text=True,
        timeout=warmup + duration + 120,
    )
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        done.check_returncode()
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


TABLE_HEADER = (
    f"  {'target':<23}{'rpc':<15}{'c':>3}{'batch':>6}{'req/s':>9}{'rows/s':>9}"
    f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>7}{'srv CPU us':>11}"
)


def table_row(step: dict[str, Any]) -> str:
    server_cpu = step.get("server_cpu_us_per_call")
    label = step["target"] + (f" #{step['round']}" if "round" in step else "")
    return (
        f"  {label:<23}{step['rpc']:<15}{step['concurrency']:>3}{step['batch_size']:>6}"
        f"{step['rps']:>9.1f}{step['rows_per_s']:>9.1f}{step['p50_ms']:>9.2f}"
        f"{step['p90_ms']:>9.2f}{step['p99_ms']:>9.2f}{step['errors']:>7}"
        + (f"{server_cpu:>11.0f}" if server_cpu else "")
    )


def shadow_artifacts(root: Path) -> tuple[list[str], list[str]]:
    """The serve flags of the shadow's two servers, made under `root`: (the champion's, added
    for the one with a challenger). A throwaway Ed25519 keypair signs two copies of the
    bundled artifact, the second under another model version (the challenger), so the bench
    needs no key of the model team's and both servers verify their models as in production."""
    root.mkdir()
    private, public = root / "bench-model-team.key", root / "bench-model-team.pub"
    generate_keypair(private, public)
    made = []
    for name in ("champion", "challenger"):
        artifact = root / name
        shutil.copytree(DEFAULT_MODEL_DIR, artifact)
        if name == "challenger":
            manifest = artifact / "manifest.json"
            document = json.loads(manifest.read_text())
            document["model_version"] = f"{document['model_version']}-bench-challenger"
            manifest.write_text(json.dumps(document, indent=2) + "\n")
        sign_artifact(artifact, private)
        made.append(artifact)
    champion, challenger = made
    return (
        ["--model-dir", str(champion), "--model-public-key", str(public)],
        ["--challenger-dir", str(challenger)],
    )


def check_shadowed(data_dirs: Mapping[str, Path]) -> dict[str, int]:
    """Score records whose `shadow` holds the challenger's score, in each shadow server's audit
    log (read after it stopped), or exit: every one of WITH_SHADOW's must have it and none of
    CHAMPION_ONLY's, or the two would not differ by the challenger's work alone (a challenger
    that fails, or skips a row, records no score and would look cheap)."""
    counts = {}
    for target, data_dir in data_dirs.items():
        scored = [
            "score" in (stored.record.get("shadow") or {})
            for stored in iter_records(DataLayout(data_dir).audit_dir)
            if stored.record.get("rpc") == SCORE_RPC
        ]
        expected = target == WITH_SHADOW
        if not scored or any(shadowed != expected for shadowed in scored):
            missed = sum(shadowed != expected for shadowed in scored)
            raise SystemExit(
                f"{target}: {missed} of {len(scored)} Score records "
                + ("lack the challenger's shadow" if expected else "carry a shadow")
            )
        counts[target] = len(scored)
    return counts


def run(
    warmup: float,
    duration: float,
    out: Path,
    plot: Path,
    rounds: int = ROUNDS,
    *,
    shadow: bool = True,
    only_shadow: bool = False,
) -> dict[str, Any]:
    """The bench's steps (with the shadow's unless `shadow` is false; the shadow's alone if
    `only_shadow`), written to `out` and plotted to `plot` (not when only the shadow's)."""
    steps: list[dict[str, Any]] = []
    shadow = shadow or only_shadow

    def step(
        target: str,
        rpc: str,
        server: Server | None,
        data_dir: Path,
        round_: int | None = None,
        **shape: int,
    ) -> None:
        result = load(
            server,
            data_dir,
            rpc,
            warmup=warmup,
            duration=duration,
            concurrency=shape.get("concurrency", 1),
            batch=shape.get("batch", 1),
        )
        steps.append(
            {
                "target": target,
                "rpc": rpc,
                "concurrency": shape.get("concurrency", 1),
                "batch_size": shape.get("batch", 1),
                **({"round": round_} if round_ is not None else {}),
                **result,
            }
        )
        print(table_row(steps[-1]), flush=True)

    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="privscore-bench-") as temp:
        data_dir, unsynced_dir = Path(temp) / "var", Path(temp) / "var-no-fsync"
        metered_dir = Path(temp) / "var-metrics"
        shadow_dirs = {
            CHAMPION_ONLY: Path(temp) / "var-champion",
            WITH_SHADOW: Path(temp) / "var-shadow",
        }
        layout = DataLayout(data_dir)
        init_keys(layout, layout.keyring, layout.dev_kek)
        init_certs(layout.certs_dir)
        for copy in ([] if only_shadow else [unsynced_dir, metered_dir]) + (
            list(shadow_dirs.values()) if shadow else []
        ):
            shutil.copytree(data_dir, copy)  # same keys, its own audit log
        reply_bytes = 240  # a ScoreResponse with reasons is about this size
        servers: list[Server] = []
        privscores: dict[str, Server] = {}  # by step target, for their peak RSS
        try:
            if shadow:
                champion, challenger = shadow_artifacts(Path(temp) / "models")
                for target, flags in ((CHAMPION_ONLY, []), (WITH_SHADOW, challenger)):
                    privscores[target] = start_privscore(shadow_dirs[target], *champion, *flags)
                    servers.append(privscores[target])
            if not only_shadow:
                server = start_privscore(data_dir)
                servers.append(server)
                unsynced = start_privscore(unsynced_dir, "--audit-fsync", "off")
                servers.append(unsynced)
                metered = start_privscore(metered_dir, "--metrics-port", "0")
                servers.append(metered)
                privscores.update(
                    {"privscore": server, "privscore-no-fsync": unsynced, METRICS_ON: metered}
                )
                scraper = Scraper(metered.metrics_port())
                echo = start_echo(data_dir, reply_bytes)
                servers.append(echo)
                plain_echo = start_echo(data_dir, reply_bytes, plaintext=True)
                servers.append(plain_echo)
                for concurrency in (1, 8):
                    step("privscore", "score", server, data_dir, concurrency=concurrency)
                for batch in (1, 16):
                    step("privscore", "score_batch", server, data_dir, concurrency=4, batch=batch)
                step("privscore", "adjust_limit", server, data_dir, concurrency=8)
                step("privscore", "evaluate_event", server, data_dir, concurrency=8)
                for concurrency in (1, 8):
                    step(MTLS_ECHO, "echo", echo, data_dir, concurrency=concurrency)
                step("onnxruntime", "onnxruntime", None, data_dir, batch=1)
            rss_by_round: list[float] = []  # the privscore servers' peak so far, each round
            for n in range(1, rounds + 1):
                if not only_shadow:
                    step("privscore", "score", server, data_dir, n, concurrency=32)
                    step("privscore-no-fsync", "score", unsynced, unsynced_dir, n, concurrency=32)
                    step(METRICS_ON, "score", metered, metered_dir, n, concurrency=32)
                    step(MTLS_ECHO, "echo", echo, data_dir, n, concurrency=32)
                    step(PLAIN_ECHO, "echo", plain_echo, data_dir, n, concurrency=32)
                    step("privscore", "score_batch", server, data_dir, n, concurrency=4, batch=128)
                    step("onnxruntime", "onnxruntime", None, data_dir, n, batch=128)
                if shadow:  # the pair's order swapped each round, as bench/ab.py does
                    pair = (CHAMPION_ONLY, WITH_SHADOW) if n % 2 else (WITH_SHADOW, CHAMPION_ONLY)
                    for target in pair:
                        step(
                            target,
                            "score",
                            privscores[target],
                            shadow_dirs[target],
                            n,
                            concurrency=32,
                        )
                rss_by_round.append(max(s.peak_rss_mb() for s in privscores.values()))
            memory = {target: s.peak_rss_mb() for target, s in privscores.items()}
            if not only_shadow:
                extra["metrics_scrapes"] = scraper.stop()
        finally:
            for running in servers:
                running.stop()
        if shadow:
            extra["shadow_score_records"] = check_shadowed(shadow_dirs)
        if not only_shadow:
            extra["score_stages"] = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "bench.stages", "--data-dir", str(data_dir)],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                ).stdout.splitlines()[-1]
            )

    measured = ratios(steps)
    # Each round's own ratios: their spread shows how much the machine moved.
    by_round = [ratios([s for s in steps if s.get("round") == n]) for n in range(1, rounds + 1)]
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "warmup_s": warmup,
        "duration_s": duration,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "parts": (["main"] if not only_shadow else []) + ([SHADOW] if shadow else []),
        "peak_rss_mb": {k: round(v, 1) for k, v in memory.items()},
        "steps": steps,
        "ratios": measured,
        "ratios_by_round": by_round,
        "targets": target_table(steps, measured, by_round, max(memory.values()), rss_by_round),
        **({"shadow": shadow_summary(steps, by_round)} if shadow else {}),
        **({} if only_shadow else {"cpu_budget": cpu_budget(steps, os.cpu_count() or 1)}),
        **extra,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not only_shadow:
        draw(steps, plot)
    return report


def find_step(steps: list[dict[str, Any]], target: str, rpc: str, **shape: int) -> dict[str, Any]:
    """The step of that shape; for a step run in rounds, the median of each measure."""
    runs = [
        s
        for s in steps
        if s["target"] == target and s["rpc"] == rpc and all(s[k] == v for k, v in shape.items())
    ]
    if len(runs) == 1:
        return runs[0]
    summed, fixed = ("count", "errors"), ("concurrency", "batch_size", "round")
    return {
        key: sum(r[key] for r in runs)
        if key in summed
        else statistics.median(r[key] for r in runs)
        if isinstance(value, int | float) and key not in fixed
        else value
        for key, value in runs[0].items()
        if key != "round"
    }


def ratios(steps: list[dict[str, Any]]) -> dict[str, float]:
    """The targets' measures and the other ratios to the ceilings, from the medians of the
    rounds (or from `steps` of one round); of the parts whose steps ran."""
    ran = {s["target"] for s in steps}
    measured = main_ratios(steps) if "privscore" in ran else {}
    if WITH_SHADOW in ran:
        measured.update(shadow_ratios(steps))
    return measured


def shadow_ratios(steps: list[dict[str, Any]]) -> dict[str, float]:
    """With a challenger in shadow vs without: the target's req/s, and CPU per call and p99."""
    on = find_step(steps, WITH_SHADOW, "score", concurrency=32)
    off = find_step(steps, CHAMPION_ONLY, "score", concurrency=32)
    return {
        f"score_c32_{key}_shadow_on_vs_off": round(on[measure] / off[measure], 3)
        for key, measure in SHADOW_MEASURES
    }


def shadow_summary(steps: list[dict[str, Any]], by_round: list[dict[str, float]]) -> dict[str, Any]:
    """Score at 32 callers with and without a challenger: each side's medians (and how busy
    the machine was meanwhile), the ratio with/without of the medians, and each round's."""
    on = find_step(steps, WITH_SHADOW, "score", concurrency=32)
    off = find_step(steps, CHAMPION_ONLY, "score", concurrency=32)
    keys = [measure for _, measure in SHADOW_MEASURES] + ["machine_busy_cores"]
    return {
        "without": {key: off[key] for key in keys},
        "with": {key: on[key] for key in keys},
        "with_vs_without": {
            measure: {
                "ratio": round(on[measure] / off[measure], 3),
                "rounds": [r[f"score_c32_{key}_shadow_on_vs_off"] for r in by_round],
            }
            for key, measure in SHADOW_MEASURES
        },
    }


def main_ratios(steps: list[dict[str, Any]]) -> dict[str, float]:
    """The ratios of the main part: to the ceilings, fsync and metrics on vs off."""
    score32 = find_step(steps, "privscore", "score", concurrency=32)
    echo32 = find_step(steps, MTLS_ECHO, "echo", concurrency=32)
    plain32 = find_step(steps, PLAIN_ECHO, "echo", concurrency=32)
    batch128 = find_step(steps, "privscore", "score_batch", batch_size=128)
    ort128 = find_step(steps, "onnxruntime", "onnxruntime", batch_size=128)
    no_fsync = find_step(steps, "privscore-no-fsync", "score", concurrency=32)
    metered = find_step(steps, METRICS_ON, "score", concurrency=32)
    return {
        # issue 14's targets (TARGETS)
        "score_c32_server_cpu_vs_mtls_echo": round(
            score32["server_cpu_us_per_call"] / echo32["server_cpu_us_per_call"], 3
        ),
        "score_c32_rps_vs_mtls_echo": round(score32["rps"] / echo32["rps"], 3),
        "score_c32_p99_fsync_on_vs_off": round(score32["p99_ms"] / no_fsync["p99_ms"], 3),
        "batch128_server_cpu_us_per_row": round(batch128["server_cpu_us_per_call"] / 128, 1),
        # issue 15's target, and what metrics cost in CPU
        "score_c32_rps_metrics_on_vs_off": round(metered["rps"] / score32["rps"], 3),
        "score_c32_server_cpu_metrics_on_vs_off": round(
            metered["server_cpu_us_per_call"] / score32["server_cpu_us_per_call"], 3
        ),
        # the other ratios to the ceilings
        "score_c32_p99_vs_mtls_echo": round(score32["p99_ms"] / echo32["p99_ms"], 3),
        "batch128_rows_vs_onnxruntime": round(batch128["rows_per_s"] / ort128["rows_per_s"], 3),
        "audit_fsync_on_vs_off_rps": round(score32["rps"] / no_fsync["rps"], 3),
        # what mutual TLS costs gRPC alone
        "mtls_echo_vs_plaintext_rps": round(echo32["rps"] / plain32["rps"], 3),
        "mtls_echo_vs_plaintext_server_cpu": round(
            echo32["server_cpu_us_per_call"] / plain32["server_cpu_us_per_call"], 3
        ),
    }


def target_table(
    steps: list[dict[str, Any]],
    measured: dict[str, float],
    by_round: list[dict[str, float]],
    peak_rss_mb: float,
    rss_by_round: list[float],
) -> list[dict[str, Any]]:
    """Each of TARGETS whose steps ran: the measured value (ratio of the rounds' medians), each
    round's value, what it was computed from, and whether it is met."""
    ran = {s["target"] for s in steps}
    inputs = main_inputs(steps) if "privscore" in ran else {}
    if WITH_SHADOW in ran:
        inputs["score_c32_rps_shadow_on_vs_off"] = {
            "with_shadow_rps": find_step(steps, WITH_SHADOW, "score", concurrency=32)["rps"],
            "without_rps": find_step(steps, CHAMPION_ONLY, "score", concurrency=32)["rps"],
        }
    values = {**measured, "peak_rss_mb": round(peak_rss_mb, 1)}
    table = []
    for target in TARGETS:
        if target.measure not in values:
            continue
        value = values[target.measure]
        rounds = (
            [round(mb, 1) for mb in rss_by_round]  # the peak so far after each round
            if target.measure == "peak_rss_mb"
            else [r[target.measure] for r in by_round]
        )
        table.append(
            {
                "measure": target.measure,
                "what": target.what,
                "target": target.text(),
                "measured": value,
                "unit": target.unit,
                "rounds": rounds,
                "from_medians": inputs.get(target.measure, {}),
                "met": target.met(value),
            }
        )
    return table


def main_inputs(steps: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What the main part's targets are computed from (medians)."""
    score32 = find_step(steps, "privscore", "score", concurrency=32)
    echo32 = find_step(steps, MTLS_ECHO, "echo", concurrency=32)
    no_fsync = find_step(steps, "privscore-no-fsync", "score", concurrency=32)
    batch128 = find_step(steps, "privscore", "score_batch", batch_size=128)
    return {
        "score_c32_server_cpu_vs_mtls_echo": {
            "score_server_cpu_us_per_call": score32["server_cpu_us_per_call"],
            "mtls_echo_server_cpu_us_per_call": echo32["server_cpu_us_per_call"],
        },
        "score_c32_rps_vs_mtls_echo": {
            "score_rps": score32["rps"],
            "mtls_echo_rps": echo32["rps"],
        },
        "score_c32_p99_fsync_on_vs_off": {
            "fsync_on_p99_ms": score32["p99_ms"],
            "fsync_off_p99_ms": no_fsync["p99_ms"],
        },
        "batch128_server_cpu_us_per_row": {
            "server_cpu_us_per_batch": batch128["server_cpu_us_per_call"],
        },
        "score_c32_rps_metrics_on_vs_off": {
            "metrics_on_rps": find_step(steps, METRICS_ON, "score", concurrency=32)["rps"],
            "metrics_off_rps": score32["rps"],
        },
    }


def cpu_budget(steps: list[dict[str, Any]], cores: int) -> dict[str, float]:
    """What the Score throughput target allows in CPU, against what a Score costs.

    With every core busy (server and load generator share them), requests/s is at most
    cores / (server + client CPU per call): at the target's share of the mTLS echo's
    requests/s, a Score may cost the server no more than what that leaves after the client's
    share.
    """
    share = next(t.limit for t in TARGETS if t.measure == "score_c32_rps_vs_mtls_echo")
    score32 = find_step(steps, "privscore", "score", concurrency=32)
    echo32 = find_step(steps, MTLS_ECHO, "echo", concurrency=32)
    target_rps = share * echo32["rps"]
    allowed = cores * 1e6 / target_rps - score32["client_cpu_us_per_call"]
    return {
        "cores": cores,
        "echo_share": share,
        "target_rps": round(target_rps, 1),
        "score_server_cpu_us_allowed": round(allowed, 1),
        "score_server_cpu_us_measured": score32["server_cpu_us_per_call"],
        "echo_server_cpu_us_measured": echo32["server_cpu_us_per_call"],
    }


def draw(steps: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for target, rpc, label in (
        ("privscore", "score", "privscore Score"),
        (MTLS_ECHO, "echo", "bare grpc.aio echo (mutual TLS)"),
    ):
        points = sorted(
            (c, median["p50_ms"], median["p99_ms"])
            for c in {s["concurrency"] for s in steps if (s["target"], s["rpc"]) == (target, rpc)}
            for median in [find_step(steps, target, rpc, concurrency=c)]
        )
        xs = [p[0] for p in points]
        axes.plot(xs, [p[1] for p in points], marker="o", label=f"{label} p50")
        axes.plot(xs, [p[2] for p in points], marker="s", linestyle="--", label=f"{label} p99")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("concurrent callers")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency vs concurrency (mutual TLS, loopback)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def soak(seconds: float, out: Path) -> dict[str, Any]:
    """Score at 8 callers for `seconds`, sampling the server's RSS: it should stay flat."""
    with tempfile.TemporaryDirectory(prefix="privscore-soak-") as temp:
        data_dir = Path(temp) / "var"
        layout = DataLayout(data_dir)
        init_keys(layout, layout.keyring, layout.dev_kek)
        init_certs(layout.certs_dir)
        server = start_privscore(data_dir)
        try:
            command = [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--rpc",
                "score",
                "--data-dir",
                str(data_dir),
                "--target",
                f"127.0.0.1:{server.port}",
                "--concurrency",
                "8",
                "--warmup",
                "1",
                "--duration",
                str(seconds),
            ]
            load_process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
            samples: list[tuple[float, float]] = []
            started = time.monotonic()
            while load_process.poll() is None:
                samples.append((round(time.monotonic() - started, 1), round(server.rss_mb(), 1)))
                time.sleep(max(1.0, seconds / 60))
            assert load_process.stdout is not None
            result = json.loads(load_process.stdout.read().strip().splitlines()[-1])
        finally:
            server.stop()
    half = len(samples) // 2
    first, second = samples[:half] or samples, samples[half:] or samples
    report = {
        "seconds": seconds,
        "load": result,
        "rss_mb_samples": samples,
        "rss_mb_max": max(mb for _, mb in samples),
        # Flat: the second half's mean RSS against the first half's, after warm-up.
        "rss_growth_second_half_vs_first": round(
            sum(mb for _, mb in second) / len(second) / (sum(mb for _, mb in first) / len(first)), 3
        ),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_targets(report: dict[str, Any]) -> None:
    """The targets of issues 14, 15 and 18, then the other ratios, each with every round's
    value."""
    print(
        f"\ntargets (issues 14, 15 and 18): the ratio of the medians of {report['rounds']} "
        "alternating rounds, then each round's own value (peak RSS: the peak so far after each "
        "round)"
    )
    for row in report["targets"]:
        unit = "x" if row["unit"] == "x" else f" {row['unit']}"
        spread = ", ".join(f"{v:g}" for v in row["rounds"])
        print(
            f"  {'PASS' if row['met'] else 'MISS'}  {row['what']:<60}"
            f"{row['measured']:>8g}{unit:<4} target {row['target']:<10} rounds: {spread}"
        )
        if row["from_medians"]:
            basis = ", ".join(f"{k} {v:,.1f}" for k, v in row["from_medians"].items())
            print(f"        medians: {basis}")
    print("\nother ratios (no target):")
    measures = {t.measure for t in TARGETS}
    for name, value in report["ratios"].items():
        if name not in measures:
            spread = ", ".join(f"{r[name]:.3f}" for r in report["ratios_by_round"])
            print(f"  {name:<36} {value:>7.3f}   rounds: {spread}")


def print_shadow(report: dict[str, Any]) -> None:
    """Score at 32 callers with a challenger in shadow and without: medians, ratio, rounds."""
    shadow = report["shadow"]
    print(
        f"\nthe shadow's cost (issue 18): Score at 32 callers, the same signed champion without "
        f"and with a challenger, medians of {report['rounds']} alternating rounds"
    )
    print(f"  {'measure':<26}{'without':>10}{'with':>10}{'ratio':>9}   rounds")
    for _, measure in SHADOW_MEASURES:
        compared = shadow["with_vs_without"][measure]
        print(
            f"  {measure:<26}{shadow['without'][measure]:>10.5g}{shadow['with'][measure]:>10.5g}"
            f"{compared['ratio']:>8.3f}x   " + ", ".join(f"{r:.3f}" for r in compared["rounds"])
        )
    print(
        f"  {'machine busy cores':<26}{shadow['without']['machine_busy_cores']:>10.3g}"
        f"{shadow['with']['machine_busy_cores']:>10.3g}"
    )
    records = report["shadow_score_records"]
    print(
        f"  Score records with a shadow: {records[WITH_SHADOW]} of {records[WITH_SHADOW]} "
        f"(with), 0 of {records[CHAMPION_ONLY]} (without)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="rounds of the steps the ratios compare"
    )
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="instead: Score at 8 callers for this long, sampling server RSS",
    )
    parser.add_argument(
        "--only",
        choices=(SCALE_OUT, SHADOW),
        help="run only this part: scale-out, Score on the file log vs PostgreSQL, --workers 2 "
        "vs 1 (bench/scale_out.py; added to --out under its name); shadow, Score with a "
        "challenger in shadow vs without (written to --out, its steps alone)",
    )
    parser.add_argument(
        "--skip",
        choices=(SCALE_OUT, SHADOW),
        action="append",
        default=[],
        help="leave this part out",
    )
    args = parser.parse_args()
    from bench import scale_out  # it builds on this module

    if args.only == SCALE_OUT:
        scale_out.write(scale_out.run(args.warmup, args.duration, args.rounds), args.out)
        print(f"\nwrote the key scale_out of {args.out}")
        return
    if args.only == SHADOW:
        print(
            f"privscore bench, the shadow alone: {args.warmup:g} s warm-up + {args.duration:g} s "
            f"per step, {args.rounds} alternating rounds (#n), ratios of their medians"
        )
        print(TABLE_HEADER, flush=True)
        report = run(args.warmup, args.duration, args.out, args.plot, args.rounds, only_shadow=True)
        print("\npeak RSS (MB):", report["peak_rss_mb"])
        print_targets(report)
        print_shadow(report)
        print(f"\nwrote {args.out}")
        return
    if args.soak:
        report = soak(args.soak, args.out)
        print(
            f"soak {args.soak:g} s: {report['load']['count']} calls, "
            f"{report['load']['errors']} errors, RSS max {report['rss_mb_max']} MB, "
            f"second half / first half {report['rss_growth_second_half_vs_first']}"
        )
        return
    print(
        f"privscore bench: {args.warmup:g} s warm-up + {args.duration:g} s per step; "
        f"the ratios' steps in {args.rounds} alternating rounds (#n), ratios of their medians"
    )
    print(TABLE_HEADER, flush=True)
    report = run(
        args.warmup, args.duration, args.out, args.plot, args.rounds, shadow=SHADOW not in args.skip
    )
    stages = report["score_stages"]
    print(
        f"\none Score's stages in process (median us; {stages['fields_per_request']} fields, "
        f"{stages['adverse_share']:.0%} of applicants adverse):"
    )
    for name, micros in stages["stages_us"].items():
        print(f"  {name:<32} {micros:>8.1f}")
    print("\npeak RSS (MB):", report["peak_rss_mb"])
    print_targets(report)
    budget = report["cpu_budget"]
    print(
        f"\nCPU budget: {budget['echo_share']:g}x the mTLS echo is {budget['target_rps']:.0f} "
        f"Score/s on {budget['cores']} cores, which leaves the server "
        f"{budget['score_server_cpu_us_allowed']:.0f} us of CPU per Score; it uses "
        f"{budget['score_server_cpu_us_measured']:.0f} (the mTLS echo server: "
        f"{budget['echo_server_cpu_us_measured']:.0f})"
    )
    if "shadow" in report:
        print_shadow(report)
    if SCALE_OUT not in args.skip:  # skipped, saying why, when no PostgreSQL answers
        scale_out.write(scale_out.run(args.warmup, args.duration, args.rounds), args.out)
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
