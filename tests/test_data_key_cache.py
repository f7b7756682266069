"""Data-key caching (sealing format 2): the SDK reuses one sealed data key within its limits,
the server keeps opened keys bound to the caller and to those limits, and each attack on the
reuse is performed and refused. Server behaviour is tested over real sockets."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privscore.client import envelope, sdk
from privscore.client.encoding import length_prefixed
from privscore.v1 import common_pb2, scoring_service_pb2_grpc
from privscore.v1 import scoring_service_pb2 as pb
from service.audit import iter_records
from service.client.sdk import (
    SCORE_BATCH_METHOD,
    SCORE_METHOD,
    DataKeyCache,
    PrivscoreClient,
    certificate_identity,
)
from service.config import DataLayout
from service.errors import FailedPrecondition, InvalidArgument
from service.privacy.keyring import Keyring
from service.privacy.sealing import (
    CEILING_MAX_AGE_S,
    CEILING_MAX_BYTES,
    CEILING_MAX_REQUESTS,
    GRANT,
    SUITE,
    DataKey,
    DataKeyExhausted,
    FeatureOpener,
    KeyLimits,
    ServerPublicKey,
    encode_value,
    hpke_info,
    load_public_keyset,
)
from service.security.certs import CertPaths, client_identity
from tests.conftest import ServerProcess, applicants, init_dev_keys, served_manifest
from tests.test_audit_sealed_amounts import personal
from tests.test_privacy import TENANT, privscore, sealed_request
from tests.test_server import error_reason, violations

DEV = client_identity("dev")
SCORER = client_identity("scorer")  # holds the scorer role too: the other identity of the attacks
OPENED = "sealing.data_key_opened"


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Keyring, ServerPublicKey]:
    keyring = Keyring.create(tmp_path / "keyring.json", bytes(32))
    keyset = tmp_path / "public-keys.json"
    keyset.write_text(json.dumps(keyring.public_keyset()), encoding="utf-8")
    return keyring, load_public_keyset(keyset)


def subject(customer: str = "c-1") -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant=TENANT, pseudonym=f"{customer:0>64}"[-64:])


# -- the SDK's cache ---------------------------------------------------------------------------


def encapsulated(key: DataKey) -> bytes:
    return key.sealed.encapsulated_key


def test_one_key_per_method_serves_up_to_max_requests(
    keys: tuple[Keyring, ServerPublicKey],
) -> None:
    cache = DataKeyCache(keys[1], DEV, KeyLimits(max_requests=3))
    taken = [encapsulated(cache.take(SCORE_METHOD, 200, 18)) for _ in range(7)]
    assert [len(list(g)) for g in _runs(taken)] == [3, 3, 1]
    assert len(set(taken)) == 3 and cache.sealed_keys == 3
    batch = cache.take(SCORE_BATCH_METHOD, 200, 18)
    assert encapsulated(batch) not in taken  # the method is in the HPKE info: its own key


def _runs(items: list[bytes]) -> Iterator[list[bytes]]:
    run: list[bytes] = []
    for item in items:
        if run and item != run[-1]:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def test_a_key_retires_at_its_maximum_age(keys: tuple[Keyring, ServerPublicKey]) -> None:
    clock = FakeClock()
    cache = DataKeyCache(keys[1], DEV, KeyLimits(max_age_s=10), clock=clock)
    first = cache.take(SCORE_METHOD, 100, 10)
    clock.now += 9.9
    assert cache.take(SCORE_METHOD, 100, 10) is first
    clock.now += 0.1
    assert cache.take(SCORE_METHOD, 100, 10) is not first


def test_a_key_retires_at_its_byte_limit_and_an_oversized_request_gets_its_own(
    keys: tuple[Keyring, ServerPublicKey],
) -> None:
    cache = DataKeyCache(keys[1], DEV, KeyLimits(max_bytes=100))
    first = cache.take(SCORE_METHOD, 60, 5)
    assert cache.take(SCORE_METHOD, 40, 5) is first  # exactly the limit
    oversized = cache.take(SCORE_METHOD, 101, 5)
    assert oversized is not first and oversized.limits.max_requests == 1
    second = cache.take(SCORE_METHOD, 1, 1)
    assert second is not first and second is not oversized


def test_a_key_retires_before_its_field_encryptions_reach_the_nonce_bound(
    keys: tuple[Keyring, ServerPublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "MAX_ENCRYPTIONS_PER_KEY", 10)
    cache = DataKeyCache(keys[1], DEV, KeyLimits())
    first = cache.take(SCORE_METHOD, 50, 6)
    assert cache.take(SCORE_METHOD, 50, 4) is first
    assert cache.take(SCORE_METHOD, 50, 1) is not first
    # And the key itself refuses to encrypt past the bound, whoever uses it.
    monkeypatch.setattr(envelope, "MAX_ENCRYPTIONS_PER_KEY", 5)
    key = DataKey(keys[1], SCORE_METHOD, identity=DEV)
    plaintexts = [(f"f{i}", encode_value(i)) for i in range(5)]
    key.seal_encoded("v", subject(), plaintexts, request_id="r1")
    with pytest.raises(DataKeyExhausted):
        key.seal_encoded("v", subject(), plaintexts[:1], request_id="r2")


@pytest.mark.parametrize(
    "limits",
    [KeyLimits(max_age_s=0), KeyLimits(max_requests=0), KeyLimits(max_bytes=0)],
    ids=["age-0", "requests-0", "bytes-0"],
)
def test_a_zero_limit_turns_reuse_off(
    keys: tuple[Keyring, ServerPublicKey], limits: KeyLimits
) -> None:
    cache = DataKeyCache(keys[1], DEV, limits)
    taken = [cache.take(SCORE_METHOD, 200, 18) for _ in range(5)]
    assert len({encapsulated(k) for k in taken}) == 5 and cache.sealed_keys == 5
    assert all(k.limits.max_requests == 1 for k in taken)  # and the grant says so


def test_threads_share_keys_and_never_overdraw_one(keys: tuple[Keyring, ServerPublicKey]) -> None:
    cache = DataKeyCache(keys[1], DEV, KeyLimits(max_requests=50))
    taken: list[bytes] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(100):
            key = cache.take(SCORE_METHOD, 200, 18)
            key.seal_encoded("v", subject(), [("f", b"\x08\x01")], request_id="r")
            with lock:
                taken.append(encapsulated(key))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.sealed_keys == 16
    assert sorted(Counter(taken).values()) == [50] * 16


@pytest.mark.parametrize(
    "bad",
    [
        {"max_age_s": -1},
        {"max_age_s": math.nan},
        {"max_age_s": CEILING_MAX_AGE_S + 1},
        {"max_requests": CEILING_MAX_REQUESTS + 1},
        {"max_bytes": CEILING_MAX_BYTES + 1},
    ],
)
def test_limits_beyond_the_ceilings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be between 0 and"):
        KeyLimits(**bad)  # type: ignore[arg-type]


def test_the_sdk_seals_for_the_identity_the_server_reads(tmp_path: Path) -> None:
    init_dev_keys(tmp_path)
    certs = CertPaths(DataLayout(tmp_path).certs_dir)
    for name in ("dev", "scorer", "probe"):
        assert certificate_identity(certs.client_cert(name).read_bytes()) == client_identity(name)
    channel = grpc.insecure_channel("127.0.0.1:1")  # never called
    assert PrivscoreClient.from_data_dir(channel, tmp_path, "v").data_keys.identity == DEV
    scorer = PrivscoreClient.from_data_dir(channel, tmp_path, "v", cert_name="scorer")
    assert scorer.data_keys.identity == SCORER
    channel.close()


# -- the server's cache, in process ------------------------------------------------------------


def _features(key: DataKey, request_id: str) -> common_pb2.EncryptedFeatures:
    return key.seal("v", subject(), {"age": 30, "purpose": "car"}, request_id=request_id)


def _open(opener: FeatureOpener, features: common_pb2.EncryptedFeatures, request_id: str) -> None:
    opener.open(features, subject(), method=SCORE_METHOD, identity=DEV, request_id=request_id)


def test_the_server_cache_is_a_bounded_lru(keys: tuple[Keyring, ServerPublicKey]) -> None:
    keyring, public = keys
    opener = FeatureOpener(keyring, cache_entries=3)
    data_keys = [DataKey(public, SCORE_METHOD, identity=DEV) for _ in range(5)]
    for index, key in enumerate(data_keys):
        _open(opener, _features(key, f"r{index}"), f"r{index}")
    assert opener.cached_keys == 3 and opener.hpke_opens == 5
    _open(opener, _features(data_keys[4], "again"), "again")  # still cached: no HPKE open
    assert opener.hpke_opens == 5
    _open(opener, _features(data_keys[0], "back"), "back")  # fell out: opened again
    assert opener.hpke_opens == 6 and opener.cached_keys == 3


def test_the_server_cache_keeps_a_key_to_its_grant(keys: tuple[Keyring, ServerPublicKey]) -> None:
    keyring, public = keys
    wall, monotonic = FakeClock(time.time()), FakeClock()
    opener = FeatureOpener(keyring, clock=wall, monotonic=monotonic)
    key = DataKey(public, SCORE_METHOD, identity=DEV, limits=KeyLimits(10, 3), created_at=wall.now)
    for index in range(3):
        _open(opener, _features(key, f"r{index}"), f"r{index}")
    with pytest.raises(FailedPrecondition) as spent:
        _open(opener, _features(key, "r3"), "r3")
    assert spent.value.reason == "DATA_KEY_EXHAUSTED" and opener.hpke_opens == 1

    aged = DataKey(public, SCORE_METHOD, identity=DEV, limits=KeyLimits(10), created_at=wall.now)
    _open(opener, _features(aged, "a0"), "a0")
    monotonic.now += 10.5  # the server's own clock: the caller's date may be skewed
    with pytest.raises(FailedPrecondition) as expired:
        _open(opener, _features(aged, "a1"), "a1")
    assert expired.value.reason == "DATA_KEY_EXPIRED"


def test_a_grant_outside_the_format_is_refused(keys: tuple[Keyring, ServerPublicKey]) -> None:
    keyring, public = keys
    opener = FeatureOpener(keyring)
    info = hpke_info(SCORE_METHOD, DEV)
    now_ms = round(time.time() * 1000)
    for plaintext, problem in (
        (bytes(32), "is not a sealing format 2 data key"),  # a bare key, as format 1 sealed
        (GRANT.pack(bytes(32), now_ms, 1000, CEILING_MAX_REQUESTS + 1, 1), "outside"),
        (GRANT.pack(bytes(32), now_ms, 1000, 0, 1), "outside"),
    ):
        sealed = SUITE.encrypt(plaintext, public.public_key, info=info)
        data_key = common_pb2.SealedDataKey(
            key_id=public.key_id, encapsulated_key=sealed[:32], sealed_key=sealed[32:]
        )
        with pytest.raises(InvalidArgument) as refused:
            opener.open_data_key(data_key, info, "features")
        (violation,) = refused.value.violations
        assert violation.field == "features.data_key" and problem in violation.description


def format1(
    public: ServerPublicKey, request_id: str, subject: common_pb2.SubjectRef, version: str
) -> common_pb2.EncryptedFeatures:
    """Features sealed as format 1 sealed them: a bare data key per request with the request id
    in the HPKE info, and fields whose associated data had no request id."""
    key = AESGCM.generate_key(bit_length=256)
    info = length_prefixed(b"privscore.v1/data-key\x00", SCORE_METHOD, request_id)
    sealed = SUITE.encrypt(key, public.public_key, info=info)
    prefix = length_prefixed(b"privscore.v1/field\x00", version, subject.tenant, subject.pseudonym)
    features = common_pb2.EncryptedFeatures(
        schema_version=version,
        data_key=common_pb2.SealedDataKey(
            key_id=public.key_id, encapsulated_key=sealed[:32], sealed_key=sealed[32:]
        ),
    )
    for name, value in applicants()[0].items():
        nonce = os.urandom(12)
        features.fields.append(
            common_pb2.EncryptedField(
                name=name,
                key_id=public.key_id,
                nonce=nonce,
                ciphertext=AESGCM(key).encrypt(
                    nonce, encode_value(value), prefix + length_prefixed(b"", name)
                ),
            )
        )
    return features


def test_format_1_opens_for_replay_only(keys: tuple[Keyring, ServerPublicKey]) -> None:
    keyring, public = keys
    opener = FeatureOpener(keyring)
    features = format1(public, "old-1", subject(), "v")
    recorded = opener.open(
        features, subject(), method=SCORE_METHOD, identity=DEV, request_id="old-1", at=1.0
    )
    assert recorded == applicants()[0]
    with pytest.raises(InvalidArgument) as refused:
        _open(opener, features, "old-1")  # as a call would: format 2 only
    assert [v.field for v in refused.value.violations] == ["features.data_key"]


# -- over a real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server logging at debug, so each HPKE open of a data key is a log line."""
    server = ServerProcess(tmp_path_factory.mktemp("cache") / "var", "--log-level", "debug")
    try:
        yield server
    finally:
        server.terminate()


