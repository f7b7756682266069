"""The pseudonymisation key's file (`privscore keys init` makes a dev one); the pseudonym
itself is the caller's (privscore/client/pseudonym.py)."""

from __future__ import annotations

import os
from pathlib import Path

from privscore.client.pseudonym import KEY_BYTES, PSEUDONYM_SHAPE, Pseudonymiser
from service.files import create_private

__all__ = ["KEY_BYTES", "PSEUDONYM_SHAPE", "Pseudonymiser", "create_key_file"]


def create_key_file(path: Path) -> None:
    """Write a fresh random pseudonymisation key, readable by its owner only."""
    create_private(path, os.urandom(KEY_BYTES))
