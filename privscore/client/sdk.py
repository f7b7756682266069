"""The client SDK: one call per RPC from a tenant, a raw customer id and plain feature values.

It pseudonymises the id with the caller's own key, seals a data key to the server's primary
public key for its own certificate identity and the method, encrypts every feature field by
field under it (bound to the request id and subject) and calls the RPC. An account's state and
an event's figures are given in clear, as the messages define them, and sealed the same way
before anything leaves the process (privscore/client/figures.py): the server refuses them in
clear. Sealed data keys are reused across requests within `KeyLimits` (by default 5 minutes,
10,000 requests or 16 MiB of field plaintext, whichever comes first; 0 turns reuse off), so
most calls cost the server no HPKE open. It needs the generated stubs, `cryptography` and
grpcio only (no server code, no model runtime): it is the client distribution's
(clients/python). The server's repository adds dev-key conveniences in service/client/sdk.py.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from privscore.client.envelope import (
    ACCOUNT_SCHEMA_VERSION,
    DEFAULT_MAX_AGE_S,
    EVENT_SCHEMA_VERSION,
    MAX_ENCRYPTIONS_PER_KEY,
    REQUEST_ID_METADATA,
    REQUEST_ID_SHAPE,
    SEALING_FORMAT,
    DataKey,
    FeatureInput,
    KeyLimits,
    ServerPublicKey,
    encode_value,
)
from privscore.client.figures import Figures, account_figures, event_figures
from privscore.client.pseudonym import Pseudonymiser
from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    common_pb2,
    discovery_service_pb2,
    discovery_service_pb2_grpc,
    limit_service_pb2,
    limit_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    outcome_service_pb2,
    outcome_service_pb2_grpc,
    privacy_service_pb2,
    privacy_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)

Features = Mapping[str, FeatureInput]


def _method(module: Any, service: str, method: str) -> str:
    """A method's full name, from the generated descriptors (the protos' one source)."""
    found = module.DESCRIPTOR.services_by_name[service]
    return f"/{found.full_name}/{found.methods_by_name[method].name}"


SCORE_METHOD = _method(scoring_service_pb2, "ScoringService", "Score")
SCORE_BATCH_METHOD = _method(scoring_service_pb2, "ScoringService", "ScoreBatch")
ADJUST_LIMIT_METHOD = _method(limit_service_pb2, "LimitService", "AdjustLimit")
EVALUATE_EVENT_METHOD = _method(alert_service_pb2, "AlertService", "EvaluateEvent")
DEFAULT_TIMEOUT_S = 10.0
Response = TypeVar("Response")


class DiscoveryRefused(RuntimeError):
    """What the server says it is cannot be used: another sealing format, no primary key, or
    not the key the caller pinned."""


def discover(
    channel: grpc.Channel, timeout: float = DEFAULT_TIMEOUT_S
) -> discovery_service_pb2.GetServerInfoResponse:
    """The server's sealing keys, schema and versions (DiscoveryService)."""
    stub = discovery_service_pb2_grpc.DiscoveryServiceStub(channel)
    info: discovery_service_pb2.GetServerInfoResponse = stub.GetServerInfo(
        discovery_service_pb2.GetServerInfoRequest(), timeout=timeout, metadata=trace_metadata()
    )
    return info


def sealing_key(
    info: discovery_service_pb2.GetServerInfoResponse, pinned: ServerPublicKey | None = None
) -> ServerPublicKey:
    """The key to seal to: the pinned one, which the server must list (same id, same bytes),
    or else the server's primary (trust on first use)."""
    if info.sealing_format != SEALING_FORMAT:
        raise DiscoveryRefused(
            f"the server opens sealing format {info.sealing_format}; this SDK seals format "
            f"{SEALING_FORMAT}"
        )
    listed = {key.key_id: key.public_key for key in info.sealing_keys}
    if pinned is not None:
        if listed.get(pinned.key_id) != pinned.public_key.public_bytes_raw():
            raise DiscoveryRefused(
                f"the server does not list the pinned key {pinned.key_id}: refusing to seal to "
                "a key it names instead"
            )
        return pinned
    primary = [
        key
        for key in info.sealing_keys
        if key.status == discovery_service_pb2.SEALING_KEY_STATUS_PRIMARY
    ]
    if len(primary) != 1:
        raise DiscoveryRefused("the server names no single primary sealing key")
    return ServerPublicKey(
        primary[0].key_id, x25519.X25519PublicKey.from_public_bytes(primary[0].public_key)
    )


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's current trace as W3C trace-context metadata (`traceparent`, `tracestate`),
    when the calling program uses OpenTelemetry (the API installed and a span current); else
    nothing. The server continues the trace, so a call shows inside the caller's own."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return ()
    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple(carrier.items())


