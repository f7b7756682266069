"""Per-call context set by the interceptors and read below them: who is calling."""

from __future__ import annotations

import contextvars

# The caller's identity: the peer address until mutual TLS gives a verified certificate identity.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("privscore_caller", default="unknown")
