"""The monitoring settings, declared like every other (service/settings.py), joined to
ServerSettings as one group:

    --metrics-port      PRIVSCORE_METRICS_PORT      unset: no metrics; 0 picks a free port
    --metrics-bind      PRIVSCORE_METRICS_BIND      127.0.0.1
    --drift-window      PRIVSCORE_DRIFT_WINDOW      the last N scored applicants
    --drift-min-count   PRIVSCORE_DRIFT_MIN_COUNT   k: a bin holding fewer is reported only merged

Traces are configured by the standard OpenTelemetry variables (service/monitoring/tracing.py),
not here: collectors, sidecars and operators already set those.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from service.settings import ConfigError, Resolved, integer, setting

# The smallest k the drift report may use: below it one applicant's bin could be inferred.
MIN_DRIFT_COUNT = 10


def _port(flag: str, text: str, resolved: Resolved) -> int | None:
    return integer(0, 65535)(flag, text, resolved) if text else None


def _bind(flag: str, text: str, _: Resolved) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(f"{flag} must be an IP address literal such as 127.0.0.1") from None


@dataclass(frozen=True)
class MonitoringSettings:
    metrics_port: int | None = setting(
        "--metrics-port",
        "serve Prometheus metrics over HTTP on this port (0 picks a free one; the log's "
        "server.ready line names it; with --workers N, worker i uses this port + i); no "
        "personal value is ever in a metric",
        _port,
        "",
        default_doc="unset: no metrics",
        value=None,
    )
    metrics_bind: str = setting(
        "--metrics-bind",
        "IP address the metrics listen on (in a pod, 0.0.0.0 for the cluster's scraper)",
        _bind,
        "127.0.0.1",
        value="127.0.0.1",
    )
    drift_window: int = setting(
        "--drift-window",
        "the drift report's window: the last N scored applicants (and since start)",
        integer(MIN_DRIFT_COUNT, 1_000_000),
        "1000",
        value=1000,
    )
    drift_min_count: int = setting(
        "--drift-min-count",
        "k: a bin with fewer applicants in a window is reported only merged with others, and "
        "a window with fewer is not reported",
        integer(MIN_DRIFT_COUNT, 1_000_000),
        "20",
        value=20,
    )
