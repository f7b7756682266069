"""The committed sealing and pseudonym test vectors against the SDK and the server.

protos/privscore/v1/testvectors/ is what other languages implement against (docs/envelope.md).
Here: the files are exactly what scripts/generate_testvectors.py builds from the code (so a
format change without regenerating on purpose fails), the SDK seals every positive vector byte
for byte at the field layer and to the same grant at the HPKE layer, the server opens every
positive vector as its servicers do and refuses every negative one with the stated code,
reason and field violations, and the SDK derives every pseudonym.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privscore.client.envelope import (
    ACCOUNT_SCHEMA_VERSION,
    EVENT_SCHEMA_VERSION,
    Money,
    SealedValue,
)
from privscore.v1 import common_pb2
from scripts import generate_testvectors
from service.api import validation
from service.api.features import SchemaVersionMismatch
from service.api.figures import check_sealed
from service.client.sdk import PrivscoreClient
from service.errors import InvalidArgument, ServiceError
from service.privacy.keyring import FIELD_ENCRYPTION, KeyEntry, Keyring, _wrap_aad
from service.privacy.pseudonym import Pseudonymiser
from service.privacy.sealing import (
    SUITE,
    DataKey,
    FeatureOpener,
    KeyLimits,
    RequestKeys,
    ServerPublicKey,
)

VECTORS = generate_testvectors.VECTORS_DIR


@functools.cache
def envelope() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / "envelope-v2.json").read_text(encoding="utf-8"))
    return data


@functools.cache
def pseudonyms() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / "pseudonym.json").read_text(encoding="utf-8"))
    return data


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["name"] for item in items]


CASES = envelope()["cases"]
NEGATIVE = envelope()["negative"]


def test_committed_vectors_are_what_the_generator_builds() -> None:
    """Regenerating would change nothing: the format, the code and the files agree (the
    generator also checks its HPKE sender against RFC 9180 A.1 and every vector against the
    code's own info, associated data, grant and value encodings)."""
    for name, text in generate_testvectors.build().items():
        assert (VECTORS / name).read_text(encoding="utf-8") == text, (
            f"{name} differs from what the code produces: if the format changed on purpose, "
            "run `python -m scripts.generate_testvectors` and update docs/envelope.md"
        )


def test_vectors_cover_every_refusal_the_spec_names() -> None:
    refusals = {
        (n["expect"]["code"], n["expect"]["reason"], v["reason"])
        for n in NEGATIVE
        for v in n["expect"]["violations"] or [{"reason": None}]
    }
    assert refusals == {
        ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "DECRYPTION_FAILED"),
        ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "MALFORMED_VALUE"),
        ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_DATA_KEY"),
        ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_FIELD"),
        ("FAILED_PRECONDITION", "SCHEMA_VERSION_MISMATCH", None),
        ("FAILED_PRECONDITION", "KEY_UNKNOWN", None),
        ("FAILED_PRECONDITION", "KEY_RETIRED", None),
        ("FAILED_PRECONDITION", "DATA_KEY_EXPIRED", None),
        ("FAILED_PRECONDITION", "DATA_KEY_NOT_YET_VALID", None),
        ("FAILED_PRECONDITION", "DATA_KEY_EXHAUSTED", None),
    }


# -- the SDK seals ---------------------------------------------------------------------------


def _server_private() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(
        bytes.fromhex(envelope()["server_key"]["private_key"])
    )


def _server_public() -> ServerPublicKey:
    server = envelope()["server_key"]
    public = x25519.X25519PublicKey.from_public_bytes(bytes.fromhex(server["public_key"]))
    return ServerPublicKey(server["key_id"], public)


def _fixed_random(case: dict[str, Any]) -> Callable[[int], bytes]:
    """The data key, then every field's nonce in order: what the vector fixed."""
    draws = [bytes.fromhex(case["data_key"]["grant"]["data_key"])] + [
        bytes.fromhex(field["nonce"]) for message in case["messages"] for field in message["fields"]
    ]
    source: Iterator[bytes] = iter(draws)

    def random_bytes(size: int) -> bytes:
        value = next(source)
        assert len(value) == size
        return value

    return random_bytes


