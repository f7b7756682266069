"""The drift report as metrics and log lines: read at scrape time, crossings checked on a timer.

Series (the score's under `feature=":score"`, a name no model feature can have):

    privscore_drift_decisions{window}                        decisions the window holds
    privscore_drift_psi{window, feature}                     PSI (absent while insufficient)
    privscore_drift_status{window, feature}                  -1 insufficient, 0 ok, 1 watch, 2 act
    privscore_drift_share{window, feature, bin, population}  served / training share of each
                                                             reported bucket (merged by k)
    privscore_drift_crossings_total{window, feature, level}  times the status rose to watch / act
    privscore_drift_min_count                                k, for the reader

Everything comes from `DriftMonitor.report()`, which has already merged every bin holding
fewer than k decisions, so no series shows a bin an applicant could be singled out in. A
crossing is logged at WARNING (`drift.crossed`: window, feature, level, PSI rounded) and
counted; the watch runs every few seconds whether or not anyone scrapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.monitoring.drift import Drift, DriftMonitor, DriftReport, DriftStatus
from service.monitoring.metrics import Metrics

SCORE_SERIES = ":score"
CHECK_SECONDS = 5.0
STATUS_VALUES = {
    DriftStatus.INSUFFICIENT: -1,
    DriftStatus.OK: 0,
    DriftStatus.WATCH: 1,
    DriftStatus.ACT: 2,
}

log = structlog.get_logger("privscore.drift")


def series(report: DriftReport) -> Iterator[tuple[str, str, Drift]]:
    """(window name, series name, Drift) for every feature and the score of every window."""
    for window, found in report.windows.items():
        for feature, drift in found.features.items():
            yield window, feature, drift
        yield window, SCORE_SERIES, found.score


class DriftCollector(Collector):
    def __init__(self, monitor: DriftMonitor | Callable[[], DriftMonitor | None]) -> None:
        """`monitor`, or how to find the one serving now: a promoted champion brings its
        own (its training bins), so the scrape follows the model that decides."""
        self._monitor = monitor if callable(monitor) else (lambda: monitor)

    def collect(self) -> Iterator[Metric]:
        monitor = self._monitor()
        if monitor is None:
            return
        report = monitor.report()
        decisions = GaugeMetricFamily(
            "privscore_drift_decisions",
            "Scored decisions in the drift window (window: the last --drift-window; "
            "since_start: all since the process started).",
            labels=("window",),
        )
        for window, found in report.windows.items():
            decisions.add_metric([window], found.decisions)
        psi = GaugeMetricFamily(
            "privscore_drift_psi",
            "Population stability index of served vs training bins (small bins merged).",
            labels=("window", "feature"),
        )
        status = GaugeMetricFamily(
            "privscore_drift_status",
            "Drift status: -1 too few decisions, 0 ok (PSI < 0.1), 1 watch, 2 act (>= 0.25).",
            labels=("window", "feature"),
        )
        share = GaugeMetricFamily(
            "privscore_drift_share",
            "Share of decisions (served) and of training rows (training) in each reported "
            "bucket; bins holding fewer than k decisions appear only merged.",
            labels=("window", "feature", "bin", "population"),
        )
        for window, feature, drift in series(report):
            status.add_metric([window, feature], STATUS_VALUES[drift.status])
            if drift.psi is not None:
                psi.add_metric([window, feature], drift.psi)
            for bucket in drift.bins:
                share.add_metric([window, feature, bucket.label, "served"], bucket.served)
                share.add_metric([window, feature, bucket.label, "training"], bucket.training)
        k = GaugeMetricFamily(
            "privscore_drift_min_count", "k: the fewest decisions a reported bin holds."
        )
        k.add_metric([], report.min_count)
        yield from (decisions, psi, status, share, k)


class DriftWatch:
    """Checks the report every CHECK_SECONDS; logs and counts each rise in status."""

    def __init__(self, monitor: DriftMonitor, metrics: Metrics) -> None:
        self._monitor = monitor
        self._metrics = metrics
        self._last: dict[tuple[str, str], DriftStatus] = {}
        for window, feature, _ in series(monitor.report()):
            for level in (DriftStatus.WATCH, DriftStatus.ACT):
                metrics.drift_crossed(window, feature, level.value, by=0)

    def check(self) -> None:
        for window, feature, drift in series(self._monitor.report()):
            now = drift.status
            before = self._last.get((window, feature), DriftStatus.OK)
            self._last[(window, feature)] = now
            if now in (DriftStatus.WATCH, DriftStatus.ACT) and STATUS_VALUES[now] > max(
                STATUS_VALUES[before], 0
            ):
                assert drift.psi is not None  # a status above ok has a PSI
                log.warning(
                    "drift.crossed",
                    window=window,
                    feature=feature,
                    level=now.value,
                    psi=round(drift.psi, 3),
                )
                self._metrics.drift_crossed(window, feature, now.value)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            self.check()
