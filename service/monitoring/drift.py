"""Drift: served decisions counted in the training bins, compared by the population stability
index (PSI), without revealing any applicant's bin.

The reference is the signed manifest's `drift_reference` (`DriftReference`: the development
sample's counts per bin of each model feature and of the score). `DriftMonitor.observe` bins
one decision's model features and score and keeps only the bin indices: a ring buffer of the
last `window` decisions and counters since start. `report()` gives, for both windows, per
feature and for the score: the number of decisions, the PSI, a status and the served vs
training share of each reported bin, labelled by the training edges ("<= 4", "(4, 12]",
"> 60") or category names. Never a served value.

PSI = sum over bins of (a - e) * ln(a / e), a the served share, e the training share, each
raised to `PSI_EPSILON` (1e-4) when smaller, so an empty share stays finite. Status: "ok" below
`PSI_WATCH` (0.1), "watch" below `PSI_ACT` (0.25), "act" from there; "insufficient" (no bins,
no PSI) with fewer than `min_count` decisions in the window, or when no bin holds `min_count`.

Privacy rule (k = `min_count`, at least 10), applied per window and feature before anything
is reported or computed:
1. a bin with at least k decisions is reported alone;
2. every other bin (fewer than k decisions, empty ones included) goes into one bucket,
   "other bins (each < k)", with the sum of their counts and of their training shares;
3. if that bucket holds fewer than k decisions, it is merged into the reported bin with the
   most decisions (the lower bin on a tie), labelled "<that bin> + other bins (each < k)".
The PSI is computed on the same buckets. One exception: when step 3 leaves a single bucket
(one bin holds all but fewer than k decisions), a PSI on it would be 0 whatever happened, so
the PSI reported is the smallest PSI of the two buckets [that bin, all others] over every
count under k the others could hold: a lower bound of the true PSI that uses nothing the rule
hides, so a score stuck in one bin still reaches "act".
The buckets and their counts depend only on the counts of bins holding k or more and on the
total of the others, and so does the PSI; so moving one decision
between two bins that both hold fewer than k changes no report: no count, share or PSI shows
which rare bin an applicant fell in. What the rule cannot hide: reports taken before and
after a single decision differ in the bin it fell into when that bin is reported alone (or
crosses k); with frequent scrapes and little traffic that reveals a common bin, so scrape at
an interval that spans many decisions.

Standard library only. One lock guards the counters; observe() bins the row before taking it,
and report() copies the counters under it and computes outside.
"""

from __future__ import annotations

import itertools
import math
import threading
from array import array
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from service.model.manifest import CategoricalBins, DriftReference, NumericBins

PSI_WATCH = 0.1
PSI_ACT = 0.25
PSI_EPSILON = 1e-4
MIN_COUNT_FLOOR = 10
WINDOW = "window"
SINCE_START = "since_start"


class DriftStatus(StrEnum):
    OK = "ok"
    WATCH = "watch"
    ACT = "act"
    INSUFFICIENT = "insufficient"


@dataclass(frozen=True)
class BinShare:
    """One reported bucket: a training bin alone, or bins merged by the privacy rule."""

    label: str
    members: tuple[str, ...]  # the training bins it covers (one when reported alone)
    count: int  # served decisions in it: never fewer than min_count
    served: float  # share of the window's decisions
    training: float  # share of the development rows


@dataclass(frozen=True)
class Drift:
    """One feature (or the score) in one window."""

    decisions: int
    status: DriftStatus
    psi: float | None  # None when insufficient
    bins: tuple[BinShare, ...]  # empty when insufficient


@dataclass(frozen=True)
class WindowReport:
    decisions: int
    features: Mapping[str, Drift]  # model features, in schema order
    score: Drift


@dataclass(frozen=True)
class DriftReport:
    min_count: int
    window_size: int
    window: WindowReport  # the last `window_size` decisions
    since_start: WindowReport

    @property
    def windows(self) -> dict[str, WindowReport]:
        return {WINDOW: self.window, SINCE_START: self.since_start}


def psi(served: Sequence[float], training: Sequence[float], epsilon: float = PSI_EPSILON) -> float:
    """sum((a - e) * ln(a / e)) over paired shares, each raised to at least `epsilon`."""
    total = 0.0
    for a, e in zip(served, training, strict=True):
        a, e = max(a, epsilon), max(e, epsilon)
        total += (a - e) * math.log(a / e)
    return total


def status_of(value: float) -> DriftStatus:
    if value < PSI_WATCH:
        return DriftStatus.OK
    return DriftStatus.WATCH if value < PSI_ACT else DriftStatus.ACT


def bin_labels(bins: NumericBins | CategoricalBins) -> tuple[str, ...]:
    """Human labels from the training edges ("<= 4", "(4, 12]", "> 60") or the categories."""
    if isinstance(bins, CategoricalBins):
        return bins.categories
    edges = [_number(edge) for edge in bins.edges]
    if not edges:
        return ("all values",)
    middle = [f"({low}, {high}]" for low, high in itertools.pairwise(edges)]
    return (f"<= {edges[0]}", *middle, f"> {edges[-1]}")


