"""Where one Score's server time goes: each stage of the request path timed in process.

Runs the server's own code on the bench's sealed requests, one stage at a time, with no gRPC,
no event loop and no other load, so each number is the stage's floor. Medians of repeated
timed loops, in microseconds. `make bench` runs it after the load steps, on their audit log.
"""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from bench.loadgen import Requests
from service.api.features import open_row
from service.api.scoring import SCORE_BATCH_METHOD, SCORE_METHOD, validate_score
from service.audit import iter_records
from service.audit.merkle import leaf_hash
from service.audit.storage import encode_record, frame, seal_envelope
from service.config import DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY, DEFAULT_POLICY, DataLayout
from service.decisions.policy import load_policy
from service.logs import configure_logging
from service.model.scorer import Scorer
from service.privacy.keyring import Keyring, load_kek
from service.privacy.sealing import FeatureOpener, hpke_info

REPEATS = 7


def median_us(operation: Callable[[int], object], count: int) -> float:
    """Median over REPEATS runs of the mean time of `count` calls, in microseconds."""
    operation(0)  # warm caches and lazy imports
    means = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for index in range(count):
            operation(index)
        means.append((time.perf_counter() - started) / count * 1e6)
    return round(statistics.median(means), 1)


def measure(data_dir: Path, count: int = 200) -> dict[str, Any]:
    layout = DataLayout(data_dir)
    opener = FeatureOpener(Keyring.load(layout.keyring, load_kek(layout.dev_kek)))
    scorer = Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)
    policy = load_policy(DEFAULT_POLICY).score
    requests = Requests(data_dir)
    pool = [requests.score(n) for n in range(count)]

    def opened(index: int, keys: dict[bytes, Any] | None = None) -> Any:
        request = pool[index]
        return open_row(
            scorer,
            opener,
            request.features,
            request.subject,
            method=SCORE_METHOD,
            request_id=request.request_id,
            identity=requests.identity,
            opened_keys=keys,
        )

    # Data keys kept as they are opened, so the timed open_row is the fields alone (as in a batch).
    keys: dict[bytes, Any] = {}
    rows = [opened(index, keys) for index in range(count)]
    threshold = scorer.manifest.scaling
    adverse = [
        row
        for row, p in zip(rows, scorer.probabilities(rows).tolist(), strict=True)
        if threshold.score(p) < policy.approve_min_score
    ]

    def reasons(index: int) -> object:
        columns = scorer.columns([adverse[index % len(adverse)]])
        return scorer.run(scorer.reason_variants(columns).columns)

    recorded = next(  # a real decision record from the load steps
        r.record
        for r in iter_records(layout.audit_dir)
        if r.record.get("rpc") in (SCORE_METHOD, SCORE_BATCH_METHOD) and "outputs" in r.record
    )

    def audit_record(index: int) -> object:
        # The record's MAC is part of the stage's cost; any 32-byte key prices it.
        envelope, _ = seal_envelope(index, encode_record(recorded), b"\x00" * 32, bytes(32))
        return frame(envelope), leaf_hash(envelope)

    with tempfile.TemporaryFile("w") as sink:
        configure_logging("json")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sink))
        log = structlog.get_logger("privscore.rpc")

        def log_line(index: int) -> None:
            with structlog.contextvars.bound_contextvars(
                request_id=pool[index].request_id, method=SCORE_METHOD, caller="spiffe://bench"
            ):
                log.info("rpc.finished", code="OK", duration_ms=1.0)

        stages = {
            "validate_request": median_us(lambda i: validate_score(pool[i]), count),
            "hpke_open_data_key": median_us(
                lambda i: opener.open_data_key(
                    pool[i].features.data_key,
                    hpke_info(SCORE_METHOD, requests.identity),
                    "features",
                ),
                count,
            ),
            "open_and_check_fields": median_us(lambda i: opened(i, keys), count),
            "model_one_row": median_us(lambda i: scorer.probabilities([rows[i]]), count),
            "reasons_one_adverse_row": median_us(reasons, count),
            "audit_record_encode_and_hash": median_us(audit_record, count),
            "log_line": median_us(log_line, count),
        }
    return {
        "fields_per_request": len(pool[0].features.fields),
        "adverse_share": round(len(adverse) / count, 3),
        "stages_us": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(measure(args.data_dir, args.count)), flush=True)


if __name__ == "__main__":
    main()
