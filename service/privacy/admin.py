"""`privscore keys ...`: create, rotate, list and retire the server's keys.

Every change rewrites the public files callers and reviewers read (public keyset, audit
verification keys); nothing here prints or logs key material.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.config import DataLayout
from service.files import private_dir, write_private
from service.privacy.keyring import (
    AUDIT_SIGNING,
    KEK_ENV,
    Keyring,
    create_kek_file,
    load_kek,
)
from service.privacy.pseudonym import create_key_file


def publish(keyring: Keyring, layout: DataLayout) -> None:
    """Refresh the public keyset (for callers) and the audit verification key (for reviewers).

    Public in content, not in place: like everything under the data directory they are
    owner-only (0600), and are handed to callers and reviewers as copies.
    """
    private_dir(layout.keys_dir)
    keyset = json.dumps(keyring.public_keyset(), indent=2) + "\n"
    write_private(layout.public_keyset, keyset.encode("utf-8"))
    audit_key = ed25519.Ed25519PublicKey.from_public_bytes(
        keyring.primary(AUDIT_SIGNING).public_key
    )
    write_private(
        layout.audit_public_key,
        audit_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
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
