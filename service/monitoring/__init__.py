"""Monitoring: what the running server tells operators without revealing any applicant.

The drift API (`service.monitoring.drift`): `DriftMonitor(reference, window=, min_count=)`
with `observe(row, score)` per decision and `report()` for both windows.
"""

from service.model.manifest import DriftReference
from service.monitoring.drift import (
    MIN_COUNT_FLOOR,
    PSI_ACT,
    PSI_EPSILON,
    PSI_WATCH,
    SINCE_START,
    WINDOW,
    BinShare,
    Drift,
    DriftMonitor,
    DriftReport,
    DriftStatus,
    WindowReport,
    psi,
)

__all__ = [
    "MIN_COUNT_FLOOR",
    "PSI_ACT",
    "PSI_EPSILON",
    "PSI_WATCH",
    "SINCE_START",
    "WINDOW",
    "BinShare",
    "Drift",
    "DriftMonitor",
    "DriftReference",
    "DriftReport",
    "DriftStatus",
    "WindowReport",
    "psi",
]
