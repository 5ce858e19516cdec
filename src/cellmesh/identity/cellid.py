"""CellIDs: the 16-byte names of nodes, derived from their Ed25519 public keys.

A CellID is BLAKE3 in key-derivation mode, with the context string
``"cellmesh 2026-11 CellID v1"``, over the node's 32-byte Ed25519 public key, truncated to
16 bytes. The context string gives the derivation its own domain, so a CellID can never collide
with any other BLAKE3 use in cellmesh.

The *origin hash* is a separate, shorter (8-byte) name of the same key, computed with keyed
BLAKE2s so it lives in a different domain again. It is used where space is tight.

Everything here is pure: no I/O, no clocks, no randomness.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

import blake3

__all__ = [
    "CELL_ID_CONTEXT",
    "CELL_ID_LEN",
    "ORIGIN_HASH_KEY",
    "ORIGIN_HASH_LEN",
    "ZERO_CELL_ID",
    "CellId",
    "cell_id_from_public_key",
    "format_cell_id",
    "origin_hash",
    "parse_cell_id",
]

CELL_ID_LEN = 16
"""Length of a CellID in bytes (32 hex characters)."""

CELL_ID_CONTEXT = "cellmesh 2026-11 CellID v1"
"""BLAKE3 derive_key context string for CellIDs. Changing it changes every CellID."""

ORIGIN_HASH_KEY = b"cellmesh origin hash v1"
"""BLAKE2s key that puts origin hashes in their own domain."""

ORIGIN_HASH_LEN = 8
"""Length of an origin hash in bytes."""

PUBLIC_KEY_LEN = 32

CellId = NewType("CellId", bytes)
"""A node's 16-byte identifier. Build one with `cell_id_from_public_key` or `parse_cell_id`."""

ZERO_CELL_ID = CellId(bytes(CELL_ID_LEN))
"""The all-zero CellID; no real key hashes to it in practice, so it can mean "none"."""

_HEX_RE = re.compile(r"[0-9a-fA-F]*")


def _check_public_key(pub: bytes) -> None:
    if not isinstance(pub, bytes | bytearray | memoryview):
        raise TypeError(f"public key must be bytes, got {type(pub).__name__}")
    if len(pub) != PUBLIC_KEY_LEN:
        raise ValueError(f"Ed25519 public key must be {PUBLIC_KEY_LEN} bytes, got {len(pub)}")


def cell_id_from_public_key(pub: bytes) -> CellId:
    """Derive the CellID of a 32-byte Ed25519 public key.

    Raises `ValueError` if `pub` is not exactly 32 bytes.
    """
    _check_public_key(pub)
    digest = blake3.blake3(bytes(pub), derive_key_context=CELL_ID_CONTEXT).digest(
        length=CELL_ID_LEN
    )
    return CellId(digest)


def origin_hash(pub: bytes) -> bytes:
    """Return the 8-byte origin hash of a 32-byte Ed25519 public key (keyed BLAKE2s).

    Raises `ValueError` if `pub` is not exactly 32 bytes.
    """
    _check_public_key(pub)
    return hashlib.blake2s(bytes(pub), key=ORIGIN_HASH_KEY, digest_size=ORIGIN_HASH_LEN).digest()


def format_cell_id(c: bytes) -> str:
    """Render a CellID as 32 lowercase hex characters.

    Raises `ValueError` if `c` is not 16 bytes long.
    """
    if len(c) != CELL_ID_LEN:
        raise ValueError(f"CellID must be {CELL_ID_LEN} bytes, got {len(c)}")
    return bytes(c).hex()


def parse_cell_id(text: str) -> CellId:
    """Parse a CellID from 32 hex characters (either case; surrounding whitespace ignored).

    Raises `ValueError` with a message a user can act on when `text` is not a CellID.
    """
    if not isinstance(text, str):
        raise TypeError(f"CellID text must be str, got {type(text).__name__}")
    stripped = text.strip()
    if len(stripped) != 2 * CELL_ID_LEN:
        raise ValueError(f"CellID must be {2 * CELL_ID_LEN} hex characters, got {len(stripped)}")
    if not _HEX_RE.fullmatch(stripped):
        bad = next(ch for ch in stripped if ch not in "0123456789abcdefABCDEF")
        raise ValueError(
            f"CellID must contain only hex digits 0-9 and a-f, found {bad!r} in {stripped!r}"
        )
    return CellId(bytes.fromhex(stripped))
