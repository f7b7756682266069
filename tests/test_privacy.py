"""The privacy layer over a real socket: sealing, binding, key rotation, and nothing leaking."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from privscore.v1 import alert_service_pb2 as alerts
from privscore.v1 import common_pb2, scoring_service_pb2_grpc
from privscore.v1 import scoring_service_pb2 as pb
from service.audit import iter_records
from service.client.sdk import SCORE_METHOD
from service.config import DataLayout
from service.privacy.keyring import Keyring, KeyringError, create_kek_file, load_kek
from service.privacy.pseudonym import Pseudonymiser
from service.privacy.sealing import DataKey, load_public_keyset
from service.security.certs import client_identity
from tests.conftest import REPO_ROOT, ServerProcess, applicants, served_manifest
from tests.test_alerts import cny, event
from tests.test_limits import account
from tests.test_server import error_reason, violations

TENANT = "baitiao-cn"


DEV_IDENTITY = client_identity("dev")


def sealed_request(
    server: ServerProcess,
    request_id: str,
    customer: str = "c-1",
    *,
    data_key: DataKey | None = None,
    **overrides: object,
) -> pb.ScoreRequest:
    """A Score request sealed as the SDK does, by the dev identity under a fresh data key (or
    `data_key`); `overrides` change the seal's inputs."""
    layout = DataLayout(server.data_dir)
    pseudonymiser = Pseudonymiser.from_file(layout.pseudonym_key)
    subject = common_pb2.SubjectRef(
        tenant=TENANT, pseudonym=pseudonymiser.pseudonym(TENANT, customer)
    )
    seal_subject = overrides.get("seal_subject", subject)
    if data_key is None:
        data_key = DataKey(
            overrides.get("server_key", load_public_keyset(layout.public_keyset)),  # type: ignore[arg-type]
            str(overrides.get("method", SCORE_METHOD)),
            identity=str(overrides.get("identity", DEV_IDENTITY)),
        )
    features = data_key.seal(
        str(overrides.get("schema_version", served_manifest().schema_version)),
        seal_subject,  # type: ignore[arg-type]
        applicants()[0],
        request_id=str(overrides.get("seal_request_id", request_id)),
    )
    return pb.ScoreRequest(request_id=request_id, subject=subject, features=features)


def call(server: ServerProcess, request: pb.ScoreRequest) -> grpc.RpcError:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(request, timeout=10)
    return caught.value


def decided_request_ids(data_dir: Path) -> set[str]:
    return {
        stored.record["request_id"]
        for stored in iter_records(DataLayout(data_dir).audit_dir)
        if "outputs" in stored.record
    }


def test_the_sdk_round_trip_decides(shared_server: ServerProcess) -> None:
    request = sealed_request(shared_server, "round-trip")
    with shared_server.channel() as channel:
        response = scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(request, timeout=10)
    assert response.score.score > 0
    assert "round-trip" in decided_request_ids(shared_server.data_dir)