def opens(server: ServerProcess, method: str | None = None) -> int:
    """HPKE opens of data keys the server has logged so far."""
    return sum(
        1
        for r in server.records()
        if r.get("event") == OPENED and (method is None or r.get("method") == method)
    )


def opened_since(
    server: ServerProcess, before: int, expected: int, method: str | None = None
) -> int:
    """The opens since `before`, once `expected` of them have been read from the server's
    stdout (or 5 s have passed), and a moment more for any surplus to show."""
    deadline = time.monotonic() + 5
    while opens(server, method) - before < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    return opens(server, method) - before


def real_subject(server: ServerProcess, customer: str) -> common_pb2.SubjectRef:
    return sealed_request(server, "unused", customer).subject


def recorded_data_keys(data_dir: Path, request_ids: set[str]) -> list[bytes]:
    """The encapsulated keys of the audited decisions for `request_ids`, in log order."""
    found = []
    for stored in iter_records(DataLayout(data_dir).audit_dir):
        record = stored.record
        if record.get("request_id") not in request_ids or record.get("outcome") == "refused":
            continue
        recorded = personal(data_dir, record).get("encrypted_inputs")  # sealed since format 3
        if recorded:
            features = common_pb2.EncryptedFeatures.FromString(base64.b64decode(recorded))
            found.append(features.data_key.encapsulated_key)
    return found


