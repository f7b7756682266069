"""Hostile input against a real server over mutual TLS on loopback.

Every field of every request wrong in every way (empty, huge, NaN and infinities, negative
money, unknown enum values, wrong types and raw bytes sealed correctly inside ciphertexts,
duplicated and unknown wire fields, oversized batches and messages, expired deadlines; account
state and event figures in clear, or sealed for another request, subject, field, method or
schema): each call gets its documented gRPC code and never INTERNAL or UNKNOWN, errors name
fields and never echo values, and afterwards the server still answers a valid Score exactly as
before. Account state and event figures are sealed as the SDK seals them
(privscore/client/figures.py), from the clear messages the strategies draw. Then a
concurrent burst of malformed and valid calls, after which every valid answer is right, the
audit log verifies, and no planted canary appears anywhere the server wrote.

The oracles restate the contract from the .proto comments and the README; they do not call the
server's own validation code. Hypothesis runs derandomized with a bounded number of examples and
no shrinking, so CI is deterministic and bounded in time.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import string
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from privscore.client.envelope import (
    ACCOUNT_SCHEMA_VERSION,
    EVENT_BALANCE_FIELD,
    EVENT_COUNT_FIELDS,
    EVENT_MONEY_FIELDS,
    Money,
)
from privscore.client.figures import account_figures, event_figures, seal_account, seal_event
from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    audit_service_pb2,
    audit_service_pb2_grpc,
    common_pb2,
    limit_service_pb2,
    limit_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)
from service.audit import iter_records, latest_checkpoint, verify_log
from service.config import DEFAULT_POLICY, DataLayout
from service.decisions.policy import load_policy
from service.model.schema import FeatureSpec
from service.privacy.pseudonym import Pseudonymiser
from service.privacy.sealing import (
    DataKey,
    FeatureInput,
    ServerPublicKey,
    encode_value,
    load_public_keyset,
)
from service.security.certs import client_identity
from tests.conftest import REPO_ROOT, ServerProcess, applicants, audit_log_key, served_manifest

TENANT = "baitiao-cn"
SCORE = "/privscore.v1.ScoringService/Score"
SCORE_BATCH = "/privscore.v1.ScoringService/ScoreBatch"
ADJUST_LIMIT = "/privscore.v1.LimitService/AdjustLimit"
EVALUATE_EVENT = "/privscore.v1.AlertService/EvaluateEvent"
WATCH_ALERTS = "/privscore.v1.AlertService/WatchAlerts"
UPDATE_ALERT_STATE = "/privscore.v1.AlertService/UpdateAlertState"
UNARY_METHODS = {
    SCORE: scoring_service_pb2.ScoreRequest,
    SCORE_BATCH: scoring_service_pb2.ScoreBatchRequest,
    ADJUST_LIMIT: limit_service_pb2.AdjustLimitRequest,
    EVALUATE_EVENT: alert_service_pb2.EvaluateEventRequest,
    UPDATE_ALERT_STATE: alert_service_pb2.UpdateAlertStateRequest,
}
REQUEST_ID_HEADER = "x-request-id"
T = TypeVar("T")

# The contract, restated from the .proto comments and the README.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TENANT_SHAPE = re.compile(r"[a-z][a-z0-9-]{0,62}")
PSEUDONYM = re.compile(r"[0-9a-f]{64}")
SCHEMA_VERSION = re.compile(r"[A-Za-z0-9._:-]{1,128}")
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DECISION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CURRENCY = re.compile(r"[A-Z]{3}")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the documented default maximum request size
MAX_BATCH_ITEMS = 256
MAX_FIELDS = 64
AES_GCM_TAG = 16
MAX_CIPHERTEXT = 1024
MAX_DAYS = 36500
MAX_REPAYMENTS_IN_ROW = 1_000_000
REASON_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
LATEST_SCORE_RANGE = (0, 2000)
TIMESTAMP_SECONDS = (-62135596800, 253402300799)  # 0001-01-01 .. 9999-12-31
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
SUPPORTED_CURRENCIES = frozenset(load_policy(DEFAULT_POLICY).limits.ceilings)
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Codes the service itself answers with a google.rpc.Status carrying an ErrorInfo.
SERVICE_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
)

SPECS: tuple[FeatureSpec, ...] = served_manifest().schema.model_features
NAMES = tuple(spec.name for spec in SPECS)
EXCLUDED_NAMES = tuple(spec.name for spec in served_manifest().schema.excluded_features)
APPLICANTS = 8  # the first few data-set applicants are enough to vary the valid calls
# Text errors may quote: the schema's names, ranges and categories.
SCHEMA_TEXT = json.dumps(served_manifest().schema.to_dict(), ensure_ascii=False)


def bounded(max_examples: int) -> settings:
    """Deterministic and bounded: fixed examples, no example database, no shrinking."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=(
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ),
    )


# -- calling the server and reading what comes back ------------------------------------------


@dataclass
class Outcome:
    """One call's result as the caller sees it."""

    code: grpc.StatusCode
    response: Any = None
    violations: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    has_status: bool = False
    text: str = ""  # everything the caller can read of an error, for echo checks
    reasons: dict[str, str] = field(default_factory=dict)  # field -> violation reason


def read_status(status: status_pb2.Status) -> tuple[dict[str, str], str, str]:
    """(field -> description, ErrorInfo reason, readable text) of a google.rpc.Status."""
    found: dict[str, str] = {}
    reason = ""
    parts = [status.message]
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                found[violation.field] = violation.description
                parts += [violation.field, violation.description, violation.reason]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "privscore.v1"
            reason = info.reason
            parts += [info.reason, *info.metadata.values()]
    return found, reason, "\n".join(parts)


def outcome_of(error: grpc.RpcError) -> Outcome:
    code = error.code()
    outcome = Outcome(code, text=f"{error.details()}\n{error.trailing_metadata()}")
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        found, reason, text = read_status(status)
        outcome.violations, outcome.reason, outcome.has_status = found, reason, True
        outcome.text += "\n" + text
        outcome.reasons = violation_reasons(status)
    return outcome


def violation_reasons(status: status_pb2.Status) -> dict[str, str]:
    """Field -> FieldViolation.reason (INVALID_FIELD, REQUIRED_FIELD, SEAL_REQUIRED, ...)."""
    reasons: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            reasons |= {v.field: v.reason for v in bad_request.field_violations}
    return reasons


def invoke(
    method: Callable[..., Any], request: Any, request_id: str, timeout: float = 10.0
) -> Outcome:
    """Call with our own x-request-id header, so the server's log line can be found."""
    try:
        response = method(request, timeout=timeout, metadata=((REQUEST_ID_HEADER, request_id),))
    except grpc.RpcError as error:
        return outcome_of(error)
    return Outcome(grpc.StatusCode.OK, response)


def raw_method(
    channel: grpc.Channel, method: str, deserializer: Callable[[bytes], Any] | None = None
) -> Callable[..., Any]:
    """A unary method that sends bytes as they are (and parses the reply if asked)."""
    return channel.unary_unary(method, None, deserializer)


def check_documented(outcome: Outcome) -> None:
    """Never INTERNAL or UNKNOWN; a refusal by the service itself is a full AIP-193 status."""
    assert outcome.code not in NEVER, outcome.text
    if outcome.code in SERVICE_CODES:
        assert outcome.has_status and outcome.reason, outcome.text
        assert "Traceback" not in outcome.text
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.violations and all(outcome.violations.values()), outcome.text


def new_id(prefix: str = "h") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class LogTail:
    """The server's log lines from the moment this tail was made."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.start = len(server.lines)
        self._seen = self.start
        self._finished: dict[str, dict[str, Any]] = {}

    def text(self) -> str:
        return "".join(self.server.lines[self.start :])

    def records(self) -> Iterator[dict[str, Any]]:
        for line in self.server.lines[self.start :]:
            if line.startswith("{"):
                yield json.loads(line)

    def finished(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The call's canonical `rpc.finished` line, which is written just after its reply."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.server.lines
            for line in lines[self._seen :]:
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("event") == "rpc.finished":
                        self._finished[record.get("request_id", "")] = record
            self._seen = len(lines)
            if request_id in self._finished:
                return self._finished[request_id]
            if time.monotonic() > deadline:
                raise AssertionError(f"no rpc.finished line for {request_id}")
            time.sleep(0.005)


def check_logged(tail: LogTail, request_id: str, outcome: Outcome) -> None:
    """The server's canonical line agrees with what the caller saw."""
    assert tail.finished(request_id)["code"] == outcome.code.name


def check_not_echoed(value: str, outcome: Outcome, tail: LogTail) -> None:
    """A refused value appears neither in the error nor in the server's log lines."""
    if len(value) < 8:
        return  # too short to tell an echo from ordinary text
    logs = tail.text()
    assert value not in outcome.text
    assert value not in logs and json.dumps(value)[1:-1] not in logs


def check_no_unexpected_errors(tail: LogTail) -> None:
    for record in tail.records():
        assert record.get("event") != "rpc.unexpected_error", record
        if record.get("event") == "rpc.finished":
            assert record.get("code") not in ("INTERNAL", "UNKNOWN"), record


# -- sealing as a caller does, with every input open to change --------------------------------


@dataclass(frozen=True)
class Caller:
    """A caller's keys for one server: its public field key and the dev pseudonymisation key."""

    server_key: ServerPublicKey
    pseudonymiser: Pseudonymiser
    schema_version: str

    @classmethod
    def of(cls, server: ServerProcess) -> Caller:
        layout = DataLayout(server.data_dir)
        return cls(
            load_public_keyset(layout.public_keyset),
            Pseudonymiser.from_file(layout.pseudonym_key),
            served_manifest().schema_version,
        )

    def subject(self, customer: str, tenant: str = TENANT) -> common_pb2.SubjectRef:
        return common_pb2.SubjectRef(
            tenant=tenant, pseudonym=self.pseudonymiser.pseudonym(tenant, customer)
        )

    def data_key(self, method: str) -> DataKey:
        """A data key sealed as the SDK seals it, by the dev identity the tests call as."""
        return DataKey(self.server_key, method, identity=client_identity("dev"))


def typed(values: Mapping[str, FeatureInput]) -> list[tuple[str, bytes]]:
    return [(name, encode_value(value)) for name, value in values.items()]


def applicant(index: int) -> dict[str, FeatureInput]:
    return dict(applicants()[index % APPLICANTS])


