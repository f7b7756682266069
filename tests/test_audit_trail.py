"""The audit trail of a real server: every decision and refusal recorded before its reply,
provable over AuditService, replayable, durable under SIGKILL, and failing closed."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from privscore.v1 import (
    alert_service_pb2,
    audit_service_pb2,
    audit_service_pb2_grpc,
    common_pb2,
    scoring_service_pb2_grpc,
)
from privscore.v1 import scoring_service_pb2 as pb
from service.api.features import read_encrypted_inputs
from service.audit import (
    ProofError,
    find_records,
    iter_records,
    parse_checkpoint,
    verify_inclusion,
)
from service.client.probe import health_status
from service.config import DataLayout
from tests.conftest import ServerProcess, applicants, audit_log_key, privscore_cli
from tests.test_alerts import cny, event
from tests.test_audit_sealed_amounts import personal
from tests.test_limits import GOOD_SCORE, account
from tests.test_server import error_reason

FAST_CHECKPOINTS = ("--audit-checkpoint-seconds", "0.1")


def privscore(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return privscore_cli(data_dir, "audit", *args)


def records_by_decision(data_dir: Path) -> dict[str, tuple[int, dict[str, object]]]:
    return {
        str(stored.record["decision_id"]): (stored.sequence, stored.record)
        for stored in iter_records(DataLayout(data_dir).audit_dir)
    }


def test_every_decision_and_refusal_is_recorded_and_the_log_verifies(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    with server.channel() as channel:
        client = server.client(channel)
        scored = client.score("t", "a-1", applicants()[0])
        batch = client.score_batch(
            "t", [("a-2", applicants()[1]), ("a-3", {**applicants()[2], "purpose": "nonsense"})]
        )
        limit = client.adjust_limit("t", "a-4", account(), latest_score=GOOD_SCORE)
        evaluated = client.evaluate_event(
            "t",
            "a-5",
            event(
                0,
                missed_payment=alert_service_pb2.MissedPayment(
                    amount_due=cny(1000), days_past_due=40
                ),
            ),
        )
        bad = pb.ScoreRequest(
            request_id="refused-1", subject=common_pb2.SubjectRef(tenant="t", pseudonym="f" * 64)
        )
        with pytest.raises(grpc.RpcError):
            scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(bad, timeout=10)
    assert server.terminate() == 0

    records = records_by_decision(data_dir)
    decisions = [
        scored.metadata,
        batch.results[0].decision.metadata,
        limit.metadata,
        evaluated.metadata,
    ]
    for metadata in decisions:
        sequence, record = records[metadata.decision_id]
        assert sequence == metadata.audit_sequence
        assert record["request_id"] == metadata.request_id
        assert record["model_version"] == metadata.model_version
        assert record["policy_version"] == metadata.policy_version
        assert record["caller"] == "spiffe://privscore.dev/client/dev"
        assert len(str(record["model_manifest_sha256"])) == 64
    _, score_record = records[scored.metadata.decision_id]
    # The inputs as received and their digest are recorded, sealed under the subject's key.
    opened = personal(data_dir, score_record)
    assert opened["subject"] == client.subject("t", "a-1").pseudonym
    assert len(str(opened["input_digest"])) == 64
    assert read_encrypted_inputs(str(opened["encrypted_inputs"])).data_key.key_id
    assert score_record["outputs"]["score"] == scored.score.score  # type: ignore[index]

    refusals = [r for _, r in records.values() if r.get("outcome") == "refused"]
    assert {(r["rpc"], r["code"]) for r in refusals} == {
        ("/privscore.v1.ScoringService/ScoreBatch", "INVALID_ARGUMENT"),
        ("/privscore.v1.ScoringService/Score", "INVALID_ARGUMENT"),
    }
    single = next(r for r in refusals if r["request_id"] == "refused-1")
    assert single["fields"] == ["features"] and single["tenant"] == "t"
    # A refusal names the tenant only: not the subject the call named, in any form.
    assert {"subject", "subject_key", "sealed"}.isdisjoint(single)
    assert "f" * 64 not in json.dumps(single)

    verified = privscore(data_dir, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_audit_service_proves_a_decision_and_a_forged_proof_fails(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir, *FAST_CHECKPOINTS)
    try:
        with server.channel() as channel:
            decision = server.client(channel).score("t", "proof-1", applicants()[0])
        time.sleep(0.5)  # the next checkpoint covers it
        with server.channel("auditor") as channel:
            auditor = audit_service_pb2_grpc.AuditServiceStub(channel)
            proven = auditor.GetDecisionRecord(
                audit_service_pb2.GetDecisionRecordRequest(
                    decision_id=decision.metadata.decision_id
                ),
                timeout=10,
            )
            with pytest.raises(grpc.RpcError) as missing:
                auditor.GetDecisionRecord(
                    audit_service_pb2.GetDecisionRecordRequest(
                        decision_id="00000000-0000-0000-0000-000000000000"
                    ),
                    timeout=10,
                )
    finally:
        server.terminate()
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    verifier, origin = audit_log_key(data_dir)
    checkpoint = parse_checkpoint(proven.checkpoint, verifier, origin)
    assert checkpoint.size == proven.tree_size
    assert proven.sequence == decision.metadata.audit_sequence
    assert decision.metadata.decision_id.encode() in proven.record
    verify_inclusion(
        proven.record,
        proven.sequence,
        proven.tree_size,
        list(proven.inclusion_proof),
        checkpoint.root_hash,
    )
    forged = proven.record.replace(b'"score":', b'"score":1')
    with pytest.raises(ProofError):
        verify_inclusion(
            forged,
            proven.sequence,
            proven.tree_size,
            list(proven.inclusion_proof),
            checkpoint.root_hash,
        )


def test_recorded_decisions_replay_to_the_same_outcome(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    with server.channel() as channel:
        client = server.client(channel)
        scored = client.score("t", "replay-1", applicants()[3])
        limit = client.adjust_limit("t", "replay-2", account(), features=applicants()[4])
    assert server.terminate() == 0
    for decision_id in (scored.metadata.decision_id, limit.metadata.decision_id):
        result = privscore(data_dir, "replay", "--decision", decision_id)
        assert result.returncode == 0, result.stderr
        assert '"matches": true' in result.stdout


def test_sigkill_under_load_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir, *FAST_CHECKPOINTS)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with server.channel() as channel:
            client = server.client(channel)
            for n in range(400):  # bounded; the kill ends it sooner
                if stop.is_set():
                    return
                try:
                    response = client.score("t", f"k-{worker}-{n}", applicants()[n % 50], timeout=5)
                except grpc.RpcError:
                    return
                acknowledged.append(response.metadata.decision_id)

    workers = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    assert len(acknowledged) > 20

    segment = sorted(DataLayout(data_dir).audit_dir.glob("segment-*.log"))[-1]
    with segment.open("ab") as torn:  # a write cut short: a length prefix and half a payload
        torn.write(b"\x00\x00\x01\x00" + b"{" * 40)
    restarted = ServerProcess(data_dir)
    warning = restarted.wait_for_record(lambda r: r.get("event") == "audit.torn_tail_truncated")
    assert warning["level"] == "warning"
    assert restarted.terminate() == 0

    logged = set(records_by_decision(data_dir))
    assert set(acknowledged) <= logged
    verified = privscore(data_dir, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _limit_file_size() -> None:
    # Writes past this size fail with EFBIG instead of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, 96 * 1024))


def test_an_unwritable_audit_log_fails_closed(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    ServerProcess(data_dir).terminate()  # keys and store exist before the limit applies
    server = ServerProcess(data_dir, preexec_fn=_limit_file_size)
    answered: list[str] = []
    try:
        with server.channel() as channel:
            client = server.client(channel)
            with pytest.raises(grpc.RpcError) as refused:
                for n in range(500):
                    answered.append(
                        client.score("t", f"full-{n}", applicants()[n % 50]).metadata.decision_id
                    )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # Whichever fills first: the audit log, or the decision store (its subject keys
            # and latest scores are written with each decision too); both fail closed.
            assert error_reason(refused.value) in ("AUDIT_UNAVAILABLE", "STORE_UNAVAILABLE")
            assert health_status(channel) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as still_refused:
                client.score("t", "after-failure", applicants()[0])
            assert still_refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.terminate()
    assert answered
    restarted = ServerProcess(data_dir)  # recovery cuts any torn record
    assert restarted.terminate() == 0
    logged = set(records_by_decision(data_dir))
    assert set(answered) <= logged
    assert not any(
        r.record.get("request_id") == "after-failure"
        for r in find_records(DataLayout(data_dir).audit_dir)
    )