def test_tampered_ciphertext_names_the_field(shared_server: ServerProcess) -> None:
    request = sealed_request(shared_server, "tampered")
    flipped = bytearray(request.features.fields[3].ciphertext)
    flipped[0] ^= 1
    request.features.fields[3].ciphertext = bytes(flipped)
    error = call(shared_server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {"features.fields[3].ciphertext"}
    assert "tampered" not in decided_request_ids(shared_server.data_dir)


def test_truncated_nonce_is_refused_before_decryption(shared_server: ServerProcess) -> None:
    request = sealed_request(shared_server, "short-nonce")
    request.features.fields[0].nonce = request.features.fields[0].nonce[:11]
    error = call(shared_server, request)
    assert violations(error) == {"features.fields[0].nonce": "must be 12 bytes"}


def test_a_ciphertext_moved_to_another_field_fails(shared_server: ServerProcess) -> None:
    request = sealed_request(shared_server, "swapped-field")
    first, second = request.features.fields[1], request.features.fields[4]
    first.ciphertext, second.ciphertext = second.ciphertext, first.ciphertext
    first.nonce, second.nonce = second.nonce, first.nonce
    error = call(shared_server, request)
    assert set(violations(error)) == {
        "features.fields[1].ciphertext",
        "features.fields[4].ciphertext",
    }


def test_features_sealed_for_another_subject_fail(shared_server: ServerProcess) -> None:
    other = common_pb2.SubjectRef(tenant=TENANT, pseudonym="0" * 64)
    error = call(
        shared_server, sealed_request(shared_server, "swapped-subject", seal_subject=other)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(violations(error)) == len(applicants()[0])


def test_schema_version_is_bound(shared_server: ServerProcess) -> None:
    wrong = call(
        shared_server,
        sealed_request(shared_server, "old-schema", schema_version="german-credit-000000000000"),
    )
    assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(wrong) == "SCHEMA_VERSION_MISMATCH"
    # Sealed for another version but relabelled as the served one: the AAD no longer matches.
    relabelled = sealed_request(
        shared_server, "relabelled", schema_version="german-credit-000000000000"
    )
    relabelled.features.schema_version = served_manifest().schema_version
    error = call(shared_server, relabelled)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(f.endswith(".ciphertext") for f in violations(error))


def test_fields_open_only_in_the_request_they_were_sealed_for(
    shared_server: ServerProcess,
) -> None:
    """The request id is in every field's associated data (since sealing format 2, where one
    data key may serve many requests): fields sealed for request A do not open in B."""
    replayed = call(shared_server, sealed_request(shared_server, "req-B", seal_request_id="req-A"))
    assert replayed.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(replayed)
    assert set(found) == {f"features.fields[{i}].ciphertext" for i in range(len(applicants()[0]))}
    assert all("request" in description for description in found.values())


def test_a_data_key_opens_only_for_its_own_method_and_caller(shared_server: ServerProcess) -> None:
    refusal = {"features.data_key": "does not open for this server key, method and caller"}
    other_method = sealed_request(
        shared_server, "other-method", method="/privscore.v1.LimitService/AdjustLimit"
    )
    assert violations(call(shared_server, other_method)) == refusal
    other_caller = sealed_request(shared_server, "other-caller", identity=client_identity("scorer"))
    assert violations(call(shared_server, other_caller)) == refusal


def test_unknown_key_id_is_a_failed_precondition_naming_it(shared_server: ServerProcess) -> None:
    request = sealed_request(shared_server, "unknown-key")
    request.features.data_key.key_id = "fk-19990101-deadbeef"
    for field in request.features.fields:
        field.key_id = "fk-19990101-deadbeef"
    error = call(shared_server, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "KEY_UNKNOWN"
    assert "fk-19990101-deadbeef" in str(error.details())


def privscore(data_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_rotated_keys_still_decrypt_and_retired_keys_do_not(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    old_key = load_public_keyset(DataLayout(data_dir).public_keyset)
    server.terminate()
    privscore(data_dir, "keys", "rotate")
    new_key = load_public_keyset(DataLayout(data_dir).public_keyset)
    assert new_key.key_id != old_key.key_id

    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
            old = stub.Score(sealed_request(server, "old-key", server_key=old_key), timeout=10)
            new = stub.Score(sealed_request(server, "new-key"), timeout=10)
        assert new.score.score == old.score.score
    finally:
        server.terminate()

    privscore(data_dir, "keys", "retire", old_key.key_id)
    listing = privscore(data_dir, "keys", "list")
    assert '"status": "retired"' in listing and "wrapped_private_key" not in listing
    server = ServerProcess(data_dir)
    try:
        error = call(server, sealed_request(server, "retired-key", server_key=old_key))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(error) == "KEY_RETIRED"
        assert old_key.key_id in str(error.details())
    finally:
        server.terminate()


def test_a_wrong_kek_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    ServerProcess(data_dir).terminate()
    wrong_kek = "A" * 43 + "="
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--data-dir", str(data_dir)],
        cwd=REPO_ROOT,
        env={**os.environ, "PRIVSCORE_KEK": wrong_kek},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "wrong KEK or tampered keyring" in result.stdout + result.stderr
    assert wrong_kek not in result.stdout + result.stderr


CANARY_ID = "CANARY-raw-id-5150-QZX"
CANARY_AMOUNT = 987631  # a credit amount no real applicant asked for (the schema wants integers)
CANARY_CATEGORY = "CANARY-category-8086"


def test_no_canary_reaches_logs_errors_audit_or_state(tmp_path: Path) -> None:
    """Plant a raw id and feature values no real data holds, drive every RPC including
    failing ones, then scan every log line, error and file the server wrote."""
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    features = {**applicants()[2], "credit_amount": CANARY_AMOUNT}
    errors: list[str] = []
    with server.channel() as channel:
        client = server.client(channel)
        client.score(TENANT, CANARY_ID, features)
        client.score_batch(
            TENANT, [(CANARY_ID, features), (CANARY_ID, {**features, "purpose": CANARY_CATEGORY})]
        )
        client.adjust_limit(TENANT, CANARY_ID, account(), features=features)
        client.evaluate_event(
            TENANT,
            CANARY_ID,
            event(0, missed_payment=alerts.MissedPayment(amount_due=cny(100), days_past_due=40)),
        )
        next(iter(client.watch_alerts(after_sequence=0, timeout=10)))
        for bad in (
            {**features, "purpose": CANARY_CATEGORY},
            {**features, "credit_amount": float("nan")},
            {**features, "age_in_years": CANARY_AMOUNT},
        ):
            with pytest.raises(grpc.RpcError) as caught:
                client.score(TENANT, CANARY_ID, bad)
            errors.append(f"{caught.value.details()} {caught.value.trailing_metadata()}")
    assert server.terminate() == 0
    stderr = server.process.stderr.read() if server.process.stderr else ""

    needles = [
        re.escape(needle)
        for needle in (
            CANARY_ID.encode(),
            CANARY_CATEGORY.encode(),
            struct.pack("<d", CANARY_AMOUNT),
            struct.pack("<f", CANARY_AMOUNT),
        )
    ]
    # As text, the number only counts standing alone: digits inside hex or base64 do not.
    needles.append(rb"(?<![0-9A-Za-z+/])" + str(CANARY_AMOUNT).encode() + rb"(?![0-9])")
    haystacks = {
        "stdout": "".join(server.lines).encode(),
        "stderr": stderr.encode(),
        "errors": "\n".join(errors).encode(),
    }
    for path in data_dir.rglob("*"):
        if path.is_file() and DataLayout(data_dir).client_dir not in path.parents:
            haystacks[str(path.relative_to(data_dir))] = path.read_bytes()
    assert len(haystacks) > 6  # logs, errors, audit segments, checkpoints, store, keys
    leaks = [
        (name, needle)
        for name, data in haystacks.items()
        for needle in needles
        if re.search(needle, data)
    ]
    assert leaks == []


def test_onnxruntime_writes_nothing_to_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    server = ServerProcess(tmp_path / "var", env={"HOME": str(home)})
    with server.channel() as channel:
        server.client(channel).score(TENANT, "telemetry", applicants()[0])
    assert server.terminate() == 0
    assert [p for p in home.rglob("*")] == []


def test_pseudonyms_are_keyed_stable_and_tenant_scoped() -> None:
    key_a, key_b = bytes(range(32)), bytes(range(1, 33))
    a = Pseudonymiser(key_a)
    assert a.pseudonym("t1", "42") == a.pseudonym("t1", "42")
    assert len(a.pseudonym("t1", "42")) == 64
    assert a.pseudonym("t1", "42") != a.pseudonym("t2", "42")
    assert a.pseudonym("t1", "42") != Pseudonymiser(key_b).pseudonym("t1", "42")
    # Length-prefixed: moving characters between tenant and id changes the pseudonym.
    assert a.pseudonym("ab", "c") != a.pseudonym("a", "bc")


def test_the_sdk_imports_without_onnxruntime() -> None:
    code = (
        "import sys, service.client.sdk; "
        "assert 'onnxruntime' not in sys.modules and 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_amounts_rest_encrypted_in_the_decision_store(tmp_path: Path) -> None:
    """Limits, balances and purchase amounts are a person's account data: the SQLite store
    (and its write-ahead log) holds them only sealed."""
    limit, balance, purchase = 987_654_300, 876_543_200, 765_432_100
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    with server.channel() as channel:
        client = server.client(channel)
        client.adjust_limit(
            TENANT, "amounts", account(limit=limit, balance=balance), latest_score=570
        )
        client.evaluate_event(
            TENANT,
            "amounts",
            event(0, balance=balance, purchase=alerts.Purchase(amount=cny(purchase))),
        )
        # A second call reads both rows back through the seal.
        replay = client.adjust_limit(
            TENANT, "amounts", account(limit=limit, balance=balance), latest_score=570
        )
    assert replay.new_limit.minor_units > 0
    store_files = sorted(data_dir.glob("decisions.sqlite3*"))
    assert store_files
    data = b"".join(path.read_bytes() for path in store_files)
    assert server.terminate() == 0
    for amount in (limit, balance, purchase):
        assert str(amount).encode() not in data
        assert amount.to_bytes(4, "big") not in data and amount.to_bytes(8, "big") not in data


def test_sighup_reloads_rotated_and_retired_keys_without_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    try:
        old_key = load_public_keyset(DataLayout(data_dir).public_keyset)
        privscore(data_dir, "keys", "rotate")
        new_key = load_public_keyset(DataLayout(data_dir).public_keyset)
        unknown = call(server, sealed_request(server, "before-reload", server_key=new_key))
        assert error_reason(unknown) == "KEY_UNKNOWN"

        server.process.send_signal(signal.SIGHUP)
        server.wait_for("keys.reloaded", 10)
        with server.channel() as channel:
            stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
            assert stub.Score(sealed_request(server, "new", server_key=new_key), timeout=10)
            assert stub.Score(sealed_request(server, "old", server_key=old_key), timeout=10)

        privscore(data_dir, "keys", "retire", old_key.key_id)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("keys.reloaded", 10)
        retired = call(server, sealed_request(server, "after-retire", server_key=old_key))
        assert error_reason(retired) == "KEY_RETIRED"
    finally:
        assert server.terminate() == 0


def test_the_kek_rotates_without_touching_the_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    layout = DataLayout(data_dir)
    ServerProcess(data_dir).terminate()
    old_key = load_public_keyset(layout.public_keyset)
    privscore(data_dir, "keys", "rotate")
    privscore(data_dir, "keys", "retire", old_key.key_id)
    new_key = load_public_keyset(layout.public_keyset)
    old_kek = load_kek(layout.dev_kek)
    create_kek_file(tmp_path / "new.kek")

    privscore(data_dir, "keys", "rewrap", "--new-kek-file", str(tmp_path / "new.kek"))
    with pytest.raises(KeyringError, match="wrong KEK"):
        Keyring.load(layout.keyring, old_kek)
    layout.dev_kek.write_text((tmp_path / "new.kek").read_text())  # the operator swaps the secret

    server = ServerProcess(data_dir)
    try:
        with server.channel() as channel:
            stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
            assert stub.Score(sealed_request(server, "new-kek", server_key=new_key), timeout=10)
        retired = call(server, sealed_request(server, "old-key", server_key=old_key))
        assert error_reason(retired) == "KEY_RETIRED"  # retired keys were re-wrapped too
    finally:
        assert server.terminate() == 0