def call(server: ServerProcess, request: pb.ScoreRequest, cert: str = "dev") -> grpc.RpcError:
    with server.channel(cert) as channel, pytest.raises(grpc.RpcError) as caught:
        scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(request, timeout=10)
    return caught.value


def decided(server: ServerProcess, request: pb.ScoreRequest) -> bool:
    with server.channel() as channel:
        response = scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(request, timeout=10)
    return bool(response.score.score > 0)


def test_a_format_1_request_is_refused(debug_server: ServerProcess) -> None:
    public = load_public_keyset(DataLayout(debug_server.data_dir).public_keyset)
    request = sealed_request(debug_server, "format-1")
    request.features.CopyFrom(
        format1(public, "format-1", request.subject, served_manifest().schema_version)
    )
    # Its sealed key is a bare data key (48 bytes), not a grant: refused before any open.
    assert violations(call(debug_server, request)) == {
        "features.data_key.sealed_key": "must be 72 bytes"
    }


def test_a_cached_key_serves_many_requests_with_one_hpke_open(debug_server: ServerProcess) -> None:
    before = opens(debug_server)
    ids = {f"many-{n}" for n in range(12)}
    with debug_server.channel() as channel:
        client = debug_server.client(channel)
        for n, request_id in enumerate(sorted(ids)):
            client.score(TENANT, f"many-{n}", applicants()[n], request_id=request_id)
        for n in range(2):
            client.score_batch(TENANT, [(f"b-{n}-{i}", applicants()[i]) for i in range(3)])
    assert client.data_keys.sealed_keys == 2  # one per method
    assert opened_since(debug_server, before, 2) == 2  # 12 Scores, 2 batches: an open each
    assert len(set(recorded_data_keys(debug_server.data_dir, ids))) == 1

    before = opens(debug_server)
    ids = {f"fresh-{n}" for n in range(4)}
    with debug_server.channel() as channel:
        fresh = PrivscoreClient.from_data_dir(
            channel,
            debug_server.data_dir,
            served_manifest().schema_version,
            key_limits=KeyLimits(max_requests=0),
        )
        for request_id in sorted(ids):
            fresh.score(TENANT, request_id, applicants()[0], request_id=request_id)
    assert fresh.data_keys.sealed_keys == 4
    assert opened_since(debug_server, before, 4) == 4  # reuse off: one open per request
    assert len(set(recorded_data_keys(debug_server.data_dir, ids))) == 4


