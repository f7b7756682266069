"""`privscore audit replay` over every kind of record a real server writes: decisions replay
with `matches: true`, everything else says why it cannot be replayed (exit 1, no traceback).
Replay reads a format-3 record's inputs and figures where they are sealed, under the subject's
key that the decision store under --data-dir keeps."""

from __future__ import annotations

import base64
import dataclasses
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from privscore.v1 import alert_service_pb2, common_pb2, scoring_service_pb2_grpc
from privscore.v1 import scoring_service_pb2 as scoring_pb
from service import cli
from service.api.alerts import EVALUATE_EVENT_METHOD
from service.api.limits import ADJUST_LIMIT_METHOD
from service.api.scoring import SCORE_BATCH_METHOD, SCORE_METHOD
from service.audit import StoredRecord, iter_records
from service.config import DEFAULT_POLICY, DataLayout
from service.privacy.record_seal import open_record, seal_record_fields
from tests.conftest import REPO_ROOT, ServerProcess, applicants
from tests.test_alerts import cny, event
from tests.test_audit_sealed_amounts import personal, subject_key
from tests.test_limits import GOOD_SCORE, account


def replay_cli(data_dir: Path, decision_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`privscore audit replay` as its own process; several run at once, as reviewers may, each
    reading the decision store's subject keys beside the others."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "service.cli", "audit", "replay"),
            *("--decision", decision_id, "--data-dir", str(data_dir), *extra),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode >= 0, f"replay killed by {signal.Signals(-result.returncode).name}"
    return result


@dataclasses.dataclass
class Log:
    data_dir: Path
    records: list[dict[str, Any]]
    erased: str  # the decision id of a Score whose subject was erased since

    def of(self, rpc: str, **equals: Any) -> list[dict[str, Any]]:
        """The records of `rpc` with the values given, but the erased subject's."""
        return [
            r
            for r in self.records
            if r["rpc"] == rpc
            and r["decision_id"] != self.erased
            and all(r.get(k) == v for k, v in equals.items())
        ]

    def decision(self, decision_id: str) -> dict[str, Any]:
        (record,) = [r for r in self.records if r["decision_id"] == decision_id]
        return record

    def key_of(self, record: dict[str, Any]) -> bytes:
        """The subject key the record's personal fields are sealed under."""
        key = subject_key(self.data_dir, record["subject_key"])
        assert key is not None
        return key

    def resealed(self, record: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """The record with its sealed personal fields changed (None: removed) and sealed again
        under its own subject key, as only a holder of that key could."""
        payload = open_record(self.key_of(record), record)
        for name, value in changes.items():
            if value is None:
                del payload[name]
            else:
                payload[name] = value
        sealed = seal_record_fields(
            self.key_of(record), record["rpc"], record["decision_id"], record["request_id"], payload
        )
        return {**record, "sealed": sealed}


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    """One of each record kind, written by a real server."""
    data_dir = tmp_path_factory.mktemp("replay") / "var"
    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            client = server.client(channel)
            client.score("t", "r-score", applicants()[3])
            erased = client.score("t", "r-erased", applicants()[3]).metadata.decision_id
            assert client.erase_subject("t", customer_id="r-erased").erased
            client.score_batch(
                "t",
                [
                    ("r-batch-1", applicants()[5]),
                    ("r-batch-2", applicants()[6]),
                    ("r-batch-bad", {**applicants()[7], "purpose": "nonsense"}),
                ],
                offer_currency="CNY",  # an approved item's initial-limit offer replays too
            )
            client.adjust_limit("t", "r-features", account(), features=applicants()[4])
            first = client.adjust_limit("t", "r-latest", account(), latest_score=GOOD_SCORE)
            assert first.rule == "increase.on_time_run"
            cooled = client.adjust_limit("t", "r-latest", account(), latest_score=GOOD_SCORE)
            assert cooled.action != first.action  # the cool-down held it: last_increase_at
            client.evaluate_event(
                "t",
                "r-event",
                event(
                    0,
                    missed_payment=alert_service_pb2.MissedPayment(
                        amount_due=cny(1000), days_past_due=40
                    ),
                ),
            )
            bad = scoring_pb.ScoreRequest(
                request_id="r-refused",
                subject=common_pb2.SubjectRef(tenant="t", pseudonym="f" * 64),
            )
            with pytest.raises(grpc.RpcError):
                scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(bad, timeout=10)
        with server.channel("monitor") as channel:
            with pytest.raises(grpc.RpcError) as denied:
                server.client(channel).score("t", "r-denied", applicants()[0])
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert server.terminate() == 0
    records = [s.record for s in iter_records(DataLayout(data_dir).audit_dir)]
    return Log(data_dir, records, erased)


def test_every_decision_a_server_wrote_replays_to_the_same_outcome(log: Log) -> None:
    decisions = [
        *log.of(SCORE_METHOD, outcome=None),
        *log.of(SCORE_BATCH_METHOD, outcome=None),
        *log.of(ADJUST_LIMIT_METHOD),
    ]
    limits = log.of(ADJUST_LIMIT_METHOD)
    assert any("offer" in r for r in decisions)  # an initial-limit offer replays too
    assert len(log.of(SCORE_BATCH_METHOD, outcome=None)) == 2
    sealed_inputs = [bool(personal(log.data_dir, r).get("encrypted_inputs")) for r in limits]
    assert sealed_inputs == [True, False, False]
    assert [r["score_source"] for r in limits] == ["IN_CALL", "CALLER_STATED", "CALLER_STATED"]
    assert limits[2]["last_increase_at"] is not None  # the cool-down's input replays too
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: replay_cli(log.data_dir, r["decision_id"]), decisions))
    for record, result in zip(decisions, results, strict=True):
        assert result.returncode == 0, (record["rpc"], result.stdout, result.stderr)
        assert '"matches": true' in result.stdout


