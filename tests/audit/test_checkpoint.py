"""Signed checkpoints: the C2SP signed-note / tlog-checkpoint text, and every way to forge one."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.audit import CheckpointError, format_checkpoint, parse_checkpoint
from service.audit.checkpoint import key_id, split_note

from .conftest import KEY_NAME, ORIGIN, signer, verifier

ROOT = hashlib.sha256(b"some root").digest()


def sign(key: Ed25519PrivateKey, size: int = 42, origin: str = ORIGIN, name: str = KEY_NAME):
    return format_checkpoint(origin, size, ROOT, signers=[signer(key, name)])


def test_format_is_the_tlog_checkpoint_signed_note(signing_key):
    text = sign(signing_key)
    body, signature_lines = text.split("\n\n")
    assert body == f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}"
    assert signature_lines.startswith(f"\u2014 {KEY_NAME} ") and signature_lines.endswith("\n")
    signature = base64.b64decode(signature_lines.split(" ")[-1])
    raw_public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    expected_id = hashlib.sha256(KEY_NAME.encode() + b"\n\x01" + raw_public).digest()[:4]
    assert signature[:4] == expected_id and len(signature) == 4 + 64
    signing_key.public_key().verify(signature[4:], (body + "\n").encode())

    checkpoint = parse_checkpoint(text, verifier(signing_key), ORIGIN)
    assert (checkpoint.origin, checkpoint.size, checkpoint.root_hash) == (ORIGIN, 42, ROOT)
    assert checkpoint.text == text


def test_signatures_interoperate_with_the_go_sumdb_note_vector():
    # golang.org/x/mod/sumdb/note's published example key, text and signature line.
    seed = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
    key = Ed25519PrivateKey.from_private_bytes(seed)
    text = (
        "If you think cryptography is the answer to your problem,\n"
        "then you don't know what your problem is.\n"
    )
    assert key_id("PeterNeumann", key.public_key()).hex() == "c74f20a3"
    signature = key_id("PeterNeumann", key.public_key()) + key.sign(text.encode())
    assert base64.b64encode(signature).decode() == (
        "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
    )


def test_wrong_key_is_rejected(signing_key):
    other = Ed25519PrivateKey.generate()
    with pytest.raises(CheckpointError, match="not signed by the expected key"):
        parse_checkpoint(sign(other), verifier(signing_key), ORIGIN)
    # Even under our key's name: the key ID differs, so it is someone else's signature.
    with pytest.raises(CheckpointError, match="not signed by the expected key"):
        parse_checkpoint(sign(other, name=KEY_NAME), verifier(signing_key), ORIGIN)


def test_wrong_origin_is_rejected(signing_key):
    with pytest.raises(CheckpointError, match="is for log"):
        parse_checkpoint(
            sign(signing_key, origin="privscore.audit/other"), verifier(signing_key), ORIGIN
        )


def test_altered_body_fails_the_signature(signing_key):
    text = sign(signing_key, size=42)
    for altered in (
        text.replace("\n42\n", "\n43\n", 1),
        text.replace(base64.b64encode(ROOT).decode(), base64.b64encode(bytes(32)).decode()),
        text.replace(ORIGIN, ORIGIN + "x", 1),
    ):
        with pytest.raises(CheckpointError, match="does not verify"):
            parse_checkpoint(altered, verifier(signing_key), ORIGIN)


def test_a_bad_signature_of_ours_rejects_the_note_even_beside_a_good_one(signing_key):
    text = sign(signing_key)
    good_line = text.split("\n\n")[1]
    signature = bytearray(base64.b64decode(good_line.split(" ")[-1]))
    signature[10] ^= 1
    bad_line = f"\u2014 {KEY_NAME} {base64.b64encode(bytes(signature)).decode()}\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        parse_checkpoint(text + bad_line, verifier(signing_key), ORIGIN)


def test_unknown_signatures_such_as_witness_cosignatures_are_ignored(signing_key):
    witness = Ed25519PrivateKey.generate()
    witness_line = sign(witness, name="witness.example/w1").split("\n\n")[1]
    text = sign(signing_key) + witness_line
    assert parse_checkpoint(text, verifier(signing_key), ORIGIN).size == 42


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace("\n42\n", "\n042\n"),  # leading zero
        lambda t: t.replace("\n42\n", "\n-1\n"),
        lambda t: t.replace("\n42\n", "\n4 2\n"),
        lambda t: t.rstrip("\n"),  # no final newline
        lambda t: t.split("\n\n")[0] + "\n",  # no signature
        lambda t: t.replace("\n\n", "\nextension line\n\n"),  # extension lines are not ours
        lambda t: t.replace("\n\n", "\n\n\n"),
        lambda t: t.replace("\u2014 ", "-- "),
        lambda t: t.replace(ORIGIN, ORIGIN + "\t"),
        lambda t: t[:-2] + "!\n",  # signature not base64
        lambda t: t.replace("=\n", "\n") if t.endswith("=\n") else t[:-1] + "==\n",
        lambda t: t + "\u2014 \n",
    ],
)
def test_malformed_notes_are_rejected(signing_key, mangle):
    with pytest.raises(CheckpointError):
        parse_checkpoint(mangle(sign(signing_key)), verifier(signing_key), ORIGIN)


def test_format_refuses_bad_names_and_origins(signing_key):
    for name in ("", "has space", "has+plus"):
        with pytest.raises(CheckpointError):
            sign(signing_key, name=name)
    for origin in ("", "two\nlines"):
        with pytest.raises(CheckpointError):
            sign(signing_key, origin=origin)


def test_split_note_takes_the_last_blank_line():
    body, lines = split_note("a\n\nb\n\n\u2014 k c2ln\n")
    assert body == "a\n\nb\n" and lines == ["\u2014 k c2ln"]
