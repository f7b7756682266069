"""Builds and runs the grpc.aio server: interceptors, servicers, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import signal
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection, reflection_pb2

from privscore.v1 import (
    alert_service_pb2,
    alert_service_pb2_grpc,
    audit_service_pb2,
    audit_service_pb2_grpc,
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
from service.api.alerts import AlertServicer
from service.api.audit import AuditServicer, file_prover
from service.api.discovery import DiscoveryServicer
from service.api.ledger import EmbeddedLedger, FailClosedAudit, Ledger
from service.api.limits import LimitServicer
from service.api.models import ModelControl, ModelRefused, ModelServicer, shadows
from service.api.outcomes import OutcomeServicer
from service.api.privacy import PrivacyServicer, expire
from service.api.reconcile import (
    STORE_RECONCILE,
    LoggedDecisions,
    ReconcileError,
    compare,
    restore,
)
from service.api.records import FileRecords, PgRecords, RecordFinder
from service.api.runtime import Prover, Runtime, RuntimeSlot
from service.api.scoring import ScoringServicer
from service.api.validation import well_formed_request_id, well_formed_subject
from service.audit import AuditError, AuditLog, AuditWriteError, Signer, establish_identity
from service.config import ServerSettings
from service.decisions.alert_stream import AlertStream
from service.decisions.policy import DecisionPolicy, PolicyError, load_policy
from service.decisions.store import DecisionStore, StoreError, StoreTampered
from service.errors import ServiceError
from service.explain import CatalogueError, default_catalogue
from service.files import write_private
from service.interceptors import RequestContextInterceptor
from service.model.manifest import ArtifactError
from service.model.scorer import ModelBatcher, Scorer
from service.monitoring import tracing
from service.monitoring.drift import DriftMonitor
from service.monitoring.drift_watch import DriftCollector, DriftWatch
from service.monitoring.http import MetricsEndpoint
from service.monitoring.metrics import (
    NO_METRICS,
    AuditCollector,
    AuditTotals,
    GaugeCollector,
    KeyAgeCollector,
    Metrics,
    PrometheusMetrics,
)
from service.privacy.digest import (
    derive_audit_mac_key,
    derive_input_digest_key,
    derive_record_key,
    derive_state_key,
)
from service.privacy.keyring import Keyring, KeyringError, load_kek
from service.privacy.sealing import FeatureOpener
from service.security.authz import AuthzPolicyError, load_authz_policy
from service.workers import WORKER_INDEX_ENV

if TYPE_CHECKING:
    from service.audit.pg import PgAuditLog
    from service.server_pg import DatabaseParts

SERVICE_NAMES = (
    scoring_service_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
    limit_service_pb2.DESCRIPTOR.services_by_name["LimitService"].full_name,
    alert_service_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name,
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    discovery_service_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name,
    privacy_service_pb2.DESCRIPTOR.services_by_name["PrivacyService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    outcome_service_pb2.DESCRIPTOR.services_by_name["OutcomeService"].full_name,
)
# "" is the whole server's status, as grpc_health_probe and Kubernetes ask by default.
HEALTH_NAMES = ("", *SERVICE_NAMES)
HEALTH_POLL_SECONDS = 0.5  # how soon health follows the database going and coming back
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

log = structlog.get_logger("privscore.server")


def _skip_fsync(_fd: int) -> None:
    """`--audit-fsync off`: benchmarks only, to price durability."""


def stored_alert(sequence: int, blob: bytes) -> alert_service_pb2.Alert:
    """An alert as the store keeps it, numbered: a raised alert is its own `alert_sequence`
    and, if stored before alerts had states, open. An erased one is empty (no subject): the
    stream passes over it."""
    alert = alert_service_pb2.Alert.FromString(blob)
    alert.sequence = sequence
    if blob and not alert.alert_sequence:
        alert.alert_sequence = sequence
    if blob and not alert.state:
        alert.state = alert_service_pb2.ALERT_STATE_OPEN
    return alert


class AlertSource:
    """What the alert stream reads from the ledger: stored alerts after a cursor, and the
    highest number stored."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def fetch(self, cursor: int, limit: int) -> list[alert_service_pb2.Alert]:
        alerts = []
        for sequence, blob in await self._ledger.alerts_after(cursor, limit):
            alerts.append(stored_alert(sequence, blob))
        return alerts

    async def last_stored(self) -> int:
        return await self._ledger.last_alert_sequence()


