"""Write the sealing-format-2 and pseudonym test vectors (protos/privscore/v1/testvectors/).

Run only on purpose, when the format changes (and docs/envelope.md with it):

    .venv/bin/python -m scripts.generate_testvectors

The vectors are built here from docs/envelope.md, byte by byte, with an HPKE sender of our own
(RFC 9180 base mode, with the ephemeral key derived from a fixed `ikm_e` as RFC 9180's own
vectors do, since the `cryptography` HPKE API draws its ephemeral key itself). Before writing,
every vector is checked against the code: the HPKE layer opens with `cryptography` (the
server's HPKE), the info, associated data and plaintexts equal what service/privacy builds,
and the pseudonyms equal the SDK's. tests/test_vectors.py then checks the SDK and the server
against the committed files and never rewrites them.

Every fixed key, nonce and ikm is SHA-256 of a readable label (`fixed`), so none hides anything.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = REPO_ROOT / "protos" / "privscore" / "v1" / "testvectors"
ENVELOPE_FILE = "envelope-v2.json"
PSEUDONYM_FILE = "pseudonym.json"

# -- the format, as docs/envelope.md states it ----------------------------------------------

FORMAT = 2
INFO_LABEL = b"privscore.v1/data-key.v2\x00"
AAD_LABEL = b"privscore.v1/field.v2\x00"
PSEUDONYM_LABEL = b"privscore.v1/pseudonym\x00"
FORMAT1_INFO_LABEL = b"privscore.v1/data-key\x00"
GRANT = struct.Struct(">32sQIIQ")  # data key, made at ms, max age ms, max requests, max bytes
CLOCK_SKEW_MS = 60_000
SCORE = "/privscore.v1.ScoringService/Score"
SCORE_BATCH = "/privscore.v1.ScoringService/ScoreBatch"
ADJUST_LIMIT = "/privscore.v1.LimitService/AdjustLimit"
EVALUATE_EVENT = "/privscore.v1.AlertService/EvaluateEvent"
# The schema versions of sealed account state and event figures, and where each envelope
# travels in its request (violations of its fields are named under that path).
ACCOUNT_SCHEMA = "account/1"
EVENT_SCHEMA = "event/1"
FEATURES_PATH = "features"
ACCOUNT_PATH = "sealed_account"
EVENT_PATH = "event.sealed_figures"


def fixed(label: str, size: int = 32) -> bytes:
    """A fixed test value anyone can recompute: SHA-256 of the label, cut to `size` bytes."""
    digest = hashlib.sha256(b"privscore.v1/testvectors/" + label.encode()).digest()
    assert size <= len(digest)
    return digest[:size]


def length_prefixed(label: bytes, *parts: str) -> bytes:
    out = bytearray(label)
    for part in parts:
        encoded = part.encode("utf-8")
        out += struct.pack(">I", len(encoded)) + encoded
    return bytes(out)


def hpke_info(method: str, identity: str) -> bytes:
    return length_prefixed(INFO_LABEL, method, identity)


def field_aad(
    schema_version: str, request_id: str, tenant: str, pseudonym: str, name: str
) -> bytes:
    return length_prefixed(AAD_LABEL, schema_version, request_id, tenant, pseudonym, name)


def feature_value(kind: str, value: Any) -> bytes:
    """A serialized privscore.v1.FeatureValue with exactly one kind set (protobuf wire format;
    a oneof member is written even when it holds its type's default)."""
    if kind == "number_value":
        return b"\x09" + struct.pack("<d", float(value))
    if kind == "string_value":
        encoded = str(value).encode("utf-8")
        return b"\x12" + _varint(len(encoded)) + encoded
    if kind == "bool_value":
        return b"\x18" + (b"\x01" if value else b"\x00")
    if kind == "money_value":
        # A Money message (field 4, length-delimited): currency_code (field 1, string) and
        # minor_units (field 2, int64 varint; a negative one as its 64-bit two's complement,
        # ten bytes), each left out at its default as protobuf leaves out proto3 defaults.
        code = value["currency_code"].encode("utf-8")
        units = int(value["minor_units"])
        money = b""
        if code:
            money += b"\x0a" + _varint(len(code)) + code
        if units:
            money += b"\x10" + _varint(units % (1 << 64))
        return b"\x22" + _varint(len(money)) + money
    raise ValueError(kind)


def money_value(currency_code: str, minor_units: int) -> dict[str, Any]:
    """A money value as the vectors write it: the protobuf JSON mapping of `Money` (int64 as a
    decimal string, so that no JSON reader rounds it through a double)."""
    return {"currency_code": currency_code, "minor_units": str(minor_units)}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# -- RFC 9180 base mode, sender with a fixed ephemeral key ----------------------------------


@dataclass(frozen=True)
class HpkeSuite:
    kem_id: int
    kdf_id: int
    aead_id: int
    key_bytes: int

    @property
    def kem_suite_id(self) -> bytes:
        return b"KEM" + struct.pack(">H", self.kem_id)

    @property
    def suite_id(self) -> bytes:
        return b"HPKE" + struct.pack(">HHH", self.kem_id, self.kdf_id, self.aead_id)


# DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM: privscore's suite.
PRIVSCORE_SUITE = HpkeSuite(0x0020, 0x0001, 0x0002, 32)
# The same with AES-128-GCM: RFC 9180 appendix A.1, for a known-answer check of this sender.
RFC9180_A1_SUITE = HpkeSuite(0x0020, 0x0001, 0x0001, 16)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or bytes(32), ikm, "sha256")


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info, length)


