"""The model lifecycle while serving (issue 18): a challenger verified like the champion runs in
shadow on every scored row (recorded as shadow, never answered), is promoted, rolled back and
unloaded under load with no failed call and no call that mixes two models; a bad artifact is
refused and the models serving stay; outcomes come back by decision id."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from model_export.sign import generate_keypair, sign_artifact
from privscore.v1 import model_service_pb2 as models_pb
from privscore.v1 import model_service_pb2_grpc, outcome_service_pb2_grpc
from privscore.v1 import outcome_service_pb2 as outcomes_pb
from service.audit import iter_records
from service.config import DEFAULT_MODEL_DIR, DataLayout
from tests.conftest import REPO_ROOT, ServerProcess, applicants, privscore_cli
from tests.test_closed_loop import account
from tests.test_server import error_reason

CALLERS = 8  # the load during a swap
SHADOWED = ("/privscore.v1.ScoringService/Score", "/privscore.v1.ScoringService/ScoreBatch")


def artifact(root: Path, name: str, team_key: Path, version: str | None = None) -> Path:
    """A copy of the bundled artifact signed by `team_key`, under another version if given."""
    target = root / name
    shutil.copytree(DEFAULT_MODEL_DIR, target)
    if version is not None:
        manifest = target / "manifest.json"
        document = json.loads(manifest.read_text())
        document["model_version"] = version
        manifest.write_text(json.dumps(document, indent=2) + "\n")
    sign_artifact(target, team_key)
    return target


@pytest.fixture
def team(tmp_path: Path) -> Iterator[dict[str, Any]]:
    private, public = tmp_path / "team.key", tmp_path / "team.pub"
    generate_keypair(private, public)
    champion = artifact(tmp_path, "champion", private)
    challenger = artifact(tmp_path, "challenger", private, "german-credit-challenger-1")
    server = ServerProcess(
        tmp_path / "var", "--model-dir", str(champion), "--model-public-key", str(public)
    )
    try:
        yield {"server": server, "private": private, "challenger": challenger, "root": tmp_path}
    finally:
        server.terminate()


def admin(channel: grpc.Channel) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(channel)


def records(server: ServerProcess) -> list[dict[str, Any]]:
    return [s.record for s in iter_records(DataLayout(server.data_dir).audit_dir)]


def test_a_challenger_runs_in_shadow_and_is_recorded_as_such(team: dict[str, Any]) -> None:
    server: ServerProcess = team["server"]
    with server.channel() as channel:
        stub, client = admin(channel), server.client(channel)
        champion = stub.GetModels(models_pb.GetModelsRequest(), timeout=10).models.champion
        loaded = stub.LoadChallenger(
            models_pb.LoadChallengerRequest(request_id="load-1", model_dir=str(team["challenger"])),
            timeout=30,
        )
        assert loaded.models.challenger.model_version == "german-credit-challenger-1"
        assert loaded.models.champion.model_version == champion.model_version
        scored = client.score("t", "shadowed", applicants()[0])
        batch = client.score_batch("t", [("b-0", applicants()[1]), ("b-1", applicants()[2])])
        limit = client.adjust_limit("t", "shadowed", account(500_000, 0), features=applicants()[0])
    assert scored.metadata.model_version == champion.model_version  # the champion answers
    by_id = {r["decision_id"]: r for r in records(server)}
    decided = [scored.metadata.decision_id, limit.metadata.decision_id]
    decided += [r.decision.metadata.decision_id for r in batch.results]
    for decision_id in decided:
        record = by_id[decision_id]
        assert record["model_version"] == champion.model_version
        shadow = record["shadow"]
        assert shadow["model_version"] == "german-credit-challenger-1"
        assert shadow["model_manifest_sha256"] == loaded.models.challenger.manifest_sha256
        assert {"probability_of_default_ppb", "score", "grade", "decision"} <= set(shadow)
    # The same model bytes: the shadow scores what the champion scored.
    assert by_id[scored.metadata.decision_id]["shadow"]["score"] == scored.score.score
    load = [r for r in records(server) if r["rpc"].endswith("/LoadChallenger")]
    assert load and load[0]["models"]["challenger"]["model_version"] == "german-credit-challenger-1"


def test_a_bad_artifact_is_refused_and_the_models_keep_serving(team: dict[str, Any]) -> None:
    server: ServerProcess = team["server"]
    unsigned = artifact(team["root"], "unsigned", team["private"], "unsigned-1")
    (unsigned / "manifest.sig").unlink()
    tampered = artifact(team["root"], "tampered", team["private"], "tampered-1")
    manifest = tampered / "manifest.json"
    manifest.write_text(manifest.read_text().replace("tampered-1", "tampered-2"))
    with server.channel() as channel:
        stub = admin(channel)
        before = stub.GetModels(models_pb.GetModelsRequest(), timeout=10).models
        for bad in (unsigned, tampered, team["root"] / "missing"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.LoadChallenger(
                    models_pb.LoadChallengerRequest(request_id="bad", model_dir=str(bad)),
                    timeout=30,
                )
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(refused.value) == "MODEL_REFUSED"
        with pytest.raises(grpc.RpcError) as relative:
            stub.LoadChallenger(
                models_pb.LoadChallengerRequest(request_id="rel", model_dir="challenger"),
                timeout=10,
            )
        assert relative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = stub.GetModels(models_pb.GetModelsRequest(), timeout=10).models
        assert after == before
        assert server.client(channel).score("t", "still", applicants()[0]).score.score
    with server.channel("scorer") as channel, pytest.raises(grpc.RpcError) as denied:
        admin(channel).GetModels(models_pb.GetModelsRequest(), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_swaps_under_load_fail_no_call_and_mix_no_models(team: dict[str, Any]) -> None:
    server: ServerProcess = team["server"]
    stop = threading.Event()
    failures: list[str] = []
    answered: list[tuple[str, str]] = []  # (decision id, the model the reply names)

    def caller(worker: int) -> None:
        with server.channel() as channel:
            client = server.client(channel)
            n = 0
            while not stop.is_set():
                try:
                    reply = client.score("t", f"load-{worker}-{n % 50}", applicants()[n % 40])
                    answered.append((reply.metadata.decision_id, reply.metadata.model_version))
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")
                n += 1

    threads = [threading.Thread(target=caller, args=(w,), daemon=True) for w in range(CALLERS)]
    for thread in threads:
        thread.start()
    versions = set()
    try:
        with server.channel() as channel:
            stub = admin(channel)
            champion = stub.GetModels(models_pb.GetModelsRequest(), timeout=10).models.champion
            for round_ in range(3):
                time.sleep(0.3)
                loaded = stub.LoadChallenger(
                    models_pb.LoadChallengerRequest(
                        request_id=f"load-{round_}", model_dir=str(team["challenger"])
                    ),
                    timeout=30,
                )
                time.sleep(0.3)
                promoted = stub.PromoteChallenger(
                    models_pb.PromoteChallengerRequest(
                        request_id=f"promote-{round_}",
                        model_version=loaded.models.challenger.model_version,
                    ),
                    timeout=30,
                )
                assert promoted.models.previous.model_version == champion.model_version
                time.sleep(0.3)
                rolled = stub.RollbackChampion(
                    models_pb.RollbackChampionRequest(request_id=f"rollback-{round_}"),
                    timeout=30,
                )
                assert rolled.models.champion.model_version == champion.model_version
                assert rolled.models.challenger.model_version == "german-credit-challenger-1"
                time.sleep(0.3)
                stub.UnloadChallenger(
                    models_pb.UnloadChallengerRequest(request_id=f"unload-{round_}"),
                    timeout=30,
                )
                versions |= {champion.model_version, "german-credit-challenger-1"}
    finally:
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:5]
    assert len(answered) > 100
    assert {model for _, model in answered} == versions  # both served at some point
    by_id = {r["decision_id"]: r for r in records(server) if r.get("rpc") in SHADOWED}
    for decision_id, model in answered:
        record = by_id[decision_id]
        assert record["model_version"] == model  # the reply and its record: one champion
        if "shadow" in record:
            assert record["shadow"]["model_version"] != model  # the shadow is the other one


def test_outcomes_come_back_by_decision_id(team: dict[str, Any]) -> None:
    server: ServerProcess = team["server"]
    with server.channel() as channel:
        client = server.client(channel)
        scored = client.score("t", "outcome-1", applicants()[0])
        limit = client.adjust_limit("t", "outcome-1", account(500_000, 0))
        stub = outcome_service_pb2_grpc.OutcomeServiceStub(channel)

        def record(decision_id: str, observed: dt.datetime, **extra: Any) -> Any:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(observed)
            return stub.RecordOutcome(
                outcomes_pb.RecordOutcomeRequest(
                    request_id=f"o-{time.monotonic_ns()}",
                    decision_id=decision_id,
                    outcome=extra.get("outcome", outcomes_pb.OUTCOME_BAD),
                    observed_at=stamp,
                    definition="DPD90_WITHIN_12M",
                ),
                timeout=10,
            )

        now = dt.datetime.now(dt.UTC)
        first = record(scored.metadata.decision_id, now)
        second = record(scored.metadata.decision_id, now, outcome=outcomes_pb.OUTCOME_GOOD)
        assert not first.replaced and second.replaced
        for decision_id, observed, reason in (
            (limit.metadata.decision_id, now, "NOT_A_SCORE_DECISION"),
            ("00000000-0000-4000-8000-000000000000", now, "DECISION_NOT_FOUND"),
            (scored.metadata.decision_id, now - dt.timedelta(days=1), "INVALID_ARGUMENT"),
            (scored.metadata.decision_id, now + dt.timedelta(days=1), "INVALID_ARGUMENT"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                record(decision_id, observed)
            assert error_reason(refused.value) == reason
    outcomes = [r for r in records(server) if r.get("rpc", "").endswith("/RecordOutcome")]
    outcomes = [r for r in outcomes if r.get("outcome") != "refused"]
    assert [o["observed"]["outcome"] for o in outcomes] == ["BAD", "GOOD"]
    for outcome in outcomes:
        assert outcome["observed"]["decision_id"] == scored.metadata.decision_id
        assert "subject_key" not in outcome and "sealed" not in outcome  # by decision id only


def test_outcomes_export_joins_champion_shadow_and_age_group(team: dict[str, Any]) -> None:
    server: ServerProcess = team["server"]
    with server.channel() as channel:
        stub, client = admin(channel), server.client(channel)
        stub.LoadChallenger(
            models_pb.LoadChallengerRequest(request_id="load", model_dir=str(team["challenger"])),
            timeout=30,
        )
        decisions = [client.score("t", f"export-{n}", applicants()[n]) for n in range(4)]
        outcomes = outcome_service_pb2_grpc.OutcomeServiceStub(channel)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(dt.datetime.now(dt.UTC))
        for n, decided in enumerate(decisions[:3]):
            outcomes.RecordOutcome(
                outcomes_pb.RecordOutcomeRequest(
                    request_id=f"o-{n}",
                    decision_id=decided.metadata.decision_id,
                    outcome=outcomes_pb.OUTCOME_BAD if n else outcomes_pb.OUTCOME_GOOD,
                    observed_at=stamp,
                    definition="DPD90_WITHIN_12M",
                ),
                timeout=10,
            )
        client.erase_subject("t", customer_id="export-2")
    out = team["root"] / "outcomes.jsonl"
    done = privscore_cli(
        server.data_dir,
        "audit",
        "outcomes",
        "--out",
        str(out),
        "--model-dir",
        str(team["root"] / "champion"),
        "--model-public-key",
        str(team["root"] / "team.pub"),
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    header, *lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["format"] == "privscore-outcomes/1"
    by_id = {line["decision_id"]: line for line in lines}
    assert set(by_id) == {d.metadata.decision_id for d in decisions[:3]}  # with outcomes only
    for n, decided in enumerate(decisions[:3]):
        line = by_id[decided.metadata.decision_id]
        assert line["outcome"] == ("BAD" if n else "GOOD")
        assert line["champion"]["score"] == decided.score.score
        assert line["challenger"]["model_version"] == "german-credit-challenger-1"
        expected = None if n == 2 else line["age_group"]  # erased: its inputs no longer open
        assert line["age_group"] == expected
        assert n == 2 or line["age_group"] in {"under_25", "25_34", "35_49", "50_plus"}
    text = out.read_text()
    assert all(client.subject("t", f"export-{n}").pseudonym not in text for n in range(4))
    # The model team's report reads it as it is.
    report_dir = team["root"] / "report"
    reported = subprocess.run(
        [
            *(sys.executable, "-m", "model_export", "report", "--outcomes", str(out)),
            *("--out", str(report_dir), "--bootstrap", "200"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert reported.returncode == 0, reported.stderr[-2000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert json.dumps(report).count("german-credit-challenger-1") >= 1


def test_the_cli_changes_models_and_records_outcomes(team: dict[str, Any]) -> None:
    server: ServerProcess = team["server"]

    def cli(*args: str, cert: str = "model-admin") -> Any:
        words = 2 if args[0] == "model" else 1
        caller = ("--target", server.target, "--cert-name", cert)
        done = privscore_cli(server.data_dir, *args[:words], *caller, *args[words:])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    before = cli("model", "status")
    loaded = cli("model", "load", "--model-dir", str(team["challenger"]))
    assert loaded["challenger"]["model_version"] == "german-credit-challenger-1"
    promoted = cli("model", "promote", "--model-version", "german-credit-challenger-1")
    assert promoted["champion"]["model_version"] == "german-credit-challenger-1"
    assert promoted["previous"]["model_version"] == before["champion"]["model_version"]
    back = cli("model", "rollback")
    assert back["champion"] == before["champion"]
    with server.channel() as channel:
        scored = server.client(channel).score("t", "cli-outcome", applicants()[0])
    recorded = cli(
        "outcome",
        "--decision-id",
        scored.metadata.decision_id,
        "--outcome",
        "BAD",
        "--observed-at",
        dt.datetime.now(dt.UTC).isoformat(),
        "--definition",
        "DPD90_WITHIN_12M",
        cert="collections",
    )
    assert recorded["replaced"] is False and recorded["metadata"]["decision_id"]
    denied = privscore_cli(
        server.data_dir, "model", "status", "--target", server.target, "--cert-name", "collections"
    )
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
