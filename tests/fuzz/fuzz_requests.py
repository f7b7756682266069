"""Coverage-guided fuzzing (atheris) of request parsing, validation and decryption, in process.

Each input is one request as the server receives it: the first byte picks the RPC, the rest is
parsed with protobuf as that RPC's request message and taken through the server's own code
path up to the model: validation (`validate_*`), then for requests that pass, decryption and
schema validation (`open_row`: `FeatureOpener.open` with a real keyring, `validate_record`;
`open_account` and `open_event` for sealed account state and event figures) and `to_event`. One
more mode builds a request from the input and seals it correctly (as a caller would, with
fuzzed names and fuzzed plaintext bytes, money among them): a Score's features, an
AdjustLimit's account state or an event's figures, so the fuzzer reaches what lies behind a
successful decryption. A structure-aware mutator (in the spirit of libprotobuf-mutator) sets
one field of a parsed request at a time to a boundary or random value of its type, switches
oneofs, and duplicates or drops repeated items, so a sealed seed stays decryptable while its
other fields change; byte-level mutation still runs half of the time. The only acceptable
exceptions are the documented refusals (`ServiceError`, which must also turn into a status)
and protobuf's `DecodeError`; anything else is a crash.

    python -m tests.fuzz.fuzz_requests [libFuzzer flags] [CORPUS_DIR ...]

Valid requests sealed to this run's keyring are written into the first corpus directory as
seeds (the keyring is new every run, so seeds are too).
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before onnxruntime is first imported

import json
import math
import random
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Third-party code is imported first and uninstrumented: coverage feedback comes from ours.
import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
import google.protobuf.json_format  # noqa: F401
import grpc  # noqa: F401
import numpy  # noqa: F401
import onnxruntime  # noqa: F401
from google.protobuf.descriptor import FieldDescriptor

with atheris.instrument_imports(include=["service", "privscore"]):
    from google.protobuf.message import DecodeError, Message

    from privscore.client.envelope import (
        ACCOUNT_COUNT_FIELDS,
        ACCOUNT_MONEY_FIELDS,
        ACCOUNT_SCHEMA_VERSION,
        EVENT_BALANCE_FIELD,
        EVENT_CLEAR_FIELDS,
        EVENT_SCHEMA_VERSION,
    )
    from privscore.client.figures import seal_account, seal_event
    from privscore.v1 import (
        alert_service_pb2,
        common_pb2,
        limit_service_pb2,
        scoring_service_pb2,
    )
    from service.api.alerts import to_event, validate_evaluate_event, validate_watch_alerts
    from service.api.features import encrypted_inputs, open_row
    from service.api.figures import open_account, open_event
    from service.api.limits import validate_adjust_limit
    from service.api.scoring import (
        validate_batch_envelope,
        validate_batch_item,
        validate_score,
    )
    from service.api.validation import well_formed_request_id, well_formed_subject
    from service.config import DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY
    from service.errors import InvalidArgument, ServiceError
    from service.model.scorer import Scorer
    from service.privacy.keyring import Keyring
    from service.privacy.pseudonym import Pseudonymiser
    from service.privacy.sealing import (
        DataKey,
        FeatureOpener,
        RequestKeys,
        ServerPublicKey,
        load_public_keyset,
    )

SCORE = "/privscore.v1.ScoringService/Score"
SCORE_BATCH = "/privscore.v1.ScoringService/ScoreBatch"
ADJUST_LIMIT = "/privscore.v1.LimitService/AdjustLimit"
EVALUATE_EVENT = "/privscore.v1.AlertService/EvaluateEvent"
TENANT = "baitiao-cn"
# The verified caller the servicers would see: data keys are sealed for it.
IDENTITY = "spiffe://privscore.dev/client/dev"
MODES = 6
SEALED_MODE = 5
MAX_SEALED_FIELDS = 24


def _setup() -> tuple[Scorer, FeatureOpener, ServerPublicKey]:
    """A real keyring under a random KEK (its file removed once loaded) and the served model."""
    workdir = Path(tempfile.mkdtemp(prefix="privscore-fuzz-"))
    try:
        keyring = Keyring.create(workdir / "keyring.json", secrets.token_bytes(32))
        keyset = workdir / "public-keys.json"
        keyset.write_text(json.dumps(keyring.public_keyset()), encoding="utf-8")
        server_key = load_public_keyset(keyset)
    finally:
        shutil.rmtree(workdir)
    return Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY), FeatureOpener(keyring), server_key


SCORER, OPENER, SERVER_KEY = _setup()
SCHEMA = SCORER.manifest.schema
SCHEMA_VERSION = SCORER.schema_version
NAMES = tuple(spec.name for spec in SCHEMA.features)  # excluded ones too: they must be refused
SCHEMA_TEXT = json.dumps(SCHEMA.to_dict(), ensure_ascii=False)
PSEUDONYMS = Pseudonymiser(b"fuzz-pseudonymisation-key-32byte")


def refused(error: ServiceError, plaintexts: Sequence[str] = (), names: Sequence[str] = ()) -> None:
    """A documented refusal: it becomes a status, names fields, and quotes no sealed value."""
    status = error.to_status()
    status.SerializeToString()
    text = [error.message]
    if isinstance(error, InvalidArgument):
        assert error.violations
        for violation in error.violations:
            assert violation.field and violation.description and violation.reason
            text += [violation.field, violation.description]
    joined = "\n".join(text)
    for value in plaintexts:
        if len(value) >= 8 and value not in SCHEMA_TEXT and not any(value in n for n in names):
            assert value not in joined, "a refusal quotes a sealed value"


def open_features(
    features: common_pb2.EncryptedFeatures,
    subject: common_pb2.SubjectRef,
    method: str,
    request_id: str,
    opened_keys: RequestKeys | None = None,
) -> None:
    """What the servicers do with features that passed validation."""
    row = open_row(
        SCORER,
        OPENER,
        features,
        subject,
        method=method,
        request_id=request_id,
        identity=IDENTITY,
        opened_keys=opened_keys,
    )
    assert set(row) == {spec.name for spec in SCHEMA.model_features}
    encrypted_inputs(features)


def refusal_context(request: Any) -> None:
    """What the refusal audit reads of any request: only well-formed ids and subjects."""
    request_id = well_formed_request_id(request)
    assert request_id in ("", request.request_id)
    subject = well_formed_subject(request)
    assert subject is None or subject is request.subject or subject == request.subject


def score(data: bytes) -> None:
    request = scoring_service_pb2.ScoreRequest.FromString(data)
    refusal_context(request)
    validate_score(request)
    open_features(request.features, request.subject, SCORE, request.request_id)


def score_batch(data: bytes) -> None:
    request = scoring_service_pb2.ScoreBatchRequest.FromString(data)
    refusal_context(request)
    validate_batch_envelope(request)
    opened_keys: RequestKeys = {}
    for item in request.items:
        try:
            well_formed_subject(item)
            validate_batch_item(item)
            open_features(item.features, item.subject, SCORE_BATCH, request.request_id, opened_keys)
        except ServiceError as error:  # an item fails on its own
            refused(error)


def adjust_limit(data: bytes) -> None:
    """As the servicer: the account opened first, then the features, one request's memo for
    both (they may share a data key)."""
    request = limit_service_pb2.AdjustLimitRequest.FromString(data)
    refusal_context(request)
    validate_adjust_limit(request)
    opened_keys: RequestKeys = {}
    account = open_account(
        OPENER,
        request.sealed_account,
        request.subject,
        method=ADJUST_LIMIT,
        identity=IDENTITY,
        request_id=request.request_id,
        opened_keys=opened_keys,
    )
    assert account.HasField("current_limit") and account.HasField("balance")
    if request.HasField("features"):
        open_features(
            request.features, request.subject, ADJUST_LIMIT, request.request_id, opened_keys
        )


def evaluate_event(data: bytes) -> None:
    request = alert_service_pb2.EvaluateEventRequest.FromString(data)
    refusal_context(request)
    validate_evaluate_event(request)
    opened = open_event(
        OPENER,
        request.event,
        request.subject,
        method=EVALUATE_EVENT,
        identity=IDENTITY,
        request_id=request.request_id,
    )
    assert not opened.HasField("sealed_figures")
    event = to_event(opened)
    assert event.event_id == request.event.event_id


def watch_alerts(data: bytes) -> None:
    validate_watch_alerts(alert_service_pb2.WatchAlertsRequest.FromString(data))


def _plaintext(fdp: Any) -> tuple[bytes, str | None]:
    """A sealed field's plaintext: a typed FeatureValue (money too), or raw bytes; and its
    string value."""
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 5:
        money = common_pb2.Money(
            currency_code=fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 4)),
            minor_units=fdp.ConsumeIntInRange(-(2**63), 2**63 - 1),
        )
        return common_pb2.FeatureValue(money_value=money).SerializeToString(), None
    if kind == 0:
        return common_pb2.FeatureValue(number_value=fdp.ConsumeFloat()).SerializeToString(), None
    if kind == 1:
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
        return common_pb2.FeatureValue(string_value=text).SerializeToString(), text
    if kind == 2:
        return common_pb2.FeatureValue(bool_value=fdp.ConsumeBool()).SerializeToString(), None
    if kind == 3:
        spec = SCHEMA.features[fdp.ConsumeIntInRange(0, len(SCHEMA.features) - 1)]
        categories = spec.categories or ("",)
        text = categories[fdp.ConsumeIntInRange(0, len(categories) - 1)]
        return common_pb2.FeatureValue(string_value=text).SerializeToString(), text
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)), None


# The names a sealed mode draws from most of the time, per target: the features', the account
# state's, an event's figures'.
ACCOUNT_NAMES = (*ACCOUNT_MONEY_FIELDS, *ACCOUNT_COUNT_FIELDS)
EVENT_NAMES = (
    *sorted({name for fields in EVENT_CLEAR_FIELDS.values() for name in fields}),
    EVENT_BALANCE_FIELD,
)
EVENT_KINDS = tuple(sorted(EVENT_CLEAR_FIELDS))


def sealed(data: bytes) -> None:
    """A Score's features, an AdjustLimit's account state or an EvaluateEvent's figures, sealed
    correctly from fuzzed names and plaintexts, then served."""
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 2)
    request_id = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(1, 70)) or "r"
    tenant = TENANT if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(8)
    pseudonym = PSEUDONYMS.pseudonym(tenant or "t", "customer")
    if fdp.ConsumeIntInRange(0, 7) == 0:
        pseudonym = fdp.ConsumeUnicodeNoSurrogates(64)
    subject = common_pb2.SubjectRef(tenant=tenant, pseudonym=pseudonym)
    plaintexts: list[tuple[str, bytes]] = []
    strings: list[str] = []
    known = (NAMES, ACCOUNT_NAMES, EVENT_NAMES)[target]
    for _ in range(fdp.ConsumeIntInRange(0, MAX_SEALED_FIELDS)):
        if fdp.ConsumeIntInRange(0, 9):
            name = known[fdp.ConsumeIntInRange(0, len(known) - 1)]
        else:
            name = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 70))
        plaintext, text = _plaintext(fdp)
        plaintexts.append((name, plaintext))
        if text is not None:
            strings.append(text)
    own = (SCHEMA_VERSION, ACCOUNT_SCHEMA_VERSION, EVENT_SCHEMA_VERSION)[target]
    version = own if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUnicodeNoSurrogates(20)
    method = (SCORE, ADJUST_LIMIT, EVALUATE_EVENT)[target]
    envelope = _seal(method, request_id, version, subject, plaintexts)
    if target == 0:
        serve: Callable[[bytes], None] = score
        request: Message = scoring_service_pb2.ScoreRequest(
            request_id=request_id, subject=subject, features=envelope
        )
    elif target == 1:
        serve = adjust_limit
        request = limit_service_pb2.AdjustLimitRequest(
            request_id=request_id, subject=subject, sealed_account=envelope, latest_score=560
        )
    else:
        serve = evaluate_event
        event = alert_service_pb2.BehaviourEvent(event_id="fuzz-event", sealed_figures=envelope)
        event.occurred_at.FromSeconds(1_790_000_000)
        getattr(event, EVENT_KINDS[fdp.ConsumeIntInRange(0, len(EVENT_KINDS) - 1)]).SetInParent()
        request = alert_service_pb2.EvaluateEventRequest(
            request_id=request_id, subject=subject, event=event
        )
    names = [name for name, _ in plaintexts]
    try:
        serve(request.SerializeToString())
    except ServiceError as error:
        refused(error, strings, names)


def _seal(
    method: str,
    request_id: str,
    version: str,
    subject: common_pb2.SubjectRef,
    plaintexts: Sequence[tuple[str, bytes]],
) -> common_pb2.EncryptedFeatures:
    """As the SDK seals, but any plaintext bytes, not only typed values."""
    data_key = DataKey(SERVER_KEY, method, identity=IDENTITY)
    return data_key.seal_encoded(version, subject, plaintexts, request_id=request_id)


TARGETS: tuple[Callable[[bytes], None], ...] = (
    score,
    score_batch,
    adjust_limit,
    evaluate_event,
    watch_alerts,
    sealed,
)


# -- structure-aware mutation -------------------------------------------------------------------

MESSAGE_TYPES: tuple[type[Message], ...] = (
    scoring_service_pb2.ScoreRequest,
    scoring_service_pb2.ScoreBatchRequest,
    limit_service_pb2.AdjustLimitRequest,
    alert_service_pb2.EvaluateEventRequest,
    alert_service_pb2.WatchAlertsRequest,
)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_INTERESTING_INTS = (-1, 0, 1, 2, 3, 5, 7, 30, 60, 256, 257, 2000, 2001, 36500, 36501, 10**9)
_INTERESTING_SECONDS = (-62135596800, -62135596801, 253402300799, 253402300800)
_INTERESTING_LENGTHS = (0, 1, 11, 12, 13, 16, 17, 31, 32, 33, 47, 48, 49, 1024, 1025)


def _paths(message: Message, depth: int = 0) -> list[tuple[Message, Any]]:
    """Every (message, field) reachable through set submessages, a few levels deep."""
    found: list[tuple[Message, Any]] = []
    for field in message.DESCRIPTOR.fields:
        found.append((message, field))
        if field.type != FieldDescriptor.TYPE_MESSAGE or depth >= 4:
            continue
        if field.is_repeated:
            for item in list(getattr(message, field.name))[:3]:
                found += _paths(item, depth + 1)
        elif message.HasField(field.name):
            found += _paths(getattr(message, field.name), depth + 1)
    return found


def _scalar(field: Any, current: Any, rng: random.Random) -> Any:
    """A boundary, nearby or random value of the field's type."""
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        pool = [low, high, rng.randint(low, high), *_INTERESTING_INTS, *_INTERESTING_SECONDS]
        pool += [current + 1, current - 1, -current]
        return min(high, max(low, rng.choice(pool)))
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, rng.uniform(-1e6, 1e6)])
    if kind == FieldDescriptor.TYPE_BOOL:
        return not current
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(
            [
                "",
                current + current,
                current[: rng.randint(0, len(current))],
                current.upper(),
                "x" * rng.choice([63, 64, 65, 128, 129, 5000]),
                rng.choice(["CNY", "USD", "EUR", "cny", TENANT, "\u0000", "\U0001f4a5", "a\n"]),
                SCHEMA_VERSION,
                SERVER_KEY.key_id,
                rng.choice(NAMES),
            ]
        )
    if current and rng.random() < 0.5:  # bytes: one bit flipped, or another length
        flipped = bytearray(current)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return rng.randbytes(rng.choice(_INTERESTING_LENGTHS))


