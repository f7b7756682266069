"""The server serves only the signed model it was given, and needs no training stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.config import DEFAULT_MODEL_DIR
from tests.conftest import REPO_ROOT, init_dev_keys


def serve_once(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`privscore serve` with dev keys in `data_dir`; these tests expect it to refuse."""
    init_dev_keys(data_dir)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            "0",
            "--log-format",
            "json",
            "--data-dir",
            str(data_dir),
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def flip_onnx_byte(artifact: Path) -> None:
    model = artifact / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))


def change_manifest(artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["scorecard"]["base_score"] = 700
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def remove_signature(artifact: Path) -> None:
    (artifact / "manifest.sig").unlink()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (flip_onnx_byte, "HASH_MISMATCH"),
        (change_manifest, "BAD_SIGNATURE"),
        (remove_signature, "UNSIGNED"),
    ],
)
def test_a_tampered_or_unsigned_model_is_refused(
    tmp_path: Path, tamper: Callable[[Path], None], reason: str
) -> None:
    artifact = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, artifact)
    tamper(artifact)
    result = serve_once(tmp_path / "var", "--model-dir", str(artifact))
    assert result.returncode == 1
    assert f"model refused: {reason}" in result.stderr
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert "server.refused_to_start" in events and "server.ready" not in events


def test_a_model_signed_by_an_untrusted_key_is_refused(tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    result = serve_once(tmp_path / "var", "--model-public-key", str(stranger))
    assert result.returncode == 1
    assert "model refused: BAD_SIGNATURE" in result.stderr


def test_serving_imports_no_training_stack() -> None:
    code = (
        "import sys, service.server, service.cli; "
        "loaded = {m.split('.')[0] for m in sys.modules}; "
        "assert not loaded & {'sklearn', 'skl2onnx', 'onnx', 'matplotlib', 'joblib', "
        "'model_export'}, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