def test_the_sdk_retires_a_key_after_its_maximum_requests(debug_server: ServerProcess) -> None:
    before = opens(debug_server, SCORE_METHOD)
    ids = [f"retire-{n}" for n in range(7)]
    with debug_server.channel() as channel:
        client = PrivscoreClient.from_data_dir(
            channel,
            debug_server.data_dir,
            served_manifest().schema_version,
            key_limits=KeyLimits(max_requests=3),
        )
        for request_id in ids:
            client.score(TENANT, request_id, applicants()[1], request_id=request_id)
        client.score_batch(TENANT, [("rb-0", applicants()[0]), ("rb-1", applicants()[1])])
    assert opened_since(debug_server, before, 3, SCORE_METHOD) == 3
    keys = recorded_data_keys(debug_server.data_dir, set(ids))
    assert [len(run) for run in _runs(keys)] == [3, 3, 1]


def test_a_key_sealed_by_one_identity_never_opens_for_another(debug_server: ServerProcess) -> None:
    """`scorer` may call Score too: it replays what `dev` sent, with dev's cached data key."""
    refused = {"features.data_key": "does not open for this server key, method and caller"}
    public = load_public_keyset(DataLayout(debug_server.data_dir).public_keyset)
    dev_key = DataKey(public, SCORE_METHOD, identity=DEV)
    captured = sealed_request(debug_server, "dev-1", data_key=dev_key)
    assert decided(debug_server, captured)  # now in the server's cache, for dev

    error = call(debug_server, captured, "scorer")  # the captured request, replayed as scorer
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error) == refused
    # Even holding the data key (so fields for a new request id open), scorer gets nothing.
    forged = sealed_request(debug_server, "scorer-1", data_key=dev_key)
    assert violations(call(debug_server, forged, "scorer")) == refused
    # A key the server has never seen: refused by the HPKE open itself, not by the cache...
    unseen = DataKey(public, SCORE_METHOD, identity=DEV)
    first = call(debug_server, sealed_request(debug_server, "scorer-2", data_key=unseen), "scorer")
    assert violations(first) == refused
    # ...and the failed attempt does not spoil it for its owner.
    assert decided(debug_server, sealed_request(debug_server, "dev-2", data_key=unseen))
    assert decided(debug_server, sealed_request(debug_server, "dev-3", data_key=dev_key))


