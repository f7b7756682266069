"""Prometheus metrics: every metric privscore exports, declared once, and what feeds them.

Two kinds of source. Per-event ones are observed where the event happens: the interceptor
times each call (`rpc`), the audit door counts each durable record (`records`: decisions,
limit actions, alerts and refusals all come from the records, the one place each decision is
described), the model batcher and the audit writers time their runs and commits. Everything a
scrape can read off the running server (audit totals, key ages, live subscribers, drift) is
read at scrape time by a collector, costing the calls nothing.

No label or value holds personal data, a feature value, an amount, a pseudonym or a request
id: labels are method names, outcomes, grades, rule names, status codes, versions and key
ids, and histograms are of scores, probabilities, sizes and durations (a single applicant's
score is not recoverable from a bucket count any more than from the audit log's totals). The
drift collector reports only what `service.monitoring.drift` reports, which merges small bins.

`NO_METRICS` is the same interface doing nothing, for a server without `--metrics-port`: the
call sites never branch.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.audit.record import recorded_probability
from service.privacy.keyring import KeyEntry

# go-grpc-prometheus's handling-time buckets (Prometheus' DefBuckets), so dashboards built for
# Go and Java servers read ours unchanged.
RPC_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCORE_BUCKETS = tuple(float(points) for points in range(400, 801, 20))
PROBABILITY_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
MODEL_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)

# A Score's decision comes from the policy's score cut-offs; limits and alerts name their rule.
SCORE_RULE = "score_cutoffs"
# grpc_type, as go-grpc-prometheus names the kinds of call privscore has.
UNARY = "unary"
SERVER_STREAM = "server_stream"


@dataclass(frozen=True)
class AuditTotals:
    """What an audit log has done since it opened (its `stats()`)."""

    records: int
    batches: int
    syncs: int  # fsyncs of the file log, transactions of the database's
    checkpoints: int


class RpcMetrics:
    """One method's RPC metrics, resolved once so a call costs two lookups, not label parsing."""

    def __init__(self, metrics: PrometheusMetrics, method: str, kind: str) -> None:
        service, _, name = method.strip("/").partition("/")
        labels = (kind, service, name)
        self._started = metrics.rpc_started.labels(*labels)
        self._received = metrics.rpc_received.labels(*labels)
        self._sent = metrics.rpc_sent.labels(*labels)
        self._seconds = metrics.rpc_seconds.labels(*labels)
        self._handled = metrics.rpc_handled
        self._labels = labels
        self._by_code: dict[str, Any] = {}

    def started(self) -> None:
        self._started.inc()
        self._received.inc()

    def sent(self) -> None:
        self._sent.inc()

    def handled(self, code: str, seconds: float) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self._labels, code)
        child.inc()
        self._seconds.observe(seconds)


class _NoRpc:
    def started(self) -> None:
        pass

    def sent(self) -> None:
        pass

    def handled(self, code: str, seconds: float) -> None:
        pass