def call_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """A call's metadata: its request id as `x-request-id` (so the id the server logs and
    returns in the trailers is the request's own) and the caller's trace context."""
    own = ((REQUEST_ID_METADATA, request_id),) if REQUEST_ID_SHAPE.fullmatch(request_id) else ()
    return own + trace_metadata()


def new_request_id() -> str:
    return uuid.uuid4().hex


def certificate_identity(pem: bytes) -> str | None:
    """The identity the server reads from this client certificate: its one SPIFFE URI SAN
    (gRPC's `peer_spiffe_id`, which it sets only for exactly one URI SAN), or None."""
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 and uris[0].startswith("spiffe://") else None


@dataclass
class _InUse:
    key: DataKey
    retires_at: float
    requests: int = 0
    plaintext_bytes: int = 0
    encryptions: int = 0


class DataKeyCache:
    """Sealed data keys reused across requests: one per method, retired when a request would
    take it past its age, requests, bytes or `MAX_ENCRYPTIONS_PER_KEY` fields. Thread-safe:
    a request reserves its share of a key under a lock, then encrypts outside it.

    The sealed grant carries the same limits, so the server honours a key no longer than
    this cache uses it. With reuse off (any limit 0) every request gets its own key, granted
    one request; so does a request larger than a key's byte limit.
    """

    def __init__(
        self,
        server_key: ServerPublicKey,
        identity: str | None,
        limits: KeyLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server_key = server_key
        self.identity = identity
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _InUse] = {}
        self.sealed_keys = 0  # HPKE seals so far

    def _seal(self, method: str, limits: KeyLimits) -> DataKey:
        if self.identity is None:
            raise ValueError(
                "sealing binds the caller's certificate identity, and this client has none: "
                "give identity= (the SPIFFE id of the client certificate)"
            )
        self.sealed_keys += 1
        return DataKey(self.server_key, method, identity=self.identity, limits=limits)

    def take(self, method: str, plaintext_bytes: int, fields: int) -> DataKey:
        """A key for one request that encrypts `fields` fields of `plaintext_bytes` bytes."""
        limits = self.limits
        if not limits.reuse or plaintext_bytes > limits.max_bytes:
            single = KeyLimits(limits.max_age_s or DEFAULT_MAX_AGE_S, 1, max(plaintext_bytes, 1))
            with self._lock:
                return self._seal(method, single)
        now = self._clock()
        with self._lock:
            in_use = self._keys.get(method)
            if (
                in_use is None
                or now >= in_use.retires_at
                or in_use.requests >= limits.max_requests
                or in_use.plaintext_bytes + plaintext_bytes > limits.max_bytes
                or in_use.encryptions + fields > MAX_ENCRYPTIONS_PER_KEY
            ):
                in_use = _InUse(self._seal(method, limits), now + limits.max_age_s)
                self._keys[method] = in_use
            in_use.requests += 1
            in_use.plaintext_bytes += plaintext_bytes
            in_use.encryptions += fields
            return in_use.key

    def retire(self, method: str, key: DataKey) -> None:
        """Stop reusing `key` (a call under it failed: the server may refuse it from now on)."""
        with self._lock:
            in_use = self._keys.get(method)
            if in_use is not None and in_use.key is key:
                del self._keys[method]


def _encoded(features: Features | Figures) -> list[tuple[str, bytes]]:
    return [(name, encode_value(value)) for name, value in features.items()]


def _size(plaintexts: Sequence[tuple[str, bytes]]) -> int:
    return sum(len(plaintext) for _, plaintext in plaintexts)