class StartupError(RuntimeError):
    """The server cannot start; the message says why, without secrets."""


def _load_sync(settings: ServerSettings) -> tuple[Keyring, Scorer, DecisionPolicy]:
    """The blocking part of start-up, run off the event loop."""
    try:
        keyring = Keyring.load(settings.keyring, load_kek(settings.kek_file))
    except KeyringError as error:
        raise StartupError(f"keys: {error}") from None
    try:
        scorer = Scorer(settings.model_dir, settings.model_public_key)
    except ArtifactError as error:
        raise StartupError(f"model refused: {error}") from None
    try:
        policy = load_policy(settings.policy)
    except PolicyError as error:
        raise StartupError(f"policy: {error}") from None
    return keyring, scorer, policy


def _open_store(settings: ServerSettings, state_key: bytes) -> DecisionStore:
    try:
        return DecisionStore(settings.layout.decision_store, state_key)
    except StoreError as error:
        raise StartupError(f"store: {error}") from None


def _tls(settings: ServerSettings) -> grpc.ServerCredentials:
    """Mutual TLS: the server's certificate, and client certificates required from the CA.
    gRPC negotiates TLS 1.3; the interceptor refuses calls over anything older."""
    try:
        return grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=settings.tls_ca.read_bytes(),
            require_client_auth=True,
        )
    except OSError as error:
        raise StartupError(f"TLS files: {error.strerror}") from None