def test_a_field_replayed_into_another_request_is_refused(debug_server: ServerProcess) -> None:
    public = load_public_keyset(DataLayout(debug_server.data_dir).public_keyset)
    key = DataKey(public, SCORE_METHOD, identity=DEV)
    first = sealed_request(debug_server, "replay-A", data_key=key)
    assert decided(debug_server, first)
    second = sealed_request(debug_server, "replay-B", data_key=key)
    # One field of A, moved into B: same data key, subject, field name and schema version.
    second.features.fields[3].CopyFrom(first.features.fields[3])
    error = call(debug_server, second)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    name = first.features.fields[3].name
    assert violations(error) == {
        "features.fields[3].ciphertext": f"field {name} does not decrypt for this field name, "
        "request, subject and schema version"
    }
    value = str(applicants()[0][name])
    assert value not in str(error.details()) and value not in str(error.trailing_metadata())
    # The whole of A under a new request id: every field refused.
    first.request_id = "replay-C"
    assert len(violations(call(debug_server, first))) == len(first.features.fields)


def test_batch_items_are_bound_to_their_batch(debug_server: ServerProcess) -> None:
    public = load_public_keyset(DataLayout(debug_server.data_dir).public_keyset)
    key = DataKey(public, SCORE_BATCH_METHOD, identity=DEV)
    subjects = [real_subject(debug_server, f"bx-{i}") for i in range(2)]
    version = served_manifest().schema_version
    items = [
        pb.ScoreBatchItem(
            subject=subject,
            features=key.seal(version, subject, applicants()[0], request_id="batch-X"),
        )
        for subject in subjects
    ]
    with debug_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        good = stub.ScoreBatch(pb.ScoreBatchRequest(request_id="batch-X", items=items), timeout=10)
        assert all(r.WhichOneof("outcome") == "decision" for r in good.results)
        moved = stub.ScoreBatch(pb.ScoreBatchRequest(request_id="batch-Y", items=items), timeout=10)
    assert all(r.WhichOneof("outcome") == "error" for r in moved.results)
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in moved.results)