def coarsen(
    counts: Sequence[int],
    training: Sequence[float],
    labels: Sequence[str],
    min_count: int,
) -> list[BinShare]:
    """The privacy rule (module docstring) on one window's counts per training bin."""
    total = sum(counts)
    alone = [i for i, count in enumerate(counts) if count >= min_count]
    rare = [i for i, count in enumerate(counts) if count < min_count]
    groups = [[i] for i in alone]
    other = f"other bins (each < {min_count})"
    names = [labels[i] for i in alone]
    if rare:
        if sum(counts[i] for i in rare) >= min_count or not groups:
            groups.append(rare)
            names.append(other)
        else:
            largest = max(range(len(groups)), key=lambda g: (counts[groups[g][0]], -g))
            groups[largest] = sorted(groups[largest] + rare)
            names[largest] = f"{names[largest]} + {other}"
    shares = []
    for name, group in zip(names, groups, strict=True):
        count = sum(counts[i] for i in group)
        shares.append(
            BinShare(
                label=name,
                members=tuple(labels[i] for i in group),
                count=count,
                served=count / total,
                training=sum(training[i] for i in group),
            )
        )
    return shares


class _Feature:
    """One binned quantity: how to find a value's bin, and the training side."""

    def __init__(self, name: str, bins: NumericBins | CategoricalBins) -> None:
        self.name = name
        self.size = len(bins.counts)
        self.labels = bin_labels(bins)
        rows = sum(bins.counts)
        self.training = tuple(count / rows for count in bins.counts)
        self.edges = bins.edges if isinstance(bins, NumericBins) else None
        self.positions = (
            {category: i for i, category in enumerate(bins.categories)}
            if isinstance(bins, CategoricalBins)
            else None
        )

    def index(self, value: object) -> int:
        """The value's bin; ValueError (not quoting the value) when it cannot have one."""
        if self.positions is not None:
            position = self.positions.get(value) if isinstance(value, str) else None
            if position is None:
                raise ValueError(f"{self.name}: not one of the schema's categories")
            return position
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.name}: must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{self.name}: must be finite")
        assert self.edges is not None
        return bisect_left(self.edges, value)


class DriftMonitor:
    def __init__(self, reference: DriftReference, *, window: int, min_count: int) -> None:
        """Counters for `reference`'s features and score; `window` decisions in the sliding
        window, `min_count` the k of the privacy rule (at least 10, at most `window`)."""
        if min_count < MIN_COUNT_FLOOR:
            raise ValueError(f"min_count must be at least {MIN_COUNT_FLOOR}")
        if window < min_count:
            raise ValueError("window must hold at least min_count decisions")
        self.min_count = min_count
        self.window_size = window
        self._features = [_Feature(name, bins) for name, bins in reference.features.items()]
        self._all = [*self._features, _Feature("score", reference.score)]
        self._lock = threading.Lock()
        # Bin indices of the last `window` decisions, one byte each while a feature has <= 256.
        self._ring = [
            array("B", bytes(window)) if f.size <= 256 else array("H", [0]) * window
            for f in self._all
        ]
        self._window_counts = [[0] * f.size for f in self._all]
        self._total_counts = [[0] * f.size for f in self._all]
        self._next = 0  # decisions observed since start; the next one goes to _next % window

    def observe(self, row: Mapping[str, object], score: int) -> None:
        """Count one decision: its model features (extra keys are ignored) and its score.
        ValueError, counting nothing, when a feature is missing or cannot be binned."""
        indices = []
        for feature in self._features:
            if feature.name not in row:
                raise ValueError(f"{feature.name}: missing")
            indices.append(feature.index(row[feature.name]))
        indices.append(self._all[-1].index(score))
        with self._lock:
            slot = self._next % self.window_size
            full = self._next >= self.window_size
            for ring, window, total, index in zip(
                self._ring, self._window_counts, self._total_counts, indices, strict=True
            ):
                if full:
                    window[ring[slot]] -= 1
                ring[slot] = index
                window[index] += 1
                total[index] += 1
            self._next += 1

    def report(self) -> DriftReport:
        with self._lock:
            observed = self._next
            window_counts = [list(counts) for counts in self._window_counts]
            total_counts = [list(counts) for counts in self._total_counts]
        return DriftReport(
            min_count=self.min_count,
            window_size=self.window_size,
            window=self._window_report(min(observed, self.window_size), window_counts),
            since_start=self._window_report(observed, total_counts),
        )

    def _window_report(self, decisions: int, counts: list[list[int]]) -> WindowReport:
        drifts = [
            self._drift(feature, decisions, feature_counts)
            for feature, feature_counts in zip(self._all, counts, strict=True)
        ]
        return WindowReport(
            decisions=decisions,
            features={f.name: drift for f, drift in zip(self._features, drifts, strict=False)},
            score=drifts[-1],
        )

    def _drift(self, feature: _Feature, decisions: int, counts: list[int]) -> Drift:
        k = self.min_count
        home = [i for i, count in enumerate(counts) if count >= k]
        if decisions < k or not home:
            return Drift(decisions, DriftStatus.INSUFFICIENT, None, ())
        bins = coarsen(counts, feature.training, feature.labels, k)
        if len(bins) > 1:
            value = psi([b.served for b in bins], [b.training for b in bins])
        else:  # one bin holds all but fewer than k: a lower bound (module docstring)
            trained = feature.training[home[0]]
            others = sum(feature.training) - trained
            value = min(
                psi([(decisions - rest) / decisions, rest / decisions], [trained, others])
                for rest in range(min(k - 1, decisions - k) + 1)
            )
        return Drift(decisions, status_of(value), value, tuple(bins))


def _number(value: float) -> str:
    """An edge as written in the manifest, without a needless ".0"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