def score_request(
    caller: Caller,
    request_id: str,
    subject: common_pb2.SubjectRef,
    plaintexts: Sequence[tuple[str, bytes]],
    schema_version: str | None = None,
) -> scoring_service_pb2.ScoreRequest:
    version = caller.schema_version if schema_version is None else schema_version
    return scoring_service_pb2.ScoreRequest(
        request_id=request_id,
        subject=subject,
        features=caller.data_key(SCORE).seal_encoded(
            version, subject, plaintexts, request_id=request_id
        ),
    )


def valid_score_request(caller: Caller, index: int = 0) -> scoring_service_pb2.ScoreRequest:
    request_id = new_id("valid")
    return score_request(caller, request_id, caller.subject(request_id), typed(applicant(index)))


_reference: dict[tuple[str, int], scoring_service_pb2.CreditScore] = {}
_reference_lock = threading.Lock()


def reference(server: ServerProcess, index: int) -> scoring_service_pb2.CreditScore:
    """Applicant `index`'s score from a plain sequential SDK call (scores depend on features
    only, not on the subject)."""
    key = (str(server.data_dir), index % APPLICANTS)
    with _reference_lock:
        if key not in _reference:
            with server.channel() as channel:
                response = server.client(channel).score(TENANT, "reference", applicant(index))
            _reference[key] = response.score
        return _reference[key]


def check_score(server: ServerProcess, score: scoring_service_pb2.CreditScore, index: int) -> None:
    expected = reference(server, index)
    assert score.score == expected.score
    assert score.probability_of_default == pytest.approx(expected.probability_of_default, abs=1e-9)
    assert score.decision == expected.decision and score.grade == expected.grade
    assert [r.code for r in score.reasons] == [r.code for r in expected.reasons]


def check_still_serving(server: ServerProcess, tail: LogTail) -> None:
    """After a run of hostile examples: alive, SERVING, a valid Score answered as before, and
    no call of the run ended INTERNAL or UNKNOWN."""
    assert server.process.poll() is None, "the server died"
    caller = Caller.of(server)
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for index in (0, 1):
            response = scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(
                valid_score_request(caller, index), timeout=10
            )
            check_score(server, response.score, index)
    check_no_unexpected_errors(tail)


# -- strategies -------------------------------------------------------------------------------

ID_CHARS = string.ascii_letters + string.digits + "._:-"
EDGE_STRINGS = (
    "",
    " ",
    "\x00",
    "\n",
    "a\n",
    "\t-\t",
    "\u202e\u0000\ufeff",
    "\U0001f4a5" * 3,
    "../../../../etc/passwd",
    "%s%s%n%x",
    "' OR 1=1 --",
    "${jndi:ldap://x}",
    "A" * 65,
    "a" * 129,
    "0" * 63,
    "0" * 65,
    "F" * 64,
    "-",
    "1abc",
)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=ID_CHARS, max_size=140),
    st.text(alphabet=string.printable, max_size=80),
    st.builds(
        lambda char, n: char * n, st.sampled_from("xZ9-\u00e9\x00"), st.integers(65, 200_000)
    ),
    st.sampled_from(EDGE_STRINGS),
)


def regex(pattern: re.Pattern[str]) -> st.SearchStrategy[str]:
    return st.from_regex(pattern.pattern, fullmatch=True)


# Plaintexts of one feature value: every type, every number, every broken encoding.
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [math.nan, math.inf, -math.inf, -0.0, -1.0, 0.5, 1e308, -1e308, 5e-324, 2.0**53 + 1]
    ),
    st.integers(-1000, 1_100_000).map(float),
)


def value_message(**kind: Any) -> bytes:
    return common_pb2.FeatureValue(**kind).SerializeToString()


def varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


FEATURE_VALUES = st.one_of(
    NUMBERS.map(lambda x: value_message(number_value=x)),
    st.text(max_size=60).map(lambda s: value_message(string_value=s)),
    st.sampled_from([c for spec in SPECS for c in spec.categories or ()]).map(
        lambda s: value_message(string_value=s)
    ),
    st.booleans().map(lambda b: value_message(bool_value=b)),
)
PLAINTEXTS = st.one_of(
    FEATURE_VALUES,
    st.just(b""),  # an empty FeatureValue: no kind set (and a tag-only ciphertext)
    st.binary(max_size=48),  # random bytes: decrypts, then fails to parse (or parses oddly)
    st.lists(FEATURE_VALUES, min_size=2, max_size=3).map(b"".join),  # the oneof set repeatedly
    st.tuples(FEATURE_VALUES, st.integers(4, 2**29 - 1), st.binary(max_size=16)).map(
        lambda t: t[0] + wire_field(t[1], t[2])  # a value plus an unknown field
    ),
    st.integers(1000, 1100).map(lambda n: value_message(string_value="y" * n)),  # too long
    st.sampled_from([b"\x09\x00", b"\x12\x05ab", b"\x12\x02\xff\xfe", b"\x18", b"\x00\x00"]),
)


def size_ok(plaintext: bytes) -> bool:
    """Whether the ciphertext of `plaintext` has an acceptable size (a tag-only one does not)."""
    return 0 < len(plaintext) <= MAX_CIPHERTEXT - AES_GCM_TAG


def judge_size(broken: Sequence[tuple[int, bytes]], path: str) -> bool:
    """Whether the field that `path` names has a ciphertext of acceptable size."""
    index = int(path.split("[", 1)[1].split("]", 1)[0])
    return all(size_ok(plaintext) for i, plaintext in broken if i == index)


def judge_plaintext(spec: FeatureSpec, plaintext: bytes) -> tuple[str | None, Any]:
    """(violation path suffix or None when valid, decoded value) for one sealed plaintext.

    ".ciphertext": wrong size, not a FeatureValue with exactly one kind, or not finite.
    "": a typed value the feature schema refuses (type, integer, range, category).
    """
    if not size_ok(plaintext):
        return ".ciphertext", None
    message = common_pb2.FeatureValue()
    try:
        message.ParseFromString(plaintext)
    except DecodeError:
        return ".ciphertext", None
    kind = message.WhichOneof("kind")
    if kind is None:
        return ".ciphertext", None
    value = getattr(message, kind)
    if kind == "number_value" and not math.isfinite(value):
        return ".ciphertext", None
    if spec.is_numeric:
        ok = (
            kind == "number_value"
            and (not spec.integer or float(value).is_integer())
            and (spec.min is None or value >= spec.min)
            and (spec.max is None or value <= spec.max)
        )
    else:
        ok = kind == "string_value" and value in (spec.categories or ())
    return (None if ok else ""), value


# -- envelope strings: ids, subject, schema version, key ids, field names ----------------------

TARGETS = ("request_id", "tenant", "pseudonym", "schema_version", "key_id", "field_name")
VALID_TEXT = {
    "request_id": regex(REQUEST_ID),
    "tenant": regex(TENANT_SHAPE),
    "pseudonym": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    "schema_version": regex(SCHEMA_VERSION),
    "key_id": regex(KEY_ID),
    "field_name": st.one_of(regex(FEATURE_NAME), st.sampled_from(NAMES + EXCLUDED_NAMES)),
}


