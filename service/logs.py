"""Application logging: structlog, JSON lines on stdout (console renderer on a terminal).

The audit log is not this log: it has its own schema and writer. Nothing here may carry a
feature value, a raw id or key material; `redact` masks deny-listed keys as a second line of
defence behind code that never passes such values in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Event keys whose values must never reach a log line, whatever a caller passes.
DENIED_KEYS = frozenset(
    {
        "value",
        "values",
        "plaintext",
        "features",
        "feature_values",
        "key",
        "secret",
        "private_key",
        "data_key",
        "ciphertext",
        "customer_id",
        "raw_id",
        "password",
        "token",
    }
)
REDACTED = "[redacted]"
# Values shaped like key material or ciphertext: PEM blocks, long base64 or hex runs, raw bytes.
_SECRET_SHAPED = re.compile(r"-----BEGIN|[A-Za-z0-9+/]{40,}={0,2}|[0-9a-fA-F]{64,}")


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask deny-listed keys and any value shaped like a secret, whatever its key."""
    for key, value in event.items():
        shaped = isinstance(value, str) and key != "event" and _SECRET_SHAPED.search(value)
        if key in DENIED_KEYS or isinstance(value, bytes | bytearray) or shaped:
            event[key] = REDACTED
    return event


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog once per process; `auto` picks console on a TTY, else JSON."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
