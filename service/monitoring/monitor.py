"""`privscore monitor`: the drift report of a running server, read from its metrics endpoint.

It reads only what the server publishes to any scraper (`privscore_drift_*`, see
service/monitoring/drift_watch.py), so it needs no certificate and sees no more than
Prometheus does: buckets already merged by the k rule, shares and PSI, never a value. It
prints one table (per feature and the score: decisions, PSI and status in the sliding window
and since start) and can draw the served against the training shares of each feature as a
PNG (matplotlib, from the `monitor` extra).
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from service.files import write_private
from service.monitoring.drift import PSI_ACT, PSI_WATCH, SINCE_START, WINDOW
from service.monitoring.drift_watch import SCORE_SERIES

STATUS_NAMES = {-1: "insufficient", 0: "ok", 1: "watch", 2: "act"}
WINDOWS = (WINDOW, SINCE_START)


class MonitorError(Exception):
    """The endpoint cannot be read or serves no drift report."""


@dataclass
class Series:
    """One feature (or the score) in one window."""

    psi: float | None = None
    status: str = "insufficient"
    # bucket label -> (served share, training share), in the order the server lists them
    shares: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Snapshot:
    min_count: int
    decisions: dict[str, int]  # by window
    series: dict[str, dict[str, Series]]  # window -> feature -> series


def fetch(url: str, timeout: float = 10.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MonitorError(f"cannot read {url}: {reason}") from None


def parse(text: str) -> Snapshot:
    decisions: dict[str, int] = {}
    series: dict[str, dict[str, Series]] = defaultdict(dict)
    min_count = 0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "privscore_drift_min_count":
                min_count, found = int(sample.value), True
            elif sample.name == "privscore_drift_decisions":
                decisions[labels["window"]] = int(sample.value)
            elif sample.name in ("privscore_drift_psi", "privscore_drift_status"):
                entry = series[labels["window"]].setdefault(labels["feature"], Series())
                if sample.name == "privscore_drift_psi":
                    entry.psi = sample.value
                else:
                    entry.status = STATUS_NAMES.get(int(sample.value), "unknown")
            elif sample.name == "privscore_drift_share":
                entry = series[labels["window"]].setdefault(labels["feature"], Series())
                pair = entry.shares.setdefault(labels["bin"], [0.0, 0.0])
                pair[0 if labels["population"] == "served" else 1] = sample.value
    if not found:
        raise MonitorError(
            "the endpoint serves no drift report: is it privscore's, and does the model's "
            "manifest carry a drift reference?"
        )
    return Snapshot(min_count, decisions, dict(series))


def table(snapshot: Snapshot) -> str:
    """The report as text: one row per feature, the score last."""
    features = list(snapshot.series.get(SINCE_START, {}))
    features.sort(key=lambda name: name == SCORE_SERIES)  # the score last, order kept
    width = max([len("feature"), *(len(_name(f)) for f in features)])
    lines = [
        f"drift (PSI; watch >= {PSI_WATCH:g}, act >= {PSI_ACT:g}; bins with fewer than "
        f"{snapshot.min_count} decisions merged)",
        f"{'':<{width}}  {'window':^21}  {'since start':^21}",
        f"{'':<{width}}  {_decisions(snapshot, WINDOW):^21}  "
        f"{_decisions(snapshot, SINCE_START):^21}",
        f"{'feature':<{width}}  {'PSI':>8}  {'status':<12}  {'PSI':>8}  {'status':<12}",
    ]
    for feature in features:
        cells = []
        for window in WINDOWS:
            entry = snapshot.series.get(window, {}).get(feature, Series())
            psi = "-" if entry.psi is None else f"{entry.psi:.4f}"
            cells.append(f"{psi:>8}  {entry.status:<12}")
        lines.append(f"{_name(feature):<{width}}  {'  '.join(cells)}")
    return "\n".join(lines)


def _name(feature: str) -> str:
    return "(score)" if feature == SCORE_SERIES else feature


def _decisions(snapshot: Snapshot, window: str) -> str:
    return f"{snapshot.decisions.get(window, 0)} decisions"


def plot(snapshot: Snapshot, window: str, path: Path) -> None:
    """Served vs training shares of each feature's reported buckets, one panel each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MonitorError("--png needs matplotlib: pip install 'privscore[monitor]'") from None
    found = snapshot.series.get(window, {})
    names = sorted(found, key=lambda name: name == SCORE_SERIES)
    columns = 4
    rows = max(1, -(-len(names) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(names):
            axis.axis("off")
            continue
        entry = found[names[index]]
        labels = [_short(label) for label in entry.shares]
        served = [pair[0] for pair in entry.shares.values()]
        training = [pair[1] for pair in entry.shares.values()]
        positions = range(len(labels))
        axis.bar([p - 0.2 for p in positions], training, width=0.4, label="training")
        axis.bar([p + 0.2 for p in positions], served, width=0.4, label="served")
        axis.set_xticks(list(positions), labels, rotation=45, ha="right", fontsize=6)
        psi = "insufficient" if entry.psi is None else f"PSI {entry.psi:.3f} ({entry.status})"
        axis.set_title(f"{_name(names[index])}\n{psi}", fontsize=8)
        axis.tick_params(axis="y", labelsize=6)
        if index == 0:
            axis.legend(fontsize=6)
    figure.suptitle(
        f"privscore drift, {window.replace('_', ' ')}: {_decisions(snapshot, window)}; "
        f"bins under {snapshot.min_count} merged"
    )
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=90)
    plt.close(figure)
    write_private(path, image.getvalue())  # owner-only, like every file privscore writes


def _short(label: str, limit: int = 28) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"