def derive_key_pair(suite: HpkeSuite, ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 7.1.3 DeriveKeyPair for X25519: (raw private key, raw public key)."""
    prk = _labeled_extract(suite.kem_suite_id, b"", b"dkp_prk", ikm)
    private = _labeled_expand(suite.kem_suite_id, prk, b"sk", b"", 32)
    return private, x25519.X25519PrivateKey.from_private_bytes(
        private
    ).public_key().public_bytes_raw()


def hpke_seal(
    suite: HpkeSuite, recipient_public: bytes, info: bytes, plaintext: bytes, ikm_e: bytes,
    aad: bytes = b"",
) -> tuple[bytes, bytes]:  # fmt: skip
    """SetupBaseS with the ephemeral key derived from `ikm_e`, then one Seal: (enc, ct)."""
    ephemeral_private, enc = derive_key_pair(suite, ikm_e)
    dh = x25519.X25519PrivateKey.from_private_bytes(ephemeral_private).exchange(
        x25519.X25519PublicKey.from_public_bytes(recipient_public)
    )
    eae_prk = _labeled_extract(suite.kem_suite_id, b"", b"eae_prk", dh)
    shared = _labeled_expand(
        suite.kem_suite_id, eae_prk, b"shared_secret", enc + recipient_public, 32
    )
    sid = suite.suite_id
    context = (
        b"\x00"  # mode_base
        + _labeled_extract(sid, b"", b"psk_id_hash", b"")
        + _labeled_extract(sid, b"", b"info_hash", info)
    )
    secret = _labeled_extract(sid, shared, b"secret", b"")
    key = _labeled_expand(sid, secret, b"key", context, suite.key_bytes)
    base_nonce = _labeled_expand(sid, secret, b"base_nonce", context, 12)
    return enc, AESGCM(key).encrypt(base_nonce, plaintext, aad)  # sequence 0: the base nonce


# -- the vectors -------------------------------------------------------------------------------

IKM_R = fixed("server-key/ikm")
IKM_R_OTHER = fixed("other-server-key/ikm")
KEY_ID = "fk-vectors-1"
RETIRED_KEY_ID = "fk-vectors-0"
UNKNOWN_KEY_ID = "fk-vectors-9"
IDENTITY = "spiffe://privscore.dev/client/dev"
OTHER_IDENTITY = "spiffe://privscore.dev/client/monitor"
SCHEMA = "german-credit-3f9a1c2b7d4e"
OTHER_SCHEMA = "german-credit-000000000000"
TENANT = "baitiao-cn"
PSEUDONYM_KEY = fixed("pseudonym-key")
MADE_AT_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW_MS = MADE_AT_MS + 1_500
DEFAULT_MAX_AGE_MS = 300_000
DEFAULT_MAX_REQUESTS = 10_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

FEATURES: list[tuple[str, str, Any]] = [
    ("duration_in_month", "number_value", 24),
    ("credit_amount", "number_value", 1169.5),
    ("checking_account_status", "string_value", "A11"),
    ("foreign_worker", "bool_value", True),
]
EDGE_FEATURES: list[tuple[str, str, Any]] = [
    ("zero", "number_value", 0.0),
    ("negative_fraction", "number_value", -273.15),
    ("tenth", "number_value", 0.1),
    ("largest_exact_integer", "number_value", 9007199254740991),
    ("tiny", "number_value", 5e-324),
    ("empty_category", "string_value", ""),
    ("unicode_category", "string_value", "Zürich-北京"),
    ("long_category", "string_value", "c" * 200),
    ("no", "bool_value", False),
]
# AdjustLimit's sealed account state ("account/1"): amounts as money, counts as whole numbers.
ACCOUNT_FIELDS: list[tuple[str, str, Any]] = [
    ("current_limit", "money_value", money_value("CNY", 1_000_000)),
    ("balance", "money_value", money_value("CNY", 200_000)),
    ("on_time_repayments_in_row", "number_value", 12),
    ("days_past_due", "number_value", 0),
    ("account_age_days", "number_value", 400),
]
# EvaluateEvent's figures of a missed payment ("event/1").
EVENT_FIELDS: list[tuple[str, str, Any]] = [
    ("amount", "money_value", money_value("CNY", 35_000)),
    ("days_past_due", "number_value", 31),
    ("balance_after", "money_value", money_value("CNY", 420_000)),
]
# Money encodings at their edges. The names are no event figure's: the envelope opens them, and
# the event schema (after the envelope) would refuse them, as it refuses negative amounts.
MONEY_EDGE_FIELDS: list[tuple[str, str, Any]] = [
    ("zero_units", "money_value", money_value("CNY", 0)),
    ("empty_money", "money_value", money_value("", 0)),
    ("negative_one", "money_value", money_value("CNY", -1)),
    ("beyond_double", "money_value", money_value("USD", 2**53 + 1)),
    ("int64_max", "money_value", money_value("CNY", 2**63 - 1)),
    ("int64_min", "money_value", money_value("CNY", -(2**63))),
    ("non_ascii_code", "money_value", money_value("\u00c7NY", 100)),
]


def pseudonym(tenant: str, customer_id: str, key: bytes = PSEUDONYM_KEY) -> str:
    return hmac.new(
        key, length_prefixed(PSEUDONYM_LABEL, tenant, customer_id), "sha256"
    ).hexdigest()


def _hex(data: bytes) -> str:
    return data.hex()


@dataclass
class SealedKey:
    name: str  # which ikm_e / data key labels it uses
    method: str
    identity: str
    data_key: bytes
    made_at_ms: int
    max_age_ms: int
    max_requests: int
    max_bytes: int
    key_id: str = KEY_ID
    recipient_ikm: bytes = IKM_R
    info_override: bytes | None = None
    plaintext_override: bytes | None = None

    @property
    def ikm_e(self) -> bytes:
        return fixed(f"{self.name}/ikm_e")

    @property
    def grant(self) -> bytes:
        if self.plaintext_override is not None:
            return self.plaintext_override
        return GRANT.pack(
            self.data_key, self.made_at_ms, self.max_age_ms, self.max_requests, self.max_bytes
        )

    @property
    def info(self) -> bytes:
        return self.info_override or hpke_info(self.method, self.identity)

    def seal(self) -> tuple[bytes, bytes]:
        _, public = derive_key_pair(PRIVSCORE_SUITE, self.recipient_ikm)
        return hpke_seal(PRIVSCORE_SUITE, public, self.info, self.grant, self.ikm_e)

    def to_json(self) -> dict[str, Any]:
        enc, sealed = self.seal()
        ephemeral_private, _ = derive_key_pair(PRIVSCORE_SUITE, self.ikm_e)
        return {
            "key_id": self.key_id,
            "grant": {
                "data_key": _hex(self.data_key),
                "made_at_ms": self.made_at_ms,
                "max_age_ms": self.max_age_ms,
                "max_requests": self.max_requests,
                "max_bytes": self.max_bytes,
            },
            "grant_plaintext": _hex(self.grant),
            "info": _hex(self.info),
            "ikm_e": _hex(self.ikm_e),
            "ephemeral_private_key": _hex(ephemeral_private),
            "encapsulated_key": _hex(enc),
            "sealed_key": _hex(sealed),
        }


@dataclass
class Message:
    """One subject's features (or account state, or event figures) in one request, sealed
    under a data key; `path` is where the envelope travels in the request."""

    request_id: str
    tenant: str
    pseudonym: str
    schema_version: str
    features: Sequence[tuple[str, str, Any]]
    nonce_label: str
    path: str = FEATURES_PATH

    def fields(self, data_key: bytes) -> list[dict[str, Any]]:
        out = []
        for index, (name, kind, value) in enumerate(self.features):
            plaintext = feature_value(kind, value)
            nonce = fixed(f"{self.nonce_label}/nonce/{index}", 12)
            aad = field_aad(self.schema_version, self.request_id, self.tenant, self.pseudonym, name)
            out.append(
                {
                    "name": name,
                    "value": {kind: value},
                    "plaintext": _hex(plaintext),
                    "nonce": _hex(nonce),
                    "aad": _hex(aad),
                    "ciphertext": _hex(AESGCM(data_key).encrypt(nonce, plaintext, aad)),
                }
            )
        return out

    def to_json(self, data_key: bytes) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "subject": {"tenant": self.tenant, "pseudonym": self.pseudonym},
            "path": self.path,
            "schema_version": self.schema_version,
            "fields": self.fields(data_key),
        }


def _sealed(
    name: str,
    method: str = SCORE,
    *,
    data_key: bytes | None = None,
    max_age_ms: int = DEFAULT_MAX_AGE_MS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    recipient_ikm: bytes = IKM_R,
    info: bytes | None = None,
    plaintext: bytes | None = None,
) -> SealedKey:
    return SealedKey(
        name=name,
        method=method,
        identity=IDENTITY,
        data_key=fixed(f"{name}/data-key") if data_key is None else data_key,
        made_at_ms=MADE_AT_MS,
        max_age_ms=max_age_ms,
        max_requests=max_requests,
        max_bytes=max_bytes,
        recipient_ikm=recipient_ikm,
        info_override=info,
        plaintext_override=plaintext,
    )


ALICE = pseudonym(TENANT, "customer-0001")
BOB = pseudonym(TENANT, "customer-0002")


def _positive_cases() -> list[tuple[str, str, SealedKey, int, list[Message], bool]]:
    """(name, description, sealed key, now ms, messages, batch)."""
    features = list(FEATURES)
    return [
        (
            "score",
            "One Score request: numbers, a category and a boolean, under a reusable key "
            "(the SDK's default limits).",
            _sealed("score"),
            NOW_MS,
            [Message("req-0001", TENANT, ALICE, SCHEMA, features, "score/req-0001")],
            False,
        ),
        (
            "score-edge-values",
            "FeatureValue encodings at their edges: zero, a negative fraction, 0.1, 2^53-1, the "
            "smallest subnormal, an empty string, UTF-8 beyond ASCII, a 200-byte string "
            "(two-byte length varint) and false.",
            _sealed("score-edge-values"),
            NOW_MS,
            [Message("req-0002", TENANT, ALICE, SCHEMA, EDGE_FEATURES, "score-edge/req-0002")],
            False,
        ),
        (
            "score-reused-key",
            "One sealed data key reused for two Score requests (two request ids, two subjects): "
            "the same sealed bytes, fields bound to each request.",
            _sealed("score-reused-key"),
            NOW_MS,
            [
                Message("req-0003", TENANT, ALICE, SCHEMA, features[:2], "reuse/req-0003"),
                Message("req-0004", TENANT, BOB, SCHEMA, features[2:], "reuse/req-0004"),
            ],
            False,
        ),
        (
            "score-batch",
            "A ScoreBatch of two items under one data key: each item's fields bound to the "
            "batch's request id and the item's subject.",
            _sealed("score-batch", SCORE_BATCH),
            NOW_MS,
            [
                Message("batch-0001", TENANT, ALICE, SCHEMA, features, "batch/0"),
                Message("batch-0001", TENANT, BOB, SCHEMA, features, "batch/1"),
            ],
            True,
        ),
        (
            "adjust-limit",
            "AdjustLimit with features, under a single-use key (reuse off: one request, the "
            "request's plaintext bytes) as the SDK seals with KeyLimits(max_requests=0).",
            _sealed(
                "adjust-limit", ADJUST_LIMIT, max_requests=1, max_bytes=_plaintext_bytes(features)
            ),
            NOW_MS,
            [Message("limit-0001", TENANT, ALICE, SCHEMA, features, "adjust-limit/limit-0001")],
            False,
        ),
        (
            "adjust-limit-sealed-account",
            "AdjustLimit with features and the sealed account state (account/1: amounts as "
            "money_value, counts as whole numbers) under one single-use key: both envelopes "
            "are one request, so the key is granted one request and both envelopes' bytes.",
            _sealed(
                "adjust-limit-sealed-account",
                ADJUST_LIMIT,
                max_requests=1,
                max_bytes=_plaintext_bytes(features) + _plaintext_bytes(ACCOUNT_FIELDS),
            ),
            NOW_MS,
            [
                Message("limit-0002", TENANT, ALICE, SCHEMA, features, "sealed-account/features"),
                Message(
                    "limit-0002",
                    TENANT,
                    ALICE,
                    ACCOUNT_SCHEMA,
                    ACCOUNT_FIELDS,
                    "sealed-account/account",
                    ACCOUNT_PATH,
                ),
            ],
            False,
        ),
        (
            "evaluate-event-sealed-figures",
            "EvaluateEvent for a missed payment: its figures (event/1) sealed in "
            "event.sealed_figures, the amount and balance as money_value, the days past due a "
            "whole number.",
            _sealed("evaluate-event-sealed-figures", EVALUATE_EVENT),
            NOW_MS,
            [
                Message(
                    "event-0001",
                    TENANT,
                    ALICE,
                    EVENT_SCHEMA,
                    EVENT_FIELDS,
                    "sealed-figures/event-0001",
                    EVENT_PATH,
                )
            ],
            False,
        ),
        (
            "money-edge-values",
            "money_value encodings at their edges: zero units and an empty Money (fields at "
            "their defaults are left out), -1 and the int64 extremes (ten-byte varints), 2^53+1 "
            "(not representable as a double) and a non-ASCII currency code. The envelope opens "
            "them; the event schema after it refuses these names and amounts.",
            _sealed("money-edge-values", EVALUATE_EVENT),
            NOW_MS,
            [
                Message(
                    "event-0002",
                    TENANT,
                    ALICE,
                    EVENT_SCHEMA,
                    MONEY_EDGE_FIELDS,
                    "money-edge/event-0002",
                    EVENT_PATH,
                )
            ],
            False,
        ),
        (
            "clock-skew-early",
            "Opened 59.999 s before the caller's date: within the 60 s clock skew.",
            _sealed("clock-skew-early"),
            MADE_AT_MS - CLOCK_SKEW_MS + 1,
            [Message("req-0005", TENANT, ALICE, SCHEMA, features[:1], "skew-early/req-0005")],
            False,
        ),
        (
            "clock-skew-late",
            "Opened 1 ms before its maximum age plus the 60 s skew runs out.",
            _sealed("clock-skew-late", max_age_ms=60_000),
            MADE_AT_MS + 60_000 + CLOCK_SKEW_MS - 1,
            [Message("req-0006", TENANT, ALICE, SCHEMA, features[:1], "skew-late/req-0006")],
            False,
        ),
        (
            "ceiling-limits",
            "A grant at every ceiling: 1 hour, 1,000,000 requests, 1 GiB.",
            _sealed(
                "ceiling-limits", max_age_ms=3_600_000, max_requests=1_000_000, max_bytes=1 << 30
            ),
            NOW_MS,
            [Message("req-0007", TENANT, ALICE, SCHEMA, features[:1], "ceiling/req-0007")],
            False,
        ),
    ]


def _plaintext_bytes(features: Sequence[tuple[str, str, Any]]) -> int:
    return sum(len(feature_value(kind, value)) for _, kind, value in features)


def _features_json(
    sealed: dict[str, Any], message: dict[str, Any], *, schema_version: str | None = None
) -> dict[str, Any]:
    """The EncryptedFeatures message as the server receives it (bytes as hex)."""
    return {
        "schema_version": message["schema_version"] if schema_version is None else schema_version,
        "data_key": {
            "key_id": sealed["key_id"],
            "encapsulated_key": sealed["encapsulated_key"],
            "sealed_key": sealed["sealed_key"],
        },
        "fields": [
            {
                "name": f["name"],
                "key_id": sealed["key_id"],
                "nonce": f["nonce"],
                "ciphertext": f["ciphertext"],
            }
            for f in message["fields"]
        ],
    }


def _flip(hex_text: str, byte: int = 0) -> str:
    data = bytearray.fromhex(hex_text)
    data[byte] ^= 0x01
    return data.hex()


def _invalid(*violations: tuple[str, str]) -> dict[str, Any]:
    return {
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_ARGUMENT",
        "violations": [{"field": field, "reason": reason} for field, reason in violations],
    }


def _precondition(reason: str) -> dict[str, Any]:
    return {"code": "FAILED_PRECONDITION", "reason": reason, "violations": []}


def _undecryptable(count: int) -> dict[str, Any]:
    return _invalid(
        *((f"features.fields[{i}].ciphertext", "DECRYPTION_FAILED") for i in range(count))
    )


def build_envelope() -> dict[str, Any]:
    server_private, server_public = derive_key_pair(PRIVSCORE_SUITE, IKM_R)
    cases = []
    base: dict[str, Any] = {}
    for name, description, sealed_key, now_ms, messages, batch in _positive_cases():
        sealed = sealed_key.to_json()
        encoded = [m.to_json(sealed_key.data_key) for m in messages]
        for message in encoded:
            message["features"] = _features_json(sealed, message)
            message["opened"] = {f["name"]: f["value"] for f in message["fields"]}
        case = {
            "name": name,
            "description": description,
            "method": sealed_key.method,
            "identity": sealed_key.identity,
            "now_ms": now_ms,
            "batch": batch,
            "data_key": sealed,
            "messages": encoded,
        }
        cases.append(case)
        base[name] = case
    return {
        "format": FORMAT,
        "description": (
            "privscore sealing format 2 test vectors (docs/envelope.md). Bytes are lowercase "
            "hex. Positive cases: sealing with the given grant, ikm_e and nonces gives exactly "
            "encapsulated_key, sealed_key and each ciphertext; opening them as `method` and "
            "`identity` at now_ms gives the grant and `opened`. Negative cases: opening "
            "`features` in `context` must fail with `expect` (gRPC code, ErrorInfo reason, "
            "BadRequest field violations in order). `path` is where an envelope travels in "
            "its request (features, sealed_account, event.sealed_figures; violations are named "
            "under it); messages with one request id belong to one request, which charges its "
            "data key once. Money values follow the protobuf JSON mapping (minor_units as a "
            "decimal string). Regenerate only on purpose: python -m scripts.generate_testvectors."
        ),
        "suite": {
            "mode": "base",
            "mode_id": 0,
            "kem": "DHKEM(X25519, HKDF-SHA256)",
            "kem_id": PRIVSCORE_SUITE.kem_id,
            "kdf": "HKDF-SHA256",
            "kdf_id": PRIVSCORE_SUITE.kdf_id,
            "aead": "AES-256-GCM",
            "aead_id": PRIVSCORE_SUITE.aead_id,
            "hpke_aad": "",
        },
        "labels": {
            "info": INFO_LABEL.hex(),
            "field_aad": AAD_LABEL.hex(),
        },
        "limits": {
            "clock_skew_ms": CLOCK_SKEW_MS,
            "ceiling_max_age_ms": 3_600_000,
            "ceiling_max_requests": 1_000_000,
            "ceiling_max_bytes": 1 << 30,
        },
        "server_key": {
            "key_id": KEY_ID,
            "ikm_r": _hex(IKM_R),
            "private_key": _hex(server_private),
            "public_key": _hex(server_public),
        },
        "keyring": {
            "retired_key_ids": [RETIRED_KEY_ID],
            "served_schema_version": SCHEMA,
        },
        "cases": cases,
        "negative": _negative_cases(base),
    }


def _adder(out: list[dict[str, Any]], case: dict[str, Any], index: int = 0) -> Callable[..., None]:
    """Adds negative vectors to `out` that change the `index`th message of a positive case:
    its envelope as sent (`features_json`, or `edit` of a copy), or the context it is opened
    in (`changes`)."""
    message = case["messages"][index]
    features = message["features"]
    context = {
        "method": case["method"],
        "identity": case["identity"],
        "request_id": message["request_id"],
        "subject": dict(message["subject"]),
        "path": message["path"],
        "now_ms": case["now_ms"],
    }

    def add(
        name: str,
        description: str,
        expect: dict[str, Any],
        *,
        features_json: dict[str, Any] | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
        **changes: Any,
    ) -> None:
        body = json.loads(json.dumps(features if features_json is None else features_json))
        if edit is not None:
            edit(body)
        out.append(
            {
                "name": name,
                "description": description,
                "context": {**context, **changes},
                "features": body,
                "expect": expect,
            }
        )

    return add


def _negative_cases(base: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    score = base["score"]
    sealed = score["data_key"]
    message = score["messages"][0]
    features = message["features"]
    n = len(message["fields"])
    out: list[dict[str, Any]] = []
    add = _adder(out, score)

    add(
        "wrong-subject-pseudonym",
        "The fields are opened for another pseudonym of the same tenant.",
        _undecryptable(n),
        subject={"tenant": TENANT, "pseudonym": BOB},
    )
    add(
        "wrong-subject-tenant",
        "The fields are opened for the same pseudonym under another tenant.",
        _undecryptable(n),
        subject={"tenant": "other-tenant", "pseudonym": ALICE},
    )

    def rename(body: dict[str, Any]) -> None:
        body["fields"][1]["name"] = "installment_rate"

    add(
        "wrong-field-name",
        "Field 1's ciphertext sent under another field name.",
        _invalid(("features.fields[1].ciphertext", "DECRYPTION_FAILED")),
        edit=rename,
    )

    def swap(body: dict[str, Any]) -> None:
        first, second = body["fields"][0], body["fields"][1]
        first["name"], second["name"] = second["name"], first["name"]

    add(
        "swapped-field-names",
        "Fields 0 and 1 exchange names (each ciphertext moved to the other field).",
        _invalid(
            ("features.fields[0].ciphertext", "DECRYPTION_FAILED"),
            ("features.fields[1].ciphertext", "DECRYPTION_FAILED"),
        ),
        edit=swap,
    )
    add(
        "wrong-schema-version",
        "The fields were sealed for another schema version than the one the request names "
        "(which is the served one): no field opens.",
        _undecryptable(n),
        features_json=_resealed_for_schema(score, OTHER_SCHEMA),
    )
    add(
        "schema-version-not-served",
        "The request names a schema version the server does not serve: refused before any "
        "decryption.",
        _precondition("SCHEMA_VERSION_MISMATCH"),
        features_json={**features, "schema_version": OTHER_SCHEMA},
    )
    add(
        "wrong-request-id",
        "The fields are opened in another request (replayed under a new request id).",
        _undecryptable(n),
        request_id="req-9999",
    )
    add(
        "wrong-method",
        "A data key sealed for Score, sent to AdjustLimit.",
        _invalid(("features.data_key", "DECRYPTION_FAILED")),
        method=ADJUST_LIMIT,
    )
    add(
        "wrong-identity",
        "A data key sealed by one caller identity, sent by another.",
        _invalid(("features.data_key", "DECRYPTION_FAILED")),
        identity=OTHER_IDENTITY,
    )

    def tamper_ciphertext(body: dict[str, Any]) -> None:
        body["fields"][2]["ciphertext"] = _flip(body["fields"][2]["ciphertext"])

    add(
        "tampered-ciphertext",
        "One bit of field 2's ciphertext flipped.",
        _invalid(("features.fields[2].ciphertext", "DECRYPTION_FAILED")),
        edit=tamper_ciphertext,
    )

    def tamper_tag(body: dict[str, Any]) -> None:
        field = body["fields"][0]
        field["ciphertext"] = _flip(field["ciphertext"], len(field["ciphertext"]) // 2 - 1)

    add(
        "tampered-tag",
        "One bit of field 0's authentication tag (its last byte) flipped.",
        _invalid(("features.fields[0].ciphertext", "DECRYPTION_FAILED")),
        edit=tamper_tag,
    )

    def tamper_nonce(body: dict[str, Any]) -> None:
        body["fields"][3]["nonce"] = _flip(body["fields"][3]["nonce"], 11)

    add(
        "tampered-nonce",
        "One bit of field 3's nonce flipped.",
        _invalid(("features.fields[3].ciphertext", "DECRYPTION_FAILED")),
        edit=tamper_nonce,
    )

    def tamper_sealed_key(body: dict[str, Any]) -> None:
        body["data_key"]["sealed_key"] = _flip(body["data_key"]["sealed_key"], 5)

    add(
        "tampered-sealed-key",
        "One bit of the HPKE ciphertext of the grant flipped.",
        _invalid(("features.data_key", "DECRYPTION_FAILED")),
        edit=tamper_sealed_key,
    )

    def tamper_enc(body: dict[str, Any]) -> None:
        body["data_key"]["encapsulated_key"] = _flip(body["data_key"]["encapsulated_key"], 3)

    add(
        "tampered-encapsulated-key",
        "One bit of the encapsulated key flipped.",
        _invalid(("features.data_key", "DECRYPTION_FAILED")),
        edit=tamper_enc,
    )

    def low_order_enc(body: dict[str, Any]) -> None:
        body["data_key"]["encapsulated_key"] = "00" * 32

    add(
        "low-order-encapsulated-key",
        "An all-zero encapsulated key (a low-order X25519 point: the DH output is all zero, "
        "which RFC 9180 makes an error).",
        _invalid(("features.data_key", "DECRYPTION_FAILED")),
        edit=low_order_enc,
    )

    def other_server_key(body: dict[str, Any]) -> None:
        other = _sealed(
            "other-server-key",
            data_key=bytes.fromhex(sealed["grant"]["data_key"]),
            recipient_ikm=IKM_R_OTHER,
        ).to_json()
        body["data_key"]["encapsulated_key"] = other["encapsulated_key"]
        body["data_key"]["sealed_key"] = other["sealed_key"]

    add(
        "sealed-to-another-server-key",
        "The grant sealed to another X25519 key but labelled with this server's key id.",
        _invalid(("features.data_key", "DECRYPTION_FAILED")),
        edit=other_server_key,
    )

    def key_id(new: str) -> Callable[[dict[str, Any]], None]:
        def edit(body: dict[str, Any]) -> None:
            body["data_key"]["key_id"] = new
            for field in body["fields"]:
                field["key_id"] = new

        return edit

    add(
        "unknown-key-id",
        "A key id the server's keyring does not hold.",
        _precondition("KEY_UNKNOWN"),
        edit=key_id(UNKNOWN_KEY_ID),
    )
    add(
        "retired-key-id",
        "A key id the keyring holds as retired.",
        _precondition("KEY_RETIRED"),
        edit=key_id(RETIRED_KEY_ID),
    )

    def field_key_id(body: dict[str, Any]) -> None:
        body["fields"][1]["key_id"] = UNKNOWN_KEY_ID

    add(
        "field-key-id-differs",
        "A field names another key id than the data key (refused by request validation).",
        _invalid(("features.fields[1].key_id", "INVALID_FIELD")),
        edit=field_key_id,
    )

    def short_nonce(body: dict[str, Any]) -> None:
        body["fields"][0]["nonce"] = body["fields"][0]["nonce"][:22]

    add(
        "short-nonce",
        "An 11-byte nonce (refused by request validation).",
        _invalid(("features.fields[0].nonce", "INVALID_FIELD")),
        edit=short_nonce,
    )
    add(
        "expired",
        "Opened 1 ms after the grant's date plus its maximum age plus the 60 s clock skew.",
        _precondition("DATA_KEY_EXPIRED"),
        now_ms=MADE_AT_MS + DEFAULT_MAX_AGE_MS + CLOCK_SKEW_MS + 1,
    )
    add(
        "not-yet-valid",
        "Opened 60.001 s before the grant's date (the caller's clock runs ahead).",
        _precondition("DATA_KEY_NOT_YET_VALID"),
        now_ms=MADE_AT_MS - CLOCK_SKEW_MS - 1,
    )
    add(
        "bytes-over-grant",
        f"A first request whose field plaintexts ({_plaintext_bytes(FEATURES)} bytes) exceed "
        "the grant's maximum bytes (16).",
        _precondition("DATA_KEY_EXHAUSTED"),
        features_json=_resealed_with_grant(score, "bytes-over-grant", max_bytes=16),
    )
    age, requests, size = DEFAULT_MAX_AGE_MS, DEFAULT_MAX_REQUESTS, DEFAULT_MAX_BYTES
    for label, grant in (
        ("max-age-zero", (0, requests, size)),
        ("max-age-over-ceiling", (3_600_001, requests, size)),
        ("max-requests-zero", (age, 0, size)),
        ("max-requests-over-ceiling", (age, 1_000_001, size)),
        ("max-bytes-zero", (age, requests, 0)),
        ("max-bytes-over-ceiling", (age, requests, (1 << 30) + 1)),
    ):
        add(
            f"grant-{label}",
            f"A grant with {label.replace('-', ' ')}: outside the allowed ranges.",
            _invalid(("features.data_key", "INVALID_DATA_KEY")),
            features_json=_resealed_with_grant(
                score,
                f"grant-{label}",
                max_age_ms=grant[0],
                max_requests=grant[1],
                max_bytes=grant[2],
            ),
        )
    add(
        "format-1-data-key",
        "A format-1 data key (a bare 32-byte key sealed with info privscore.v1/data-key, "
        "method, request id): its 48-byte sealed_key is refused by request validation.",
        _invalid(("features.data_key.sealed_key", "INVALID_FIELD")),
        features_json=_resealed_with_plaintext(
            score,
            "format-1-data-key",
            bytes.fromhex(sealed["grant"]["data_key"]),
            info=length_prefixed(FORMAT1_INFO_LABEL, SCORE, message["request_id"]),
        ),
    )
    add(
        "malformed-value",
        "Field 0 decrypts to bytes that are no FeatureValue with a kind set (field 4, "
        "money_value, with the varint wire type instead of a message: not a member).",
        _invalid(("features.fields[0].ciphertext", "MALFORMED_VALUE")),
        features_json=_resealed_plaintexts(score, {0: b"\x20\x01"}),
    )
    add(
        "undecodable-value",
        "Field 1 decrypts to bytes that do not parse as protobuf.",
        _invalid(("features.fields[1].ciphertext", "MALFORMED_VALUE")),
        features_json=_resealed_plaintexts(score, {1: b"\x09\x00"}),
    )
    add(
        "non-finite-number",
        "Fields 0 and 1 decrypt to NaN and +Infinity.",
        _invalid(
            ("features.fields[0].ciphertext", "MALFORMED_VALUE"),
            ("features.fields[1].ciphertext", "MALFORMED_VALUE"),
        ),
        features_json=_resealed_plaintexts(
            score,
            {
                0: b"\x09" + struct.pack("<d", float("nan")),
                1: b"\x09" + struct.pack("<d", float("inf")),
            },
        ),
    )
    _sealed_figure_negatives(out, base)
    return out


def _sealed_figure_negatives(out: list[dict[str, Any]], base: Mapping[str, dict[str, Any]]) -> None:
    """Account state and event figures are bound like features: to the request, subject, field
    name, schema version and method. Only what the envelope decides: a value of the wrong kind
    for its name (money under a count) opens, and the account or event schema refuses it."""
    limit = base["adjust-limit-sealed-account"]
    account = limit["messages"][1]
    n = len(account["fields"])
    add = _adder(out, limit, 1)

    def undecryptable(path: str, *indexes: int) -> dict[str, Any]:
        return _invalid(*((f"{path}.fields[{i}].ciphertext", "DECRYPTION_FAILED") for i in indexes))

    add(
        "account-in-another-request",
        "The sealed account state of one AdjustLimit sent again under another request id.",
        undecryptable(ACCOUNT_PATH, *range(n)),
        request_id="limit-9999",
    )
    add(
        "account-of-another-subject",
        "The sealed account state opened for another customer of the same tenant.",
        undecryptable(ACCOUNT_PATH, *range(n)),
        subject={"tenant": TENANT, "pseudonym": BOB},
    )

    def swap_amounts(body: dict[str, Any]) -> None:
        first, second = body["fields"][0], body["fields"][1]
        first["name"], second["name"] = second["name"], first["name"]

    add(
        "account-amounts-swapped",
        "current_limit and balance exchange names (the limit's ciphertext sent as the balance).",
        undecryptable(ACCOUNT_PATH, 0, 1),
        edit=swap_amounts,
    )
    add(
        "account-sealed-as-features",
        "The account fields sealed with the features' schema version in their associated "
        "data, sent under account/1: no field opens.",
        undecryptable(ACCOUNT_PATH, *range(n)),
        features_json=_resealed_for_schema(limit, SCHEMA, message_index=1),
    )

    def features_schema(body: dict[str, Any]) -> None:
        body["schema_version"] = SCHEMA

    add(
        "account-names-the-features-schema",
        "An account envelope that names (and is sealed under) the features' schema version: "
        "sealed_account takes account/1 only, refused before any decryption.",
        _invalid((f"{ACCOUNT_PATH}.schema_version", "INVALID_FIELD")),
        features_json=_resealed_for_schema(limit, SCHEMA, message_index=1),
        edit=features_schema,
    )
    add(
        "account-key-sealed-for-evaluate-event",
        "Account state under a data key sealed for EvaluateEvent, sent to AdjustLimit.",
        _invalid((f"{ACCOUNT_PATH}.data_key", "DECRYPTION_FAILED")),
        method=EVALUATE_EVENT,
    )
    add(
        "malformed-money-value",
        "Field 0 decrypts to a money_value whose Money is cut short (a minor_units tag "
        "without its varint).",
        _invalid((f"{ACCOUNT_PATH}.fields[0].ciphertext", "MALFORMED_VALUE")),
        features_json=_resealed_plaintexts(limit, {0: b"\x22\x01\x10"}, message_index=1),
    )
    event = base["evaluate-event-sealed-figures"]
    add_event = _adder(out, event)
    add_event(
        "event-figures-in-another-request",
        "An event's sealed figures sent again under another request id.",
        undecryptable(EVENT_PATH, *range(len(event["messages"][0]["fields"]))),
        request_id="event-9999",
    )

    def rename_days(body: dict[str, Any]) -> None:
        body["fields"][1]["name"] = "account_age_days"

    add_event(
        "event-figure-renamed",
        "The days past due sent under another name.",
        undecryptable(EVENT_PATH, 1),
        edit=rename_days,
    )


def _resealed(
    case: dict[str, Any],
    sealed_key: SealedKey | None = None,
    *,
    schema_for_aad: str | None = None,
    plaintexts: Mapping[int, bytes] | None = None,
    message_index: int = 0,
) -> dict[str, Any]:
    """A case's message (the score case's, unless told) with some of its parts sealed
    differently."""
    message = case["messages"][message_index]
    data_key = bytes.fromhex(case["data_key"]["grant"]["data_key"])
    sealed = case["data_key"] if sealed_key is None else sealed_key.to_json()
    body = _features_json(sealed, message)
    subject = message["subject"]
    for index, field in enumerate(message["fields"]):
        plaintext = (plaintexts or {}).get(index)
        if schema_for_aad is None and plaintext is None:
            continue
        aad = field_aad(
            schema_for_aad or message["schema_version"], message["request_id"],
            subject["tenant"], subject["pseudonym"], field["name"],
        )  # fmt: skip
        nonce = bytes.fromhex(field["nonce"])
        pt = bytes.fromhex(field["plaintext"]) if plaintext is None else plaintext
        body["fields"][index]["ciphertext"] = _hex(AESGCM(data_key).encrypt(nonce, pt, aad))
    return body


def _resealed_for_schema(
    case: dict[str, Any], schema: str, *, message_index: int = 0
) -> dict[str, Any]:
    return _resealed(case, schema_for_aad=schema, message_index=message_index)


def _resealed_plaintexts(
    case: dict[str, Any], plaintexts: Mapping[int, bytes], *, message_index: int = 0
) -> dict[str, Any]:
    return _resealed(case, plaintexts=plaintexts, message_index=message_index)


def _resealed_with_grant(
    case: dict[str, Any],
    name: str,
    *,
    max_age_ms: int = DEFAULT_MAX_AGE_MS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Any]:
    data_key = bytes.fromhex(case["data_key"]["grant"]["data_key"])
    sealed = _sealed(
        name,
        data_key=data_key,
        max_age_ms=max_age_ms,
        max_requests=max_requests,
        max_bytes=max_bytes,
    )
    return _resealed(case, sealed)


def _resealed_with_plaintext(
    case: dict[str, Any], name: str, plaintext: bytes, *, info: bytes | None = None
) -> dict[str, Any]:
    data_key = bytes.fromhex(case["data_key"]["grant"]["data_key"])
    return _resealed(case, _sealed(name, data_key=data_key, info=info, plaintext=plaintext))


# -- pseudonyms ----------------------------------------------------------------------------


def build_pseudonyms() -> dict[str, Any]:
    long_key = fixed("pseudonym-key/long-a") + fixed("pseudonym-key/long-b") + fixed("x", 16)
    rows: list[tuple[str, str, bytes, str, str]] = [
        ("ascii", "A tenant and an ASCII customer id.", PSEUDONYM_KEY, TENANT, "customer-0001"),
        ("other-id", "Another customer of the same tenant.", PSEUDONYM_KEY, TENANT,
         "customer-0002"),
        ("other-tenant", "The same customer id under another tenant: another pseudonym.",
         PSEUDONYM_KEY, "huabei-cn", "customer-0001"),
        ("boundary-a", "Tenant \"ab\", id \"c\": the length prefixes keep it apart from "
         "boundary-b.", PSEUDONYM_KEY, "ab", "c"),
        ("boundary-b", "Tenant \"a\", id \"bc\".", PSEUDONYM_KEY, "a", "bc"),
        ("unicode-nfc", "A non-ASCII id in NFC (U+00E9): UTF-8 as given, no normalisation.",
         PSEUDONYM_KEY, TENANT, "jos\u00e9-42"),
        ("unicode-nfd", "The same text in NFD (e + U+0301): a different pseudonym, since ids "
         "are not normalised.", PSEUDONYM_KEY, TENANT, "jose\u0301-42"),
        ("whitespace", "A leading space is part of the id.", PSEUDONYM_KEY, TENANT,
         " customer-0001"),
        ("long-key", "An 80-byte key (longer than SHA-256's block: HMAC hashes it first).",
         long_key, TENANT, "customer-0001"),
    ]  # fmt: skip
    cases = [
        {
            "name": name,
            "description": description,
            "key": _hex(key),
            "tenant": tenant,
            "customer_id": customer_id,
            "message": _hex(length_prefixed(PSEUDONYM_LABEL, tenant, customer_id)),
            "pseudonym": pseudonym(tenant, customer_id, key),
        }
        for name, description, key, tenant, customer_id in rows
    ]
    return {
        "description": (
            "privscore pseudonyms (docs/envelope.md): HMAC-SHA256 keyed with the caller's "
            "pseudonymisation key over `message` = label, then tenant and customer id each as a "
            "4-byte big-endian length and UTF-8; the pseudonym is the MAC in lowercase hex. "
            "Bytes are lowercase hex. `invalid` inputs must be refused by the caller's SDK."
        ),
        "label": PSEUDONYM_LABEL.hex(),
        "cases": cases,
        "invalid": [
            {
                "name": "short-key",
                "description": "A 31-byte key: keys are at least 32 bytes.",
                "key": _hex(fixed("short", 31)),
                "tenant": TENANT,
                "customer_id": "customer-0001",
            },
            {
                "name": "empty-customer-id",
                "description": "An empty customer id.",
                "key": _hex(PSEUDONYM_KEY),
                "tenant": TENANT,
                "customer_id": "",
            },
        ],
    }


# -- checks against the code, and writing ---------------------------------------------------


def check_against_code(envelope: dict[str, Any], pseudonyms: dict[str, Any]) -> None:
    """Refuse to write vectors the code would not produce or open."""
    from privscore.client import envelope as envelope_constants
    from privscore.v1 import common_pb2
    from service.privacy import sealing
    from service.privacy.pseudonym import Pseudonymiser

    private = x25519.X25519PrivateKey.from_private_bytes(
        bytes.fromhex(envelope["server_key"]["private_key"])
    )
    for case in envelope["cases"]:
        sealed = case["data_key"]
        assert bytes.fromhex(sealed["info"]) == sealing.hpke_info(case["method"], case["identity"])
        grant = sealed["grant"]
        assert bytes.fromhex(sealed["grant_plaintext"]) == sealing.GRANT.pack(
            bytes.fromhex(grant["data_key"]), grant["made_at_ms"], grant["max_age_ms"],
            grant["max_requests"], grant["max_bytes"],
        )  # fmt: skip
        opened = sealing.SUITE.decrypt(
            bytes.fromhex(sealed["encapsulated_key"] + sealed["sealed_key"]),
            private,
            info=bytes.fromhex(sealed["info"]),
        )
        assert opened == bytes.fromhex(sealed["grant_plaintext"])
        for message in case["messages"]:
            subject = common_pb2.SubjectRef(**message["subject"])
            prefix = sealing.field_aad_prefix(
                message["schema_version"], message["request_id"], subject
            )
            for field in message["fields"]:
                assert bytes.fromhex(field["aad"]) == sealing.field_aad(prefix, field["name"])
                value = _typed_input(field["value"])
                plaintext = bytes.fromhex(field["plaintext"])
                assert plaintext == sealing.encode_value(value)
                assert sealing.decode_value(plaintext) == value
    # The sealed account state and event figures use the names and versions the SDK seals.
    assert (ACCOUNT_SCHEMA, EVENT_SCHEMA) == (
        envelope_constants.ACCOUNT_SCHEMA_VERSION,
        envelope_constants.EVENT_SCHEMA_VERSION,
    )
    account_names = [name for name, _, _ in ACCOUNT_FIELDS]
    assert account_names == [
        *envelope_constants.ACCOUNT_MONEY_FIELDS,
        *envelope_constants.ACCOUNT_COUNT_FIELDS,
    ]
    assert [name for name, _, _ in EVENT_FIELDS] == [
        *envelope_constants.EVENT_MONEY_FIELDS["missed_payment"],
        *envelope_constants.EVENT_COUNT_FIELDS["missed_payment"],
        envelope_constants.EVENT_BALANCE_FIELD,
    ]
    for row in pseudonyms["cases"]:
        pseudonymiser = Pseudonymiser(bytes.fromhex(row["key"]))
        assert pseudonymiser.pseudonym(row["tenant"], row["customer_id"]) == row["pseudonym"]


def _typed_input(typed: Mapping[str, Any]) -> Any:
    """A vector's typed value as the SDK takes it (a money value as its `Money`)."""
    from privscore.client.envelope import Money

    ((kind, value),) = typed.items()
    if kind == "money_value":
        return Money(value["currency_code"], int(value["minor_units"]))
    return value


def check_rfc9180_known_answer() -> None:
    """This HPKE sender reproduces RFC 9180 appendix A.1.1 (X25519, HKDF-SHA256, AES-128-GCM,
    base mode; sequence 0), whose key schedule ours shares but for the AEAD id and key size."""
    skr, pkr = derive_key_pair(
        RFC9180_A1_SUITE,
        bytes.fromhex("6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037"),
    )
    assert pkr.hex() == "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d"
    assert skr.hex() == "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8"
    enc, ct = hpke_seal(
        RFC9180_A1_SUITE,
        pkr,
        bytes.fromhex("4f6465206f6e2061204772656369616e2055726e"),
        bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479"),
        bytes.fromhex("7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234"),
        aad=bytes.fromhex("436f756e742d30"),
    )
    assert enc.hex() == "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431"
    assert ct.hex() == (
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
    )


def render(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """File name -> content of every vector file, checked against the code."""
    check_rfc9180_known_answer()
    envelope, pseudonyms = build_envelope(), build_pseudonyms()
    check_against_code(envelope, pseudonyms)
    return {ENVELOPE_FILE: render(envelope), PSEUDONYM_FILE: render(pseudonyms)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VECTORS_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in build().items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