def _mutate(message: Message, rng: random.Random) -> None:
    """One structural change somewhere in `message`: mostly a scalar's value."""
    paths = _paths(message)
    scalars = [
        (owner, field)
        for owner, field in paths
        if not field.is_repeated and field.type != FieldDescriptor.TYPE_MESSAGE
    ]
    owner, field = rng.choice(scalars if scalars and rng.random() < 0.75 else paths)
    name = field.name
    if field.is_repeated:
        items = getattr(owner, name)
        action = rng.randrange(4)
        if action == 0 and len(items):
            del items[rng.randrange(len(items))]
        elif action == 1 and len(items):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                items.add().CopyFrom(items[rng.randrange(len(items))])
            else:
                items.append(items[rng.randrange(len(items))])
        elif action == 2:
            owner.ClearField(name)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items.add()
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        if owner.HasField(name) and rng.random() < 0.5:
            owner.ClearField(name)
        else:
            getattr(owner, name).SetInParent()  # also switches a oneof to this member
    elif rng.random() < 0.1:
        owner.ClearField(name)
    else:
        setattr(owner, name, _scalar(field, getattr(owner, name), rng))


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half the time libFuzzer's byte mutations; otherwise structural ones on the parse."""
    rng = random.Random(seed)
    mode = data[0] % MODES if data else SEALED_MODE
    if mode != SEALED_MODE and rng.random() < 0.5:
        try:
            message = MESSAGE_TYPES[mode].FromString(data[1:])
        except DecodeError:
            pass
        else:
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                _mutate(message, rng)
            return (bytes([data[0]]) + message.SerializeToString())[:max_size]
    mutated: bytes = atheris.Mutate(data, max_size)
    return mutated


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target = TARGETS[data[0] % MODES]
    try:
        target(data[1:])
    except DecodeError:
        pass  # not a message of this type: gRPC refuses it before any servicer runs
    except ServiceError as error:
        refused(error)