class Metrics:
    """The interface every call site uses; this base does nothing (`NO_METRICS`)."""

    enabled = False
    _NO_RPC = _NoRpc()

    def rpc(self, method: str, kind: str = UNARY) -> RpcMetrics | _NoRpc:
        """A method's RPC metrics; `kind` is its grpc_type (UNARY or SERVER_STREAM)."""
        return self._NO_RPC

    def records(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Records that are durable in the audit log (decisions, refusals)."""

    def model_run(self, rows: int, seconds: float) -> None:
        """One onnxruntime run of `rows` rows (applicants and reason variants)."""

    def audit_commit(self, records: int, seconds: float) -> None:
        """One group commit of the audit log: its records and how long write + fsync (or the
        database transaction) took."""

    def drift_crossed(self, window: str, feature: str, level: str, by: int = 1) -> None:
        """A feature's (or the score's) drift status rose to `level` (watch or act); `by=0`
        only makes the series exist (at zero, so a rate over it works from the start)."""

    def watch(self, collector: Collector) -> None:
        """Read `collector` at every scrape (audit totals, keys, subscribers, drift)."""


NO_METRICS = Metrics()


class PrometheusMetrics(Metrics):
    enabled = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `_created` series: go-grpc-prometheus has none, and dashboards do not use them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        rpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        r = self.registry
        self.rpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", rpc_labels, registry=r
        )
        self.rpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            (*rpc_labels, "grpc_code"),
            registry=r,
        )
        self.rpc_received = Counter(
            "grpc_server_msg_received_total",
            "RPC stream messages received on the server.",
            rpc_labels,
            registry=r,
        )
        self.rpc_sent = Counter(
            "grpc_server_msg_sent_total",
            "gRPC stream messages sent on the server.",
            rpc_labels,
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level handled by "
            "the server.",
            rpc_labels,
            buckets=RPC_SECONDS_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "privscore_decisions_total",
            "Decisions made and durably audited, by method, outcome, grade, the rule that "
            "decided, and the model and policy versions.",
            ("method", "decision", "grade", "rule", "model_version", "policy_version"),
            registry=r,
        )
        self.scores = Histogram(
            "privscore_score",
            "Scorecard scores of scored applicants.",
            ("model_version",),
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.probabilities = Histogram(
            "privscore_probability_of_default",
            "The model's probability of default for scored applicants.",
            ("model_version",),
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.limit_actions = Counter(
            "privscore_limit_actions_total",
            "Credit-limit decisions by action and the rule that fired.",
            ("action", "rule"),
            registry=r,
        )
        self.alerts = Counter(
            "privscore_alerts_total",
            "Alerts raised, by rule and severity.",
            ("rule", "severity"),
            registry=r,
        )
        self.refusals = Counter(
            "privscore_refusals_total",
            "Calls refused and audited, by method, status code and reason code.",
            ("method", "code", "reason"),
            registry=r,
        )
        self.audit_batch = Histogram(
            "privscore_audit_batch_records",
            "Records per audit group commit.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.audit_commit_seconds = Histogram(
            "privscore_audit_commit_seconds",
            "Time of one audit group commit: write and fsync (file log) or the transaction "
            "(PostgreSQL).",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=r,
        )
        self.model_rows = Histogram(
            "privscore_model_batch_rows",
            "Rows per onnxruntime run (applicants of concurrent calls and reason variants).",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "privscore_model_run_seconds",
            "Time of one onnxruntime run.",
            buckets=MODEL_SECONDS_BUCKETS,
            registry=r,
        )
        self.drift_crossings = Counter(
            "privscore_drift_crossings_total",
            "Times a feature's (or the score's) drift status rose to watch or act.",
            ("window", "feature", "level"),
            registry=r,
        )
        self._rpcs: dict[str, RpcMetrics] = {}
        # Label children resolved once per label set: `labels()` validates and locks on every
        # call, which per decision of a batch of 128 adds up.
        self._children: dict[tuple[Any, ...], Any] = {}

    def rpc(self, method: str, kind: str = UNARY) -> RpcMetrics:
        found = self._rpcs.get(method)
        if found is None:
            found = self._rpcs[method] = RpcMetrics(self, method, kind)
        return found

    def records(self, records: Sequence[Mapping[str, Any]]) -> None:
        for record in records:
            method = str(record.get("rpc", "")).rpartition("/")[2]
            if record.get("outcome") == "refused":
                self.refusals.labels(method, record.get("code", ""), record.get("reason", "")).inc()
                continue
            outputs = record.get("outputs")
            if not isinstance(outputs, Mapping):
                continue  # key rotations and other records that decide nothing
            versions = (str(record.get("model_version", "")), str(record.get("policy_version", "")))
            if "decision" in outputs:  # Score, ScoreBatch
                decision = (method, outputs["decision"], outputs.get("grade", ""), SCORE_RULE)
                self._child(self.decisions, *decision, *versions).inc()
                if "score" in outputs:
                    self._child(self.scores, versions[0]).observe(outputs["score"])
                self._child(self.probabilities, versions[0]).observe(
                    recorded_probability(outputs, 0.0)
                )
            elif "action" in outputs:  # AdjustLimit
                rule = str(outputs.get("rule", ""))
                self.decisions.labels(
                    method, outputs["action"], outputs.get("grade", ""), rule, *versions
                ).inc()
                self.limit_actions.labels(outputs["action"], rule).inc()
            elif "alerts" in outputs:  # EvaluateEvent: the most severe alert decides
                raised = outputs["alerts"]
                for alert in raised:
                    self.alerts.labels(alert["rule"], alert["severity"]).inc()
                first = raised[0] if raised else None
                self.decisions.labels(
                    method,
                    "ALERT" if first else "NO_ALERT",
                    "",
                    first["rule"] if first else "",
                    *versions,
                ).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_run(self, rows: int, seconds: float) -> None:
        self.model_rows.observe(rows)
        self.model_seconds.observe(seconds)

    def audit_commit(self, records: int, seconds: float) -> None:
        self.audit_batch.observe(records)
        self.audit_commit_seconds.observe(seconds)

    def drift_crossed(self, window: str, feature: str, level: str, by: int = 1) -> None:
        self.drift_crossings.labels(window, feature, level).inc(by)

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)


class Timer:
    """`with Timer() as t: ...; t.seconds` (perf_counter)."""

    seconds = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._start


class AuditCollector(Collector):
    """The audit log's totals since this process opened it, read at scrape time."""

    def __init__(self, stats: Callable[[], AuditTotals]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, help_text, value in (
            ("privscore_audit_records", "Audit records appended by this process.", stats.records),
            ("privscore_audit_batches", "Audit group commits by this process.", stats.batches),
            (
                "privscore_audit_syncs",
                "fsyncs (file log) or transactions (PostgreSQL) of the audit log.",
                stats.syncs,
            ),
            (
                "privscore_audit_checkpoints",
                "Signed audit checkpoints written by this process.",
                stats.checkpoints,
            ),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family


class KeyAgeCollector(Collector):
    """Seconds since each key in the keyring was made, by purpose, status and key id (ids
    are public: callers and reviewers see them)."""

    def __init__(
        self,
        entries: Callable[[], Iterable[KeyEntry]],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._entries = entries
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "privscore_key_age_seconds",
            "Seconds since the key was made.",
            labels=("purpose", "status", "key_id"),
        )
        now = self._clock()
        for entry in self._entries():
            labels = [entry.purpose, entry.status, entry.key_id]
            family.add_metric(labels, max(0.0, (now - entry.made_at).total_seconds()))
        yield family


class GaugeCollector(Collector):
    """One unlabelled gauge read from a function at scrape time."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._name = name
        self._help = help_text
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._help)
        family.add_metric([], self._read())
        yield family