class PrivscoreClient:
    def __init__(
        self,
        channel: grpc.Channel,
        server_key: ServerPublicKey,
        pseudonymiser: Pseudonymiser,
        schema_version: str,
        *,
        identity: str | None,
        key_limits: KeyLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`identity` is the SPIFFE id of the client certificate the channel presents (the
        server opens a data key only for the identity it was sealed for); `key_limits` bound
        the reuse of sealed data keys (`KeyLimits()` by default; `KeyLimits(max_requests=0)`
        seals a fresh key for every request)."""
        self._pseudonymiser = pseudonymiser
        self.schema_version = schema_version
        self.data_keys = DataKeyCache(
            server_key, identity, KeyLimits() if key_limits is None else key_limits, clock=clock
        )
        self._scoring = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        self._limits = limit_service_pb2_grpc.LimitServiceStub(channel)
        self._alerts = alert_service_pb2_grpc.AlertServiceStub(channel)
        self._privacy = privacy_service_pb2_grpc.PrivacyServiceStub(channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(channel)
        self._outcomes = outcome_service_pb2_grpc.OutcomeServiceStub(channel)

    @classmethod
    def discovered(
        cls,
        channel: grpc.Channel,
        pseudonymiser: Pseudonymiser,
        *,
        identity: str | None,
        pinned: ServerPublicKey | None = None,
        key_limits: KeyLimits | None = None,
    ) -> Self:
        """A client sealing to the key and schema version the server names over the wire
        (DiscoveryService): only the caller's own secrets (pseudonym key, certificate) are
        local. `pinned`: a key the caller trusts already; the server must list it, and it is
        the one sealed to (for callers that must not trust first use)."""
        info = discover(channel)
        return cls(
            channel,
            sealing_key(info, pinned),
            pseudonymiser,
            info.schema_version,
            identity=identity,
            key_limits=key_limits,
        )

    def subject(self, tenant: str, customer_id: str) -> common_pb2.SubjectRef:
        return common_pb2.SubjectRef(
            tenant=tenant, pseudonym=self._pseudonymiser.pseudonym(tenant, customer_id)
        )

    def seal(
        self, method: str, request_id: str, subject: common_pb2.SubjectRef, features: Features
    ) -> common_pb2.EncryptedFeatures:
        """One request's features, sealed under the method's current data key."""
        return self._seal(method, request_id, subject, features)[0]

    def _seal(
        self, method: str, request_id: str, subject: common_pb2.SubjectRef, features: Features
    ) -> tuple[common_pb2.EncryptedFeatures, DataKey]:
        plaintexts = _encoded(features)
        key = self.data_keys.take(method, _size(plaintexts), len(plaintexts))
        sealed = key.seal_encoded(self.schema_version, subject, plaintexts, request_id=request_id)
        return sealed, key

    def _call(
        self,
        rpc: Callable[..., Response],
        request: Any,
        timeout: float,
        used: tuple[str, DataKey] | None,
    ) -> Response:
        """Call; a failed call retires the data key it used, so the next call seals anew
        (the server may have refused the key: retired server key, spent or expired grant)."""
        try:
            return rpc(request, timeout=timeout, metadata=call_metadata(request.request_id))
        except grpc.RpcError:
            if used is not None:
                self.data_keys.retire(*used)
            raise

    def score(
        self,
        tenant: str,
        customer_id: str,
        features: Features,
        *,
        request_id: str | None = None,
        offer_currency: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> scoring_service_pb2.ScoreResponse:
        """Score one applicant; with `offer_currency` (e.g. "CNY"), an approved applicant's
        response carries the initial limit the policy offers (`initial_limit`)."""
        request_id = request_id or new_request_id()
        subject = self.subject(tenant, customer_id)
        sealed, key = self._seal(SCORE_METHOD, request_id, subject, features)
        request = scoring_service_pb2.ScoreRequest(
            request_id=request_id, subject=subject, features=sealed, offer_currency=offer_currency
        )
        return self._call(self._scoring.Score, request, timeout, (SCORE_METHOD, key))

    def score_batch(
        self,
        tenant: str,
        applicants: Sequence[tuple[str, Features]],
        *,
        request_id: str | None = None,
        offer_currency: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> scoring_service_pb2.ScoreBatchResponse:
        """Score (customer id, features) pairs; every item is sealed under one data key (the
        batch counts as one request against its limits, its items' bytes all count)."""
        request_id = request_id or new_request_id()
        encoded = [
            (self.subject(tenant, customer_id), _encoded(features))
            for customer_id, features in applicants
        ]
        key = self.data_keys.take(
            SCORE_BATCH_METHOD,
            sum(_size(plaintexts) for _, plaintexts in encoded),
            sum(len(plaintexts) for _, plaintexts in encoded),
        )
        items = [
            scoring_service_pb2.ScoreBatchItem(
                subject=subject,
                features=key.seal_encoded(
                    self.schema_version, subject, plaintexts, request_id=request_id
                ),
            )
            for subject, plaintexts in encoded
        ]
        request = scoring_service_pb2.ScoreBatchRequest(
            request_id=request_id, items=items, offer_currency=offer_currency
        )
        return self._call(self._scoring.ScoreBatch, request, timeout, (SCORE_BATCH_METHOD, key))

    def adjust_limit(
        self,
        tenant: str,
        customer_id: str,
        account: limit_service_pb2.AccountState,
        *,
        latest_score: int | None = None,
        features: Features | None = None,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> limit_service_pb2.AdjustLimitResponse:
        """Decide a new limit. The score: features scored in the same call, or a `latest_score`
        the caller states (only a role allowed to state scores may), or neither: the subject's
        latest Score decision as privscore recorded it.

        `account` is the clear message, in this process only: its figures travel sealed in
        `sealed_account` ("account/1"), under the same data key as the features when there are
        any (the server charges the key one request for the call)."""
        if latest_score is not None and features is not None:
            raise ValueError("give at most one of latest_score or features")
        request_id = request_id or new_request_id()
        subject = self.subject(tenant, customer_id)
        account_plaintexts = _encoded(account_figures(account))
        feature_plaintexts = _encoded(features) if features is not None else []
        both = account_plaintexts + feature_plaintexts
        key = self.data_keys.take(ADJUST_LIMIT_METHOD, _size(both), len(both))
        request = limit_service_pb2.AdjustLimitRequest(
            request_id=request_id,
            subject=subject,
            sealed_account=key.seal_encoded(
                ACCOUNT_SCHEMA_VERSION, subject, account_plaintexts, request_id=request_id
            ),
        )
        if features is not None:
            request.features.CopyFrom(
                key.seal_encoded(
                    self.schema_version, subject, feature_plaintexts, request_id=request_id
                )
            )
        elif latest_score is not None:
            request.latest_score = latest_score
        return self._call(self._limits.AdjustLimit, request, timeout, (ADJUST_LIMIT_METHOD, key))

    def evaluate_event(
        self,
        tenant: str,
        customer_id: str,
        event: alert_service_pb2.BehaviourEvent,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> alert_service_pb2.EvaluateEventResponse:
        """Report one behaviour event. `event` holds its figures in clear, in this process
        only: what is sent is a copy with those fields cleared and the figures sealed in
        `sealed_figures` ("event/1"); a login without a balance has none to seal."""
        request_id = request_id or new_request_id()
        subject = self.subject(tenant, customer_id)
        clear, figures = event_figures(event)
        used = None
        if figures:
            plaintexts = _encoded(figures)
            key = self.data_keys.take(EVALUATE_EVENT_METHOD, _size(plaintexts), len(plaintexts))
            clear.sealed_figures.CopyFrom(
                key.seal_encoded(EVENT_SCHEMA_VERSION, subject, plaintexts, request_id=request_id)
            )
            used = (EVALUATE_EVENT_METHOD, key)
        request = alert_service_pb2.EvaluateEventRequest(
            request_id=request_id, subject=subject, event=clear
        )
        return self._call(self._alerts.EvaluateEvent, request, timeout, used)

    def update_alert_state(
        self,
        alert_sequence: int,
        state: alert_service_pb2.AlertState.ValueType,
        reason_code: str,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> alert_service_pb2.UpdateAlertStateResponse:
        """Acknowledge (ALERT_STATE_ACKNOWLEDGED) or resolve (ALERT_STATE_RESOLVED) the alert
        raised at `alert_sequence`, with an upper-snake-case reason code such as
        "CUSTOMER_CONTACTED" (never free text: it is recorded). A resolved alert no longer
        freezes or holds the subject's limit."""
        request = alert_service_pb2.UpdateAlertStateRequest(
            request_id=request_id or new_request_id(),
            alert_sequence=alert_sequence,
            state=state,
            reason_code=reason_code,
        )
        return self._call(self._alerts.UpdateAlertState, request, timeout, None)

    def explain_decision(
        self, decision_id: str, *, request_id: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> privacy_service_pb2.ExplainDecisionResponse:
        """The decision explained in every language of the server's catalogue (zh-CN, then
        en), with what would most change a declined or reviewed outcome."""
        request = privacy_service_pb2.ExplainDecisionRequest(
            request_id=request_id or new_request_id(), decision_id=decision_id
        )
        return self._call(self._privacy.ExplainDecision, request, timeout, None)

    def export_subject(
        self,
        tenant: str,
        *,
        customer_id: str | None = None,
        pseudonym: str | None = None,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Everything privscore keeps about one subject (decisions with their explanations,
        limits, events, alerts), as the parsed JSON document (docs/subject-export.md). The
        subject by raw customer id (pseudonymised here) or by the pseudonym itself."""
        request = privacy_service_pb2.ExportSubjectRequest(
            request_id=request_id or new_request_id(),
            subject=self._subject_of(tenant, customer_id, pseudonym),
        )
        response = self._call(self._privacy.ExportSubject, request, timeout, None)
        document: dict[str, Any] = json.loads(response.document.decode("utf-8"))
        return document

    def erase_subject(
        self,
        tenant: str,
        *,
        customer_id: str | None = None,
        pseudonym: str | None = None,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> privacy_service_pb2.EraseSubjectResponse:
        """Erase one subject's events, alerts, limit decisions and recorded scores (and the key
        their audit records' personal fields are sealed under); `erased` is False when nothing
        was kept. The subject by raw customer id or by pseudonym."""
        request = privacy_service_pb2.EraseSubjectRequest(
            request_id=request_id or new_request_id(),
            subject=self._subject_of(tenant, customer_id, pseudonym),
        )
        return self._call(self._privacy.EraseSubject, request, timeout, None)

    def get_models(self, *, timeout: float = DEFAULT_TIMEOUT_S) -> model_service_pb2.ServedModels:
        """The champion, the challenger in shadow and the champion a promotion replaced."""
        response: model_service_pb2.GetModelsResponse = self._models.GetModels(
            model_service_pb2.GetModelsRequest(), timeout=timeout, metadata=trace_metadata()
        )
        return response.models

    def change_models(
        self,
        change: str,
        *,
        model_dir: str = "",
        model_version: str = "",
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> model_service_pb2.ServedModels:
        """One model change while serving (role model_admin), recorded before it takes effect:
        "load" a signed artifact at `model_dir` (a path on the server) as the challenger,
        "promote" the challenger (naming its `model_version`), "rollback" the last promotion,
        or "unload" the challenger. Returns the models serving after it."""
        request_id = request_id or new_request_id()
        calls: dict[str, tuple[Callable[..., Any], Any]] = {
            "load": (
                self._models.LoadChallenger,
                model_service_pb2.LoadChallengerRequest(request_id=request_id, model_dir=model_dir),
            ),
            "promote": (
                self._models.PromoteChallenger,
                model_service_pb2.PromoteChallengerRequest(
                    request_id=request_id, model_version=model_version
                ),
            ),
            "rollback": (
                self._models.RollbackChampion,
                model_service_pb2.RollbackChampionRequest(request_id=request_id),
            ),
            "unload": (
                self._models.UnloadChallenger,
                model_service_pb2.UnloadChallengerRequest(request_id=request_id),
            ),
        }
        if change not in calls:
            raise ValueError(f"change must be one of {', '.join(calls)}")
        rpc, request = calls[change]
        response = self._call(rpc, request, timeout, None)
        models: model_service_pb2.ServedModels = response.models
        return models

    def record_outcome(
        self,
        decision_id: str,
        outcome: outcome_service_pb2.Outcome.ValueType,
        observed_at: dt.datetime,
        definition: str,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> outcome_service_pb2.RecordOutcomeResponse:
        """What happened after a Score decision (role outcome_recorder), by its decision id
        only: OUTCOME_BAD, OUTCOME_GOOD or OUTCOME_INDETERMINATE under `definition` (an
        upper-snake code such as "DPD90_WITHIN_12M"), observed at a timezone-aware time."""
        request = outcome_service_pb2.RecordOutcomeRequest(
            request_id=request_id or new_request_id(),
            decision_id=decision_id,
            outcome=outcome,
            definition=definition,
        )
        request.observed_at.FromDatetime(observed_at)
        return self._call(self._outcomes.RecordOutcome, request, timeout, None)

    def _subject_of(
        self, tenant: str, customer_id: str | None, pseudonym: str | None
    ) -> common_pb2.SubjectRef:
        """A subject named by exactly one of a raw customer id or a pseudonym (a privacy
        office may hold only the pseudonym, e.g. from an audit record)."""
        if pseudonym is None and customer_id is not None:
            return self.subject(tenant, customer_id)
        if customer_id is None and pseudonym is not None:
            return common_pb2.SubjectRef(tenant=tenant, pseudonym=pseudonym)
        raise ValueError("give exactly one of customer_id or pseudonym")

    def watch_alerts(
        self,
        min_severity: alert_service_pb2.Severity.ValueType = alert_service_pb2.SEVERITY_UNSPECIFIED,
        after_sequence: int | None = None,
        timeout: float | None = None,
    ) -> Generator[alert_service_pb2.Alert, None, None]:
        """Alerts as they are raised and as their state changes. Closing the generator (or
        dropping it) cancels the stream, so a watcher that stops reading ends its call."""
        request = alert_service_pb2.WatchAlertsRequest(min_severity=min_severity)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        stream = self._alerts.WatchAlerts(request, timeout=timeout, metadata=trace_metadata())
        try:
            for response in stream:
                yield response.alert
        finally:
            # A no-op once the stream has ended; grpc-stubs leave RpcContext.cancel unannotated.
            stream.cancel()  # type: ignore[no-untyped-call]