def write_seeds(directory: Path) -> None:
    """Valid requests of every kind, sealed as the SDK seals them to this run's keyring."""
    from tests.conftest import applicants  # the data set's typed applicants

    directory.mkdir(parents=True, exist_ok=True)
    subject = common_pb2.SubjectRef(tenant=TENANT, pseudonym=PSEUDONYMS.pseudonym(TENANT, "seed"))
    seeds: list[tuple[int, bytes]] = []
    for index in range(2):
        values = applicants()[index]
        request_id = f"seed-{index}"
        features = DataKey(SERVER_KEY, SCORE, identity=IDENTITY).seal(
            SCHEMA_VERSION, subject, values, request_id=request_id
        )
        seeds.append(
            (
                0,
                scoring_service_pb2.ScoreRequest(
                    request_id=request_id, subject=subject, features=features
                ).SerializeToString(),
            )
        )
    batch_key = DataKey(SERVER_KEY, SCORE_BATCH, identity=IDENTITY)
    items = [
        scoring_service_pb2.ScoreBatchItem(
            subject=subject,
            features=batch_key.seal(
                SCHEMA_VERSION, subject, applicants()[i], request_id="seed-batch"
            ),
        )
        for i in range(2)
    ]
    seeds.append(
        (
            1,
            scoring_service_pb2.ScoreBatchRequest(
                request_id="seed-batch", items=items
            ).SerializeToString(),
        )
    )
    money = common_pb2.Money(currency_code="CNY", minor_units=1_000_000)
    account = limit_service_pb2.AccountState(
        current_limit=money, balance=money, on_time_repayments_in_row=7, account_age_days=400
    )
    # Account state and event figures sealed as the SDK seals them; an AdjustLimit's features
    # under the account's data key.
    limit_key = DataKey(SERVER_KEY, ADJUST_LIMIT, identity=IDENTITY)
    seeds.append(
        (
            2,
            limit_service_pb2.AdjustLimitRequest(
                request_id="seed-limit",
                subject=subject,
                sealed_account=seal_account(limit_key, subject, account, request_id="seed-limit"),
                features=limit_key.seal(
                    SCHEMA_VERSION, subject, applicants()[0], request_id="seed-limit"
                ),
            ).SerializeToString(),
        )
    )
    seeds.append(
        (
            2,
            limit_service_pb2.AdjustLimitRequest(
                request_id="seed-limit-score",
                subject=subject,
                sealed_account=seal_account(
                    limit_key, subject, account, request_id="seed-limit-score"
                ),
                latest_score=560,
            ).SerializeToString(),
        )
    )
    event_key = DataKey(SERVER_KEY, EVALUATE_EVENT, identity=IDENTITY)
    for kind in EVENT_KINDS:
        event = alert_service_pb2.BehaviourEvent(event_id=f"seed-{kind}", balance_after=money)
        event.occurred_at.FromSeconds(1_790_000_000)
        details = getattr(event, kind)
        details.SetInParent()
        for clear_name in EVENT_CLEAR_FIELDS[kind].values():
            if clear_name == "days_past_due":
                details.days_past_due = 31
            else:
                getattr(details, clear_name).CopyFrom(money)
        if kind == "repayment":
            details.outcome = alert_service_pb2.REPAYMENT_OUTCOME_SUCCEEDED
        request_id = f"seed-event-{kind}"
        seeds.append(
            (
                3,
                alert_service_pb2.EvaluateEventRequest(
                    request_id=request_id,
                    subject=subject,
                    event=seal_event(event_key, subject, event, request_id=request_id),
                ).SerializeToString(),
            )
        )
    seeds.append(
        (
            4,
            alert_service_pb2.WatchAlertsRequest(
                min_severity=alert_service_pb2.SEVERITY_HIGH, after_sequence=3
            ).SerializeToString(),
        )
    )
    seeds.append((SEALED_MODE, os.urandom(256)))
    for number, (mode, payload) in enumerate(seeds):
        (directory / f"seed-{number:02d}").write_bytes(bytes([mode]) + payload)


def main(argv: list[str]) -> None:
    corpus = [arg for arg in argv[1:] if not arg.startswith("-")]
    if corpus:
        write_seeds(Path(corpus[0]))
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