def not_replayable(result: subprocess.CompletedProcess[str], decision_id: str, why: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"privscore audit replay: decision {decision_id} cannot be replayed: "
    ), result.stderr
    assert why in result.stderr, result.stderr
    assert result.stdout == ""


def test_what_cannot_be_replayed_says_why(log: Log, tmp_path: Path) -> None:
    refusals = [r for r in log.records if r.get("outcome") == "refused"]
    assert {(r["rpc"], r["code"]) for r in refusals} == {
        (SCORE_BATCH_METHOD, "INVALID_ARGUMENT"),
        (SCORE_METHOD, "INVALID_ARGUMENT"),
        (SCORE_METHOD, "PERMISSION_DENIED"),
    }
    (evaluated,) = log.of(EVALUATE_EVENT_METHOD)
    other_policy = tmp_path / "policy.toml"
    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    recorded_version = log.records[0]["policy_version"]
    assert f'version = "{recorded_version}"' in text
    other_policy.write_text(text.replace(recorded_version, "another-version"), encoding="utf-8")
    (score,) = log.of(SCORE_METHOD, outcome=None)

    cases: list[tuple[str, tuple[str, ...], str]] = [
        (r["decision_id"], (), "was refused") for r in refusals
    ]
    cases.append((evaluated["decision_id"], (), "event history"))
    # Its subject erased, its key destroyed: the inputs can never be read again.
    cases.append((log.erased, (), "destroyed subject key"))
    (erasure,) = log.of("/privscore.v1.PrivacyService/EraseSubject")
    cases.append((erasure["decision_id"], (), "not decisions replay covers"))
    cases.append(
        (score["decision_id"], ("--policy", str(other_policy)), f"policy {recorded_version}")
    )
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: replay_cli(log.data_dir, c[0], *c[1]), cases))
    for (decision_id, _, why), result in zip(cases, results, strict=True):
        not_replayable(result, decision_id, why)

    missing = replay_cli(log.data_dir, "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1 and "no record for decision" in missing.stderr


@pytest.fixture
def in_process_log(log: Log, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The CLI in this process, reading records a test altered (a log cannot be edited on disk
    without breaking its chain, which `replay` would report instead)."""
    altered: list[dict[str, Any]] = []

    def find_records(directory: Any, *, equals: dict[str, Any], **_: Any) -> Iterator[Any]:
        for n, record in enumerate(altered):
            if all(record.get(k) == v for k, v in equals.items()):
                yield StoredRecord(n, record, b"")

    monkeypatch.setattr("service.audit.find_records", find_records)
    yield altered


def test_altered_records_say_why_they_cannot_be_replayed(
    log: Log,
    in_process_log: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (score,) = log.of(SCORE_METHOD, outcome=None)
    batch_item = log.of(SCORE_BATCH_METHOD, outcome=None)[0]
    from_features, latest, _ = log.of(ADJUST_LIMIT_METHOD)

    def without(record: dict[str, Any], name: str) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k != name}

    cases = [
        (log.resealed(score, encrypted_inputs=None), "holds no encrypted inputs"),
        (log.resealed(score, encrypted_inputs=""), "holds no encrypted inputs"),
        (log.resealed(batch_item, encrypted_inputs=None), "holds no encrypted inputs"),
        (log.resealed(score, encrypted_inputs="not base64!"), "not a serialised message"),
        (log.resealed(from_features, encrypted_inputs=""), "scored from features"),
        (log.resealed(from_features, encrypted_inputs=None), "scored from features"),
        ({**score, "model_version": "another-model"}, "recorded with model another-model"),
        ({**latest, "model_version": "another-model"}, "recorded with model another-model"),
        (without(latest, "sealed"), "has no sealed fields"),
        # Another subject's sealed fields, or its key named, do not open here.
        ({**latest, "sealed": from_features["sealed"]}, "do not open"),
        ({**from_features, "sealed": latest["sealed"]}, "do not open"),
        ({**latest, "subject_key": from_features["subject_key"]}, "do not open"),
        # Without its key id the record is refused by its format; passed off as one of before
        # format 3, the record key does not open what the subject key sealed.
        (without(latest, "subject_key"), "names no subject key"),
        (without(without(latest, "subject_key"), "format"), "do not open"),
        ({**latest, "subject_key": "sk-" + "0" * 24}, "destroyed subject key"),
        (without(latest, "outputs"), "no outputs"),
        ({**latest, "rpc": "/privscore.v1.AuditService/GetDecisionRecord"}, "not decisions"),
    ]
    for record, why in cases:
        in_process_log[:] = [record]
        code = cli.main(
            [
                "audit",
                "replay",
                "--decision",
                record["decision_id"],
                "--data-dir",
                str(log.data_dir),
            ]
        )
        out, err = capsys.readouterr()
        assert code == 1, (why, out, err)
        assert out == "" and why in err, (why, err)
        assert err.startswith(f"privscore audit replay: decision {record['decision_id']}")


def test_replay_reads_the_account_from_the_sealed_fields(
    log: Log,
    in_process_log: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record whose sealed account was re-sealed with other figures (by a holder of the
    subject's key) does not replay to the recorded limit: replay decides from what the record
    sealed."""
    _, latest, _ = log.of(ADJUST_LIMIT_METHOD)
    key = log.key_of(latest)
    payload = open_record(key, latest)
    argv = ["audit", "replay", "--decision", latest["decision_id"], "--data-dir", str(log.data_dir)]

    in_process_log[:] = [latest]
    assert cli.main(argv) == 0
    assert '"matches": true' in capsys.readouterr().out

    doubled = int(payload["account"]["current_limit"]["minor_units"]) * 2
    payload["account"]["current_limit"]["minor_units"] = str(doubled)
    resealed = seal_record_fields(
        key, latest["rpc"], latest["decision_id"], latest["request_id"], payload
    )
    in_process_log[:] = [{**latest, "sealed": resealed}]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert '"matches": false' in out
    assert '"fingerprint"' in out and '"new_limit"' in out

    payload = open_record(key, latest)
    payload["response"] = base64.b64encode(b"\xff\xff").decode()
    resealed = seal_record_fields(
        key, latest["rpc"], latest["decision_id"], latest["request_id"], payload
    )
    in_process_log[:] = [{**latest, "sealed": resealed}]
    assert cli.main(argv) == 1
    assert "not an AdjustLimit payload" in capsys.readouterr().err
