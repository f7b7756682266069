"""The client SDK: one call per RPC from a tenant, a raw customer id and plain feature values.

It pseudonymises the id with the caller's own key, seals a fresh data key to the server's
primary public key, encrypts every feature field by field and calls the RPC. It needs the
generated stubs and the privacy room only: no model runtime.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    common_pb2,
    limit_service_pb2,
    limit_service_pb2_grpc,
    scoring_service_pb2,
    scoring_service_pb2_grpc,
)
from service.config import DataLayout
from service.privacy.pseudonym import Pseudonymiser
from service.privacy.sealing import DataKey, FeatureInput, ServerPublicKey, load_public_keyset

Features = Mapping[str, FeatureInput]
SCORE_METHOD = "/privscore.v1.ScoringService/Score"
SCORE_BATCH_METHOD = "/privscore.v1.ScoringService/ScoreBatch"
ADJUST_LIMIT_METHOD = "/privscore.v1.LimitService/AdjustLimit"
DEFAULT_TIMEOUT_S = 10.0


def new_request_id() -> str:
    return uuid.uuid4().hex


class PrivscoreClient:
    def __init__(
        self,
        channel: grpc.Channel,
        server_key: ServerPublicKey,
        pseudonymiser: Pseudonymiser,
        schema_version: str,
    ) -> None:
        self._server_key = server_key
        self._pseudonymiser = pseudonymiser
        self.schema_version = schema_version
        self._scoring = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        self._limits = limit_service_pb2_grpc.LimitServiceStub(channel)
        self._alerts = alert_service_pb2_grpc.AlertServiceStub(channel)

    @classmethod
    def from_data_dir(
        cls, channel: grpc.Channel, data_dir: Path | str, schema_version: str
    ) -> PrivscoreClient:
        """Use the dev keys `privscore keys init` put under the data directory."""
        layout = DataLayout(Path(data_dir))
        return cls(
            channel,
            load_public_keyset(layout.public_keyset),
            Pseudonymiser.from_file(layout.pseudonym_key),
            schema_version,
        )

    def subject(self, tenant: str, customer_id: str) -> common_pb2.SubjectRef:
        return common_pb2.SubjectRef(
            tenant=tenant, pseudonym=self._pseudonymiser.pseudonym(tenant, customer_id)
        )

    def seal(
        self, method: str, request_id: str, subject: common_pb2.SubjectRef, features: Features
    ) -> common_pb2.EncryptedFeatures:
        data_key = DataKey(self._server_key, method, request_id)
        return data_key.seal(self.schema_version, subject, features)

    def score(
        self,
        tenant: str,
        customer_id: str,
        features: Features,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> scoring_service_pb2.ScoreResponse:
        request_id = request_id or new_request_id()
        subject = self.subject(tenant, customer_id)
        request = scoring_service_pb2.ScoreRequest(
            request_id=request_id,
            subject=subject,
            features=self.seal(SCORE_METHOD, request_id, subject, features),
        )
        response: scoring_service_pb2.ScoreResponse = self._scoring.Score(request, timeout=timeout)
        return response

    def score_batch(
        self,
        tenant: str,
        applicants: Sequence[tuple[str, Features]],
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> scoring_service_pb2.ScoreBatchResponse:
        """Score (customer id, features) pairs; one data key is sealed for the whole batch."""
        request_id = request_id or new_request_id()
        data_key = DataKey(self._server_key, SCORE_BATCH_METHOD, request_id)
        items = []
        for customer_id, features in applicants:
            subject = self.subject(tenant, customer_id)
            items.append(
                scoring_service_pb2.ScoreBatchItem(
                    subject=subject,
                    features=data_key.seal(self.schema_version, subject, features),
                )
            )
        request = scoring_service_pb2.ScoreBatchRequest(request_id=request_id, items=items)
        response: scoring_service_pb2.ScoreBatchResponse = self._scoring.ScoreBatch(
            request, timeout=timeout
        )
        return response

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
        """Decide a new limit from the latest score, or from features scored in the same call."""
        if (latest_score is None) == (features is None):
            raise ValueError("give exactly one of latest_score or features")
        request_id = request_id or new_request_id()
        subject = self.subject(tenant, customer_id)
        request = limit_service_pb2.AdjustLimitRequest(
            request_id=request_id, subject=subject, account=account
        )
        if features is not None:
            request.features.CopyFrom(self.seal(ADJUST_LIMIT_METHOD, request_id, subject, features))
        else:
            request.latest_score = latest_score  # type: ignore[assignment]
        response: limit_service_pb2.AdjustLimitResponse = self._limits.AdjustLimit(
            request, timeout=timeout
        )
        return response

    def evaluate_event(
        self,
        tenant: str,
        customer_id: str,
        event: alert_service_pb2.BehaviourEvent,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> alert_service_pb2.EvaluateEventResponse:
        request = alert_service_pb2.EvaluateEventRequest(
            request_id=request_id or new_request_id(),
            subject=self.subject(tenant, customer_id),
            event=event,
        )
        response: alert_service_pb2.EvaluateEventResponse = self._alerts.EvaluateEvent(
            request, timeout=timeout
        )
        return response

    def watch_alerts(
        self,
        min_severity: alert_service_pb2.Severity.ValueType = alert_service_pb2.SEVERITY_UNSPECIFIED,
        after_sequence: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[alert_service_pb2.Alert]:
        request = alert_service_pb2.WatchAlertsRequest(min_severity=min_severity)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        for response in self._alerts.WatchAlerts(request, timeout=timeout):
            yield response.alert