def _value(typed: dict[str, Any]) -> SealedValue:
    ((kind, value),) = typed.items()
    if kind == "number_value":
        return float(value)
    if kind == "money_value":  # the protobuf JSON mapping: int64 as a decimal string
        return Money(value["currency_code"], int(value["minor_units"]))
    assert isinstance(value, str | bool)
    return value


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_sdk_seals_the_vector(case: dict[str, Any]) -> None:
    sealed_vector = case["data_key"]
    grant = sealed_vector["grant"]
    key = DataKey(
        _server_public(),
        case["method"],
        identity=case["identity"],
        limits=KeyLimits(
            max_age_s=grant["max_age_ms"] / 1000,
            max_requests=grant["max_requests"],
            max_bytes=grant["max_bytes"],
        ),
        created_at=grant["made_at_ms"] / 1000,
        random_bytes=_fixed_random(case),
    )
    # HPKE layer: the cryptography API draws its own ephemeral key, so the SDK's sealed bytes
    # differ from the vector's; they must open, for this method and identity, to its grant.
    assert key.sealed.key_id == sealed_vector["key_id"]
    assert len(key.sealed.encapsulated_key) == len(bytes.fromhex(sealed_vector["encapsulated_key"]))
    assert len(key.sealed.sealed_key) == len(bytes.fromhex(sealed_vector["sealed_key"]))
    opened = SUITE.decrypt(
        key.sealed.encapsulated_key + key.sealed.sealed_key,
        _server_private(),
        info=bytes.fromhex(sealed_vector["info"]),
    )
    assert opened.hex() == sealed_vector["grant_plaintext"]
    # Field layer: byte for byte.
    for message in case["messages"]:
        sealed = key.seal(
            message["schema_version"],
            common_pb2.SubjectRef(**message["subject"]),
            {field["name"]: _value(field["value"]) for field in message["fields"]},
            request_id=message["request_id"],
        )
        assert sealed.schema_version == message["schema_version"]
        assert sealed.data_key == key.sealed
        assert [(f.name, f.key_id, f.nonce.hex(), f.ciphertext.hex()) for f in sealed.fields] == [
            (f["name"], sealed_vector["key_id"], f["nonce"], f["ciphertext"])
            for f in message["fields"]
        ]


def test_sdk_single_use_grant_is_the_vectors() -> None:
    """With reuse off the SDK grants one request and exactly the request's plaintext bytes,
    as the adjust-limit vector does."""
    (case,) = (c for c in CASES if c["name"] == "adjust-limit")
    fields = case["messages"][0]["fields"]
    client = PrivscoreClient(
        grpc.insecure_channel("127.0.0.1:9"),
        _server_public(),
        Pseudonymiser(bytes(32)),
        case["messages"][0]["schema_version"],
        identity=case["identity"],
        key_limits=KeyLimits(max_requests=0),
    )
    plaintext_bytes = sum(len(bytes.fromhex(f["plaintext"])) for f in fields)
    key = client.data_keys.take(case["method"], plaintext_bytes, len(fields))
    grant = case["data_key"]["grant"]
    assert (key.limits.max_age_s * 1000, key.limits.max_requests, key.limits.max_bytes) == (
        grant["max_age_ms"],
        grant["max_requests"],
        grant["max_bytes"],
    )


# -- the server opens -----------------------------------------------------------------------


def _keyring(tmp_path: Path) -> Keyring:
    """A keyring holding the vectors' server key as primary and their retired key id."""
    kek = bytes(32)
    wrap = AESGCM(kek)

    def entry(key_id: str, status: str, private: bytes) -> KeyEntry:
        nonce = bytes(12)
        wrapped = nonce + wrap.encrypt(nonce, private, _wrap_aad(key_id, FIELD_ENCRYPTION))
        public = x25519.X25519PrivateKey.from_private_bytes(private).public_key()
        return KeyEntry(
            key_id,
            FIELD_ENCRYPTION,
            status,  # type: ignore[arg-type]
            "2026-01-01T00:00:00Z",
            public.public_bytes_raw(),
            wrapped,
        )

    document = envelope()
    server = document["server_key"]
    entries = [entry(server["key_id"], "primary", bytes.fromhex(server["private_key"]))]
    entries += [
        entry(key_id, "retired", generate_testvectors.fixed(key_id))
        for key_id in document["keyring"]["retired_key_ids"]
    ]
    return Keyring(tmp_path / "keyring.json", kek, entries)


def _features(body: dict[str, Any]) -> common_pb2.EncryptedFeatures:
    data_key = body["data_key"]
    return common_pb2.EncryptedFeatures(
        schema_version=body["schema_version"],
        data_key=common_pb2.SealedDataKey(
            key_id=data_key["key_id"],
            encapsulated_key=bytes.fromhex(data_key["encapsulated_key"]),
            sealed_key=bytes.fromhex(data_key["sealed_key"]),
        ),
        fields=[
            common_pb2.EncryptedField(
                name=f["name"],
                key_id=f["key_id"],
                nonce=bytes.fromhex(f["nonce"]),
                ciphertext=bytes.fromhex(f["ciphertext"]),
            )
            for f in body["fields"]
        ],
    )


