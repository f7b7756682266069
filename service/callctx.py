"""Per-call context set by the interceptors and read below them: who is calling."""

from __future__ import annotations

import contextvars

# The caller's identity: the peer address until mutual TLS gives a verified certificate identity.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("privscore_caller", default="unknown")
# What the verified caller is granted by the authorisation policy: methods and capabilities
# within them (service/security/authz.py `capability_name`), for servicers that gate a part of
# a call.
GRANTS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "privscore_grants", default=frozenset()
)
