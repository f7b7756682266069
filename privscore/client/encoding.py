"""Unambiguous byte encodings bound into MACs, AEAD associated data and HPKE info."""

from __future__ import annotations

import struct


def length_prefixed(label: bytes, *parts: str) -> bytes:
    """`label`, then each part as a 4-byte big-endian length and its UTF-8 bytes.

    Length prefixes make ("ab", "c") and ("a", "bc") encode differently, so no two contexts
    can collide by moving bytes from one part to the next.
    """
    out = bytearray(label)
    for part in parts:
        encoded = part.encode("utf-8")
        out += struct.pack(">I", len(encoded))
        out += encoded
    return bytes(out)
