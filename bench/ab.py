"""A/B: one lever's measured effect, before and after in one window.

    .venv/bin/python -m bench.ab --before <git-rev> [--after <git-rev>|worktree]
        [--rounds 4] [--warmup 2] [--duration 6] [--out FILE]
        [--before-arg=--flag ...] [--after-arg=--flag ...] [--client this|own]

    # the commit that moved the request id into the trailers, against its parent:
    .venv/bin/python -m bench.ab --before 8ea7f56~1 --after 8ea7f56
    # uncommitted work in this checkout against HEAD:
    .venv/bin/python -m bench.ab --before HEAD
    # a server flag, one tree: --after-arg passes the flag to the "after" server only
    .venv/bin/python -m bench.ab --before worktree --after worktree --after-arg=--audit-fsync=off

Each side is a tree of this repository: a git revision, checked out (detached) into a temporary
git worktree (`git worktree add`; removed at the end, also on failure or Ctrl-C), or `worktree`
(the default for --after): this checkout as it is on disk, uncommitted edits included. A
privscore server is started from each tree as `make serve` would (mutual TLS, the audit log
fsynced), with this venv's Python, the tree as its working directory and PYTHONPATH: the tree's
own service/ and generated privscore/ code, model artifact and policies. The two servers' data
directories hold the same keys and certificates (made once by this checkout's code, then
copied), each its own audit log and store. Both servers stay up; the same load generator (this
checkout's bench/loadgen.py, requests sealed before the clock starts) drives each with Score at
32 callers and ScoreBatch(128) at 4 callers, in rounds whose order alternates (round 1 before
first, round 2 after first, ...), so the drift of a shared machine weighs on both sides alike.

It prints each step as it runs (with `other`: the cores other work on the machine took
meanwhile), then for each measure the median of each side over the rounds,
the ratio after/before of the medians, and each round's own ratio: Score req/s, server CPU
us/call and p99; ScoreBatch(128) server CPU us/row and rows/s; and each server's peak RSS. Below
1 is better for CPU and p99, above 1 for req/s and rows/s. `--out` also writes it all as JSON.
A round takes about 4 x (warm-up + duration + 1 s): at the defaults, with the servers' start,
about 2.5 minutes; `--rounds 3 --duration 4` about 1.3. It asserts nothing: numbers to read.
A run of one tree against itself (`--before X --after X`) shows how far apart two identical
sides land on the machine at that moment: read a lever's ratio against that.

`--client own` drives each server with its own tree's load generator instead, for a change to
the wire contract (the way requests are sealed) that one load generator cannot serve to both
sides; the sides then differ in their callers too, which the report says. A revision must be
recent enough to take this checkout's data directory and flags (its `serve --data-dir`,
`--log-format json`, and the `server.ready` log line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.run import REPO, TABLE_HEADER, Server, load, start_privscore, table_row
from service.config import DataLayout
from service.privacy.admin import init_keys
from service.security.certs import init_certs

WORKTREE = "worktree"  # this checkout as it is on disk
HEADER = TABLE_HEADER + f"{'other':>6}"
ROUNDS = 4
BATCH = 128


@dataclass(frozen=True)
class Shape:
    """One step of a round: the load generator's rpc, callers and batch size."""

    rpc: str
    concurrency: int
    batch: int


SHAPES = {"score": Shape("score", 32, 1), "score_batch": Shape("score_batch", 4, BATCH)}
# (shape, measure, what): the measures compared, after/before.
MEASURES = (
    ("score", "rps", "Score at 32 callers: req/s"),
    ("score", "server_cpu_us_per_call", "Score at 32 callers: server CPU us/call"),
    ("score", "p99_ms", "Score at 32 callers: p99 ms"),
    ("score_batch", "server_cpu_us_per_row", f"ScoreBatch({BATCH}): server CPU us/row"),
    ("score_batch", "rows_per_s", f"ScoreBatch({BATCH}): rows/s"),
)


