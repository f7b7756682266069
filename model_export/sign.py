"""Ed25519 keys (PEM) and signing an artifact's manifest.

Signing first re-checks what the signature will vouch for: the manifest parses and the ONNX
file (and any verification file) matches the hash the manifest pins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.model.manifest import (
    SIGNATURE_FILE,
    Manifest,
    check_file_hash,
    key_id,
    read_manifest_document,
    signature_document,
)


def generate_keypair(private_out: str | Path, public_out: str | Path) -> str:
    """Write a new private key (PKCS#8 PEM, mode 0600) and its public key (SubjectPublicKeyInfo
    PEM); returns the key id. Refuses to overwrite either file."""
    private_out, public_out = Path(private_out), Path(public_out)
    for path in (private_out, public_out):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL + 0600: the private key is never readable by others, not even for a moment.
    descriptor = os.open(private_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_out.write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def sign_artifact(artifact_dir: str | Path, private_key_path: str | Path) -> str:
    """Write `manifest.sig` for the directory's manifest; returns the signing key's id."""
    document = read_manifest_document(artifact_dir)
    manifest = Manifest.from_dict(document)
    check_file_hash(artifact_dir, manifest.onnx.file, manifest.onnx.sha256)
    for entry in manifest.verification.values():
        if isinstance(entry, dict) and {"file", "sha256"} <= set(entry):
            check_file_hash(artifact_dir, entry["file"], entry["sha256"])
    envelope = signature_document(document, load_private_key(private_key_path))
    Path(artifact_dir, SIGNATURE_FILE).write_text(json.dumps(envelope, indent=2) + "\n")
    return envelope["key_id"]