def test_the_server_stops_honouring_a_key_at_its_limits(debug_server: ServerProcess) -> None:
    public = load_public_keyset(DataLayout(debug_server.data_dir).public_keyset)

    def key(limits: KeyLimits, created_at: float | None = None) -> DataKey:
        return DataKey(public, SCORE_METHOD, identity=DEV, limits=limits, created_at=created_at)

    def refusal(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
        return error.code(), error_reason(error)

    spent = (grpc.StatusCode.FAILED_PRECONDITION, "DATA_KEY_EXHAUSTED")
    expired = (grpc.StatusCode.FAILED_PRECONDITION, "DATA_KEY_EXPIRED")

    two = key(KeyLimits(max_requests=2))  # as a caller past its own limit would send it
    for n in range(2):
        assert decided(debug_server, sealed_request(debug_server, f"two-{n}", data_key=two))
    assert refusal(call(debug_server, sealed_request(debug_server, "two-2", data_key=two))) == spent

    one_request = sealed_request(debug_server, "size", data_key=key(KeyLimits()))
    size = sum(len(f.ciphertext) - 16 for f in one_request.features.fields)
    small = key(KeyLimits(max_bytes=size))
    assert decided(debug_server, sealed_request(debug_server, "bytes-0", data_key=small))
    over = call(debug_server, sealed_request(debug_server, "bytes-1", data_key=small))
    assert refusal(over) == spent

    brief = key(KeyLimits(max_age_s=1))
    assert decided(debug_server, sealed_request(debug_server, "age-0", data_key=brief))
    time.sleep(1.2)
    assert refusal(call(debug_server, sealed_request(debug_server, "age-1", data_key=brief))) == (
        expired
    )

    # Never seen by the server, but dated: refused on the first open too.
    old = key(KeyLimits(), created_at=time.time() - 400)
    assert refusal(call(debug_server, sealed_request(debug_server, "old", data_key=old))) == (
        expired
    )
    future = key(KeyLimits(), created_at=time.time() + 120)
    assert refusal(call(debug_server, sealed_request(debug_server, "future", data_key=future))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "DATA_KEY_NOT_YET_VALID",
    )


def test_a_retired_server_key_stops_opening_after_reload_even_when_cached(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir, "--log-level", "debug")
    try:
        with server.channel() as channel:
            client = server.client(channel)
            client.score(TENANT, "rot-0", applicants()[0])
            client.score(TENANT, "rot-1", applicants()[0])
            assert opened_since(server, 0, 1) == 1  # cached
            privscore(data_dir, "keys", "rotate")
            server.process.send_signal(signal.SIGHUP)
            server.wait_for("keys.reloaded", 10)
            client.score(TENANT, "rot-2", applicants()[0])  # the old key is not retired yet
            assert opened_since(server, 1, 1) == 1  # the reload dropped the cache: opened again

            old_key_id = client.data_keys.server_key.key_id
            privscore(data_dir, "keys", "retire", old_key_id)
            server.process.send_signal(signal.SIGHUP)
            server.wait_for("keys.reloaded", 10)
            with pytest.raises(grpc.RpcError) as caught:
                client.score(TENANT, "rot-3", applicants()[0])  # the same cached data key
            assert error_reason(caught.value) == "KEY_RETIRED"
            assert old_key_id in str(caught.value.details())
            sealed = client.data_keys.sealed_keys
            with pytest.raises(grpc.RpcError):
                client.score(TENANT, "rot-4", applicants()[0])
            assert client.data_keys.sealed_keys == sealed + 1  # the failed call retired it

            renewed = server.client(channel)  # reads the new public keyset
            assert renewed.score(TENANT, "rot-5", applicants()[0]).score.score > 0
    finally:
        assert server.terminate() == 0