# The schema version each sealed envelope's place requires; features name the served model's.
SEALED_SCHEMA_VERSIONS = {
    "sealed_account": ACCOUNT_SCHEMA_VERSION,
    "event.sealed_figures": EVENT_SCHEMA_VERSION,
}


def open_as_servicer(
    opener: FeatureOpener,
    features: common_pb2.EncryptedFeatures,
    *,
    method: str,
    identity: str,
    request_id: str,
    subject: dict[str, str],
    path: str,
    opened_keys: RequestKeys | None = None,
) -> dict[str, SealedValue]:
    """What a servicer does with a sealed envelope before the model or the rules see it:
    validate the request (service.api.validation; for account state and event figures, with
    the schema version their place takes, service.api.figures.check_sealed), compare a
    features envelope's schema version with the served one (service.api.features.open_row),
    open (FeatureOpener), naming violations under `path`. The model's and the account and
    event schemas' own checks (missing, unknown, out-of-range values) come after the
    envelope."""
    ref = common_pb2.SubjectRef(**subject)
    check = validation.Violations()
    validation.check_request_id(check, "request_id", request_id)
    validation.check_subject(check, "subject", True, ref)
    if path in SEALED_SCHEMA_VERSIONS:
        check_sealed(check, path, True, features, SEALED_SCHEMA_VERSIONS[path])
    else:
        validation.check_encrypted_features(check, path, True, features)
    check.raise_if_any()
    served = envelope()["keyring"]["served_schema_version"]
    if path not in SEALED_SCHEMA_VERSIONS and features.schema_version != served:
        raise SchemaVersionMismatch(f"{path}.schema_version does not match the served schema")
    return opener.open(
        features,
        ref,
        method=method,
        identity=identity,
        request_id=request_id,
        path=path,
        opened_keys=opened_keys,
    )


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_server_opens_the_vector(case: dict[str, Any], tmp_path: Path) -> None:
    opener = FeatureOpener(_keyring(tmp_path), clock=lambda: case["now_ms"] / 1000)
    # Messages of one request (a batch's items; an AdjustLimit's features and account) share
    # the request's memo: the request charges their data key once, as a single-use grant needs.
    memos: dict[str, RequestKeys] = {}
    for message in case["messages"]:
        opened = open_as_servicer(
            opener,
            _features(message["features"]),
            method=case["method"],
            identity=case["identity"],
            request_id=message["request_id"],
            subject=message["subject"],
            path=message["path"],
            opened_keys=memos.setdefault(message["request_id"], {}),
        )
        expected = {name: _value(typed) for name, typed in message["opened"].items()}
        assert opened == expected
        assert [type(v) for v in opened.values()] == [type(v) for v in expected.values()]
    # A reused key, or a batch's shared key, costs one HPKE open.
    assert opener.hpke_opens == 1


@pytest.mark.parametrize("vector", NEGATIVE, ids=_ids(NEGATIVE))
def test_server_refuses_the_negative_vector(vector: dict[str, Any], tmp_path: Path) -> None:
    context = vector["context"]
    opener = FeatureOpener(_keyring(tmp_path), clock=lambda: context["now_ms"] / 1000)
    with pytest.raises(ServiceError) as refused:
        open_as_servicer(
            opener,
            _features(vector["features"]),
            method=context["method"],
            identity=context["identity"],
            request_id=context["request_id"],
            subject=context["subject"],
            path=context["path"],
        )
    error = refused.value
    expect = vector["expect"]
    violations = error.violations if isinstance(error, InvalidArgument) else []
    assert (error.code.name, error.reason, [(v.field, v.reason) for v in violations]) == (
        expect["code"],
        expect["reason"],
        [(v["field"], v["reason"]) for v in expect["violations"]],
    )


# -- pseudonyms -----------------------------------------------------------------------------

PSEUDONYM_CASES = pseudonyms()["cases"]


@pytest.mark.parametrize("case", PSEUDONYM_CASES, ids=_ids(PSEUDONYM_CASES))
def test_sdk_derives_the_pseudonym(case: dict[str, Any]) -> None:
    client = PrivscoreClient(
        grpc.insecure_channel("127.0.0.1:9"),
        _server_public(),
        Pseudonymiser(bytes.fromhex(case["key"])),
        "unused",
        identity=None,
    )
    subject = client.subject(case["tenant"], case["customer_id"])
    assert (subject.tenant, subject.pseudonym) == (case["tenant"], case["pseudonym"])


@pytest.mark.parametrize("case", pseudonyms()["invalid"], ids=_ids(pseudonyms()["invalid"]))
def test_sdk_refuses_the_invalid_pseudonym_input(case: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Pseudonymiser(bytes.fromhex(case["key"])).pseudonym(case["tenant"], case["customer_id"])
