"""`privscore keys ...`: create, rotate, list and retire the server's keys.

Every change rewrites the public files callers and reviewers read (public keyset, audit
verification keys); nothing here prints or logs key material.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from service.config import DataLayout
from service.privacy.keyring import KEK_ENV, Keyring, create_kek_file, load_kek
from service.privacy.pseudonym import create_key_file


def _write_public(path: Path, document: object) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def publish(keyring: Keyring, layout: DataLayout) -> None:
    """Refresh the public keyset and the audit verification keys from the keyring."""
    layout.keys_dir.mkdir(parents=True, exist_ok=True)
    _write_public(layout.public_keyset, keyring.public_keyset())
    _write_public(
        layout.audit_public_keys,
        {
            key_id: base64.b64encode(public).decode("ascii")
            for key_id, public in keyring.audit_public_keys().items()
        },
    )


def init_keys(layout: DataLayout, keyring_path: Path, kek_file: Path) -> list[str]:
    """Create what is missing: dev KEK (unless PRIVSCORE_KEK is set), keyring, caller key.

    Returns what was created, for the command to report; existing keys are never replaced.
    """
    created = []
    if KEK_ENV not in os.environ and not kek_file.exists():
        create_kek_file(kek_file)
        created.append(f"dev KEK {kek_file}")
    kek = load_kek(kek_file)
    if keyring_path.exists():
        keyring = Keyring.load(keyring_path, kek)
    else:
        keyring = Keyring.create(keyring_path, kek)
        created.append(f"keyring {keyring_path}")
    publish(keyring, layout)
    if not layout.pseudonym_key.exists():
        create_key_file(layout.pseudonym_key)
        created.append(f"dev caller pseudonymisation key {layout.pseudonym_key}")
    return created