class PrivscoreServer:
    """One running server; `start`, then `stop`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.health = health_aio.HealthServicer()
        self.slot = RuntimeSlot()
        self._audit_log: AuditLog | PgAuditLog | None = None
        self._database: DatabaseParts | None = None
        self._watch: asyncio.Task[None] | None = None
        self._serving = False  # what health says of the whole server now
        self.port = 0
        monitoring = settings.monitoring
        self.metrics: Metrics = (
            NO_METRICS if monitoring.metrics_port is None else PrometheusMetrics()
        )
        self._metrics_http: MetricsEndpoint | None = None
        self._drift_watch: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        try:
            authz = load_authz_policy(settings.authz_policy)
        except AuthzPolicyError as error:
            raise StartupError(f"authorisation policy: {error}") from None
        self._server = grpc.aio.server(
            interceptors=[
                RequestContextInterceptor(
                    authz, settings.limits, on_refusal=self._audit_refusal, metrics=self.metrics
                )
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Share the port only with the other workers of one supervisor: a second server
                # started by mistake on a port in use must fail, not quietly take half the calls.
                ("grpc.so_reuseport", 1 if WORKER_INDEX_ENV in os.environ else 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        scoring_service_pb2_grpc.add_ScoringServiceServicer_to_server(
            ScoringServicer(self.slot), self._server
        )
        limit_service_pb2_grpc.add_LimitServiceServicer_to_server(
            LimitServicer(self.slot), self._server
        )
        alert_service_pb2_grpc.add_AlertServiceServicer_to_server(
            AlertServicer(self.slot), self._server
        )
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(
            AuditServicer(self.slot), self._server
        )
        discovery_service_pb2_grpc.add_DiscoveryServiceServicer_to_server(
            DiscoveryServicer(self.slot), self._server
        )
        privacy_service_pb2_grpc.add_PrivacyServiceServicer_to_server(
            PrivacyServicer(self.slot, default_catalogue()), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.slot, self._model_control()), self._server
        )
        outcome_service_pb2_grpc.add_OutcomeServiceServicer_to_server(
            OutcomeServicer(self.slot), self._server
        )
        if settings.reflection:
            _serve_reflection(
                (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                self._server,
            )

    async def start(self) -> None:
        await self.listen()
        await self.become_ready()

    async def listen(self) -> None:
        """Accept connections with health NOT_SERVING, so probes can watch start-up."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        settings = self.settings
        try:
            if settings.insecure:
                log.warning(
                    "server.insecure",
                    detail="plaintext on loopback: every call is unauthenticated; use mutual TLS",
                )
                self.port = self._server.add_insecure_port(settings.address)
            else:
                self.port = self._server.add_secure_port(settings.address, _tls(settings))
        except RuntimeError:
            raise StartupError(f"cannot listen on {settings.address}") from None
        await self._server.start()
        if isinstance(self.metrics, PrometheusMetrics):
            port = settings.monitoring.metrics_port
            assert port is not None
            worker = os.environ.get(WORKER_INDEX_ENV)
            if port and worker is not None:
                # --workers N: worker i serves its own metrics on --metrics-port + i (each
                # process counts only its own calls; a scraper sums them).
                port += int(worker)
            try:
                self._metrics_http = MetricsEndpoint.start(
                    self.metrics.registry, settings.monitoring.metrics_bind, port
                )
            except OSError as error:
                raise StartupError(f"cannot serve metrics: {error.strerror}") from None
        log.info(
            "server.listening",
            bind=settings.bind,
            port=self.port,
            transport="plaintext" if settings.insecure else "mutual TLS",
        )

    async def become_ready(self) -> None:
        """Load keys, model, policy, store and audit log, then turn health SERVING."""
        settings = self.settings
        keyring, scorer, policy = await asyncio.to_thread(_load_sync, settings)
        _, signing_key = keyring.audit_signing_key()
        secret = keyring.server_secret()
        if not settings.audit_fsync:
            log.warning("audit.fsync_off", detail="benchmark mode: decisions are not crash-safe")
        try:
            default_catalogue().check_schema(scorer.manifest.schema)
        except CatalogueError as error:
            raise StartupError(f"explanations: {error}") from None
        if settings.database.database_url is None:
            ledger, prove, alerts = await self._embedded(signing_key, secret, policy)
            records: RecordFinder = FileRecords(settings.layout.audit_dir)
        else:
            ledger, prove, alerts = await self._postgres(signing_key, secret)
            assert self._database is not None
            records = PgRecords(self._database.pool)
        audit_log = self._audit_log
        assert audit_log is not None
        challenger = (
            await self._load_model(settings.challenger_dir)
            if settings.challenger_dir is not None
            else None
        )
        if challenger is not None and not shadows(scorer, challenger):
            raise StartupError(
                f"challenger: its feature schema {challenger.scorer.schema_version} lacks "
                f"inputs of the champion's {scorer.schema_version}"
            )
        started = dt.datetime.now(dt.UTC)
        runtime = Runtime(
            model=ModelBatcher(scorer, on_run=self.metrics.model_run),
            challenger=challenger,
            loaded_at={
                model.manifest_sha256: started
                for model in (scorer, challenger.scorer if challenger else None)
                if model is not None
            },
            keyring=keyring,
            opener=FeatureOpener(keyring),
            policy=policy,
            ledger=ledger,
            alerts=AlertStream(
                alerts.fetch,
                await ledger.last_alert_sequence(),
                settings.limits.max_alert_subscribers,
                settings.limits.max_alert_subscribers_per_identity,
                last_stored=alerts.last_stored,
            ),
            audit=ledger.audit,
            audit_verifier=audit_log.verifier,
            audit_origin=audit_log.origin,
            input_digest_key=derive_input_digest_key(secret),
            record_key=derive_record_key(secret),
            prove=prove,
            records=records,
            drift=self._drift_monitor(scorer),
        )
        if self._database is not None:
            self._database.listen(runtime.alerts)
        self._watch_runtime(runtime, audit_log)
        self.slot.fill(runtime)
        self._retention = asyncio.create_task(self._expire(runtime), name="retention")
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self._database is not None:
            self._watch = asyncio.create_task(self._watch_database(), name="database-health")
        log.info(
            "server.ready",
            port=self.port,
            pid=os.getpid(),
            model_version=scorer.model_version,
            schema_version=scorer.schema_version,
            policy_version=policy.version,
            backend="embedded" if self._database is None else "postgresql",
            metrics_port=self._metrics_http.port if self._metrics_http is not None else None,
        )

    async def _expire(self, runtime: Runtime) -> None:
        """Retention expiry on its schedule, from start-up on: subject keys of periods past
        the retention period are destroyed (service/api/privacy.py `expire`), audited. A
        failure is logged and tried again next time, never taken as done."""
        retention = self.settings.retention
        while True:
            try:
                destroyed = await expire(runtime, retention.retention_days)
            except Exception as error:  # noqa: BLE001 - logged; the schedule goes on
                log.error("retention.failed", error_type=type(error).__name__)
            else:
                if destroyed:
                    log.info("retention.expired", keys=destroyed)
            await asyncio.sleep(retention.retention_interval_s)

    async def _load_model(self, model_dir: Path) -> ModelBatcher:
        """A signed artifact verified against the model team's key, as the champion was."""
        try:
            scorer = await asyncio.to_thread(Scorer, model_dir, self.settings.model_public_key)
        except (ArtifactError, OSError) as error:
            raise ModelRefused(f"the artifact in model_dir is refused: {error}") from None
        try:  # a model that may be promoted must be explainable to the customers it decides
            default_catalogue().check_schema(scorer.manifest.schema)
        except CatalogueError as error:
            raise ModelRefused(f"the explanation catalogue does not cover it: {error}") from None
        return ModelBatcher(scorer, on_run=self.metrics.model_run)

    def _model_control(self) -> ModelControl:
        def retire(model: ModelBatcher) -> None:
            # Closed once every call that could hold it has ended: the longest deadline a
            # call may have, and the shutdown grace on top.
            delay = self.settings.limits.max_deadline_seconds + self.settings.grace_seconds
            loop = asyncio.get_running_loop()
            loop.call_later(delay, lambda: loop.run_in_executor(None, model.close))

        def swap(runtime: Runtime) -> None:
            before = self.slot.peek()
            self.slot.fill(runtime)
            if before is not None and before.drift is not runtime.drift:
                self._watch_drift(runtime)

        return ModelControl(
            load=self._load_model,
            retire=retire,
            drift=lambda model: self._drift_monitor(model.scorer),
            swap=swap,
        )

    def _watch_drift(self, runtime: Runtime) -> None:
        """The drift watch of the champion serving now (a promotion brings its own bins)."""
        if self._drift_watch is not None:
            self._drift_watch.cancel()
            self._drift_watch = None
        if runtime.drift is not None:
            watch = DriftWatch(runtime.drift, self.metrics)
            self._drift_watch = asyncio.create_task(watch.run(), name="drift-watch")

    def _drift_monitor(self, scorer: Scorer) -> DriftMonitor | None:
        reference = scorer.manifest.drift_reference
        if reference is None:
            log.warning("drift.off", why="the model's manifest has no drift reference")
            return None
        monitoring = self.settings.monitoring
        return DriftMonitor(
            reference, window=monitoring.drift_window, min_count=monitoring.drift_min_count
        )

    def _watch_runtime(self, runtime: Runtime, audit_log: AuditLog | PgAuditLog) -> None:
        """What a scrape reads off the running server: audit totals and commit times, key
        ages, live alert subscribers, drift; and the drift watch, which logs crossings
        whether or not metrics are served."""
        metrics = self.metrics
        self._watch_drift(runtime)
        if runtime.drift is not None:
            slot = self.slot
            metrics.watch(DriftCollector(lambda: found.drift if (found := slot.peek()) else None))
        if not metrics.enabled:
            return
        audit_log.on_commit = metrics.audit_commit
        metrics.watch(AuditCollector(lambda: AuditTotals(*astuple(audit_log.stats))))
        slot = self.slot
        metrics.watch(
            KeyAgeCollector(lambda: found.keyring.entries if (found := slot.peek()) else [])
        )
        metrics.watch(
            GaugeCollector(
                "privscore_alert_subscribers",
                "Alert streams open on this process now.",
                runtime.alerts.subscribers,
            )
        )

    async def _embedded(
        self, signing_key: Ed25519PrivateKey, secret: bytes, policy: DecisionPolicy
    ) -> tuple[Ledger, Prover, AlertSource]:
        """SQLite and the file log under the data directory, reconciled before serving."""
        store = await asyncio.to_thread(_open_store, self.settings, derive_state_key(secret))
        try:
            logged = LoggedDecisions()
            audit_log = await asyncio.to_thread(
                self._open_audit_log, signing_key, derive_audit_mac_key(secret), logged.see
            )
        except AuditError as error:
            store.close()
            raise StartupError(f"audit log: {error}") from None
        self._audit_log = audit_log
        try:
            await asyncio.to_thread(
                self._reconcile_store, store, audit_log, logged, derive_record_key(secret), policy
            )
        except StartupError:
            store.close()
            raise
        ledger = EmbeddedLedger(
            store,
            FailClosedAudit(audit_log, self._audit_failed, self.metrics.records),
            on_failure=self._audit_failed,
        )
        prove = file_prover(self.settings.layout.audit_dir, audit_log.verifier, audit_log.origin)
        return ledger, prove, AlertSource(ledger)

    async def _postgres(
        self, signing_key: Ed25519PrivateKey, secret: bytes
    ) -> tuple[Ledger, Prover, AlertSource]:
        """The store and the log in PostgreSQL (service/server_pg.py)."""
        from service.server_pg import open_database

        parts = await open_database(
            self.settings,
            signing_key=signing_key,
            secret=secret,
            on_audit_failure=self._audit_failed,
            on_durable=self.metrics.records,
        )
        self._database = parts
        self._audit_log = parts.audit_log
        write_private(
            self.settings.layout.audit_verifier_key, (parts.audit_log.verifier.text + "\n").encode()
        )
        return parts.ledger, parts.audit_log.prove, AlertSource(parts.ledger)

    async def _watch_database(self) -> None:
        """Health follows the database: NOT_SERVING while the log cannot commit or the
        database does not answer, SERVING again by itself once it does."""
        assert self._database is not None
        up = True
        while True:
            healthy = await self._database.healthy()
            if not healthy and up:
                log.error("server.database_down", action="health NOT_SERVING")
            up = healthy
            # Set whenever health says otherwise, whoever turned it (a failed append too).
            if healthy != self._serving:
                if healthy:
                    log.info("server.database_back", action="health SERVING")
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING
                    if healthy
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    def _open_audit_log(
        self,
        signing_key: Ed25519PrivateKey,
        mac_key: bytes,
        observe: Callable[[int, bytes], None],
    ) -> AuditLog:
        """Open (and so check) this deployment's log, showing `observe` every record of the
        pass that checks it, and publish the key that verifies it."""
        settings = self.settings
        identity = establish_identity(settings.layout.audit_dir, settings.audit_origin)
        audit_log = AuditLog(
            settings.layout.audit_dir,
            signer=Signer(identity.key_name, signing_key),
            mac_key=mac_key,
            origin=identity.origin,
            checkpoint_seconds=settings.audit_checkpoint_seconds,
            fsync=os.fsync if settings.audit_fsync else _skip_fsync,
            observe=observe,
        )
        write_private(settings.layout.audit_verifier_key, (audit_log.verifier.text + "\n").encode())
        log.info(
            "audit.opened",
            origin=identity.origin,
            records=audit_log.recovery.size,
            checkpointed=audit_log.recovery.checkpointed,
            key_id=audit_log.verifier.key_id.hex(),
        )
        return audit_log

    def _reconcile_store(
        self,
        store: DecisionStore,
        audit_log: AuditLog,
        logged: LoggedDecisions,
        record_key: bytes,
        policy: DecisionPolicy,
    ) -> None:
        """Bring the store in line with the log before serving (service.api.reconcile): rows a
        crash or a deletion lost are rebuilt from their records; rows the log does not hold,
        or rows that fail their authentication, stop the start. Either outcome is audited."""
        retention = policy.alerts.retention_days
        outcome: dict[str, Any] = {}
        try:
            report = compare(logged, store, retention)
            if report.unlogged:
                outcome = {
                    "outcome": "refused",
                    "reason": "ROWS_NOT_IN_AUDIT_LOG",
                    "limit_decisions": len(report.unlogged_limit_decisions),
                    "events": len(report.unlogged_events),
                    "alerts": len(report.unlogged_alerts),
                }
                raise StartupError(
                    f"the decision store holds {report.unlogged} rows the audit log does not "
                    "record: the log lost acknowledged records or the rows were not written by "
                    "this server; refusing to start (`privscore store verify` lists them)"
                )
            if report.decided_twice:
                log.warning("store.request_decided_twice", requests=len(report.decided_twice))
            if report.missing:
                written = restore(
                    report, self.settings.layout.audit_dir, store, record_key, retention
                )
                outcome = {"outcome": "restored", "rows": written}
                log.warning("store.restored_from_audit_log", rows=written)
        except StoreTampered as error:
            outcome = {"outcome": "refused", "reason": "STORE_TAMPERED", "table": error.table}
            raise StartupError(
                f"store: {error}; refusing to start (`privscore store verify` lists the row; "
                "with --delete-tampered it removes it, and the next start rebuilds it from the "
                "audit log)"
            ) from None
        except (ReconcileError, AuditError) as error:
            outcome = {"outcome": "refused", "reason": "RECONCILE_FAILED"}
            raise StartupError(f"store: cannot reconcile with the audit log: {error}") from None
        finally:
            if outcome:
                now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
                audit_log.append_sync({"rpc": STORE_RECONCILE, "time": now, **outcome})

    async def reload_keys(self) -> None:
        """Pick up `privscore keys rotate|retire` without a restart: requests sealed to a new
        primary open, retired keys stop opening. A keyring that does not load is logged and
        the keys in use stay."""
        if self.slot.peek() is None:
            return
        settings = self.settings
        try:
            keyring = await asyncio.to_thread(
                lambda: Keyring.load(settings.keyring, load_kek(settings.kek_file))
            )
        except KeyringError as error:
            log.error("keys.reload_failed", reason=str(error))
            return
        # The runtime serving now (a model may have been swapped while the keyring loaded),
        # replaced whole like a model swap: a call in flight keeps the keys it started with.
        runtime = self.slot.peek()
        if runtime is None:
            return
        self.slot.fill(dataclasses.replace(runtime, keyring=keyring, opener=FeatureOpener(keyring)))
        usable = [
            e.key_id
            for e in keyring.entries
            if e.purpose == "field-encryption" and e.status != "retired"
        ]
        log.info("keys.reloaded", field_keys=usable)

    async def _audit_refusal(self, method: str, request: Any, error: ServiceError) -> None:
        runtime = self.slot.peek()
        if runtime is None:
            return  # not ready: the call was refused before anything could be decided
        await runtime.audit_refusal(
            method, well_formed_request_id(request), well_formed_subject(request), error
        )

    async def _audit_failed(self) -> None:
        log.error("audit.write_failed", action="health NOT_SERVING; decisions refused")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: Any) -> None:
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in HEALTH_NAMES:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Stop accepting, end alert streams, drain in-flight calls within the grace period,
        then flush and close the audit log and the store."""
        log.info("server.stopping", grace_seconds=self.settings.grace_seconds)
        if self._watch is not None:
            self._watch.cancel()  # health stays NOT_SERVING from here, whatever the database
        if self._drift_watch is not None:
            self._drift_watch.cancel()
        if self._retention is not None:
            self._retention.cancel()
        await self.health.enter_graceful_shutdown()
        runtime = self.slot.peek()
        if runtime is not None:
            runtime.alerts.close()
        await self._server.stop(self.settings.grace_seconds)
        self.slot.fill(None)
        try:
            if self._audit_log is not None:
                await self._audit_log.close()  # writes the final signed checkpoint
        except AuditWriteError as error:
            log.error("audit.close_failed", reason=str(error))
        if runtime is not None:
            runtime.close()
        if self._database is not None:
            await self._database.close()
        if self._metrics_http is not None:
            self._metrics_http.stop()
        log.info("server.stopped")


# grpc.reflection.v1 is v1alpha under its final name: the same messages, field for field
# (grpc/reflection/v1/reflection.proto), which grpcio-reflection does not serve. Tools that
# speak only v1 (newer grpcurl, Postman, grpc-js's reflection clients) get the same answers.
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def _serve_reflection(services: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Reflection in both v1 and v1alpha, each listing every service (and both of itself)."""
    listed = (*services, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(listed)  # type: ignore[attr-defined]
    reflection.enable_server_reflection(listed, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1_SERVICE, {"ServerReflectionInfo": handler}
            ),
        )
    )


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the keyring."""
    try:
        traced = tracing.configure()
    except tracing.TracingError as error:
        log.error("server.refused_to_start", reason=str(error))
        raise StartupError(str(error)) from None
    if traced:
        log.info("tracing.on", exporter="otlp")
    try:
        await _serve(settings)
    finally:
        tracing.shutdown()


async def _serve(settings: ServerSettings) -> None:
    server = PrivscoreServer(settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload_keys() -> None:
        task = loop.create_task(server.reload_keys())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    await server.listen()
    try:
        await server.become_ready()
    except StartupError as error:
        log.error("server.refused_to_start", reason=str(error))
        await server.stop()
        raise
    loop.add_signal_handler(signal.SIGHUP, reload_keys)
    await stop_requested.wait()
    await server.stop()
