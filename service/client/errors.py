"""Refusals as the CLI shows them: privscore/client/errors.py (the client distribution's)."""

from privscore.client.errors import REQUEST_ID_TRAILER, Refusal, refusal

__all__ = ["REQUEST_ID_TRAILER", "Refusal", "refusal"]