def git(*args: str) -> str:
    """git in this repository, taking no optional lock (others commit meanwhile)."""
    done = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class Side:
    name: str  # "before" or "after"
    spec: str  # as given: a revision or `worktree`
    tree: Path
    described: str
    temporary: bool  # a git worktree of ours, removed at the end
    server_args: list[str]
    server: Server | None = None
    data_dir: Path | None = None


def check_out(name: str, spec: str, temp: Path, server_args: list[str]) -> Side:
    """The tree for `spec`: this checkout, or the revision in a new detached git worktree."""
    if spec == WORKTREE:
        head = git("rev-parse", "--short", "HEAD")
        changed = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
        edits = f" + {changed} changed files" if changed else ""
        return Side(name, spec, REPO, f"this checkout (HEAD {head}{edits})", False, server_args)
    commit = git("rev-parse", "--verify", "--end-of-options", f"{spec}^{{commit}}")
    subject = git("log", "-1", "--format=%s", commit)
    path = temp / f"tree-{name}"
    git("worktree", "add", "--detach", str(path), commit)
    described = f"{commit[:9]} {subject[:70]}{'...' if len(subject) > 70 else ''}"
    return Side(name, spec, path, described, True, server_args)


def remove_tree(side: Side) -> None:
    if not side.temporary:
        return
    done = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(side.tree)],
        capture_output=True,
    )
    if done.returncode != 0:  # gone already, or half made: remove it and git's note of it
        shutil.rmtree(side.tree, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


def measure(
    side: Side, shape: str, round_: int, warmup: float, duration: float, own_client: bool
) -> dict[str, Any]:
    assert side.server is not None and side.data_dir is not None
    args = SHAPES[shape]
    result = load(
        side.server,
        side.data_dir,
        args.rpc,
        concurrency=args.concurrency,
        batch=args.batch,
        warmup=warmup,
        duration=duration,
        tree=side.tree if own_client else REPO,
    )
    step: dict[str, Any] = {
        "target": side.name,
        "rpc": args.rpc,
        "concurrency": args.concurrency,
        "batch_size": args.batch,
        "round": round_,
        **result,
    }
    if shape == "score_batch" and result.get("server_cpu_us_per_call"):
        step["server_cpu_us_per_row"] = round(result["server_cpu_us_per_call"] / BATCH, 1)
    ours = sum(step.get(f"{key}_cpu_us_per_call") or 0 for key in ("server", "client"))
    # What else the machine did meanwhile (other work on a shared machine), in cores.
    step["other_cores"] = round(step["machine_busy_cores"] - ours * step["rps"] / 1e6, 2)
    return step


def _values(
    steps: list[dict[str, Any]], side: str, shape: str, key: str, of_round: int | None = None
) -> list[float]:
    return [
        s[key]
        for s in steps
        if s["target"] == side
        and s["rpc"] == SHAPES[shape].rpc
        and (of_round is None or s["round"] == of_round)
        and s.get(key) is not None
    ]


def compare(steps: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Each measure: both sides' medians, after/before of the medians, each round's ratio."""
    compared = []
    for shape, key, what in MEASURES:
        before = statistics.median(_values(steps, "before", shape, key))
        after = statistics.median(_values(steps, "after", shape, key))
        by_round = []
        for n in range(1, rounds + 1):
            b, a = _values(steps, "before", shape, key, n), _values(steps, "after", shape, key, n)
            if b and a and b[0]:
                by_round.append(round(a[0] / b[0], 3))
        compared.append(
            {
                "measure": what,
                "key": key,
                "before": round(before, 3),
                "after": round(after, 3),
                "after_vs_before": round(after / before, 3) if before else None,
                "rounds": by_round,
                # Each round's sides ran back to back: the median of their ratios is the
                # steadier estimate when the machine's load moves between rounds.
                "median_of_rounds": round(statistics.median(by_round), 3) if by_round else None,
            }
        )
    return compared


def run(args: argparse.Namespace) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    sides: list[Side] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="privscore-ab-", dir=args.workdir) as temp_name:
        temp = Path(temp_name)
        try:
            sides.append(check_out("before", args.before, temp, args.before_arg))
            sides.append(check_out("after", args.after, temp, args.after_arg))
            data_dir = temp / "var"
            layout = DataLayout(data_dir)
            init_keys(layout, layout.keyring, layout.dev_kek)
            init_certs(layout.certs_dir)
            for side in sides:
                print(f"  {side.name:<7} {side.described}", flush=True)
                if side.server_args:
                    print(f"          server flags: {' '.join(side.server_args)}")
                side.data_dir = temp / f"var-{side.name}"
                shutil.copytree(data_dir, side.data_dir)  # the same keys, a log of its own
                side.server = start_privscore(side.data_dir, *side.server_args, tree=side.tree)
            print(HEADER, flush=True)
            own_client = args.client == "own"
            for n in range(1, args.rounds + 1):
                order = sides if n % 2 else sides[::-1]
                for shape in SHAPES:
                    for side in order:
                        steps.append(
                            measure(side, shape, n, args.warmup, args.duration, own_client)
                        )
                        print(f"{table_row(steps[-1])}{steps[-1]['other_cores']:>6.2f}", flush=True)
            peak_rss = {s.name: round(s.server.peak_rss_mb(), 1) for s in sides if s.server}
        finally:
            for side in sides:
                if side.server is not None:
                    side.server.stop()
            for side in sides:
                remove_tree(side)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "client": args.client,
        "elapsed_s": round(time.monotonic() - started),
        "sides": {
            s.name: {"spec": s.spec, "tree": s.described, "server_args": s.server_args}
            for s in sides
        },
        "steps": steps,
        "peak_rss_mb": peak_rss,
        "compared": compare(steps, args.rounds),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\nafter / before: the medians of {report['rounds']} alternating rounds and their "
        "ratio, the median of the rounds' own ratios, and each round's (below 1 is better for "
        "CPU and p99, above 1 for req/s and rows/s):"
    )
    print(f"  {'measure':<40}{'before':>10}{'after':>10}{'ratio':>9}{'rounds med':>12}   rounds")
    nan = float("nan")
    for row in report["compared"]:
        ratio, paired = row["after_vs_before"], row["median_of_rounds"]
        print(
            f"  {row['measure']:<40}{row['before']:>10.5g}{row['after']:>10.5g}"
            f"{ratio if ratio is not None else nan:>8.3f}x"
            f"{paired if paired is not None else nan:>11.3f}x   "
            + ", ".join(f"{r:.3f}" for r in row["rounds"])
        )
    rss = report["peak_rss_mb"]
    print(f"  {'peak RSS MB':<40}{rss.get('before', 0):>10.5g}{rss.get('after', 0):>10.5g}")
    if report["client"] == "own":
        print("  (each side driven by its own tree's load generator)")
    print(f"\n{report['elapsed_s']} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="a git revision, or `worktree`")
    parser.add_argument(
        "--after", default=WORKTREE, help="a git revision, or `worktree` (the default)"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per step")
    parser.add_argument(
        "--before-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="a flag for the before server's `serve` (repeat; write --before-arg=--flag=value)",
    )
    parser.add_argument(
        "--after-arg", action="append", default=[], metavar="FLAG", help="the same, after"
    )
    parser.add_argument(
        "--client",
        choices=("this", "own"),
        default="this",
        help="this checkout's load generator for both sides (default), or each tree's own",
    )
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    parser.add_argument(
        "--workdir", type=Path, help="where the temporary trees and data go (default: TMPDIR)"
    )
    args = parser.parse_args()
    per_step = args.warmup + args.duration + 1
    print(
        f"privscore A/B: Score at 32 callers and ScoreBatch({BATCH}) at 4, {args.rounds} "
        f"alternating rounds, {args.warmup:g} s warm-up + {args.duration:g} s per step "
        f"(about {(4 * per_step * args.rounds + 20) / 60:.1f} minutes)",
        flush=True,
    )
    report = run(args)
    print_report(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