def expect_envelope(
    caller: Caller, target: str, value: str, index: int
) -> tuple[grpc.StatusCode, set[str] | str | None]:
    """(code, violated fields or ErrorInfo reason) for one field of a Score set to `value`."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    simple = {
        "request_id": (REQUEST_ID, "request_id"),
        "tenant": (TENANT_SHAPE, "subject.tenant"),
        "pseudonym": (PSEUDONYM, "subject.pseudonym"),
    }
    if target in simple:
        pattern, path = simple[target]
        return (grpc.StatusCode.OK, None) if pattern.fullmatch(value) else (invalid, {path})
    if target == "schema_version":
        if not SCHEMA_VERSION.fullmatch(value):
            return invalid, {"features.schema_version"}
        if value == caller.schema_version:
            return grpc.StatusCode.OK, None
        return grpc.StatusCode.FAILED_PRECONDITION, "SCHEMA_VERSION_MISMATCH"
    if target == "key_id":
        if not KEY_ID.fullmatch(value):
            return invalid, {"features.data_key.key_id"}
        if value == caller.server_key.key_id:
            return grpc.StatusCode.OK, None
        return grpc.StatusCode.FAILED_PRECONDITION, "KEY_UNKNOWN"
    # field_name: the field at `index` travels under another name.
    if not FEATURE_NAME.fullmatch(value):
        return invalid, {f"features.fields[{index}].name"}
    if value == NAMES[index]:
        return grpc.StatusCode.OK, None
    if value in NAMES:
        return invalid, {f"features.fields[{max(index, NAMES.index(value))}].name"}
    # An unknown or excluded feature at `index`, and the real one missing.
    return invalid, {f"features.fields[{index}]", "features.fields"}


def test_every_envelope_string_gets_its_documented_code(shared_server: ServerProcess) -> None:
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)

        @bounded(60)
        @given(
            st.sampled_from(TARGETS).flatmap(
                lambda t: st.tuples(st.just(t), st.one_of(HOSTILE_TEXT, VALID_TEXT[t]))
            ),
            st.integers(0, len(NAMES) - 1),
        )
        def examples(target_value: tuple[str, str], index: int) -> None:
            target, value = target_value
            request_id = value if target == "request_id" else new_id("env")
            subject = caller.subject(new_id("customer"))
            if target == "tenant":
                subject.tenant = value
            elif target == "pseudonym":
                subject.pseudonym = value
            plaintexts = typed(applicant(index))
            if target == "field_name":
                plaintexts[index] = (value, plaintexts[index][1])
            version = value if target == "schema_version" else None
            request = score_request(caller, request_id, subject, plaintexts, version)
            if target == "key_id":
                request.features.data_key.key_id = value
                for encrypted in request.features.fields:
                    encrypted.key_id = value
            header = new_id("env")
            outcome = invoke(stub.Score, request, header)
            check_documented(outcome)
            code, detail = expect_envelope(caller, target, value, index)
            assert outcome.code == code, (target, outcome.text)
            if isinstance(detail, set):
                assert set(outcome.violations) == detail
            elif isinstance(detail, str):
                assert outcome.reason == detail
            else:
                check_score(shared_server, outcome.response.score, index)
            check_logged(tail, header, outcome)
            if code != grpc.StatusCode.OK and target != "key_id":  # a key id is named on purpose
                check_not_echoed(value, outcome, tail)

        examples()
    check_still_serving(shared_server, tail)


# -- values sealed correctly, so the server decrypts them and must refuse them ---------------


def test_every_sealed_value_is_judged_by_the_schema(shared_server: ServerProcess) -> None:
    """NaN, infinities, negatives, huge and fractional numbers, strings where numbers belong,
    booleans, empty FeatureValues, random bytes, repeated oneof members and unknown fields,
    sealed correctly: each broken field is named (all at once), a valid one decides exactly as
    the typed value would, and no value is echoed."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        client = shared_server.client(channel)

        @bounded(60)
        @given(
            st.lists(
                st.tuples(st.integers(0, len(SPECS) - 1), PLAINTEXTS),
                min_size=1,
                max_size=4,
                unique_by=lambda t: t[0],
            ),
            st.integers(0, APPLICANTS - 1),
        )
        def examples(broken: list[tuple[int, bytes]], which: int) -> None:
            plaintexts = typed(applicant(which))
            expected: set[str] = set()
            decoded = applicant(which)
            for index, plaintext in broken:
                plaintexts[index] = (NAMES[index], plaintext)
                suffix, value = judge_plaintext(SPECS[index], plaintext)
                if suffix is None:
                    decoded[NAMES[index]] = value
                else:
                    expected.add(f"features.fields[{index}]{suffix}")
            # Three stages, each reporting all of its refusals at once and stopping the call:
            # sizes (before decryption), then values that do not open as finite typed values,
            # then what the feature schema refuses.
            sizes = {path for path in expected if not judge_size(broken, path)}
            opening = {path for path in expected if path.endswith(".ciphertext")}
            expected = sizes or opening or expected
            request_id = new_id("val")
            request = score_request(caller, request_id, caller.subject(request_id), plaintexts)
            header = new_id("val")
            outcome = invoke(stub.Score, request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            if not expected:
                assert outcome.code == grpc.StatusCode.OK, outcome.text
                typed_score = client.score(TENANT, "typed", decoded).score
                assert outcome.response.score.score == typed_score.score
                assert outcome.response.score.probability_of_default == pytest.approx(
                    typed_score.probability_of_default, abs=1e-9
                )
                return
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.text
            assert set(outcome.violations) == expected
            for path, description in outcome.violations.items():
                index = int(path.split("[", 1)[1].split("]", 1)[0])
                if path not in sizes:  # a size refusal names the field by its path only
                    assert NAMES[index] in description
            for _, plaintext in broken:
                message = common_pb2.FeatureValue()
                try:
                    message.ParseFromString(plaintext)
                except DecodeError:
                    continue
                if message.WhichOneof("kind") == "string_value":
                    text = message.string_value
                    if text not in SCHEMA_TEXT:
                        check_not_echoed(text, outcome, tail)
                elif message.WhichOneof("kind") == "number_value":
                    check_not_echoed(repr(message.number_value), outcome, tail)

        examples()
    check_still_serving(shared_server, tail)


# -- batches: every item on its own, envelopes of every size ----------------------------------

ITEM_KINDS = (
    "valid",
    "bad_pseudonym",
    "nan",
    "unknown_category",
    "no_features",
    "empty_item",
    "foreign_data_key",
    "other_request",
    "unknown_key_id",
    "tampered",
)
CREDIT_AMOUNT = NAMES.index("credit_amount")
PURPOSE = NAMES.index("purpose")


def batch_item(
    caller: Caller, data_key: DataKey, request_id: str, kind: str, which: int
) -> tuple[scoring_service_pb2.ScoreBatchItem, tuple[grpc.StatusCode, set[str] | str | None]]:
    """One item of `kind` and what its result must be (fields are relative to the item)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    subject = caller.subject(new_id("item"))
    values = applicant(which)
    if kind == "nan":
        values["credit_amount"] = math.nan
    if kind == "unknown_category":
        values["purpose"] = "a purpose no schema has"
    # A data key sealed for another method; fields sealed for another request.
    sealer = caller.data_key(SCORE) if kind == "foreign_data_key" else data_key
    sealed_for = "another-request" if kind == "other_request" else request_id
    item = scoring_service_pb2.ScoreBatchItem(
        subject=subject,
        features=sealer.seal_encoded(
            caller.schema_version, subject, typed(values), request_id=sealed_for
        ),
    )
    expected: tuple[grpc.StatusCode, set[str] | str | None] = (grpc.StatusCode.OK, None)
    if kind == "bad_pseudonym":
        item.subject.pseudonym = item.subject.pseudonym.upper()
        expected = (invalid, {"subject.pseudonym"})
    elif kind == "nan":
        expected = (invalid, {f"features.fields[{CREDIT_AMOUNT}].ciphertext"})
    elif kind == "unknown_category":
        expected = (invalid, {f"features.fields[{PURPOSE}]"})
    elif kind == "no_features":
        item.ClearField("features")
        expected = (invalid, {"features"})
    elif kind == "empty_item":
        item = scoring_service_pb2.ScoreBatchItem()
        expected = (invalid, {"subject", "features"})
    elif kind == "foreign_data_key":
        expected = (invalid, {"features.data_key"})
    elif kind == "other_request":
        expected = (invalid, {f"features.fields[{i}].ciphertext" for i in range(len(values))})
    elif kind == "unknown_key_id":
        item.features.data_key.key_id = "fk-19990101-00000000"
        for encrypted in item.features.fields:
            encrypted.key_id = "fk-19990101-00000000"
        expected = (grpc.StatusCode.FAILED_PRECONDITION, "KEY_UNKNOWN")
    elif kind == "tampered":
        flipped = bytearray(item.features.fields[0].ciphertext)
        flipped[-1] ^= 0x80
        item.features.fields[0].ciphertext = bytes(flipped)
        expected = (invalid, {"features.fields[0].ciphertext"})
    return item, expected


def test_batch_items_fail_on_their_own(shared_server: ServerProcess) -> None:
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)

        @bounded(30)
        @given(
            st.lists(
                st.tuples(st.sampled_from(ITEM_KINDS), st.integers(0, APPLICANTS - 1)),
                max_size=10,
            ),
            st.one_of(st.just(""), HOSTILE_TEXT, regex(REQUEST_ID)),
        )
        def examples(kinds: list[tuple[str, int]], request_id: str) -> None:
            request_id = request_id or new_id("batch")
            data_key = caller.data_key(SCORE_BATCH)
            built = [batch_item(caller, data_key, request_id, k, w) for k, w in kinds]
            request = scoring_service_pb2.ScoreBatchRequest(
                request_id=request_id, items=[item for item, _ in built]
            )
            header = new_id("batch")
            outcome = invoke(stub.ScoreBatch, request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            envelope = ({"request_id"} if not REQUEST_ID.fullmatch(request_id) else set()) | (
                {"items"} if not kinds else set()
            )
            if envelope:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
                assert set(outcome.violations) == envelope
                return
            assert outcome.code == grpc.StatusCode.OK, outcome.text
            results = list(outcome.response.results)
            assert [r.index for r in results] == list(range(len(kinds)))
            sequences = set()
            for result, (kind, which), (_, (code, detail)) in zip(
                results, kinds, built, strict=True
            ):
                if code == grpc.StatusCode.OK:
                    assert result.WhichOneof("outcome") == "decision", kind
                    check_score(shared_server, result.decision.score, which)
                    sequences.add(result.decision.metadata.audit_sequence)
                    continue
                assert result.WhichOneof("outcome") == "error", kind
                assert result.error.code == getattr(code_pb2, code.name)
                found, reason, _ = read_status(result.error)
                if isinstance(detail, set):
                    assert set(found) == detail, kind
                else:
                    assert reason == detail, kind
            assert len(sequences) == sum(code == grpc.StatusCode.OK for _, (code, _) in built)

        examples()
    check_still_serving(shared_server, tail)


def test_batch_size_limits(shared_server: ServerProcess) -> None:
    """Exactly 256 items decide; 257, and any number far beyond, are refused whole."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    request_id = new_id("full")
    data_key = caller.data_key(SCORE_BATCH)
    items = []
    for index in range(MAX_BATCH_ITEMS):
        subject = caller.subject(f"full-{index}")
        items.append(
            scoring_service_pb2.ScoreBatchItem(
                subject=subject,
                features=data_key.seal_encoded(
                    caller.schema_version, subject, typed(applicant(index)), request_id=request_id
                ),
            )
        )
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        full = invoke(
            stub.ScoreBatch,
            scoring_service_pb2.ScoreBatchRequest(request_id=request_id, items=items),
            new_id("full"),
            timeout=60,
        )
        assert full.code == grpc.StatusCode.OK, full.text
        assert len(full.response.results) == MAX_BATCH_ITEMS
        for index, result in enumerate(full.response.results):
            check_score(shared_server, result.decision.score, index)

        raw = raw_method(channel, SCORE_BATCH)

        @bounded(8)
        @given(st.integers(MAX_BATCH_ITEMS + 1, 1_000_000))
        def examples(size: int) -> None:
            # The envelope fails before any item is looked at: empty items (2 bytes) will do.
            payload = wire_field(1, new_id("big").encode()) + b"\x12\x00" * size
            outcome = invoke(raw, payload, new_id("big"), timeout=30)
            check_documented(outcome)
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            assert outcome.violations == {"items": f"must hold at most {MAX_BATCH_ITEMS} items"}

        examples()
        too_many = invoke(
            stub.ScoreBatch,
            scoring_service_pb2.ScoreBatchRequest(request_id=request_id, items=[*items, items[0]]),
            new_id("big"),
        )
        assert set(too_many.violations) == {"items"}
    check_still_serving(shared_server, tail)


# -- sizes: many fields, messages near and over the maximum ------------------------------------


def test_too_many_fields_is_refused_before_decryption(shared_server: ServerProcess) -> None:
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        extra_size = len(valid_score_request(caller).features.fields[0].SerializeToString()) + 3
        for count in (MAX_FIELDS + 1, 5_000, (MAX_MESSAGE_BYTES - 65536) // extra_size):
            request = valid_score_request(caller)
            extra = request.features.fields[0]
            request.features.fields.extend([extra] * (count - len(request.features.fields)))
            assert request.ByteSize() < MAX_MESSAGE_BYTES
            outcome = invoke(stub.Score, request, new_id("fields"))
            check_documented(outcome)
            assert outcome.violations == {
                "features.fields": f"must hold at most {MAX_FIELDS} fields"
            }
    check_still_serving(shared_server, tail)


def test_messages_near_and_over_the_maximum_size(shared_server: ServerProcess) -> None:
    """Up to 4 MiB the server parses and validates (and refuses a 4 MiB request id by name);
    over it the transport answers RESOURCE_EXHAUSTED before any handler runs."""
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        score = raw_method(channel, SCORE)
        batch = raw_method(channel, SCORE_BATCH)

        @bounded(10)
        @given(
            st.one_of(
                st.integers(MAX_MESSAGE_BYTES - 4096, MAX_MESSAGE_BYTES + 4096),
                st.integers(MAX_MESSAGE_BYTES // 2, 3 * MAX_MESSAGE_BYTES),
                st.sampled_from([MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1]),
            ),
            st.booleans(),
        )
        def examples(size: int, as_batch: bool) -> None:
            if as_batch:  # size bytes of empty batch items (2 bytes each)
                payload = wire_field(1, b"big-batch") + b"\x12\x00" * (size // 2)
                method = batch
            else:  # one request id of about size bytes
                payload = wire_field(1, b"r" * (size - 5))
                method = score
            outcome = invoke(method, payload, new_id("size"), timeout=30)
            check_documented(outcome)
            if len(payload) > MAX_MESSAGE_BYTES:
                assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            elif len(payload) <= MAX_MESSAGE_BYTES - 1024:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
                expected = "items" if as_batch else "request_id"
                assert expected in outcome.violations
                assert "rrrrrrrr" not in outcome.text

        examples()
    check_still_serving(shared_server, tail)


# -- wire encodings: duplicated fields, unknown fields, and bytes that are no message ----------


def wire_edit() -> st.SearchStrategy[tuple[str, int, bytes]]:
    """(where, field number, payload) of one extra length-delimited field."""
    subject_payload = st.builds(
        lambda t, p: common_pb2.SubjectRef(tenant=t, pseudonym=p).SerializeToString(),
        st.one_of(st.just(""), st.just(TENANT), HOSTILE_TEXT),
        st.one_of(st.just(""), VALID_TEXT["pseudonym"], HOSTILE_TEXT),
    )
    features_payload = st.one_of(
        st.builds(
            lambda v: common_pb2.EncryptedFeatures(schema_version=v).SerializeToString(),
            HOSTILE_TEXT,
        ),
        st.builds(
            lambda name: common_pb2.EncryptedFeatures(
                fields=[common_pb2.EncryptedField(name=name)]
            ).SerializeToString(),
            st.sampled_from(NAMES),
        ),
    )
    return st.one_of(
        st.tuples(
            st.sampled_from(["append", "prepend"]),
            st.just(1),
            st.one_of(regex(REQUEST_ID), HOSTILE_TEXT).map(lambda s: s.encode()),
        ),
        st.tuples(st.sampled_from(["append", "prepend"]), st.just(2), subject_payload),
        st.tuples(st.sampled_from(["append", "prepend"]), st.just(3), features_payload),
        st.tuples(
            st.sampled_from(["append", "prepend"]),
            st.just(4),  # offer_currency
            st.one_of(st.sampled_from(["", "CNY", "USD", "EUR", "cny"]), HOSTILE_TEXT).map(
                lambda s: s.encode()
            ),
        ),
        st.tuples(
            st.sampled_from(["append", "prepend"]),
            st.integers(UNKNOWN_FROM, 2**29 - 1).filter(lambda n: not 19000 <= n <= 19999),
            st.binary(max_size=64),
        ),
    )


# Field numbers ScoreRequest does not define: above its highest (from the descriptor).
UNKNOWN_FROM = max(f.number for f in scoring_service_pb2.ScoreRequest.DESCRIPTOR.fields) + 1


def test_duplicated_and_unknown_fields_are_answered_as_their_parse(
    shared_server: ServerProcess,
) -> None:
    """A field sent twice (the last wins, messages merge, repeated fields concatenate) or an
    unknown field: the server answers exactly as for the canonical encoding of the same parse."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        raw = raw_method(channel, SCORE, scoring_service_pb2.ScoreResponse.FromString)

        @bounded(40)
        @given(st.lists(wire_edit(), min_size=1, max_size=4), st.integers(0, APPLICANTS - 1))
        def examples(edits: list[tuple[str, int, bytes]], which: int) -> None:
            payload = valid_score_request(caller, which).SerializeToString()
            for where, number, data in edits:
                extra = wire_field(number, data)
                payload = payload + extra if where == "append" else extra + payload
            parsed = scoring_service_pb2.ScoreRequest.FromString(payload)
            parsed.DiscardUnknownFields()
            as_sent = invoke(raw, payload, new_id("wire"))
            canonical = invoke(raw, parsed.SerializeToString(), new_id("wire"))
            check_documented(as_sent)
            assert as_sent.code == canonical.code, (as_sent.text, canonical.text)
            assert set(as_sent.violations) == set(canonical.violations)
            assert as_sent.reason == canonical.reason
            if as_sent.code == grpc.StatusCode.OK:
                check_score(shared_server, as_sent.response.score, which)
                check_score(shared_server, canonical.response.score, which)

        examples()
    check_still_serving(shared_server, tail)


UNPARSEABLE = st.one_of(
    st.sampled_from(
        [
            b"\xff\xff\xff\xff",  # a tag varint that never ends
            b"\x0a\x05ab",  # a length beyond the end
            b"\x0a\x02\xff\xfe",  # a string field that is not UTF-8
            b"\x07",  # wire type 7 does not exist
            b"\x00\x01",  # field number 0
            b"\x12\x03\x0a\x01",  # a nested message cut short
        ]
    ),
    st.binary(min_size=1, max_size=256),
)


def parses(payload: bytes, message_type: type[Message]) -> bool:
    try:
        message_type.FromString(payload)
    except DecodeError:
        return False
    return True


def test_bytes_that_are_no_request_are_invalid_argument(shared_server: ServerProcess) -> None:
    """Bytes that do not parse as the method's request are a malformed request: the documented
    INVALID_ARGUMENT, not the UNKNOWN/INTERNAL a failed deserializer gives by default."""
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        methods: dict[str, Callable[..., Any]] = {
            name: raw_method(channel, name) for name in UNARY_METHODS
        }

        def watch(payload: bytes, **kwargs: Any) -> list[Any]:
            stream = channel.unary_stream(WATCH_ALERTS, None, None)
            return list(stream(payload, **kwargs))

        methods[WATCH_ALERTS] = watch
        types = {**UNARY_METHODS, WATCH_ALERTS: alert_service_pb2.WatchAlertsRequest}

        @bounded(30)
        @given(st.sampled_from(sorted(methods)), UNPARSEABLE)
        def examples(method: str, payload: bytes) -> None:
            if parses(payload, types[method]):
                return  # random bytes that happen to parse are covered elsewhere
            outcome = invoke(methods[method], payload, new_id("junk"), timeout=5)
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (method, outcome.text)
            check_documented(outcome)
            assert "DecodeError" not in outcome.text and "Error parsing" not in outcome.text

        examples()
    check_still_serving(shared_server, tail)


# -- deadlines ----------------------------------------------------------------------------------


def test_expired_and_extreme_deadlines(shared_server: ServerProcess) -> None:
    """An expired or sub-millisecond deadline ends DEADLINE_EXCEEDED (or, if the call was quick
    enough, a correct answer); an absurdly long one is cut by the server and still answers."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)

        @bounded(30)
        @given(
            st.one_of(
                st.just(0.0),
                st.floats(1e-9, 1e-6),
                st.floats(1e-6, 0.004),
                st.floats(1e4, 1e7),
            ),
            st.integers(0, APPLICANTS - 1),
        )
        def examples(timeout: float, which: int) -> None:
            outcome = invoke(stub.Score, valid_score_request(caller, which), new_id("dl"), timeout)
            check_documented(outcome)
            if timeout >= 1:
                assert outcome.code == grpc.StatusCode.OK, outcome.text
            else:
                assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
            if outcome.code == grpc.StatusCode.OK:
                check_score(shared_server, outcome.response.score, which)

        examples()
    time.sleep(0.5)  # let calls the client abandoned finish on the server before looking
    for record in tail.records():
        if record.get("event") == "rpc.finished" and str(record.get("request_id")).startswith(
            "dl-"
        ):
            assert record["code"] in ("OK", "DEADLINE_EXCEEDED", "CANCELLED"), record
    check_still_serving(shared_server, tail)


# -- AdjustLimit: money, counts and scores of every size and sign -----------------------------


def mostly(valid: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Valid four times in five, so that whole requests are often valid except for one field
    and the checks after validation (currency, decryption, the rules) are reached too."""
    return st.integers(0, 4).flatmap(lambda n: hostile if n == 0 else valid)


HOSTILE_CODES = st.one_of(
    st.sampled_from(["EUR", "XYZ", "", "cny", "CN", "CNYY", "C1Y", "\u00c7NY", " CNY"]),
    st.text(max_size=5),
)
HOSTILE_UNITS = st.one_of(
    st.integers(*INT64), st.sampled_from([INT64[0], -(10**12), -1, 0, INT64[1]])
)


def money_strategy(currency: str | None = None) -> st.SearchStrategy[common_pb2.Money | None]:
    """Money of `currency` (else a supported one), sometimes absent or broken."""
    valid_code = st.just(currency) if currency else st.sampled_from(sorted(SUPPORTED_CURRENCIES))
    money = st.builds(
        lambda c, u: common_pb2.Money(currency_code=c, minor_units=u),
        mostly(valid_code, HOSTILE_CODES),
        mostly(st.integers(1, 10_000_000_000), HOSTILE_UNITS),
    )
    return mostly(money, st.none())


def uint32s(valid_max: int = 1000) -> st.SearchStrategy[int]:
    return mostly(
        st.integers(0, valid_max),
        st.one_of(
            st.integers(0, UINT32_MAX), st.sampled_from([MAX_DAYS, MAX_DAYS + 1, UINT32_MAX])
        ),
    )


# The account figures' bounds, restated from the contract (limit_service.proto, envelope.md).
ACCOUNT_COUNT_BOUNDS = {
    "on_time_repayments_in_row": MAX_REPAYMENTS_IN_ROW,
    "days_past_due": MAX_DAYS,
    "account_age_days": MAX_DAYS,
}


def sealed_path(path: str, figures: Mapping[str, object], name: str) -> str:
    """Where a refusal of sealed figure `name` points: its position in the envelope, as the
    SDK orders the figures; a missing one is named by the envelope's `fields`."""
    names = list(figures)
    return f"{path}.fields[{names.index(name)}]" if name in names else f"{path}.fields"


def money_ok(money: common_pb2.Money | Money, *, allow_zero: bool) -> bool:
    units = money.minor_units
    return bool(CURRENCY.fullmatch(money.currency_code)) and (
        units > 0 or (allow_zero and units == 0)
    )


def expect_account(account: limit_service_pb2.AccountState) -> set[str]:
    """Violated fields of the account state sealed in `sealed_account` (stage 10 of the
    envelope: after it opened), restated from the contract."""
    figures = account_figures(account)
    bad: set[str] = set()
    codes = []
    for name, allow_zero in (("current_limit", False), ("balance", True)):
        present = account.HasField(name)  # type: ignore[arg-type]
        if not present or not money_ok(getattr(account, name), allow_zero=allow_zero):
            bad.add(sealed_path("sealed_account", figures, name))
        else:
            codes.append(getattr(account, name).currency_code)
    for name, high in ACCOUNT_COUNT_BOUNDS.items():
        if getattr(account, name) > high:
            bad.add(sealed_path("sealed_account", figures, name))
    if len(set(codes)) > 1:  # both valid, in two currencies: the balance is named
        bad.add(sealed_path("sealed_account", figures, "balance"))
    return bad


def limit_request(
    caller: Caller,
    request_id: str,
    subject: common_pb2.SubjectRef,
    account: limit_service_pb2.AccountState,
    *,
    key: DataKey | None = None,
    features: Mapping[str, FeatureInput] | None = None,
    latest_score: int | None = None,
) -> limit_service_pb2.AdjustLimitRequest:
    """An AdjustLimit as the SDK builds it: the account sealed, the features (if any) under the
    same data key."""
    key = key or caller.data_key(ADJUST_LIMIT)
    request = limit_service_pb2.AdjustLimitRequest(
        request_id=request_id,
        subject=subject,
        sealed_account=seal_account(key, subject, account, request_id=request_id),
    )
    if features is not None:
        request.features.CopyFrom(
            key.seal(caller.schema_version, subject, features, request_id=request_id)
        )
    elif latest_score is not None:
        request.latest_score = latest_score
    return request


def test_adjust_limit_money_and_counts(shared_server: ServerProcess) -> None:
    """Account figures of every size and sign, sealed: each refused figure is named by its
    position in `sealed_account`; a valid account decides (on a stated score, features scored
    in the call, or the recorded score this fresh subject does not have), replays under its
    request id, and a changed account under that id is refused."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = limit_service_pb2_grpc.LimitServiceStub(channel)

        @bounded(60)
        @given(
            mostly(
                st.sampled_from(sorted(SUPPORTED_CURRENCIES)), st.sampled_from(["EUR", "JPY"])
            ).flatmap(lambda code: st.tuples(money_strategy(code), money_strategy(code))),
            uint32s(),
            uint32s(),
            uint32s(),
            mostly(
                st.one_of(
                    st.integers(*LATEST_SCORE_RANGE),
                    st.sampled_from(["features", "features", "nan-features"]),
                ),
                st.one_of(st.none(), st.integers(*INT32), st.sampled_from([-1, 2001, INT32[0]])),
            ),
        )
        def examples(
            moneys: tuple[common_pb2.Money | None, common_pb2.Money | None],
            on_time: int,
            past_due: int,
            age: int,
            source: int | str | None,
        ) -> None:
            limit, balance = moneys
            request_id = new_id("lim")
            subject = caller.subject(request_id)
            account = limit_service_pb2.AccountState(
                on_time_repayments_in_row=on_time, days_past_due=past_due, account_age_days=age
            )
            if limit is not None:
                account.current_limit.CopyFrom(limit)
            if balance is not None:
                account.balance.CopyFrom(balance)
            key = caller.data_key(ADJUST_LIMIT)
            features = None
            if isinstance(source, str):
                features = applicant(0)
                if source == "nan-features":
                    features["credit_amount"] = math.nan
            request = limit_request(
                caller,
                request_id,
                subject,
                account,
                key=key,
                features=features,
                latest_score=source if isinstance(source, int) else None,
            )
            header = new_id("lim")
            outcome = invoke(stub.AdjustLimit, request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            low, high = LATEST_SCORE_RANGE
            # Stages, each stopping the call: the request's shape, the account once opened, the
            # features once opened, the policy's currencies, the score to decide on.
            if isinstance(source, int) and not low <= source <= high:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.text
                assert set(outcome.violations) == {"latest_score"}
                return
            bad = expect_account(account)
            if bad:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.text
                assert set(outcome.violations) == bad
                named = ("current_limit", "balance", *ACCOUNT_COUNT_BOUNDS)
                for path in bad:
                    assert any(name in outcome.violations[path] for name in named)
                for money in (limit, balance):
                    if money is not None and abs(money.minor_units) >= 10**12:
                        check_not_echoed(str(money.minor_units), outcome, tail)
                return
            if source == "nan-features":
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
                assert set(outcome.violations) == {f"features.fields[{CREDIT_AMOUNT}].ciphertext"}
                return
            if account.current_limit.currency_code not in SUPPORTED_CURRENCIES:
                assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION
                assert outcome.reason == "CURRENCY_NOT_SUPPORTED"
                return
            if source is None:  # a fresh subject: no Score decision recorded for it
                assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome.text
                assert outcome.reason == "NO_RECORDED_SCORE"
                return
            assert outcome.code == grpc.StatusCode.OK, outcome.text
            check_limit_decision(account, outcome.response)
            # Idempotent by request id: the same request replays, a different one is refused.
            again = invoke(stub.AdjustLimit, request, new_id("lim"))
            assert again.code == grpc.StatusCode.OK and again.response.replayed
            assert again.response.metadata == outcome.response.metadata
            assert again.response.new_limit == outcome.response.new_limit
            changed = limit_service_pb2.AccountState()
            changed.CopyFrom(account)
            changed.account_age_days = (age + 1) % MAX_DAYS
            reused = invoke(
                stub.AdjustLimit,
                limit_request(
                    caller,
                    request_id,
                    subject,
                    changed,
                    key=key,
                    features=features,
                    latest_score=source if isinstance(source, int) else None,
                ),
                new_id("lim"),
            )
            check_documented(reused)
            assert reused.code == grpc.StatusCode.FAILED_PRECONDITION
            assert reused.reason == "REQUEST_ID_REUSED"

        examples()
    check_still_serving(shared_server, tail)


def check_limit_decision(
    account: limit_service_pb2.AccountState, response: limit_service_pb2.AdjustLimitResponse
) -> None:
    """The documented shape of every limit decision, whatever the amounts."""
    current = account.current_limit.minor_units
    balance = account.balance.minor_units
    new = response.new_limit.minor_units
    assert response.previous_limit == account.current_limit
    assert response.new_limit.currency_code == account.current_limit.currency_code
    assert not response.replayed and response.rule and response.reasons
    action = response.action
    if action == limit_service_pb2.LIMIT_ACTION_FREEZE:
        assert new == balance
    elif action == limit_service_pb2.LIMIT_ACTION_DECREASE:
        assert balance <= new < current
    elif action == limit_service_pb2.LIMIT_ACTION_INCREASE:
        assert current < new <= current * 1.2
    else:
        assert action == limit_service_pb2.LIMIT_ACTION_HOLD and new == current


# -- EvaluateEvent and WatchAlerts: times, enums and amounts of every kind ---------------------

EVENT_KINDS = ("purchase", "repayment", "missed_payment", "login", "limit_change")
MONEY_FIELD = {
    "purchase": "amount",
    "repayment": "amount",
    "missed_payment": "amount_due",
    "limit_change": "new_limit",
}


@st.composite
def events(draw: st.DrawFn) -> alert_service_pb2.BehaviourEvent:
    event = alert_service_pb2.BehaviourEvent(event_id=draw(mostly(regex(REQUEST_ID), HOSTILE_TEXT)))
    if draw(st.integers(0, 9)):  # mostly present
        seconds = draw(
            mostly(
                st.one_of(
                    st.integers(1_700_000_000, 1_900_000_000),  # around now
                    st.integers(*TIMESTAMP_SECONDS),  # anywhere the contract allows
                    st.sampled_from([TIMESTAMP_SECONDS[0], TIMESTAMP_SECONDS[1], 0, -1]),
                    st.integers(0, 800 * 86400).map(lambda d: TIMESTAMP_SECONDS[0] + d),
                    st.integers(0, 800 * 86400).map(lambda d: TIMESTAMP_SECONDS[1] - d),
                ),
                st.one_of(
                    st.integers(*INT64),
                    st.sampled_from([TIMESTAMP_SECONDS[0] - 1, TIMESTAMP_SECONDS[1] + 1]),
                ),
            )
        )
        nanos = draw(
            mostly(
                st.integers(0, 999_999_999),
                st.one_of(st.integers(*INT32), st.sampled_from([10**9, -1])),
            )
        )
        event.occurred_at.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    if draw(st.integers(0, 3)) == 0:
        balance = draw(money_strategy())
        if balance is not None:
            event.balance_after.CopyFrom(balance)
    kind = draw(mostly(st.sampled_from(EVENT_KINDS), st.none()))
    if kind is None:
        return event
    details = getattr(event, kind)
    details.SetInParent()
    if kind in MONEY_FIELD:
        money = draw(money_strategy())
        if money is not None:
            getattr(details, MONEY_FIELD[kind]).CopyFrom(money)
    if kind == "repayment":
        details.outcome = draw(
            mostly(st.integers(1, 2), st.one_of(st.integers(*INT32), st.integers(-2, 5)))
        )
    if kind == "missed_payment":
        details.days_past_due = draw(uint32s(valid_max=120))
    if kind == "login":
        details.new_device = draw(st.booleans())
    return event


def expect_event(event: alert_service_pb2.BehaviourEvent) -> set[str]:
    """Violated fields of an event whose figures the SDK seals, restated from the contract:
    first the clear fields (and an envelope missing for a kind that has figures), then, once
    opened, the figures by their position in `event.sealed_figures`."""
    bad: set[str] = set()
    if not REQUEST_ID.fullmatch(event.event_id):
        bad.add("event.event_id")
    if not event.HasField("occurred_at"):
        bad.add("event.occurred_at")
    else:
        low, high = PLAUSIBLE_SECONDS
        if not low <= event.occurred_at.seconds <= high:
            bad.add("event.occurred_at.seconds")
        if not 0 <= event.occurred_at.nanos <= 999_999_999:
            bad.add("event.occurred_at.nanos")
    kind = event.WhichOneof("kind")
    _, figures = event_figures(event)
    if kind is None:
        bad.add("event.kind")
    elif kind == "repayment" and event.repayment.outcome not in (
        alert_service_pb2.REPAYMENT_OUTCOME_SUCCEEDED,
        alert_service_pb2.REPAYMENT_OUTCOME_FAILED,
    ):
        bad.add("event.repayment.outcome")
    if kind is not None and EVENT_MONEY_FIELDS[kind] and not figures:
        bad.add("event.sealed_figures")
    if bad or kind is None:
        return bad
    path = "event.sealed_figures"
    codes: dict[str, str] = {}
    wanted = [(name, False) for name in EVENT_MONEY_FIELDS[kind]]
    if EVENT_BALANCE_FIELD in figures:
        wanted.append((EVENT_BALANCE_FIELD, True))
    for name, allow_zero in wanted:
        value = figures.get(name)
        if not isinstance(value, Money) or not money_ok(value, allow_zero=allow_zero):
            bad.add(sealed_path(path, figures, name))
        else:
            codes[name] = value.currency_code
    for name in EVENT_COUNT_FIELDS.get(kind, ()):
        days = figures.get(name)  # 0 is "not given" in proto3: the SDK leaves it out
        if not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
            bad.add(sealed_path(path, figures, name))
    if len(set(codes.values())) > 1:  # the valid amounts, in more than one currency
        bad |= {sealed_path(path, figures, name) for name in codes}
    return bad


# The contract accepts event times from 1900-01-01 to 2200-01-01 UTC.
PLAUSIBLE_SECONDS = (-2208988800, 7258118400)


def event_request(
    caller: Caller,
    request_id: str,
    subject: common_pb2.SubjectRef,
    event: alert_service_pb2.BehaviourEvent,
    key: DataKey | None = None,
) -> alert_service_pb2.EvaluateEventRequest:
    """An EvaluateEvent as the SDK builds it from an event with clear figures."""
    sealed = seal_event(
        key or caller.data_key(EVALUATE_EVENT), subject, event, request_id=request_id
    )
    return alert_service_pb2.EvaluateEventRequest(
        request_id=request_id, subject=subject, event=sealed
    )


def test_evaluate_event_every_field(shared_server: ServerProcess) -> None:
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = alert_service_pb2_grpc.AlertServiceStub(channel)

        @bounded(60)
        @given(events())
        def examples(event: alert_service_pb2.BehaviourEvent) -> None:
            request_id = new_id("ev")
            request = event_request(caller, request_id, caller.subject(request_id), event)
            header = new_id("ev")
            outcome = invoke(stub.EvaluateEvent, request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            bad = expect_event(event)
            if bad:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.text
                assert set(outcome.violations) == bad
                if "event.event_id" in bad:
                    check_not_echoed(event.event_id, outcome, tail)
                return
            assert outcome.code == grpc.StatusCode.OK, outcome.text
            assert not outcome.response.duplicate
            assert all(a.event_id == event.event_id for a in outcome.response.alerts)
            again = invoke(stub.EvaluateEvent, request, new_id("ev"))
            assert again.code == grpc.StatusCode.OK and again.response.duplicate

        examples()
    check_still_serving(shared_server, tail)


def test_events_at_the_edges_of_the_timestamp_range(shared_server: ServerProcess) -> None:
    """Times at Timestamp's own limits are refused by name; times at the contract's limits
    (1900-01-01, 2200-01-01) are evaluated: the rules' window arithmetic never overflows."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    money = common_pb2.Money(currency_code="CNY", minor_units=500)
    kinds: dict[str, Message] = {
        "purchase": alert_service_pb2.Purchase(amount=money),
        "repayment": alert_service_pb2.Repayment(
            amount=money, outcome=alert_service_pb2.REPAYMENT_OUTCOME_FAILED
        ),
        "missed_payment": alert_service_pb2.MissedPayment(amount_due=money, days_past_due=3),
    }
    failures = []
    with shared_server.channel() as channel:
        stub = alert_service_pb2_grpc.AlertServiceStub(channel)
        edges = (
            TIMESTAMP_SECONDS[0],
            TIMESTAMP_SECONDS[0] + 86400,
            TIMESTAMP_SECONDS[1],
            PLAUSIBLE_SECONDS[0],
            PLAUSIBLE_SECONDS[1] - 1,
        )
        for seconds in edges:
            for kind, details in kinds.items():
                event = alert_service_pb2.BehaviourEvent(
                    event_id=new_id("edge"),
                    occurred_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=999_999_999),
                )
                getattr(event, kind).CopyFrom(details)
                request_id = new_id("edge")
                outcome = invoke(
                    stub.EvaluateEvent,
                    event_request(caller, request_id, caller.subject("edge"), event),
                    request_id,
                )
                if outcome.code in NEVER:
                    failures.append((kind, seconds, outcome.code.name))
                elif PLAUSIBLE_SECONDS[0] <= seconds < PLAUSIBLE_SECONDS[1]:
                    assert outcome.code == grpc.StatusCode.OK, outcome.text
                else:
                    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
                    assert set(outcome.violations) == {"event.occurred_at.seconds"}
    assert failures == []
    check_still_serving(shared_server, tail)


# -- figures only travel sealed: in clear, or sealed for anything else, they are refused ------

CANARY_FIGURE = 73_591_731_977  # minor units no other call sends


@dataclass
class Attack:
    """One request and the violations (field -> reason) it must get, all INVALID_ARGUMENT."""

    name: str
    method: str
    request: Message
    expect: dict[str, str]


def figure_attacks(caller: Caller) -> list[Attack]:
    canary = common_pb2.Money(currency_code="CNY", minor_units=CANARY_FIGURE)
    account = limit_service_pb2.AccountState(
        current_limit=canary,
        balance=common_pb2.Money(currency_code="CNY", minor_units=100),
        on_time_repayments_in_row=3,
        account_age_days=400,
    )
    n = len(account_figures(account))
    attacks: list[Attack] = []

    def limit(name: str, expect: dict[str, str], **edit: Any) -> None:
        request_id = new_id("atk")
        subject = caller.subject(request_id)
        request = limit_request(caller, request_id, subject, account, latest_score=560)
        for field_name, value in edit.items():
            getattr(request, field_name).CopyFrom(value(request_id, subject))
        attacks.append(Attack(name, ADJUST_LIMIT, request, expect))

    def undecryptable(path: str, *indexes: int) -> dict[str, str]:
        return {f"{path}.fields[{i}].ciphertext": "DECRYPTION_FAILED" for i in indexes}

    def sealed(
        values: Mapping[str, Any],
        *,
        method: str = ADJUST_LIMIT,
        version: str = "",
        request_id: str | None = None,
        customer: str | None = None,
    ) -> Any:
        """A sealed_account built from `values`, sealed as told (else as it should be)."""

        def build(rid: str, subject: common_pb2.SubjectRef) -> common_pb2.EncryptedFeatures:
            other = caller.subject(customer) if customer else subject
            return caller.data_key(method).seal(
                version or ACCOUNT_SCHEMA_VERSION, other, values, request_id=request_id or rid
            )

        return build

    figures = account_figures(account)
    limit(
        "clear-account-beside-sealed",
        {"account": "SEAL_REQUIRED"},
        account=lambda rid, subject: account,
    )
    clear_only = limit_service_pb2.AdjustLimitRequest(
        request_id=new_id("atk"), subject=caller.subject("atk"), account=account, latest_score=560
    )
    attacks.append(
        Attack(
            "clear-account-only",
            ADJUST_LIMIT,
            clear_only,
            {"account": "SEAL_REQUIRED", "sealed_account": "REQUIRED_FIELD"},
        )
    )
    no_account = limit_service_pb2.AdjustLimitRequest(
        request_id=new_id("atk"), subject=caller.subject("atk"), latest_score=560
    )
    attacks.append(
        Attack("no-account", ADJUST_LIMIT, no_account, {"sealed_account": "REQUIRED_FIELD"})
    )
    limit(
        "account-of-another-request",
        undecryptable("sealed_account", *range(n)),
        sealed_account=sealed(figures, request_id="another-request"),
    )
    limit(
        "account-of-another-subject",
        undecryptable("sealed_account", *range(n)),
        sealed_account=sealed(figures, customer="another-customer"),
    )
    swapped = dict(figures)
    swapped["current_limit"], swapped["balance"] = figures["balance"], figures["current_limit"]

    def renamed(rid: str, subject: common_pb2.SubjectRef) -> common_pb2.EncryptedFeatures:
        envelope = seal_account(caller.data_key(ADJUST_LIMIT), subject, account, request_id=rid)
        first, second = envelope.fields[0], envelope.fields[1]
        first.name, second.name = second.name, first.name
        return envelope

    limit("account-fields-renamed", undecryptable("sealed_account", 0, 1), sealed_account=renamed)
    limit(
        "account-under-features-schema",
        {"sealed_account.schema_version": "INVALID_FIELD"},
        sealed_account=sealed(figures, version=caller.schema_version),
    )
    limit(
        "features-moved-into-sealed-account",
        {"sealed_account.schema_version": "INVALID_FIELD"},
        sealed_account=sealed(applicant(0), version=caller.schema_version),
    )
    limit(
        "account-key-for-evaluate-event",
        {"sealed_account.data_key": "DECRYPTION_FAILED"},
        sealed_account=sealed(figures, method=EVALUATE_EVENT),
    )
    names = list(figures)
    limit(
        "money-under-a-count",
        {f"sealed_account.fields[{names.index('account_age_days')}]": "INVALID_FIELD"},
        sealed_account=sealed({**figures, "account_age_days": Money("CNY", 400)}),
    )
    limit(
        "number-under-an-amount",
        {"sealed_account.fields[0]": "INVALID_FIELD"},
        sealed_account=sealed({**figures, "current_limit": float(CANARY_FIGURE)}),
    )
    limit(
        "an-unknown-figure",
        {f"sealed_account.fields[{n}]": "INVALID_FIELD"},
        sealed_account=sealed({**figures, "credit_score": 700}),
    )

    def event(name: str, expect: dict[str, str], build: Callable[..., Any]) -> None:
        request_id = new_id("atk")
        subject = caller.subject(request_id)
        purchase = alert_service_pb2.BehaviourEvent(
            event_id=new_id("atk-ev"),
            occurred_at=timestamp_pb2.Timestamp(seconds=1_790_000_000),
            purchase=alert_service_pb2.Purchase(amount=canary),
        )
        attacks.append(
            Attack(
                name,
                EVALUATE_EVENT,
                alert_service_pb2.EvaluateEventRequest(
                    request_id=request_id,
                    subject=subject,
                    event=build(purchase, request_id, subject),
                ),
                expect,
            )
        )

    def sealed_event(event: Any, rid: str, subject: Any, **how: Any) -> Any:
        key = caller.data_key(how.get("method", EVALUATE_EVENT))
        _, values = event_figures(event)
        sent = seal_event(key, subject, event, request_id=how.get("request_id", rid))
        if "version" in how:
            sent.sealed_figures.CopyFrom(key.seal(how["version"], subject, values, request_id=rid))
        return sent

    event(
        "clear-amount",
        {"event.purchase.amount": "SEAL_REQUIRED", "event.sealed_figures": "REQUIRED_FIELD"},
        lambda e, rid, subject: e,
    )

    def beside(e: Any, rid: str, subject: Any) -> Any:
        sent = sealed_event(e, rid, subject)
        sent.purchase.amount.CopyFrom(canary)
        sent.balance_after.CopyFrom(canary)
        return sent

    event(
        "clear-amount-beside-sealed",
        {"event.purchase.amount": "SEAL_REQUIRED", "event.balance_after": "SEAL_REQUIRED"},
        beside,
    )

    def clear_days(e: Any, rid: str, subject: Any) -> Any:
        overdue = alert_service_pb2.BehaviourEvent()
        overdue.CopyFrom(e)
        overdue.missed_payment.amount_due.CopyFrom(canary)
        overdue.missed_payment.days_past_due = 61
        sent = sealed_event(overdue, rid, subject)
        sent.missed_payment.days_past_due = 61
        return sent

    event(
        "clear-days-past-due", {"event.missed_payment.days_past_due": "SEAL_REQUIRED"}, clear_days
    )
    event(
        "figures-of-another-request",
        undecryptable("event.sealed_figures", 0),
        lambda e, rid, subject: sealed_event(e, rid, subject, request_id="other"),
    )
    event(
        "figures-under-account-schema",
        {"event.sealed_figures.schema_version": "INVALID_FIELD"},
        lambda e, rid, subject: sealed_event(e, rid, subject, version=ACCOUNT_SCHEMA_VERSION),
    )
    event(
        "figures-key-for-adjust-limit",
        {"event.sealed_figures.data_key": "DECRYPTION_FAILED"},
        lambda e, rid, subject: sealed_event(e, rid, subject, method=ADJUST_LIMIT),
    )

    def login_balance(e: Any, rid: str, subject: Any) -> Any:
        login = alert_service_pb2.BehaviourEvent(
            event_id=e.event_id, occurred_at=e.occurred_at, login=alert_service_pb2.Login()
        )
        login.balance_after.CopyFrom(canary)
        return login

    event("clear-balance-of-a-login", {"event.balance_after": "SEAL_REQUIRED"}, login_balance)
    return attacks


def test_account_state_and_event_figures_only_travel_sealed(shared_server: ServerProcess) -> None:
    """Figures in clear are refused by name (SEAL_REQUIRED) and never read; sealed for another
    request, subject, field name, method or schema, they do not open; a value of the wrong
    kind opens and is refused by the figures' schema. No refusal repeats a figure."""
    caller = Caller.of(shared_server)
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        methods: dict[str, Callable[..., Any]] = {
            ADJUST_LIMIT: limit_service_pb2_grpc.LimitServiceStub(channel).AdjustLimit,
            EVALUATE_EVENT: alert_service_pb2_grpc.AlertServiceStub(channel).EvaluateEvent,
        }
        for attack in figure_attacks(caller):
            header = new_id("atk")
            outcome = invoke(methods[attack.method], attack.request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (attack.name, outcome.text)
            assert outcome.reasons == attack.expect, attack.name
            check_not_echoed(str(CANARY_FIGURE), outcome, tail)
            check_not_echoed(f"{float(CANARY_FIGURE)}", outcome, tail)
    check_still_serving(shared_server, tail)


def test_watch_alerts_enums_and_cursors(shared_server: ServerProcess) -> None:
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = alert_service_pb2_grpc.AlertServiceStub(channel)
        known = set(alert_service_pb2.Severity.values())
        # At least one alert exists, so a stream from cursor 0 has something to replay.
        overdue = alert_service_pb2.BehaviourEvent(
            event_id=new_id("watch"),
            occurred_at=timestamp_pb2.Timestamp(seconds=1_790_000_000),
            missed_payment=alert_service_pb2.MissedPayment(
                amount_due=common_pb2.Money(currency_code="CNY", minor_units=100),
                days_past_due=40,
            ),
        )
        raised = shared_server.client(channel).evaluate_event(TENANT, new_id("watch"), overdue)
        assert raised.alerts

        @bounded(20)
        @given(
            st.one_of(st.integers(*INT32), st.integers(-2, 6)),
            st.one_of(st.none(), st.just(0), st.integers(2**40, UINT64_MAX), st.just(UINT64_MAX)),
        )
        def examples(severity: int, after: int | None) -> None:
            request = alert_service_pb2.WatchAlertsRequest(min_severity=severity)  # type: ignore[arg-type]
            if after is not None:
                request.after_sequence = after
            received: list[alert_service_pb2.WatchAlertsResponse] = []

            def watch(req: Any, **kwargs: Any) -> None:
                for response in stub.WatchAlerts(req, **kwargs):
                    received.append(response)

            outcome = invoke(watch, request, new_id("watch"), timeout=0.4)
            check_documented(outcome)
            if severity not in known:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
                assert set(outcome.violations) == {"min_severity"}
            elif after is not None and after >= 2**40:
                assert outcome.code == grpc.StatusCode.OUT_OF_RANGE
                assert outcome.reason == "CURSOR_OUT_OF_RANGE"
            else:  # a live stream: whatever it had, then the deadline
                assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
                if after == 0 and severity <= alert_service_pb2.SEVERITY_HIGH:
                    assert received  # the replay holds at least the alert raised above
                for response in received:
                    assert response.alert.severity >= severity
                    assert after is None or response.alert.sequence > after

        examples()
    check_still_serving(shared_server, tail)


def test_update_alert_state_every_field(shared_server: ServerProcess) -> None:
    """Alert sequences, states and reason codes of every shape: each wrong field named (a free
    text reason never repeated: it could hold personal data), and a well-formed change of an
    alert that does not exist NOT_FOUND."""
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        stub = alert_service_pb2_grpc.AlertServiceStub(channel)

        @bounded(30)
        @given(
            st.one_of(st.just(0), st.integers(2**40, UINT64_MAX)),  # no alert has these
            st.one_of(st.integers(*INT32), st.integers(-1, 4)),
            mostly(regex(REASON_CODE), HOSTILE_TEXT),
            mostly(regex(REQUEST_ID), HOSTILE_TEXT),
        )
        def examples(sequence: int, state: int, reason: str, request_id: str) -> None:
            request = alert_service_pb2.UpdateAlertStateRequest(
                request_id=request_id,
                alert_sequence=sequence,
                state=state,  # type: ignore[arg-type]
                reason_code=reason,
            )
            header = new_id("state")
            outcome = invoke(stub.UpdateAlertState, request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            bad = set()
            if not REQUEST_ID.fullmatch(request_id):
                bad.add("request_id")
            if sequence == 0:
                bad.add("alert_sequence")
            if state not in (
                alert_service_pb2.ALERT_STATE_ACKNOWLEDGED,
                alert_service_pb2.ALERT_STATE_RESOLVED,
            ):
                bad.add("state")
            if not REASON_CODE.fullmatch(reason):
                bad.add("reason_code")
            if bad:
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome.text
                assert set(outcome.violations) == bad
                if "reason_code" in bad:
                    check_not_echoed(reason, outcome, tail)
                return
            assert (outcome.code, outcome.reason) == (
                grpc.StatusCode.NOT_FOUND,
                "ALERT_NOT_FOUND",
            ), outcome.text

        examples()
    check_still_serving(shared_server, tail)


# -- AuditService: decision ids -----------------------------------------------------------------


def checkpointed_decision(server: ServerProcess, timeout: float = 30.0) -> tuple[int, str]:
    """(sequence, decision id) of a decision the latest signed checkpoint covers, read offline;
    waits for the first checkpoint (every 10 s while decisions arrive) if there is none yet."""
    layout = DataLayout(server.data_dir)
    verifier, origin = audit_log_key(layout.root)
    deadline = time.monotonic() + timeout
    while True:
        checkpoint = latest_checkpoint(layout.audit_dir, verifier, origin)
        if checkpoint is not None:
            for stored in iter_records(layout.audit_dir):
                if stored.sequence >= checkpoint.size:
                    break
                if "outputs" in stored.record:
                    return stored.sequence, str(stored.record["decision_id"])
        assert time.monotonic() < deadline, "no checkpointed decision"
        time.sleep(0.5)


def test_get_decision_record_decision_ids(shared_server: ServerProcess) -> None:
    """As the auditor: a malformed id is named, a well-formed unknown one is NOT_FOUND (or, before
    the first checkpoint, FAILED_PRECONDITION), and a real decision comes back with its proof."""
    tail = LogTail(shared_server)
    with shared_server.channel() as channel:
        scoring_service_pb2_grpc.ScoringServiceStub(channel).Score(
            valid_score_request(Caller.of(shared_server)), timeout=10
        )
    with shared_server.channel("auditor") as channel:
        stub = audit_service_pb2_grpc.AuditServiceStub(channel)

        @bounded(25)
        @given(st.one_of(HOSTILE_TEXT, regex(DECISION_ID), st.uuids().map(str)))
        def examples(decision_id: str) -> None:
            request = audit_service_pb2.GetDecisionRecordRequest(decision_id=decision_id)
            header = new_id("audit")
            outcome = invoke(stub.GetDecisionRecord, request, header)
            check_documented(outcome)
            check_logged(tail, header, outcome)
            if not DECISION_ID.fullmatch(decision_id):
                assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
                assert set(outcome.violations) == {"decision_id"}
                check_not_echoed(decision_id, outcome, tail)
            else:
                assert (outcome.code, outcome.reason) in (
                    (grpc.StatusCode.NOT_FOUND, "DECISION_NOT_FOUND"),
                    (grpc.StatusCode.FAILED_PRECONDITION, "NOT_YET_CHECKPOINTED"),
                )

        examples()
        # And a decision that is in the checkpointed log comes back with its record.
        sequence, decision_id = checkpointed_decision(shared_server)
        request = audit_service_pb2.GetDecisionRecordRequest(decision_id=decision_id)
        found = invoke(stub.GetDecisionRecord, request, new_id("audit"))
        assert found.code == grpc.StatusCode.OK, found.text
        assert found.response.sequence == sequence
    check_still_serving(shared_server, tail)


# -- a concurrent burst of malformed and valid calls ------------------------------------------

CANARY_ID = "CANARY-raw-id-hostile-7741-QZX"
CANARY_CATEGORY = "CANARY-category-hostile-6502"
CANARY_AMOUNT = 987_641  # a credit amount no applicant in the data set asked for
CANARY_UNKNOWN = b"CANARY-unknown-field-hostile-1984"
CANARY_ACCOUNT = limit_service_pb2.AccountState(
    current_limit=common_pb2.Money(currency_code="CNY", minor_units=-1),
    balance=common_pb2.Money(currency_code="CNY", minor_units=-CANARY_AMOUNT),
)
BURST_CALLS = 200
BURST_THREADS = 8


@dataclass
class BurstCall:
    """One call of the burst and what it must get."""

    name: str
    method: str
    payload: bytes
    request_id: str  # the body's request id (well-formed, so its refusal is findable)
    code: grpc.StatusCode
    violations: set[str] | None = None
    reason: str | None = None
    applicant: int | None = None  # valid scores: compare with this applicant's reference
    timeout: float = 20.0


def burst_calls(server: ServerProcess) -> list[BurstCall]:
    caller = Caller.of(server)
    subject = caller.subject(CANARY_ID)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    calls: list[BurstCall] = []

    def canary_values(which: int) -> dict[str, FeatureInput]:
        return {**applicant(which), "credit_amount": CANARY_AMOUNT}

    def score(
        name: str, values: Mapping[str, FeatureInput], code: grpc.StatusCode, **expect: Any
    ) -> scoring_service_pb2.ScoreRequest:
        request_id = new_id(name)
        request = score_request(caller, request_id, subject, typed(values))
        calls.append(
            BurstCall(name, SCORE, request.SerializeToString(), request_id, code, **expect)
        )
        return request

    for index in range(BURST_CALLS):
        which = index % APPLICANTS
        slot = index % 10
        if slot in (0, 2, 4, 6):
            score("valid", canary_values(which), grpc.StatusCode.OK, applicant=which)
        elif slot == 8:  # valid, with an unknown field holding a canary inside the features
            request = score("unknown-field", canary_values(which), grpc.StatusCode.OK)
            calls[-1].applicant = which
            calls[-1].payload = scoring_service_pb2.ScoreRequest(
                request_id=request.request_id, subject=request.subject
            ).SerializeToString() + wire_field(
                3, request.features.SerializeToString() + wire_field(99, CANARY_UNKNOWN)
            )
        elif slot == 1:
            score(
                "category",
                {**canary_values(which), "purpose": CANARY_CATEGORY},
                invalid,
                violations={f"features.fields[{PURPOSE}]"},
            )
        elif slot == 3:
            score(
                "nan",
                {**canary_values(which), "age_in_years": math.nan},
                invalid,
                violations={f"features.fields[{NAMES.index('age_in_years')}].ciphertext"},
            )
        elif slot == 5:
            request = score_request(
                caller,
                new_id("raw-id"),
                common_pb2.SubjectRef(tenant=TENANT, pseudonym=CANARY_ID),
                typed(canary_values(which)),
            )
            calls.append(
                BurstCall(
                    "raw-id",
                    SCORE,
                    request.SerializeToString(),
                    request.request_id,
                    invalid,
                    violations={"subject.pseudonym"},
                )
            )
        elif slot == 7:
            kind = index // 10 % 4
            if kind == 0:
                request = score(
                    "unknown-key",
                    canary_values(which),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    reason="KEY_UNKNOWN",
                )
                request.features.data_key.key_id = "fk-19990101-00000000"
                for encrypted in request.features.fields:
                    encrypted.key_id = "fk-19990101-00000000"
                calls[-1].payload = request.SerializeToString()
            elif kind == 1:
                request_id = new_id("too-many")
                batch = scoring_service_pb2.ScoreBatchRequest(
                    request_id=request_id,
                    items=[scoring_service_pb2.ScoreBatchItem(subject=subject)]
                    * (MAX_BATCH_ITEMS + 1),
                )
                calls.append(
                    BurstCall(
                        "too-many",
                        SCORE_BATCH,
                        batch.SerializeToString(),
                        request_id,
                        invalid,
                        violations={"items"},
                    )
                )
            elif kind == 2:
                # Negative amounts, sealed (each named by its place, never repeated), and the
                # same account in clear (refused by name, never read).
                request_id = new_id("money")
                limit = limit_request(caller, request_id, subject, CANARY_ACCOUNT, latest_score=560)
                calls.append(
                    BurstCall(
                        "money",
                        ADJUST_LIMIT,
                        limit.SerializeToString(),
                        request_id,
                        invalid,
                        violations={"sealed_account.fields[0]", "sealed_account.fields[1]"},
                    )
                )
                request_id = new_id("clear-money")
                clear = limit_service_pb2.AdjustLimitRequest(
                    request_id=request_id,
                    subject=subject,
                    account=CANARY_ACCOUNT,
                    latest_score=560,
                )
                calls.append(
                    BurstCall(
                        "clear-money",
                        ADJUST_LIMIT,
                        clear.SerializeToString(),
                        request_id,
                        invalid,
                        violations={"account", "sealed_account"},
                    )
                )
            else:
                calls.append(
                    BurstCall(
                        "oversize",
                        SCORE,
                        wire_field(1, CANARY_ID.encode() * (MAX_MESSAGE_BYTES // len(CANARY_ID))),
                        "",
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
                )
        else:  # slot 9: a deadline that has passed before the call leaves
            request = valid_score_request(caller, which)
            calls.append(
                BurstCall(
                    "expired",
                    SCORE,
                    request.SerializeToString(),
                    request.request_id,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    timeout=0.0,
                )
            )
    return calls


def test_a_concurrent_burst_of_hostile_and_valid_calls(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    server = ServerProcess(data_dir)
    errors: list[str] = []
    try:
        for which in range(APPLICANTS):  # sequential reference scores, before the burst
            with server.channel() as channel:
                values = {**applicant(which), "credit_amount": CANARY_AMOUNT}
                _reference[(str(server.data_dir), which)] = (
                    server.client(channel).score(TENANT, CANARY_ID, values).score
                )
        calls = burst_calls(server)
        channels = [server.channel() for _ in range(BURST_THREADS)]

        def run(index: int) -> Outcome:
            call = calls[index]
            channel = channels[index % BURST_THREADS]
            deserializers = {
                SCORE: scoring_service_pb2.ScoreResponse.FromString,
                SCORE_BATCH: scoring_service_pb2.ScoreBatchResponse.FromString,
                ADJUST_LIMIT: limit_service_pb2.AdjustLimitResponse.FromString,
            }
            method = raw_method(channel, call.method, deserializers[call.method])
            return invoke(method, call.payload, new_id("burst"), timeout=call.timeout)

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(BURST_THREADS) as pool:
            outcomes = list(pool.map(run, range(len(calls))))
        elapsed = time.monotonic() - started
        for channel in channels:
            channel.close()
        assert elapsed < 60

        decided: dict[str, int] = {}  # decision id -> audit sequence
        for call, outcome in zip(calls, outcomes, strict=True):
            errors.append(outcome.text)
            check_documented(outcome)
            assert outcome.code == call.code, (call.name, outcome.text)
            if call.violations is not None:
                assert set(outcome.violations) == call.violations, call.name
            if call.reason is not None:
                assert outcome.reason == call.reason, call.name
            if call.code == grpc.StatusCode.OK:
                assert call.applicant is not None
                check_score(server, outcome.response.score, call.applicant)
                metadata = outcome.response.metadata
                decided[metadata.decision_id] = metadata.audit_sequence
        assert len(decided) == sum(call.code == grpc.StatusCode.OK for call in calls)
        assert server.terminate() == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()

    # Every answered decision is in the log under its sequence; every refusal the server saw
    # is in it too, and the whole log verifies against its signed checkpoints.
    layout = DataLayout(data_dir)
    records = {stored.sequence: stored.record for stored in iter_records(layout.audit_dir)}
    for decision_id, sequence in decided.items():
        assert records[sequence]["decision_id"] == decision_id
        assert "outputs" in records[sequence]
    refused = {
        record["request_id"]: record
        for record in records.values()
        if record.get("outcome") == "refused"
    }
    for call in calls:
        if call.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            assert refused[call.request_id]["code"] == call.code.name, call.name
    verifier, origin = audit_log_key(layout.root)
    report = verify_log(layout.audit_dir, verifier, origin)
    assert report.ok and report.size == len(records), report.problems
    assert report.proven_size == report.size  # the shutdown checkpoint covers everything
    verified = subprocess.run(
        [sys.executable, "-m", "service.cli", "audit", "verify"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PRIVSCORE_DATA_DIR": str(data_dir)},
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # No canary anywhere the server wrote: logs, errors, audit, store, keys.
    stderr = server.process.stderr.read() if server.process.stderr else ""
    haystacks = {
        "stdout": "".join(server.lines).encode(),
        "stderr": stderr.encode(),
        "errors": "\n".join(errors).encode(),
    }
    for path in data_dir.rglob("*"):
        if path.is_file() and layout.client_dir not in path.parents:
            haystacks[str(path.relative_to(data_dir))] = path.read_bytes()
    assert len(haystacks) > 6
    # Positive control: the scan reads real audit content (a refused call's request id, which
    # its refusal record keeps in clear, is there).
    refused_id = next(c.request_id for c in calls if c.code == grpc.StatusCode.INVALID_ARGUMENT)
    assert any(
        refused_id.encode() in data for name, data in haystacks.items() if name.startswith("audit")
    )
    needles = [
        CANARY_ID.encode(),
        CANARY_ID.encode().hex().encode(),
        CANARY_CATEGORY.encode(),
        CANARY_UNKNOWN,
        f"{CANARY_AMOUNT}.0".encode(),
        struct.pack("<d", CANARY_AMOUNT),
        struct.pack("<f", CANARY_AMOUNT),
        CANARY_ACCOUNT.balance.SerializeToString(),  # the clear Money, as sent
    ]
    leaks = [
        (name, needle) for name, data in haystacks.items() for needle in needles if needle in data
    ]
    assert leaks == []
